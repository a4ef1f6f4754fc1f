// Random fills on the device for the GPU benchmark (hash of index and seed:
// no host copies of multi-gigabyte weights). Uniform in [lo, hi).
#pragma once

#include <cstdint>

namespace expertmesh::bench {

void FillUniformBf16(uint16_t* x, int64_t n, uint64_t seed, float lo, float hi);
void FillUniformF32(float* x, int64_t n, uint64_t seed, float lo, float hi);
// fp8 e4m3 values uniform in [-max_abs, max_abs) (saturating conversion).
void FillUniformFp8(uint8_t* x, int64_t n, uint64_t seed, float max_abs);

}  // namespace expertmesh::bench
