// Helpers of the GPU tests: skip without a device, device buffers that are
// poisoned before each kernel runs (NaN bytes, so an unwritten output fails),
// fresh random data (seed printed; EM_TEST_SEED replays one), error metrics.
//
// Tolerances (stated per dtype, as relative L2 error ||gpu - cpu|| / ||cpu||
// against the CPU kernel in fp32 on the same bf16-rounded inputs):
//   fp32 outputs from fp32 math ............... 1e-5
//   bf16 outputs (one rounding, 2^-9 each) ..... 1e-2
//   bf16 chains (rounded intermediates) ........ 2e-2
//   fp8 e4m3 activations + 128x128 weights ..... 1e-1 end to end (e4m3 keeps 3
//     mantissa bits: 3.6% rms per rounding), 1e-2 when the CPU side applies
//     the same activation quantisation
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "kernels/cuda/device.h"
#include "tests/common/status_matchers.h"

namespace expertmesh::gputest {

#define EM_SKIP_WITHOUT_GPU()                                       \
  do {                                                              \
    std::string em_why_;                                            \
    if (!::expertmesh::kernels::cuda::DeviceAvailable(&em_why_)) {  \
      GTEST_SKIP() << "no CUDA device: " << em_why_;                \
    }                                                               \
  } while (0)

#define EM_CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(cudaGetLastError())

inline uint64_t TestSeed() {
  static uint64_t seed = [] {
    const char* env = std::getenv("EM_TEST_SEED");
    uint64_t s = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::printf("[ gpu tests ] random seed %llu (EM_TEST_SEED=%llu replays it)\n", static_cast<unsigned long long>(s),
                static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

// A per-test generator: fresh data each run, replayable with EM_TEST_SEED.
inline std::mt19937_64 Rng() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string name = std::string(info->test_suite_name()) + "." + info->name();
  return std::mt19937_64(TestSeed() ^ std::hash<std::string>{}(name));
}

inline std::vector<float> Normal(std::mt19937_64& rng, size_t n, float std = 1.0f, float mean = 0.0f) {
  std::normal_distribution<float> d(mean, std);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Rounds to bf16 in place (so the CPU sees exactly the GPU's inputs) and
// returns the bits.
inline std::vector<uint16_t> ToBf16(std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    b[i] = FloatToBf16(v[i]);
    v[i] = Bf16ToFloat(b[i]);
  }
  return b;
}
inline std::vector<float> FromBf16(const std::vector<uint16_t>& b) {
  std::vector<float> v(b.size());
  for (size_t i = 0; i < b.size(); ++i) v[i] = Bf16ToFloat(b[i]);
  return v;
}

// Device memory of n T's, filled with 0xFF bytes (NaN for floats, -1 for ints).
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (cudaMalloc(&p_, n * sizeof(T) + 16) != cudaSuccess) p_ = nullptr;
    Poison();
  }
  explicit DeviceBuffer(const std::vector<T>& v) : DeviceBuffer(v.size()) { Upload(v); }
  ~DeviceBuffer() {
    if (p_ != nullptr) cudaFree(p_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void Poison() {
    if (p_ != nullptr) cudaMemset(p_, 0xFF, n_ * sizeof(T));
  }
  void Upload(const std::vector<T>& v) {
    if (p_ != nullptr) cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  std::vector<T> Download() const {
    std::vector<T> v(n_);
    cudaDeviceSynchronize();
    if (p_ != nullptr) cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
  T* get() const { return static_cast<T*>(p_); }
  size_t size() const { return n_; }

 private:
  void* p_ = nullptr;
  size_t n_;
};

struct ErrorStats {
  double rel_l2 = 0;     // ||a - ref|| / ||ref||
  double max_abs = 0;    // max |a - ref|
  double ref_max = 0;    // max |ref|
  int64_t non_finite = 0;
};
inline ErrorStats Compare(const std::vector<float>& a, const std::vector<float>& ref) {
  ErrorStats s;
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(a[i])) {
      ++s.non_finite;
      continue;
    }
    const double d = static_cast<double>(a[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
    s.max_abs = std::max(s.max_abs, std::fabs(d));
    s.ref_max = std::max(s.ref_max, std::fabs(static_cast<double>(ref[i])));
  }
  s.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return s;
}

// Prints the errors (the numbers the PERFORMANCE notes quote) and checks them.
#define EM_EXPECT_CLOSE(what, gpu, ref, tol)                                                                   \
  do {                                                                                                        \
    const ::expertmesh::gputest::ErrorStats em_e_ = ::expertmesh::gputest::Compare((gpu), (ref));            \
    std::printf("[ error     ] %-34s rel_l2 %.3e  max_abs %.3e  (|ref| <= %.3g, tol %.0e)\n", (what),        \
                em_e_.rel_l2, em_e_.max_abs, em_e_.ref_max, static_cast<double>(tol));                       \
    EXPECT_EQ(em_e_.non_finite, 0) << (what) << ": unwritten or non-finite outputs";                          \
    EXPECT_LE(em_e_.rel_l2, (tol)) << (what);                                                                 \
  } while (0)

}  // namespace expertmesh::gputest
