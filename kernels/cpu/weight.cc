#include "kernels/cpu/weight.h"

#include <cblas.h>

#include <algorithm>
#include <cstring>

#include "common/thread_pool.h"
#include "glog/logging.h"
#include "kernels/cpu/kernels.h"

namespace expertmesh::kernels {

namespace {
constexpr int64_t kBlock = 128;  // fp8 scale block
}

Weight Weight::FromFloat(std::vector<float> values, int64_t rows, int64_t cols) {
  CHECK_EQ(static_cast<int64_t>(values.size()), rows * cols);
  auto owned = std::make_shared<std::vector<float>>(std::move(values));
  Weight w;
  w.dtype_ = DType::kF32;
  w.rows_ = rows;
  w.cols_ = cols;
  w.data_ = owned->data();
  w.storage_ = owned;
  return w;
}

Weight Weight::FromBytes(DType dtype, const void* data, int64_t rows, int64_t cols, std::vector<float> scale_inv) {
  const size_t n = static_cast<size_t>(rows * cols) * DTypeSize(dtype);
  auto owned = std::make_shared<std::vector<uint8_t>>(static_cast<const uint8_t*>(data),
                                                      static_cast<const uint8_t*>(data) + n);
  Weight w;
  w.dtype_ = dtype;
  w.rows_ = rows;
  w.cols_ = cols;
  w.data_ = owned->data();
  w.storage_ = owned;
  w.owned_scales_ = std::move(scale_inv);
  w.scale_inv_ = w.owned_scales_.empty() ? nullptr : w.owned_scales_.data();
  CHECK(dtype != DType::kF8E4M3 || w.scale_inv_ != nullptr) << "fp8 weight without scale_inv";
  return w;
}

Weight Weight::Mapped(DType dtype, const void* data, int64_t rows, int64_t cols, std::shared_ptr<const void> keep_alive,
                      const float* scale_inv) {
  Weight w;
  w.dtype_ = dtype;
  w.rows_ = rows;
  w.cols_ = cols;
  w.data_ = data;
  w.storage_ = std::move(keep_alive);
  w.scale_inv_ = scale_inv;
  CHECK(dtype != DType::kF8E4M3 || w.scale_inv_ != nullptr) << "fp8 weight without scale_inv";
  return w;
}

size_t Weight::bytes() const {
  size_t b = static_cast<size_t>(rows_ * cols_) * DTypeSize(dtype_);
  if (dtype_ == DType::kF8E4M3) {
    b += static_cast<size_t>(((rows_ + kBlock - 1) / kBlock) * ((cols_ + kBlock - 1) / kBlock)) * sizeof(float);
  }
  return b;
}

void Weight::DequantizeRows(int64_t r0, int64_t r1, float* out) const {
  const int64_t n = (r1 - r0) * cols_;
  const uint8_t* base = static_cast<const uint8_t*>(data_) + static_cast<size_t>(r0 * cols_) * DTypeSize(dtype_);
  ConvertToFloat(dtype_, base, static_cast<size_t>(n), out);
  if (dtype_ == DType::kF8E4M3) {
    const int64_t bc = (cols_ + kBlock - 1) / kBlock;
    for (int64_t r = r0; r < r1; ++r) {
      float* o = out + (r - r0) * cols_;
      const float* s = scale_inv_ + (r / kBlock) * bc;
      for (int64_t c = 0; c < cols_; ++c) o[c] *= s[c / kBlock];
    }
  }
}

std::vector<float> Weight::ToFloat() const {
  std::vector<float> out(static_cast<size_t>(rows_ * cols_));
  DequantizeRows(0, rows_, out.data());
  return out;
}

// Reference implementation (correct, not fast): fp32 through kernels::Linear;
// other types dequantise blocks of rows to fp32 and run SGEMM into the
// matching columns of y.
void Linear(const float* x, int64_t M, int64_t K, const Weight& w, float* y, bool accumulate) {
  CHECK_EQ(K, w.cols());
  const int64_t N = w.rows();
  if (w.dtype() == DType::kF32) {
    kernels::Linear(x, M, K, w.f32(), N, y, accumulate);
    return;
  }
  constexpr int64_t kRows = 256;
  std::vector<float> block(static_cast<size_t>(std::min(kRows, N) * K));
  for (int64_t r0 = 0; r0 < N; r0 += kRows) {
    const int64_t r1 = std::min(N, r0 + kRows);
    w.DequantizeRows(r0, r1, block.data());
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(r1 - r0),
                static_cast<int>(K), 1.0f, x, static_cast<int>(K), block.data(), static_cast<int>(K),
                accumulate ? 1.0f : 0.0f, y + r0, static_cast<int>(N));
  }
}

}  // namespace expertmesh::kernels
