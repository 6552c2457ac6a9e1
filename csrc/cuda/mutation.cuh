// Deliberate bugs for the emulator's mutation self-test (tests/test_emulator.py, issue 13): the
// emulator builds the kernel sources with -DNFT_EMU_MUTATION=<id> and asserts that its comparisons
// fail. Every real build has NFT_EMU_MUTATION = 0, where each site is a constant-false branch.
//   1 swapped A-fragment registers   2 stream + 1   3 wrong noise lane
//   4 pooling window end without the ceiling   5 missing barrier between the tile loads and the mma
//   6 missing first barrier of the GEMM slice loop (next tiles stored while other warps still read:
//     a write-after-read race, caught by the emulator's race detector)
//   7 perturb's tail block stores one element past the row (the last sample: past the end of `out`,
//     caught by the emulator's bounds check)
#pragma once

#ifndef NFT_EMU_MUTATION
#define NFT_EMU_MUTATION 0
#endif

namespace nft_cuda {
constexpr int kMutation = NFT_EMU_MUTATION;
}  // namespace nft_cuda
