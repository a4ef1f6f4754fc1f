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
// fp32 is exact). Decode-sized M streams w once; large M converts blocks of
// rows to fp32 and runs BLAS SGEMM. Parallel over the pool (common/thread_pool.h)
// at the top level, single-threaded inside a pool task.
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
  std::vector<float> owned_scales_;
};

// y[M,N] = x[M,K] . w^T (N = w.rows(), K = w.cols()); with accumulate, y += .
void Linear(const float* x, int64_t M, int64_t K, const Weight& w, float* y, bool accumulate = false);

}  // namespace expertmesh::kernels
