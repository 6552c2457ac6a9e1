// Every device intrinsic the CUDA kernels use, as named functions (issue 13): inline PTX / CUDA
// intrinsics when compiled for the device, and calls into the CPU emulator (csrc/emu) when the same
// kernel source is compiled for the host. This is the only file of the project that contains `asm`.
//
//   mma_bf16_16816 / mma_f16_16816   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32
//   mma_tf32_1688                    mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
//   to_tf32                          cvt.rna.tf32.f32 (round to nearest, ties away from zero)
//   to_bf16_bits / to_f16_bits       __float2bfloat16_rn / __float2half_rn (ties to even), raw bits
//   shfl_down                        __shfl_down_sync (float)
//   atomic_max_u32                   atomicMax on unsigned int (max|W| on the float bits)
//   uint_as_float / float_as_uint    bit casts
//   st_shared / ld_shared            shared-memory store / load (plain accesses; the emulator counts
//                                    the bank conflicts of each warp access and checks every barrier
//                                    interval for races). Every shared access of the kernels goes
//                                    through them.
//   st_global / ld_global            global store / load (plain accesses; the emulator counts the
//                                    bytes requested and checks each access against the launch's
//                                    allocations). Every global access of the kernels goes through
//                                    them (or atomic_max_u32).
//
// Fragments (registers a[4], b[2], c[4] of one lane) follow the PTX ISA tables "Matrix fragments for
// mma.m16n8k16 with floating point type" and "... mma.m16n8k8" (.tf32); the emulator implements those
// tables independently of the kernel's loaders.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "nft_cuda/macros.h"

#if !defined(__CUDA_ARCH__)
namespace nft_emu {
// Implemented by the emulator runtime (csrc/emu/emulator.cpp): warp collectives by exchange.
enum class MmaKind : int { kBf16 = 0, kF16 = 1, kTf32 = 2 };
void warp_mma(MmaKind kind, float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
float warp_shfl_down(float v, unsigned delta, unsigned mask);
unsigned atomic_max_u32(unsigned* address, unsigned value);
uint32_t f32_to_tf32_rna(float v);
uint16_t f32_to_bf16_rn(float v);
uint16_t f32_to_f16_rn(float v);
float bits_to_f32(uint32_t bits);
uint32_t f32_to_bits(float v);
void smem_access(const void* address, int bytes, bool store);    // bank conflicts, race detector
void global_access(const void* address, int bytes, bool store);  // traffic counter, bounds check
}  // namespace nft_emu
#endif

namespace nft_cuda {
namespace intr {

#if defined(__CUDACC__)
#define NFT_INTRINSIC __device__ __forceinline__
#else
#define NFT_INTRINSIC inline
#endif

// c += A·B for one m16n8k16 tile, bf16 inputs (two per 32-bit register, lower index in the low half).
NFT_INTRINSIC void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  nft_emu::warp_mma(nft_emu::MmaKind::kBf16, c, a, b);
#endif
}

// c += A·B for one m16n8k16 tile, fp16 inputs.
NFT_INTRINSIC void mma_f16_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  nft_emu::warp_mma(nft_emu::MmaKind::kF16, c, a, b);
#endif
}

// c += A·B for one m16n8k8 tile, tf32 inputs (one per register).
NFT_INTRINSIC void mma_tf32_1688(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  nft_emu::warp_mma(nft_emu::MmaKind::kTf32, c, a, b);
#endif
}

// The tf32 bit pattern of v: the low 13 mantissa bits rounded off, ties away from zero.
NFT_INTRINSIC uint32_t to_tf32(float v) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
#else
  return nft_emu::f32_to_tf32_rna(v);
#endif
}

NFT_INTRINSIC uint16_t to_bf16_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
  return nft_emu::f32_to_bf16_rn(v);
#endif
}

NFT_INTRINSIC uint16_t to_f16_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(v));
#else
  return nft_emu::f32_to_f16_rn(v);
#endif
}

// Lane (lane + delta) of the warp's v (the lane's own v where that lane is out of range).
NFT_INTRINSIC float shfl_down(float v, unsigned delta, unsigned mask = 0xffffffffu) {
#if defined(__CUDA_ARCH__)
  return __shfl_down_sync(mask, v, delta);
#else
  return nft_emu::warp_shfl_down(v, delta, mask);
#endif
}

NFT_INTRINSIC unsigned atomic_max_u32(unsigned* address, unsigned value) {
#if defined(__CUDA_ARCH__)
  return atomicMax(address, value);
#else
  return nft_emu::atomic_max_u32(address, value);
#endif
}

NFT_INTRINSIC float uint_as_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return nft_emu::bits_to_f32(bits);
#endif
}

NFT_INTRINSIC uint32_t float_as_uint(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  return nft_emu::f32_to_bits(v);
#endif
}

template <typename T>
NFT_INTRINSIC void st_shared(T& dst, T v) {
#if !defined(__CUDA_ARCH__)
  nft_emu::smem_access(&dst, sizeof(T), true);
#endif
  dst = v;
}

template <typename T>
NFT_INTRINSIC T ld_shared(const T& src) {
#if !defined(__CUDA_ARCH__)
  nft_emu::smem_access(&src, sizeof(T), false);
#endif
  return src;
}

template <typename T>
NFT_INTRINSIC void st_global(T& dst, T v) {
#if !defined(__CUDA_ARCH__)
  nft_emu::global_access(&dst, sizeof(T), true);
#endif
  dst = v;
}

template <typename T>
NFT_INTRINSIC T ld_global(const T& src) {
#if !defined(__CUDA_ARCH__)
  nft_emu::global_access(&src, sizeof(T), false);
#endif
  return src;
}

#undef NFT_INTRINSIC

}  // namespace intr
}  // namespace nft_cuda
