// Backward grouped GEMMs of the fused MoE over the sorted pair rows: z = dout W2[e] (with the
// dg/du and d topk_weights epilogue) and dx rows = [dg; du] W1[e].
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "fused_moe/cuda/fused_moe_gemm.cuh"

namespace accel::fused_moe::cuda {

template <typename T>
static void launch_bwd(GemmMode mode, const GemmParams& p, cudaStream_t stream) {
  TORCH_CHECK(mode == GemmMode::ZBwd || mode == GemmMode::DxBwd,
              "fused_moe: internal error, not a backward row GEMM mode");
  const cudaError_t e = mode == GemmMode::ZBwd ? gemm::launch<T, GemmMode::ZBwd>(p, stream)
                                               : gemm::launch<T, GemmMode::DxBwd>(p, stream);
  C10_CUDA_CHECK(e);
}

void launch_gemm_bwd(at::ScalarType dtype, GemmMode mode, const GemmParams& p, cudaStream_t stream) {
  switch (dtype) {
    case at::kHalf:
      return launch_bwd<__half>(mode, p, stream);
    case at::kBFloat16:
      return launch_bwd<__nv_bfloat16>(mode, p, stream);
    case at::kFloat:
      return launch_bwd<float>(mode, p, stream);
    default:
      TORCH_CHECK(false, "fused_moe: internal error, no CUDA GEMM for dtype ", dtype);
  }
}

}  // namespace accel::fused_moe::cuda
