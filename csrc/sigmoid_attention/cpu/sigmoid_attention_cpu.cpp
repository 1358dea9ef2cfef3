// CPU kernels for sigmoid attention, forward and backward.
//
// Forward, per task (batch, query head, block of BQ query rows):
//   for each block of BK allowed keys:  S = Q_blk K_blk^T  (brgemm, K pre-transposed once)
//                                        P = sigmoid(scale S + bias + alibi), masked in place
//                                        acc += P V_blk     (brgemm)
// There is no running max and no rescaling: the accumulator only ever adds.
//
// Backward, per task (batch, kv head, a strided subset of the key blocks), in the transposed
// orientation so that every GEMM reads its operands in place:
//   S^T = K_blk Q^T,  dP^T = V_blk dO^T            (Q^T, dO^T transposed once per call)
//   P^T = sigmoid(...),  dS^T = scale dP^T P^T (1 - P^T)
//   dV_blk += P^T dO,  dK_blk += dS^T Q             (owned by the task: no races)
//   dQ^T += K_blk^T dS^T                            (into the task's split buffer, summed at the end)
// Inputs in bf16/fp16 are widened to fp32 once (O(L D)); fp64 (for gradcheck) runs the same
// algorithm with a plain loop GEMM.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/cpu_avx2_math.h"
#include "common/cpu_avx512_math.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"
#include "sigmoid_attention/sigmoid_attention.h"

namespace accel::sigmoid_attention {
namespace {

using at::vec::Vectorized;

// ------------------------------------------------------------------ tile GEMM
// C[M, N] (+)= A[M, K] B[K, N], all row-major with leading dimensions.
inline void gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const float* A,
                 const float* B, float* C) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}

inline void gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const double* A,
                 const double* B, double* C) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (!add) std::fill(c, c + N, 0.0);
    for (int64_t kk = 0; kk < K; ++kk) {
      const double a = A[i * lda + kk];
      const double* b = B + kk * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

inline void gemm_release(float*) { at::native::cpublas::brgemm_release(/*is_vnni=*/false); }
inline void gemm_release(double*) {}

// ------------------------------------------------------------------ tile sizes

// Query rows x keys per tile. Forward 128 x 128: at long sequences K and V of a head no longer
// fit in L2 and every query block streams them again, so 128-row blocks (rather than 64) halve
// that traffic, and 128-key tiles keep the S tile at 64 KB.
constexpr int64_t kFwdBQ = 128, kFwdBK = 128;
constexpr int64_t kBwdBQ = 128, kBwdBK = 128;
// Forward query blocks per task, at most (see forward_kernel).
constexpr int64_t kFwdMaxGroup = 4;

// ------------------------------------------------------------------ per-sequence geometry
struct Seq {
  int64_t q_row0, k_row0;  // first packed row (varlen) or 0 (dense)
  int64_t len_q, len_k;
  int64_t shift;  // len_k - len_q: query i sits at key position i + shift
};

inline Seq seq_of(const Problem& p, int64_t b) {
  Seq s{};
  if (p.varlen) {
    s.q_row0 = p.cu_seqlens_q[b];
    s.k_row0 = p.cu_seqlens_k[b];
    s.len_q = p.cu_seqlens_q[b + 1] - s.q_row0;
    s.len_k = p.cu_seqlens_k[b + 1] - s.k_row0;
  } else {
    s.len_q = p.max_len_q;
    s.len_k = p.max_len_k;
  }
  if (p.seqused_k) s.len_k = p.seqused_k[b];
  s.shift = s.len_k - s.len_q;
  return s;
}

inline double bias_of(const Problem& p, const Seq& s, int64_t h) {
  if (p.bias) return p.bias[h];
  if (p.has_bias_value) return p.bias_value;
  return -std::log(static_cast<double>(std::max<int64_t>(s.len_k, 1)));
}

inline float slope_of(const Problem& p, int64_t b, int64_t h) {
  return p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
}

// Keys allowed for query i: [key_lo(i), key_hi(i)).
inline int64_t key_lo(const Problem& p, const Seq& s, int64_t i) {
  return p.window_left >= 0 ? std::max<int64_t>(0, i + s.shift - p.window_left) : 0;
}
inline int64_t key_hi(const Problem& p, const Seq& s, int64_t i) {
  return p.window_right >= 0 ? std::min<int64_t>(s.len_k, i + s.shift + p.window_right + 1) : s.len_k;
}
// Queries that may see key j: [query_lo(j), query_hi(j)).
inline int64_t query_lo(const Problem& p, const Seq& s, int64_t j) {
  return p.window_right >= 0 ? std::max<int64_t>(0, j - p.window_right - s.shift) : 0;
}
inline int64_t query_hi(const Problem& p, const Seq& s, int64_t j) {
  return p.window_left >= 0 ? std::min<int64_t>(s.len_q, j + p.window_left - s.shift + 1) : s.len_q;
}

// A strided (batch, head, row) view of q, k, v, grad_out in the kernel's element type.
template <typename T>
struct View {
  const T* base;
  int64_t bs, hs, rs;
  const T* row(int64_t b, int64_t h, int64_t packed_row) const { return base + b * bs + h * hs + packed_row * rs; }
};

// Transposed copies in tile-major order: tile t of head h is a contiguous (D, T) block at
// data + (h * tiles + t) * D * T, so a GEMM operand walks a dense 32-64 KB block instead of rows
// a whole sequence apart (a stride the QK^T GEMM runs markedly slower on). Batch b's
// sequence starts at tile first[b]; rows past its length are zero.
template <typename T>
struct Packed {
  std::vector<int64_t> first;  // (B + 1,)
  int64_t T_ = 0, D = 0, tiles = 0;
  at::Tensor storage;
  const T* tile(int64_t h, int64_t b, int64_t t) const {
    return storage.template data_ptr<T>() + ((h * tiles + first[b] + t) * D) * T_;
  }
};

template <typename src_t, typename T>
Packed<T> pack_transposed(const Problem& p, const src_t* base, std::array<int64_t, 3> st, int64_t heads, bool keys,
                          int64_t tile, const at::TensorOptions& opt) {
  Packed<T> pk;
  pk.T_ = tile;
  pk.D = p.head_dim;
  pk.first.resize(p.batch + 1, 0);
  for (int64_t b = 0; b < p.batch; ++b) {  // keys: only the valid (seqused_k) rows are packed
    const Seq s = seq_of(p, b);
    pk.first[b + 1] = pk.first[b] + ((keys ? s.len_k : s.len_q) + tile - 1) / tile;
  }
  pk.tiles = pk.first[p.batch];
  pk.storage = at::empty({std::max<int64_t>(1, heads * pk.tiles * pk.D * tile)}, opt);
  T* out = pk.storage.template data_ptr<T>();
  const int64_t D = pk.D;
  cpu::parallel_tasks(heads * pk.tiles, [&](int64_t w, int64_t) {
    const int64_t h = w / pk.tiles, gt = w % pk.tiles;
    const int64_t b = std::upper_bound(pk.first.begin(), pk.first.end(), gt) - pk.first.begin() - 1;
    const int64_t t = gt - pk.first[b];
    const Seq s = seq_of(p, b);
    const int64_t len = keys ? s.len_k : s.len_q, r0 = t * tile, rows = std::min(tile, len - r0);
    const int64_t row0 = keys ? s.k_row0 : s.q_row0;
    T* dst = out + w * D * tile;
    for (int64_t r = 0; r < rows; ++r) {
      const src_t* src = base + b * st[0] + h * st[1] + (row0 + r0 + r) * st[2];
      for (int64_t d = 0; d < D; ++d) dst[d * tile + r] = static_cast<T>(src[d]);
    }
    if (rows < tile)
      for (int64_t d = 0; d < D; ++d) std::fill(dst + d * tile + rows, dst + (d + 1) * tile, T(0));
  });
  return pk;
}

// ------------------------------------------------------------------ elementwise
// sigmoid(x) = 1 / (1 + 2^t) with t = -x log2(e). The logit's affine map is folded into t:
// t = a s + c (+ alibi_coef |dpos - col|), a = -scale log2 e, c = -bias log2 e.
// 2^t and the reciprocal: cpu::sigmoid_of_t (common/cpu_avx2_math.h).
using cpu::kLog2e;
#if defined(__AVX2__) && defined(__FMA__)
using cpu::sigmoid_of_t;
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same row map with AVX-512 (compiled for that target only, chosen at run time): 16 lanes,
// vscalefps for 2^n (no lower clamp needed), rcp14 + one Newton step, masked tails.
// GCC 12 flags the _mm512_undefined_*() pass-through of its own unmasked AVX-512 intrinsics as
// uninitialised once they are inlined here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

ACCEL_AVX512_TARGET inline void sigmoid16_avx512(float* p, __mmask16 m, __m512 va, __m512 vc, __m512 val,
                                                 bool alibi, float dpos_col) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 t = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, p), va, vc);
  if (alibi) {
    const __m512 dist = _mm512_abs_ps(_mm512_sub_ps(_mm512_set1_ps(dpos_col), iota));
    t = _mm512_fmadd_ps(dist, val, t);
  }
  t = _mm512_min_ps(t, _mm512_set1_ps(126.f));
  const __m512 d = _mm512_add_ps(cpu::exp2_avx512(t), _mm512_set1_ps(1.f));
  const __m512 r = _mm512_rcp14_ps(d);
  _mm512_mask_storeu_ps(p, m, _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f))));
}

ACCEL_AVX512_TARGET void sigmoid_row_avx512(float* s, int64_t c0, int64_t c1, float a, float c, float al,
                                            int64_t dpos) {
  const __m512 va = _mm512_set1_ps(a), vc = _mm512_set1_ps(c), val = _mm512_set1_ps(al);
  const bool alibi = al != 0.f;
  const __mmask16 all = static_cast<__mmask16>(0xffff);
  int64_t col = c0;
  for (; col + 32 <= c1; col += 32) {  // two independent chains per iteration
    sigmoid16_avx512(s + col, all, va, vc, val, alibi, static_cast<float>(dpos - col));
    sigmoid16_avx512(s + col + 16, all, va, vc, val, alibi, static_cast<float>(dpos - col - 16));
  }
  for (; col < c1; col += 16) {
    const int64_t left = c1 - col;
    const __mmask16 m = left >= 16 ? all : static_cast<__mmask16>((1u << left) - 1u);
    sigmoid16_avx512(s + col, m, va, vc, val, alibi, static_cast<float>(dpos - col));
  }
}
#pragma GCC diagnostic pop

bool use_avx512() { return cpu::cpu_has_avx512(); }
#endif

inline float sigmoid_scalar(float t) {
  t = std::min(126.f, std::max(-126.f, t));
  return 1.f / (1.f + std::exp2(t));
}

// Row of logits s[0, n): entries [c0, c1) become sigmoid(scale s + bias - slope |dpos - c|)
// (dpos = aligned query position minus the tile's first key), the rest 0.
inline void sigmoid_row(float* s, int64_t n, int64_t c0, int64_t c1, float scale, float bias, float slope,
                        int64_t dpos) {
  std::fill(s, s + c0, 0.f);
  std::fill(s + std::max(c0, c1), s + n, 0.f);
  const float a = -scale * kLog2e, c = -bias * kLog2e, al = slope * kLog2e;
  int64_t col = c0;
#ifdef ACCEL_HAVE_AVX512_TARGET
  if (use_avx512()) {
    if (c0 < c1) sigmoid_row_avx512(s, c0, c1, a, c, al, dpos);
    return;
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 va = _mm256_set1_ps(a), vc = _mm256_set1_ps(c);
  if (slope == 0.f) {
    for (; col + 16 <= c1; col += 16) {
      const __m256 t0 = _mm256_fmadd_ps(_mm256_loadu_ps(s + col), va, vc);
      const __m256 t1 = _mm256_fmadd_ps(_mm256_loadu_ps(s + col + 8), va, vc);
      _mm256_storeu_ps(s + col, sigmoid_of_t(t0));
      _mm256_storeu_ps(s + col + 8, sigmoid_of_t(t1));
    }
    for (; col + 8 <= c1; col += 8)
      _mm256_storeu_ps(s + col, sigmoid_of_t(_mm256_fmadd_ps(_mm256_loadu_ps(s + col), va, vc)));
  } else {
    const __m256 val = _mm256_set1_ps(al), iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (; col + 8 <= c1; col += 8) {
      const __m256 dist = _mm256_and_ps(_mm256_sub_ps(_mm256_set1_ps(static_cast<float>(dpos - col)), iota), absmask);
      const __m256 t = _mm256_fmadd_ps(dist, val, _mm256_fmadd_ps(_mm256_loadu_ps(s + col), va, vc));
      _mm256_storeu_ps(s + col, sigmoid_of_t(t));
    }
  }
#endif
  for (; col < c1; ++col) {
    const float t = a * s[col] + c + al * std::abs(static_cast<float>(dpos - col));
    s[col] = sigmoid_scalar(t);
  }
}

inline void sigmoid_row(double* s, int64_t n, int64_t c0, int64_t c1, double scale, double bias, double slope,
                        int64_t dpos) {
  std::fill(s, s + c0, 0.0);
  std::fill(s + std::max(c0, c1), s + n, 0.0);
  for (int64_t c = c0; c < c1; ++c) {
    const double x = s[c] * scale + bias - slope * std::abs(double(dpos - c));
    s[c] = 1.0 / (1.0 + std::exp(-x));
  }
}

// Backward row: s holds logits, g holds dP. On return s = P (masked to 0) and g = scale dP P (1 - P).
inline void sigmoid_grad_row(float* s, float* g, int64_t n, int64_t c0, int64_t c1, float scale, float bias,
                             float slope, int64_t dpos) {
  using V = Vectorized<float>;
  constexpr int64_t W = V::size();
  sigmoid_row(s, n, c0, c1, scale, bias, slope, dpos);
  std::fill(g, g + c0, 0.f);
  std::fill(g + std::max(c0, c1), g + n, 0.f);
  const V vs(scale), one(1.f);
  int64_t c = c0;
  for (; c + W <= c1; c += W) {
    V pv = V::loadu(s + c);
    (V::loadu(g + c) * vs * pv * (one - pv)).store(g + c);
  }
  if (c < c1) {
    const int64_t r = c1 - c;
    V pv = V::loadu(s + c, r);
    (V::loadu(g + c, r) * vs * pv * (one - pv)).store(g + c, r);
  }
}

inline void sigmoid_grad_row(double* s, double* g, int64_t n, int64_t c0, int64_t c1, double scale, double bias,
                             double slope, int64_t dpos) {
  sigmoid_row(s, n, c0, c1, scale, bias, slope, dpos);
  std::fill(g, g + c0, 0.0);
  std::fill(g + std::max(c0, c1), g + n, 0.0);
  for (int64_t c = c0; c < c1; ++c) g[c] = g[c] * scale * s[c] * (1.0 - s[c]);
}

// In the transposed orientation (backward, decode) row c is key j = j0 + c and the columns are
// queries i0 + col; ALiBi's distance |i + shift - j| = |col - (j - shift - i0)|, so the row map
// is called with dpos = j - shift - i0.

// ------------------------------------------------------------------ forward
// A task covers `group` consecutive query blocks of one head: each K^T / V tile is loaded once
// and used by all of them while it is in L1/L2 (at L 8192 a head's K and V, 4 MB in fp32, no
// longer fit in L2, and one pass over them per 128-row block is an L3 stream per block).
template <typename T, typename out_t>
void forward_kernel(const Problem& p, const View<T>& q, const Packed<T>& kt, const View<T>& v, out_t* out) {
  const int64_t D = p.head_dim, G = p.heads_q / p.heads_kv;
  const int64_t BQ = kFwdBQ, BK = kt.T_;
  const int64_t nqb = (p.max_len_q + BQ - 1) / BQ;
  // blocks per task: up to kFwdMaxGroup, while there are at least 4 tasks per thread
  const int64_t group =
      std::clamp<int64_t>(p.batch * p.heads_q * nqb / (4 * at::get_num_threads()), 1, kFwdMaxGroup);
  const int64_t ngroups = (nqb + group - 1) / group;
  const int64_t tasks = p.batch * p.heads_q * ngroups;
  cpu::parallel_task_workers(tasks, [&](cpu::TaskCursor& next) {
    std::vector<T> s_buf(BQ * BK), acc(group * BQ * D);
    for (int64_t t = next.next(); t >= 0; t = next.next()) {
      const int64_t qg = t % ngroups, h = (t / ngroups) % p.heads_q, b = t / (ngroups * p.heads_q);
      const Seq s = seq_of(p, b);
      const int64_t g0 = qg * group * BQ;  // first query row of the task
      if (g0 >= s.len_q) continue;
      const int64_t rows = std::min(group * BQ, s.len_q - g0), hk = h / G;
      const T bias = static_cast<T>(bias_of(p, s, h)), slope = slope_of(p, b, h), scale = static_cast<T>(p.scale);
      const int64_t lo = key_lo(p, s, g0), hi = key_hi(p, s, g0 + rows - 1);
      std::fill(acc.begin(), acc.begin() + rows * D, T(0));
      for (int64_t kb = lo / BK; kb * BK < hi; ++kb) {
        const int64_t j0 = kb * BK;
        for (int64_t i0 = g0; i0 < g0 + rows; i0 += BQ) {
          const int64_t m = std::min(BQ, g0 + rows - i0);
          // keys of this block: [key_lo(i0), key_hi(i0 + m - 1)); skip the tile if it is outside
          const int64_t blo = key_lo(p, s, i0), bhi = key_hi(p, s, i0 + m - 1);
          if (j0 >= bhi || j0 + BK <= blo) continue;
          const int64_t n = std::min(BK, bhi - j0);
          gemm(m, n, D, q.rs, BK, BK, false, q.row(b, h, s.q_row0 + i0), kt.tile(hk, b, kb), s_buf.data());
          if (n == BK && slope == T(0) && key_lo(p, s, i0 + m - 1) <= j0 && key_hi(p, s, i0) >= j0 + n) {
            // no mask and no ALiBi in this tile: one pass over the contiguous block
            sigmoid_row(s_buf.data(), m * BK, 0, m * BK, scale, bias, slope, 0);
          } else {
            for (int64_t r = 0; r < m; ++r) {
              const int64_t i = i0 + r;
              const int64_t c0 = std::clamp<int64_t>(key_lo(p, s, i) - j0, 0, n);
              const int64_t c1 = std::clamp<int64_t>(key_hi(p, s, i) - j0, 0, n);
              sigmoid_row(s_buf.data() + r * BK, n, c0, c1, scale, bias, slope, i + s.shift - j0);
            }
          }
          gemm(m, D, n, BK, v.rs, D, true, s_buf.data(), v.row(b, hk, s.k_row0 + j0), acc.data() + (i0 - g0) * D);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = g0 + r;
        out_t* o = p.varlen ? out + ((s.q_row0 + i) * p.heads_q + h) * D : out + ((b * p.heads_q + h) * p.max_len_q + i) * D;
        const T* a = acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<out_t>(a[d]);
      }
    }
    gemm_release(static_cast<T*>(nullptr));
  });
}

// ------------------------------------------------------------------ decode
// Few query rows (decoding with a KV cache): nothing but q is packed, and K/V are read once per
// kv head. Per task (batch, kv head, chunk of keys), with the R = G * len_q query rows of the
// head group stacked:
//   S^T = K_chunk Q^T (n x R, K read in place),  S = (S^T)^T,  P = sigmoid(...) row by row,
//   out_part = P V_chunk.
// Sigmoid attention has no normaliser, so the chunks' partial outputs simply add up.
constexpr int64_t kDecodeMaxRows = 16;       // query rows per sequence
constexpr int64_t kDecodeMaxGroupRows = 64;  // query rows per kv head (G * rows)
constexpr int64_t kDecodeChunk = 512;

inline bool use_decode(const Problem& p) {
  return p.max_len_q <= kDecodeMaxRows && (p.heads_q / p.heads_kv) * p.max_len_q <= kDecodeMaxGroupRows;
}

template <typename src_t, typename T>
const T* rows_as(const src_t* src, int64_t rs, int64_t n, int64_t D, std::vector<T>& buf) {
  if constexpr (std::is_same_v<src_t, T>) {
    return src;
  } else {
    for (int64_t r = 0; r < n; ++r)
      for (int64_t d = 0; d < D; ++d) buf[r * D + d] = static_cast<T>(src[r * rs + d]);
    return buf.data();
  }
}

template <typename src_t, typename T>
void decode_kernel(const Problem& p, const View<src_t>& q, const View<src_t>& k, const View<src_t>& v, src_t* out) {
  const int64_t D = p.head_dim, G = p.heads_q / p.heads_kv, CH = kDecodeChunk;
  const int64_t RM = G * p.max_len_q;  // stacked rows per kv head (upper bound)
  const int64_t nch = std::max<int64_t>(1, (p.max_len_k + CH - 1) / CH);
  const int64_t part_stride = p.batch * p.heads_kv * RM * D;  // one chunk's partial outputs
  std::vector<T> part(static_cast<size_t>(nch * part_stride), T(0));
  cpu::parallel_task_workers(p.batch * p.heads_kv * nch, [&](cpu::TaskCursor& next) {
    std::vector<T> qt(D * RM), st(CH * RM), sm(RM * CH), kbuf, vbuf;
    if constexpr (!std::is_same_v<src_t, T>) {
      kbuf.resize(CH * D);
      vbuf.resize(CH * D);
    }
    for (int64_t t = next.next(); t >= 0; t = next.next()) {
      const int64_t ch = t % nch, hk = (t / nch) % p.heads_kv, b = t / (nch * p.heads_kv);
      const Seq s = seq_of(p, b);
      const int64_t m = s.len_q, R = G * m;
      if (m == 0) continue;
      const int64_t j0 = std::max(ch * CH, key_lo(p, s, 0)), j1 = std::min((ch + 1) * CH, key_hi(p, s, m - 1));
      if (j0 >= j1) continue;
      const int64_t n = j1 - j0;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < m; ++i) {
          const src_t* qr = q.row(b, hk * G + g, s.q_row0 + i);
          for (int64_t d = 0; d < D; ++d) qt[d * R + g * m + i] = static_cast<T>(qr[d]);
        }
      const T* kp = rows_as<src_t, T>(k.row(b, hk, s.k_row0 + j0), k.rs, n, D, kbuf);
      gemm(n, R, D, std::is_same_v<src_t, T> ? k.rs : D, R, R, false, kp, qt.data(), st.data());
      for (int64_t c = 0; c < n; ++c)
        for (int64_t r = 0; r < R; ++r) sm[r * CH + c] = st[c * R + r];
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        const T bias = static_cast<T>(bias_of(p, s, h)), slope = slope_of(p, b, h), scale = static_cast<T>(p.scale);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t c0 = std::clamp<int64_t>(key_lo(p, s, i) - j0, 0, n);
          const int64_t c1 = std::clamp<int64_t>(key_hi(p, s, i) - j0, 0, n);
          sigmoid_row(sm.data() + (g * m + i) * CH, n, c0, c1, scale, bias, slope, i + s.shift - j0);
        }
      }
      const T* vp = rows_as<src_t, T>(v.row(b, hk, s.k_row0 + j0), v.rs, n, D, vbuf);
      gemm(R, D, n, CH, std::is_same_v<src_t, T> ? v.rs : D, D, false, sm.data(), vp,
           part.data() + ch * part_stride + (b * p.heads_kv + hk) * RM * D);
    }
    gemm_release(static_cast<T*>(nullptr));
  });
  for (int64_t b = 0; b < p.batch; ++b) {
    const Seq s = seq_of(p, b);
    for (int64_t h = 0; h < p.heads_q; ++h)
      for (int64_t i = 0; i < s.len_q; ++i) {
        src_t* o = p.varlen ? out + ((s.q_row0 + i) * p.heads_q + h) * D : out + ((b * p.heads_q + h) * p.max_len_q + i) * D;
        const T* src = part.data() + ((b * p.heads_kv + h / G) * RM + (h % G) * s.len_q + i) * D;
        for (int64_t d = 0; d < D; ++d) {
          T acc = 0;
          for (int64_t ch = 0; ch < nch; ++ch) acc += src[ch * part_stride + d];
          o[d] = static_cast<src_t>(acc);
        }
      }
  }
}

// ------------------------------------------------------------------ backward
template <typename T>
struct BwdViews {
  View<T> q, k, v, dout;
};

template <typename T, typename grad_t>
void backward_kernel(const Problem& p, const BwdViews<T>& in, const Packed<T>& qt, const Packed<T>& dot,
                     const Packed<T>& kt, grad_t* dq, grad_t* dk, grad_t* dv) {
  const int64_t D = p.head_dim, G = p.heads_q / p.heads_kv;
  const int64_t BQ = qt.T_, BK = kt.T_;
  const int64_t nkb = std::max<int64_t>(1, (p.max_len_k + BK - 1) / BK);
  const int64_t base_tasks = p.batch * p.heads_kv;
  const int64_t nt = at::get_num_threads();
  // Few (batch, kv head) pairs: split each one's key blocks over several tasks (interleaved,
  // which balances causal masks); each split has its own dQ^T partial sum.
  int64_t nsplit = 1;
  if (base_tasks < 4 * nt) nsplit = std::clamp<int64_t>((4 * nt + base_tasks - 1) / base_tasks, 1, std::min<int64_t>(nkb, 64));
  // dQ^T partial sums in qt's tile layout: [split][Hq][tile][D][BQ]
  const int64_t head_elems = qt.tiles * D * BQ;
  std::vector<T> dqt(static_cast<size_t>(nsplit * p.heads_q * head_elems), T(0));

  cpu::parallel_task_workers(base_tasks * nsplit, [&](cpu::TaskCursor& next) {
    std::vector<T> st(BK * BQ), dpt(BK * BQ), dk_acc(BK * D), dv_acc(BK * D);
    for (int64_t t = next.next(); t >= 0; t = next.next()) {
      const int64_t split = t % nsplit, hk = (t / nsplit) % p.heads_kv, b = t / (nsplit * p.heads_kv);
      const Seq s = seq_of(p, b);
      for (int64_t kb = split; kb * BK < s.len_k; kb += nsplit) {
        const int64_t j0 = kb * BK, n = std::min(BK, s.len_k - j0);
        const int64_t qlo = query_lo(p, s, j0), qhi = query_hi(p, s, j0 + n - 1);
        std::fill(dk_acc.begin(), dk_acc.begin() + n * D, T(0));
        std::fill(dv_acc.begin(), dv_acc.begin() + n * D, T(0));
        const T* k_blk = in.k.row(b, hk, s.k_row0 + j0);
        const T* v_blk = in.v.row(b, hk, s.k_row0 + j0);
        const T* kt_blk = kt.tile(hk, b, kb);
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
          const T bias = static_cast<T>(bias_of(p, s, h)), slope = slope_of(p, b, h), scale = static_cast<T>(p.scale);
          T* dqt_head = dqt.data() + (split * p.heads_q + h) * head_elems;
          for (int64_t ib = qlo / BQ; ib * BQ < qhi; ++ib) {
            const int64_t i0 = ib * BQ, m = std::min(BQ, qhi - i0);
            gemm(n, m, D, in.k.rs, BQ, BQ, false, k_blk, qt.tile(h, b, ib), st.data());
            gemm(n, m, D, in.v.rs, BQ, BQ, false, v_blk, dot.tile(h, b, ib), dpt.data());
            for (int64_t c = 0; c < n; ++c) {
              const int64_t j = j0 + c;
              const int64_t r0 = std::clamp<int64_t>(query_lo(p, s, j) - i0, 0, m);
              const int64_t r1 = std::clamp<int64_t>(query_hi(p, s, j) - i0, 0, m);
              sigmoid_grad_row(st.data() + c * BQ, dpt.data() + c * BQ, m, r0, r1, scale, bias, slope,
                               j - s.shift - i0);
            }
            gemm(n, D, m, BQ, in.dout.rs, D, true, st.data(), in.dout.row(b, h, s.q_row0 + i0), dv_acc.data());
            gemm(n, D, m, BQ, in.q.rs, D, true, dpt.data(), in.q.row(b, h, s.q_row0 + i0), dk_acc.data());
            gemm(D, m, n, BK, BQ, BQ, true, kt_blk, dpt.data(), dqt_head + (qt.first[b] + ib) * D * BQ);
          }
        }
        for (int64_t c = 0; c < n; ++c) {
          const int64_t j = j0 + c;
          const int64_t off = p.varlen ? ((s.k_row0 + j) * p.heads_kv + hk) * D : ((b * p.heads_kv + hk) * p.max_len_k + j) * D;
          for (int64_t d = 0; d < D; ++d) {
            dk[off + d] = static_cast<grad_t>(dk_acc[c * D + d]);
            dv[off + d] = static_cast<grad_t>(dv_acc[c * D + d]);
          }
        }
      }
    }
    gemm_release(static_cast<T*>(nullptr));
  });

  // dq[row] = sum over splits of dQ^T[., row]
  cpu::parallel_tasks(p.batch * p.heads_q, [&](int64_t t, int64_t) {
    const int64_t h = t % p.heads_q, b = t / p.heads_q;
    const Seq s = seq_of(p, b);
    for (int64_t i = 0; i < s.len_q; ++i) {
      grad_t* o = p.varlen ? dq + ((s.q_row0 + i) * p.heads_q + h) * D : dq + ((b * p.heads_q + h) * p.max_len_q + i) * D;
      const int64_t off = (qt.first[b] + i / BQ) * D * BQ + i % BQ;
      for (int64_t d = 0; d < D; ++d) {
        T acc = 0;
        for (int64_t sp = 0; sp < nsplit; ++sp) acc += dqt[(sp * p.heads_q + h) * head_elems + off + d * BQ];
        o[d] = static_cast<grad_t>(acc);
      }
    }
  });
}

// ------------------------------------------------------------------ entry points
// Element strides of (batch, head, row) for a dense (B, H, L, D) or varlen (T, H, D) tensor.
std::array<int64_t, 3> bhr_strides(const Problem& p, const at::Tensor& t) {
  if (p.varlen) return {0, t.stride(1), t.stride(0)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
View<T> view_of(const Problem& p, const at::Tensor& t) {
  const auto st = bhr_strides(p, t);
  return View<T>{t.data_ptr<T>(), st[0], st[1], st[2]};
}

// Kernel element type for an input dtype: fp64 stays fp64, everything else computes in fp32.
template <typename scalar_t>
using kernel_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

at::Tensor fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
                   const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                   double scale, const c10::optional<at::Tensor>& bias, c10::optional<double> bias_value, bool causal,
                   int64_t window_left, int64_t window_right, const c10::optional<at::Tensor>& alibi_slopes) {
  std::vector<at::Tensor> keep;
  const Problem p = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale,
                                 bias, bias_value, causal, window_left, window_right, alibi_slopes, keep);
  // every row of a dense output is written; varlen rows outside all sequences stay 0
  const auto contig = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = p.varlen ? at::zeros(q.sizes(), contig) : at::empty(q.sizes(), contig);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "sigmoid_attention_fwd_cpu", [&] {
    using T = kernel_t<scalar_t>;
    if (use_decode(p)) {
      decode_kernel<scalar_t, T>(p, view_of<scalar_t>(p, q), view_of<scalar_t>(p, k), view_of<scalar_t>(p, v),
                                 out.data_ptr<scalar_t>());
      return;
    }
    const auto kopt = q.options().dtype(c10::CppTypeToScalarType<T>::value);
    const Packed<T> kt = pack_transposed<scalar_t, T>(p, k.data_ptr<scalar_t>(), bhr_strides(p, k), p.heads_kv, true,
                                                      kFwdBK, kopt);
    // low precision is widened once (O(L D)); the copies keep the inputs' strides
    at::Tensor qw = q, vw = v;
    if constexpr (!std::is_same_v<scalar_t, T>) {
      qw = q.to(at::kFloat);
      vw = v.to(at::kFloat);
    }
    forward_kernel<T, scalar_t>(p, view_of<T>(p, qw), kt, view_of<T>(p, vw),
                                out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    const c10::optional<at::Tensor>& bias, c10::optional<double> bias_value, bool causal, int64_t window_left,
    int64_t window_right, const c10::optional<at::Tensor>& alibi_slopes) {
  std::vector<at::Tensor> keep;
  const Problem p = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale,
                                 bias, bias_value, causal, window_left, window_right, alibi_slopes, keep);
  check_grad_out(grad_out, q);
  auto contig = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::zeros(q.sizes(), contig), dk = at::zeros(k.sizes(), contig), dv = at::zeros(v.sizes(), contig);
  if (q.numel() == 0 || k.numel() == 0) return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "sigmoid_attention_bwd_cpu", [&] {
    using T = kernel_t<scalar_t>;
    const auto kopt = q.options().dtype(c10::CppTypeToScalarType<T>::value);
    const Packed<T> qt = pack_transposed<scalar_t, T>(p, q.data_ptr<scalar_t>(), bhr_strides(p, q), p.heads_q, false,
                                                      kBwdBQ, kopt);
    const Packed<T> dot = pack_transposed<scalar_t, T>(p, grad_out.data_ptr<scalar_t>(), bhr_strides(p, grad_out),
                                                       p.heads_q, false, kBwdBQ, kopt);
    const Packed<T> kt = pack_transposed<scalar_t, T>(p, k.data_ptr<scalar_t>(), bhr_strides(p, k), p.heads_kv, true,
                                                      kBwdBK, kopt);
    at::Tensor qw = q, kw = k, vw = v, gw = grad_out;
    if constexpr (!std::is_same_v<scalar_t, T>) {
      qw = q.to(at::kFloat); kw = k.to(at::kFloat); vw = v.to(at::kFloat); gw = grad_out.to(at::kFloat);
    }
    BwdViews<T> views{view_of<T>(p, qw), view_of<T>(p, kw), view_of<T>(p, vw), view_of<T>(p, gw)};
    backward_kernel<T, scalar_t>(p, views, qt, dot, kt, dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace accel::sigmoid_attention

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("sigmoid_attention_fwd", &accel::sigmoid_attention::fwd_cpu);
  m.impl("sigmoid_attention_bwd", &accel::sigmoid_attention::bwd_cpu);
}
