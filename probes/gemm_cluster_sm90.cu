// Probe for issue #32: does a Hopper routed GEMM with 2-CTA clusters and TMA multicast of the weight tile beat
// dense cuBLAS at the generation step's shapes, with the exact routed GEMM's arithmetic?
//
// out = act(x @ W[e]^T + b[e]) (+ residual) for rows routed to expert e by up to four alternating segments
// [0, b1), [b1, b2), [b2, b3), [b3, M), the first of expert e0 — the contract and per-element arithmetic of the
// shipped Gluon kernel (bagel_kernels/routed_gemm_gluon.py, SEGMENTED plans): 128-row tiles starting at each
// segment's first row, 128x256 output tiles (128x128 x 2 parts for SwiGLU), two consumer warpgroups of 64 rows,
// K steps of 64 as four m64nNk16 wgmma in K order onto an fp32 accumulator that starts at zero, the same epilogue
// roundings (bias in fp32; SwiGLU with bf16 roundings, ex2.approx and div.full as Triton emits them; residual added
// to the rounded projection). What differs is the schedule: the two CTAs of a cluster take row tiles 2p and 2p+1
// of the same column tile and, when both belong to one expert, each loads half of the shared weight tile
// (P = 1: 128 of its 256 rows; P = 2: one part) and multicasts it to both, so L2 serves each weight tile once per
// pair. Pairs whose tiles belong to two experts load their own weights; a pair's missing second tile runs its K
// loop without loads or MMAs so both CTAs keep the same ring sequence (their "empty" barriers count both CTAs'
// releases). The probe checks the output is bitwise the Gluon kernel's.
//
// Build (nvcc 13): nvcc -O3 -std=c++17 -fmad=false -gencode arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC
//   -o libgemm_cluster.so gemm_cluster_sm90.cu          (probes/gemm_cluster.py builds and calls it through ctypes)
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <stdint.h>

#ifndef BK_WAIT0
#define BK_WAIT0 0  // 1: wait for each K step's wgmma group and release its stage at once (one stage held)
#endif
#ifndef BK_CLUSTER
#define BK_CLUSTER 2  // 1: no clusters (each CTA its own row tile and weights: the Gluon kernel's schedule in CUDA)
#endif
#ifndef BK_DIRECT
#define BK_DIRECT 0  // 1: the epilogue stores from registers (no output tile in shared memory), so P = 1 gets 4 stages
#endif
#ifndef BK_MULTICAST
#define BK_MULTICAST 1  // 0: each CTA loads its whole weight tile (clusters without multicast)
#endif
// 1: ping-pong consumers (CUTLASS's KernelTmaWarpSpecializedPingpong): each warpgroup computes whole 128-row tiles,
// the CTA's even tiles on warpgroup 0 and odd ones on warpgroup 1, so one warpgroup's epilogue runs under the other's
// main loop instead of both stopping the tensor cores for it. A warpgroup's 168-232 registers hold 128 accumulator
// values a thread, so its tile is 128 x 128 (P = 2: 128 x 64 of gate and of up): wgmma m64n128k16 (m64n64k16) twice
// per 16-wide K slice instead of the cooperative m64n256k16 (m64n128k16) once. Each output element still sums the
// same k16 slices in K order onto an fp32 accumulator from zero; whether the instruction's N changes an element's bits
// is what the probe's bit check answers.
#ifndef BK_PINGPONG
#define BK_PINGPONG 0
#endif
// 1: a consumer warpgroup whose 64 rows of a tile all lie past the tile's segment skips its wgmma (see the kernel)
#ifndef BK_SKIP_HALF
#define BK_SKIP_HALF 1
#endif
#if BK_PINGPONG && BK_DIRECT
#error "BK_PINGPONG keeps the shared-memory epilogue (BK_DIRECT=0)"
#endif

namespace {

constexpr int BM = 128, BK = 64, CONSUMERS = 2, THREADS = 128 * (CONSUMERS + 1);
constexpr int WROWS = BK_PINGPONG ? 128 : 256;  // weight rows of a stage (P = 2: half gate rows, half up rows)
constexpr int SLABS = BK_PINGPONG ? 2 : 1;      // 64-row slabs a consumer warpgroup computes of each of its tiles
constexpr int A_BYTES = BM * BK * 2, B_BYTES = WROWS * BK * 2;

template <int P>
struct Cfg {
  static constexpr int BN = WROWS / P;  // output columns of a tile: 256 / 128 (P = 2); ping-pong 128 / 64
  static constexpr int STAGES = BK_PINGPONG ? (P == 1 ? 5 : 6)  // 32 KB stages beside 64 KB (32 KB) of epilogue
                                            : (P == 1 && !BK_DIRECT) ? 3 : 4;  // the Gluon kernel's ring depths
  static constexpr int SUBS = BN / 64 > 0 ? BN / 64 : 1;  // 64x64 output sub-tiles per 64-row slab
  static constexpr int SLAB_REGS = 128 / SLABS;  // a slab's accumulator values per thread (P = 2: gate, then up)
  static constexpr int C_ELEMS = CONSUMERS * SLABS * 64 * BN;  // epilogue tiles of both warpgroups
};

template <int P>
struct __align__(1024) Smem {
  __nv_bfloat16 a[Cfg<P>::STAGES][BM * BK];     // 16 KB a stage, 128B-swizzled by TMA
  __nv_bfloat16 b[Cfg<P>::STAGES][WROWS * BK];  // 32 KB (ping-pong 16 KB) a stage: weight rows (P = 2: gate, up)
  __nv_bfloat16 c[BK_DIRECT ? 64 : Cfg<P>::C_ELEMS];  // epilogue: per warpgroup and slab SUBS swizzled 64x64 tiles
  uint64_t full[Cfg<P>::STAGES], empty[Cfg<P>::STAGES], res[CONSUMERS];
  uint64_t order[CONSUMERS];  // ping-pong: warpgroup w may start its next tile's K loop (see the kernel)
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@!P1 bra.uni WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void mbar_arrive_local(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Arrive on the barrier at the same shared-memory offset in CTA `cta` of the cluster (this CTA included), with the
// instruction's default semantics (release at CTA scope), as CUTLASS's ClusterBarrier::arrive(cta_id) does: the
// stage's readers were wgmma, already retired. `BK_RELEASE_CLUSTER=1` asks for `.release.cluster` instead, which
// ptxas compiles to MEMBAR.ALL.GPU (+ ERRBAR, CGAERRBAR) before the arrive — in the first version of this probe,
// once per K step in warp 0 of each consumer warpgroup, stalling the whole warpgroup's next wgmma (found in the SASS
// after the variants' call: the CUDA mainloop ran 0.63-0.70x the Gluon kernel with or without clusters).
#ifndef BK_RELEASE_CLUSTER
#define BK_RELEASE_CLUSTER 0
#endif
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
#if BK_RELEASE_CLUSTER
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(cta)
      : "memory");
#else
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(cta)
      : "memory");
#endif
}

__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
      ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// The same tile into the same offset of every CTA in `mask`; each one's barrier at `bar`'s offset counts the bytes.
__device__ __forceinline__ void tma_load_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                                   uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}

__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.tile.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(smem_addr(src)), "r"(c0), "r"(c1)
               : "memory");
}

// K-major operand tile with 128B swizzle: 8-row groups 1024 bytes apart (stride byte offset 64 x 16 B).
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  return 0x4000004000000000ull | ((smem_addr(p) & 0x3FFFF) >> 4);
}

#define BK_ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                   "+f"(d[i + 6]), "+f"(d[i + 7])
#define BK_ACC64(i) BK_ACC8(i), BK_ACC8(i + 8), BK_ACC8(i + 16), BK_ACC8(i + 24), BK_ACC8(i + 32), BK_ACC8(i + 40), \
                    BK_ACC8(i + 48), BK_ACC8(i + 56)

// d += A(64x16, K-major) * B(256x16, K-major)^T (scale-d = 1: always onto d, as the Gluon kernel's wgmma).
__device__ __forceinline__ void wgmma_m64n256k16(float* d, uint64_t da, uint64_t db) {
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, 1, 1, 1, 0, 0;\n"
      "}\n"
      : BK_ACC64(0), BK_ACC64(64)
      : "l"(da), "l"(db));
}

// d += A(64x16) * B(128x16)^T
__device__ __forceinline__ void wgmma_m64n128k16(float* d, uint64_t da, uint64_t db) {
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, 1, 1, 1, 0, 0;\n"
      "}\n"
      : BK_ACC64(0)
      : "l"(da), "l"(db));
}

// d += A(64x16) * B(64x16)^T
__device__ __forceinline__ void wgmma_m64n64k16(float* d, uint64_t da, uint64_t db) {
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, 1, 1, 1, 0, 0;\n"
      "}\n"
      : BK_ACC8(0), BK_ACC8(8), BK_ACC8(16), BK_ACC8(24)
      : "l"(da), "l"(db));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// Not .aligned: the producer warp's lanes reach it apart (lane 0 issues the copies).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

__device__ __forceinline__ void wg_sync(int wg) { asm volatile("bar.sync %0, 128;" ::"r"(wg + 1) : "memory"); }

// Triton's fp32 SwiGLU arithmetic (routed_gemm_gluon._swiglu as compiled: 0 - g, x log2(e), ex2.approx, + 1,
// div.full), on gate and up already rounded to bf16.
__device__ __forceinline__ float swiglu(float gate, float up) {
  float g = __bfloat162float(__float2bfloat16_rn(gate)), t, e, den, s;
  asm("sub.f32 %0, 0f00000000, %1;" : "=f"(t) : "f"(g));
  asm("mul.f32 %0, %1, 0f3FB8AA3B;" : "=f"(t) : "f"(t));
  asm("ex2.approx.f32 %0, %1;" : "=f"(e) : "f"(t));
  asm("add.f32 %0, %1, 0f3F800000;" : "=f"(den) : "f"(e));
  asm("div.full.f32 %0, %1, %2;" : "=f"(s) : "f"(g), "f"(den));
  s = __bfloat162float(__float2bfloat16_rn(s));
  float u = __bfloat162float(__float2bfloat16_rn(up)), r;
  asm("mul.f32 %0, %1, %2;" : "=f"(r) : "f"(s), "f"(u));
  return r;
}

struct Routing {
  int M, b1, b2, b3, e0;
  __device__ __forceinline__ int row_tiles() const {
    return (b1 + BM - 1) / BM + (b2 - b1 + BM - 1) / BM + (b3 - b2 + BM - 1) / BM + (M - b3 + BM - 1) / BM;
  }
  // row tile mt -> first row, end of its segment, expert (routed_gemm_gluon._segment_rows)
  __device__ __forceinline__ void rows(int mt, int& m0, int& end, int& e) const {
    const int t0 = (b1 + BM - 1) / BM, t1 = t0 + (b2 - b1 + BM - 1) / BM, t2 = t1 + (b3 - b2 + BM - 1) / BM;
    if (mt >= t2) { m0 = b3 + (mt - t2) * BM; end = M; e = e0 ^ 1; }
    else if (mt >= t1) { m0 = b2 + (mt - t1) * BM; end = b3; e = e0; }
    else if (mt >= t0) { m0 = b1 + (mt - t0) * BM; end = b2; e = e0 ^ 1; }
    else { m0 = mt * BM; end = b1; e = e0; }
  }
};

// This CTA's share of cluster tile t: grouped order (GROUP pairs = the Gluon kernel's GROUP_M 8 row tiles per
// column sweep), then which row tile of the pair is this CTA's and whether the pair shares its weight tile.
struct Work {
  int m0, end, e, n0;
  bool here, multicast;
};

__device__ __forceinline__ Work work_of(int t, const Routing& r, int num_pairs, int num_row, int num_n, int bn,
                                        uint32_t rank) {
  constexpr int GROUP = 8 / BK_CLUSTER;
  const int per_group = GROUP * num_n, first = (t / per_group) * GROUP, size = min(num_pairs - first, GROUP);
  const int pair = first + (t % per_group) % size, nt = (t % per_group) / size;
  Work w;
  w.n0 = nt * bn;
  int m0a, enda, ea, m0b = 0, endb = 0, eb = -1;
  r.rows(BK_CLUSTER * pair, m0a, enda, ea);
  const bool second = BK_CLUSTER == 2 && 2 * pair + 1 < num_row;
  if (second) r.rows(2 * pair + 1, m0b, endb, eb);
  w.multicast = BK_MULTICAST && second && ea == eb;
  w.here = rank == 0 || second;
  w.m0 = rank == 0 ? m0a : m0b;
  w.end = rank == 0 ? enda : endb;
  w.e = rank == 0 ? ea : (second ? eb : ea);
  return w;
}

template <int P, bool HAS_BIAS, bool HAS_RES>
__global__ void __launch_bounds__(THREADS, 1) __cluster_dims__(BK_CLUSTER, 1, 1)
    routed_cluster_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                          const __grid_constant__ CUtensorMap out_map, const __grid_constant__ CUtensorMap res_map,
                          __nv_bfloat16* __restrict__ out, int ldo, const __nv_bfloat16* __restrict__ bias,
                          const __nv_bfloat16* __restrict__ res, int ldr, Routing r, int N, int K) {
  using C = Cfg<P>;
  constexpr int BN = C::BN, STAGES = C::STAGES, SUBS = C::SUBS, SLAB_REGS = C::SLAB_REGS;
  constexpr int UP = P == 2 ? SLAB_REGS / 2 : 0;  // where a slab's up accumulator starts (P = 2)
  constexpr int HALF = WROWS / 2;                 // weight rows each CTA of a multicasting pair loads
  constexpr int RELEASERS = BK_PINGPONG ? 1 : CONSUMERS;  // warpgroups of a CTA that read (and release) a stage
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  Smem<P>& s = *reinterpret_cast<Smem<P>*>(smem_raw);
  const uint32_t rank = cluster_rank();
  const int cluster = blockIdx.x / BK_CLUSTER, clusters = gridDim.x / BK_CLUSTER;
  const int num_row = r.row_tiles(), num_pairs = (num_row + BK_CLUSTER - 1) / BK_CLUSTER, num_n = (N + BN - 1) / BN;
  const int tiles = num_pairs * num_n, k_iters = (K + BK - 1) / BK;
  // warp-uniform (CUTLASS's canonical_warp_group_idx): the A descriptors can live in uniform registers
  const int wg = __shfl_sync(0xffffffff, threadIdx.x / 128, 0), tid = threadIdx.x % 128;

  if (threadIdx.x == 0) {
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(&s.full[i], 1);
      mbar_init(&s.empty[i], RELEASERS * BK_CLUSTER);  // the stage's readers in both CTAs release it
    }
    for (int i = 0; i < CONSUMERS; ++i) {
      mbar_init(&s.res[i], 1);
      mbar_init(&s.order[i], 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster_sync();

  if (wg == CONSUMERS) {  // producer warpgroup: one thread issues every copy, tile after tile in the CTA's order
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid == 0) {
      int it = 0;
      for (int t = cluster; t < tiles; t += clusters) {
        const Work w = work_of(t, r, num_pairs, num_row, num_n, BN, rank);
        // weight rows of half h of the stage: P = 1 rows [n0 + HALF h, +HALF) of expert e; P = 2 part h's rows
        const int h_row0 = P == 1 ? w.e * N + w.n0 : 2 * w.e * N + w.n0, h_step = P == 1 ? HALF : N;
        for (int kk = 0; kk < k_iters; ++kk, ++it) {
          const int st = it % STAGES;
          mbar_wait(&s.empty[st], ((it / STAGES) & 1) ^ 1);
          if (!w.here) {  // the pair's missing tile: keep the ring in step, load nothing
            mbar_expect_tx(&s.full[st], 0);
            continue;
          }
          mbar_expect_tx(&s.full[st], A_BYTES + B_BYTES);
          tma_load(s.a[st], &x_map, &s.full[st], kk * BK, w.m0);
          if (w.multicast) {
            tma_load_multicast(s.b[st] + rank * HALF * BK, &w_map, &s.full[st], kk * BK, h_row0 + rank * h_step,
                               0x3);
          } else {
            tma_load(s.b[st], &w_map, &s.full[st], kk * BK, h_row0);
            tma_load(s.b[st] + HALF * BK, &w_map, &s.full[st], kk * BK, h_row0 + h_step);
          }
        }
      }
    }
  } else {  // consumer warpgroup wg: cooperative, rows [64 wg, 64 wg + 64) of every tile; ping-pong, every other tile
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    // per slab: P = 1 its 64 x BN accumulator; P = 2 gate [0, UP) and up [UP, 2 UP), 64 x BN each
    float d[128];
    int res_phase = 0;
    const int warp = tid / 32, lane = tid % 32;
    const int slab0 = BK_PINGPONG ? 0 : wg;  // the tile's first 64-row slab this warpgroup computes
    __nv_bfloat16* c = s.c + wg * (SLABS * 64 * BN);
    for (int i = BK_PINGPONG ? wg : 0;; i += BK_PINGPONG ? CONSUMERS : 1) {
      const int t = cluster + i * clusters;
      if (t >= tiles) break;
      int it = i * k_iters;  // the ring position of the tile's first K step (every tile has k_iters of them)
      const Work w = work_of(t, r, num_pairs, num_row, num_n, BN, rank);
      const int res_step = min(2, k_iters - 1);
      if (BK_PINGPONG && i > 0) {
        // Ping-pong order: a warpgroup runs tile i's K loop only once the other one has passed every "full" wait of
        // tile i - 1. Besides alternating the tensor cores between the two, this keeps a warpgroup's parity waits
        // within one phase of the ring: its tile's first STAGES positions reuse stages whose previous fill was for
        // tile i - 1, and a parity wait cannot tell a fill from the one two phases later.
        // Completions of order[wg]: one per tile of the other warpgroup, tiles wg - 1, wg + 1, ... in turn.
        mbar_wait(&s.order[wg], ((i - 1) / 2) & 1);
      }
      // The pair's missing tile, or (cooperative, BK_SKIP_HALF) a warpgroup whose 64 rows all lie past its tile's
      // segment (a segment's last tile of 1-64 rows: the 4 marker rows, a row count's remainder): follow the ring,
      // release every stage, compute and store nothing. Those rows are not the tile's, so no output bit changes;
      // the tensor cores do the tile's other half alone.
      if (!w.here || (BK_SKIP_HALF && !BK_PINGPONG && w.m0 + 64 * slab0 >= w.end)) {
        for (int kk = 0; kk < k_iters; ++kk, ++it) {
          mbar_wait(&s.full[it % STAGES], (it / STAGES) & 1);
          if (tid < BK_CLUSTER) mbar_arrive_cluster(&s.empty[it % STAGES], tid);
          __syncwarp();
        }
        if (BK_PINGPONG && tid == 0) mbar_arrive_local(&s.order[wg ^ 1]);
        continue;
      }
#pragma unroll
      for (int q = 0; q < 128; ++q) d[q] = 0.f;
      for (int kk = 0; kk < k_iters; ++kk, ++it) {
        const int st = it % STAGES;
        mbar_wait(&s.full[st], (it / STAGES) & 1);
        wgmma_fence();
        const __nv_bfloat16* b = s.b[st];
#pragma unroll
        for (int sl = 0; sl < SLABS; ++sl) {
          const __nv_bfloat16* a = s.a[st] + (slab0 + sl) * 64 * BK;
          float* ds = d + sl * SLAB_REGS;
          if constexpr (P == 1 && !BK_PINGPONG) {
#pragma unroll
            for (int k = 0; k < BK / 16; ++k) wgmma_m64n256k16(ds, smem_desc(a + 16 * k), smem_desc(b + 16 * k));
          } else if constexpr (P == 1) {
#pragma unroll
            for (int k = 0; k < BK / 16; ++k) wgmma_m64n128k16(ds, smem_desc(a + 16 * k), smem_desc(b + 16 * k));
          } else if constexpr (!BK_PINGPONG) {
#pragma unroll
            for (int k = 0; k < BK / 16; ++k) wgmma_m64n128k16(ds, smem_desc(a + 16 * k), smem_desc(b + 16 * k));
#pragma unroll
            for (int k = 0; k < BK / 16; ++k)
              wgmma_m64n128k16(ds + UP, smem_desc(a + 16 * k), smem_desc(b + HALF * BK + 16 * k));
          } else {
#pragma unroll
            for (int k = 0; k < BK / 16; ++k) wgmma_m64n64k16(ds, smem_desc(a + 16 * k), smem_desc(b + 16 * k));
#pragma unroll
            for (int k = 0; k < BK / 16; ++k)
              wgmma_m64n64k16(ds + UP, smem_desc(a + 16 * k), smem_desc(b + HALF * BK + 16 * k));
          }
        }
        wgmma_commit();
#if BK_WAIT0
        wgmma_wait<0>();  // this K step's group is done: release its stage in both CTAs
        if (tid < BK_CLUSTER) mbar_arrive_cluster(&s.empty[st], tid);
#else
        wgmma_wait<1>();  // the previous K step's group is done: release its stage in both CTAs
        if (kk > 0 && tid < BK_CLUSTER) mbar_arrive_cluster(&s.empty[(it + STAGES - 1) % STAGES], tid);
#endif
        __syncwarp();
        if (HAS_RES && !BK_DIRECT && kk == res_step && tid == 0) {
          // the residual tile by TMA into c, once the previous tile's store has read c; lands under the mainloop
          asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
          mbar_expect_tx(&s.res[wg], SLABS * 64 * BN * 2);
#pragma unroll
          for (int sl = 0; sl < SLABS; ++sl)
#pragma unroll
            for (int sub = 0; sub < SUBS; ++sub)
              tma_load(c + (sl * SUBS + sub) * 64 * 64, &res_map, &s.res[wg], w.n0 + 64 * sub,
                       w.m0 + 64 * (slab0 + sl));
        }
      }
      if (BK_PINGPONG && tid == 0) mbar_arrive_local(&s.order[wg ^ 1]);  // the other warpgroup's K loop may start
#if !BK_WAIT0
      wgmma_wait<0>();
      if (tid < BK_CLUSTER) mbar_arrive_cluster(&s.empty[(it + STAGES - 1) % STAGES], tid);
      __syncwarp();
#endif

      // epilogue: rows past the segment's end (a tile reaching into the next segment) go through masked
      // pointer stores; other tiles through swizzled 64x64 sub-tiles and TMA stores
      const bool via_rows = BK_DIRECT || w.end < min(w.m0 + BM, r.M);
      if (BK_DIRECT) {
      } else if (HAS_RES) {
        mbar_wait(&s.res[wg], res_phase);
        res_phase ^= 1;
      } else {
        if (tid == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
        wg_sync(wg);
      }
#pragma unroll
      for (int sl = 0; sl < SLABS; ++sl) {
        __nv_bfloat16* cs = c + sl * SUBS * 64 * 64;
        const float* ds = d + sl * SLAB_REGS;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {  // n8 block j: columns 8j + 2 (lane % 4) + {0, 1}, rows r and r + 8
          const int col = 8 * j + 2 * (lane % 4), sub = col / 64, chunk = (col % 64) / 8, gcol = w.n0 + col;
          float bias0[2] = {0.f, 0.f}, bias1[2] = {0.f, 0.f};
          if (HAS_BIAS) {
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              const bool ok = gcol + q < N;
              bias0[q] = ok ? __bfloat162float(bias[(w.e * P) * N + gcol + q]) : 0.f;
              if (P == 2) bias1[q] = ok ? __bfloat162float(bias[(w.e * P + 1) * N + gcol + q]) : 0.f;
            }
          }
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = 16 * warp + lane / 4 + 8 * h;
            float v[2];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              float acc = ds[4 * j + 2 * h + q];
              if (HAS_BIAS) acc += bias0[q];
              if constexpr (P == 2) {
                float up = ds[UP + 4 * j + 2 * h + q];
                if (HAS_BIAS) up += bias1[q];
                acc = swiglu(acc, up);
              }
              v[q] = acc;
            }
            __nv_bfloat162* slot = reinterpret_cast<__nv_bfloat162*>(
                reinterpret_cast<uint8_t*>(cs + sub * 64 * 64) + row * 128 + ((chunk ^ (row & 7)) * 16) +
                (col % 8) * 2);
            __nv_bfloat162 o = __floats2bfloat162_rn(v[0], v[1]);
            const int grow = w.m0 + 64 * (slab0 + sl) + row;
            if (HAS_RES) {  // res + the rounded projection, as eager's x + o_proj(a)
              __nv_bfloat162 rv;
              if (BK_DIRECT) {
                const bool in = grow < w.end && gcol + 1 < N;  // (N is even in the model; a ragged column is not read)
                rv = in ? *reinterpret_cast<const __nv_bfloat162*>(res + (size_t)grow * ldr + gcol)
                        : __floats2bfloat162_rn(0.f, 0.f);
              } else {
                rv = *slot;
              }
              o = __floats2bfloat162_rn(__bfloat162float(rv.x) + __bfloat162float(o.x),
                                        __bfloat162float(rv.y) + __bfloat162float(o.y));
            }
            if (via_rows) {
              if (grow < w.end) {
                if (gcol + 1 < N) *reinterpret_cast<__nv_bfloat162*>(out + (size_t)grow * ldo + gcol) = o;
                else if (gcol < N) out[(size_t)grow * ldo + gcol] = o.x;
              }
            } else {
              *slot = o;
            }
          }
        }
      }
      if (BK_DIRECT) continue;
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      wg_sync(wg);
      if (tid == 0 && !via_rows) {
#pragma unroll
        for (int sl = 0; sl < SLABS; ++sl)
#pragma unroll
          for (int sub = 0; sub < SUBS; ++sub)
            tma_store(&out_map, c + (sl * SUBS + sub) * 64 * 64, w.n0 + 64 * sub, w.m0 + 64 * (slab0 + sl));
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      }
    }
    if (tid == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  }
  __syncwarp();
  cluster_sync();  // the partner may still arrive on this CTA's barriers until it is done
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (!fn) {
    cudaDriverEntryPointQueryResult q;
    void* p = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) ==
            cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }
  return fn;
}

// 2-D bf16 map of a row-major (rows, cols) matrix with row stride ld elements, box (box_rows, 64), 128B swizzle.
int make_map(CUtensorMap* map, const void* ptr, int rows, int cols, int ld, int box_rows) {
  auto fn = encode_fn();
  if (!fn) return 1;
  cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  cuuint64_t strides[1] = {(cuuint64_t)ld * 2};
  cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
  cuuint32_t estr[2] = {1, 1};
  CUresult r = fn(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(ptr), dims, strides, box, estr,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? 0 : 2;
}

template <int P, bool HAS_BIAS, bool HAS_RES>
int launch(const CUtensorMap& xm, const CUtensorMap& wm, const CUtensorMap& om, const CUtensorMap& rm, void* out,
           int ldo, const void* bias, const void* res, int ldr, Routing r, int N, int K, int clusters,
           cudaStream_t stream) {
  auto kernel = routed_cluster_kernel<P, HAS_BIAS, HAS_RES>;
  const int smem = sizeof(Smem<P>);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  kernel<<<BK_CLUSTER * clusters, THREADS, smem, stream>>>(xm, wm, om, rm, static_cast<__nv_bfloat16*>(out), ldo,
                                                  static_cast<const __nv_bfloat16*>(bias),
                                                  static_cast<const __nv_bfloat16*>(res), ldr, r, N, K);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? 0 : 1000 + (int)e;
}

}  // namespace

// out (M, N), row stride ldo = act(x (M, K) @ w[e, p]^T + bias[e, p]) (+ res, row stride ldr) with w (E, P, N, K)
// contiguous, bias (E, P, N) or null, res or null; P = 2 is SwiGLU (no residual). Rows: segments [0, b1), [b1, b2),
// [b2, b3), [b3, M) of experts e0, e0^1, e0, e0^1. Returns 0, or 1 (no driver entry point), 2 (a tensor map
// refused), 3 (unsupported combination), 1000 + a CUDA error.
extern "C" int bk_routed_gemm_cluster(const void* x, const void* w, void* out, const void* bias, const void* res,
                                      int M, int N, int K, int E, int P, int b1, int b2, int b3, int e0, int ldo,
                                      int ldr, int clusters, cudaStream_t stream) {
  CUtensorMap xm, wm, om, rm;
  int err = make_map(&xm, x, M, K, K, BM);
  if (!err) err = make_map(&wm, w, E * P * N, K, K, WROWS / 2);
  if (!err) err = make_map(&om, out, M, N, ldo, 64);
  if (!err) err = make_map(&rm, res ? res : out, M, N, res ? ldr : ldo, 64);
  if (err) return err;
  const Routing r{M, b1, b2, b3, e0};
  const bool hb = bias != nullptr, hr = res != nullptr;
#define BK_LAUNCH(P_, B_, R_) launch<P_, B_, R_>(xm, wm, om, rm, out, ldo, bias, res, ldr, r, N, K, clusters, stream)
  if (P == 1 && !hb && !hr) return BK_LAUNCH(1, false, false);
  if (P == 1 && hb && !hr) return BK_LAUNCH(1, true, false);
  if (P == 1 && !hb && hr) return BK_LAUNCH(1, false, true);
  if (P == 2 && !hr && !hb) return BK_LAUNCH(2, false, false);
  if (P == 2 && !hr && hb) return BK_LAUNCH(2, true, false);
#undef BK_LAUNCH
  return 3;
}

// How many 2-CTA clusters of the plain kernel fit on the device at once (0 on error).
extern "C" int bk_gemm_cluster_max_clusters() {
  auto kernel = routed_cluster_kernel<1, false, false>;
  const int smem = sizeof(Smem<1>);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(sms / BK_CLUSTER * BK_CLUSTER);
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = smem;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) == cudaSuccess && n > 0) return n;  // its __cluster_dims__
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = BK_CLUSTER;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) return 0;
  return n;
}
