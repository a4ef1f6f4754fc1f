// Weight matrices in the checkpoint's own precision, and the linear layer
// that reads them directly.
//
// A Weight is a row-major [rows, cols] matrix (PyTorch's [out, in]) stored
// as fp32, bf16, or fp8 e4m3 with DeepSeek's 128 x 128 block scales
// (`weight_scale_inv`, [ceil(rows/128), ceil(cols/128)] fp32: value =
// fp8 * scale). Its bytes either live in the Weight (owned: generated,
// converted, or received at run time) or in the memory-mapped safetensors file
// it was loaded from (mapped: zero copy; the mapping is kept alive by the
// Weight). Nothing is expanded to fp32 at load.
//
// Linear(x, M, K, w, y) computes y[M,N] = x[M,K] . w^T with fp32 activations
// and fp32 accumulation: for a bf16 or fp8 weight the result equals Linear on
// the dequantised fp32 weight up to the order of the sums (the conversion to
// fp32 is exact). M <= 64 (decode, MoE experts) streams w once: tiles of 4
// rows (converted to fp32 in an L1-sized scratch unless fp32) times x by
// register-blocked AVX-512 / AVX2+FMA / scalar dot products; larger M
// converts blocks of rows to fp32 and runs single-threaded BLAS SGEMM on each.
// Parallel over blocks of rows of w on the pool (common/thread_pool.h) at the
// top level, single-threaded inside a pool task. fp8 0x7f / 0xff decode as NaN.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace expertmesh::kernels {

class Weight {
 public:
  Weight() = default;
  // Owned fp32 copy of `values` ([rows, cols]).
  static Weight FromFloat(std::vector<float> values, int64_t rows, int64_t cols);
  // Owned copy of raw bytes in `dtype` (bf16, f32, or fp8 with `scale_inv`).
  static Weight FromBytes(DType dtype, const void* data, int64_t rows, int64_t cols,
                          std::vector<float> scale_inv = {});
  // A view of bytes that stay valid while `keep_alive` lives (an mmap).
  static Weight Mapped(DType dtype, const void* data, int64_t rows, int64_t cols,
                       std::shared_ptr<const void> keep_alive, const float* scale_inv = nullptr);

  DType dtype() const { return dtype_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  bool empty() const { return data_ == nullptr; }
  size_t bytes() const;          // of the elements (and scales)
  const void* data() const { return data_; }
  const float* scale_inv() const { return scale_inv_; }  // fp8 only
  // The fp32 elements when dtype() == kF32, else nullptr.
  const float* f32() const { return dtype_ == DType::kF32 ? static_cast<const float*>(data_) : nullptr; }

  // out[(r - r0) * cols + c] = w[r, c] for rows [r0, r1) (exact).
  void DequantizeRows(int64_t r0, int64_t r1, float* out) const;
  // Row r as fp32 (embedding lookups).
  void Row(int64_t r, float* out) const { DequantizeRows(r, r + 1, out); }
  std::vector<float> ToFloat() const;  // all of it, [rows, cols]

 private:
  DType dtype_ = DType::kF32;
  int64_t rows_ = 0, cols_ = 0;
  const void* data_ = nullptr;
  const float* scale_inv_ = nullptr;
  std::shared_ptr<const void> storage_;  // owned bytes or the mapping
  std::shared_ptr<const std::vector<float>> owned_scales_;  // shared by copies (scale_inv_ points into it)
};

// y[M,N] = x[M,K] . w^T (N = w.rows(), K = w.cols()); with accumulate, y += .
void Linear(const float* x, int64_t M, int64_t K, const Weight& w, float* y, bool accumulate = false);

// The reference Linear (correct, slow; for tests and `bench gemv`): the whole
// weight dequantised in blocks of 256 rows, each through one BLAS SGEMM on
// whatever threads BLAS has.
void LinearReference(const float* x, int64_t M, int64_t K, const Weight& w, float* y, bool accumulate = false);

// The instruction set of Linear's kernels: "avx512" (F+BW+VL with FMA),
// "avx2" (with FMA) or "scalar", the best the CPU has unless set. SetLinearIsa
// ("auto" or one of those names; for tests and benchmarks, not thread-safe
// against running kernels) returns false for an unknown name or one the CPU
// lacks, and then changes nothing.
bool SetLinearIsa(const std::string& name);
std::string LinearIsa();

}  // namespace expertmesh::kernels
