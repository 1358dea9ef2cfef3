// fp16 forward tensor-core kernels of sigmoid attention, one per head-dim bucket (see
// sigmoid_attention_fwd.cuh). One file per (dtype, direction) so that they build in parallel.
#include "sigmoid_attention/cuda/sigmoid_attention_fwd.cuh"

namespace accel::sigmoid_attention::cuda {

cudaError_t run_fwd_fp16(const Params& p, cudaStream_t stream) { return detail::dispatch_fwd<__half>(p, stream); }

}  // namespace accel::sigmoid_attention::cuda
