// CPU emulator of the CUDA execution model (issue 13), enough for the kernels in csrc/cuda:
// a launch runs the grid block by block; the threads of a block are fibers (ucontext) scheduled
// round-robin on one host thread, each running until it finishes or waits — at __syncthreads (until
// every live thread of the block arrives) or in a warp collective (until all 32 lanes of its warp
// arrive; the last one computes the result for all, from the lanes' registers exchanged through a
// per-warp buffer). The schedule is deterministic; a missing barrier shows as stale shared data
// where the schedule exposes it, and always as a race: at every barrier (and at the end of a block)
// the shared-memory accesses of the interval are checked for a byte stored by one thread and loaded
// or stored by another (emulator.cpp, find_smem_race).
// Errors (deadlock, divergent collectives, a fragment table that does not cover a tile, a
// shared-memory race between two barriers, a global access outside the launch's allocations) stop
// the launch and are reported by last_error().
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "emu/cuda_shim.h"

namespace nft_emu {

// One global-memory allocation a launch may access (a tensor passed to the kernel): every global
// access of the kernel (intrinsics st_global / ld_global / atomic_max_u32) must lie inside one of
// them, and a store inside a writable one, or the launch fails naming the allocation it overran.
struct Buffer {
  const void* data;  // nullptr: an absent optional argument (matches no access)
  size_t bytes;
  const char* name;
  bool writable;
};

// Runs `body` (one kernel call with its arguments bound) for every thread of every block, with
// `buffers` the global memory it may touch. Returns false, with last_error() set, if the launch
// failed: a deadlock, a shared-memory race (a byte stored by one thread and loaded or stored by
// another between two barriers: emulator.cpp), a global access outside `buffers`, or a misused
// collective. The counters below start from zero unless keep_counters (a follow-up launch that
// belongs to the same op).
bool launch(dim3 grid, dim3 block, const std::vector<Buffer>& buffers, const std::function<void()>& body,
            bool keep_counters = false);

const std::string& last_error();

// Per-launch counters (reset by each launch).
// Shared-memory traffic is counted per warp access: the k-th access of each lane from one call site
// (between two barriers) forms one warp instruction, as in lock-step execution; its wavefronts are
// the most distinct 32-bit words any of the 32 banks must serve (1 = conflict-free, 32 = fully
// serialised). Divergent loops (lanes skipping an access) make the grouping approximate.
struct Counters {
  int64_t mma = 0;       // mma.sync instructions issued (per warp)
  int64_t barriers = 0;  // __syncthreads completed (per block)
  int64_t shfl = 0;      // warp shuffles (per warp)
  int64_t smem_store_requests = 0;
  int64_t smem_store_wavefronts = 0;
  int64_t smem_load_requests = 0;
  int64_t smem_load_wavefronts = 0;
  int64_t global_load_bytes = 0;  // requested by the threads (L1/L2 traffic; DRAM sees less)
  int64_t global_store_bytes = 0;
};
const Counters& counters();

// Shared-memory counters of the last launch per access site (call site of st_shared / ld_shared), in
// the order the sites were first executed (thread 0 of block 0 first).
struct SiteCounters {
  bool store;
  int64_t requests, wavefronts;
};
const std::vector<SiteCounters>& site_counters();
void set_counters(const Counters& c);

}  // namespace nft_emu
