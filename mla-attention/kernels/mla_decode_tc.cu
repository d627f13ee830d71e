// Absorbed MLA decode, tensor-core split kernel (bf16 cache; rank and rope multiples
// of 8, so rows and query rows are whole 16-byte chunks).
//
// One thread block (8 warps) = one split (a run of one sequence's tokens) x one group
// of up to HM = 16*MT heads. Per tile of TT tokens it:
//   1. has the copy engine fetch the tile's latent rows [c (R) ; k_pe (D)] from their
//      paged blocks into shared memory (cp.async.bulk, one copy per row, completion on
//      the stage's mbarrier; two stages: tile i+1 loads while tile i computes). Each
//      row is read once and serves every head of the group (MQA-style sharing);
//   2. S = [q_lat ; q_pe] . row^T for all heads with mma.sync m16n8k16. The query
//      fragments stay in registers for the whole split: warp w owns k-group w % KG of
//      the row width and n-group w / KG of the tile's tokens, and writes a partial S;
//   3. online softmax per head in base 2 (sums the KG partials, masks the tail,
//      running max / sum in registers), P rounded to bf16;
//   4. O = O * alpha + P . C (mma, C = the first R columns of the rows, ldmatrix.trans);
//      warp w owns output columns [64*NT*w/8, 64*NT*(w+1)/8) for every head.
// At the end each head's O / sum goes to the output directly (sequence with one
// split) or as a partial with its log2-sum-exp for mla_combine.
//
// Shared memory: 16 bytes of mbarriers, then the query rows (reused for the partial
// scores), two row stages, P and the softmax statistics. Rows have stride
// WS = max(pad32(R+D), 64*NT) + 8 bf16 (the +8 puts consecutive rows 16 bytes apart
// modulo 128: conflict-free ldmatrix); columns past R+D are zeroed once.
//
// MLA_SKIP_SCORE / MLA_SKIP_OUT / MLA_SKIP_LOAD (never in a real build) drop one stage,
// to time the stages by difference on the device (results are then wrong).

#include "mla_common.cuh"

template <int MT, int TT>
struct TcShape {
  static constexpr int HM = MT * 16;               // head rows per block
  static constexpr int KG = TT == 64 ? 4 : 8;      // k-groups of the score GEMM
  static constexpr int NG = MLA_WARPS / KG;        // token groups of the score GEMM
  static constexpr int NPW = TT / 8 / NG;          // token n-tiles per warp (4)
  static constexpr int KPG = TT == 64 ? 10 : 8;    // most k-steps a k-group may have
  static constexpr int PS = TT + 8;                // P row stride (bf16)
  static constexpr int SS = TT + 8;                // partial-score row stride (f32)
  static constexpr int TPR = MLA_THREADS / HM;     // softmax threads per head row
  static constexpr int CPT = TT / TPR;             // softmax tokens per thread
};

template <int MT, int NT, int TT>
__device__ __forceinline__ void mla_split_tc(const bf16* __restrict__ pool,
                                             const bf16* __restrict__ q_lat,
                                             const bf16* __restrict__ q_pe,
                                             const uint32_t* __restrict__ meta, MetaOffsets mo,
                                             float* __restrict__ out, float* __restrict__ part_o,
                                             float* __restrict__ part_lse, int R, int D, int H,
                                             int bs, int bs_shift, float scale_log2) {
  using C = TcShape<MT, TT>;
  constexpr int HM = C::HM, KG = C::KG, NPW = C::NPW, KPG = C::KPG;
  constexpr int PS = C::PS, SS = C::SS, TPR = C::TPR, CPT = C::CPT;
  static_assert(NPW % 2 == 0 && CPT % 2 == 0, "paired n-tiles and bf16 pairs");
  const int W = R + D;
  const int WPAD = (W + 31) & ~31;
  const int WS = max(WPAD, NT * 64) + 8;
  const int KS = WPAD / 16;                // k-steps of the score GEMM
  const int kpg = (KS + KG - 1) / KG;      // <= KPG (checked by the host)

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t bar0 = smem_addr(smem_raw);  // two mbarriers (one per stage), 16 bytes
  unsigned char* smem = smem_raw + 16;
  const int u_bytes = max(HM * WS * 2, KG * HM * SS * 4);
  bf16* Qs = reinterpret_cast<bf16*>(smem);   // prologue only
  float* Sp = reinterpret_cast<float*>(smem); // partial scores [KG][HM][SS] afterwards
  bf16* KVs = reinterpret_cast<bf16*>(smem + ((u_bytes + 15) & ~15));
  bf16* Ps = KVs + 2 * TT * WS;
  float* alpha_s = reinterpret_cast<float*>(Ps + HM * PS);
  float* lsum_s = alpha_s + HM;
  float* lmax_s = lsum_s + HM;

  const int split = blockIdx.x;
  const int h0 = blockIdx.y * HM;
  const int seq = meta[mo.split_off + 3 * split];
  const int t_begin = meta[mo.split_off + 3 * split + 1];
  const int t_end = meta[mo.split_off + 3 * split + 2];
  const uint32_t* blocks = meta + mo.blkid_off + meta[mo.seqblk_off + seq];
  const bool direct = meta[mo.seqsplit_off + seq + 1] - meta[mo.seqsplit_off + seq] == 1;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  const int ntiles = (t_end - t_begin + TT - 1) / TT;
  {  // zero the padding columns [W, WS) of every Q and KV row (the score loop reads
     // them), and the rows past the split's end in the last tile's stage (never
     // written there; 0 * stale NaN would poison P . C)
    const int pad16 = (WS - W) / 8;  // 16-byte chunks per row
    for (int i = tid; i < HM * pad16; i += MLA_THREADS) {
      const int r = i / pad16, ch = i % pad16;
      *reinterpret_cast<uint4*>(Qs + r * WS + W + ch * 8) = make_uint4(0, 0, 0, 0);
    }
    for (int i = tid; i < 2 * TT * pad16; i += MLA_THREADS) {
      const int r = i / pad16, ch = i % pad16;
      *reinterpret_cast<uint4*>(KVs + r * WS + W + ch * 8) = make_uint4(0, 0, 0, 0);
    }
    const int last_valid = t_end - (t_begin + (ntiles - 1) * TT);
    bf16* last = KVs + ((ntiles - 1) & 1) * TT * WS;
    const int c16 = W / 8;
    for (int i = tid; i < (TT - last_valid) * c16; i += MLA_THREADS) {
      const int r = last_valid + i / c16, ch = i % c16;
      *reinterpret_cast<uint4*>(last + r * WS + ch * 8) = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();  // before the copy engine writes other bytes of these rows
    if (tid == 0) {
      mbar_init(bar0, MLA_WARPS);
      mbar_init(bar0 + 8, MLA_WARPS);
      mbar_init_fence();
    }
  }
  {  // Q rows [q_lat (R) ; q_pe (D)] by cp.async; heads past H are zero-filled
    const int cr = R / 8, cpr = (R + D) / 8;
    for (int i = tid; i < HM * cpr; i += MLA_THREADS) {
      const int r = i / cpr, ch = i % cpr, h = h0 + r;
      const bool live = h < H;
      const bf16* src = q_lat;
      if (live) {
        src = ch < cr ? q_lat + ((size_t)seq * H + h) * R + ch * 8
                      : q_pe + ((size_t)seq * H + h) * D + (ch - cr) * 8;
      }
      cp_async16(smem_addr(Qs + r * WS + ch * 8), src, live ? 16 : 0);
    }
    cp_async_commit();
  }
  __syncthreads();  // barriers initialized, zeroing done

  // Tile rows by the copy engine: lane l < TT/8 of warp w copies row w + 8l (one bulk
  // copy of the whole row, W*2 bytes); lane 0 first announces the warp's bytes on the
  // stage's mbarrier. Rows past the split's end are not copied.
  const uint32_t row_bytes = W * 2;
  auto load_tile = [&](int stage, int t0) {
    const uint32_t bar = bar0 + 8 * stage;
    const int nvalid = min(TT, t_end - t0);
    const int mine = nvalid > warp ? (nvalid - warp + MLA_WARPS - 1) / MLA_WARPS : 0;
    if (lane == 0) mbar_arrive_expect_tx(bar, mine * row_bytes);
    __syncwarp();
    if (lane < mine) {
      const int r = warp + lane * MLA_WARPS;
      const int t = t0 + r;
      const int bi = bs_shift >= 0 ? t >> bs_shift : t / bs;
      const int bo = t - bi * bs;
      const bf16* src = pool + ((size_t)blocks[bi] * bs + bo) * W;
      bulk_copy(smem_addr(KVs + (stage * TT + r) * WS), src, row_bytes, bar);
    }
  };

  const int kg = warp % KG, ng = warp / KG;
  const int k0 = kg * kpg;
  const int nk = max(0, min(kpg, KS - k0));  // k-steps of this warp's group
  const int srow = tid / TPR, ssub = tid % TPR;  // softmax role
  float m_run = -INFINITY, l_run = 0.f;
  float acc[MT][NT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[m][n][j] = 0.f;

  load_tile(0, t_begin);
  cp_async_wait<0>();  // the query rows
  __syncthreads();
  uint32_t qf[MT][KPG][4];  // this warp's query fragments, for the whole split
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const uint32_t qaddr = smem_addr(Qs + (m * 16 + (lane & 15)) * WS + (lane >> 4) * 8);
#pragma unroll
    for (int j = 0; j < KPG; ++j) {
      if (j < nk) {
        ldsm_x4(qf[m][j], qaddr + (k0 + j) * 32);
      } else {
        qf[m][j][0] = qf[m][j][1] = qf[m][j][2] = qf[m][j][3] = 0u;
      }
    }
  }
  __syncthreads();  // every warp holds its fragments: Sp may overwrite the query rows

  // Two barriers per tile. "S ready" also means every warp finished the previous
  // tile's P . C, so the stage that tile used (and Ps, alpha_s) may be refilled; "P
  // ready" means every warp finished reading Sp.
  for (int it = 0; it < ntiles; ++it) {
    const int stage = it & 1;
    const int t0 = t_begin + it * TT;
#ifdef MLA_SKIP_LOAD
    if (it < 2) mbar_wait(bar0 + 8 * stage, 0);
#else
    mbar_wait(bar0 + 8 * stage, (it >> 1) & 1);
#endif
    const bf16* K = KVs + stage * TT * WS;
    const int valid = min(TT, t_end - t0);

    {  // partial scores of this warp's k-group over its NPW token n-tiles
      float s[MT][NPW][4];
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < NPW; ++n)
#pragma unroll
          for (int j = 0; j < 4; ++j) s[m][n][j] = 0.f;
      // x4: n-tile pair (rows +0 / +8), k halves (cols +0 / +8)
      const uint32_t kaddr = smem_addr(K + (ng * NPW * 8 + (lane & 7) + (lane >> 4) * 8) * WS +
                                       ((lane >> 3) & 1) * 8);
#ifndef MLA_SKIP_SCORE
#pragma unroll
      for (int j = 0; j < KPG; ++j) {
        if (j < nk) {
#pragma unroll
          for (int np = 0; np < NPW; np += 2) {
            uint32_t b[4];
            ldsm_x4(b, kaddr + (np * 8 * WS + (k0 + j) * 16) * 2);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              mma_bf16(s[m][np], qf[m][j], b[0], b[1]);
              mma_bf16(s[m][np + 1], qf[m][j], b[2], b[3]);
            }
          }
        }
      }
#endif
      float* sp = Sp + kg * HM * SS;
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < NPW; ++n) {
          const int r = m * 16 + lane / 4, c = (ng * NPW + n) * 8 + (lane % 4) * 2;
          *reinterpret_cast<float2*>(sp + r * SS + c) = make_float2(s[m][n][0], s[m][n][1]);
          *reinterpret_cast<float2*>(sp + (r + 8) * SS + c) = make_float2(s[m][n][2], s[m][n][3]);
        }
    }
    __syncthreads();  // S ready
#ifdef MLA_SKIP_LOAD
    if (it == 0 && it + 1 < ntiles) load_tile(stage ^ 1, t0 + TT);  // diagnosis only
#else
    if (it + 1 < ntiles) load_tile(stage ^ 1, t0 + TT);
#endif

    {  // online softmax: TPR threads per head row, CPT tokens each
      float v[CPT];
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < CPT; j += 2) v[j] = v[j + 1] = 0.f;
#pragma unroll
      for (int g = 0; g < KG; ++g) {
        const float* row = Sp + (g * HM + srow) * SS + ssub * CPT;
        if constexpr (CPT % 4 == 0) {
#pragma unroll
          for (int j = 0; j < CPT; j += 4) {
            const float4 p = *reinterpret_cast<const float4*>(row + j);
            v[j] += p.x;
            v[j + 1] += p.y;
            v[j + 2] += p.z;
            v[j + 3] += p.w;
          }
        } else {
#pragma unroll
          for (int j = 0; j < CPT; j += 2) {
            const float2 p = *reinterpret_cast<const float2*>(row + j);
            v[j] += p.x;
            v[j + 1] += p.y;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        v[j] = ssub * CPT + j < valid ? v[j] * scale_log2 : -INFINITY;
        mx = fmaxf(mx, v[j]);
      }
#pragma unroll
      for (int off = TPR / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m_run, mx);  // finite: every tile has a valid token
      const float alpha = exp2f(m_run - m_new);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < CPT; j += 2) {
        const __nv_bfloat162 p = __floats2bfloat162_rn(exp2f(v[j] - m_new), exp2f(v[j + 1] - m_new));
        *reinterpret_cast<__nv_bfloat162*>(Ps + srow * PS + ssub * CPT + j) = p;
        sum += __low2float(p) + __high2float(p);  // the numerator uses the rounded p too
      }
#pragma unroll
      for (int off = TPR / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      if (ssub == 0) alpha_s[srow] = alpha;
    }
    __syncthreads();  // P ready

    {  // O = O * alpha + P . C over this warp's NT column tiles
      const int col0 = warp * NT * 8;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float a0 = alpha_s[m * 16 + lane / 4], a1 = alpha_s[m * 16 + lane / 4 + 8];
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          acc[m][n][0] *= a0;
          acc[m][n][1] *= a0;
          acc[m][n][2] *= a1;
          acc[m][n][3] *= a1;
        }
      }
      const uint32_t paddr = smem_addr(Ps + (lane & 15) * PS + (lane >> 4) * 8);
      const uint32_t caddr =
          smem_addr(K + ((lane & 7) + ((lane >> 3) & 1) * 8) * WS + col0 + (lane >> 4) * 8);
#ifndef MLA_SKIP_OUT
#pragma unroll
      for (int kk = 0; kk < TT / 16; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int m = 0; m < MT; ++m) ldsm_x4(a[m], paddr + (m * 16 * PS + kk * 16) * 2);
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
          if (n + 1 < NT) {
            uint32_t b[4];
            ldsm_x4_trans(b, caddr + (kk * 16 * WS + n * 8) * 2);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              mma_bf16(acc[m][n], a[m], b[0], b[1]);
              mma_bf16(acc[m][n + 1], a[m], b[2], b[3]);
            }
          } else {
            uint32_t b[2];
            // x2: lanes 0-15 give the addresses (lane >> 4 == 0 there).
            ldsm_x2_trans(b, caddr + (kk * 16 * WS + n * 8) * 2);
#pragma unroll
            for (int m = 0; m < MT; ++m) mma_bf16(acc[m][n], a[m], b[0], b[1]);
          }
        }
      }
#endif
    }
  }

  if (ssub == 0) {
    lsum_s[srow] = l_run;
    lmax_s[srow] = m_run;
  }
  __syncthreads();
  const int col0 = warp * NT * 8;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = m * 16 + lane / 4 + half * 8, h = h0 + r;
      if (h >= H) continue;
      const float inv = 1.f / lsum_s[r];
      float* dst = direct ? out + ((size_t)seq * H + h) * R : part_o + ((size_t)split * H + h) * R;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int c = col0 + n * 8 + (lane % 4) * 2;
        const float v0 = acc[m][n][half * 2] * inv, v1 = acc[m][n][half * 2 + 1] * inv;
        if (c + 1 < R && (R & 1) == 0) {
          *reinterpret_cast<float2*>(dst + c) = make_float2(v0, v1);
        } else {
          if (c < R) dst[c] = v0;
          if (c + 1 < R) dst[c + 1] = v1;
        }
      }
    }
  }
  if (!direct && tid < HM && h0 + tid < H) {
    part_lse[(size_t)split * H + h0 + tid] = lmax_s[tid] + log2f(lsum_s[tid]);
  }
}

// 16-head blocks with 32-token tiles are small enough (registers <= 128, <= 105 KB of
// shared memory up to rank 576) for two blocks per SM.
#define MLA_TC_MIN_BLOCKS(MT, NT, TT) ((MT) == 1 && (TT) == 32 && (NT) <= 9 ? 2 : 1)

#define MLA_TC_KERNEL(MT, NT, TT)                                                                  \
  extern "C" __global__ void __launch_bounds__(MLA_THREADS, MLA_TC_MIN_BLOCKS(MT, NT, TT))             \
      mla_split_tc_m##MT##_n##NT##_t##TT(                                                          \
      const bf16* pool, const bf16* q_lat, const bf16* q_pe, const uint32_t* meta,                 \
      MetaOffsets mo, float* out, float* part_o, float* part_lse, int R, int D, int H, int bs,     \
      int bs_shift, float scale_log2) {                                                            \
    mla_split_tc<MT, NT, TT>(pool, q_lat, q_pe, meta, mo, out, part_o, part_lse, R, D, H, bs,      \
                             bs_shift, scale_log2);                                                \
  }

// 64-token tiles up to rank 576 (two stages fit in shared memory with a 64-wide rope,
// and a k-group holds at most 10 k-steps: row width <= 640), 32-token tiles for every
// rank up to 768 (8 k-groups of at most 8 k-steps: width <= 1024). The host picks the
// largest tile whose limits and shared memory fit, else the generic kernel.
#define MLA_TC_FOR_MT(MT)                                                                  \
  MLA_TC_KERNEL(MT, 1, 64) MLA_TC_KERNEL(MT, 2, 64) MLA_TC_KERNEL(MT, 3, 64)               \
  MLA_TC_KERNEL(MT, 4, 64) MLA_TC_KERNEL(MT, 5, 64) MLA_TC_KERNEL(MT, 6, 64)               \
  MLA_TC_KERNEL(MT, 7, 64) MLA_TC_KERNEL(MT, 8, 64) MLA_TC_KERNEL(MT, 9, 64)               \
  MLA_TC_KERNEL(MT, 1, 32) MLA_TC_KERNEL(MT, 2, 32) MLA_TC_KERNEL(MT, 3, 32)               \
  MLA_TC_KERNEL(MT, 4, 32) MLA_TC_KERNEL(MT, 5, 32) MLA_TC_KERNEL(MT, 6, 32)               \
  MLA_TC_KERNEL(MT, 7, 32) MLA_TC_KERNEL(MT, 8, 32) MLA_TC_KERNEL(MT, 9, 32)               \
  MLA_TC_KERNEL(MT, 10, 32) MLA_TC_KERNEL(MT, 11, 32) MLA_TC_KERNEL(MT, 12, 32)

MLA_TC_FOR_MT(1)
MLA_TC_FOR_MT(2)
