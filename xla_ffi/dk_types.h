// Scalar types shared by the CPU loops and the CUDA kernels.
//
// Inputs may be float64, float32, bfloat16 or float16. Arithmetic runs in the accumulator type
// acc_t<T>: float64 for float64 inputs, float32 for the others. The 16-bit types are tiny
// structs holding the raw bits with explicit conversions, so the same code compiles with g++
// and nvcc and behaves identically on both (round-to-nearest-even on the way back).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DK_HD __host__ __device__ __forceinline__
#else
// Inlined on the CPU as on the GPU: the loops then drop what a mode does not use (the forward
// never reads a footprint's derivatives) instead of paying a call per footprint.
#define DK_HD inline __attribute__((always_inline))
#endif

namespace dk {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

// The type every sum and footprint weight of an element type T is computed in.
template <typename T>
struct Accumulator {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accumulator<T>::type;

DK_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DK_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// widen: an element as its accumulator type; narrow<T>: an accumulator back to T.
DK_HD double widen(double v) { return v; }
DK_HD float widen(float v) { return v; }
DK_HD float widen(bf16 v) { return bits_float(uint32_t(v.bits) << 16); }

DK_HD float widen(f16 v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));  // inf, nan
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Subnormal half: value = man * 2^-24, exact in float32.
  const float mag = float(man) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}

template <typename T>
DK_HD T narrow(acc_t<T> v);

template <>
DK_HD double narrow<double>(double v) {
  return v;
}

template <>
DK_HD float narrow<float>(float v) {
  return v;
}

template <>
DK_HD bf16 narrow<bf16>(float v) {
  uint32_t u = float_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

template <>
DK_HD f16 narrow<f16>(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};  // nan
  if (abs >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): round abs * 2^24 to the nearest integer, ties to even.
    const float mag = bits_float(abs) * 16777216.0f;
    uint32_t q = uint32_t(mag);
    const float rem = mag - float(q);
    if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
    return f16{uint16_t(sign | q)};
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  uint32_t r = abs - 0x38000000u;
  r += 0xfffu + ((r >> 13) & 1u);
  return f16{uint16_t(sign | (r >> 13))};
}

}  // namespace dk
