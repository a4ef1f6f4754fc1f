// GEMMs through cuBLASLt, loaded with dlopen on first use (binaries start
// and run their CPU paths without a GPU or cuBLAS), and the Context.
//
// All GEMMs are written in cuBLAS's column-major terms: a row-major [r, c]
// matrix is a column-major c x r matrix. y[M,N] = x[M,K] . w[N,K]^T becomes
// y^T (N x M) = op_T(w as K x N) . (x as K x M): the "TN" form that the fp8
// tensor-core kernels require.
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/internal.h"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/status.h"

namespace expertmesh::kernels::cuda {
namespace {

// ---- the cuBLASLt entry points we use, resolved at run time ----
struct LtApi {
  decltype(&cublasLtCreate) Create;
  decltype(&cublasLtDestroy) Destroy;
  decltype(&cublasLtGetVersion) GetVersion;
  decltype(&cublasLtMatmulDescCreate) DescCreate;
  decltype(&cublasLtMatmulDescDestroy) DescDestroy;
  decltype(&cublasLtMatmulDescSetAttribute) DescSet;
  decltype(&cublasLtMatrixLayoutCreate) LayoutCreate;
  decltype(&cublasLtMatrixLayoutDestroy) LayoutDestroy;
  decltype(&cublasLtMatrixLayoutSetAttribute) LayoutSet;
  decltype(&cublasLtMatmulPreferenceCreate) PrefCreate;
  decltype(&cublasLtMatmulPreferenceDestroy) PrefDestroy;
  decltype(&cublasLtMatmulPreferenceSetAttribute) PrefSet;
  decltype(&cublasLtMatmulAlgoGetHeuristic) Heuristic;
  decltype(&cublasLtMatmul) Matmul;
};

absl::StatusOr<const LtApi*> LoadLt() {
  static std::once_flag once;
  static LtApi api;
  static absl::Status status = absl::OkStatus();
  std::call_once(once, [] {
    const char* names[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};
    void* h = nullptr;
    std::string tried;
    for (const char* n : names) {
      h = dlopen(n, RTLD_NOW | RTLD_LOCAL);
      if (h != nullptr) break;
      absl::StrAppend(&tried, tried.empty() ? "" : "; ", dlerror());
    }
    if (h == nullptr) {
      status = absl::FailedPreconditionError(
          absl::StrCat("cannot load cuBLASLt (", tried,
                       "): install the CUDA toolkit's cuBLAS or add its lib folder to LD_LIBRARY_PATH"));
      return;
    }
    bool ok = true;
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
      if (fn == nullptr) {
        ok = false;
        absl::StrAppend(&tried, " missing ", name);
      }
    };
    sym(api.Create, "cublasLtCreate");
    sym(api.Destroy, "cublasLtDestroy");
    sym(api.GetVersion, "cublasLtGetVersion");
    sym(api.DescCreate, "cublasLtMatmulDescCreate");
    sym(api.DescDestroy, "cublasLtMatmulDescDestroy");
    sym(api.DescSet, "cublasLtMatmulDescSetAttribute");
    sym(api.LayoutCreate, "cublasLtMatrixLayoutCreate");
    sym(api.LayoutDestroy, "cublasLtMatrixLayoutDestroy");
    sym(api.LayoutSet, "cublasLtMatrixLayoutSetAttribute");
    sym(api.PrefCreate, "cublasLtMatmulPreferenceCreate");
    sym(api.PrefDestroy, "cublasLtMatmulPreferenceDestroy");
    sym(api.PrefSet, "cublasLtMatmulPreferenceSetAttribute");
    sym(api.Heuristic, "cublasLtMatmulAlgoGetHeuristic");
    sym(api.Matmul, "cublasLtMatmul");
    if (!ok) status = absl::FailedPreconditionError(absl::StrCat("cuBLASLt is too old:", tried));
  });
  if (!status.ok()) return status;
  return &api;
}

absl::Status LtStatus(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string msg = absl::StrCat(what, ": cuBLASLt status ", static_cast<int>(s));
  switch (s) {
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return absl::UnimplementedError(msg);
    case CUBLAS_STATUS_INVALID_VALUE:
      return absl::InvalidArgumentError(msg);
    case CUBLAS_STATUS_ALLOC_FAILED:
      return absl::ResourceExhaustedError(msg);
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return absl::FailedPreconditionError(msg);
    default:
      return absl::InternalError(msg);
  }
}

// A GEMM in cuBLAS column-major terms: C[m x n] = op(A) op(B) (+ C).
struct GemmSpec {
  bool ta = false, tb = false;
  int64_t m = 0, n = 0, k = 0;
  cudaDataType_t at = CUDA_R_16BF, bt = CUDA_R_16BF, ct = CUDA_R_16BF;
  int64_t lda = 0, ldb = 0, ldc = 0;
  int64_t batch = 1, sa = 0, sb = 0, sc = 0;
  bool fp8_block = false;  // A: 1x128 (per row) scales, B: 128x128 block scales
  bool accumulate = false;
};

int AlignOf(const void* p) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(p);
  int a = 256;
  while (a > 1 && (v % a) != 0) a >>= 1;
  return a;
}

using PlanKey = std::tuple<int, int, int64_t, int64_t, int64_t, int, int, int, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int, int, int, int, int>;

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo;
};

}  // namespace

struct Context::Impl {
  const LtApi* lt = nullptr;
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  std::map<PlanKey, Plan> plans;

  ~Impl() {
    if (lt != nullptr) {
      for (auto& kv : plans) DestroyPlan(kv.second);
      if (handle != nullptr) lt->Destroy(handle);
    }
    if (workspace != nullptr) cudaFree(workspace);
  }
  void DestroyPlan(Plan& p) {
    if (p.a) lt->LayoutDestroy(p.a);
    if (p.b) lt->LayoutDestroy(p.b);
    if (p.c) lt->LayoutDestroy(p.c);
    if (p.desc) lt->DescDestroy(p.desc);
  }
};

namespace {

absl::StatusOr<Context::Impl*> EnsureLt(Context& ctx) {
  Context::Impl* impl = ctx.impl();
  if (impl->handle != nullptr) return impl;
  auto lt = LoadLt();
  if (!lt.ok()) return lt.status();
  impl->lt = *lt;
  absl::Status st = LtStatus(impl->lt->Create(&impl->handle), "cublasLtCreate");
  if (!st.ok()) {
    impl->handle = nullptr;
    return st;
  }
  if (impl->workspace_bytes > 0) {
    st = CudaStatus(cudaMalloc(&impl->workspace, impl->workspace_bytes), "cuBLASLt workspace");
    if (!st.ok()) return st;
  }
  return impl;
}

absl::Status MakeLayout(const LtApi* lt, cublasLtMatrixLayout_t* l, cudaDataType_t t, int64_t rows, int64_t cols,
                        int64_t ld, int64_t batch, int64_t stride) {
  absl::Status st = LtStatus(lt->LayoutCreate(l, t, rows, cols, ld), "cublasLtMatrixLayoutCreate");
  if (!st.ok() || batch <= 1) return st;
  const int32_t b = static_cast<int32_t>(batch);
  st = LtStatus(lt->LayoutSet(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &b, sizeof(b)), "batch count");
  if (!st.ok()) return st;
  return LtStatus(lt->LayoutSet(*l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)),
                  "batch stride");
}

absl::StatusOr<Plan*> GetPlan(Context::Impl* impl, const GemmSpec& g, int al_a, int al_b, int al_c,
                              const float* a_scale, const float* b_scale) {
  const PlanKey key{g.ta, g.tb, g.m, g.n, g.k, g.at, g.bt, g.ct, g.lda, g.ldb, g.ldc, g.batch, g.sa, g.sb, g.sc,
                    g.fp8_block, g.accumulate, al_a, al_b, al_c};
  auto it = impl->plans.find(key);
  if (it != impl->plans.end()) return &it->second;
  if (impl->plans.size() > 4096) {  // varying expert counts: keep the cache bounded
    for (auto& kv : impl->plans) impl->DestroyPlan(kv.second);
    impl->plans.clear();
  }
  const LtApi* lt = impl->lt;
  Plan p;
  auto fail = [&](absl::Status s) {
    impl->DestroyPlan(p);
    return s;
  };
  absl::Status st = LtStatus(lt->DescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  if (!st.ok()) return fail(st);
  const cublasOperation_t opa = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  lt->DescSet(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa));
  lt->DescSet(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb));
  if (g.fp8_block) {
    // Hopper's cuBLASLt pairs a 1x128 A with a 128x128 B (the other way round is NOT_SUPPORTED).
    const int32_t ma = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, mb = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    st = LtStatus(lt->DescSet(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof(ma)), "A scale mode");
    if (st.ok()) st = LtStatus(lt->DescSet(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof(mb)), "B scale mode");
    if (!st.ok()) return fail(absl::UnimplementedError(
        absl::StrCat(st.message(), ": this cuBLASLt has no fp8 block scaling (needs CUDA 12.9+)")));
    // The heuristic validates the scale pointers too: set this call's (each call sets its own).
    lt->DescSet(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale));
    lt->DescSet(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale));
  }
  st = MakeLayout(lt, &p.a, g.at, g.ta ? g.k : g.m, g.ta ? g.m : g.k, g.lda, g.batch, g.sa);
  if (st.ok()) st = MakeLayout(lt, &p.b, g.bt, g.tb ? g.n : g.k, g.tb ? g.k : g.n, g.ldb, g.batch, g.sb);
  if (st.ok()) st = MakeLayout(lt, &p.c, g.ct, g.m, g.n, g.ldc, g.batch, g.sc);
  if (!st.ok()) return fail(st);
  // Ask with the operands' real alignments; if refused, once more with the defaults.
  cublasLtMatmulHeuristicResult_t res = {};
  int found = 0;
  std::string tried;
  for (int attempt = 0; attempt < 2 && found == 0; ++attempt) {
    cublasLtMatmulPreference_t pref = nullptr;
    st = LtStatus(lt->PrefCreate(&pref), "cublasLtMatmulPreferenceCreate");
    if (!st.ok()) return fail(st);
    const uint64_t ws = impl->workspace_bytes;
    lt->PrefSet(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    if (attempt == 0) {
      const uint32_t aa = al_a, ab = al_b, ac = al_c;
      lt->PrefSet(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof(aa));
      lt->PrefSet(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof(ab));
      lt->PrefSet(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof(ac));
      lt->PrefSet(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof(ac));
    }
    st = LtStatus(lt->Heuristic(impl->handle, p.desc, p.a, p.b, p.c, p.c, pref, 1, &res, &found),
                  "cublasLtMatmulAlgoGetHeuristic");
    lt->PrefDestroy(pref);
    if (!st.ok()) absl::StrAppend(&tried, tried.empty() ? "" : "; ", st.message());
  }
  if (found > 0) st = absl::OkStatus();
  if (!st.ok()) {
    st = absl::Status(st.code(), absl::StrCat(tried, " (cuBLASLt ", lt->GetVersion(), ", m=", g.m, " n=", g.n,
                                              " k=", g.k, g.fp8_block ? ", fp8 block-scaled" : "", ")"));
  }
  if (st.ok() && found == 0) {
    st = absl::UnimplementedError(absl::StrCat("cuBLASLt has no algorithm for m=", g.m, " n=", g.n, " k=", g.k,
                                               g.fp8_block ? " (fp8 block-scaled)" : "", " batch=", g.batch));
  }
  if (!st.ok()) return fail(st);
  p.algo = res.algo;
  return &impl->plans.emplace(key, p).first->second;
}

absl::Status RunGemm(Context& ctx, const GemmSpec& g, const void* A, const void* B, void* C,
                     const float* a_scale = nullptr, const float* b_scale = nullptr) {
  if (g.m == 0 || g.n == 0 || g.batch == 0) return absl::OkStatus();
  auto impl = EnsureLt(ctx);
  if (!impl.ok()) return impl.status();
  auto plan = GetPlan(*impl, g, AlignOf(A), AlignOf(B), AlignOf(C), a_scale, b_scale);
  if (!plan.ok()) return plan.status();
  const LtApi* lt = (*impl)->lt;
  Plan* p = *plan;
  if (g.fp8_block) {
    lt->DescSet(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale));
    lt->DescSet(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale));
  }
  const float alpha = 1.0f, beta = g.accumulate ? 1.0f : 0.0f;
  return LtStatus(lt->Matmul((*impl)->handle, p->desc, &alpha, A, p->a, B, p->b, &beta, C, p->c, C, p->c, &p->algo,
                             (*impl)->workspace, (*impl)->workspace_bytes, static_cast<cudaStream_t>(ctx.stream())),
                  "cublasLtMatmul");
}

// y[M,N] = x[M,K] . w[N,K]^T.
GemmSpec LinearSpec(int64_t M, int64_t K, int64_t N, cudaDataType_t in, cudaDataType_t out) {
  GemmSpec g;
  g.ta = true;
  g.m = N;
  g.n = M;
  g.k = K;
  g.at = g.bt = in;
  g.ct = out;
  g.lda = K;
  g.ldb = K;
  g.ldc = N;
  return g;
}

absl::Status CheckFp8Shape(const char* op, int64_t K, int64_t N) {
  if (K % 128 != 0 || N % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda::", op, ": native fp8 needs K % 128 == 0 and N % 16 == 0 (K=", K, ", N=", N,
        "); dequantise this weight with DequantFp8Blocks and use the bf16 path"));
  }
  return absl::OkStatus();
}

}  // namespace

// ---- Context ----

absl::StatusOr<std::unique_ptr<Context>> Context::Create(const ContextOptions& opts) {
  int n = 0;
  absl::Status st = CudaStatus(cudaGetDeviceCount(&n), "no usable CUDA device");
  if (!st.ok()) return st;
  if (opts.device < 0 || opts.device >= n) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA device ", opts.device, " asked, ", n, " present"));
  }
  st = CudaStatus(cudaSetDevice(opts.device), "cudaSetDevice");
  if (!st.ok()) return st;
  std::unique_ptr<Context> ctx(new Context());
  ctx->stream_ = opts.stream;
  auto pool = DevicePool::Create(opts.pool_bytes);
  if (!pool.ok()) return pool.status();
  ctx->pool_ = std::move(*pool);
  ctx->impl_ = std::make_unique<Impl>();
  ctx->impl_->workspace_bytes = opts.gemm_workspace_bytes;
  return ctx;
}

Context::~Context() = default;

absl::Status Context::Synchronize() {
  absl::Status st = CudaStatus(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)), "stream synchronize");
  if (!st.ok()) return st;
  return CudaStatus(cudaGetLastError(), "pending CUDA error");
}

// ---- GEMMs ----

absl::Status Linear(Context& ctx, const Bf16* x, int64_t M, int64_t K, const Bf16* w, int64_t N, void* y,
                    OutType out_type, bool accumulate) {
  if (M < 0 || K <= 0 || N <= 0) return absl::InvalidArgumentError("cuda::Linear: M >= 0, K > 0, N > 0");
  GemmSpec g = LinearSpec(M, K, N, CUDA_R_16BF, out_type == OutType::kF32 ? CUDA_R_32F : CUDA_R_16BF);
  g.accumulate = accumulate;
  return RunGemm(ctx, g, w, x, y);
}

int64_t Fp8ActScaleFloats(int64_t M, int64_t K) { return (M + 127) / 128 * internal::Fp8ScaleStride(K); }

absl::Status ExpandFp8Scales(const float* scale_inv, int64_t N, int64_t K, float* row_scale, Stream stream) {
  if (K % 128 != 0) return absl::InvalidArgumentError(absl::StrCat("cuda::ExpandFp8Scales: K % 128 != 0 (K=", K, ")"));
  return CudaStatus(internal::ExpandFp8Scales(scale_inv, N, K, row_scale, static_cast<cudaStream_t>(stream)),
                    "ExpandFp8Scales");
}

absl::Status QuantizeActivationsFp8(const Bf16* x, int64_t M, int64_t K, Fp8* xq, float* x_scale, Stream stream) {
  if (K % 128 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda::QuantizeActivationsFp8: K % 128 != 0 (K=", K, ")"));
  }
  return CudaStatus(internal::QuantFp8Blocks(x, M, K, nullptr, 1, xq, x_scale, static_cast<cudaStream_t>(stream)),
                    "QuantizeActivationsFp8");
}

absl::Status LinearFp8Prequantized(Context& ctx, const Fp8* xq, const float* x_scale, int64_t M, int64_t K,
                                   const Fp8* w, const float* w_row_scale, int64_t N, Bf16* y) {
  absl::Status st = CheckFp8Shape("LinearFp8", K, N);
  if (!st.ok() || M == 0) return st;
  GemmSpec g = LinearSpec(M, K, N, CUDA_R_8F_E4M3, CUDA_R_16BF);
  g.fp8_block = true;
  return RunGemm(ctx, g, w, xq, y, w_row_scale, x_scale);
}

absl::Status LinearFp8(Context& ctx, const Bf16* x, int64_t M, int64_t K, const Fp8* w, const float* w_row_scale,
                       int64_t N, Bf16* y) {
  absl::Status st = CheckFp8Shape("LinearFp8", K, N);
  if (!st.ok() || M == 0) return st;
  PoolScope scope(ctx.pool());
  auto xq = ctx.pool().AllocArray<Fp8>(M * K);
  if (!xq.ok()) return xq.status();
  auto xs = ctx.pool().AllocArray<float>(Fp8ActScaleFloats(M, K));
  if (!xs.ok()) return xs.status();
  st = QuantizeActivationsFp8(x, M, K, *xq, *xs, ctx.stream());
  if (!st.ok()) return st;
  return LinearFp8Prequantized(ctx, *xq, *xs, M, K, w, w_row_scale, N, y);
}

absl::Status GroupedExperts(Context& ctx, const GroupedExpertWeights& w, const Bf16* x_perm,
                            const int64_t* host_offsets, Bf16* out_perm, const int32_t* device_offsets) {
  const int64_t E = w.num_experts, H = w.hidden, I = w.inter;
  if (E <= 0 || H <= 0 || I <= 0 || H % 8 != 0 || I % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda::GroupedExperts: E, H, I positive, H and I multiples of 8 (E=", E, " H=", H, " I=", I, ")"));
  }
  if (static_cast<int64_t>(w.gate_up.size()) != E || static_cast<int64_t>(w.down.size()) != E ||
      (w.fp8 && (static_cast<int64_t>(w.gate_up_scale.size()) != E ||
                 static_cast<int64_t>(w.down_scale.size()) != E))) {
    return absl::InvalidArgumentError("cuda::GroupedExperts: one weight pointer (and scale) per expert");
  }
  if (host_offsets[0] != 0) return absl::InvalidArgumentError("cuda::GroupedExperts: offsets[0] must be 0");
  const int64_t rows = host_offsets[E];
  if (rows == 0) return absl::OkStatus();
  for (int64_t e = 0; e < E; ++e) {
    if (host_offsets[e + 1] < host_offsets[e]) return absl::InvalidArgumentError("cuda::GroupedExperts: offsets decrease");
    if (host_offsets[e + 1] > host_offsets[e] && (w.gate_up[e] == nullptr || w.down[e] == nullptr)) {
      return absl::FailedPreconditionError(
          absl::StrCat("cuda::GroupedExperts: expert ", e, " has rows but no weights on this device"));
    }
  }
  if (w.fp8) {
    absl::Status st = CheckFp8Shape("GroupedExperts", H, 2 * I);
    if (st.ok()) st = CheckFp8Shape("GroupedExperts", I, H);
    if (!st.ok()) return st;
  }
  const cudaStream_t s = static_cast<cudaStream_t>(ctx.stream());
  PoolScope scope(ctx.pool());
  auto gu = ctx.pool().AllocArray<Bf16>(rows * 2 * I);
  if (!gu.ok()) return gu.status();
  if (!w.fp8) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = host_offsets[e], n = host_offsets[e + 1] - o;
      if (n == 0) continue;
      absl::Status st = RunGemm(ctx, LinearSpec(n, H, 2 * I, CUDA_R_16BF, CUDA_R_16BF), w.gate_up[e], x_perm + o * H,
                                *gu + o * 2 * I);
      if (!st.ok()) return st;
    }
    auto act = ctx.pool().AllocArray<Bf16>(rows * I);
    if (!act.ok()) return act.status();
    absl::Status st = CudaStatus(internal::SiluMulRows(*gu, rows, I, *act, s), "GroupedExperts: SiluMulRows");
    if (!st.ok()) return st;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = host_offsets[e], n = host_offsets[e + 1] - o;
      if (n == 0) continue;
      st = RunGemm(ctx, LinearSpec(n, I, H, CUDA_R_16BF, CUDA_R_16BF), w.down[e], *act + o * I, out_perm + o * H);
      if (!st.ok()) return st;
    }
    return absl::OkStatus();
  }
  // fp8: quantise activations per expert (128x128 token blocks), block-scaled GEMMs.
  auto doff = ctx.pool().AllocArray<int32_t>(E + 1);
  auto xq = ctx.pool().AllocArray<Fp8>(rows * H);
  const int64_t slots = internal::Fp8ScaleSlots(rows, E);
  const int64_t l4h = internal::Fp8ScaleStride(H), l4i = internal::Fp8ScaleStride(I);
  auto xs = ctx.pool().AllocArray<float>(slots * l4h);
  auto aq = ctx.pool().AllocArray<Fp8>(rows * I);
  auto as = ctx.pool().AllocArray<float>(slots * l4i);
  for (const absl::Status& a : {doff.status(), xq.status(), xs.status(), aq.status(), as.status()}) {
    if (!a.ok()) return a;
  }
  const int32_t* offs = device_offsets;
  absl::Status st = absl::OkStatus();
  if (offs == nullptr) {
    std::vector<int32_t> off32(E + 1);
    for (int64_t e = 0; e <= E; ++e) off32[e] = static_cast<int32_t>(host_offsets[e]);
    st = CudaStatus(cudaMemcpyAsync(*doff, off32.data(), (E + 1) * sizeof(int32_t), cudaMemcpyHostToDevice, s),
                    "GroupedExperts: offsets");
    offs = *doff;
  }
  if (st.ok()) st = CudaStatus(internal::QuantFp8Blocks(x_perm, rows, H, offs, E, *xq, *xs, s), "quantise x");
  if (!st.ok()) return st;
  GemmSpec g1 = LinearSpec(0, H, 2 * I, CUDA_R_8F_E4M3, CUDA_R_16BF);
  g1.fp8_block = true;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t o = host_offsets[e], n = host_offsets[e + 1] - o;
    if (n == 0) continue;
    g1.n = n;
    st = RunGemm(ctx, g1, w.gate_up[e], *xq + o * H, *gu + o * 2 * I, w.gate_up_scale[e], *xs + (o / 128 + e) * l4h);
    if (!st.ok()) return st;
  }
  st = CudaStatus(internal::SiluMulQuantFp8Blocks(*gu, rows, I, offs, E, *aq, *as, s), "quantise activation");
  if (!st.ok()) return st;
  GemmSpec g2 = LinearSpec(0, I, H, CUDA_R_8F_E4M3, CUDA_R_16BF);
  g2.fp8_block = true;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t o = host_offsets[e], n = host_offsets[e + 1] - o;
    if (n == 0) continue;
    g2.n = n;
    st = RunGemm(ctx, g2, w.down[e], *aq + o * I, out_perm + o * H, w.down_scale[e], *as + (o / 128 + e) * l4i);
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

// ---- MLA projections (batched over heads) ----

absl::Status MlaAbsorbQuery(Context& ctx, const MlaShape& s, const Bf16* q, int64_t N, const Bf16* w_kv_b,
                            Bf16* q_abs) {
  const int64_t H = s.heads, dn = s.nope, dr = s.rope, dv = s.v, L = s.kv_lora, qd = dn + dr;
  if (N == 0) return absl::OkStatus();
  // q_abs_h^T (L x N) = W_uk_h^T (L x dn, = row-major [dn, L]) . q_nope_h^T (dn x N).
  GemmSpec g;
  g.m = L;
  g.n = N;
  g.k = dn;
  g.lda = L;
  g.sa = (dn + dv) * L;
  g.ldb = H * qd;
  g.sb = qd;
  g.ldc = H * (L + dr);
  g.sc = L + dr;
  g.batch = H;
  absl::Status st = RunGemm(ctx, g, w_kv_b, q, q_abs);
  if (!st.ok()) return st;
  return CudaStatus(internal::MlaCopyRope(q, N, H, dn, dr, L, q_abs, static_cast<cudaStream_t>(ctx.stream())),
                    "MlaAbsorbQuery: rope part");
}

absl::Status MlaProjectOut(Context& ctx, const MlaShape& s, const Bf16* o_lat, int64_t N, const Bf16* w_kv_b,
                           Bf16* out) {
  const int64_t H = s.heads, dn = s.nope, dv = s.v, L = s.kv_lora;
  if (N == 0) return absl::OkStatus();
  // out_h^T (dv x N) = op_T(W_uv_h as L x dv) . o_lat_h^T (L x N).
  GemmSpec g;
  g.ta = true;
  g.m = dv;
  g.n = N;
  g.k = L;
  g.lda = L;
  g.sa = (dn + dv) * L;
  g.ldb = H * L;
  g.sb = L;
  g.ldc = H * dv;
  g.sc = dv;
  g.batch = H;
  return RunGemm(ctx, g, w_kv_b + dn * L, o_lat, out);
}

}  // namespace expertmesh::kernels::cuda
