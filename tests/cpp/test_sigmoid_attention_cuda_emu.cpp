// The sigmoid-attention CUDA kernels (tensor-core fp16/bf16 and fp32, forward and backward) run
// on the CPU through the emulator in cuda_emu.h (next to this file), against a float64 reference, on
// machines without a GPU. Each case runs under two schedules: cp.async landing late with the warps
// run one after another, and landing early with the warps run in reverse (every third case also in
// lockstep, shuffled), so missing waits and barriers show up as wrong results.
//
// Build: the top-level CMakeLists.txt (needs the CUDA headers only).
// Run:   test_sigmoid_attention_cuda_emu [filter]   (exit 1 on any failure)
#define ACCEL_CUDA_EMU_RUNTIME
#include "sigmoid_attention/cuda/sigmoid_attention_fp32_cuda.cu"  // also brings in the tensor-core kernels

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace sa = accel::sigmoid_attention::cuda;
namespace emu = accel::cuda_emu;

namespace {

enum class DType { f32, f16, bf16 };
const char* dtype_name(DType t) { return t == DType::f32 ? "fp32" : t == DType::f16 ? "fp16" : "bf16"; }

// Element storage: raw 16-bit patterns or fp32 values.
struct Buf {
  DType t;
  std::vector<uint16_t> h;
  std::vector<float> f;
  Buf(DType t_, size_t n, float fill_f32 = 0.f) : t(t_) {
    if (t == DType::f32) {
      f.assign(n, fill_f32);
    } else {
      h.assign(n, 0);
    }
  }
  void* data() { return t == DType::f32 ? static_cast<void*>(f.data()) : static_cast<void*>(h.data()); }
  size_t size() const { return t == DType::f32 ? f.size() : h.size(); }
  double get(size_t i) const {
    if (t == DType::f32) return f[i];
    return emu::b16_to_float(h[i], t == DType::bf16);
  }
  void set(size_t i, float x) {
    if (t == DType::f32) {
      f[i] = x;
    } else if (t == DType::bf16) {
      const __nv_bfloat16 b = __float2bfloat16_rn(x);
      std::memcpy(&h[i], &b, 2);
    } else {
      const __half b = __float2half_rn(x);
      std::memcpy(&h[i], &b, 2);
    }
  }
};

struct Case {
  std::string name;
  DType dtype;
  int batch, hq, hkv, lq, lk, d;
  bool causal = false;
  int window_left = -1, window_right = -1;
  bool alibi = false;
  bool bias_per_head = false;
  bool varlen = false;       // sequences of the lengths below packed, dense lq/lk ignored
  std::vector<int> lens_q, lens_k;
  int num_splits = 1;        // forward split-KV
  bool backward = true;
  bool strided = false;      // q/k/v rows padded (row stride > head dim): the 2-byte load path
};

// Layout: dense (B, H, L, D) contiguous (rows of `pitch` elements when strided), varlen (T, H, D).
struct Layout {
  int64_t batch_stride, head_stride, row_stride;
  size_t elems;
};

Layout layout_of(const Case& c, int heads, int len, int total_rows, int pitch) {
  if (c.varlen) return {0, pitch, static_cast<int64_t>(heads) * pitch, static_cast<size_t>(total_rows) * heads * pitch};
  return {static_cast<int64_t>(heads) * len * pitch, static_cast<int64_t>(len) * pitch, pitch,
          static_cast<size_t>(c.batch) * heads * len * pitch};
}

struct Seq {
  int q0, k0, lq, lk;
};

struct Result {
  double err = 0, ref_max = 0;
};

void accumulate(Result& r, double got, double want) {
  if (!std::isfinite(got)) {
    r.err = INFINITY;
    return;
  }
  r.err = std::max(r.err, std::fabs(got - want));
  r.ref_max = std::max(r.ref_max, std::fabs(want));
}

// x rounded to the dtype (round to nearest even), as a low-precision eager computation stores it.
double round_to(DType t, double x) {
  Buf b(t, 1);
  b.set(0, static_cast<float>(x));
  return b.get(0);
}

double tolerance(DType t) { return t == DType::f32 ? 2e-5 : t == DType::f16 ? 4e-3 : 2.5e-2; }

struct Outcome {
  bool ok = true;
  std::string detail;
};

Outcome run_case(const Case& c, emu::CpAsyncMode mode, emu::Order order, uint64_t seed) {
  emu::set_cp_async_mode(mode);
  emu::set_order(order, seed);
  std::mt19937 rng(static_cast<uint32_t>(seed * 7919 + c.d * 31 + c.lq));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uni(-6.f, 1.f);

  // sequences
  std::vector<Seq> seqs;
  std::vector<int32_t> cu_q{0}, cu_k{0};
  if (c.varlen) {
    for (size_t i = 0; i < c.lens_q.size(); ++i) {
      seqs.push_back({cu_q.back(), cu_k.back(), c.lens_q[i], c.lens_k[i]});
      cu_q.push_back(cu_q.back() + c.lens_q[i]);
      cu_k.push_back(cu_k.back() + c.lens_k[i]);
    }
  } else {
    for (int b = 0; b < c.batch; ++b) seqs.push_back({0, 0, c.lq, c.lk});
  }
  const int batch = static_cast<int>(seqs.size());
  int max_lq = 0, max_lk = 0;
  for (const Seq& s : seqs) {
    max_lq = std::max(max_lq, s.lq);
    max_lk = std::max(max_lk, s.lk);
  }
  const int pitch = c.strided ? c.d + 3 : c.d;
  const Layout lq = layout_of(c, c.hq, c.lq, cu_q.back(), pitch);
  const Layout lk = layout_of(c, c.hkv, c.lk, cu_k.back(), pitch);
  const Layout lo = layout_of(c, c.hq, c.lq, cu_q.back(), c.d);   // outputs: contiguous
  const Layout lko = layout_of(c, c.hkv, c.lk, cu_k.back(), c.d);

  Buf q(c.dtype, lq.elems), k(c.dtype, lk.elems), v(c.dtype, lk.elems), dout(c.dtype, lo.elems);
  for (size_t i = 0; i < q.size(); ++i) q.set(i, normal(rng));
  for (size_t i = 0; i < k.size(); ++i) k.set(i, normal(rng));
  for (size_t i = 0; i < v.size(); ++i) v.set(i, normal(rng));
  for (size_t i = 0; i < dout.size(); ++i) dout.set(i, normal(rng));
  std::vector<float> bias(c.hq), slopes(static_cast<size_t>(batch) * c.hq);
  for (float& b : bias) b = uni(rng);
  for (size_t i = 0; i < slopes.size(); ++i) slopes[i] = 0.05f * static_cast<float>(i % 5 + 1);

  sa::Params p;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.q_batch_stride = lq.batch_stride, p.q_head_stride = lq.head_stride, p.q_row_stride = lq.row_stride;
  p.k_batch_stride = lk.batch_stride, p.k_head_stride = lk.head_stride, p.k_row_stride = lk.row_stride;
  p.v_batch_stride = lk.batch_stride, p.v_head_stride = lk.head_stride, p.v_row_stride = lk.row_stride;
  p.o_batch_stride = lo.batch_stride, p.o_head_stride = lo.head_stride, p.o_row_stride = lo.row_stride;
  p.dk_batch_stride = lko.batch_stride, p.dk_head_stride = lko.head_stride, p.dk_row_stride = lko.row_stride;
  p.do_batch_stride = lo.batch_stride, p.do_head_stride = lo.head_stride, p.do_row_stride = lo.row_stride;
  p.batch = batch;
  p.heads_q = c.hq;
  p.heads_kv = c.hkv;
  p.group = c.hq / c.hkv;
  p.head_dim = c.d;
  p.max_len_q = max_lq;
  p.max_len_k = max_lk;
  if (c.varlen) {
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
  p.scale = static_cast<float>(scale);
  if (c.bias_per_head) p.bias = bias.data();
  p.window_left = c.window_left;
  p.window_right = c.causal ? 0 : c.window_right;
  if (c.alibi) {
    p.alibi_slopes = slopes.data();
    p.alibi_batch_stride = c.hq;
  }
  const bool f32 = c.dtype == DType::f32;
  p.vec_load = !f32 && c.d % 8 == 0 && pitch % 8 == 0;
  p.vec_store = !f32 && c.d % 8 == 0;

  // ---- reference (float64) on the rounded inputs
  auto at = [&](const Layout& l, int b, int h, int64_t row, int col) {
    return static_cast<size_t>(b * l.batch_stride + h * l.head_stride + row * l.row_stride + col);
  };
  // o_eager: the eager formula in the input dtype (S, the logits and P rounded to it, P V
  // accumulated in fp32, the output rounded): the yardstick of the forward's low-precision error.
  std::vector<double> o_eager(lo.elems, 0.0);
  std::vector<double> o_ref(lo.elems, 0.0), dq_ref(lo.elems, 0.0), dk_ref(lko.elems, 0.0), dv_ref(lko.elems, 0.0);
  for (int b = 0; b < batch; ++b) {
    const Seq& s = seqs[b];
    const int off = s.lk - s.lq;
    for (int h = 0; h < c.hq; ++h) {
      const int hk = h / p.group;
      const double bh = c.bias_per_head ? bias[h] : -std::log(std::max(s.lk, 1));
      const double slope = c.alibi ? slopes[b * c.hq + h] : 0.0;
      const int bq = c.varlen ? 0 : b;
      for (int i = 0; i < s.lq; ++i) {
        const int64_t qrow = s.q0 + i;
        for (int j = 0; j < s.lk; ++j) {
          const int dist = j - (i + off);
          if (p.window_left >= 0 && dist < -p.window_left) continue;
          if (p.window_right >= 0 && dist > p.window_right) continue;
          const int64_t krow = s.k0 + j;
          double sdot = 0;
          for (int x = 0; x < c.d; ++x) sdot += q.get(at(lq, bq, h, qrow, x)) * k.get(at(lk, bq, hk, krow, x));
          const double z = scale * sdot + bh - slope * std::abs(dist);
          const double pr = 1.0 / (1.0 + std::exp(-z));
          const double z_low = round_to(c.dtype, round_to(c.dtype, round_to(c.dtype, sdot) * scale) + bh -
                                                     round_to(c.dtype, slope * std::abs(dist)));
          const double pr_low = round_to(c.dtype, 1.0 / (1.0 + std::exp(-z_low)));
          double dp = 0;
          for (int x = 0; x < c.d; ++x) {
            o_ref[at(lo, bq, h, qrow, x)] += pr * v.get(at(lk, bq, hk, krow, x));
            o_eager[at(lo, bq, h, qrow, x)] += pr_low * v.get(at(lk, bq, hk, krow, x));
            dp += dout.get(at(lo, bq, h, qrow, x)) * v.get(at(lk, bq, hk, krow, x));
            dv_ref[at(lko, bq, hk, krow, x)] += pr * dout.get(at(lo, bq, h, qrow, x));
          }
          const double ds = dp * pr * (1 - pr) * scale;
          for (int x = 0; x < c.d; ++x) {
            dq_ref[at(lo, bq, h, qrow, x)] += ds * k.get(at(lk, bq, hk, krow, x));
            dk_ref[at(lko, bq, hk, krow, x)] += ds * q.get(at(lq, bq, h, qrow, x));
          }
        }
      }
    }
  }

  Outcome out;
  auto check = [&](const char* what, Result r) {
    const double rel = r.err / std::max(r.ref_max, 1e-30);
    if (!(rel <= tolerance(c.dtype))) {
      out.ok = false;
      char buf[160];
      std::snprintf(buf, sizeof buf, " %s: max|err|/max|ref| = %.3g (tol %.1g)", what, rel, tolerance(c.dtype));
      out.detail += buf;
    }
  };

  // ---- forward
  {
    Buf o(c.dtype, lo.elems);
    for (size_t i = 0; i < o.size(); ++i) o.set(i, 12345.f);  // rows the kernel must write
    std::vector<float> o_accum;
    p.o = o.data();
    p.num_splits = f32 ? 1 : c.num_splits;
    if (p.num_splits > 1) {
      o_accum.assign(lo.elems, 0.f);
      p.o_accum = o_accum.data();
    }
    cudaError_t e;
    if (f32) {
      e = sa::run_fwd_fp32(p, nullptr);
    } else if (c.dtype == DType::f16) {
      e = sa::detail::dispatch_fwd<__half>(p, nullptr);
    } else {
      e = sa::detail::dispatch_fwd<__nv_bfloat16>(p, nullptr);
    }
    if (e != cudaSuccess) return {false, " forward launch failed"};
    Result r, r_eager;
    for (int b = 0; b < batch; ++b) {
      const Seq& s = seqs[b];
      for (int h = 0; h < c.hq; ++h) {
        for (int i = 0; i < s.lq; ++i) {
          for (int x = 0; x < c.d; ++x) {
            const size_t idx = at(lo, c.varlen ? 0 : b, h, s.q0 + i, x);
            accumulate(r, p.num_splits > 1 ? o_accum[idx] : o.get(idx), o_ref[idx]);
            accumulate(r_eager, p.num_splits > 1 ? o_eager[idx] : round_to(c.dtype, o_eager[idx]), o_ref[idx]);
          }
        }
      }
    }
    check("out", r);
    // the acceptance rule of the CUDA tests: at most twice the eager formula's error in the same
    // precision (plus a floor for outputs the eager formula happens to get exactly right)
    if (!f32 && !(r.err <= 2 * r_eager.err + 1e-3 * r.ref_max)) {
      out.ok = false;
      char buf[160];
      std::snprintf(buf, sizeof buf, " out: error %.3g > 2x the eager formula's %.3g", r.err, r_eager.err);
      out.detail += buf;
    }
    p.o = nullptr;
    p.o_accum = nullptr;
    p.num_splits = 1;
  }

  // ---- backward
  if (c.backward) {
    std::vector<float> dq_accum(lo.elems, 0.f);
    Buf dk(c.dtype, lko.elems), dv(c.dtype, lko.elems);
    p.dout = dout.data();
    p.dq_accum = dq_accum.data();
    p.dk = dk.data();
    p.dv = dv.data();
    p.vec_load = p.vec_load && lo.row_stride % 8 == 0;
    cudaError_t e;
    if (f32) {
      e = sa::run_bwd_fp32(p, nullptr);
    } else if (c.dtype == DType::f16) {
      e = sa::detail::dispatch_bwd<__half>(p, nullptr);
    } else {
      e = sa::detail::dispatch_bwd<__nv_bfloat16>(p, nullptr);
    }
    if (e != cudaSuccess) return {false, " backward launch failed"};
    Result rq, rk, rv;
    for (int b = 0; b < batch; ++b) {
      const Seq& s = seqs[b];
      const int bb = c.varlen ? 0 : b;
      for (int h = 0; h < c.hq; ++h) {
        for (int i = 0; i < s.lq; ++i) {
          for (int x = 0; x < c.d; ++x) {
            const size_t idx = at(lo, bb, h, s.q0 + i, x);
            accumulate(rq, dq_accum[idx], dq_ref[idx]);
          }
        }
      }
      for (int h = 0; h < c.hkv; ++h) {
        for (int j = 0; j < s.lk; ++j) {
          for (int x = 0; x < c.d; ++x) {
            const size_t idx = at(lko, bb, h, s.k0 + j, x);
            accumulate(rk, dk.get(idx), dk_ref[idx]);
            accumulate(rv, dv.get(idx), dv_ref[idx]);
          }
        }
      }
    }
    check("dq", rq);
    check("dk", rk);
    check("dv", rv);
  }
  return out;
}

std::vector<Case> cases() {
  std::vector<Case> cs;
  auto add = [&](Case c) { cs.push_back(std::move(c)); };
  // name, dtype, batch, hq, hkv, lq, lk, d
  add({"bf16 D64 GQA 70x150", DType::bf16, 1, 2, 1, 70, 150, 64});
  add({"fp16 D64 causal 130x130", DType::f16, 1, 1, 1, 130, 130, 64, true});
  add({"bf16 D32 causal 1x1", DType::bf16, 2, 1, 1, 1, 1, 32, true});
  {
    Case c{"bf16 D40 window(17,3) alibi 96x111", DType::bf16, 1, 2, 2, 96, 111, 40};
    c.window_left = 17, c.window_right = 3, c.alibi = true;
    add(c);
  }
  {
    Case c{"fp16 D59 strided bias/head 45x77", DType::f16, 1, 2, 1, 45, 77, 59};
    c.bias_per_head = true, c.strided = true;
    add(c);
  }
  {
    Case c{"bf16 D128 decode split3 1x600", DType::bf16, 1, 2, 2, 1, 600, 128};
    c.num_splits = 3;
    add(c);
  }
  add({"bf16 D96 causal 129x65", DType::bf16, 1, 1, 1, 129, 65, 96, true});
  add({"fp16 D160 35x50", DType::f16, 1, 1, 1, 35, 50, 160});
  add({"bf16 D256 causal 40x70", DType::bf16, 1, 1, 1, 40, 70, 256, true});
  {
    Case c{"bf16 D64 varlen 3 seqs", DType::bf16, 0, 2, 1, 0, 0, 64};
    c.varlen = true, c.lens_q = {17, 0, 66}, c.lens_k = {30, 5, 66}, c.causal = true;
    add(c);
  }
  {
    Case c{"fp32 D59 causal alibi 37x70", DType::f32, 1, 2, 1, 37, 70, 59, true};
    c.alibi = true;
    add(c);
  }
  add({"fp32 D256 20x33", DType::f32, 1, 1, 1, 20, 33, 256});
  return cs;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  emu::Report report;
  struct Schedule {
    const char* name;
    emu::CpAsyncMode mode;
    emu::Order order;
  };
  const Schedule schedules[] = {{"late/warp-serial", emu::CpAsyncMode::late, emu::Order::warp_serial},
                                {"early/warp-serial-rev", emu::CpAsyncMode::early, emu::Order::warp_serial_reverse},
                                {"late/lockstep-shuffled", emu::CpAsyncMode::late, emu::Order::shuffled}};
  int index = 0;
  for (const Case& c : cases()) {
    ++index;
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    for (int si = 0; si < 3; ++si) {
      if (si == 2 && index % 3 != 0) continue;  // the shuffled schedule on every third case
      report.run(c.name, schedules[si].name, [&] {
        const Outcome o = run_case(c, schedules[si].mode, schedules[si].order, 1 + si);
        return o.ok ? std::string() : o.detail.empty() ? std::string(" failed") : o.detail;
      });
    }
  }
  return report.finish();
}
