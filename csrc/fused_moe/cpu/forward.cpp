// Fused MoE forward on the CPU: the routing tables, the phases over task lists (fused_moe_cpu.h),
// and the tasks of experts with many tokens: fp32 brgemm tiles, the bf16 tiles (bf16_tiles.h),
// or oneDNN per expert.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/parallel.h"
#include "common/test_hooks.h"
#include "fused_moe/cpu/bf16_tiles.h"
#include "fused_moe/cpu/fused_moe_cpu.h"

namespace accel::fused_moe::moe_cpu {
namespace {

// K chunk of the fp32 tiles: the B block a chunk streams (kc x kTileT floats) stays in L2.
constexpr int64_t kGemmKc = 512;

// C (rows x nt, ld kTileT) = A (rows x K, lda) B (K x nt, ld kTileT), over K in chunks so that the
// B block a chunk streams stays in L2 while every row block of A passes over it.
inline void tile_gemm(int64_t rows, int64_t nt, int64_t K, int64_t lda, const float* A, const float* B, float* C) {
  for (int64_t k0 = 0; k0 < K; k0 += kGemmKc) {
    const int64_t kk = std::min(kGemmKc, K - k0);
    at::native::cpublas::brgemm(rows, nt, kk, lda, kTileT, kTileT, k0 > 0, A + k0, B + k0 * kTileT, C, false);
  }
}

// The weight rows [r0, r1) of a (rows x K) matrix as fp32: in place for fp32, else widened into
// buf (one task's row block, 32 x K: L2-sized).
template <typename T>
const float* rows_fp32(const T* w, int64_t K, int64_t r0, int64_t r1, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return w + r0 * K;
  } else {
    buf.resize((r1 - r0) * K);
    cpu::convert_n(w + r0 * K, buf.data(), (r1 - r0) * K);
    return buf.data();
  }
}

// GEMM tiles (fp32 brgemm; bf16/fp16 weights widened per task where the CPU has no native
// low-precision GEMM): X^T blocks of kTileT tokens were packed into xbuf (H x kTileT each).
template <typename T>
void gemm_up_task(ForwardCtx<T>& c, int64_t e, int64_t j0, int64_t j1) {
  const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
  const T* w = c.w1 + e * 2 * I * H;
  const int64_t rows = j1 - j0;
  thread_local std::vector<float> gbuf, ubuf;
  const float* wg = rows_fp32(w, H, j0, j1, gbuf);
  const float* wu = rows_fp32(w, H, I + j0, I + j1, ubuf);
  alignas(64) float cg[kTileN * kTileT], cu[kTileN * kTileT];
  for (int64_t tb = 0; tb * kTileT < n; ++tb) {
    const int64_t nt = std::min<int64_t>(kTileT, n - tb * kTileT);
    const float* xt = c.xbuf.data() + c.xoff[e] + tb * H * kTileT;
    tile_gemm(rows, nt, H, H, wg, xt, cg);
    tile_gemm(rows, nt, H, H, wu, xt, cu);
    // C tiles are (features x tokens), as is the h^T block of this token tile (I x kTileT)
    float* ht = c.hbuf.data() + c.hoff[e] + tb * I * kTileT + j0 * kTileT;
    up_epilogue<T, float>(c, s0 + tb * kTileT, nt, j0, rows, cg, cu, ht, 1, kTileT);
    if constexpr (!std::is_same_v<T, float>) {
      // h rounded to the input dtype before the down projection, as the eager bf16/fp16 loop has it
      for (int64_t i = 0; i < rows * kTileT; ++i) ht[i] = static_cast<float>(static_cast<T>(ht[i]));
    }
  }
}

template <typename T>
void gemm_down_task(ForwardCtx<T>& c, int64_t e, int64_t h0, int64_t h1) {
  const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
  const int64_t rows = h1 - h0;
  thread_local std::vector<float> wbuf;
  const float* w = rows_fp32(c.w2 + e * H * I, I, h0, h1, wbuf);
  alignas(64) float cy[kTileN * kTileT];
  for (int64_t tb = 0; tb * kTileT < n; ++tb) {
    const int64_t nt = std::min<int64_t>(kTileT, n - tb * kTileT);
    const float* ht = c.hbuf.data() + c.hoff[e] + tb * I * kTileT;
    tile_gemm(rows, nt, I, I, w, ht, cy);
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t p = c.r.order[s0 + tb * kTileT + t];
      const float wp = c.weight(p);
      float* y = c.ypair + p * H + h0;
      for (int64_t i = 0; i < rows; ++i) y[i] = wp * cy[i * kTileT + t];
    }
  }
}

// bf16 tiles (bf16_tiles.h): X packed per expert in phase 0, h packed by the up tasks for the down
// projection. C blocks are (features x padded tokens).
template <typename T>
void bf16_pack_task(ForwardCtx<T>& c, int64_t e, int64_t panel) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t H = c.g.hidden, n = c.count(e), s0 = c.r.offsets[e], t0 = panel * bf16_tiles::kPanel;
    const int64_t cnt = std::min(bf16_tiles::kPanel, n - t0);
    const T* rows[bf16_tiles::kPanel];
    for (int64_t t = 0; t < cnt; ++t) rows[t] = c.x + c.token(s0 + t0 + t) * H;
    bf16_tiles::pack_panel(rows, cnt, bf16_tiles::panel_width(n, panel), H,
                           c.xpack.data() + c.xoff[e] + bf16_tiles::panel_offset(panel, H));
  }
}

template <typename T>
// (next_e, next_j0): the task to prefetch the first rows of (next_e -1: none)
void bf16_up_task(ForwardCtx<T>& c, int64_t e, int64_t j0, int64_t j1, int64_t next_e, int64_t next_j0) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
    const int64_t rows = j1 - j0, ld = bf16_tiles::padded(n);
    const T* w = c.w1 + e * 2 * I * H;
    const T* xp = c.xpack.data() + c.xoff[e];
    T* hp = c.hpack.data() + c.hoff[e];
    if (!c.cache) {  // nothing to save: the activation runs in registers, h goes straight to hpack
      const T* nw = next_e >= 0 ? c.w1 + next_e * 2 * I * H : nullptr;
      bf16_tiles::gemm_glu(w + j0 * H, w + (I + j0) * H, H, rows, H, xp, n, c.act, hp, I, j0,
                           nw ? nw + next_j0 * H : nullptr, nw ? nw + (I + next_j0) * H : nullptr);
      return;
    }
    thread_local std::vector<float> cg, cu, hv;
    cg.resize(rows * ld);
    cu.resize(rows * ld);
    hv.resize(rows * ld);
    bf16_tiles::gemm(w + j0 * H, H, rows, H, xp, n, cg.data(), ld);
    bf16_tiles::gemm(w + (I + j0) * H, H, rows, H, xp, n, cu.data(), ld);
    up_epilogue<T, float>(c, s0, n, j0, rows, cg.data(), cu.data(), hv.data(), 1, ld);
    // h rounded to bf16 (as the eager bf16 loop has it), packed by feature pairs; j0 is even
    for (int64_t i = 0; i < rows; i += 2) {
      const float* second = i + 1 < rows ? hv.data() + (i + 1) * ld : nullptr;
      bf16_tiles::pack_feature_pair(hv.data() + i * ld, second, n, I, j0 + i, hp);
    }
  }
}

template <typename T>
void bf16_down_task(ForwardCtx<T>& c, int64_t e, int64_t h0, int64_t h1, int64_t next_e, int64_t next_h0) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
    const int64_t rows = h1 - h0, ld = bf16_tiles::padded(n);
    thread_local std::vector<float> cy;
    cy.resize(rows * ld);
    bf16_tiles::gemm(c.w2 + e * H * I + h0 * I, I, rows, I, c.hpack.data() + c.hoff[e], n, cy.data(), ld,
                     next_e >= 0 ? c.w2 + next_e * H * I + next_h0 * I : nullptr);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = c.r.order[s0 + t];
      const float wp = c.weight(p);
      float* y = c.ypair + p * H + h0;
      for (int64_t i = 0; i < rows; ++i) y[i] = wp * cy[i * ld + t];
    }
  }
}

// bf16/fp16 experts with many tokens: ATen matmul (oneDNN) per expert, run one after another
// (each GEMM is itself parallel), the activation and the weighted scatter fused here.
template <typename T>
void aten_expert(ForwardCtx<T>& c, int64_t e, const at::Tensor& hidden, const at::Tensor& w1, const at::Tensor& w2) {
  using acc_t = typename ForwardCtx<T>::acc_t;
  const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
  std::vector<int64_t> tok(n);
  for (int64_t i = 0; i < n; ++i) tok[i] = c.token(s0 + i);
  const at::Tensor idx = at::from_blob(tok.data(), {n}, at::kLong);
  const at::Tensor xe = hidden.index_select(0, idx);
  const at::Tensor gu = at::mm(xe, w1[e].t());  // (n, 2I)
  at::Tensor he = at::empty({n, I}, hidden.options());
  const T* gup = gu.const_data_ptr<T>();
  T* hp = he.mutable_data_ptr<T>();
  cpu::parallel_task_workers(n, [&](cpu::TaskCursor& next) {
    std::vector<acc_t> buf(3 * I);
    for (int64_t i = next.next(); i >= 0; i = next.next()) {
      const T* row = gup + i * 2 * I;
      if (c.cache) std::copy(row, row + 2 * I, c.cache + c.r.order[s0 + i] * 2 * I);
      cpu::convert_n(row, buf.data(), 2 * I);
      act_mul<acc_t>(buf.data(), buf.data() + I, buf.data() + 2 * I, I, c.act);
      cpu::convert_n(buf.data() + 2 * I, hp + i * I, I);
    }
  });
  const at::Tensor ye = at::mm(he, w2[e].t());  // (n, H)
  const T* yp = ye.const_data_ptr<T>();
  cpu::parallel_tasks(n, [&](int64_t i, int64_t) {
    const int64_t p = c.r.order[s0 + i];
    acc_t* y = c.ypair + p * H;
    cpu::convert_n(yp + i * H, y, H);
    scale_n<acc_t>(y, c.weight(p), y, H);
  });
}

// How bf16/fp16 experts with many tokens multiply.
//  - kBf16Tiles: accel's bf16 tiles (bf16_tiles.h) on CPUs with AVX512-BF16 but no AMX: faster
//    than oneDNN's bf16 GEMM at Mixtral's shapes, which packs the weights on every call.
//  - kAten: oneDNN's GEMM in that dtype where it runs on AMX (bf16) or AVX512-FP16 (fp16).
//  - kWiden: the fp32 tiles on weights widened per task, everywhere else: without native support
//    oneDNN's bf16 GEMM takes a slow path, several times slower than fp32.
// ACCEL_MOE_LOWP_GEMM=tiles / aten / widen forces one (tiles only where the CPU has AVX512-BF16,
// and for bf16).
enum class LowpGemm { kBf16Tiles, kAten, kWiden };

template <typename T>
LowpGemm lowp_gemm() {
  static const LowpGemm path = [] {
    constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
    const bool tiles_ok = kBf16 && cpu::cpu_has_avx512_bf16();
    const std::string f = test_hooks::moe_lowp_gemm();
    if (f == "aten") return LowpGemm::kAten;
    if (f == "widen") return LowpGemm::kWiden;
    if (f == "tiles" && tiles_ok) return LowpGemm::kBf16Tiles;
#ifdef ACCEL_HAVE_AVX512_TARGET
    if (kBf16 && cpu::cpu_has_amx_bf16()) return LowpGemm::kAten;
    if (tiles_ok) return LowpGemm::kBf16Tiles;
    if (!kBf16 && cpu::cpu_has_avx512_fp16()) return LowpGemm::kAten;
    return LowpGemm::kWiden;
#else
    return LowpGemm::kAten;
#endif
  }();
  return path;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& hidden, const at::Tensor& w1,
                                                const at::Tensor& w2, const at::Tensor& weights,
                                                const Routing& r, const Geometry& g, Activation act,
                                                bool save_cache) {
  using acc_t = at::opmath_type<T>;
  const int64_t H = g.hidden, I = g.inter, E = g.experts, P = r.pairs;
  at::Tensor out = at::empty({g.tokens, H}, hidden.options());
  at::Tensor cache = at::empty({save_cache ? P : 0, 2 * I}, hidden.options());
  if (g.tokens == 0) return {out, cache};
  if (I == 0) {
    out.zero_();
    return {out, cache};
  }

  ForwardCtx<T> c{g, r, act, hidden.const_data_ptr<T>(), w1.const_data_ptr<T>(), w2.const_data_ptr<T>()};
  if (weights.scalar_type() == at::kFloat) {
    c.wf = weights.const_data_ptr<float>();
  } else {
    c.wt = weights.const_data_ptr<T>();
  }
  c.cache = save_cache ? cache.mutable_data_ptr<T>() : nullptr;
  Workspace<acc_t> ypair;  // every pair's row is written by its expert's down tasks
  ypair.resize(P * H);
  c.ypair = ypair.data();

  // per expert: path and buffer offsets
  constexpr bool kLowp = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
  constexpr bool kGemm = std::is_same_v<T, float> || kLowp;  // experts with many tokens run GEMMs
  const LowpGemm lowp = kLowp ? lowp_gemm<T>() : LowpGemm::kWiden;
  const Path many = !kLowp ? Path::kTiles
                    : lowp == LowpGemm::kAten ? Path::kAten
                    : lowp == LowpGemm::kBf16Tiles ? Path::kBf16Tiles
                                                   : Path::kTiles;
  const int64_t smax = kStreamMaxTokens;
  c.bf16dp = use_bf16dp<T>();
  c.path.assign(E, Path::kNone);
  c.xoff.assign(E, 0);
  c.hoff.assign(E, 0);
  int64_t xsize = 0, hsize = 0, lsize = 0, xpsize = 0, hpsize = 0;
  std::vector<int64_t> aten_experts;
  bool any_tiles = false;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = c.count(e);
    if (n == 0) continue;
    const Path path = kGemm && n > smax ? many : Path::kStream;
    c.path[e] = path;
    if (path == Path::kStream && c.bf16dp) {  // x read in place, h kept in T
      c.hoff[e] = lsize;
      lsize += n * I;
    } else if (path == Path::kStream || path == Path::kTiles) {
      const int64_t cap = path == Path::kTiles ? (n + kTileT - 1) / kTileT * kTileT : n;
      c.xoff[e] = xsize;
      c.hoff[e] = hsize;
      xsize += cap * H;
      hsize += cap * I;
      any_tiles |= path == Path::kTiles;
    } else if (path == Path::kBf16Tiles) {
      c.xoff[e] = xpsize;
      c.hoff[e] = hpsize;
      xpsize += bf16_tiles::packed_size(n, H);
      hpsize += bf16_tiles::packed_size(n, I);
    } else {
      aten_experts.push_back(e);
    }
  }
  c.xbuf.resize(xsize);
  c.hbuf.resize(hsize);
  c.hlow.resize(lsize);
  c.xpack.resize(xpsize);
  c.hpack.resize(hpsize);

  // phase 0: gather the tokens: widened rows for streaming (unless x is read in place), X^T blocks
  // for the fp32 tiles, packed panels for the bf16 tiles
  struct Task {
    int64_t e, a, b;
  };
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = c.count(e);
    switch (c.path[e]) {
      case Path::kTiles:
        for (int64_t tb = 0; tb * kTileT < n; ++tb) tasks.push_back({e, tb, 0});
        break;
      case Path::kBf16Tiles:
        for (int64_t p = 0; p < bf16_tiles::panels(n); ++p) tasks.push_back({e, p, 0});
        break;
      case Path::kStream:
        if (!c.bf16dp) tasks.push_back({e, 0, n});
        break;
      default:
        break;
    }
  }
  cpu::parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i, int64_t) {
    const Task& t = tasks[i];
    const int64_t s0 = r.offsets[t.e];
    if (c.path[t.e] == Path::kBf16Tiles) {
      bf16_pack_task<T>(c, t.e, t.a);
    } else if (c.path[t.e] == Path::kTiles) {
      const int64_t n = c.count(t.e), m0 = t.a * kTileT, nt = std::min<int64_t>(kTileT, n - m0);
      acc_t* xt = c.xbuf.data() + c.xoff[t.e] + t.a * H * kTileT;
      for (int64_t m = 0; m < nt; ++m) {
        const T* xr = c.x + c.token(s0 + m0 + m) * H;
        for (int64_t k = 0; k < H; ++k) xt[k * kTileT + m] = static_cast<acc_t>(xr[k]);
      }
    } else {
      for (int64_t m = t.a; m < t.b; ++m) {
        const T* xr = c.x + c.token(s0 + m) * H;
        acc_t* dst = c.xbuf.data() + c.xoff[t.e] + m * H;
        for (int64_t k = 0; k < H; ++k) dst[k] = static_cast<acc_t>(xr[k]);
      }
    }
  });

  // phase 1: up projections; phase 2: down projections (features split into tasks of 32)
  static_assert(kTileN == kStreamRows, "one feature split for both paths");
  auto make_tasks = [&](int64_t features) {
    tasks.clear();
    for (int64_t e = 0; e < E; ++e) {
      if (c.path[e] == Path::kNone || c.path[e] == Path::kAten) continue;
      for (int64_t f = 0; f < features; f += kTileN) tasks.push_back({e, f, std::min(features, f + kTileN)});
    }
  };
  auto run_phase = [&](bool up) {
    cpu::parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i, int64_t guess) {
      const Task& t = tasks[i];
      switch (c.path[t.e]) {
        case Path::kBf16Tiles: {
          // the likely next task's first weight rows are fetched while this task's last block runs
          const bool pf = guess >= 0 && guess < static_cast<int64_t>(tasks.size()) &&
                          c.path[tasks[guess].e] == Path::kBf16Tiles;
          const int64_t pe = pf ? tasks[guess].e : -1, pa = pf ? tasks[guess].a : 0;
          up ? bf16_up_task<T>(c, t.e, t.a, t.b, pe, pa) : bf16_down_task<T>(c, t.e, t.a, t.b, pe, pa);
          break;
        }
        case Path::kTiles:
          if constexpr (kGemm) up ? gemm_up_task<T>(c, t.e, t.a, t.b) : gemm_down_task<T>(c, t.e, t.a, t.b);
          break;
        default:
          up ? stream_up_task<T>(c, t.e, t.a, t.b) : stream_down_task<T>(c, t.e, t.a, t.b);
      }
    });
    if (any_tiles) {
      at::parallel_for(0, at::get_num_threads(), 1, [](int64_t, int64_t) {
        at::native::cpublas::brgemm_release(false);
      });
    }
  };
  make_tasks(I);
  run_phase(true);
  make_tasks(H);
  run_phase(false);
  for (const int64_t e : aten_experts) aten_expert<T>(c, e, hidden, w1, w2);

  // phase 3: combine each token's k rows, in slot order
  T* o = out.mutable_data_ptr<T>();
  const int64_t K = r.top_k;
  cpu::parallel_tasks(g.tokens, [&](int64_t t, int64_t) {
    acc_t* y = c.ypair + t * K * H;
    for (int64_t j = 1; j < K; ++j) {
      const acc_t* yj = y + j * H;
      int64_t h = 0;
      if constexpr (std::is_same_v<acc_t, float>) {
        for (; h + kV <= H; h += kV) (Vec::loadu(y + h) + Vec::loadu(yj + h)).store(y + h);
      }
      for (; h < H; ++h) y[h] += yj[h];
    }
    cpu::convert_n(y, o + t * H, H);
  });
  return {out, cache};
}

std::tuple<at::Tensor, at::Tensor> fused_moe_fwd_cpu(const at::Tensor& hidden_, const at::Tensor& w1_,
                                                     const at::Tensor& w2_, const at::Tensor& weights_,
                                                     const at::Tensor& ids, c10::string_view activation,
                                                     bool save_cache) {
  const Geometry g = check_forward(hidden_, w1_, w2_, weights_, ids);
  const Activation act = parse_activation(std::string(activation), kOp);
  const Routing r = make_routing(ids, g.experts);
  const at::Tensor hidden = hidden_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  const at::Tensor weights = weights_.contiguous();
  std::tuple<at::Tensor, at::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "fused_moe_fwd_cpu", [&] {
    res = forward_impl<scalar_t>(hidden, w1, w2, weights, r, g, act, save_cache);
  });
  return res;
}

}  // namespace
}  // namespace accel::fused_moe::moe_cpu

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("fused_moe_fwd", &accel::fused_moe::moe_cpu::fused_moe_fwd_cpu);
}
