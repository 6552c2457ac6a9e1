// CPU emulator of the CUDA execution model: fibers, block barrier, warp collectives, and the host
// emulation of the device intrinsics declared in include/nft_cuda/intrinsics.cuh. See emulator.h.
#include "emu/emulator.h"

#include <dlfcn.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <unordered_map>
#include <vector>

#include "nft_cuda/intrinsics.cuh"

namespace nft_emu {

dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxRegs = 10;  // mma: c0..c3, a0..a3, b0..b1

enum class State { kReady, kBarrier, kWarp, kDone };

struct SmemAccess {
  const void* site;  // the call site (return address): one per access instruction of the kernel
  uintptr_t address;
  int bytes;
  bool store;
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  State state = State::kDone;
  std::vector<SmemAccess> smem;  // since the last barrier
};

// The registers of one warp collective, one row per lane; the last lane to arrive computes `out`.
enum class Collective { kNone, kShfl, kMma };
struct WarpExchange {
  int arrived = 0;
  Collective kind = Collective::kNone;
  int sub = 0;  // mma kind, or shuffle delta
  uint32_t in[32][kMaxRegs];
  uint32_t out[32][kMaxRegs];
};

struct Runtime {
  std::vector<Fiber> fibers;
  std::vector<WarpExchange> warps;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  int current = 0;
  int threads = 0;
  int barrier_arrived = 0;
  bool failed = false;
  std::string error;
  Counters counters;
  std::map<const void*, int> site_rank;  // first-execution order of the shared-memory access sites
  std::vector<SiteCounters> sites;
  std::vector<Buffer> buffers;  // the global allocations of the running launch
};

Runtime& rt() {
  static Runtime r;
  return r;
}

void yield_to_scheduler() {
  Runtime& r = rt();
  swapcontext(&r.fibers[r.current].ctx, &r.scheduler);
}

std::string block_name() {
  return "block " + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) + "," +
         std::to_string(g_block_idx.z);
}

// Marks the launch failed with `msg` (the first error wins).
void set_error(const std::string& msg) {
  Runtime& r = rt();
  if (!r.failed) {
    r.failed = true;
    r.error = msg;
  }
}

// Stops the launch from a fiber: the failing fiber never resumes. `with_thread`: the error is about
// the running thread (else the message names the threads itself).
[[noreturn]] void fail(const std::string& msg, bool with_thread = true) {
  Runtime& r = rt();
  set_error(msg + " (" + block_name() + (with_thread ? ", thread " + std::to_string(r.current) : "") + ")");
  r.fibers[r.current].state = State::kDone;
  setcontext(&r.scheduler);
  __builtin_unreachable();
}

// A code address as "<library>+0x<offset>" (addr2line -e <library> <offset> gives the source line).
std::string code_name(const void* address) {
  Dl_info info;
  char buf[64];
  if (dladdr(address, &info) == 0 || info.dli_fname == nullptr) {
    std::snprintf(buf, sizeof(buf), "%p", address);
    return buf;
  }
  const char* base = std::strrchr(info.dli_fname, '/');
  std::snprintf(buf, sizeof(buf), "+0x%zx",
                static_cast<size_t>(static_cast<const char*>(address) - static_cast<const char*>(info.dli_fbase)));
  return std::string(base ? base + 1 : info.dli_fname) + buf;
}

std::string hex(uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%zx", static_cast<size_t>(v));
  return buf;
}

// ---- shared-memory race detector -------------------------------------------------------------------
// CUDA orders shared-memory accesses of different threads only through a barrier (or a fence the
// kernels do not use); warp collectives exchange registers, not shared memory. So within one barrier
// interval, a byte stored by one thread and loaded or stored by another is a race, even when both
// store the same value (a data race by the CUDA memory model; no kernel here relies on it). Accesses
// of one thread to its own bytes are ordered by program order and never conflict.

struct ByteUse {
  int thread = -1, other = -1;  // the first thread to touch the byte, and one other thread (or -1)
  const SmemAccess* first = nullptr;
  const SmemAccess* second = nullptr;  // other's access
  bool stored = false;                 // any store so far
};

std::string describe_access(int thread, const SmemAccess& a) {
  return "thread " + std::to_string(thread) + " " + (a.store ? "stores" : "loads") + " " + std::to_string(a.bytes) +
         " B at " + hex(a.address) + " (access site " + std::to_string(rt().site_rank.at(a.site)) + ", " +
         code_name(a.site) + ")";
}

std::string race_message(uintptr_t byte, int t0, const SmemAccess& a0, int t1, const SmemAccess& a1) {
  return "shared-memory race: byte " + hex(byte) +
         " is accessed by two threads between two barriers, at least "
         "one storing: " +
         describe_access(t0, a0) + "; " + describe_access(t1, a1);
}

// The first conflict among the accesses recorded since the last barrier, or "" if there is none.
std::string find_smem_race() {
  Runtime& r = rt();
  std::unordered_map<uintptr_t, ByteUse> bytes;
  for (int t = 0; t < r.threads; ++t) {
    for (const SmemAccess& a : r.fibers[t].smem) {
      for (uintptr_t b = a.address; b < a.address + static_cast<uintptr_t>(a.bytes); ++b) {
        ByteUse& u = bytes[b];
        if (u.thread < 0) {
          u = ByteUse{t, -1, &a, nullptr, a.store};
        } else if (u.thread == t) {
          if (a.store && u.other >= 0)
            return race_message(b, u.other, *u.second, t, a);
          u.stored = u.stored || a.store;
          if (a.store)
            u.first = &a;
        } else if (u.stored || a.store) {
          return race_message(b, u.thread, *u.first, t, a);
        } else if (u.other < 0) {
          u.other = t;
          u.second = &a;
        }
      }
    }
  }
  return "";
}

// Groups the recorded shared-memory accesses of each warp into warp instructions and counts their
// wavefronts (see Counters); clears the records.
void count_smem_accesses() {
  Runtime& r = rt();
  for (int w0 = 0; w0 < r.threads; w0 += 32) {
    // (site, occurrence) -> words touched by the lanes
    std::map<std::pair<const void*, size_t>, std::pair<bool, std::vector<uintptr_t>>> groups;
    for (int t = w0; t < std::min(w0 + 32, r.threads); ++t) {
      std::map<const void*, size_t> seen;
      for (const SmemAccess& a : r.fibers[t].smem) {
        auto& g = groups[{a.site, seen[a.site]++}];
        g.first = a.store;
        for (uintptr_t word = a.address / 4; word <= (a.address + a.bytes - 1) / 4; ++word)
          g.second.push_back(word);  // a wider access serves all its words (at least bytes/128 wavefronts)
      }
      r.fibers[t].smem.clear();
    }
    for (auto& [key, g] : groups) {
      std::map<uintptr_t, std::vector<uintptr_t>> by_bank;
      for (uintptr_t word : g.second) {
        auto& words = by_bank[word % 32];
        if (std::find(words.begin(), words.end(), word) == words.end())
          words.push_back(word);
      }
      size_t wavefronts = 1;
      for (auto& [bank, words] : by_bank)
        wavefronts = std::max(wavefronts, words.size());
      (g.first ? r.counters.smem_store_requests : r.counters.smem_load_requests) += 1;
      (g.first ? r.counters.smem_store_wavefronts : r.counters.smem_load_wavefronts) += wavefronts;
      SiteCounters& site = r.sites[r.site_rank.at(key.first)];
      site.requests += 1;
      site.wavefronts += static_cast<int64_t>(wavefronts);
    }
  }
}

void release_barrier_if_complete() {
  Runtime& r = rt();
  int live = 0;
  for (int t = 0; t < r.threads; ++t)
    live += r.fibers[t].state != State::kDone;
  if (r.barrier_arrived > 0 && r.barrier_arrived == live) {
    for (int t = 0; t < r.threads; ++t) {
      if (r.fibers[t].state == State::kBarrier)
        r.fibers[t].state = State::kReady;
    }
    r.barrier_arrived = 0;
    ++r.counters.barriers;
    const std::string race = find_smem_race();
    if (!race.empty())
      fail(race, /*with_thread=*/false);
    count_smem_accesses();
  }
}

void trampoline() {
  Runtime& r = rt();
  (*r.body)();
  r.fibers[r.current].state = State::kDone;
  release_barrier_if_complete();  // exited threads no longer hold a barrier back
}

bool run_block() {
  Runtime& r = rt();
  for (int t = 0; t < r.threads; ++t) {
    Fiber& f = r.fibers[t];
    if (!f.stack)
      f.stack.reset(new char[kStackBytes]);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, trampoline, 0);
    f.state = State::kReady;
    f.smem.clear();
  }
  for (WarpExchange& w : r.warps)
    w.arrived = 0;
  r.barrier_arrived = 0;
  for (;;) {
    bool progress = false, all_done = true;
    for (int t = 0; t < r.threads; ++t) {
      if (r.fibers[t].state != State::kReady) {
        all_done = all_done && r.fibers[t].state == State::kDone;
        continue;
      }
      r.current = t;
      g_thread_idx = dim3{static_cast<unsigned>(t), 0, 0};
      swapcontext(&r.scheduler, &r.fibers[t].ctx);
      if (r.failed)
        return false;
      progress = true;
      all_done = false;
    }
    if (all_done) {
      const std::string race = find_smem_race();
      if (!race.empty()) {
        set_error(race + " (" + block_name() + ")");
        return false;
      }
      count_smem_accesses();
      return true;
    }
    if (!progress) {
      set_error("deadlock: threads wait at a barrier or warp collective that cannot complete (" + block_name() + ")");
      return false;
    }
  }
}

// Enters a warp collective with `nin` input registers; returns after every lane of the warp has
// entered the same collective, with the lane's results in out[0 .. nout).
template <typename Compute>
void warp_collective(Collective kind, int sub, const uint32_t* in, int nin, uint32_t* out, int nout,
                     Compute&& compute) {
  Runtime& r = rt();
  const int tid = r.current, warp = tid / 32, lane = tid % 32;
  const int lanes = std::min(32, r.threads - 32 * warp);
  if (lanes != 32)
    fail("warp collective in a partial warp");
  WarpExchange& x = r.warps[warp];
  if (x.arrived == 0) {
    x.kind = kind;
    x.sub = sub;
  } else if (x.kind != kind || x.sub != sub) {
    fail("lanes of one warp in different collectives (divergence)");
  }
  if (nin > kMaxRegs || nout > kMaxRegs)
    fail("warp collective: too many registers");
  std::memcpy(x.in[lane], in, nin * sizeof(uint32_t));
  if (++x.arrived == 32) {
    compute(x);
    x.arrived = 0;
    for (int l = 0; l < 32; ++l) {
      Fiber& f = r.fibers[32 * warp + l];
      if (f.state == State::kWarp)
        f.state = State::kReady;
    }
  } else {
    r.fibers[tid].state = State::kWarp;
    yield_to_scheduler();
  }
  std::memcpy(out, x.out[lane], nout * sizeof(uint32_t));
}

// ---- number formats ------------------------------------------------------------------------------

float f32(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

uint32_t bits32(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

float bf16_value(uint16_t h) {
  return f32(static_cast<uint32_t>(h) << 16);
}

float f16_value(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

// ---- mma.sync fragment tables (PTX ISA, "Matrix fragments for mma.m16n8k16 / mma.m16n8k8") --------
// Written from the ISA tables, not from the kernel's loaders. groupID = lane >> 2,
// threadID_in_group = lane % 4. Element i of a lane's A fragment is a_i; 16-bit elements come two
// per register, a_{2j} in the low half of register j.

struct Coord {
  int row, col;
};

// m16n8k16 (.f16/.bf16), A 16x16, element a_i (i < 8).
Coord a_16816(int lane, int i) {
  const int g = lane >> 2, t = lane & 3;
  const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
  const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
  return {row, col};
}
// m16n8k16, B 16x8 (row = k), element b_i (i < 4).
Coord b_16816(int lane, int i) {
  const int g = lane >> 2, t = lane & 3;
  return {t * 2 + (i & 1) + (i >= 2 ? 8 : 0), g};
}
// m16n8k8 (.tf32), A 16x8, element a_i (i < 4), one per register.
Coord a_1688(int lane, int i) {
  const int g = lane >> 2, t = lane & 3;
  const int row = (i == 0 || i == 2) ? g : g + 8;
  const int col = (i < 2) ? t : t + 4;
  return {row, col};
}
// m16n8k8, B 8x8 (row = k), element b_i (i < 2).
Coord b_1688(int lane, int i) {
  const int g = lane >> 2, t = lane & 3;
  return {i == 0 ? t : t + 4, g};
}
// Accumulators (both shapes), C/D 16x8, element c_i (i < 4).
Coord c_16x8(int lane, int i) {
  const int g = lane >> 2, t = lane & 3;
  return {i < 2 ? g : g + 8, t * 2 + (i & 1)};
}

// D = A·B + C for the whole warp from the exchanged registers (in[lane] = c0..c3, a0..a3, b0..b1).
void mma_compute(WarpExchange& x, MmaKind kind) {
  const bool tf32 = kind == MmaKind::kTf32;
  const int kdim = tf32 ? 8 : 16;
  float a[16][16], b[16][8];
  int a_seen[16][16] = {}, b_seen[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t* reg = x.in[lane];
    if (tf32) {
      for (int i = 0; i < 4; ++i) {
        const Coord p = a_1688(lane, i);
        a[p.row][p.col] = f32(reg[4 + i] & 0xffffe000u);  // the unit reads tf32: low 13 bits ignored
        ++a_seen[p.row][p.col];
      }
      for (int i = 0; i < 2; ++i) {
        const Coord p = b_1688(lane, i);
        b[p.row][p.col] = f32(reg[8 + i] & 0xffffe000u);
        ++b_seen[p.row][p.col];
      }
    } else {
      auto value = [&](uint32_t word, int half) {
        const uint16_t h = static_cast<uint16_t>(half ? word >> 16 : word & 0xffffu);
        return kind == MmaKind::kBf16 ? bf16_value(h) : f16_value(h);
      };
      for (int i = 0; i < 8; ++i) {
        const Coord p = a_16816(lane, i);
        a[p.row][p.col] = value(reg[4 + i / 2], i & 1);
        ++a_seen[p.row][p.col];
      }
      for (int i = 0; i < 4; ++i) {
        const Coord p = b_16816(lane, i);
        b[p.row][p.col] = value(reg[8 + i / 2], i & 1);
        ++b_seen[p.row][p.col];
      }
    }
  }
  for (int r = 0; r < 16; ++r) {
    for (int k = 0; k < kdim; ++k) {
      if (a_seen[r][k] != 1)
        fail("mma: A fragment element supplied " + std::to_string(a_seen[r][k]) + " times");
    }
  }
  for (int k = 0; k < kdim; ++k) {
    for (int n = 0; n < 8; ++n) {
      if (b_seen[k][n] != 1)
        fail("mma: B fragment element supplied " + std::to_string(b_seen[k][n]) + " times");
    }
  }
  // Products of 16-bit / tf32 values are exact in double; the fp32 accumulator is rounded once.
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const Coord p = c_16x8(lane, i);
      double acc = f32(x.in[lane][i]);
      for (int k = 0; k < kdim; ++k)
        acc += static_cast<double>(a[p.row][k]) * b[k][p.col];
      x.out[lane][i] = bits32(static_cast<float>(acc));
    }
  }
}

}  // namespace

// ---- the intrinsics' host side (intrinsics.cuh) -------------------------------------------------

void warp_mma(MmaKind kind, float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint32_t in[10], out[4];
  for (int i = 0; i < 4; ++i)
    in[i] = bits32(c[i]);
  for (int i = 0; i < 4; ++i)
    in[4 + i] = a[i];
  for (int i = 0; i < 2; ++i)
    in[8 + i] = b[i];
  warp_collective(Collective::kMma, static_cast<int>(kind), in, 10, out, 4, [kind](WarpExchange& x) {
    ++rt().counters.mma;
    mma_compute(x, kind);
  });
  for (int i = 0; i < 4; ++i)
    c[i] = f32(out[i]);
}

float warp_shfl_down(float v, unsigned delta, unsigned mask) {
  if (mask != 0xffffffffu)
    fail("shfl_down: only full-warp masks are emulated");
  if (delta >= 32)
    fail("shfl_down: delta out of range");
  const uint32_t in = bits32(v);
  uint32_t out;
  warp_collective(Collective::kShfl, static_cast<int>(delta), &in, 1, &out, 1, [delta](WarpExchange& x) {
    ++rt().counters.shfl;
    for (unsigned lane = 0; lane < 32; ++lane) {
      const unsigned src = lane + delta;
      x.out[lane][0] = x.in[src < 32 ? src : lane][0];
    }
  });
  return f32(out);
}

unsigned atomic_max_u32(unsigned* address, unsigned value) {
  global_access(address, sizeof(unsigned), true);
  const unsigned old = *address;  // one host thread runs every fiber: no race
  if (value > old)
    *address = value;
  return old;
}

uint32_t f32_to_tf32_rna(float v) {
  const uint32_t b = bits32(v);
  if ((b & 0x7f800000u) == 0x7f800000u)
    return b;                          // inf / NaN unchanged
  return (b + 0x1000u) & 0xffffe000u;  // half an ulp on the magnitude: ties away from zero
}

uint16_t f32_to_bf16_rn(float v) {
  const uint32_t b = bits32(v);
  if (std::isnan(v))
    return 0x7fff;
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

uint16_t f32_to_f16_rn(float v) {
  const uint32_t b = bits32(v);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  const uint32_t mag = b & 0x7fffffffu;
  if (mag > 0x7f800000u)
    return 0x7fff;
  if (mag >= 0x477ff000u)
    return sign | 0x7c00u;  // rounds to >= 65520: infinity
  const int exp = static_cast<int>(mag >> 23) - 127;
  if (exp < -25)
    return sign;  // below half the smallest subnormal: zero
  // value = m * 2^(exp - 23) with m the 24-bit significand; f16 unit = 2^-24 (subnormal) or 2^(exp-10)
  const uint32_t m = (mag & 0x7fffffu) | 0x800000u;
  const int shift = exp < -14 ? (-14 - exp) + 13 : 13;  // bits of m dropped
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u)))
    ++q;
  if (exp < -14)
    return sign | static_cast<uint16_t>(q);  // subnormal (q may carry into the normal range)
  return sign | static_cast<uint16_t>((static_cast<uint32_t>(exp + 15) << 10) + (q - 0x400u));
}

void smem_access(const void* address, int bytes, bool store) {
  Runtime& r = rt();
  const void* site = __builtin_return_address(0);
  if (r.site_rank.emplace(site, static_cast<int>(r.sites.size())).second)
    r.sites.push_back({store, 0, 0});
  r.fibers[r.current].smem.push_back({site, reinterpret_cast<uintptr_t>(address), bytes, store});
}

namespace {

// The registered allocation nearest below `p` (the one an overrun of it went past), or nullptr.
const Buffer* nearest_buffer(uintptr_t p) {
  const Buffer* best = nullptr;
  for (const Buffer& b : rt().buffers) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(b.data);
    if (b.data != nullptr && base <= p && (best == nullptr || base > reinterpret_cast<uintptr_t>(best->data)))
      best = &b;
  }
  return best;
}

std::string out_of_bounds_message(uintptr_t p, int bytes, bool store, const void* site) {
  std::string msg = std::string("global out-of-bounds ") + (store ? "store" : "load") + " of " + std::to_string(bytes) +
                    " B at " + hex(p) + " (" + code_name(site) + ")";
  const Buffer* b = nearest_buffer(p);
  if (b == nullptr)
    return msg + ": below every allocation of the launch";
  const uintptr_t base = reinterpret_cast<uintptr_t>(b->data);
  return msg + ": byte " + std::to_string(p - base) + " of '" + b->name + "', which has " + std::to_string(b->bytes) +
         " B (" + std::to_string(p + bytes - base - b->bytes) + " B past its end)";
}

}  // namespace

void global_access(const void* address, int bytes, bool store) {
  Runtime& r = rt();
  const uintptr_t p = reinterpret_cast<uintptr_t>(address);
  const Buffer* inside = nullptr;
  for (const Buffer& b : r.buffers) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(b.data);
    if (b.data != nullptr && p >= base && p - base + bytes <= b.bytes)
      inside = &b;
  }
  if (inside == nullptr)
    fail(out_of_bounds_message(p, bytes, store, __builtin_return_address(0)));
  if (store && !inside->writable)
    fail(std::string("global store into the read-only input '") + inside->name + "' at byte " +
         std::to_string(p - reinterpret_cast<uintptr_t>(inside->data)));
  (store ? r.counters.global_store_bytes : r.counters.global_load_bytes) += bytes;
}

float bits_to_f32(uint32_t bits) {
  return f32(bits);
}
uint32_t f32_to_bits(float v) {
  return bits32(v);
}

void syncthreads() {
  Runtime& r = rt();
  r.fibers[r.current].state = State::kBarrier;
  ++r.barrier_arrived;
  release_barrier_if_complete();
  yield_to_scheduler();
}

bool launch(dim3 grid, dim3 block, const std::vector<Buffer>& buffers, const std::function<void()>& body,
            bool keep_counters) {
  Runtime& r = rt();
  r.failed = false;
  r.error.clear();
  r.buffers = buffers;
  if (!keep_counters) {
    r.counters = Counters{};
    r.site_rank.clear();
    r.sites.clear();
  }
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024) {
    set_error("launch: only 1-D blocks of 1..1024 threads are emulated");
    return false;
  }
  r.threads = static_cast<int>(block.x);
  if (r.fibers.size() < block.x)
    r.fibers.resize(block.x);
  r.warps.assign((block.x + 31) / 32, WarpExchange{});
  r.body = &body;
  g_grid_dim = grid;
  g_block_dim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = dim3{x, y, z};
        if (!run_block())
          return false;
      }
    }
  }
  return true;
}

const std::string& last_error() {
  return rt().error;
}
const Counters& counters() {
  return rt().counters;
}
const std::vector<SiteCounters>& site_counters() {
  return rt().sites;
}
void set_counters(const Counters& c) {
  rt().counters = c;
}

}  // namespace nft_emu
