// Absorbed MLA decode, generic split kernel (CUDA cores, f32 arithmetic) for any row
// width and for f32 caches, plus the combine kernel both split kernels feed.
//
// Same work split as the tensor-core kernel: one thread block = one split x a group of
// HG heads; per tile of `tt` tokens the rows are converted to f32 in shared memory and
// serve every head of the group. f32 throughout, so an f32 cache decodes to ~1e-6.
//
// Shared memory (f32): Q [HG][ws], rows [tt][ws], O [HG][R], S/P [HG][tt], alpha [HG],
// sum [HG], max [HG], with ws = (R + D) | 1 (odd: the score loop reads one row per
// lane, so an odd stride keeps the lanes in distinct banks).

#include "mla_common.cuh"

#define GENERIC_HG 16

template <typename T>
__device__ __forceinline__ void mla_split_generic(const T* __restrict__ pool,
                                                  const T* __restrict__ q_lat,
                                                  const T* __restrict__ q_pe,
                                                  const uint32_t* __restrict__ meta,
                                                  MetaOffsets mo, float* __restrict__ out,
                                                  float* __restrict__ part_o,
                                                  float* __restrict__ part_lse, int R, int D,
                                                  int H, int bs, float scale_log2, int tt) {
  constexpr int HG = GENERIC_HG;
  constexpr int TPR = MLA_THREADS / HG;
  const int W = R + D;
  const int ws = W | 1;
  extern __shared__ __align__(16) unsigned char smem[];
  float* Qs = reinterpret_cast<float*>(smem);
  float* Ks = Qs + HG * ws;
  float* Os = Ks + tt * ws;
  float* Ss = Os + HG * R;
  float* alpha_s = Ss + HG * tt;
  float* lsum_s = alpha_s + HG;
  float* lmax_s = lsum_s + HG;

  const int split = blockIdx.x;
  const int h0 = blockIdx.y * HG;
  const int seq = meta[mo.split_off + 3 * split];
  const int t_begin = meta[mo.split_off + 3 * split + 1];
  const int t_end = meta[mo.split_off + 3 * split + 2];
  const uint32_t* blocks = meta + mo.blkid_off + meta[mo.seqblk_off + seq];
  const bool direct = meta[mo.seqsplit_off + seq + 1] - meta[mo.seqsplit_off + seq] == 1;
  const int tid = threadIdx.x;

  for (int i = tid; i < HG * W; i += MLA_THREADS) {
    const int r = i / W, c = i % W, h = h0 + r;
    float v = 0.f;
    if (h < H) {
      v = c < R ? to_f32(q_lat[((size_t)seq * H + h) * R + c])
                : to_f32(q_pe[((size_t)seq * H + h) * D + (c - R)]);
    }
    Qs[r * ws + c] = v;
  }
  for (int i = tid; i < HG * R; i += MLA_THREADS) Os[i] = 0.f;

  const int srow = tid / TPR, ssub = tid % TPR;
  const int cpt = tt / TPR;  // softmax tokens per thread
  float m_run = -INFINITY, l_run = 0.f;
  for (int t0 = t_begin; t0 < t_end; t0 += tt) {
    const int valid = min(tt, t_end - t0);
    for (int r = 0; r < valid; ++r) {  // rows: coalesced along the row
      const int t = t0 + r;
      const T* src = pool + ((size_t)blocks[t / bs] * bs + t % bs) * W;
      for (int c = tid; c < W; c += MLA_THREADS) Ks[r * ws + c] = to_f32(src[c]);
    }
    __syncthreads();
    for (int p = tid; p < HG * tt; p += MLA_THREADS) {
      const int h = p / tt, t = p % tt;
      float s = -INFINITY;
      if (t < valid) {
        const float* q = Qs + h * ws;
        const float* k = Ks + t * ws;
        float d = 0.f;
        for (int c = 0; c < W; ++c) d = fmaf(q[c], k[c], d);
        s = d * scale_log2;
      }
      Ss[h * tt + t] = s;
    }
    __syncthreads();
    {
      float mx = -INFINITY;
      for (int j = 0; j < cpt; ++j) mx = fmaxf(mx, Ss[srow * tt + ssub * cpt + j]);
      for (int off = TPR / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m_run, mx);
      const float alpha = exp2f(m_run - m_new);
      float sum = 0.f;
      for (int j = 0; j < cpt; ++j) {
        float* s = Ss + srow * tt + ssub * cpt + j;
        const float p = exp2f(*s - m_new);
        *s = p;
        sum += p;
      }
      for (int off = TPR / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      if (ssub == 0) alpha_s[srow] = alpha;
    }
    __syncthreads();
    for (int c = tid; c < R; c += MLA_THREADS) {
      for (int h = 0; h < HG; ++h) {
        float o = Os[h * R + c] * alpha_s[h];
        const float* p = Ss + h * tt;
        for (int t = 0; t < valid; ++t) o = fmaf(p[t], Ks[t * ws + c], o);
        Os[h * R + c] = o;
      }
    }
    __syncthreads();
  }
  if (ssub == 0) {
    lsum_s[srow] = l_run;
    lmax_s[srow] = m_run;
  }
  __syncthreads();
  for (int i = tid; i < HG * R; i += MLA_THREADS) {
    const int r = i / R, c = i % R, h = h0 + r;
    if (h < H) store_result(out, part_o, seq, split, h, H, R, c, Os[i] / lsum_s[r], direct);
  }
  if (!direct && tid < HG && h0 + tid < H) {
    part_lse[(size_t)split * H + h0 + tid] = lmax_s[tid] + log2f(lsum_s[tid]);
  }
}

#define MLA_GENERIC_KERNEL(T, NAME)                                                            \
  extern "C" __global__ void __launch_bounds__(MLA_THREADS) mla_split_generic_##NAME(         \
      const T* pool, const T* q_lat, const T* q_pe, const uint32_t* meta, MetaOffsets mo,      \
      float* out, float* part_o, float* part_lse, int R, int D, int H, int bs,                 \
      float scale_log2, int tt) {                                                              \
    mla_split_generic<T>(pool, q_lat, q_pe, meta, mo, out, part_o, part_lse, R, D, H, bs,      \
                         scale_log2, tt);                                                      \
  }

MLA_GENERIC_KERNEL(float, f32)
MLA_GENERIC_KERNEL(bf16, bf16)

// Sum (op = 0) or max (op = 1) of v over the block (256 threads); every thread gets it.
__device__ __forceinline__ float block_reduce(float v, int op, float* scratch) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = op ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < MLA_WARPS; ++w) v = op ? fmaxf(v, scratch[w]) : v + scratch[w];
  return v;
}

#define COMBINE_COLS 64
#define COMBINE_GROUPS (MLA_THREADS / COMBINE_COLS)

// Merge the split partials of every (sequence, head): with L_i the partials'
// log2-sum-exp and M = max_i L_i,  out = sum_i 2^(L_i - M) o_i / sum_i 2^(L_i - M).
// Sequences with a single split were written by the split kernel and are skipped.
// Grid: (batch * H, ceil(R / 64)); 256 threads = 4 groups of 64 columns, each group
// summing every 4th split (many independent loads in flight even at batch 1).
// Dynamic shared memory: (max splits of a sequence + 4 * 64 + 8) floats.
extern "C" __global__ void __launch_bounds__(MLA_THREADS) mla_combine(
    const float* __restrict__ part_o, const float* __restrict__ part_lse,
    const uint32_t* __restrict__ meta, MetaOffsets mo, float* __restrict__ out, int R, int H) {
  extern __shared__ __align__(16) float csm[];
  const int seq = blockIdx.x / H, h = blockIdx.x % H;
  const int s0 = meta[mo.seqsplit_off + seq], n = meta[mo.seqsplit_off + seq + 1] - s0;
  if (n == 1) return;  // uniform over the block
  float* wgt = csm;                        // [n]
  float* red = csm + n;                    // [COMBINE_GROUPS][COMBINE_COLS]
  float* scratch = red + COMBINE_GROUPS * COMBINE_COLS;  // [MLA_WARPS]
  const int tid = threadIdx.x;
  float mx = -INFINITY;
  for (int i = tid; i < n; i += MLA_THREADS) mx = fmaxf(mx, part_lse[(size_t)(s0 + i) * H + h]);
  const float M = block_reduce(mx, 1, scratch);
  float ws = 0.f;
  for (int i = tid; i < n; i += MLA_THREADS) {
    const float w = exp2f(part_lse[(size_t)(s0 + i) * H + h] - M);
    wgt[i] = w;
    ws += w;
  }
  const float wsum = block_reduce(ws, 0, scratch);  // its barriers also publish wgt
  const int g = tid / COMBINE_COLS, c = blockIdx.y * COMBINE_COLS + tid % COMBINE_COLS;
  float acc = 0.f;
  if (c < R) {
    const float* p = part_o + ((size_t)s0 * H + h) * R + c;
    const size_t stride = (size_t)H * R;
#pragma unroll 8
    for (int i = g; i < n; i += COMBINE_GROUPS) acc = fmaf(wgt[i], p[i * stride], acc);
  }
  red[g * COMBINE_COLS + tid % COMBINE_COLS] = acc;
  __syncthreads();
  if (g == 0 && c < R) {
    float a = 0.f;
    for (int j = 0; j < COMBINE_GROUPS; ++j) a += red[j * COMBINE_COLS + tid];
    out[((size_t)seq * H + h) * R + c] = a / wsum;
  }
}
