// Shared vocabulary of the torch-free kernel library: element types, the host-side 16-bit float
// conversions, and the dtype dispatch macro. Nothing here (or anywhere under csrc/) includes torch.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace codellama {

// Activation / weight element type of a kernel call. The binding layer maps torch dtypes onto it.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// Host representations of the 16-bit formats: plain bit patterns, converted through float.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float to_float(float v) { return v; }

inline float to_float(BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, NaN kept quiet: the same rounding as torch's float -> bfloat16 cast.
inline BFloat16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

// IEEE binary16 <-> binary32, exact and round-to-nearest-even (what F16C and torch do), written portably.
inline float to_float(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t man = h.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while ((man & 0x400u) == 0) { man <<= 1; --exp; }
    u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline Half to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};
  if (au >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (au < 0x38800000u) {  // result is subnormal or zero: add a magic number to round in float
    float a;
    std::memcpy(&a, &au, sizeof a);
    a += 0.5f;  // 0.5 = 2^-1; its ulp is 2^-24, the half subnormal step
    uint32_t r;
    std::memcpy(&r, &a, sizeof r);
    return Half{static_cast<uint16_t>(sign | (r - 0x3f000000u))};
  }
  uint32_t r = au + 0x0fffu + ((au >> 13) & 1u);  // round to nearest even at bit 13
  return Half{static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13))};
}

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline Half from_float<Half>(float f) { return to_half(f); }
template <> inline BFloat16 from_float<BFloat16>(float f) { return to_bf16(f); }

// Rounds a float through T and back: the value a T tensor would hold.
template <typename T> inline float round_to(float f) { return to_float(from_float<T>(f)); }

}  // namespace codellama

// Calls BODY with `scalar_t` bound to the host element type of DT (float, codellama::Half,
// codellama::BFloat16). NAME is the op name used in the error for an unsupported type.
#define CODELLAMA_DISPATCH_FLOAT_TYPES(DT, NAME, ...)                                     \
  do {                                                                                    \
    switch (DT) {                                                                         \
      case ::codellama::DType::kFloat32: { using scalar_t = float; __VA_ARGS__ } break;   \
      case ::codellama::DType::kFloat16: {                                                \
        using scalar_t = ::codellama::Half; __VA_ARGS__ } break;                          \
      case ::codellama::DType::kBFloat16: {                                               \
        using scalar_t = ::codellama::BFloat16; __VA_ARGS__ } break;                      \
      default: throw std::invalid_argument(std::string(NAME) + ": unsupported dtype");    \
    }                                                                                     \
  } while (0)
