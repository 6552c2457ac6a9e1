// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC'11).
//
// Note [nft Philox counter layout]
// The noise of element e (flat index in the weight's logical row-major shape) in stream t of a
// call keyed by (seed, offset) comes from the block
//     counter = (lo32(q), hi32(q), lo32(stream), hi32(stream)),  q = e >> 2,
//     stream  = (offset + t) mod 2^64,
//     key     = (lo32(seed), hi32(seed)),
// and lane e & 3 of that block (see normal.h). It is keyed on logical indices only, never on
// thread or block ids, so any kernel, tiling or thread mapping reproduces the same noise; the
// pure-PyTorch twin in nft_cuda/reference.py follows the same layout word for word.
//
// Models that need several random draws per element (the device models, device_models.h) take
// draw k of element e from the block with q = (e >> 2) + k * 2^56 (draw_counter below): draw 0 is
// exactly the stream above, and the draws never share a block while e < 2^58 (kMaxDrawElements,
// checked by the ops), since q stays below 2^56 per draw.
#pragma once

#include <cstdint>

#include "nft_cuda/macros.h"

namespace nft_cuda {

struct PhiloxWords {
  uint32_t x[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

NFT_INLINE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// The standard 10-round Philox4x32 bijection of `c` under key (k0, k1).
NFT_INLINE PhiloxWords philox4x32_10(PhiloxWords c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c.x[0], hi0, lo0);
    mulhilo32(kPhiloxM1, c.x[2], hi1, lo1);
    PhiloxWords n;
    n.x[0] = hi1 ^ c.x[1] ^ k0;
    n.x[1] = lo1;
    n.x[2] = hi0 ^ c.x[3] ^ k1;
    n.x[3] = lo0;
    c = n;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// The block that holds elements 4q .. 4q+3 of `stream` (Note [nft Philox counter layout]).
NFT_INLINE PhiloxWords philox_block(uint64_t seed, uint64_t stream, uint64_t q) {
  PhiloxWords c;
  c.x[0] = static_cast<uint32_t>(q);
  c.x[1] = static_cast<uint32_t>(q >> 32);
  c.x[2] = static_cast<uint32_t>(stream);
  c.x[3] = static_cast<uint32_t>(stream >> 32);
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Multi-draw layout (Note [nft Philox counter layout]): the block counter q of draw k of block q.
constexpr int kDrawShift = 56;
constexpr uint64_t kMaxDrawElements = uint64_t{1} << (kDrawShift + 2);  // e < 2^58

NFT_INLINE uint64_t draw_counter(uint64_t q, int k) {
  return q + (static_cast<uint64_t>(k) << kDrawShift);
}

}  // namespace nft_cuda
