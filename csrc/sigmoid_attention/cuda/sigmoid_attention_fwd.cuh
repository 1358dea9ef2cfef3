// Forward tensor-core kernel of sigmoid attention (fp16/bf16, sm_80+), FlashAttention-2 style,
// and its head-dim dispatch. Included by the forward kernel .cu files, each of which instantiates
// one dtype, so the 8 head-dim buckets of a (dtype, direction) build in parallel with the others.
// Warp-level GEMMs: mma.sync.m16n8k16 fed by ldmatrix (common/cuda_mma.cuh gives the layouts).
#pragma once

#include "sigmoid_attention/cuda/sigmoid_attention_common.cuh"

namespace accel::sigmoid_attention::cuda {
namespace detail {

// One CTA per (query block, head, batch[, key split]); warp w owns kMTiles * 16 consecutive query
// rows of the block. Q stays in shared memory; K and V tiles of kBlockN keys stream through one
// buffer each, overlapped as in FlashAttention-2: V_j loads while S = Q K_j^T is computed, K_{j+1}
// loads while O += P V_j is computed. P = sigmoid(scale S + bias [+ alibi]) stays in registers (the
// S accumulator layout is the A-operand layout of the next mma). No max, no sum, no rescale.
//
// Two m16 tiles per warp (kD <= 128) make every K / V fragment read from shared memory feed two
// mma instead of one: with one, the ldmatrix traffic (about 128 bytes per mma) and not the tensor
// cores bounds the loop. The O accumulator takes kMTiles * kD / 2 fp32 registers per thread (128 at
// kD = 128); kD > 128 keeps one m16 tile per warp and key tiles of 32 to stay within 255 registers.
template <int kD>
struct FwdConfig {
  static constexpr int kWarps = 4;
  static constexpr int kMTiles = kD <= 128 ? 2 : 1;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMinBlocks = kD <= 128 ? 2 : 1;
  static constexpr int kRowsPerWarp = 16 * kMTiles;
  static constexpr int kBlockM = kRowsPerWarp * kWarps;
  static constexpr int kBlockN = kD <= 128 ? 64 : 32;
  static constexpr int kPitch = kD + 8;
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kPitch * 2;
};

template <typename T, int kD>
__global__ void __launch_bounds__(FwdConfig<kD>::kThreads, FwdConfig<kD>::kMinBlocks)
    sigmoid_attention_fwd_kernel(const Params p) {
  using Cfg = FwdConfig<kD>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kPitch = Cfg::kPitch, kThreads = Cfg::kThreads;
  constexpr int kMT = Cfg::kMTiles, kRowsPerWarp = Cfg::kRowsPerWarp;
  constexpr int kTilesS = kBlockN / 8;  // n-tiles of the S accumulator (16 x kBlockN per m-tile)
  constexpr int kTilesO = kD / 8;       // n-tiles of the O accumulator (16 x kD per m-tile)

  ACCEL_DYNAMIC_SMEM(unsigned char, smem_raw);
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + kBlockM * kPitch;
  uint16_t* sV = sK + kBlockN * kPitch;

  // Heavy blocks first: with a causal mask the last query blocks see the most keys.
  const int n_m_blocks = static_cast<int>(gridDim.x) / p.num_splits;
  const int m_block = n_m_blocks - 1 - static_cast<int>(blockIdx.x) / p.num_splits;
  const int split = static_cast<int>(blockIdx.x) % p.num_splits;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqInfo s = seq_info(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= s.len_q) return;
  const int hk = h / p.group;
  const int offset = s.len_k - s.len_q;

  int n_lo, n_hi;
  key_range(p, s, offset, m0, min(m0 + kBlockM, s.len_q) - 1, n_lo, n_hi);
  int nb_lo = n_lo / kBlockN;
  int nb_hi = n_hi > n_lo ? ceil_div(n_hi, kBlockN) : nb_lo;
  if (p.num_splits > 1) {
    const int per = ceil_div(nb_hi - nb_lo, p.num_splits);
    const int first = min(nb_hi, nb_lo + split * per);
    nb_hi = min(nb_hi, first + per);
    nb_lo = first;
    if (nb_lo >= nb_hi) return;  // adds nothing to the zeroed accumulator
  }

  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                      (s.q_row0 + m0) * p.q_row_stride;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                      s.k_row0 * p.k_row_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                      s.k_row0 * p.v_row_stride;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // logits in base-2 units: sigmoid_base2 takes x * log2(e)
  const float scale2 = p.scale * kLog2e;
  const float bias2 = head_bias(p, h, s.len_k) * kLog2e;
  const bool has_alibi = p.alibi_slopes != nullptr;
  const float slope2 = alibi_slope(p, b, h) * kLog2e;
  // query row of accumulator elements 0, 1 of m-tile 0 (m-tile mi: + 16 mi; elements 2, 3: + 8)
  const int row0 = m0 + warp * kRowsPerWarp + lane / 4;
  const int col0 = (lane % 4) * 2;  // column of element 0 within an n-tile

  float acc_o[kMT][kTilesO][4];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int i = 0; i < kTilesO; ++i) acc_o[mi][i][0] = acc_o[mi][i][1] = acc_o[mi][i][2] = acc_o[mi][i][3] = 0.f;
  }

  if (nb_lo < nb_hi) {
    load_tile<kBlockM, kD, kThreads>(sQ, q, p.q_row_stride, s.len_q - m0, p.head_dim, p.vec_load, tid);
    load_tile<kBlockN, kD, kThreads>(sK, k + static_cast<int64_t>(nb_lo) * kBlockN * p.k_row_stride, p.k_row_stride,
                                     s.len_k - nb_lo * kBlockN, p.head_dim, p.vec_load, tid);
    cp_async_commit();

    // Per-lane ldmatrix addresses (bytes). A operand (Q, 16 x 16 at (0, 0) of m-tile 0): row
    // lane % 16, col 8 * (lane / 16); m-tile mi is 16 rows further down. B operand of S (K rows =
    // keys, non-transposed): matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7),
    // (keys 8-15, d 8-15) -> b0, b1 of two key n-tiles. B operand of O (V rows = keys, transposed):
    // matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15) ->
    // b0, b1 of two d n-tiles.
    const uint32_t a_q = smem_u32(sQ + (warp * kRowsPerWarp + lane % 16) * kPitch + (lane / 16) * 8);
    const uint32_t b_k = smem_u32(sK + (lane % 8 + (lane / 16) * 8) * kPitch + ((lane / 8) % 2) * 8);
    const uint32_t b_v = smem_u32(sV + (lane % 8 + ((lane / 8) % 2) * 8) * kPitch + (lane / 16) * 8);
    constexpr uint32_t kMTileBytes = 16 * kPitch * 2;

    for (int nb = nb_lo; nb < nb_hi; ++nb) {
      const int n0 = nb * kBlockN;
      cp_async_wait<0>();
      __syncthreads();  // K_nb (and Q) landed; every warp is done with V_{nb-1}
      load_tile<kBlockN, kD, kThreads>(sV, v + static_cast<int64_t>(n0) * p.v_row_stride, p.v_row_stride,
                                       s.len_k - n0, p.head_dim, p.vec_load, tid);
      cp_async_commit();

      float acc_s[kMT][kTilesS][4];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
        for (int i = 0; i < kTilesS; ++i) acc_s[mi][i][0] = acc_s[mi][i][1] = acc_s[mi][i][2] = acc_s[mi][i][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) ldmatrix_x4(a[mi], a_q + mi * kMTileBytes + kk * 32);
#pragma unroll
        for (int np = 0; np < kBlockN / 16; ++np) {
          uint32_t bf[4];
          ldmatrix_x4(bf, b_k + (np * 16 * kPitch + kk * 16) * 2);
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
            mma_m16n8k16<T>(acc_s[mi][2 * np], a[mi], bf[0], bf[1]);
            mma_m16n8k16<T>(acc_s[mi][2 * np + 1], a[mi], bf[2], bf[3]);
          }
        }
      }

      if (has_alibi || tile_needs_mask(p, s, offset, m0, kBlockM, n0, kBlockN)) {
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            // the keys row i may see, as offsets from this lane's first column: [lo, hi)
            const int i = row0 + mi * 16 + half * 8;
            int lo, hi;
            row_key_range(p, s, offset, i, lo, hi);
            const int c0 = n0 + col0, pos = i + offset;
#pragma unroll
            for (int nt = 0; nt < kTilesS; ++nt) {
#pragma unroll
              for (int x = 0; x < 2; ++x) {
                const int j = c0 + nt * 8 + x;
                float& a = acc_s[mi][nt][half * 2 + x];
                const float t = fmaf(a, scale2, bias2) - slope2 * static_cast<float>(abs(j - pos));
                a = (j >= lo && j < hi) ? sigmoid_base2(t) : 0.f;
              }
            }
          }
        }
      } else {
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
          for (int nt = 0; nt < kTilesS; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[mi][nt][e] = sigmoid_base2(fmaf(acc_s[mi][nt][e], scale2, bias2));
          }
        }
      }
      // C layout of key n-tiles 2t, 2t + 1 == A layout of the 16-key k-step t.
      uint32_t a_p[kMT][kBlockN / 16][4];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
        for (int t = 0; t < kBlockN / 16; ++t) {
          a_p[mi][t][0] = pack2<T>(acc_s[mi][2 * t][0], acc_s[mi][2 * t][1]);
          a_p[mi][t][1] = pack2<T>(acc_s[mi][2 * t][2], acc_s[mi][2 * t][3]);
          a_p[mi][t][2] = pack2<T>(acc_s[mi][2 * t + 1][0], acc_s[mi][2 * t + 1][1]);
          a_p[mi][t][3] = pack2<T>(acc_s[mi][2 * t + 1][2], acc_s[mi][2 * t + 1][3]);
        }
      }

      cp_async_wait<0>();
      __syncthreads();  // V_nb landed; every warp is done with K_nb
      if (nb + 1 < nb_hi) {
        const int n1 = n0 + kBlockN;
        load_tile<kBlockN, kD, kThreads>(sK, k + static_cast<int64_t>(n1) * p.k_row_stride, p.k_row_stride,
                                         s.len_k - n1, p.head_dim, p.vec_load, tid);
        cp_async_commit();
      }
#pragma unroll
      for (int t = 0; t < kBlockN / 16; ++t) {
#pragma unroll
        for (int dp = 0; dp < kD / 16; ++dp) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, b_v + (t * 16 * kPitch + dp * 16) * 2);
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
            mma_m16n8k16<T>(acc_o[mi][2 * dp], a_p[mi][t], bf[0], bf[1]);
            mma_m16n8k16<T>(acc_o[mi][2 * dp + 1], a_p[mi][t], bf[2], bf[3]);
          }
        }
      }
    }
  }

  if (p.o_accum != nullptr) {  // split-KV: add this part of the key range
    float* o = p.o_accum + b * p.o_batch_stride + h * p.o_head_stride + s.q_row0 * p.o_row_stride;
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int nt = 0; nt < kTilesO; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = row0 + mi * 16 + (e / 2) * 8, d = nt * 8 + col0 + (e % 2);
          if (i < s.len_q && d < p.head_dim) atomicAdd(o + i * p.o_row_stride + d, acc_o[mi][nt][e]);
        }
      }
    }
    return;
  }

  // Stage the warp's output rows in its own rows of sQ (no other warp reads them), then store
  // whole 16-byte chunks.
  uint16_t* sO = sQ + warp * kRowsPerWarp * kPitch;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int nt = 0; nt < kTilesO; ++nt) {
      uint16_t* dst = sO + (mi * 16 + lane / 4) * kPitch + nt * 8 + col0;
      *reinterpret_cast<uint32_t*>(dst) = pack2<T>(acc_o[mi][nt][0], acc_o[mi][nt][1]);
      *reinterpret_cast<uint32_t*>(dst + 8 * kPitch) = pack2<T>(acc_o[mi][nt][2], acc_o[mi][nt][3]);
    }
  }
  __syncwarp();
  const int first_row = m0 + warp * kRowsPerWarp;
  uint16_t* o = static_cast<uint16_t*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride +
                (s.q_row0 + first_row) * p.o_row_stride;
  store_tile<kRowsPerWarp, kD, 32>(o, p.o_row_stride, sO, s.len_q - first_row, p.head_dim, p.vec_store, lane);
}

template <typename T, int kD>
cudaError_t launch_fwd(const Params& p, cudaStream_t stream) {
  using Cfg = FwdConfig<kD>;
  auto kernel = &sigmoid_attention_fwd_kernel<T, kD>;
  if (Cfg::kSmemBytes > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
    if (e != cudaSuccess) return e;
  }
  const int n_m_blocks = ceil_div(p.max_len_q, Cfg::kBlockM);
  const dim3 grid(static_cast<unsigned>(n_m_blocks * p.num_splits), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  ACCEL_LAUNCH(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p);
  return cudaGetLastError();
}

// The only place the forward's head-dim buckets are instantiated (one dtype per file).
template <typename T>
cudaError_t dispatch_fwd(const Params& p, cudaStream_t stream) {
  switch (head_dim_bucket(p.head_dim)) {
    case 32: return launch_fwd<T, 32>(p, stream);
    case 64: return launch_fwd<T, 64>(p, stream);
    case 96: return launch_fwd<T, 96>(p, stream);
    case 128: return launch_fwd<T, 128>(p, stream);
    case 160: return launch_fwd<T, 160>(p, stream);
    case 192: return launch_fwd<T, 192>(p, stream);
    case 224: return launch_fwd<T, 224>(p, stream);
    case 256: return launch_fwd<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace detail
}  // namespace accel::sigmoid_attention::cuda
