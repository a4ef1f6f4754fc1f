// Host side of kernels/cuda/kernels.h (all but the GEMMs, see gemm.cc):
// the device pool, argument checks, launches, CUDA errors -> absl::Status.
#include <cuda_runtime.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/internal.h"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/status.h"

namespace expertmesh::kernels::cuda {
namespace {

cudaStream_t S(Stream s) { return static_cast<cudaStream_t>(s); }

absl::Status Bad(absl::string_view op, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("cuda::", op, ": ", why));
}

}  // namespace

// ---- DevicePool ----

absl::StatusOr<std::unique_ptr<DevicePool>> DevicePool::Create(size_t bytes) {
  void* p = nullptr;
  if (bytes > 0) {
    absl::Status st = CudaStatus(cudaMalloc(&p, bytes), "DevicePool: cudaMalloc");
    if (!st.ok()) return absl::Status(st.code(), absl::StrCat(st.message(), " (", bytes >> 20, " MiB asked)"));
  }
  return std::unique_ptr<DevicePool>(new DevicePool(static_cast<char*>(p), bytes));
}

DevicePool::~DevicePool() {
  if (base_ != nullptr) cudaFree(base_);
}

absl::StatusOr<void*> DevicePool::Alloc(size_t bytes) {
  const size_t start = (used_ + 255) & ~size_t{255};
  if (start + bytes > capacity_) {
    return absl::ResourceExhaustedError(absl::StrCat("DevicePool: ", bytes, " bytes asked, ", capacity_ - used_,
                                                     " of ", capacity_,
                                                     " free; create the Context with a larger pool_bytes"));
  }
  used_ = start + bytes;
  return static_cast<void*>(base_ + start);
}

// ---- elementwise ----

absl::Status RmsNorm(const Bf16* x, int64_t T, int64_t H, const float* w, float eps, Bf16* y, Stream stream) {
  if (H <= 0 || H % 8 != 0) return Bad("RmsNorm", absl::StrCat("H must be a positive multiple of 8, got ", H));
  if (T < 0) return Bad("RmsNorm", "T < 0");
  return CudaStatus(internal::RmsNorm(x, T, H, w, eps, y, S(stream)), "RmsNorm");
}

absl::Status SiluMulRows(const Bf16* gate_up, int64_t T, int64_t I, Bf16* out, Stream stream) {
  if (I <= 0 || I % 8 != 0) return Bad("SiluMulRows", absl::StrCat("I must be a positive multiple of 8, got ", I));
  return CudaStatus(internal::SiluMulRows(gate_up, T, I, out, S(stream)), "SiluMulRows");
}

absl::Status RopeApply(Bf16* x, int64_t tokens, int64_t vecs, int64_t token_stride, int64_t vec_stride,
                       int64_t dim, const int32_t* positions, const double* inv_freq, Stream stream) {
  if (dim <= 0 || dim % 2 != 0 || dim > 2048) return Bad("RopeApply", absl::StrCat("dim must be even, <= 2048: ", dim));
  if (token_stride % 2 != 0 || vec_stride % 2 != 0) return Bad("RopeApply", "strides must be even (pairs are 4 bytes)");
  return CudaStatus(
      internal::RopeApply(x, tokens, vecs, token_stride, vec_stride, dim, positions, inv_freq, S(stream)),
      "RopeApply");
}

absl::Status Embedding(const Bf16* table, int64_t V, int64_t H, const int32_t* ids, int64_t T, Bf16* out,
                       Stream stream) {
  if (H <= 0 || H % 8 != 0) return Bad("Embedding", absl::StrCat("H must be a positive multiple of 8, got ", H));
  return CudaStatus(internal::Embedding(table, V, H, ids, T, out, S(stream)), "Embedding");
}

absl::Status ArgmaxRows(const float* logits, int64_t T, int64_t V, int32_t* out, Stream stream) {
  if (V <= 0) return Bad("ArgmaxRows", "V must be positive");
  return CudaStatus(internal::ArgmaxRows(logits, T, V, out, S(stream)), "ArgmaxRows");
}

absl::Status CastF32ToBf16(const float* x, int64_t n, Bf16* y, Stream stream) {
  return CudaStatus(internal::CastF32ToBf16(x, n, y, S(stream)), "CastF32ToBf16");
}
absl::Status CastBf16ToF32(const Bf16* x, int64_t n, float* y, Stream stream) {
  return CudaStatus(internal::CastBf16ToF32(x, n, y, S(stream)), "CastBf16ToF32");
}

absl::Status DequantFp8Blocks(const Fp8* q, int64_t rows, int64_t cols, const float* scale_inv, int64_t br,
                              int64_t bc, Bf16* out, Stream stream) {
  if (br <= 0 || bc <= 0) return Bad("DequantFp8Blocks", "block sizes must be positive");
  return CudaStatus(internal::DequantFp8Blocks(q, rows, cols, scale_inv, br, bc, out, S(stream)),
                    "DequantFp8Blocks");
}

// ---- MoE ----

absl::Status Route(const float* logits, const float* bias, int64_t T, const RouterParams& p, int32_t* ids,
                   float* weights, Stream stream) {
  const int64_t E = p.num_experts, G = p.num_groups;
  if (E <= 0 || E > 512) return Bad("Route", absl::StrCat("num_experts must be in [1, 512], got ", E));
  if (G <= 0 || G > 32 || E % G != 0) return Bad("Route", absl::StrCat("num_groups ", G, " must divide ", E, ", <= 32"));
  if (p.top_k <= 0 || p.top_k > 32 || p.top_k > E) return Bad("Route", absl::StrCat("top_k must be in [1, 32]: ", p.top_k));
  if (G > 1 && (p.topk_groups <= 0 || p.topk_groups > G || p.topk_groups * (E / G) < p.top_k)) {
    return Bad("Route", absl::StrCat("topk_groups ", p.topk_groups, " of ", G, " groups cannot hold top_k ", p.top_k));
  }
  return CudaStatus(internal::Route(logits, bias, T, E, G, p.topk_groups, p.top_k, p.sigmoid, p.norm_topk_prob,
                                    p.scaling, ids, weights, S(stream)),
                    "Route");
}

absl::Status ExpertLayout(Context& ctx, const int32_t* ids, int64_t T, int64_t k, int64_t E, int32_t* offsets,
                          int32_t* pos) {
  if (E <= 0 || E > 1024) return Bad("ExpertLayout", absl::StrCat("E must be in [1, 1024], got ", E));
  if (k <= 0 || k > 32) return Bad("ExpertLayout", absl::StrCat("k must be in [1, 32], got ", k));
  PoolScope scope(ctx.pool());
  auto scratch = ctx.pool().AllocArray<int32_t>(internal::ExpertLayoutScratchInts(T * k, E));
  if (!scratch.ok()) return scratch.status();
  return CudaStatus(internal::ExpertLayout(ids, T * k, E, *scratch, offsets, pos, S(ctx.stream())), "ExpertLayout");
}

absl::Status DispatchLayout(const int32_t* ids, int64_t T, int64_t k, int64_t E, const int32_t* expert_rank,
                            int64_t R, int32_t* tokens_per_rank, int32_t* tokens_per_expert, uint8_t* token_in_rank,
                            Stream stream) {
  if (k <= 0 || k > 32) return Bad("DispatchLayout", absl::StrCat("k must be in [1, 32], got ", k));
  if (R <= 0) return Bad("DispatchLayout", "R must be positive");
  return CudaStatus(internal::DispatchLayout(ids, T, k, E, expert_rank, R, tokens_per_rank, tokens_per_expert,
                                             token_in_rank, S(stream)),
                    "DispatchLayout");
}

absl::Status Permute(const Bf16* x, int64_t T, int64_t H, const int32_t* pos, int64_t k, Bf16* x_perm,
                     Stream stream) {
  if (H <= 0 || H % 8 != 0) return Bad("Permute", absl::StrCat("H must be a positive multiple of 8, got ", H));
  if (k <= 0 || k > 32) return Bad("Permute", absl::StrCat("k must be in [1, 32], got ", k));
  return CudaStatus(internal::Permute(x, T, H, pos, k, x_perm, S(stream)), "Permute");
}

absl::Status Combine(const Bf16* out_perm, const int32_t* pos, const float* weights, int64_t T, int64_t k, int64_t H,
                     Bf16* y, bool accumulate, Stream stream) {
  if (H <= 0 || H % 8 != 0) return Bad("Combine", absl::StrCat("H must be a positive multiple of 8, got ", H));
  if (k <= 0 || k > 32) return Bad("Combine", absl::StrCat("k must be in [1, 32], got ", k));
  return CudaStatus(internal::Combine(out_perm, pos, weights, T, k, H, y, accumulate, S(stream)), "Combine");
}

// ---- MLA decode ----

absl::Status MlaDecode(Context& ctx, const MlaDecodeParams& p) {
  if (p.batch < 0 || p.q_len <= 0 || p.heads <= 0) return Bad("MlaDecode", "batch >= 0, q_len > 0, heads > 0");
  if (p.page_size <= 0 || p.max_pages <= 0) return Bad("MlaDecode", "page_size and max_pages must be positive");
  if (p.kv_lora <= 0 || p.rope < 0) return Bad("MlaDecode", "kv_lora > 0, rope >= 0");
  const bool fast = internal::MlaFastPathSupported(p.kv_lora, p.rope);
  if (!fast && p.kv_lora > 1024) return Bad("MlaDecode", absl::StrCat("kv_lora ", p.kv_lora, " > 1024 (generic path)"));
  internal::MlaDecodeArgs a{p.q, p.kv_cache, p.block_table, p.seq_lens, p.out, p.batch, p.q_len, p.heads, p.kv_lora,
                            p.rope, p.page_size, p.max_pages, p.softmax_scale, 1, p.kernel, nullptr, nullptr};
  if (p.kernel < 0 || p.kernel > 4) return Bad("MlaDecode", "kernel must be 0 (auto), 1 (mma.sync), 2-4 (wgmma)");
  if (fast && p.kernel >= 2 && !internal::MlaWgmmaAvailable()) {
    return absl::FailedPreconditionError("cuda::MlaDecode: the wgmma kernel needs an sm_90 (Hopper) device");
  }
  PoolScope scope(ctx.pool());
  if (fast) {
    int splits = p.num_splits;
    if (splits <= 0) {
      int dev = 0, sms = 132;
      cudaGetDevice(&dev);
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
      const int64_t ctas = p.batch * internal::MlaRowBlocks(p.q_len, p.heads);
      // Enough CTAs for one wave; each split keeps >= 4 tiles (256 tokens) of the longest cache.
      const int64_t max_tiles = (p.max_pages * p.page_size + 63) / 64;
      int64_t want = std::max<int64_t>(1, sms / std::max<int64_t>(ctas, 1));  // whole waves only
      want = std::min<int64_t>(want, std::max<int64_t>(1, max_tiles / 4));
      splits = static_cast<int>(std::min<int64_t>(want, 64));
    }
    a.num_splits = splits;
    if (splits > 1) {
      const int64_t rows = p.batch * p.q_len * p.heads;
      auto o = ctx.pool().AllocArray<float>(rows * splits * p.kv_lora);
      if (!o.ok()) return o.status();
      auto l = ctx.pool().AllocArray<float>(rows * splits);
      if (!l.ok()) return l.status();
      a.o_part = *o;
      a.lse_part = *l;
    }
  }
  // The pool memory is released at return, but the stream runs later: the
  // next allocation on the same stream is ordered after these kernels.
  return CudaStatus(internal::MlaDecode(a, S(ctx.stream())), "MlaDecode");
}

}  // namespace expertmesh::kernels::cuda
