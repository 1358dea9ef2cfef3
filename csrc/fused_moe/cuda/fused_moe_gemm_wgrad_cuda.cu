// Weight-gradient grouped GEMM of the fused MoE: one CTA per (expert, M tile, N tile) loops over
// that expert's sorted pair rows, so dW1 and dW2 are reduced without atomics (deterministic), and
// experts without tokens get zeros.
#include <c10/util/Exception.h>

#include "fused_moe/cuda/fused_moe_gemm.cuh"

namespace accel::fused_moe::cuda {

void launch_gemm_wgrad(at::ScalarType dtype, const GemmParams& p, cudaStream_t stream) {
  switch (dtype) {
    case at::kHalf:
      return gemm::launch<__half, GemmMode::WGrad>(p, stream);
    case at::kBFloat16:
      return gemm::launch<__nv_bfloat16, GemmMode::WGrad>(p, stream);
    case at::kFloat:
      return gemm::launch<float, GemmMode::WGrad>(p, stream);
    default:
      TORCH_CHECK(false, "fused_moe: internal error, no CUDA GEMM for dtype ", dtype);
  }
}

}  // namespace accel::fused_moe::cuda
