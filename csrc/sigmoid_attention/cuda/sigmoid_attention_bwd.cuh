// Backward tensor-core kernel of sigmoid attention (fp16/bf16, sm_80+) and its head-dim dispatch.
// Included by the backward kernel .cu files, each of which instantiates one dtype.
// Warp-level GEMMs: mma.sync.m16n8k16 fed by ldmatrix (common/cuda_mma.cuh gives the layouts).
#pragma once

#include "sigmoid_attention/cuda/sigmoid_attention_common.cuh"

namespace accel::sigmoid_attention::cuda {
namespace detail {

// One CTA per (key block of 64, kv head, batch), 8 warps. K and V of the block stay in shared
// memory; the CTA loops over the query heads of its GQA group and over the query blocks that can
// see its keys (so dK, dV of a kv head sum over its query heads without races), with Q and dO
// double buffered (the next block loads during the current one). Per query block:
//   A: S^T = K Q^T, dP^T = V dO^T (warp: 16 keys x kBlockM/2 queries), P^T = sigmoid(...) masked,
//      dS^T = dP^T * P^T * (1 - P^T) -- no rowsum(dO * O) term: sigmoid is elementwise.
//      P^T, dS^T go to shared memory in the input dtype.
//   B: dV += P^T dO, dK += dS^T Q (warp: 16 keys x kD/2 dims, fp32 registers for the whole loop).
//   C: dQ += scale dS K (warp: 16 queries x kD/(8 / (kBlockM/16)) dims), added with fp32 atomics
//      into a zeroed buffer that the host converts afterwards.
// Why atomics for dQ rather than a separate dQ kernel: a dQ kernel would recompute S and dP (two
// more GEMMs, 7 instead of 5 per tile pair); the atomics are fire-and-forget RED.F32 into L2, one
// per dQ element per (query block, key block) pair, which costs less than those GEMMs. The price
// is a run-to-run nondeterministic summation order of dQ (dK and dV are deterministic).
template <int kD>
struct BwdConfig {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockN = 64;                   // keys per CTA: 4 warp rows of 16
  static constexpr int kBlockM = kD <= 128 ? 64 : 32;  // queries per step (shared memory bound)
  static constexpr int kPitch = kD + 8;
  static constexpr int kPitchP = kBlockM + 8;  // P^T / dS^T tiles: 16 bytes times an odd number
  static constexpr int kAQ = kBlockM / 2;      // phase A: queries per warp
  static constexpr int kCQGroups = kBlockM / 16;
  static constexpr int kCD = kD / (kWarps / kCQGroups);  // phase C: dims per warp (a multiple of 8)
  static constexpr int kSmemBytes = (4 * kBlockM * kPitch + 2 * kBlockN * kPitch + 2 * kBlockN * kPitchP) * 2;
  static_assert(kCD % 8 == 0 && kAQ % 16 == 0 && kD % 32 == 0, "tile shape");
};

template <typename T, int kD>
__global__ void __launch_bounds__(BwdConfig<kD>::kThreads, 1) sigmoid_attention_bwd_kernel(const Params p) {
  using Cfg = BwdConfig<kD>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kPitch = Cfg::kPitch, kPitchP = Cfg::kPitchP;
  constexpr int kThreads = Cfg::kThreads, kAQ = Cfg::kAQ, kCQGroups = Cfg::kCQGroups, kCD = Cfg::kCD;
  constexpr int kTilesA = kAQ / 8;   // n-tiles of S^T / dP^T per warp
  constexpr int kTilesB = kD / 16;   // n-tiles of dK / dV per warp (kD / 2 dims)

  ACCEL_DYNAMIC_SMEM(unsigned char, smem_raw);
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);  // [2][kBlockM][kPitch]
  uint16_t* sdO = sQ + 2 * kBlockM * kPitch;              // [2][kBlockM][kPitch]
  uint16_t* sK = sdO + 2 * kBlockM * kPitch;              // [kBlockN][kPitch]
  uint16_t* sV = sK + kBlockN * kPitch;                   // [kBlockN][kPitch]
  uint16_t* sP = sV + kBlockN * kPitch;                   // P^T  [kBlockN][kPitchP]
  uint16_t* sdS = sP + kBlockN * kPitchP;                 // dS^T [kBlockN][kPitchP]

  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const SeqInfo s = seq_info(p, b);
  const int n0 = n_block * kBlockN;
  // Keys past len_k: dk/dv rows there are zero from the allocation (only seqused_k or varlen
  // leave such rows; in plain dense mode every key row is covered by some CTA).
  if (n0 >= s.len_k) return;
  const int offset = s.len_k - s.len_q;
  int q_lo, q_hi;
  query_range(p, s, offset, n0, min(n0 + kBlockN, s.len_k) - 1, q_lo, q_hi);
  const int mb_lo = q_lo / kBlockM;
  const int n_mb = q_hi > q_lo ? ceil_div(q_hi, kBlockM) - mb_lo : 0;
  const int n_iters = n_mb * p.group;

  const uint16_t* k = static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                      (s.k_row0 + n0) * p.k_row_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                      (s.k_row0 + n0) * p.v_row_stride;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int kr = warp % 4;          // phases A, B: keys [16 kr, 16 kr + 16)
  const int half = warp / 4;        // phase A: queries [kAQ half, ...); phase B: dims [kD/2 half, ...)
  const int qg = warp % kCQGroups;  // phase C: queries [16 qg, 16 qg + 16)
  const int dc = warp / kCQGroups;  // phase C: dims [kCD dc, kCD dc + kCD)
  const float scale = p.scale, scale2 = p.scale * kLog2e;
  const bool has_alibi = p.alibi_slopes != nullptr;

  float acc_dk[kTilesB][4], acc_dv[kTilesB][4];
#pragma unroll
  for (int i = 0; i < kTilesB; ++i) {
    acc_dk[i][0] = acc_dk[i][1] = acc_dk[i][2] = acc_dk[i][3] = 0.f;
    acc_dv[i][0] = acc_dv[i][1] = acc_dv[i][2] = acc_dv[i][3] = 0.f;
  }

  // Iteration it: query head hk * group + it / n_mb, query block mb_lo + it % n_mb.
  auto load_q_do = [&](int it, int buf) {
    const int h = hk * p.group + it / n_mb, m0 = (mb_lo + it % n_mb) * kBlockM;
    const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                        (s.q_row0 + m0) * p.q_row_stride;
    const uint16_t* dout = static_cast<const uint16_t*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                           (s.q_row0 + m0) * p.do_row_stride;
    load_tile<kBlockM, kD, kThreads>(sQ + buf * kBlockM * kPitch, q, p.q_row_stride, s.len_q - m0, p.head_dim,
                                     p.vec_load, tid);
    load_tile<kBlockM, kD, kThreads>(sdO + buf * kBlockM * kPitch, dout, p.do_row_stride, s.len_q - m0, p.head_dim,
                                     p.vec_load, tid);
  };

  if (n_iters > 0) {
    load_tile<kBlockN, kD, kThreads>(sK, k, p.k_row_stride, s.len_k - n0, p.head_dim, p.vec_load, tid);
    load_tile<kBlockN, kD, kThreads>(sV, v, p.v_row_stride, s.len_k - n0, p.head_dim, p.vec_load, tid);
    load_q_do(0, 0);
    cp_async_commit();

    // Lane addresses (bytes) that do not depend on the iteration (see the forward for the
    // matrix order of each operand kind).
    const uint32_t a_k = smem_u32(sK + (kr * 16 + lane % 16) * kPitch + (lane / 16) * 8);
    const uint32_t a_v = smem_u32(sV + (kr * 16 + lane % 16) * kPitch + (lane / 16) * 8);
    const uint32_t a_p = smem_u32(sP + (kr * 16 + lane % 16) * kPitchP + (lane / 16) * 8);
    const uint32_t a_ds = smem_u32(sdS + (kr * 16 + lane % 16) * kPitchP + (lane / 16) * 8);
    // dS as the A operand of dQ = dS K, read transposed from dS^T: matrices (keys 0-7, queries
    // 0-7), (keys 0-7, queries 8-15), (keys 8-15, queries 0-7), (keys 8-15, queries 8-15).
    const uint32_t a_dst = smem_u32(sdS + (lane % 8 + (lane / 16) * 8) * kPitchP + qg * 16 + ((lane / 8) % 2) * 8);
    const uint32_t b_kt = smem_u32(sK + (lane % 8 + ((lane / 8) % 2) * 8) * kPitch + dc * kCD + (lane / 16) * 8);
    const int b_rows_nt = (lane % 8 + (lane / 16) * 8) * kPitch + ((lane / 8) % 2) * 8;  // B, non-transposed
    const int b_rows_t = (lane % 8 + ((lane / 8) % 2) * 8) * kPitch + (lane / 16) * 8;  // B, transposed

    for (int it = 0; it < n_iters; ++it) {
      const int buf = it & 1;
      if (it + 1 < n_iters) {
        load_q_do(it + 1, buf ^ 1);  // that buffer was last read before the previous trailing barrier
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();

      const int h = hk * p.group + it / n_mb, m0 = (mb_lo + it % n_mb) * kBlockM;
      const uint16_t* cQ = sQ + buf * kBlockM * kPitch;
      const uint16_t* cdO = sdO + buf * kBlockM * kPitch;
      const float bias2 = head_bias(p, h, s.len_k) * kLog2e;  // base-2 logits (sigmoid_parts_base2)
      const float slope2 = alibi_slope(p, b, h) * kLog2e;

      // ---- A: S^T and dP^T for keys [16 kr, +16) x queries [kAQ half, +kAQ)
      {
        float acc_s[kTilesA][4], acc_dp[kTilesA][4];
#pragma unroll
        for (int i = 0; i < kTilesA; ++i) {
          acc_s[i][0] = acc_s[i][1] = acc_s[i][2] = acc_s[i][3] = 0.f;
          acc_dp[i][0] = acc_dp[i][1] = acc_dp[i][2] = acc_dp[i][3] = 0.f;
        }
        const uint32_t b_q = smem_u32(cQ + half * kAQ * kPitch + b_rows_nt);
        const uint32_t b_o = smem_u32(cdO + half * kAQ * kPitch + b_rows_nt);
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
          uint32_t ak[4], av[4];
          ldmatrix_x4(ak, a_k + kk * 32);
          ldmatrix_x4(av, a_v + kk * 32);
#pragma unroll
          for (int qp = 0; qp < kAQ / 16; ++qp) {
            uint32_t bq[4], bo[4];
            ldmatrix_x4(bq, b_q + (qp * 16 * kPitch + kk * 16) * 2);
            ldmatrix_x4(bo, b_o + (qp * 16 * kPitch + kk * 16) * 2);
            mma_m16n8k16<T>(acc_s[2 * qp], ak, bq[0], bq[1]);
            mma_m16n8k16<T>(acc_s[2 * qp + 1], ak, bq[2], bq[3]);
            mma_m16n8k16<T>(acc_dp[2 * qp], av, bo[0], bo[1]);
            mma_m16n8k16<T>(acc_dp[2 * qp + 1], av, bo[2], bo[3]);
          }
        }
        // Element e of n-tile nt: key n0 + 16 kr + lane / 4 (+8 for e >= 2), query
        // m0 + kAQ half + 8 nt + 2 (lane % 4) + e % 2.
        const int key0 = n0 + kr * 16 + lane / 4;
        const int query0 = m0 + half * kAQ + (lane % 4) * 2;
        const bool masked = has_alibi || tile_needs_mask(p, s, offset, m0, kBlockM, n0, kBlockN);
#pragma unroll
        for (int nt = 0; nt < kTilesA; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float t = fmaf(acc_s[nt][e], scale2, bias2);
            bool ok = true;
            if (masked) {
              int dist;
              ok = allowed(p, s, offset, query0 + nt * 8 + e % 2, key0 + (e / 2) * 8, dist);
              t -= slope2 * static_cast<float>(abs(dist));
            }
            const SigmoidParts sp = sigmoid_parts_base2(t);
            const float er = sp.e * sp.r;
            // P and P (1 - P) = e r^2 (no 1 - P cancellation where P is close to 1)
            acc_s[nt][e] = ok ? (t >= 0.f ? sp.r : er) : 0.f;
            acc_dp[nt][e] *= ok ? er * sp.r : 0.f;
          }
        }
#pragma unroll
        for (int nt = 0; nt < kTilesA; ++nt) {
          const int off = (kr * 16 + lane / 4) * kPitchP + half * kAQ + nt * 8 + (lane % 4) * 2;
          *reinterpret_cast<uint32_t*>(sP + off) = pack2<T>(acc_s[nt][0], acc_s[nt][1]);
          *reinterpret_cast<uint32_t*>(sP + off + 8 * kPitchP) = pack2<T>(acc_s[nt][2], acc_s[nt][3]);
          *reinterpret_cast<uint32_t*>(sdS + off) = pack2<T>(acc_dp[nt][0], acc_dp[nt][1]);
          *reinterpret_cast<uint32_t*>(sdS + off + 8 * kPitchP) = pack2<T>(acc_dp[nt][2], acc_dp[nt][3]);
        }
      }
      __syncthreads();  // P^T, dS^T complete

      // ---- B: dV += P^T dO, dK += dS^T Q for keys [16 kr, +16) x dims [kD/2 half, +kD/2)
      {
        const uint32_t b_o = smem_u32(cdO + half * (kD / 2) + b_rows_t);
        const uint32_t b_q = smem_u32(cQ + half * (kD / 2) + b_rows_t);
#pragma unroll
        for (int t = 0; t < kBlockM / 16; ++t) {
          uint32_t ap[4], ads[4];
          ldmatrix_x4(ap, a_p + t * 32);
          ldmatrix_x4(ads, a_ds + t * 32);
#pragma unroll
          for (int dp = 0; dp < kD / 32; ++dp) {
            uint32_t bo[4], bq[4];
            ldmatrix_x4_trans(bo, b_o + (t * 16 * kPitch + dp * 16) * 2);
            ldmatrix_x4_trans(bq, b_q + (t * 16 * kPitch + dp * 16) * 2);
            mma_m16n8k16<T>(acc_dv[2 * dp], ap, bo[0], bo[1]);
            mma_m16n8k16<T>(acc_dv[2 * dp + 1], ap, bo[2], bo[3]);
            mma_m16n8k16<T>(acc_dk[2 * dp], ads, bq[0], bq[1]);
            mma_m16n8k16<T>(acc_dk[2 * dp + 1], ads, bq[2], bq[3]);
          }
        }
      }

      // ---- C: dQ[queries 16 qg.., dims kCD dc..] += scale * dS K, atomically
      {
        uint32_t a_dq[kBlockN / 16][4];
#pragma unroll
        for (int t = 0; t < kBlockN / 16; ++t) ldmatrix_x4_trans(a_dq[t], a_dst + t * 16 * kPitchP * 2);
        const int first_row = m0 + qg * 16;
        const int rows = s.len_q - first_row;
        float* dq = p.dq_accum + b * p.o_batch_stride + h * p.o_head_stride + (s.q_row0 + first_row) * p.o_row_stride;
        const int d0 = dc * kCD + (lane % 4) * 2;
#pragma unroll
        for (int dp = 0; dp < kCD / 16; ++dp) {
          float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
          for (int t = 0; t < kBlockN / 16; ++t) {
            uint32_t bk[4];
            ldmatrix_x4_trans(bk, b_kt + (t * 16 * kPitch + dp * 16) * 2);
            mma_m16n8k16<T>(acc[0], a_dq[t], bk[0], bk[1]);
            mma_m16n8k16<T>(acc[1], a_dq[t], bk[2], bk[3]);
          }
#pragma unroll
          for (int x = 0; x < 2; ++x) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = lane / 4 + (e / 2) * 8, d = d0 + dp * 16 + x * 8 + e % 2;
              if (r < rows && d < p.head_dim) atomicAdd(dq + r * p.o_row_stride + d, scale * acc[x][e]);
            }
          }
        }
        if constexpr ((kCD / 8) % 2 == 1) {  // an odd n-tile left over (kD = 160, 224)
          constexpr int kLast = (kCD / 16) * 16;
          float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int t = 0; t < kBlockN / 16; ++t) {
            uint32_t bk[2];
            ldmatrix_x2_trans(bk, b_kt + (t * 16 * kPitch + kLast) * 2);  // lanes 0-15 address it
            mma_m16n8k16<T>(acc, a_dq[t], bk[0], bk[1]);
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = lane / 4 + (e / 2) * 8, d = d0 + kLast + e % 2;
            if (r < rows && d < p.head_dim) atomicAdd(dq + r * p.o_row_stride + d, scale * acc[e]);
          }
        }
      }
      __syncthreads();  // everyone is done with this buffer, P^T and dS^T
    }
  }

  // dK = scale * dS^T Q, dV: staged through sK / sV, then 16-byte stores. sK / sV are free: the
  // last iteration waited for every copy group and ended with a barrier after its last read
  // (scripts/emu_mutations.py found the wait and barrier that stood here redundant).
#pragma unroll
  for (int nt = 0; nt < kTilesB; ++nt) {
    const int off = (kr * 16 + lane / 4) * kPitch + half * (kD / 2) + nt * 8 + (lane % 4) * 2;
    *reinterpret_cast<uint32_t*>(sK + off) = pack2<T>(scale * acc_dk[nt][0], scale * acc_dk[nt][1]);
    *reinterpret_cast<uint32_t*>(sK + off + 8 * kPitch) = pack2<T>(scale * acc_dk[nt][2], scale * acc_dk[nt][3]);
    *reinterpret_cast<uint32_t*>(sV + off) = pack2<T>(acc_dv[nt][0], acc_dv[nt][1]);
    *reinterpret_cast<uint32_t*>(sV + off + 8 * kPitch) = pack2<T>(acc_dv[nt][2], acc_dv[nt][3]);
  }
  __syncthreads();
  const int64_t out_off = b * p.dk_batch_stride + hk * p.dk_head_stride + (s.k_row0 + n0) * p.dk_row_stride;
  store_tile<kBlockN, kD, kThreads>(static_cast<uint16_t*>(p.dk) + out_off, p.dk_row_stride, sK, s.len_k - n0,
                                    p.head_dim, p.vec_store, tid);
  store_tile<kBlockN, kD, kThreads>(static_cast<uint16_t*>(p.dv) + out_off, p.dk_row_stride, sV, s.len_k - n0,
                                    p.head_dim, p.vec_store, tid);
}

template <typename T, int kD>
cudaError_t launch_bwd(const Params& p, cudaStream_t stream) {
  using Cfg = BwdConfig<kD>;
  auto kernel = &sigmoid_attention_bwd_kernel<T, kD>;
  if (Cfg::kSmemBytes > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_len_k, Cfg::kBlockN)), static_cast<unsigned>(p.heads_kv),
                  static_cast<unsigned>(p.batch));
  ACCEL_LAUNCH(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p);
  return cudaGetLastError();
}

// The only place the backward's head-dim buckets are instantiated (one dtype per file).
template <typename T>
cudaError_t dispatch_bwd(const Params& p, cudaStream_t stream) {
  switch (head_dim_bucket(p.head_dim)) {
    case 32: return launch_bwd<T, 32>(p, stream);
    case 64: return launch_bwd<T, 64>(p, stream);
    case 96: return launch_bwd<T, 96>(p, stream);
    case 128: return launch_bwd<T, 128>(p, stream);
    case 160: return launch_bwd<T, 160>(p, stream);
    case 192: return launch_bwd<T, 192>(p, stream);
    case 224: return launch_bwd<T, 224>(p, stream);
    case 256: return launch_bwd<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace detail
}  // namespace accel::sigmoid_attention::cuda
