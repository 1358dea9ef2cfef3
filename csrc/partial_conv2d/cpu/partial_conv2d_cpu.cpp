// CPU kernels of accel::partial_conv2d (and partial_conv2d_, in place).
//
// Forward: a task is a band of rows of one image. Its input rows (the Cp convolved channels, one
// halo row above and below) are loaded once into a zero-padded buffer in the accumulation type,
// then every output row is computed from it (the columns or, for narrow rows, the output channels
// in the vector lanes) and written straight into the output; the other channels are copied (or
// scaled and shifted per plane) in one pass.
// Backward: grad_x is the same convolution of grad_out with the weights transposed and flipped
// (the other channels pass through, times the scale); grad_w and grad_b are sums over fixed ranges
// of bands, added in order; the scale's and shift's are per-plane sums (untouched_sums.cpp).
// Compute-bound calls (many channels) hand the 3x3 convolution to ATen (oneDNN).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "common/parallel.h"
#include "partial_conv2d/cpu/untouched_sums.h"
#include "partial_conv2d/partial_conv2d.h"

namespace accel::partial_conv2d {
namespace {

using at::Tensor;
using namespace accel::cpu;

constexpr int64_t kCoBlock = 4;                 // output channels per pass: 4 x 2 accumulators fit the registers
constexpr int64_t kTasksPerThread = 4;          // bands per thread, at least, where rows allow
constexpr int64_t kBandBytes = 128 * 1024;      // a band's padded input rows stay within L2
// From this many convolved channels the 3x3 convolution is compute-bound and runs through ATen's
// (oneDNN's) convolution into a temporary; below, accel's kernels write it straight into the output.
// bf16 on a CPU with bf16 dot products (AVX512-BF16, AMX): oneDNN's run at twice accel's widened
// fp32 rate, so from fewer channels once a call has enough work to amortise its setup.
constexpr int64_t kLibraryMinChannels = 64;
constexpr int64_t kLibraryMinChannelsBf16Dot = 16;
constexpr int64_t kLibraryMinMacsBf16Dot = int64_t(1) << 24;

bool library_conv(const Tensor& x, int64_t cp) {
  if (x.scalar_type() == at::kBFloat16 && cpu::cpu_has_avx512_bf16()) {
    const int64_t macs = x.size(0) * x.size(2) * x.size(3) * cp * cp * 9;
    if (cp >= kLibraryMinChannelsBf16Dot && macs >= kLibraryMinMacsBf16Dot) return true;
  }
  return cp >= kLibraryMinChannels;
}

// The dtype ATen's convolution runs in: bf16 without bf16 dot products is widened to fp32 (oneDNN's
// bf16 path there converts per element: about 30x slower than its fp32 one on an AVX2 Zen 3, B32
// C320 7x7).
at::ScalarType library_type(const Tensor& x) {
  return x.scalar_type() == at::kBFloat16 && !cpu::cpu_has_avx512_bf16() ? at::kFloat : x.scalar_type();
}

// ATen's 3x3 convolution of in[:, :cp] (stride 1, padding 1), in library_type(in).
Tensor library_conv2d(const Tensor& in, const Tensor& weight, const OptTensor& bias, int64_t cp) {
  const auto t = library_type(in);
  const OptTensor b = given(bias) ? OptTensor(bias->to(t)) : std::nullopt;
  return at::conv2d(in.narrow(1, 0, cp).to(t), weight.to(t), b, 1, 1);
}

// Element (b, c, y, x) of a 4-D tensor at p + b*sb + c*sc + y*sh + x*sw.
template <typename T>
struct View {
  T* p;
  int64_t sb, sc, sh, sw;
  explicit View(const Tensor& t)
      : p(const_cast<T*>(t.const_data_ptr<T>())), sb(t.stride(0)), sc(t.stride(1)), sh(t.stride(2)), sw(t.stride(3)) {}
  T* row(int64_t b, int64_t c, int64_t y) const { return p + b * sb + c * sc + y * sh; }
};

struct Band {
  int64_t rows_per_band, bands;  // per image
  int64_t ld;                    // padded row length: a zero column each side, whole vector pairs
};

template <typename acc_t>
Band plan_bands(int64_t B, int64_t H, int64_t W, int64_t cp) {
  constexpr int64_t V2 = 2 * Vectorized<acc_t>::size();
  const int64_t ld = (W + V2 - 1) / V2 * V2 + V2;
  const int64_t want = std::clamp<int64_t>((kTasksPerThread * at::get_num_threads() + B - 1) / std::max<int64_t>(B, 1),
                                           1, std::max<int64_t>(H, 1));
  const int64_t fit = std::max<int64_t>(1, kBandBytes / (cp * ld * static_cast<int64_t>(sizeof(acc_t))) - 2);
  const int64_t rows = std::max<int64_t>(1, std::min((H + want - 1) / want, fit));
  return {rows, (H + rows - 1) / rows, ld};
}

// pad[(ci * (n + 2) + r) * ld + 1 + x] = in(b, ci, y0 - 1 + r, x) as acc_t for ci < cp, r < n + 2,
// x < W; zero for the columns around the row and the rows outside the image.
template <typename scalar_t, typename acc_t>
void load_band(const View<const scalar_t>& in, int64_t b, int64_t cp, int64_t H, int64_t W, int64_t y0, int64_t n,
               int64_t ld, acc_t* pad) {
  for (int64_t ci = 0; ci < cp; ++ci) {
    for (int64_t r = 0; r < n + 2; ++r) {
      acc_t* dst = pad + (ci * (n + 2) + r) * ld;
      const int64_t y = y0 - 1 + r;
      if (y < 0 || y >= H) {
        std::fill_n(dst, ld, acc_t(0));
        continue;
      }
      dst[0] = acc_t(0);
      const scalar_t* src = in.row(b, ci, y);
      if (in.sw == 1) {
        convert_n(src, dst + 1, W);
      } else {
        for (int64_t x = 0; x < W; ++x) dst[1 + x] = static_cast<acc_t>(src[x * in.sw]);
      }
      std::fill(dst + 1 + W, dst + ld, acc_t(0));
    }
  }
}

// acc[cb * ldo + x] = bias[co0 + cb] + sum_{ci, kh, kw} wt[(ci * 9 + kh * 3 + kw) * cout + co0 + cb]
//                     * pad[(ci * rows + r + kh) * ld + x + kw]
// for cb < kCB and x < W (rounded up to a vector pair): output row r of a band of `rows` padded rows.
template <int kCB, typename acc_t>
void conv_row(const acc_t* pad, int64_t ld, int64_t rows, int64_t r, int64_t cin, const acc_t* wt, int64_t cout,
              int64_t co0, const acc_t* bias, int64_t W, acc_t* acc, int64_t ldo) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for (int64_t x = 0; x < W; x += 2 * V) {
    Vec a[kCB][2];
    for (int cb = 0; cb < kCB; ++cb) a[cb][0] = a[cb][1] = Vec(bias ? bias[co0 + cb] : acc_t(0));
    for (int64_t ci = 0; ci < cin; ++ci) {
      for (int64_t kh = 0; kh < 3; ++kh) {
        const acc_t* src = pad + (ci * rows + r + kh) * ld + x;
        const acc_t* w = wt + (ci * 9 + kh * 3) * cout + co0;
        for (int64_t kw = 0; kw < 3; ++kw, w += cout) {
          const Vec i0 = Vec::loadu(src + kw), i1 = Vec::loadu(src + kw + V);
          for (int cb = 0; cb < kCB; ++cb) {
            const Vec wv(w[cb]);
            a[cb][0] = at::vec::fmadd(wv, i0, a[cb][0]);
            a[cb][1] = at::vec::fmadd(wv, i1, a[cb][1]);
          }
        }
      }
    }
    for (int cb = 0; cb < kCB; ++cb) {
      a[cb][0].store(acc + cb * ldo + x);
      a[cb][1].store(acc + cb * ldo + x + V);
    }
  }
}

// The same outputs with the output channels in the vector lanes (for narrow rows, where the columns
// would leave most lanes idle): acc[x * ldc + co] for x < W (rounded up to kPix), co < cout (rounded
// up to a vector pair; wt's rows are padded with zeros to ldc).
template <typename acc_t>
void conv_row_co(const acc_t* pad, int64_t ld, int64_t rows, int64_t r, int64_t cin, const acc_t* wt, int64_t ldc,
                 const acc_t* bias, int64_t W, acc_t* acc) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size(), kPix = 4;
  for (int64_t co = 0; co < ldc; co += 2 * V) {
    for (int64_t x = 0; x < W; x += kPix) {
      Vec a[kPix][2];
      const Vec b0 = bias ? Vec::loadu(bias + co) : Vec(acc_t(0)), b1 = bias ? Vec::loadu(bias + co + V) : Vec(acc_t(0));
      for (int64_t p = 0; p < kPix; ++p) a[p][0] = b0, a[p][1] = b1;
      for (int64_t ci = 0; ci < cin; ++ci) {
        for (int64_t kh = 0; kh < 3; ++kh) {
          const acc_t* src = pad + (ci * rows + r + kh) * ld + x;
          const acc_t* w = wt + (ci * 9 + kh * 3) * ldc + co;
          for (int64_t kw = 0; kw < 3; ++kw, w += ldc) {
            const Vec w0 = Vec::loadu(w), w1 = Vec::loadu(w + V);
            for (int64_t p = 0; p < kPix; ++p) {
              const Vec in(src[p + kw]);
              a[p][0] = at::vec::fmadd(w0, in, a[p][0]);
              a[p][1] = at::vec::fmadd(w1, in, a[p][1]);
            }
          }
        }
      }
      for (int64_t p = 0; p < kPix; ++p) {
        a[p][0].store(acc + (x + p) * ldc + co);
        a[p][1].store(acc + (x + p) * ldc + co + V);
      }
    }
  }
}

// Whether conv_row_co keeps more lanes busy than conv_row for rows of W samples and cout channels.
template <typename acc_t>
bool channels_in_lanes(int64_t W, int64_t cout) {
  constexpr int64_t V2 = 2 * Vectorized<acc_t>::size();
  const double cols = double(W) / double((W + V2 - 1) / V2 * V2);
  const double chans = double(cout) / double((cout + V2 - 1) / V2 * V2) * double(W) / double((W + 3) / 4 * 4);
  return chans > cols;
}

// The convolved channels [0, cout) of `out` from channels [0, cin) of `in` (both (B, *, H, W),
// any strides), with wt arranged as conv_row reads it. Channels >= cout of out are not touched.
template <typename scalar_t>
void conv3x3_into(const Tensor& in, int64_t cin, const std::vector<at::opmath_type<scalar_t>>& wt, int64_t cout,
                  const at::opmath_type<scalar_t>* bias, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.size(0), H = in.size(2), W = in.size(3);
  if (B == 0 || H == 0 || W == 0 || cout == 0) return;
  const Band band = plan_bands<acc_t>(B, H, W, cin);
  const View<const scalar_t> src(in);
  const View<scalar_t> dst(out);
  const int64_t ldo = band.ld;
  const bool co_lanes = channels_in_lanes<acc_t>(W, cout);
  constexpr int64_t V2 = 2 * Vectorized<acc_t>::size();
  const int64_t ldc = (cout + V2 - 1) / V2 * V2;
  std::vector<acc_t> wtc, biasc;  // co_lanes: the weights (and bias) with rows padded to ldc
  if (co_lanes) {
    wtc.assign(cin * 9 * ldc, acc_t(0));
    for (int64_t i = 0; i < cin * 9; ++i) std::copy_n(wt.data() + i * cout, cout, wtc.data() + i * ldc);
    if (bias) {
      biasc.assign(ldc, acc_t(0));
      std::copy_n(bias, cout, biasc.data());
    }
  }
  parallel_task_workers(B * band.bands, [&](TaskCursor& cursor) {
    std::vector<acc_t> pad(cin * (band.rows_per_band + 2) * band.ld);
    std::vector<acc_t> acc(co_lanes ? (W + 3) / 4 * 4 * ldc : kCoBlock * ldo);
    for (int64_t task = cursor.next(); task >= 0; task = cursor.next()) {
      const int64_t b = task / band.bands, y0 = (task % band.bands) * band.rows_per_band;
      const int64_t n = std::min(band.rows_per_band, H - y0);
      load_band(src, b, cin, H, W, y0, n, band.ld, pad.data());
      if (co_lanes) {
        for (int64_t r = 0; r < n; ++r) {
          conv_row_co(pad.data(), band.ld, n + 2, r, cin, wtc.data(), ldc, bias ? biasc.data() : nullptr, W,
                      acc.data());
          for (int64_t co = 0; co < cout; ++co) {
            scalar_t* row = dst.row(b, co, y0 + r);
            for (int64_t x = 0; x < W; ++x) row[x * dst.sw] = static_cast<scalar_t>(acc[x * ldc + co]);
          }
        }
        continue;
      }
      for (int64_t co0 = 0; co0 < cout; co0 += kCoBlock) {
        const int64_t m = std::min(kCoBlock, cout - co0);
        for (int64_t r = 0; r < n; ++r) {
          switch (m) {
            case 4: conv_row<4>(pad.data(), band.ld, n + 2, r, cin, wt.data(), cout, co0, bias, W, acc.data(), ldo); break;
            case 3: conv_row<3>(pad.data(), band.ld, n + 2, r, cin, wt.data(), cout, co0, bias, W, acc.data(), ldo); break;
            case 2: conv_row<2>(pad.data(), band.ld, n + 2, r, cin, wt.data(), cout, co0, bias, W, acc.data(), ldo); break;
            default: conv_row<1>(pad.data(), band.ld, n + 2, r, cin, wt.data(), cout, co0, bias, W, acc.data(), ldo);
          }
          for (int64_t cb = 0; cb < m; ++cb) {
            scalar_t* row = dst.row(b, co0 + cb, y0 + r);
            const acc_t* a = acc.data() + cb * ldo;
            if (dst.sw == 1) {
              convert_n(a, row, W);
            } else {
              for (int64_t x = 0; x < W; ++x) row[x * dst.sw] = static_cast<scalar_t>(a[x]);
            }
          }
        }
      }
    }
  });
}

// The weights as conv_row reads them: wt[(ci * 9 + k) * cout + co] = w(co, ci, k) for the forward,
// w(ci, co, 8 - k) for grad_x (the transposed convolution: transposed and flipped).
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> arrange_weight(const Tensor& weight, bool transposed) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor w = weight.contiguous();
  const int64_t cp = w.size(0);
  const scalar_t* p = w.const_data_ptr<scalar_t>();
  std::vector<acc_t> wt(cp * cp * 9);
  for (int64_t co = 0; co < cp; ++co) {
    for (int64_t ci = 0; ci < cp; ++ci) {
      for (int64_t k = 0; k < 9; ++k) {
        const scalar_t v = transposed ? p[(ci * cp + co) * 9 + 8 - k] : p[(co * cp + ci) * 9 + k];
        wt[(ci * 9 + k) * cp + co] = static_cast<acc_t>(v);
      }
    }
  }
  return wt;
}


Tensor partial_conv2d_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t dim_conv,
                          const OptTensor& scale, const OptTensor& shift) {
  const Geometry g = check_forward(x, weight, bias, dim_conv, scale, shift);
  check_cpu_dtype(kOp, x);
  Tensor out = empty_like_output(x);
  if (out.numel() == 0) return out;
  untouched_into(x, g.cp, scale, shift, out);
  if (library_conv(x, g.cp)) {
    out.narrow(1, 0, g.cp).copy_(library_conv2d(x, weight, bias, g.cp));
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "partial_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> wt = arrange_weight<scalar_t>(weight, false);
    std::vector<acc_t> b;
    if (bias.has_value() && bias->defined()) {
      const Tensor bc = bias->contiguous();
      b.resize(g.cp);
      convert_n(bc.const_data_ptr<scalar_t>(), b.data(), g.cp);
    }
    conv3x3_into<scalar_t>(x, g.cp, wt, g.cp, b.empty() ? nullptr : b.data(), out);
  });
  return out;
}

// In place: the convolution of x's first Cp channels goes to a (B, Cp, H, W) temporary (the bands
// read halo rows that a neighbouring band would already have overwritten), then over them.
void partial_conv2d_inplace_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t dim_conv,
                                const OptTensor& scale, const OptTensor& shift) {
  const Geometry g = check_inplace(x, weight, bias, dim_conv, scale, shift);
  check_cpu_dtype(kOp, x);
  if (x.numel() == 0) return;
  if (given(scale) || given(shift)) untouched_into(x, g.cp, scale, shift, x);
  const Tensor conv = x.narrow(1, 0, g.cp);
  if (library_conv(x, g.cp)) {
    conv.copy_(library_conv2d(x, weight, bias, g.cp));
    return;
  }
  Tensor tmp = at::empty({g.batch, g.cp, g.height, g.width}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "partial_conv2d_inplace_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> b;
    if (bias.has_value() && bias->defined()) {
      const Tensor bc = bias->contiguous();
      b.resize(g.cp);
      convert_n(bc.const_data_ptr<scalar_t>(), b.data(), g.cp);
    }
    conv3x3_into<scalar_t>(x, g.cp, arrange_weight<scalar_t>(weight, false), g.cp, b.empty() ? nullptr : b.data(), tmp);
  });
  conv.copy_(tmp);
}

// sum[co * J + j] += sum_p g[co * P + p] * col[p * J + j] for co < cp, j < J: kM output channels at a
// time over two vectors of j, then one (a fixed order of additions: the same result on every call).
template <int kM, typename acc_t>
void grad_gemm_block(const acc_t* g, const acc_t* col, int64_t P, int64_t J, acc_t* sum) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t j = 0;
  for (; j + 2 * V <= J; j += 2 * V) {
    Vec a[kM][2];
    for (int m = 0; m < kM; ++m) a[m][0] = a[m][1] = Vec(acc_t(0));
    for (int64_t p = 0; p < P; ++p) {
      const Vec c0 = Vec::loadu(col + p * J + j), c1 = Vec::loadu(col + p * J + j + V);
      for (int m = 0; m < kM; ++m) {
        const Vec gv(g[m * P + p]);
        a[m][0] = at::vec::fmadd(gv, c0, a[m][0]);
        a[m][1] = at::vec::fmadd(gv, c1, a[m][1]);
      }
    }
    for (int m = 0; m < kM; ++m) {
      (Vec::loadu(sum + m * J + j) + a[m][0]).store(sum + m * J + j);
      (Vec::loadu(sum + m * J + j + V) + a[m][1]).store(sum + m * J + j + V);
    }
  }
  for (; j + V <= J; j += V) {
    Vec a[kM];
    for (int m = 0; m < kM; ++m) a[m] = Vec(acc_t(0));
    for (int64_t p = 0; p < P; ++p) {
      const Vec c0 = Vec::loadu(col + p * J + j);
      for (int m = 0; m < kM; ++m) a[m] = at::vec::fmadd(Vec(g[m * P + p]), c0, a[m]);
    }
    for (int m = 0; m < kM; ++m) (Vec::loadu(sum + m * J + j) + a[m]).store(sum + m * J + j);
  }
  for (; j < J; ++j) {
    for (int m = 0; m < kM; ++m) {
      acc_t z = 0;
      for (int64_t p = 0; p < P; ++p) z += g[m * P + p] * col[p * J + j];
      sum[m * J + j] += z;
    }
  }
}

template <int kM, typename acc_t>
void grad_gemm(const acc_t* g, const acc_t* col, int64_t cp, int64_t P, int64_t J, acc_t* sum) {
  int64_t co = 0;
  for (; co + kM <= cp; co += kM) grad_gemm_block<kM>(g + co * P, col, P, J, sum + co * J);
  for (; co < cp; ++co) grad_gemm_block<1>(g + co * P, col, P, J, sum + co * J);
}

// grad_w[co, ci, k] (and grad_b[co]) summed over every band, in a fixed order.
template <typename scalar_t>
void weight_grad(const Tensor& grad_out, const Tensor& x, int64_t cp, bool want_bias, Tensor& grad_w,
                 Tensor& grad_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  const Band band = plan_bands<acc_t>(B, H, W, cp);
  const View<const scalar_t> xs(x), gs(grad_out);
  // Slot s sums the bands [s * tasks / slots, (s + 1) * tasks / slots) in order, and the slots are
  // added in order: the same gradients on every call (gradcheck asks for that), for a thread count.
  const int64_t tasks = B * band.bands, slots = std::max<int64_t>(1, std::min<int64_t>(tasks, at::get_num_threads()));
  const int64_t per_slot = cp * (cp * 9 + 1);  // (cp, cp*9) then (cp,)
  const bool want_weight = grad_w.defined();
  std::vector<acc_t> partial(slots * per_slot, acc_t(0));
  auto sum_slot = [&](int64_t slot) {
    acc_t* sum = partial.data() + slot * per_slot;
    std::vector<acc_t> pad(cp * (band.rows_per_band + 2) * band.ld), g(cp * band.rows_per_band * W),
        col(band.rows_per_band * W * cp * 9);
    for (int64_t task = slot * tasks / slots; task < (slot + 1) * tasks / slots; ++task) {
      const int64_t b = task / band.bands, y0 = (task % band.bands) * band.rows_per_band;
      const int64_t n = std::min(band.rows_per_band, H - y0);
      if (want_weight) load_band(xs, b, cp, H, W, y0, n, band.ld, pad.data());
      for (int64_t co = 0; co < cp; ++co) {
        for (int64_t r = 0; r < n; ++r) {
          const scalar_t* src = gs.row(b, co, y0 + r);
          acc_t* dst = g.data() + co * n * W + r * W;
          if (gs.sw == 1) {
            convert_n(src, dst, W);
          } else {
            for (int64_t xx = 0; xx < W; ++xx) dst[xx] = static_cast<acc_t>(src[xx * gs.sw]);
          }
        }
      }
      // sum(co, ci*9 + k) += g(co, pixel) @ col(pixel, ci*9 + k): the band's input taps unrolled
      // (im2col), one product per band into this slot's sums
      const int64_t pixels = n * W;
      for (int64_t r = 0; r < n && want_weight; ++r) {
        for (int64_t xx = 0; xx < W; ++xx) {
          acc_t* c = col.data() + (r * W + xx) * cp * 9;
          for (int64_t ci = 0; ci < cp; ++ci) {
            const acc_t* pr = pad.data() + (ci * (n + 2) + r) * band.ld + xx;
            for (int64_t k = 0; k < 9; ++k) c[ci * 9 + k] = pr[(k / 3) * band.ld + k % 3];
          }
        }
      }
      if (want_weight) grad_gemm<4>(g.data(), col.data(), cp, pixels, cp * 9, sum);  // 4 output channels a pass
      if (want_bias) {
        for (int64_t co = 0; co < cp; ++co) sum[cp * cp * 9 + co] += cpu::sum(g.data() + co * pixels, pixels);
      }
    }
  };
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t slot = s0; slot < s1; ++slot) sum_slot(slot);
  });
  std::vector<acc_t> total(per_slot, acc_t(0));
  for (int64_t w = 0; w < slots; ++w) {
    const acc_t* p = partial.data() + w * total.size();
    for (size_t i = 0; i < total.size(); ++i) total[i] += p[i];
  }
  if (want_weight) convert_n(total.data(), grad_w.mutable_data_ptr<scalar_t>(), cp * cp * 9);
  if (want_bias) convert_n(total.data() + cp * cp * 9, grad_b.mutable_data_ptr<scalar_t>(), cp);
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

Grads partial_conv2d_backward_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                  int64_t dim_conv, const OptTensor& scale, const OptTensor& shift,
                                  std::array<bool, 5> mask) {
  const Geometry g = check_backward(grad_out, x, weight, bias, dim_conv, scale, shift);
  check_cpu_dtype(kOp, x);
  const bool has_bias = bias.has_value() && bias->defined();
  Tensor grad_x = mask[0] ? empty_like_output(x) : at::empty({0}, x.options());
  Tensor grad_w = mask[1] ? at::empty(weight.sizes(), weight.options()) : at::empty({0}, x.options());
  Tensor grad_b = mask[2] && has_bias ? at::empty({g.cp}, weight.options()) : at::empty({0}, x.options());
  Tensor grad_scale = at::empty({0}, x.options()), grad_shift = at::empty({0}, x.options());
  const bool want_scale = mask[3] && given(scale), want_shift = mask[4] && given(shift);
  if (want_scale || want_shift) {  // per-plane sums of grad_out * x and grad_out over the untouched channels
    const auto acc = x.options().dtype(at::toOpMathType(x.scalar_type()));
    Tensor sum_gx = at::empty({g.batch, g.channels - g.cp}, acc), sum_g = at::empty_like(sum_gx);
    if (x.numel() > 0) {
      untouched_sums_cpu(grad_out, x, g.cp, sum_gx, sum_g);
    } else {
      sum_gx.zero_(), sum_g.zero_();
    }
    if (want_scale) grad_scale = sum_gx.to(x.scalar_type());
    if (want_shift) grad_shift = sum_g.to(x.scalar_type());
  }
  if (mask[0] && grad_x.numel() > 0) untouched_into(grad_out, g.cp, scale, std::nullopt, grad_x);
  const bool empty = x.numel() == 0;
  if (empty) {  // nothing to sum over
    if (mask[1]) grad_w.zero_();
    if (grad_b.numel() > 0) grad_b.zero_();
  }
  if (library_conv(x, g.cp) && !empty) {
    const std::optional<at::IntArrayRef> bias_sizes =
        has_bias ? std::optional<at::IntArrayRef>(bias->sizes()) : std::nullopt;
    const auto t = library_type(x);
    auto [gx, gw, gb] = at::convolution_backward(grad_out.narrow(1, 0, g.cp).to(t), x.narrow(1, 0, g.cp).to(t),
                                                 weight.to(t), bias_sizes, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1,
                                                 {mask[0], mask[1], mask[2] && has_bias});
    if (mask[0]) grad_x.narrow(1, 0, g.cp).copy_(gx);
    if (mask[1]) grad_w.copy_(gw);
    if (grad_b.numel() > 0) grad_b.copy_(gb);
    return {grad_x, grad_w, grad_b, grad_scale, grad_shift};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "partial_conv2d_backward_cpu", [&] {
    if (mask[0] && !empty) {
      conv3x3_into<scalar_t>(grad_out, g.cp, arrange_weight<scalar_t>(weight, true), g.cp, nullptr, grad_x);
    }
    if ((mask[1] || grad_b.numel() > 0) && !empty) {
      Tensor none;
      weight_grad<scalar_t>(grad_out, x, g.cp, grad_b.numel() > 0, mask[1] ? grad_w : none, grad_b);
    }
  });
  return {grad_x, grad_w, grad_b, grad_scale, grad_shift};
}

}  // namespace
}  // namespace accel::partial_conv2d

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("partial_conv2d", &accel::partial_conv2d::partial_conv2d_cpu);
  m.impl("partial_conv2d_backward", &accel::partial_conv2d::partial_conv2d_backward_cpu);
  m.impl("partial_conv2d_", &accel::partial_conv2d::partial_conv2d_inplace_cpu);
}
