// A small CBLAS for the standalone GPU build: the GPU machine has no OpenBLAS,
// and the CPU kernels that the GPU tests compare against call CBLAS. Plain
// packed dot products on std::threads; correct for every order/transpose
// combination, fast enough for test sizes. Not used by the main build.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

namespace {

int g_threads = 0;

int Threads() {
  if (g_threads > 0) return g_threads;
  return static_cast<int>(std::max(1u, std::min(16u, std::thread::hardware_concurrency())));
}

float Dot(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Element (r, c) of op(X) for a matrix stored row-major with leading dim ld.
inline float At(const float* x, int ld, bool trans, int r, int c) { return trans ? x[c * ld + r] : x[r * ld + c]; }

void GemmRowMajor(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
                  float beta, float* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  // Pack op(A) as [M][K] and op(B)^T as [N][K]: every C element is one contiguous dot.
  std::vector<float> pa(static_cast<size_t>(M) * K), pb(static_cast<size_t>(N) * K);
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k) pa[static_cast<size_t>(i) * K + k] = At(A, lda, ta, i, k);
  for (int j = 0; j < N; ++j)
    for (int k = 0; k < K; ++k) pb[static_cast<size_t>(j) * K + k] = At(B, ldb, tb, k, j);
  auto rows = [&](int r0, int r1) {
    for (int i = r0; i < r1; ++i) {
      for (int j = 0; j < N; ++j) {
        const float d = K > 0 ? Dot(&pa[static_cast<size_t>(i) * K], &pb[static_cast<size_t>(j) * K], K) : 0.0f;
        float& c = C[static_cast<size_t>(i) * ldc + j];
        c = alpha * d + (beta == 0.0f ? 0.0f : beta * c);
      }
    }
  };
  const double work = static_cast<double>(M) * N * K;
  const int nt = work < 4e6 ? 1 : std::min(Threads(), M);
  if (nt <= 1) {
    rows(0, M);
    return;
  }
  std::vector<std::thread> th;
  for (int t = 0; t < nt; ++t) th.emplace_back(rows, M * t / nt, M * (t + 1) / nt);
  for (auto& t : th) t.join();
}

}  // namespace

extern "C" {

void cblas_sgemm(OPENBLAS_CONST enum CBLAS_ORDER Order, OPENBLAS_CONST enum CBLAS_TRANSPOSE TransA,
                 OPENBLAS_CONST enum CBLAS_TRANSPOSE TransB, OPENBLAS_CONST blasint M, OPENBLAS_CONST blasint N,
                 OPENBLAS_CONST blasint K, OPENBLAS_CONST float alpha, OPENBLAS_CONST float* A,
                 OPENBLAS_CONST blasint lda, OPENBLAS_CONST float* B, OPENBLAS_CONST blasint ldb,
                 OPENBLAS_CONST float beta, float* C, OPENBLAS_CONST blasint ldc) {
  const bool ta = TransA != CblasNoTrans, tb = TransB != CblasNoTrans;
  if (Order == CblasRowMajor) {
    GemmRowMajor(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {  // column-major C = op(A) op(B) is row-major C^T = op(B)^T op(A)^T
    GemmRowMajor(tb, ta, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
  }
}

void cblas_sgemv(OPENBLAS_CONST enum CBLAS_ORDER order, OPENBLAS_CONST enum CBLAS_TRANSPOSE trans,
                 OPENBLAS_CONST blasint m, OPENBLAS_CONST blasint n, OPENBLAS_CONST float alpha,
                 OPENBLAS_CONST float* a, OPENBLAS_CONST blasint lda, OPENBLAS_CONST float* x,
                 OPENBLAS_CONST blasint incx, OPENBLAS_CONST float beta, float* y, OPENBLAS_CONST blasint incy) {
  // y = alpha op(A) x + beta y, A m x n in `order`.
  const bool row_major_no_trans = (order == CblasRowMajor) == (trans == CblasNoTrans);
  const int rows = trans == CblasNoTrans ? m : n, cols = trans == CblasNoTrans ? n : m;
  for (int i = 0; i < rows; ++i) {
    double s = 0;
    for (int j = 0; j < cols; ++j) {
      const float aij = row_major_no_trans ? a[static_cast<size_t>(i) * lda + j] : a[static_cast<size_t>(j) * lda + i];
      s += static_cast<double>(aij) * x[static_cast<size_t>(j) * incx];
    }
    float& yi = y[static_cast<size_t>(i) * incy];
    yi = static_cast<float>(alpha * s + (beta == 0.0f ? 0.0 : beta * yi));
  }
}

void cblas_saxpy(OPENBLAS_CONST blasint n, OPENBLAS_CONST float alpha, OPENBLAS_CONST float* x,
                 OPENBLAS_CONST blasint incx, float* y, OPENBLAS_CONST blasint incy) {
  for (int i = 0; i < n; ++i) y[static_cast<size_t>(i) * incy] += alpha * x[static_cast<size_t>(i) * incx];
}

float cblas_sdot(OPENBLAS_CONST blasint n, OPENBLAS_CONST float* x, OPENBLAS_CONST blasint incx,
                 OPENBLAS_CONST float* y, OPENBLAS_CONST blasint incy) {
  float s = 0;
  for (int i = 0; i < n; ++i) s += x[static_cast<size_t>(i) * incx] * y[static_cast<size_t>(i) * incy];
  return s;
}

void cblas_sscal(OPENBLAS_CONST blasint n, OPENBLAS_CONST float alpha, float* x, OPENBLAS_CONST blasint incx) {
  for (int i = 0; i < n; ++i) x[static_cast<size_t>(i) * incx] *= alpha;
}

void cblas_scopy(OPENBLAS_CONST blasint n, OPENBLAS_CONST float* x, OPENBLAS_CONST blasint incx, float* y,
                 OPENBLAS_CONST blasint incy) {
  for (int i = 0; i < n; ++i) y[static_cast<size_t>(i) * incy] = x[static_cast<size_t>(i) * incx];
}

float cblas_snrm2(OPENBLAS_CONST blasint N, OPENBLAS_CONST float* X, OPENBLAS_CONST blasint incX) {
  double s = 0;
  for (int i = 0; i < N; ++i) s += static_cast<double>(X[static_cast<size_t>(i) * incX]) * X[static_cast<size_t>(i) * incX];
  return static_cast<float>(std::sqrt(s));
}

float cblas_sasum(OPENBLAS_CONST blasint n, OPENBLAS_CONST float* x, OPENBLAS_CONST blasint incx) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += std::fabs(x[static_cast<size_t>(i) * incx]);
  return static_cast<float>(s);
}

CBLAS_INDEX cblas_isamax(OPENBLAS_CONST blasint n, OPENBLAS_CONST float* x, OPENBLAS_CONST blasint incx) {
  CBLAS_INDEX best = 0;
  for (int i = 1; i < n; ++i)
    if (std::fabs(x[static_cast<size_t>(i) * incx]) > std::fabs(x[best * incx])) best = i;
  return best;
}

void openblas_set_num_threads(int num_threads) { g_threads = num_threads; }
int openblas_get_num_threads(void) { return Threads(); }

}  // extern "C"
