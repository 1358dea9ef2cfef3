// fp16 backward tensor-core kernels of sigmoid attention, one per head-dim bucket (see
// sigmoid_attention_bwd.cuh). One file per (dtype, direction) so that they build in parallel.
#include "sigmoid_attention/cuda/sigmoid_attention_bwd.cuh"

namespace accel::sigmoid_attention::cuda {

cudaError_t run_bwd_fp16(const Params& p, cudaStream_t stream) { return detail::dispatch_bwd<__half>(p, stream); }

}  // namespace accel::sigmoid_attention::cuda
