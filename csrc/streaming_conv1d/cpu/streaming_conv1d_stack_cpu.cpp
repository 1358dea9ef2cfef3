// CPU kernel of accel::streaming_conv1d_stack.
//
// A depthwise stack (every layer maps C channels to C, one per group: accel.nn.TCN's layers) runs
// fused: channel c of a layer depends only on channel c of the layer before, so a task carries a
// block of channels (rows of a few thousand samples in all) through every layer, the rows staying in
// L1 between layers. One parallel region per call, no intermediate tensors, the activation and the
// residual vectorised over the whole block (one rounding per layer for bf16/fp16, as the offline
// TCN's fused residual). Other stacks run layer by layer through accel::streaming_conv1d.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu_vec.h"
#include "common/parallel.h"
#include "streaming_conv1d/cpu/streaming_conv1d_cpu.h"
#include "streaming_conv1d/streaming_conv1d.h"

namespace accel::streaming_conv1d {
namespace {

using at::Tensor;
using namespace accel::cpu;

constexpr int64_t kBlockSamples = 4096;         // a task's rows, channels x h, stay within L1

template <typename scalar_t>
struct Layer {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* state;    // (S, C, ls) contiguous
  const acc_t* w;     // (C, K) contiguous
  const acc_t* bias;  // (C,) or null
  int64_t K, d, ls, span;
};

// A worker's rows of one block of channels, sized once per call. Row i of cur / nxt starts at
// i * stride + pad: the pad before it takes the state samples that taps straddling the state and
// the row read, so that their run is contiguous without copying the row.
template <typename scalar_t>
struct Rows {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t pad, stride;
  std::vector<acc_t> cur, nxt, stage;  // stage: one run per tap
  std::vector<const acc_t*> src;
  std::vector<scalar_t> rounded;
  Rows(int64_t block, int64_t h, int64_t max_taps, int64_t pad_)
      : pad(pad_), stride(pad_ + h), cur(block * stride), nxt(block * stride), stage(max_taps * h), src(max_taps),
        rounded(std::is_same_v<scalar_t, acc_t> ? 0 : block * h) {}
  acc_t* in_row(int64_t i) { return cur.data() + i * stride + pad; }
  acc_t* out_row(int64_t i) { return nxt.data() + i * stride + pad; }
};

// u[j0, j0 + h) of one channel, where u is its state row (a ring starting at `first`, or linear when
// first = 0) followed by its input row in[0, h), whose pad holds the state's last samples: a
// pointer into the row (with its pad) or the state when the run lies there in acc_t, else the run
// copied (converted) into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* tap_run(const scalar_t* row, int64_t ls, int64_t first, const acc_t* in, int64_t pad, int64_t j0,
                            int64_t h, acc_t* buf) {
  if (ls - j0 <= pad) return in + (j0 - ls);
  const int64_t from_state = std::min(h, ls - j0);
  const int64_t at = first + j0 < ls ? first + j0 : first + j0 - ls;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (from_state == h && at + h <= ls) return row + at;
  }
  const int64_t run = std::min(from_state, ls - at);  // up to the ring's end, then from its start
  convert_n(row + at, buf, run);
  convert_n(row, buf + run, from_state - run);
  std::copy_n(in, h - from_state, buf + from_state);
  return buf;
}

// pad[0, n) = the state row's last n samples (n <= ls), as acc_t.
template <typename scalar_t, typename acc_t>
inline void state_tail(const scalar_t* row, int64_t ls, int64_t first, int64_t n, acc_t* pad) {
  const int64_t j0 = ls - n;
  const int64_t at = first + j0 < ls ? first + j0 : first + j0 - ls;
  const int64_t run = std::min(n, ls - at);
  convert_n(row + at, pad, run);
  convert_n(row, pad + run, n - run);
}

// out[t] = bias + sum_k w[k] * src[k][t], t in [0, h): the taps' sums in registers.
template <typename acc_t>
inline void taps(const acc_t* const* src, const acc_t* w, int64_t K, acc_t bias, int64_t h, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t t = 0;
  for (; t + 2 * V <= h; t += 2 * V) {
    Vec a0(bias), a1(bias);
    for (int64_t k = 0; k < K; ++k) {
      const Vec wk(w[k]);
      a0 = at::vec::fmadd(wk, Vec::loadu(src[k] + t), a0);
      a1 = at::vec::fmadd(wk, Vec::loadu(src[k] + t + V), a1);
    }
    a0.store(out + t);
    a1.store(out + t + V);
  }
  for (; t < h; ++t) {
    acc_t z = bias;
    for (int64_t k = 0; k < K; ++k) z += w[k] * src[k][t];
    out[t] = z;
  }
}

// A state row after a chunk whose samples in[0, h) (as acc_t) follow it: linear, the row moves by h
// and takes the last samples; a ring starting at `first`, the last min(h, ls) samples overwrite the
// oldest, from sample at = (first + h - min(h, ls)) % ls on (the same for every row of a layer).
template <typename scalar_t, typename acc_t>
inline void advance_row(scalar_t* row, int64_t ls, bool ring, int64_t at, const acc_t* in, int64_t h) {
  if (ls == 0) return;
  const int64_t m = std::min(h, ls);
  in += h - m;
  if (!ring) {
    if (h < ls) std::memmove(row, row + h, static_cast<size_t>(ls - h) * sizeof(scalar_t));
    convert_n(in, row + ls - m, m);
    return;
  }
  const int64_t run = std::min(m, ls - at);
  convert_n(in, row + at, run);
  convert_n(in + run, row, m - run);
}

// Asks for the first lines of the state runs that channel c's taps will read next (the write goes
// over the oldest, which tap 0 reads): rows of deep layers are pages apart, and a stream's state
// is cold between steps, so their misses overlap with the current channel's work.
template <typename scalar_t>
inline void prefetch_row(const Layer<scalar_t>& L, int64_t s, int64_t c, int64_t C, int64_t first, int64_t h) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t), kLines = 4;
  const scalar_t* row = L.state + (s * C + c) * L.ls;
  for (int64_t k = 0; k < L.K; ++k) {
    const int64_t j0 = L.ls - L.span + k * L.d;
    if (j0 >= L.ls) break;
    const int64_t at = first + j0 < L.ls ? first + j0 : first + j0 - L.ls;
    const int64_t end = at + std::min({h, L.ls - j0, kLines * kLine});
    for (int64_t j = at; j < end; j += kLine) __builtin_prefetch(row + (j < L.ls ? j : j - L.ls), 1);
  }
}

// Channels [c0, c0 + n) of stream slot s through every layer: their chunk rows (as acc_t) in
// rows.in_row on entry, the last layer's outputs there on return. Per layer: each channel's taps, then
// its state row advanced (its taps have read it), then the activation and residual over the block.
// `position` is the slot's ring position, or -1 for linear states.
template <typename scalar_t>
void run_block(const std::vector<Layer<scalar_t>>& layers, int64_t s, int64_t position, int64_t c0, int64_t n,
               int64_t C, int64_t h, Activation act, bool residual, Rows<scalar_t>& rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool ring = position >= 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer<scalar_t>& L = layers[l];
    const int64_t first = ring && L.ls > 0 ? position % L.ls : 0;
    const int64_t write_at = ring && L.ls > 0 ? (first + h - std::min(h, L.ls)) % L.ls : 0;
    // taps straddling the state and the row read the state's last `tail` samples from the pad
    int64_t tail = 0;
    for (int64_t k = 0; k < L.K; ++k) {
      const int64_t before = L.span - k * L.d;  // samples tap k takes from the state
      if (before > 0 && before < h) tail = std::max(tail, before);
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = c0 + i;
      if (i + 1 < n) {
        prefetch_row(L, s, c + 1, C, first, h);
      } else if (l + 1 < layers.size()) {
        const Layer<scalar_t>& M = layers[l + 1];
        prefetch_row(M, s, c0, C, ring && M.ls > 0 ? position % M.ls : 0, h);
      }
      acc_t* __restrict__ in = rows.in_row(i);
      acc_t* __restrict__ out = rows.out_row(i);
      scalar_t* srow = L.state + (s * C + c) * L.ls;
      const acc_t* w = L.w + c * L.K;
      if (tail > 0) state_tail(srow, L.ls, first, tail, in - tail);
      // tap k reads u[ls - span + k*d + t]
      for (int64_t k = 0; k < L.K; ++k) {
        rows.src[k] =
            tap_run(srow, L.ls, first, in, tail, L.ls - L.span + k * L.d, h, rows.stage.data() + k * h);
      }
      taps(rows.src.data(), w, L.K, L.bias ? L.bias[c] : acc_t(0), h, out);
      advance_row(srow, L.ls, ring, write_at, in, h);
    }
    // the activation and the residual over the block's rows (one pass when they are contiguous)
    const int64_t rows_n = rows.pad == 0 ? 1 : n, len = rows.pad == 0 ? n * h : h;
    for (int64_t i = 0; i < rows_n; ++i) {
      acc_t* out = rows.out_row(i);
      apply_epilogue<acc_t>(out, residual ? rows.in_row(i) : nullptr, len, act);
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {  // the layer's outputs in scalar_t, as the next layer and the state see them
        convert_n(out, rows.rounded.data(), len);
        convert_n(rows.rounded.data(), out, len);
      }
    }
    std::swap(rows.cur, rows.nxt);
  }
}

template <typename scalar_t>
void run_depthwise(const std::vector<Geometry>& geometry, const Tensor& x, at::TensorList states,
                   const std::vector<const at::opmath_type<scalar_t>*>& weights,
                   const std::vector<const at::opmath_type<scalar_t>*>& biases, const int32_t* slots, int64_t* positions,
                   bool residual, Tensor& out) {
  const Geometry& g0 = geometry.front();
  const int64_t B = g0.batch, C = g0.c_in, h = g0.chunk;
  std::vector<Layer<scalar_t>> layers;
  int64_t work = 0, max_taps = 0, pad = 0;
  for (size_t i = 0; i < geometry.size(); ++i) {
    const Geometry& g = geometry[i];
    layers.push_back({states[i].mutable_data_ptr<scalar_t>(), weights[i], biases[i], g.kernel, g.dilation,
                      g.state_len, g.span});
    work += B * C * ((positions ? 0 : g.state_len) + h * (g.kernel + 1));  // a ring's row does not move
    max_taps = std::max(max_taps, g.kernel);
    pad = std::max(pad, std::min(g.span, h - 1));
  }
  const bool serial = work < kMinParallelWork;
  const int64_t want = serial ? 1 : kTasksPerThread * at::get_num_threads();
  const int64_t blocks_per_row = std::clamp<int64_t>((want + B - 1) / B, 1, C);
  const int64_t block = std::min((C + blocks_per_row - 1) / blocks_per_row, std::max<int64_t>(1, kBlockSamples / h));
  const int64_t blocks = (C + block - 1) / block;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t xsb = x.stride(0), xsc = x.stride(1);
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const Activation act = g0.act;
  parallel_task_workers(serial ? 1 : B * blocks, [&](TaskCursor& cursor) {
    TaskCursor all(B * blocks);
    TaskCursor& next = serial ? all : cursor;
    Rows<scalar_t> rows(block, h, max_taps, pad);
    for (int64_t task = next.next(); task >= 0; task = next.next()) {
      const int64_t b = task / blocks, c0 = (task % blocks) * block, c1 = std::min(C, c0 + block);
      const int64_t s = slots ? slots[b] : b;
      scalar_t* y = op + (b * C + c0) * h;
      if (s < 0) {  // every layer outputs zero for a padding row: the residual passes the chunk through
        for (int64_t c = c0; c < c1; ++c, y += h) {
          if (residual) {
            std::copy_n(xp + b * xsb + c * xsc, h, y);
          } else {
            std::fill_n(y, h, scalar_t(0));
          }
        }
        continue;
      }
      for (int64_t c = c0; c < c1; ++c) convert_n(xp + b * xsb + c * xsc, rows.in_row(c - c0), h);
      run_block(layers, s, positions ? positions[s] : -1, c0, c1 - c0, C, h, act, residual, rows);
      for (int64_t c = c0; c < c1; ++c) convert_n(rows.in_row(c - c0), y + (c - c0) * h, h);
    }
  });
  if (positions) {  // after every task has read them
    for (int64_t b = 0; b < B; ++b) {
      const int64_t s = slots ? slots[b] : b;
      if (s >= 0) positions[s] += h;
    }
  }
}

bool fused_applies(const std::vector<Geometry>& geometry) {
  return std::all_of(geometry.begin(), geometry.end(), [](const Geometry& g) {
    return g.c_in_per_group == 1 && g.c_out_per_group == 1;
  });
}

Tensor streaming_conv1d_stack_cpu(const Tensor& x_, at::TensorList states, at::TensorList weights_,
                                  const c10::List<std::optional<Tensor>>& biases_, at::IntArrayRef dilations,
                                  at::IntArrayRef groups, c10::string_view activation, bool residual,
                                  const std::optional<Tensor>& state_indices, const std::optional<Tensor>& positions) {
  const std::vector<Geometry> geometry =
      check_stack(x_, states, weights_, biases_, dilations, groups, activation, residual, state_indices, positions);
  if (!fused_applies(geometry)) {
    return run_stack_by_layer(x_, states, weights_, biases_, dilations, groups, activation, residual, state_indices,
                              positions);
  }
  const Geometry& g = geometry.front();
  Tensor out = at::empty({g.batch, g.c_in, g.chunk}, x_.options());
  if (out.numel() == 0) return out;
  const Tensor x = x_.stride(2) != 1 ? x_.contiguous() : x_;
  const bool indexed = state_indices.has_value() && state_indices->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "streaming_conv1d_stack_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The parameters as acc_t: in place when they are so already, else converted into one buffer
    // (no tensor operations: a small stack's whole step is tens of microseconds).
    std::vector<Tensor> dense;  // contiguous copies of strided parameters, kept alive for the call
    auto contiguous = [&](const Tensor& t) -> const scalar_t* {
      if (t.is_contiguous()) return t.const_data_ptr<scalar_t>();
      dense.push_back(t.contiguous());
      return dense.back().const_data_ptr<scalar_t>();
    };
    std::vector<const acc_t*> w(geometry.size()), bias(geometry.size(), nullptr);
    std::vector<acc_t> converted;
    if (!std::is_same_v<scalar_t, acc_t>) {
      int64_t total = 0;
      for (const Geometry& gi : geometry) total += gi.c_out * (gi.kernel + 1);
      converted.resize(total);
    }
    acc_t* next = converted.data();
    auto as_acc = [&](const Tensor& t, int64_t n) -> const acc_t* {
      const scalar_t* src = contiguous(t);
      if (std::is_same_v<scalar_t, acc_t>) return reinterpret_cast<const acc_t*>(src);
      convert_n(src, next, n);
      next += n;
      return next - n;
    };
    for (size_t i = 0; i < geometry.size(); ++i) {
      w[i] = as_acc(weights_[i], geometry[i].c_out * geometry[i].kernel);
      const std::optional<Tensor> b = biases_.get(i);
      if (b.has_value() && b->defined()) bias[i] = as_acc(*b, geometry[i].c_out);
    }
    run_depthwise<scalar_t>(geometry, x, states, w, bias, indexed ? state_indices->const_data_ptr<int32_t>() : nullptr,
                            positions.has_value() && positions->defined() ? positions->mutable_data_ptr<int64_t>()
                                                                          : nullptr,
                            residual, out);
  });
  return out;
}

}  // namespace
}  // namespace accel::streaming_conv1d

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("streaming_conv1d_stack", &accel::streaming_conv1d::streaming_conv1d_stack_cpu);
}
