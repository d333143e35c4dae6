// A CUDA emulator for running the kernels of csrc/cuda/ (attention, masking, sampling,
// denoising) on the CPU, unchanged, when no GPU is at hand (the test build only; the package
// never includes this file).
//
// The .cu sources are compiled as C++ with PK_CUDA_EMULATION defined. Their few CUDA-only
// spellings go through small seams (csrc/cuda/cuda_seams.cuh: PK_LAUNCH,
// PK_CUDA_LIBRARY_IMPL, dynamic_smem, on_kernel_device; an emulation branch in the PTX
// wrappers); everything else, launchers and kernels alike, is the code that runs on the GPU.
//
// How a launch runs: the blocks of the grid run one after the other; the threads of a
// block run as cooperative fibers (ucontext) on the calling thread, each until it reaches a
// barrier. That gives the execution model the kernels rely on and checks some of it:
//   * __syncthreads / __syncwarp are real barriers over the block / warp; a barrier that
//     the threads of a block reach from different lines of code is reported, as are a
//     thread that exits while others wait at one and a deadlock;
//   * warp shuffles, ldmatrix and mma.sync m16n8k16 are warp-collective: every lane deposits
//     its registers (or row address), and the result is built from the layouts of the PTX
//     ISA ("Matrix fragments for mma.m16n8k16", "ldmatrix"), not from the kernels' own index
//     arithmetic; a collective with lanes missing (exited or diverged) and an ldmatrix row
//     that is not 16-byte aligned are reported;
//   * cp.async copies are deferred until the thread's cp.async.wait_group retires their
//     group, so a tile read before its wait (or without the barrier that publishes other
//     threads' copies) reads stale data; in the eager mode they land at once instead, so a
//     prefetch into a buffer that other warps have not finished reading corrupts it;
//   * threads are resumed round-robin (warps move in near lockstep) or, in the run-ahead
//     mode, lowest-numbered first (warp 0 reaches each __syncthreads before warp 1 starts);
//   * dynamic shared memory is filled with 0xFF bytes (NaN in every float format) when a
//     block starts, so reading shared memory nobody wrote shows up as NaN;
//   * launch limits: block size, grid extents, and dynamic shared memory above 48 KB
//     without cudaFuncSetAttribute (or above the 227 KB of sm_90);
//   * votes and shuffles with a partial mask (__ballot_sync, __match_any_sync) wait for
//     exactly the lanes of the mask; atomics are plain read-modify-writes (fibers switch only
//     at barriers), counted in stats() so that tests can tell whether a kernel used them;
//   * blocks run one after the other, so a block that waits for an earlier block's post (the
//     ordered dQ turns of the attention backward) must find it already there: the kernels'
//     emulation branch checks the exact value instead of spinning;
//   * cub::BlockReduce / cub::BlockScan are re-implemented with CUB's contracts: a reduction's
//     result only in thread 0 (0xFF bytes elsewhere), no barrier after the collective (a
//     caller that reuses TempStorage without one races, as on the GPU); static __shared__
//     variables are shared by the fibers of a block.
// What it cannot show: timing, register pressure, memory-model races beyond the above,
// bank conflicts, and any difference between the PTX ISA's description and the silicon.
#pragma once
#ifndef PK_CUDA_EMULATION
#error "cuda_emulation.h is for the emulated build only"
#endif

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <math.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// ---- CUDA spellings ---------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __syncthreads() ::pk::emu::sync_block(__LINE__)
#define C10_CUDA_CHECK(expr) ((void)(expr))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// 16-bit floats with the bit layout of cuda_fp16.h / cuda_bf16.h (a pair: x in the low half).
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.x, c10::Half::from_bits())); }
inline __half __float2half_rn(float f) { return {c10::Half(f).x}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline float __bfloat162float(__nv_bfloat16 h) {
  return static_cast<float>(c10::BFloat16(h.x, c10::BFloat16::from_bits()));
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {c10::BFloat16(f).x}; }  // nearest even
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }

namespace pk {
namespace emu {

// ---- the emulated device ----------------------------------------------------------------------

struct DeviceProps {
  int major = 9, minor = 0;
  int multiProcessorCount = 4;  // few, so that split-KV engages on small test shapes
  // cp.async timing: false lands a copy when wait_group retires it (exposes reads before the
  // wait), true lands it at once (exposes a copy into a buffer other warps still read)
  bool eager_copies = false;
  // scheduling: false resumes the threads round-robin (warps move in near lockstep), true
  // always resumes the lowest-numbered thread that can move, so warp 0 runs ahead to the next
  // __syncthreads before warp 1 starts (exposes a missing barrier between warps)
  bool run_ahead = false;
};
inline DeviceProps& device_props() {
  static DeviceProps p;
  return p;
}

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, block_barriers = 0, warp_collectives = 0, mma = 0, atomics = 0;
};
inline Stats& stats() {
  static Stats s;
  return s;
}

// ---- fibers -------------------------------------------------------------------------------------

struct PendingCopy {
  void* dst;
  const void* src;
  int src_bytes;  // 16, or 0 for a zero fill
};

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int linear = 0;
  bool done = false;
  const unsigned* wait_gen = nullptr;  // blocked until *wait_gen != wait_val (a barrier's generation)
  unsigned wait_val = 0;
  std::vector<PendingCopy> open;              // cp.async copies not yet committed
  std::deque<std::vector<PendingCopy>> groups;  // committed, not yet retired
};

struct Warp {
  int live = 0, arrived = 0;
  unsigned gen = 0;
  uint64_t slot[32];
  uint32_t a[32][4], b[32][2];
  // a collective over a subset of the lanes (a partial mask): lanes arrived, the mask, generation
  unsigned sub_arrived = 0, sub_mask = 0, sub_gen = 0;
};

struct Block {
  dim3 block_idx, grid_dim, block_dim;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t sched;
  int cur = -1;
  int live = 0, arrived = 0, bar_line = -1;
  unsigned gen = 0;
  unsigned char* smem = nullptr;
  std::string error;
  const std::function<void()>* body = nullptr;
};

inline thread_local Block* g_block = nullptr;

inline Block& block() { return *g_block; }
inline Fiber& self() { return g_block->fibers[g_block->cur]; }
inline int lane() { return self().linear & 31; }
inline Warp& my_warp() { return g_block->warps[self().linear >> 5]; }

inline void yield() { swapcontext(&self().ctx, &g_block->sched); }

// Blocks the calling thread until the barrier generation *gen moves past `seen`.
inline void wait_for(const unsigned* gen, unsigned seen) {
  Fiber& f = self();
  while (*gen == seen) {
    f.wait_gen = gen;
    f.wait_val = seen;
    yield();
  }
  f.wait_gen = nullptr;
}

// Records the first error and parks the fiber for good (the scheduler stops the block).
[[noreturn]] inline void fail(const std::string& what) {
  Block& b = block();
  if (b.error.empty()) {
    b.error = what + " (block " + std::to_string(b.block_idx.x) + "," + std::to_string(b.block_idx.y) + "," +
              std::to_string(b.block_idx.z) + ", thread " + std::to_string(self().linear) + ")";
  }
  static const unsigned never = 0;
  for (;;) wait_for(&never, 0);
}

inline void release_if_complete(Block& b) {
  if (b.arrived > 0 && b.arrived >= b.live) {
    b.arrived = 0;
    ++b.gen;
  }
}
inline void release_if_complete(Warp& w) {
  if (w.arrived > 0 && w.arrived >= w.live) {
    w.arrived = 0;
    ++w.gen;
  }
}

inline void sync_block(int line) {
  Block& b = block();
  if (b.arrived == 0)
    b.bar_line = line;
  else if (b.bar_line != line)
    fail("__syncthreads reached from different lines (" + std::to_string(b.bar_line) + " and " +
         std::to_string(line) + "): divergent barrier");
  ++stats().block_barriers;
  const unsigned gen = b.gen;
  ++b.arrived;
  release_if_complete(b);
  wait_for(&b.gen, gen);
}

// A barrier over the calling thread's warp. `full`: every lane of the warp must take part
// (the warp-collective operations of the kernels all use the full mask).
inline void sync_warp(bool full) {
  Warp& w = my_warp();
  if (full && w.live != 32) fail("warp-collective operation with " + std::to_string(w.live) + " live lanes");
  const unsigned gen = w.gen;
  ++w.arrived;
  release_if_complete(w);
  wait_for(&w.gen, gen);
}

inline void fiber_main() {
  Block& b = block();
  (*b.body)();
  Fiber& f = self();
  // Exiting while others wait at __syncthreads is legal on Volta and later, but in these
  // kernels it can only mean a barrier inside divergent code.
  if (b.arrived > 0) fail("thread exited while " + std::to_string(b.arrived) + " threads wait at __syncthreads (line " +
                          std::to_string(b.bar_line) + "): divergent barrier");
  f.done = true;
  f.open.clear();
  f.groups.clear();
  --b.live;
  --b.warps[f.linear >> 5].live;
  release_if_complete(b);
  release_if_complete(b.warps[f.linear >> 5]);
  // returning resumes the scheduler through uc_link
}

class StackPool {
 public:
  static constexpr size_t kBytes = 256 * 1024;
  char* get(size_t i) {
    while (stacks_.size() <= i) stacks_.emplace_back(new char[kBytes]);
    return stacks_[i].get();
  }

 private:
  std::vector<std::unique_ptr<char[]>> stacks_;
};

inline std::string run_block(const std::function<void()>& body, dim3 bidx, dim3 grid, dim3 bdim, size_t smem_bytes,
                             std::vector<unsigned char>& smem) {
  static thread_local StackPool pool;
  Block b;
  b.block_idx = bidx;
  b.grid_dim = grid;
  b.block_dim = bdim;
  b.body = &body;
  const int n = static_cast<int>(bdim.x * bdim.y * bdim.z);
  b.fibers.resize(n);
  b.warps.resize((n + 31) / 32);
  b.live = n;
  for (int i = 0; i < n; ++i) b.warps[i >> 5].live++;
  smem.assign(smem_bytes + 16, 0xFF);
  b.smem = smem.data();
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = dim3(i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = pool.get(i);
    f.ctx.uc_stack.ss_size = StackPool::kBytes;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  Block* saved = g_block;
  g_block = &b;
  // Only threads whose barrier has opened are resumed. Round-robin by default; run_ahead
  // resumes the lowest-numbered movable thread after every step.
  const bool run_ahead = device_props().run_ahead;
  for (;;) {
    bool alive = false, ran = false;
    for (int i = 0; i < n && b.error.empty(); ++i) {
      Fiber& f = b.fibers[i];
      if (f.done) continue;
      alive = true;
      if (f.wait_gen != nullptr && *f.wait_gen == f.wait_val) continue;
      ran = true;
      b.cur = i;
      swapcontext(&b.sched, &f.ctx);
      if (run_ahead) break;
    }
    if (!alive || !b.error.empty()) break;
    if (!ran) {
      b.error = "deadlock: every remaining thread waits at a barrier the others never reach (block " +
                std::to_string(bidx.x) + "," + std::to_string(bidx.y) + "," + std::to_string(bidx.z) + ")";
      break;
    }
  }
  g_block = saved;
  stats().threads += n;
  return b.error;
}

// ---- kernel launch ---------------------------------------------------------------------------

inline std::map<const void*, int>& smem_attribute() {
  static std::map<const void*, int> m;
  return m;
}

template <typename... P>
void run_grid(void (*kernel)(P...), dim3 grid, dim3 block_dim, size_t smem_bytes, std::tuple<std::decay_t<P>...> args) {
  const int64_t threads = int64_t(block_dim.x) * block_dim.y * block_dim.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024, "emulated launch: ", threads, " threads per block");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535,
              "emulated launch: grid (", grid.x, ", ", grid.y, ", ", grid.z, ") out of range");
  const auto it = smem_attribute().find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = it == smem_attribute().end() ? 48 * 1024 : static_cast<size_t>(it->second);
  TORCH_CHECK(smem_bytes <= allowed, "emulated launch: ", smem_bytes,
              " bytes of dynamic shared memory without cudaFuncSetAttribute allowing it (", allowed, ")");
  ++stats().launches;
  const std::function<void()> body = [&]() { std::apply(kernel, args); };
  std::vector<unsigned char> smem;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        const std::string err = run_block(body, dim3(x, y, z), grid, block_dim, smem_bytes, smem);
        ++stats().blocks;
        TORCH_CHECK(err.empty(), "emulated kernel: ", err);
      }
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block_dim;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    run_grid(kernel, grid, block_dim, smem, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...));
  }
};
template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block_dim, size_t smem, void (*kernel)(P...)) {
  return Launch<P...>{kernel, grid, block_dim, smem};
}

template <typename... P>
cudaError_t set_smem_attribute(void (*kernel)(P...), int value) {
  TORCH_CHECK(value <= 227 * 1024, "cudaFuncSetAttribute: ", value, " bytes of shared memory exceed sm_90's 227 KB");
  smem_attribute()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// ---- device-side operations ---------------------------------------------------------------

template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(block().smem);
}

template <typename T>
T shuffle(unsigned mask, T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  if (mask != 0xffffffffu) fail("warp shuffle with a partial mask (not emulated)");
  ++stats().warp_collectives;
  Warp& w = my_warp();
  std::memcpy(&w.slot[lane()], &v, sizeof(T));
  sync_warp(true);
  T r;
  std::memcpy(&r, &w.slot[src_lane & 31], sizeof(T));
  sync_warp(true);
  return r;
}

// A barrier over the lanes of `mask` (the calling lane among them), for the *_sync intrinsics
// called with a partial mask: every lane of the mask must arrive, with the same mask.
inline void sync_warp_mask(unsigned mask) {
  Warp& w = my_warp();
  const unsigned bit = 1u << lane();
  if ((mask & bit) == 0u) fail("warp collective called by a lane outside its mask");
  if (w.sub_arrived == 0u)
    w.sub_mask = mask;
  else if (w.sub_mask != mask)
    fail("warp collectives with different masks in flight");
  const unsigned gen = w.sub_gen;
  w.sub_arrived |= bit;
  if (w.sub_arrived == mask) {
    w.sub_arrived = 0u;
    ++w.sub_gen;
  }
  wait_for(&w.sub_gen, gen);
}

// Every lane of `mask` deposits v; f(slots) runs on each lane once all have (the slots of
// lanes outside the mask are unspecified).
template <typename T, typename F>
auto warp_exchange(unsigned mask, T v, F f) {
  static_assert(sizeof(T) <= 8, "warp exchange of a value wider than 8 bytes");
  ++stats().warp_collectives;
  Warp& w = my_warp();
  std::memcpy(&w.slot[lane()], &v, sizeof(T));
  if (mask == 0xffffffffu)
    sync_warp(true);
  else
    sync_warp_mask(mask);
  const auto r = f(w.slot);
  if (mask == 0xffffffffu)
    sync_warp(true);
  else
    sync_warp_mask(mask);
  return r;
}

// cp.async: queued per thread, performed when cp.async.wait_group retires the group.
inline void copy16(const PendingCopy& c) {
  if (c.src_bytes > 0)
    std::memcpy(c.dst, c.src, 16);
  else
    std::memset(c.dst, 0, 16);
}
inline void cp_async16(void* dst, const void* src, int src_bytes) {
  if (device_props().eager_copies)
    copy16({dst, src, src_bytes});
  else
    self().open.push_back({dst, src, src_bytes});
}
inline void cp_async_commit() {
  Fiber& f = self();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
inline void cp_async_wait(int keep) {
  Fiber& f = self();
  while (static_cast<int>(f.groups.size()) > keep) {
    for (const PendingCopy& c : f.groups.front()) copy16(c);
    f.groups.pop_front();
  }
}

template <typename T>
inline float half_bits_to_float(uint32_t bits) {
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(__half{static_cast<uint16_t>(bits)});
  else
    return __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(bits)});
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C over the warp, built from the
// PTX ISA fragment layout with g = lane >> 2, t = lane & 3, element i of a fragment being
// bits [16 (i & 1), 16 (i & 1) + 16) of register i >> 1:
//   A (16x16): row g + 8 ((i >> 1) & 1), col 2t + (i & 1) + 8 (i >= 4)
//   B (16x8):  row 2t + (i & 1) + 8 (i >= 2), col g
//   C, D (16x8, float): row g + 8 (i >= 2), col 2t + (i & 1)
// Products are exact and summed in double, then rounded once (the hardware's order of
// fp32 additions is unspecified; the difference is far below the tests' tolerances).
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ++stats().mma;
  Warp& w = my_warp();
  const int ln = lane();
  for (int r = 0; r < 4; ++r) w.a[ln][r] = a[r];
  w.b[ln][0] = b0;
  w.b[ln][1] = b1;
  sync_warp(true);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 8; ++i) {
      const uint32_t bits = w.a[l][i >> 1] >> (16 * (i & 1));
      A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >= 4)] = half_bits_to_float<T>(bits & 0xffffu);
    }
    for (int i = 0; i < 4; ++i) {
      const uint32_t bits = w.b[l][i >> 1] >> (16 * (i & 1));
      B[2 * t + (i & 1) + 8 * (i >= 2)][g] = half_bits_to_float<T>(bits & 0xffffu);
    }
  }
  const int g = ln >> 2, t = ln & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
    double acc = d[i];
    for (int k = 0; k < 16; ++k) acc += double(A[row][k]) * double(B[k][col]);
    d[i] = static_cast<float>(acc);
  }
  sync_warp(true);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane j gives the address of row j % 8 of
// matrix j / 8 (16 contiguous bytes, 16-byte aligned); register i of lane l receives two
// elements of matrix i: row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1, or with .trans
// rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4 (the lower-indexed element in the low half).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans) {
  ++stats().warp_collectives;
  Warp& w = my_warp();
  const int ln = lane();
  if (reinterpret_cast<uintptr_t>(row_addr) % 16 != 0) fail("ldmatrix: a row address is not 16-byte aligned");
  static_assert(sizeof(const void*) <= sizeof(uint64_t), "pointer width");
  std::memcpy(&w.slot[ln], &row_addr, sizeof(row_addr));
  sync_warp(true);
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int row = trans ? 2 * (ln % 4) + h : ln / 4;
      const int col = trans ? ln / 4 : 2 * (ln % 4) + h;
      const uint16_t* rp;
      std::memcpy(&rp, &w.slot[8 * i + row], sizeof(rp));
      e[h] = rp[col];
    }
    r[i] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
  }
  sync_warp(true);
}

}  // namespace emu
}  // namespace pk

// ---- CUDA built-ins on top of the fibers --------------------------------------------------

#define threadIdx (::pk::emu::self().tid)
#define blockIdx (::pk::emu::block().block_idx)
#define blockDim (::pk::emu::block().block_dim)
#define gridDim (::pk::emu::block().grid_dim)

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
  return ::pk::emu::shuffle(mask, v, src_lane);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return ::pk::emu::shuffle(mask, v, ::pk::emu::lane() ^ lane_mask);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::pk::emu::sync_warp(mask == 0xffffffffu); }
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  const int src = ::pk::emu::lane() - static_cast<int>(delta);
  const T r = ::pk::emu::shuffle(mask, v, src < 0 ? ::pk::emu::lane() : src);  // every lane takes part
  return src < 0 ? v : r;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return ::pk::emu::warp_exchange(mask, uint64_t(pred != 0), [&](const uint64_t* slot) {
    unsigned r = 0u;
    for (int l = 0; l < 32; ++l)
      if (((mask >> l) & 1u) && slot[l] != 0) r |= 1u << l;
    return r;
  });
}
inline unsigned __match_any_sync(unsigned mask, unsigned value) {
  return ::pk::emu::warp_exchange(mask, uint64_t(value), [&](const uint64_t* slot) {
    unsigned r = 0u;
    for (int l = 0; l < 32; ++l)
      if (((mask >> l) & 1u) && slot[l] == value) r |= 1u << l;
    return r;
  });
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
// Fibers switch only at barriers, so a read-modify-write is atomic as it stands.
template <typename T>
inline T atomicAdd(T* addr, T v) {
  ++::pk::emu::stats().atomics;
  const T old = *addr;
  *addr = old + v;
  return old;
}
// Blocks run one after the other and fibers share one memory: fences and cache hints are moot.
inline void __threadfence() {}
template <typename T>
inline T __ldcg(const T* addr) {
  return *addr;
}

// The CUB block primitives the kernels use (cub::BlockReduce, cub::BlockScan), with CUB's
// contracts and nothing more: every thread of the block calls them from the same place; a
// reduction's result is defined in thread 0 only (the others get 0xFF bytes: NaN, or all
// bits set); TempStorage may be reused only after a __syncthreads the caller writes (the
// primitives end without one, so a missing barrier lets a fast thread overwrite values a slow
// one still reads). Values combine in thread order, so results do not depend on a tree shape.
namespace cub {
namespace detail {
inline int block_threads() {
  const dim3& d = ::pk::emu::block().block_dim;
  return static_cast<int>(d.x * d.y * d.z);
}
inline int thread_rank() { return ::pk::emu::self().linear; }
template <typename T>
T poisoned() {
  T r;
  std::memset(static_cast<void*>(&r), 0xFF, sizeof(T));
  return r;
}
struct Plus {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return a + b;
  }
};
// The shared part of the block collectives: TempStorage with one value per thread of the
// block, and deposit(), which stores the caller's value and returns its rank once every thread
// has stored one.
template <typename T, int kThreads>
class BlockValues {
 public:
  struct TempStorage {
    T v[kThreads];
  };
  explicit BlockValues(TempStorage& t) : t_(t) {}

 protected:
  int deposit(T x, int line, const char* what) {
    TORCH_CHECK(block_threads() == kThreads, what, "<", kThreads, "> in a block of ", block_threads(), " threads");
    const int r = thread_rank();
    t_.v[r] = x;
    ::pk::emu::sync_block(line);
    return r;
  }
  TempStorage& t_;
};
}  // namespace detail

template <typename T, int kThreads>
class BlockReduce : public detail::BlockValues<T, kThreads> {
  using detail::BlockValues<T, kThreads>::t_;

 public:
  using detail::BlockValues<T, kThreads>::BlockValues;
  template <typename Op>
  T Reduce(T x, Op op, int line = __builtin_LINE()) {
    if (this->deposit(x, line, "cub::BlockReduce") != 0) return detail::poisoned<T>();
    T acc = t_.v[0];
    for (int i = 1; i < kThreads; ++i) acc = op(acc, t_.v[i]);
    return acc;
  }
  T Sum(T x, int line = __builtin_LINE()) { return Reduce(x, detail::Plus(), line); }
};

template <typename T, int kThreads>
class BlockScan : public detail::BlockValues<T, kThreads> {
  using detail::BlockValues<T, kThreads>::t_;

 public:
  using detail::BlockValues<T, kThreads>::BlockValues;
  template <typename Op>
  void InclusiveScan(T x, T& out, Op op, int line = __builtin_LINE()) {
    const int r = this->deposit(x, line, "cub::BlockScan");
    T acc = t_.v[0];
    for (int i = 1; i <= r; ++i) acc = op(acc, t_.v[i]);
    out = acc;
  }
  void ExclusiveSum(T x, T& out, T& aggregate, int line = __builtin_LINE()) {
    const int r = this->deposit(x, line, "cub::BlockScan");
    T acc = T(0), total = T(0);
    for (int i = 0; i < kThreads; ++i) {
      if (i == r) acc = total;
      total = total + t_.v[i];
    }
    out = acc;
    aggregate = total;
  }
  void ExclusiveSum(T x, T& out, int line = __builtin_LINE()) {
    T aggregate;
    ExclusiveSum(x, out, aggregate, line);
  }
};
}  // namespace cub

template <typename K>
inline cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute, int value) {
  return ::pk::emu::set_smem_attribute(kernel, value);
}

namespace at {
namespace cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
inline const ::pk::emu::DeviceProps* getCurrentDeviceProperties() { return &::pk::emu::device_props(); }
}  // namespace cuda
}  // namespace at
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(const c10::Device&) {}
};
}  // namespace cuda
}  // namespace c10
