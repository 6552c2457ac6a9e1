// CPU emulator of the CUDA execution model (issue 13), enough for the kernels in csrc/cuda:
// a launch runs the grid block by block; the threads of a block are fibers (ucontext) scheduled
// round-robin on one host thread, each running until it finishes or waits — at __syncthreads (until
// every live thread of the block arrives) or in a warp collective (until all 32 lanes of its warp
// arrive; the last one computes the result for all, from the lanes' registers exchanged through a
// per-warp buffer). The schedule is deterministic, so a missing barrier shows as stale shared data.
// Errors (deadlock, divergent collectives, a fragment table that does not cover a tile) stop the
// launch and are reported by last_error().
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "emu/cuda_shim.h"

namespace nft_emu {

// Runs `body` (one kernel call with its arguments bound) for every thread of every block.
// Returns false, with last_error() set, if the launch failed.
bool launch(dim3 grid, dim3 block, const std::function<void()>& body);

const std::string& last_error();

// Per-launch counters (reset by each launch).
struct Counters {
  int64_t mma = 0;              // mma.sync instructions issued (per warp)
  int64_t barriers = 0;         // __syncthreads completed (per block)
  int64_t shfl = 0;             // warp shuffles (per warp)
};
const Counters& counters();

}  // namespace nft_emu
