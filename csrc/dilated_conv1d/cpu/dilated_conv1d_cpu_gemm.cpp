// The GEMM path of the CPU dilated convolution (see gemm_path.h).
//
// Forward, per task (batch, group, time tile of kTile outputs): the im2col tile
// col[(ci, k), t] = x[ci, t0 + t + k*d - pad_left] (C_in/groups * K rows, zero-padded, fp32) is
// built once in L2, then out_tile = W_group (C_out/groups x C_in/groups*K, the weight's natural
// layout) @ col in blocks of kRows output channels, accumulating onto the bias in fp32, and the
// epilogue (activation, residual, cast) runs on each block while it is hot.
// Weight gradient, per task (group, slice of (batch, tile) pairs): dW_group += dz_tile @ col_tileᵀ,
// the transposed tile built directly; slices are summed afterwards.
#include "dilated_conv1d/cpu/gemm_path.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <vector>

#include "common/cpu_vec.h"
#include "common/parallel.h"

namespace accel::dilated_conv1d::cpu {
namespace {

using at::Tensor;
using namespace accel::cpu;

constexpr int64_t kTile = 128;  // outputs per task along time
constexpr int64_t kRows = 64;   // output channels per GEMM call

inline void gemm_f32(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                     const float* a, const float* b, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c, /*is_vnni=*/false);
}

// col[(ci*K + k) * ld + t] for t < n
template <typename scalar_t>
void build_col(const scalar_t* x_group, const Geometry& g, int64_t t0, int64_t n, int64_t ld, float* col) {
  for (int64_t ci = 0; ci < g.c_in_per_group; ++ci) {
    const scalar_t* row = x_group + ci * g.length;
    for (int64_t k = 0; k < g.kernel; ++k) {
      load_padded(row, g.length, t0 + k * g.dilation - g.pad_left, n, col + (ci * g.kernel + k) * ld);
    }
  }
}

template <typename scalar_t>
void forward_gemm_impl(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                       const c10::optional<Tensor>& residual, Tensor& out, const Geometry& g, Activation act) {
  const Tensor w = weight.to(at::kFloat).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? bias->to(at::kFloat).contiguous() : Tensor();
  const Tensor res = residual.has_value() && residual->defined() ? residual->contiguous() : Tensor();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const float* wp = w.const_data_ptr<float>();
  const float* bp = has_bias ? b.const_data_ptr<float>() : nullptr;
  const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t CK = g.c_in_per_group * g.kernel, Lout = g.out_length;
  const int64_t n_tiles = (Lout + kTile - 1) / kTile;

  parallel_task_workers(g.batch * g.groups * n_tiles, [&](TaskCursor& next) {
    std::vector<float> col(CK * kTile), acc(kRows * kTile), res_buf(kTile);
    for (int64_t task = next.next(); task >= 0; task = next.next()) {
      const int64_t tile = task % n_tiles;
      const int64_t grp = (task / n_tiles) % g.groups;
      const int64_t bi = task / (n_tiles * g.groups);
      const int64_t t0 = tile * kTile, n = std::min(kTile, Lout - t0);
      build_col(xp + (bi * g.c_in + grp * g.c_in_per_group) * g.length, g, t0, n, kTile, col.data());
      for (int64_t r0 = 0; r0 < g.c_out_per_group; r0 += kRows) {
        const int64_t m = std::min(kRows, g.c_out_per_group - r0);
        const int64_t co0 = grp * g.c_out_per_group + r0;
        for (int64_t r = 0; r < m; ++r) std::fill_n(acc.data() + r * kTile, n, bp ? bp[co0 + r] : 0.f);
        gemm_f32(m, n, CK, CK, kTile, kTile, /*add_c=*/true, wp + co0 * CK, col.data(), acc.data());
        for (int64_t r = 0; r < m; ++r) {
          const int64_t off = (bi * g.c_out + co0 + r) * Lout + t0;
          const float* rr = nullptr;
          if (rp) {
            convert_n(rp + off, res_buf.data(), n);
            rr = res_buf.data();
          }
          apply_epilogue(acc.data() + r * kTile, rr, n, act);
          convert_n(acc.data() + r * kTile, op + off, n);
        }
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}

template <typename scalar_t>
void weight_grad_gemm_impl(const Tensor& dz, const Tensor& x, const Geometry& g, Tensor& grad_w, Tensor& grad_b) {
  const int64_t CK = g.c_in_per_group * g.kernel, Lout = g.out_length, Cg = g.c_out_per_group;
  const int64_t n_tiles = (Lout + kTile - 1) / kTile;
  const int64_t units = g.batch * n_tiles;
  const int64_t n_split = split_count(g.groups, units, 2);
  Tensor dw_part = at::zeros({n_split, g.c_out, CK}, x.options().dtype(at::kFloat));
  Tensor db_part = at::zeros({n_split, g.c_out}, x.options().dtype(at::kFloat));
  const scalar_t* dzp = dz.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  float* dwp = dw_part.mutable_data_ptr<float>();
  float* dbp = db_part.mutable_data_ptr<float>();

  parallel_task_workers(g.groups * n_split, [&](TaskCursor& next) {
    std::vector<float> col(CK * kTile), col_t(kTile * CK), dz_tile(Cg * kTile);
    for (int64_t task = next.next(); task >= 0; task = next.next()) {
      const int64_t grp = task % g.groups, s = task / g.groups;
      float* dw = dwp + (s * g.c_out + grp * Cg) * CK;
      float* db = dbp + s * g.c_out + grp * Cg;
      for (int64_t u = units * s / n_split; u < units * (s + 1) / n_split; ++u) {
        const int64_t bi = u / n_tiles, t0 = (u % n_tiles) * kTile, n = std::min(kTile, Lout - t0);
        build_col(xp + (bi * g.c_in + grp * g.c_in_per_group) * g.length, g, t0, n, kTile, col.data());
        for (int64_t j = 0; j < CK; ++j)
          for (int64_t t = 0; t < n; ++t) col_t[t * CK + j] = col[j * kTile + t];
        for (int64_t r = 0; r < Cg; ++r) {
          convert_n(dzp + (bi * g.c_out + grp * Cg + r) * Lout + t0, dz_tile.data() + r * kTile, n);
          db[r] += sum(dz_tile.data() + r * kTile, n);
        }
        gemm_f32(Cg, CK, n, kTile, CK, CK, /*add_c=*/true, dz_tile.data(), col_t.data(), dw);
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
  if (grad_w.defined()) grad_w.copy_(dw_part.sum(0).view(grad_w.sizes()));
  if (grad_b.defined()) grad_b.copy_(db_part.sum(0));
}

}  // namespace

bool gemm_path_applies(const Geometry& g, at::ScalarType dtype) {
  const bool dtype_ok = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  return dtype_ok && g.c_in_per_group >= 4 && g.c_out_per_group >= 4;
}

void forward_gemm(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                  const c10::optional<Tensor>& residual, Tensor& out, const Geometry& g, Activation act) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dilated_conv1d_gemm_cpu", [&] {
    forward_gemm_impl<scalar_t>(x, weight, bias, residual, out, g, act);
  });
}

void weight_grad_gemm(const Tensor& dz, const Tensor& x, const Geometry& g, Tensor& grad_w, Tensor& grad_b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dilated_conv1d_wgrad_gemm_cpu", [&] {
    weight_grad_gemm_impl<scalar_t>(dz, x, g, grad_w, grad_b);
  });
}

}  // namespace accel::dilated_conv1d::cpu
