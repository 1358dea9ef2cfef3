// CPU backend of accel::streaming_conv1d (see streaming_conv1d.h for the formula).
//
// The chunk is never concatenated to the state: every kernel reads u[ci, j] from the state row for
// j < L_s and from the chunk otherwise. Three paths:
//  * one-sample depthwise step (the hybrid models' decode): a task is a batch row and a block of
//    channels; eight rows at a time are loaded and transposed in registers with their weights (AVX2,
//    K <= 4 at dilation 1), then moved by one sample; the state is read and written once.
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
#include "streaming_conv1d/streaming_conv1d.h"

namespace accel::streaming_conv1d {
namespace {

using at::Tensor;
using namespace accel::cpu;

constexpr int64_t kBlockChannels = 256;  // input channels per direct-path task: a few KiB of state
constexpr int64_t kScalarChunk = 8;      // shorter chunks take the scalar taps, no staging
constexpr int64_t kTile = 128;           // outputs per tile along time (staging and GEMM)
constexpr int64_t kRows = 64;            // output channels per GEMM call
constexpr int64_t kMinParallelWork = 1 << 15;  // multiply-adds and state samples of a call run in parallel from here

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
  const acc_t* w;     // (C_out, C_in/groups, K), opmath type
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

// One-sample depthwise step of eight rows at dilation 1 with kK <= 4 taps and a state of ls <= 4
// samples whose taps start at sample kFirst (the hybrid models' shapes): the rows' state and their
// weights (fp32, (C, kK)) are loaded four samples a row and transposed to vectors of eight
// channels, so each tap is one FMA per eight channels; z[0, 8) gets bias + taps. Then the rows
// (8 * ls contiguous samples) move by one sample: ls vector moves, each load one sample ahead of
// its store (the last reads one sample past the rows, which the caller provides), and the new
// samples go to the rows' last places. Loads four samples from each row start: the caller keeps
// them inside the tensors.
template <int kK, int kFirst, typename scalar_t>
C10_ALWAYS_INLINE void step8(scalar_t* r, int64_t ls, const float* w, const float* bias, __m256 xv, const scalar_t* x, int64_t sc,
                  float* z) {
  __m256 s[4], wc[4];
  load_cols8(r, ls, s);
  load_cols8(w, kK, wc);
  __m256 acc = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  acc = _mm256_fmadd_ps(wc[kK - 1], xv, acc);
  for (int k = 0; k + 1 < kK; ++k) acc = _mm256_fmadd_ps(wc[k], s[kFirst + k], acc);
  _mm256_storeu_ps(z, acc);
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

// Runs step8<kK, kFirst> over groups [0, m) of rows; false when (K, first) is not a served shape.
template <typename scalar_t>
bool step8_rows(int64_t K, int64_t first, scalar_t* rows, int64_t ls, const float* w, const float* bias,
                const scalar_t* x, int64_t sc, int64_t m, float* z) {
  auto run = [&](auto kk, auto kf) {
    constexpr int kK = decltype(kk)::value, kFirst = decltype(kf)::value;
    alignas(32) float xs[8];
    for (int64_t i = 0; i < m; i += 8) {
      __m256 xv;
      if (sc == 1) {
        xv = load8(x + i);
      } else {
        for (int j = 0; j < 8; ++j) xs[j] = static_cast<float>(x[(i + j) * sc]);
        xv = _mm256_load_ps(xs);
      }
      step8<kK, kFirst>(rows + i * ls, ls, w + i * kK, bias ? bias + i : nullptr, xv, x + i * sc, sc, z + i);
    }
    return true;
  };
  using std::integral_constant;
  switch (K * 8 + first) {
    case 2 * 8 + 0: return run(integral_constant<int, 2>{}, integral_constant<int, 0>{});
    case 2 * 8 + 1: return run(integral_constant<int, 2>{}, integral_constant<int, 1>{});
    case 3 * 8 + 0: return run(integral_constant<int, 3>{}, integral_constant<int, 0>{});
    case 3 * 8 + 1: return run(integral_constant<int, 3>{}, integral_constant<int, 1>{});
    case 4 * 8 + 0: return run(integral_constant<int, 4>{}, integral_constant<int, 0>{});
    case 4 * 8 + 1: return run(integral_constant<int, 4>{}, integral_constant<int, 1>{});
    default: return false;
  }
}
#endif

// One-sample step of depthwise rows [c0, c1): z[c - c0] (before the activation), and each state row
// advanced by one sample. Rows of the hybrid models' shapes go through step8 eight at a time; the
// rest take the taps as passes over the channels (independent sums, no chain of dependent FMAs per
// row) and one move of their rows.
template <typename scalar_t>
inline void step_rows(const Problem<scalar_t>& p, int64_t b,
                      scalar_t* __restrict__ state, int64_t c0, int64_t c1, at::opmath_type<scalar_t>* __restrict__ z) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = p.g.kernel, d = p.g.dilation, ls = p.g.state_len, first = ls - p.g.span;
  const int64_t n = c1 - c0;
  const scalar_t* __restrict__ x = p.x.row(b, c0);
  const int64_t sc = p.x.sc;
  scalar_t* __restrict__ rows = state + c0 * ls;
  const acc_t* __restrict__ w = p.w + c0 * K;
  int64_t done = 0;
#if defined(__AVX2__) && defined(__F16C__)
  if constexpr (std::is_same_v<acc_t, float>) {
    // Groups of eight rows [0, m) whose loads stay inside this block's rows (other tasks move the
    // neighbouring blocks meanwhile): four samples from each row start, (m-1)*ls + 4 <= n*ls, and
    // the first sample of row m, read by the moves, so m < n. The rest runs below.
    if (d == 1 && ls >= 1 && ls <= 4) {
      const int64_t last = std::min(n - 1, n - (4 + ls - 1) / ls + 1);
      const int64_t m = std::max<int64_t>(0, last) / 8 * 8;
      if (step8_rows(K, first, rows, ls, p.w + c0 * K, p.bias ? p.bias + c0 : nullptr, x, sc, m, z)) done = m;
    }
  }
#endif
  for (int64_t i = done; i < n; ++i) z[i] = (p.bias ? p.bias[c0 + i] : acc_t(0)) + w[i * K + K - 1] * static_cast<acc_t>(x[i * sc]);
  for (int64_t k = 0; k + 1 < K; ++k) {
    const scalar_t* __restrict__ tap = rows + first + k * d;
    for (int64_t i = done; i < n; ++i) z[i] += w[i * K + k] * static_cast<acc_t>(tap[i * ls]);
  }
  if (ls > 0 && done < n) {
    std::memmove(rows + done * ls, rows + done * ls + 1, static_cast<size_t>((n - done) * ls - 1) * sizeof(scalar_t));
    for (int64_t i = done; i < n; ++i) rows[i * ls + ls - 1] = x[i * sc];
  }
}

// One-sample step of depthwise rows [c0, c1) of one live row (the hybrid models' decode): the taps
// and the state's advance in step_rows, then the activation vectorised over the block's outputs,
// which are contiguous.
template <typename scalar_t>
void depthwise_step(const Problem<scalar_t>& p, int64_t b, int64_t s, int64_t c0, int64_t c1,
                    std::vector<at::opmath_type<scalar_t>>& acc) {
  using acc_t = at::opmath_type<scalar_t>;
  acc.resize(c1 - c0);
  step_rows(p, b, p.slot_state(s), c0, c1, acc.data());
  apply_epilogue<acc_t>(acc.data(), nullptr, c1 - c0, p.g.act);
  convert_n(acc.data(), p.out_row(b, c0), c1 - c0);  // (b, c, 0) for consecutive c
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
  const int64_t groups_per_block = std::max<int64_t>(1, kBlockChannels / std::max<int64_t>(1, g.c_in_per_group));
  const int64_t blocks = (g.groups + groups_per_block - 1) / groups_per_block;
  const int64_t tasks = small_call(g) ? 1 : g.batch * blocks;
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "streaming_conv1d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor w = weight_.to(acc_type).contiguous();
    const Tensor bias = has_bias ? bias_->to(acc_type).contiguous() : Tensor();
    const Problem<scalar_t> p{g,
                              {x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1)},
                              state.mutable_data_ptr<scalar_t>(),
                              w.const_data_ptr<acc_t>(),
                              has_bias ? bias.const_data_ptr<acc_t>() : nullptr,
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
