// Forward grouped GEMMs of the fused MoE (gate/up with the activation epilogue, and down), for
// float16, bfloat16 (tensor cores) and float32.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "fused_moe/cuda/fused_moe_gemm.cuh"

namespace accel::fused_moe::cuda {

template <typename T>
static void launch_fwd(GemmMode mode, const GemmParams& p, cudaStream_t stream) {
  TORCH_CHECK(mode == GemmMode::UpFwd || mode == GemmMode::DownFwd,
              "fused_moe: internal error, not a forward GEMM mode");
  const cudaError_t e = mode == GemmMode::UpFwd ? gemm::launch<T, GemmMode::UpFwd>(p, stream)
                                                : gemm::launch<T, GemmMode::DownFwd>(p, stream);
  C10_CUDA_CHECK(e);
}

void launch_gemm_fwd(at::ScalarType dtype, GemmMode mode, const GemmParams& p, cudaStream_t stream) {
  switch (dtype) {
    case at::kHalf:
      return launch_fwd<__half>(mode, p, stream);
    case at::kBFloat16:
      return launch_fwd<__nv_bfloat16>(mode, p, stream);
    case at::kFloat:
      return launch_fwd<float>(mode, p, stream);
    default:
      TORCH_CHECK(false, "fused_moe: internal error, no CUDA GEMM for dtype ", dtype);
  }
}

}  // namespace accel::fused_moe::cuda
