// bf16 GEMM tiles on AVX512-BF16 (vdpbf16ps) for the fused MoE's experts with many tokens.
//
// The transposed orientation, as the fp32 tiles: C^T (features x tokens) = W (features x K) X^T.
// The weight rows are the A operand and are read in place: each step broadcasts one pair
// W[f, 2q..2q+1] (a 32-bit load). The tokens are the B operand, packed once per expert into the
// pair-interleaved layout vdpbf16ps multiplies: panels of up to 48 tokens, panel p holding
//   B[q][t][2] = (X[t, 2q], X[t, 2q + 1])   for pair q in [0, ceil(K / 2)), t in the panel,
// zero beyond K and beyond the last token. Packing the small token block instead of the large
// weight matrix is what oneDNN's GEMM cannot do for us (it packs the weights on every call, a
// large share of the work at a hundred-odd tokens an expert), which makes these tiles the faster
// of the two at Mixtral's shapes.
//
// Register block: 8 feature rows x 3 vectors of 16 tokens = 24 fp32 accumulators, 3 B vectors and
// one broadcast; per pair step 3 vector loads and 8 broadcasts feed 24 vdpbf16ps. Narrower blocks
// for the feature tail (1-7 rows) and the last panel (8 to 40 tokens, in steps of 8: the odd 8 as a
// 256-bit vector).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "common/activation.h"

namespace accel::fused_moe::bf16_tiles {

constexpr int64_t kPanel = 48;  // tokens per full B panel

inline int64_t pairs(int64_t K) { return (K + 1) / 2; }
inline int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }
// Tokens in panel p, rounded up to 8 (the last panel may be narrower than kPanel).
inline int64_t panel_width(int64_t n, int64_t p) {
  const int64_t left = n - p * kPanel;
  return left >= kPanel ? kPanel : (left + 7) / 8 * 8;
}
// Columns of C that gemm() writes for n tokens: n rounded up to 8.
inline int64_t padded(int64_t n) { return (n + 7) / 8 * 8; }
// Elements of a packed block of n tokens x K, and where panel p starts in it.
inline int64_t packed_size(int64_t n, int64_t K) { return padded(n) * 2 * pairs(K); }
inline int64_t panel_offset(int64_t p, int64_t K) { return p * kPanel * 2 * pairs(K); }

// Packs one panel: `count` token rows (row t at rows[t], K elements each; count <= width) into dst
// (pairs(K) * width * 2 elements, width = panel_width of the panel), zero beyond K and count.
void pack_panel(const c10::BFloat16* const* rows, int64_t count, int64_t width, int64_t K, c10::BFloat16* dst);

// Writes rows r0, r0 + 1 of a (features x tokens) fp32 block into a packed block of n tokens x K,
// as features k0 and k0 + 1 (k0 even; src1 null: k0 + 1 is K's odd padding, written as zero),
// rounded to bf16: src0[t], src1[t] for t in [0, n).
void pack_feature_pair(const float* src0, const float* src1, int64_t n, int64_t K, int64_t k0, c10::BFloat16* dst);

// C[m * ldc + t] = sum_k A[m * lda + k] * X[t, k] for m in [0, rows) and t in [0, padded(n)),
// X given packed (packed_size(n, K) elements). Requires cpu::cpu_has_avx512_bf16() (as does
// pack_feature_pair). While a block of 8 rows computes, the next 8 rows are prefetched as one run
// of 8 K elements (rows contiguous: lda == K at every call site; another lda only makes that
// prefetch miss); the last block prefetches 8 K elements at `then` (null: nothing), the first
// rows of the caller's next call.
void gemm(const c10::BFloat16* A, int64_t lda, int64_t rows, int64_t K, const c10::BFloat16* packed, int64_t n,
          float* C, int64_t ldc, const c10::BFloat16* then = nullptr);

// The up projection with the activation fused, straight into the down projection's packed input:
// for features f in [0, rows) and tokens t in [0, n),
//   g = Wg[f] . X[t],  u = Wu[f] . X[t],  h = act(g) u  rounded to bf16,
// written as feature j0 + f of the packed block of n tokens x I at hpacked (as pack_feature_pair
// writes it; the panels' padding tokens come out zero). j0 is even; rows is even unless j0 + rows
// == I (odd I: the lone last feature's pair has a zero high half). Register block: 4 features x
// (gate, up) x 48 tokens, the same 24 accumulators as gemm(), activated in registers. Wg and Wu
// rows are contiguous (lda == K). The last block prefetches 4 rows of K at then_g and then_u (null:
// nothing), the caller's next gate and up rows. Requires cpu::cpu_has_avx512_bf16().
void gemm_glu(const c10::BFloat16* Wg, const c10::BFloat16* Wu, int64_t lda, int64_t rows, int64_t K,
              const c10::BFloat16* packed, int64_t n, Activation act, c10::BFloat16* hpacked, int64_t I,
              int64_t j0, const c10::BFloat16* then_g = nullptr, const c10::BFloat16* then_u = nullptr);

}  // namespace accel::fused_moe::bf16_tiles
