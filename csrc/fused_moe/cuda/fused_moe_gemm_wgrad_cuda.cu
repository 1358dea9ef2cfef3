// Weight-gradient grouped GEMM of the fused MoE: one CTA per (expert, M tile, N tile) loops over
// that expert's sorted pair rows, so dW1 and dW2 are reduced without atomics (deterministic), and
// experts without tokens get zeros.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "fused_moe/cuda/fused_moe_gemm.cuh"

namespace accel::fused_moe::cuda {

void launch_gemm_wgrad(at::ScalarType dtype, const GemmParams& p, cudaStream_t stream) {
  cudaError_t e = cudaSuccess;
  switch (dtype) {
    case at::kHalf:
      e = gemm::launch<__half, GemmMode::WGrad>(p, stream);
      break;
    case at::kBFloat16:
      e = gemm::launch<__nv_bfloat16, GemmMode::WGrad>(p, stream);
      break;
    case at::kFloat:
      e = gemm::launch<float, GemmMode::WGrad>(p, stream);
      break;
    default:
      TORCH_CHECK(false, "fused_moe: internal error, no CUDA GEMM for dtype ", dtype);
  }
  C10_CUDA_CHECK(e);
}

}  // namespace accel::fused_moe::cuda
