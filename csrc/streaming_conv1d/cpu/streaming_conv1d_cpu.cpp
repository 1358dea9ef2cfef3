// CPU backend of accel::streaming_conv1d (see streaming_conv1d.h for the formula).
//
// The chunk is never concatenated to the state: every kernel reads u[ci, j] from the state row for
// j < L_s and from the chunk otherwise. Three paths:
//  * one-sample depthwise step (the hybrid models' decode): a task is a batch row and a block of
//    channels; eight rows at a time are loaded and transposed in registers (AVX2, K <= 4 at
//    dilation 1; weights rearranged once per call), then moved by one sample; the state is read
//    and written once, the activation applied in a second pass over the block.
//  * direct (few channels per group, other chunks): per block of groups, the outputs (scalar taps
//    for short chunks; for long ones vector FMAs along time over each tap's samples, read in place),
//    then the block's state rows, one contiguous run of memory, advanced by one memmove and the new
//    samples into each row's tail.
//  * GEMM (>= 4 input and output channels per group, fp32/bf16/fp16): im2col tiles built from the
//    two sources, multiplied with oneDNN's brgemm (as the dilated convolution's GEMM path); the
//    state is advanced in a second parallel pass, after every tile that reads it.
// Calls with little work run on one thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

#include "common/cpu_vec.h"
#include "common/parallel.h"
#include "streaming_conv1d/cpu/streaming_conv1d_cpu.h"
#include "streaming_conv1d/streaming_conv1d.h"

namespace accel::streaming_conv1d {
namespace {

using at::Tensor;
using namespace accel::cpu;

constexpr int64_t kBlockChannels = 256;  // input channels per direct-path task: a few KiB of state
constexpr int64_t kScalarChunk = 8;      // shorter chunks take the scalar taps, no staging
constexpr int64_t kTile = 128;           // outputs per tile along time (staging and GEMM)
constexpr int64_t kRows = 64;            // output channels per GEMM call

// The chunk x[b] as rows of a (C_in, h) matrix with unit time stride.
template <typename scalar_t>
struct Chunk {
  const scalar_t* base;
  int64_t sb, sc;
  const scalar_t* row(int64_t b, int64_t c) const { return base + b * sb + c * sc; }
};

// buf[0, n) = u[j0, j0 + n) of one channel as acc_t: the state row (length ls) then the chunk row.
template <typename scalar_t, typename acc_t>
inline void load_u(const scalar_t* srow, int64_t ls, const scalar_t* xrow, int64_t j0, int64_t n, acc_t* buf) {
  const int64_t from_state = std::clamp<int64_t>(ls - j0, 0, n);
  if (from_state > 0) convert_n(srow + j0, buf, from_state);
  if (n > from_state) convert_n(xrow + (j0 + from_state - ls), buf + from_state, n - from_state);
}

// Advances the state rows [c0, c1) of one slot by h samples: one memmove over the contiguous rows,
// then each row's last min(h, L_s) samples from the chunk.
template <typename scalar_t>
void advance_state(scalar_t* slot_state, const Chunk<scalar_t>& x, int64_t b, int64_t c0, int64_t c1, int64_t ls,
                   int64_t h) {
  if (ls == 0 || h == 0) return;
  scalar_t* base = slot_state + c0 * ls;
  const int64_t rows = c1 - c0;
  if (h < ls) {
    std::memmove(base, base + h, static_cast<size_t>(rows * ls - h) * sizeof(scalar_t));
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* xrow = x.row(b, c0 + r);
      for (int64_t j = 0; j < h; ++j) base[r * ls + ls - h + j] = xrow[j];
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(base + r * ls, x.row(b, c0 + r) + h - ls, ls * sizeof(scalar_t));
  }
}

template <typename scalar_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g;
  Chunk<scalar_t> x;
  scalar_t* state;
  const acc_t* w;     // (C_out, C_in/groups, K), opmath type; null for the one-sample depthwise step
  const acc_t* wt;    // that step's weights, see tap_weight; null otherwise
  const acc_t* bias;  // (C_out,) or null
  const int32_t* slots;
  scalar_t* out;      // (B, C_out, h) contiguous

  int64_t slot(int64_t b) const { return slots ? slots[b] : b; }
  scalar_t* slot_state(int64_t s) const { return state + s * g.c_in * g.state_len; }
  scalar_t* out_row(int64_t b, int64_t co) const { return out + (b * g.c_out + co) * g.chunk; }
};

// A direct-path worker's buffers, sized once and reused across its tasks.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> stage, acc;
  std::vector<const acc_t*> tap;
};

// Direct path, one group of one live row: outputs of the group's channels for every t.
template <typename scalar_t>
void direct_group(const Problem<scalar_t>& p, int64_t b, int64_t s, int64_t grp, Scratch<at::opmath_type<scalar_t>>& sc) {
  using acc_t = at::opmath_type<scalar_t>;
  auto& stage = sc.stage;
  auto& acc = sc.acc;
  auto& tap = sc.tap;
  const Geometry& g = p.g;
  const int64_t cig = g.c_in_per_group, K = g.kernel, d = g.dilation, ls = g.state_len, h = g.chunk;
  const scalar_t* srows = p.slot_state(s) + grp * cig * ls;
  if (h < kScalarChunk) {
    for (int64_t o = 0; o < g.c_out_per_group; ++o) {
      const int64_t co = grp * g.c_out_per_group + o;
      const acc_t* w = p.w + co * cig * K;
      scalar_t* y = p.out_row(b, co);
      for (int64_t t = 0; t < h; ++t) {
        acc_t z = p.bias ? p.bias[co] : acc_t(0);
        for (int64_t ci = 0; ci < cig; ++ci) {
          const scalar_t* srow = srows + ci * ls;
          const scalar_t* xrow = p.x.row(b, grp * cig + ci);
          for (int64_t k = 0; k < K; ++k) {
            const int64_t j = ls + t - (K - 1 - k) * d;
            z += w[ci * K + k] * static_cast<acc_t>(j < ls ? srow[j] : xrow[j - ls]);
          }
        }
        y[t] = static_cast<scalar_t>(activation_forward(z, g.act));
      }
    }
    return;
  }
  // Long chunks: per time tile, each tap (ci, k) reads the n samples u[ci, L_s - span + t0 + k*d, + n):
  // in place when they lie in one source of the accumulation type, else converted or joined into
  // a staging row (only the taps' samples, not the whole dilated window); then each tap is vector
  // FMAs along time.
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  stage.resize(cig * K * kTile);
  acc.resize(kTile);
  tap.resize(cig * K);
  for (int64_t t0 = 0; t0 < h; t0 += kTile) {
    const int64_t n = std::min(kTile, h - t0);
    for (int64_t ci = 0; ci < cig; ++ci) {
      const scalar_t* srow = srows + ci * ls;
      const scalar_t* xrow = p.x.row(b, grp * cig + ci);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t j0 = ls - g.span + t0 + k * d;
        acc_t* buf = stage.data() + (ci * K + k) * kTile;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (j0 + n <= ls) {
            tap[ci * K + k] = srow + j0;
            continue;
          }
          if (j0 >= ls) {
            tap[ci * K + k] = xrow + (j0 - ls);
            continue;
          }
        }
        load_u(srow, ls, xrow, j0, n, buf);
        tap[ci * K + k] = buf;
      }
    }
    for (int64_t o = 0; o < g.c_out_per_group; ++o) {
      const int64_t co = grp * g.c_out_per_group + o;
      const acc_t* w = p.w + co * cig * K;
      std::fill_n(acc.data(), n, p.bias ? p.bias[co] : acc_t(0));
      for (int64_t i = 0; i < cig * K; ++i) {
        const acc_t* src = tap[i];
        const Vec wv(w[i]);
        int64_t t = 0;
        for (; t + V <= n; t += V) at::vec::fmadd(wv, Vec::loadu(src + t), Vec::loadu(acc.data() + t)).store(acc.data() + t);
        for (; t < n; ++t) acc[t] += w[i] * src[t];
      }
      apply_epilogue<acc_t>(acc.data(), nullptr, n, g.act);
      convert_n(acc.data(), p.out_row(b, co) + t0, n);
    }
  }
}

// The one-sample depthwise step reads the weights as wt[(c / 8) * 8K + k * 8 + c % 8] (eight
// channels' tap k side by side, in the accumulation type, built once per call) so that a tap of eight channels is one
// vector load.
// (acc_t: fp64 stays fp64.)
template <typename acc_t>
inline acc_t tap_weight(const acc_t* wt, int64_t K, int64_t c, int64_t k) { return wt[(c >> 3) * 8 * K + k * 8 + (c & 7)]; }

#if defined(__AVX2__) && defined(__F16C__)
// (Always inlined: the transposed columns must stay in registers.)
// Samples [0, 4) of a state row as fp32.
template <typename scalar_t>
C10_ALWAYS_INLINE __m128 load4(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m128i v = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm_castsi128_ps(_mm_slli_epi32(v, 16));
  } else {
    return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
}

// Eight contiguous samples as fp32.
template <typename scalar_t>
C10_ALWAYS_INLINE __m256 load8(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// Stores eight samples read from the state or the chunk (exact in scalar_t: bf16 truncates).
template <typename scalar_t>
C10_ALWAYS_INLINE void store8_exact(scalar_t* p, __m256 v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_storeu_ps(p, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

// Stores eight outputs rounded to nearest even (NaN stays NaN), as c10's conversions round.
template <typename scalar_t>
C10_ALWAYS_INLINE void store8_rounded(scalar_t* p, __m256 v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan);
    store8_exact(p, _mm256_castsi256_ps(r));
  } else {
    store8_exact(p, v);  // fp32 as is; _mm256_cvtps_ph rounds to nearest even
  }
}

// Four samples from each of eight rows `stride` apart, transposed: col[j] holds sample j of the rows.
template <typename scalar_t>
C10_ALWAYS_INLINE void load_cols8(const scalar_t* r, int64_t stride, __m256 col[4]) {
  const __m256 a0 = _mm256_insertf128_ps(_mm256_castps128_ps256(load4(r)), load4(r + 4 * stride), 1);
  const __m256 a1 = _mm256_insertf128_ps(_mm256_castps128_ps256(load4(r + stride)), load4(r + 5 * stride), 1);
  const __m256 a2 = _mm256_insertf128_ps(_mm256_castps128_ps256(load4(r + 2 * stride)), load4(r + 6 * stride), 1);
  const __m256 a3 = _mm256_insertf128_ps(_mm256_castps128_ps256(load4(r + 3 * stride)), load4(r + 7 * stride), 1);
  const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
  const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
  col[0] = _mm256_shuffle_ps(t0, t2, 0x44);
  col[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
  col[2] = _mm256_shuffle_ps(t1, t3, 0x44);
  col[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
}

// act(bias + taps) of eight channels from their transposed samples s[kFirst, kFirst + kK - 1) and
// the new sample xv (the scalar tail's order of sums), stored rounded to y[0, 8).
template <int kK, int kFirst, Activation kAct, typename scalar_t>
C10_ALWAYS_INLINE void outputs8(const __m256* s, __m256 xv, const float* wt, const float* bias, scalar_t* y, float* z) {
  __m256 acc = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt + (kK - 1) * 8), xv, acc);
  for (int k = 0; k + 1 < kK; ++k) acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt + k * 8), s[kFirst + k], acc);
  if constexpr (kAct == Activation::None) {
    store8_rounded(y, acc);
  } else {
    _mm256_storeu_ps(z, acc);
  }
}

// Eight rows of a three-sample state (K = 4 at dilation 1, the hybrid models' shape): the rows are 24
// contiguous samples, read as three vectors and de-interleaved with blends and one permute per
// column. Reads and writes exactly the eight rows.
template <int kK, Activation kAct, typename scalar_t>
C10_ALWAYS_INLINE void step8_ls3(scalar_t* r, __m256 xv, const scalar_t* x, int64_t sc, const float* wt, const float* bias,
                                 scalar_t* y, float* z) {
  const __m256 a = load8(r), b = load8(r + 8), c = load8(r + 16);
  const __m256i by3 = _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5);
  __m256 s[3];
  s[0] = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(a, b, 0x92), c, 0x24), by3);
  s[1] = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(a, b, 0x24), c, 0x49),
                                  _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6));
  s[2] = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(a, b, 0x49), c, 0x92),
                                  _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
  outputs8<kK, 3 - (kK - 1), kAct>(s, xv, wt, bias, y, z);
  // The rows move by one sample (all loads before the stores; the last sample moved is the rows'
  // own last), then the eight new samples go in place: fewer shuffles than interleaving the
  // columns back, and no narrowing for 16-bit samples.
  if constexpr (sizeof(scalar_t) == 4) {
    const __m256 h0 = _mm256_loadu_ps(reinterpret_cast<const float*>(r + 1));
    const __m256 h1 = _mm256_loadu_ps(reinterpret_cast<const float*>(r + 9));
    const __m256 t = _mm256_loadu_ps(reinterpret_cast<const float*>(r + 16));
    _mm256_storeu_ps(reinterpret_cast<float*>(r), h0);
    _mm256_storeu_ps(reinterpret_cast<float*>(r + 8), h1);
    _mm256_storeu_ps(reinterpret_cast<float*>(r + 16), _mm256_permutevar8x32_ps(t, _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 7)));
  } else {
    const __m256i head = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 1));
    const __m128i tail = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r), head);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(r + 16), _mm_srli_si128(tail, 2));
  }
  for (int i = 0; i < 8; ++i) r[3 * i + 2] = x[i * sc];
}

// Eight rows of any other state of ls <= 4 samples whose taps start at sample kFirst: four samples
// loaded from each row start and transposed; then the rows (8 * ls contiguous samples) move by one
// sample: ls vector moves, each load one sample ahead of its store (the last reads one sample past
// the rows, which the caller provides), and the new samples go to the rows' last places.
template <int kK, int kFirst, Activation kAct, typename scalar_t>
C10_ALWAYS_INLINE void step8(scalar_t* r, int64_t ls, const float* wt, const float* bias, __m256 xv,
                             const scalar_t* x, int64_t sc, scalar_t* y, float* z) {
  __m256 s[4];
  load_cols8(r, ls, s);
  outputs8<kK, kFirst, kAct>(s, xv, wt, bias, y, z);
  for (int64_t j = 0; j < 8 * ls; j += 8) {  // eight samples per move: ls moves
    if constexpr (sizeof(scalar_t) == 4) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + j + 1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + j), v);
    } else {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j + 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(r + j), v);
    }
  }
  for (int64_t i = 0; i < 8; ++i) r[i * ls + ls - 1] = x[i * sc];
}

// Groups [0, m) of eight rows through step8_ls3 (kThree) or step8, m <= kBlockChannels. An
// activation runs as a second pass over the block's sums: its long dependency chain (exp, divide)
// per vector then overlaps across vectors, which it does not inside the row moves' loop.
template <int kK, int kFirst, bool kThree, Activation kAct, typename scalar_t>
int64_t rows8(int64_t ls, scalar_t* rows, const float* wt, const float* bias, const scalar_t* x, int64_t sc, int64_t m,
              scalar_t* y) {
  alignas(32) float xs[8];
  alignas(32) float z[kBlockChannels];
  for (int64_t i = 0; i < m; i += 8) {
    __m256 xv;
    if (sc == 1) {
      xv = load8(x + i);
    } else {
      for (int j = 0; j < 8; ++j) xs[j] = static_cast<float>(x[(i + j) * sc]);
      xv = _mm256_load_ps(xs);
    }
    const float* wg = wt + i * kK;
    const float* bg = bias ? bias + i : nullptr;
    if constexpr (kThree) {
      step8_ls3<kK, kAct>(rows + i * 3, xv, x + i * sc, sc, wg, bg, y + i, z + i);
    } else {
      step8<kK, kFirst, kAct>(rows + i * ls, ls, wg, bg, xv, x + i * sc, sc, y + i, z + i);
    }
  }
  if constexpr (kAct != Activation::None) {
    for (int64_t i = 0; i < m; i += 8) store8_rounded(y + i, activation_vec<kAct>(Vectorized<float>::loadu(z + i)));
  }
  return m;
}

// The vectorised one-sample step over rows [0, n) of a block (dilation 1, K <= 4, ls <= 4): outputs
// y[0, m) and the rows' advance for the m rows it serves, eight at a time; returns m (0 when
// (K, ls) is not a served shape). A three-sample state serves every full group of eight; other
// states load four samples from each row start and read one past the rows when moving them, so
// their groups stop where those loads would leave the block (other tasks move the neighbouring
// blocks meanwhile): (m-1)*ls + 4 <= n*ls and m < n.
template <typename scalar_t>
int64_t step8_rows(int64_t K, int64_t ls, scalar_t* rows, const float* wt, const float* bias, Activation act,
                   const scalar_t* x, int64_t sc, int64_t n, scalar_t* y) {
  const int64_t first = ls - (K - 1);
  const int64_t m = ls == 3 ? n / 8 * 8 : std::max<int64_t>(0, std::min(n - 1, n - (4 + ls - 1) / ls + 1)) / 8 * 8;
  auto run = [&](auto kk, auto kf, auto three) {
    return with_activation(act, [&](auto ka) {
      return rows8<decltype(kk)::value, decltype(kf)::value, decltype(three)::value, decltype(ka)::value>(
          ls, rows, wt, bias, x, sc, m, y);
    });
  };
  using std::integral_constant;
  using std::false_type;
  using std::true_type;
  if (ls == 3) {
    switch (K) {
      case 2: return run(integral_constant<int, 2>{}, integral_constant<int, 2>{}, true_type{});
      case 3: return run(integral_constant<int, 3>{}, integral_constant<int, 1>{}, true_type{});
      case 4: return run(integral_constant<int, 4>{}, integral_constant<int, 0>{}, true_type{});
      default: return 0;
    }
  }
  switch (K * 8 + first) {
    case 2 * 8 + 0: return run(integral_constant<int, 2>{}, integral_constant<int, 0>{}, false_type{});
    case 2 * 8 + 1: return run(integral_constant<int, 2>{}, integral_constant<int, 1>{}, false_type{});
    case 2 * 8 + 3: return run(integral_constant<int, 2>{}, integral_constant<int, 3>{}, false_type{});
    case 3 * 8 + 0: return run(integral_constant<int, 3>{}, integral_constant<int, 0>{}, false_type{});
    case 3 * 8 + 2: return run(integral_constant<int, 3>{}, integral_constant<int, 2>{}, false_type{});
    case 4 * 8 + 1: return run(integral_constant<int, 4>{}, integral_constant<int, 1>{}, false_type{});
    default: return 0;
  }
}
#endif

// One-sample step of depthwise rows [c0, c1) of one live row (the hybrid models' decode): outputs
// y[b, c0, c1) and each state row advanced by one sample. Rows of the hybrid models' shapes go
// through the eight-row kernels above; the rest take the taps as passes over the channels
// (independent sums, no chain of dependent FMAs per row), the activation vectorised over the
// outputs, and one move of their rows. The block starts at a multiple of eight channels.
template <typename scalar_t>
void depthwise_step(const Problem<scalar_t>& p, int64_t b, int64_t s, int64_t c0, int64_t c1,
                    std::vector<at::opmath_type<scalar_t>>& acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = p.g.kernel, d = p.g.dilation, ls = p.g.state_len, first = ls - p.g.span;
  const int64_t n = c1 - c0;
  const scalar_t* __restrict__ x = p.x.row(b, c0);
  const int64_t sc = p.x.sc;
  scalar_t* __restrict__ rows = p.slot_state(s) + c0 * ls;
  scalar_t* y = p.out_row(b, c0);  // (b, c, 0) for consecutive c
  const acc_t* wt = p.wt + c0 * K;
  const acc_t* bias = p.bias ? p.bias + c0 : nullptr;
  int64_t done = 0;
#if defined(__AVX2__) && defined(__F16C__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (d == 1 && ls >= 1 && ls <= 4) done = step8_rows(K, ls, rows, wt, bias, p.g.act, x, sc, n, y);
  }
#endif
  if (done == n) return;
  acc.resize(n - done);
  acc_t* __restrict__ z = acc.data();
  for (int64_t i = done; i < n; ++i) {
    z[i - done] = (bias ? bias[i] : acc_t(0)) + tap_weight(wt, K, i, K - 1) * static_cast<acc_t>(x[i * sc]);
  }
  for (int64_t k = 0; k + 1 < K; ++k) {
    const scalar_t* __restrict__ tap = rows + first + k * d;
    for (int64_t i = done; i < n; ++i) z[i - done] += tap_weight(wt, K, i, k) * static_cast<acc_t>(tap[i * ls]);
  }
  apply_epilogue<acc_t>(z, nullptr, n - done, p.g.act);
  convert_n(z, y + done, n - done);
  if (ls > 0) {
    std::memmove(rows + done * ls, rows + done * ls + 1, static_cast<size_t>((n - done) * ls - 1) * sizeof(scalar_t));
    for (int64_t i = done; i < n; ++i) rows[i * ls + ls - 1] = x[i * sc];
  }
}

// Waking the other threads costs more than a small call (a TCN layer at one sample) takes.
inline bool small_call(const Geometry& g) {
  const int64_t work = g.batch * (g.c_in * (g.state_len + g.chunk) + g.c_out * g.chunk * g.c_in_per_group * g.kernel);
  return work < kMinParallelWork;
}

template <typename scalar_t>
void run_direct(const Problem<scalar_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = p.g;
  const bool serial = small_call(g);
  int64_t groups_per_block = std::max<int64_t>(1, kBlockChannels / std::max<int64_t>(1, g.c_in_per_group));
  if (!serial) {
    // Enough blocks for every thread (a long chunk of one stream with few channels is otherwise one
    // task); blocks stay a multiple of eight groups, which the one-sample step's rows need.
    const int64_t want = kTasksPerThread * at::get_num_threads();
    const int64_t per_row = (want + g.batch - 1) / g.batch;
    const int64_t fitted = (g.groups + per_row - 1) / per_row;
    groups_per_block = std::min(groups_per_block, std::max<int64_t>(8, (fitted + 7) / 8 * 8));
  }
  const int64_t blocks = (g.groups + groups_per_block - 1) / groups_per_block;
  const int64_t tasks = serial ? 1 : g.batch * blocks;
  parallel_task_workers(tasks, [&](TaskCursor& cursor) {
    TaskCursor serial(g.batch * blocks);
    TaskCursor& next = tasks == 1 ? serial : cursor;
    Scratch<acc_t> scratch;
    for (int64_t task = next.next(); task >= 0; task = next.next()) {
      const int64_t b = task / blocks, g0 = (task % blocks) * groups_per_block;
      const int64_t g1 = std::min(g.groups, g0 + groups_per_block);
      const int64_t s = p.slot(b);
      if (s < 0) {
        std::fill_n(p.out_row(b, g0 * g.c_out_per_group), (g1 - g0) * g.c_out_per_group * g.chunk, scalar_t(0));
        continue;
      }
      if (g.c_in_per_group == 1 && g.c_out_per_group == 1 && g.chunk == 1) {
        depthwise_step(p, b, s, g0, g1, scratch.acc);
        continue;
      }
      for (int64_t grp = g0; grp < g1; ++grp) direct_group(p, b, s, grp, scratch);
      advance_state(p.slot_state(s), p.x, b, g0 * g.c_in_per_group, g1 * g.c_in_per_group, g.state_len, g.chunk);
    }
  });
}

// GEMM path: col[(ci*K + k) * kTile + t] = u[ci, L_s - span + t0 + t + k*d], fp32.
template <typename scalar_t>
void build_col(const Problem<scalar_t>& p, int64_t b, int64_t s, int64_t grp, int64_t t0, int64_t n, float* col) {
  const Geometry& g = p.g;
  const int64_t cig = g.c_in_per_group, ls = g.state_len;
  const scalar_t* srows = p.slot_state(s) + grp * cig * ls;
  for (int64_t ci = 0; ci < cig; ++ci) {
    const scalar_t* xrow = p.x.row(b, grp * cig + ci);
    for (int64_t k = 0; k < g.kernel; ++k) {
      load_u(srows + ci * ls, ls, xrow, ls - g.span + t0 + k * g.dilation, n, col + (ci * g.kernel + k) * kTile);
    }
  }
}

template <typename scalar_t>
void run_gemm(const Problem<scalar_t>& p) {
  static_assert(std::is_same_v<at::opmath_type<scalar_t>, float>);
  const Geometry& g = p.g;
  const int64_t CK = g.c_in_per_group * g.kernel;
  const int64_t n_tiles = (g.chunk + kTile - 1) / kTile;
  const bool serial = small_call(g);
  parallel_task_workers(serial ? 1 : g.batch * g.groups * n_tiles, [&](TaskCursor& cursor) {
    TaskCursor one_thread(g.batch * g.groups * n_tiles);
    TaskCursor& next = serial ? one_thread : cursor;
    std::vector<float> col(CK * kTile), acc(kRows * kTile);
    for (int64_t task = next.next(); task >= 0; task = next.next()) {
      const int64_t tile = task % n_tiles, grp = (task / n_tiles) % g.groups, b = task / (n_tiles * g.groups);
      const int64_t t0 = tile * kTile, n = std::min(kTile, g.chunk - t0), s = p.slot(b);
      if (s < 0) {
        for (int64_t co = grp * g.c_out_per_group; co < (grp + 1) * g.c_out_per_group; ++co) {
          std::fill_n(p.out_row(b, co) + t0, n, scalar_t(0));
        }
        continue;
      }
      build_col(p, b, s, grp, t0, n, col.data());
      for (int64_t r0 = 0; r0 < g.c_out_per_group; r0 += kRows) {
        const int64_t m = std::min(kRows, g.c_out_per_group - r0), co0 = grp * g.c_out_per_group + r0;
        for (int64_t r = 0; r < m; ++r) std::fill_n(acc.data() + r * kTile, n, p.bias ? p.bias[co0 + r] : 0.f);
        at::native::cpublas::brgemm(m, n, CK, CK, kTile, kTile, /*add_C=*/true, p.w + co0 * CK, col.data(),
                                    acc.data(), /*is_vnni=*/false);
        for (int64_t r = 0; r < m; ++r) {
          apply_epilogue<float>(acc.data() + r * kTile, nullptr, n, g.act);
          convert_n(acc.data() + r * kTile, p.out_row(b, co0 + r) + t0, n);
        }
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
  // Every tile has read the old state; now advance it.
  const int64_t blocks = (g.c_in + kBlockChannels - 1) / kBlockChannels;
  at::parallel_for(0, g.batch * blocks, serial ? g.batch * blocks : 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * kBlockChannels, s = p.slot(b);
      if (s >= 0) advance_state(p.slot_state(s), p.x, b, c0, std::min(g.c_in, c0 + kBlockChannels), g.state_len, g.chunk);
    }
  });
}

// The one-sample depthwise step's weights (see tap_weight) from a contiguous (C, 1, K) weight; the
// channels past C in the last group of eight are zero.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> transposed_taps(const Tensor& weight, int64_t C, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* src = weight.const_data_ptr<scalar_t>();
  std::vector<acc_t> wt(static_cast<size_t>((C + 7) / 8 * 8 * K), acc_t(0));
  int64_t c = 0;
#if defined(__AVX2__) && defined(__F16C__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (K == 4) {  // eight rows of four taps: one transpose per group
      __m256 cols[4];
      for (; c + 8 <= C; c += 8) {
        load_cols8(src + c * 4, 4, cols);
        for (int k = 0; k < 4; ++k) _mm256_storeu_ps(wt.data() + c * 4 + k * 8, cols[k]);
      }
    }
  }
#endif
  for (; c < C; ++c) {
    for (int64_t k = 0; k < K; ++k) wt[(c >> 3) * 8 * K + k * 8 + (c & 7)] = static_cast<acc_t>(src[c * K + k]);
  }
  return wt;
}

bool gemm_path_applies(const Geometry& g, at::ScalarType dtype) {
  const bool dtype_ok = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  return dtype_ok && g.c_in_per_group >= 4 && g.c_out_per_group >= 4;
}

Tensor streaming_conv1d_cpu(const Tensor& x_, const Tensor& state, const Tensor& weight_,
                            const c10::optional<Tensor>& bias_, int64_t dilation, int64_t groups,
                            c10::string_view activation, const c10::optional<Tensor>& state_indices) {
  const Geometry g = check(x_, state, weight_, bias_, dilation, groups, std::string(activation), state_indices);
  Tensor out = at::empty({g.batch, g.c_out, g.chunk}, x_.options());
  if (out.numel() == 0 && (g.chunk == 0 || g.batch == 0)) return out;
  // The kernels read chunk rows with unit time stride (a decode step's (B, C, 1) view qualifies as is).
  const Tensor x = g.chunk > 1 && x_.stride(2) != 1 ? x_.contiguous() : x_;
  const bool has_bias = bias_.has_value() && bias_->defined();
  const bool indexed = state_indices.has_value() && state_indices->defined();
  const bool one_sample_depthwise = g.c_in_per_group == 1 && g.c_out_per_group == 1 && g.chunk == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "streaming_conv1d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    // The one-sample step converts its few parameters into vectors (no tensor allocations: its
    // whole call is a few microseconds at small sizes).
    Tensor w, bias;
    std::vector<acc_t> wt, bias_acc;
    if (one_sample_depthwise) {
      wt = transposed_taps<scalar_t>(weight_.contiguous(), g.c_out, g.kernel);
      if (has_bias) {
        const Tensor bc = bias_->contiguous();
        bias_acc.resize(g.c_out);
        convert_n(bc.const_data_ptr<scalar_t>(), bias_acc.data(), g.c_out);
      }
    } else {
      w = weight_.to(acc_type).contiguous();
      if (has_bias) bias = bias_->to(acc_type).contiguous();
    }
    const Problem<scalar_t> p{g,
                              {x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1)},
                              state.mutable_data_ptr<scalar_t>(),
                              w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                              wt.empty() ? nullptr : wt.data(),
                              !has_bias ? nullptr : bias.defined() ? bias.const_data_ptr<acc_t>() : bias_acc.data(),
                              indexed ? state_indices->const_data_ptr<int32_t>() : nullptr,
                              out.mutable_data_ptr<scalar_t>()};
    if constexpr (std::is_same_v<acc_t, float>) {
      if (gemm_path_applies(g, x.scalar_type())) {
        run_gemm(p);
        return;
      }
    }
    run_direct(p);
  });
  return out;
}

}  // namespace
}  // namespace accel::streaming_conv1d

TORCH_LIBRARY_IMPL(accel, CPU, m) { m.impl("streaming_conv1d", &accel::streaming_conv1d::streaming_conv1d_cpu); }
