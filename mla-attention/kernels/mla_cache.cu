// Paged latent cache helpers: write rows into their pool slots, and fill buffers with
// reproducible uniform values (benchmarks and tests; never zeros).

#include "mla_common.cuh"

// pool[slot[i] * W + c] = rows[i * W + c] for i < n, c < W. slot = block * bs + offset,
// computed and bounds-checked on the host.
template <typename T>
__device__ __forceinline__ void scatter_rows(T* __restrict__ pool, const T* __restrict__ rows,
                                             const uint32_t* __restrict__ slot, int n, int W) {
  const size_t total = (size_t)n * W;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / W, c = i % W;
    pool[(size_t)slot[r] * W + c] = rows[i];
  }
}

extern "C" __global__ void mla_scatter_rows_f32(float* pool, const float* rows, const uint32_t* slot,
                                                int n, int W) {
  scatter_rows(pool, rows, slot, n, W);
}

extern "C" __global__ void mla_scatter_rows_bf16(bf16* pool, const bf16* rows, const uint32_t* slot,
                                                 int n, int W) {
  scatter_rows(pool, rows, slot, n, W);
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// p[i] = lo + (hi - lo) * u_i, u_i uniform in [0, 1) from a hash of (seed, i).
template <typename T>
__device__ __forceinline__ void fill_uniform(T* p, uint64_t n, uint64_t seed, float lo, float hi) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const float u = (splitmix64(seed * 0x2545F4914F6CDD1Dull + i) >> 40) * (1.0f / 16777216.0f);
    p[i] = T(lo + (hi - lo) * u);
  }
}

extern "C" __global__ void mla_fill_uniform_f32(float* p, uint64_t n, uint64_t seed, float lo,
                                                float hi) {
  fill_uniform(p, n, seed, lo, hi);
}

extern "C" __global__ void mla_fill_uniform_bf16(bf16* p, uint64_t n, uint64_t seed, float lo,
                                                 float hi) {
  fill_uniform(p, n, seed, lo, hi);
}
