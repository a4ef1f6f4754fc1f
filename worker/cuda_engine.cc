#include "worker/cuda_engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <list>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/dtype.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "glog/logging.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/engine_ops.h"
#include "kernels/cuda/kernels.h"

namespace expertmesh::worker {

namespace cu = kernels::cuda;
using cu::Act;
using cu::WType;

namespace {

absl::Status Cuda(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  const std::string msg =
      absl::StrCat("CUDA engine: ", what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) return absl::FailedPreconditionError(msg);
  return absl::InternalError(msg);
}


// A weight tensor as read from the checkpoint: fp32 values, or the raw fp8
// codes with their 128x128 block scales.
struct HostTensor {
  std::vector<float> f32;
  std::vector<uint8_t> fp8;
  std::vector<float> scale;  // [ceil(rows/128), ceil(cols/128)]
  std::vector<int64_t> shape;
  bool is_fp8() const { return !fp8.empty(); }
};

// y = x . W^T with W [N, K] on the device.
struct DevLinear {
  int64_t N = 0, K = 0;
  WType type = WType::kBf16;
  void* w = nullptr;
  float* scale_inv = nullptr;  // fp8: [ceil(N/128), ceil(K/128)]
  float* row_scale = nullptr;  // fp8: cuda::ExpandFp8Scales rows [K/128][N] (cuBLASLt)
};

// The routed experts of one MoE layer on this device, by local slot.
struct DevExperts {
  int64_t slots = 0;
  WType type = WType::kBf16;
  std::vector<DevLinear> gate_up, down;
  // Device arrays of per-slot pointers (GroupedSwiGluFfn).
  const void** d_gate_up = nullptr;
  const void** d_down = nullptr;
  const float** d_gate_up_scale = nullptr;
  const float** d_down_scale = nullptr;
  cu::GroupedExpertWeights lt;  // host pointer lists for cuda::GroupedExperts
};

struct DevLayer {
  int64_t index = 0;
  bool is_moe = false;
  float* input_norm = nullptr;
  float* post_norm = nullptr;
  DevLinear q_a, q_b, q, kv_a, kv_b, o;
  float* q_a_norm = nullptr;
  float* kv_a_norm = nullptr;
  DevLinear dense_gu, dense_down;
  DevLinear router;
  float* bias = nullptr;
  DevExperts experts;
  DevLinear shared_gu, shared_down;
  kernels::RouterParams router_params;
};

struct Sequence {
  std::vector<int32_t> pages;
  int64_t length = 0;
};

struct GraphEntry {
  cudaGraphExec_t exec = nullptr;
  const float* logits = nullptr;
  uint64_t last_use = 0;
};

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

struct CudaEngine::Impl {
  ModelConfig cfg;
  CudaEngineOptions opts;
  int64_t layer_begin = 0, layer_end = 0;
  bool embed = false, head = false;
  bool bf = true;  // bf16 activations
  Act act = Act::kBf16;
  std::string device_name;
  size_t weight_bytes = 0;
  int64_t fp8_tensors = 0;

  cudaStream_t stream = nullptr;
  std::unique_ptr<cu::Context> ctx;
  std::vector<void*> allocations;

  // Weights.
  void* embed_table = nullptr;  // [V, H] fp32 or bf16
  float* final_norm = nullptr;
  DevLinear lm_head;
  std::vector<DevLayer> layers;
  double* inv_freq = nullptr;
  kernels::MlaShape mla{};

  // Latent caches: per layer [pages * page_size, L + R].
  std::vector<void*> cache;
  int64_t num_pages = 0;
  std::vector<int32_t> free_pages;
  std::map<SeqId, Sequence> seqs;
  SeqId next_seq = 1;

  // Step inputs: one int32 buffer on the device and its pinned host twin.
  int32_t* d_in = nullptr;
  int32_t* h_in = nullptr;
  int64_t in_cap = 0;
  float* h_out = nullptr;  // pinned logits / hidden
  int64_t out_cap = 0;
  int64_t* h_offsets = nullptr;  // pinned expert offsets (prefill path)
  int32_t* h_offsets32 = nullptr;
  int64_t offsets_cap = 0;

  std::map<std::pair<int64_t, int64_t>, GraphEntry> graphs;
  uint64_t graph_clock = 0;
  bool graphs_broken = false;
  bool capturing = false;

  ExpertExchange* exchange = nullptr;
  RouteObserver on_route;
  Stats stats;

  ~Impl();
  absl::StatusOr<void*> DevAlloc(size_t bytes);
  template <typename T>
  absl::StatusOr<T*> Upload(const T* data, size_t n) {
    ASSIGN_OR_RETURN(void* p, DevAlloc(n * sizeof(T)));
    // On the engine's (non-blocking) stream, so later kernels on it are ordered after the copy.
    RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(p, data, n * sizeof(T), cudaMemcpyHostToDevice, stream), "upload"));
    RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "upload"));
    weight_bytes += n * sizeof(T);
    return static_cast<T*>(p);
  }
  absl::StatusOr<void*> UploadAct(const std::vector<float>& v);  // as fp32 or bf16 per precision
  absl::StatusOr<DevLinear> MakeLinear(const HostTensor& t, bool allow_fp8);
  absl::StatusOr<DevLinear> MakeFused(const HostTensor& gate, const HostTensor& up, bool allow_fp8);

  using Getter = std::function<absl::StatusOr<HostTensor>(const TensorSpec&)>;
  absl::Status Build(const ShardFilter& filter, const Getter& get);
  absl::Status Init();

  // Scratch.
  absl::StatusOr<void*> Scratch(size_t bytes) { return ctx->pool().Alloc(bytes); }
  absl::StatusOr<void*> ScratchAct(int64_t n) { return Scratch(static_cast<size_t>(n) * cu::ActBytes(act)); }

  // GEMM helpers on activations.
  absl::Status Lin(const void* x, int64_t M, const DevLinear& w, void* y);      // y act
  absl::Status LinF32(const void* x, int64_t M, const DevLinear& w, float* y);  // y fp32 (=)
  absl::Status LinAcc(const void* x, int64_t M, const DevLinear& w, float* y);  // y fp32 (+=)
  absl::Status SiluMul(const void* gu, int64_t T, int64_t I, void* out);
  absl::Status Ffn(const void* x, int64_t T, const DevLinear& gu, const DevLinear& down, float* y);

  struct StepPlan {
    int64_t T = 0, S = 0, MP = 0;
    bool decode = false;                   // every segment n == 1
    std::vector<int64_t> seg_rows, seg_n;  // per segment (n > 0 only)
    int64_t S_out = 0;                     // segments with n > 0
    // Offsets (int32 elements) into the step input buffer.
    int64_t o_tokens = 0, o_pos = 0, o_slots = 0, o_last = 0, o_lens = 0, o_table = 0, total = 0;
  };
  absl::Status Attention(const DevLayer& L, size_t slot, const StepPlan& p, const void* x, float* resid);
  absl::Status Moe(const DevLayer& L, const void* x, int64_t T, float* resid);
  absl::Status RoutedLocal(const DevLayer& L, const void* x, int64_t T, const int32_t* ids, const float* weights,
                           int64_t k, float* y);
  // Runs the layers (and embed/head) of one step on the device; *out is the
  // logits (head) or the residual stream.
  absl::Status DeviceStep(const StepPlan& p, const float* hidden_in, bool hidden_on_device, const float** out);
  absl::Status Step(const std::vector<Segment>& segs, const StageIo& io);
  absl::Status EnsureInputCapacity(int64_t n);
  absl::Status EnsureOutputCapacity(int64_t n);
  void ClearGraphs();
};

CudaEngine::Impl::~Impl() {
  if (stream != nullptr) cudaStreamSynchronize(stream);
  ClearGraphs();
  ctx.reset();
  for (void* p : allocations) cudaFree(p);
  if (d_in != nullptr) cudaFree(d_in);
  if (h_in != nullptr) cudaFreeHost(h_in);
  if (h_out != nullptr) cudaFreeHost(h_out);
  if (h_offsets != nullptr) cudaFreeHost(h_offsets);
  if (h_offsets32 != nullptr) cudaFreeHost(h_offsets32);
  if (stream != nullptr) cudaStreamDestroy(stream);
}

void CudaEngine::Impl::ClearGraphs() {
  for (auto& [k, g] : graphs) cudaGraphExecDestroy(g.exec);
  graphs.clear();
}

absl::StatusOr<void*> CudaEngine::Impl::DevAlloc(size_t bytes) {
  void* p = nullptr;
  if (bytes == 0) bytes = 1;
  absl::Status s = Cuda(cudaMalloc(&p, bytes), absl::StrCat("cudaMalloc of ", bytes, " bytes"));
  if (!s.ok()) return s;
  allocations.push_back(p);
  return p;
}

absl::StatusOr<void*> CudaEngine::Impl::UploadAct(const std::vector<float>& v) {
  if (!bf) return Upload(v.data(), v.size());
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = FloatToBf16(v[i]);
  return Upload(b.data(), b.size());
}

absl::StatusOr<DevLinear> CudaEngine::Impl::MakeLinear(const HostTensor& t, bool allow_fp8) {
  DevLinear d;
  d.N = t.shape[0];
  d.K = t.shape[1];
  if (bf && allow_fp8 && t.is_fp8() && d.K % 128 == 0 && d.N % 16 == 0) {
    d.type = WType::kFp8;
    ASSIGN_OR_RETURN(void* q, Upload(t.fp8.data(), t.fp8.size()));
    d.w = q;
    ASSIGN_OR_RETURN(d.scale_inv, Upload(t.scale.data(), t.scale.size()));
    ASSIGN_OR_RETURN(void* rs, DevAlloc(static_cast<size_t>(d.N * (d.K / 128)) * sizeof(float)));
    d.row_scale = static_cast<float*>(rs);
    weight_bytes += static_cast<size_t>(d.N * (d.K / 128)) * sizeof(float);
    RETURN_IF_ERROR(cu::ExpandFp8Scales(d.scale_inv, d.N, d.K, d.row_scale, stream));
    RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "expand fp8 scales"));
    ++fp8_tensors;
    return d;
  }
  std::vector<float> f = t.f32;
  if (t.is_fp8()) {  // dequantise exactly as LoadF32 does
    f.resize(t.fp8.size());
    const int64_t sc = CeilDiv(d.K, 128);
    for (int64_t r = 0; r < d.N; ++r) {
      for (int64_t c = 0; c < d.K; ++c) {
        f[r * d.K + c] = F8E4M3ToFloat(t.fp8[r * d.K + c]) * t.scale[(r / 128) * sc + c / 128];
      }
    }
  }
  d.type = bf ? WType::kBf16 : WType::kF32;
  ASSIGN_OR_RETURN(d.w, UploadAct(f));
  return d;
}

absl::StatusOr<DevLinear> CudaEngine::Impl::MakeFused(const HostTensor& gate, const HostTensor& up, bool allow_fp8) {
  HostTensor f;
  f.shape = {gate.shape[0] + up.shape[0], gate.shape[1]};
  const bool fp8_ok = gate.is_fp8() && up.is_fp8() && gate.shape[0] % 128 == 0;  // scale rows concatenate
  if (fp8_ok && allow_fp8) {
    f.fp8 = gate.fp8;
    f.fp8.insert(f.fp8.end(), up.fp8.begin(), up.fp8.end());
    f.scale = gate.scale;
    f.scale.insert(f.scale.end(), up.scale.begin(), up.scale.end());
    return MakeLinear(f, true);
  }
  auto to_f32 = [](const HostTensor& t) {
    if (!t.is_fp8()) return t.f32;
    std::vector<float> v(t.fp8.size());
    const int64_t K = t.shape[1], sc = CeilDiv(K, 128);
    for (int64_t r = 0; r < t.shape[0]; ++r) {
      for (int64_t c = 0; c < K; ++c)
        v[r * K + c] = F8E4M3ToFloat(t.fp8[r * K + c]) * t.scale[(r / 128) * sc + c / 128];
    }
    return v;
  };
  f.f32 = to_f32(gate);
  const std::vector<float> u = to_f32(up);
  f.f32.insert(f.f32.end(), u.begin(), u.end());
  return MakeLinear(f, false);
}

absl::Status CudaEngine::Impl::Init() {
  RETURN_IF_ERROR(Cuda(cudaSetDevice(opts.device), absl::StrCat("cudaSetDevice(", opts.device, ")")));
  RETURN_IF_ERROR(Cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate"));
  cudaDeviceProp prop;
  RETURN_IF_ERROR(Cuda(cudaGetDeviceProperties(&prop, opts.device), "cudaGetDeviceProperties"));
  device_name = prop.name;
  return absl::OkStatus();
}

absl::Status CudaEngine::Impl::Build(const ShardFilter& filter, const Getter& get_spec) {
  const ModelConfig& c = cfg;
  bf = opts.precision == CudaPrecision::kBf16;
  act = bf ? Act::kBf16 : Act::kF32;
  if (c.quantization_config.present &&
      (c.quantization_config.weight_block_rows != 128 || c.quantization_config.weight_block_cols != 128)) {
    return absl::UnimplementedError("CUDA engine: fp8 checkpoints need 128x128 weight blocks");
  }
  for (int64_t v : {c.hidden_size, c.intermediate_size, c.moe_intermediate_size}) {
    if (v % 8 != 0) {
      return absl::UnimplementedError(absl::StrCat(
          "CUDA engine: hidden_size, intermediate_size and moe_intermediate_size must be multiples of 8 (got ", v,
          ")"));
    }
  }
  std::map<std::string, TensorSpec> spec;
  for (auto& s : CheckpointSpec(c, filter)) spec.emplace(s.name, s);
  auto get = [&](const std::string& name) -> absl::StatusOr<HostTensor> {
    auto it = spec.find(name);
    if (it == spec.end()) return absl::InternalError(absl::StrCat("no tensor spec for ", name));
    ASSIGN_OR_RETURN(HostTensor t, get_spec(it->second));
    t.shape = it->second.shape;
    return t;
  };
  auto norm = [&](const std::string& name) -> absl::StatusOr<float*> {
    ASSIGN_OR_RETURN(HostTensor t, get(name));
    return Upload(t.f32.data(), t.f32.size());
  };
  layer_begin = std::max<int64_t>(0, filter.layer_begin);
  layer_end = filter.layer_end < 0 ? c.num_hidden_layers : std::min(filter.layer_end, c.num_hidden_layers);
  embed = filter.embed;
  head = filter.head;
  if (embed) {
    ASSIGN_OR_RETURN(HostTensor t, get("model.embed_tokens.weight"));
    ASSIGN_OR_RETURN(embed_table, UploadAct(t.f32));
  }
  if (head) {
    ASSIGN_OR_RETURN(final_norm, norm("model.norm.weight"));
    ASSIGN_OR_RETURN(HostTensor t, get("lm_head.weight"));
    ASSIGN_OR_RETURN(lm_head, MakeLinear(t, false));
  }
  const bool experts_fp8 = c.hidden_size % 128 == 0 && c.moe_intermediate_size % 128 == 0;
  for (int64_t l = layer_begin; l < layer_end; ++l) {
    DevLayer d;
    d.index = l;
    d.is_moe = c.IsMoeLayer(l);
    const std::string p = absl::StrCat("model.layers.", l, ".");
    ASSIGN_OR_RETURN(d.input_norm, norm(p + "input_layernorm.weight"));
    ASSIGN_OR_RETURN(d.post_norm, norm(p + "post_attention_layernorm.weight"));
    const std::string a = p + "self_attn.";
    HostTensor t;
    if (c.q_lora_rank > 0) {
      ASSIGN_OR_RETURN(t, get(a + "q_a_proj.weight"));
      ASSIGN_OR_RETURN(d.q_a, MakeLinear(t, true));
      ASSIGN_OR_RETURN(d.q_a_norm, norm(a + "q_a_layernorm.weight"));
      ASSIGN_OR_RETURN(t, get(a + "q_b_proj.weight"));
      ASSIGN_OR_RETURN(d.q_b, MakeLinear(t, true));
    } else {
      ASSIGN_OR_RETURN(t, get(a + "q_proj.weight"));
      ASSIGN_OR_RETURN(d.q, MakeLinear(t, true));
    }
    ASSIGN_OR_RETURN(t, get(a + "kv_a_proj_with_mqa.weight"));
    ASSIGN_OR_RETURN(d.kv_a, MakeLinear(t, true));
    ASSIGN_OR_RETURN(d.kv_a_norm, norm(a + "kv_a_layernorm.weight"));
    ASSIGN_OR_RETURN(t, get(a + "kv_b_proj.weight"));
    ASSIGN_OR_RETURN(d.kv_b, MakeLinear(t, false));  // the MLA projections take bf16 / fp32
    ASSIGN_OR_RETURN(t, get(a + "o_proj.weight"));
    ASSIGN_OR_RETURN(d.o, MakeLinear(t, true));
    const std::string m = p + "mlp.";
    if (!d.is_moe) {
      ASSIGN_OR_RETURN(HostTensor g, get(m + "gate_proj.weight"));
      ASSIGN_OR_RETURN(HostTensor u, get(m + "up_proj.weight"));
      ASSIGN_OR_RETURN(d.dense_gu, MakeFused(g, u, true));
      ASSIGN_OR_RETURN(t, get(m + "down_proj.weight"));
      ASSIGN_OR_RETURN(d.dense_down, MakeLinear(t, true));
    } else {
      d.router_params = kernels::RouterParams::FromConfig(c);
      ASSIGN_OR_RETURN(t, get(m + "gate.weight"));
      ASSIGN_OR_RETURN(d.router, MakeLinear(t, false));
      ASSIGN_OR_RETURN(t, get(m + "gate.e_score_correction_bias"));
      ASSIGN_OR_RETURN(d.bias, Upload(t.f32.data(), t.f32.size()));
      DevExperts& ex = d.experts;
      ex.slots = c.n_routed_experts;
      ex.gate_up.resize(ex.slots);
      ex.down.resize(ex.slots);
      for (int64_t e = 0; e < c.n_routed_experts; ++e) {
        if (filter.expert && !filter.expert(l, e)) continue;
        const std::string ep = absl::StrCat(m, "experts.", e, ".");
        ASSIGN_OR_RETURN(HostTensor g, get(ep + "gate_proj.weight"));
        ASSIGN_OR_RETURN(HostTensor u, get(ep + "up_proj.weight"));
        ASSIGN_OR_RETURN(ex.gate_up[e], MakeFused(g, u, experts_fp8));
        ASSIGN_OR_RETURN(t, get(ep + "down_proj.weight"));
        ASSIGN_OR_RETURN(ex.down[e], MakeLinear(t, experts_fp8));
      }
      // One weight type for all slots of the layer (they come from one checkpoint).
      ex.type = bf ? WType::kBf16 : WType::kF32;
      for (int64_t e = 0; e < ex.slots; ++e) {
        if (ex.down[e].w != nullptr) {
          ex.type = ex.down[e].type;
          break;
        }
      }
      std::vector<const void*> gu(ex.slots, nullptr), dn(ex.slots, nullptr);
      std::vector<const float*> gus(ex.slots, nullptr), dns(ex.slots, nullptr);
      ex.lt.num_experts = ex.slots;
      ex.lt.hidden = c.hidden_size;
      ex.lt.inter = c.moe_intermediate_size;
      ex.lt.fp8 = ex.type == WType::kFp8;
      for (int64_t e = 0; e < ex.slots; ++e) {
        if (ex.down[e].w == nullptr) {
          ex.lt.gate_up.push_back(nullptr);
          ex.lt.down.push_back(nullptr);
          ex.lt.gate_up_scale.push_back(nullptr);
          ex.lt.down_scale.push_back(nullptr);
          continue;
        }
        if (ex.gate_up[e].type != ex.type || ex.down[e].type != ex.type) {
          return absl::InvalidArgumentError(absl::StrCat("layer ", l, ": experts stored in different dtypes"));
        }
        gu[e] = ex.gate_up[e].w;
        dn[e] = ex.down[e].w;
        gus[e] = ex.gate_up[e].scale_inv;
        dns[e] = ex.down[e].scale_inv;
        ex.lt.gate_up.push_back(ex.gate_up[e].w);
        ex.lt.down.push_back(ex.down[e].w);
        ex.lt.gate_up_scale.push_back(ex.gate_up[e].row_scale);
        ex.lt.down_scale.push_back(ex.down[e].row_scale);
      }
      ASSIGN_OR_RETURN(ex.d_gate_up, Upload(gu.data(), gu.size()));
      ASSIGN_OR_RETURN(ex.d_down, Upload(dn.data(), dn.size()));
      ASSIGN_OR_RETURN(ex.d_gate_up_scale, Upload(gus.data(), gus.size()));
      ASSIGN_OR_RETURN(ex.d_down_scale, Upload(dns.data(), dns.size()));
      if (c.n_shared_experts > 0) {
        ASSIGN_OR_RETURN(HostTensor g, get(m + "shared_experts.gate_proj.weight"));
        ASSIGN_OR_RETURN(HostTensor u, get(m + "shared_experts.up_proj.weight"));
        ASSIGN_OR_RETURN(d.shared_gu, MakeFused(g, u, true));
        ASSIGN_OR_RETURN(t, get(m + "shared_experts.down_proj.weight"));
        ASSIGN_OR_RETURN(d.shared_down, MakeLinear(t, true));
      }
    }
    layers.push_back(std::move(d));
  }
  // Rotary frequencies (the CPU's YaRN table) and the MLA shape.
  const kernels::Rope rope(c);
  ASSIGN_OR_RETURN(inv_freq, Upload(rope.inv_freq().data(), rope.inv_freq().size()));
  mla = kernels::MlaShape::FromConfig(c);

  // Latent caches.
  const int64_t D = c.kv_lora_rank + c.qk_rope_head_dim;
  num_pages = CeilDiv(std::max<int64_t>(opts.cache_tokens, opts.page_size), opts.page_size);
  for (size_t i = 0; i < layers.size(); ++i) {
    ASSIGN_OR_RETURN(void* p, DevAlloc(static_cast<size_t>(num_pages * opts.page_size * D) * cu::ActBytes(act)));
    cache.push_back(p);
  }
  free_pages.reserve(num_pages);
  for (int64_t i = num_pages - 1; i >= 0; --i) free_pages.push_back(static_cast<int32_t>(i));

  // Scratch arena: sized from the widest per-token intermediates of one step.
  const int64_t H = c.hidden_size, k = c.num_experts_per_tok, I = c.moe_intermediate_size;
  const int64_t nh = c.num_attention_heads, L = c.kv_lora_rank, R = c.qk_rope_head_dim;
  const int64_t per_token_act = 2 * H + std::max<int64_t>(c.q_lora_rank, 0) + nh * c.qk_head_dim() + (L + R) +
                                nh * (L + R) + nh * L + nh * c.v_head_dim + 3 * c.intermediate_size +
                                k * (2 * H + 3 * I) +
                                3 * c.moe_intermediate_size * std::max<int64_t>(1, c.n_shared_experts);
  const int64_t per_token_f32 = 2 * H + c.n_routed_experts + 2 * k + 8;
  size_t per_token = static_cast<size_t>(per_token_act * cu::ActBytes(act) + per_token_f32 * 4 + k * 16);
  // Plus the logits of up to max_step_sequences segments and room for the kernels' own scratch.
  size_t pool = per_token * static_cast<size_t>(opts.max_step_tokens) +
                static_cast<size_t>(opts.max_step_sequences * c.vocab_size) * sizeof(float) + (size_t{256} << 20);
  cu::ContextOptions co;
  co.device = opts.device;
  co.stream = stream;
  co.pool_bytes = pool;
  ASSIGN_OR_RETURN(ctx, cu::Context::Create(co));
  // Step inputs sized for the largest step up front (growing them drops the captured graphs).
  RETURN_IF_ERROR(EnsureInputCapacity(3 * opts.max_step_tokens + 2 * opts.max_step_sequences + 4096));
  return Cuda(cudaStreamSynchronize(stream), "loading weights");
}

// ---------------------------------------------------------------- GEMM helpers

namespace {
// y[M, N] (+)= x[M, K] . W[N, K]^T for an fp32 weight, all rows contiguous.
cu::GemmF32Args DenseF32(const void* x, int64_t M, const DevLinear& w, float* y, bool accumulate) {
  cu::GemmF32Args g;
  g.x = static_cast<const float*>(x);
  g.ldx = w.K;
  g.w = static_cast<const float*>(w.w);
  g.ldw = w.K;
  g.y = y;
  g.ldy = w.N;
  g.M = M;
  g.N = w.N;
  g.K = w.K;
  g.accumulate = accumulate;
  return g;
}
}  // namespace

absl::Status CudaEngine::Impl::Lin(const void* x, int64_t M, const DevLinear& w, void* y) {
  if (M == 0) return absl::OkStatus();
  switch (w.type) {
    case WType::kF32:
      return cu::GemmF32(DenseF32(x, M, w, static_cast<float*>(y), /*accumulate=*/false), stream);
    case WType::kBf16:
      return cu::Linear(*ctx, static_cast<const cu::Bf16*>(x), M, w.K, static_cast<const cu::Bf16*>(w.w), w.N, y,
                        cu::OutType::kBf16);
    case WType::kFp8:
      return cu::LinearFp8(*ctx, static_cast<const cu::Bf16*>(x), M, w.K, static_cast<const cu::Fp8*>(w.w), w.row_scale,
                           w.N, static_cast<cu::Bf16*>(y));
  }
  return absl::InternalError("unknown weight type");
}

absl::Status CudaEngine::Impl::LinF32(const void* x, int64_t M, const DevLinear& w, float* y) {
  if (M == 0) return absl::OkStatus();
  if (w.type == WType::kF32) return Lin(x, M, w, y);
  if (w.type == WType::kBf16) {
    return cu::Linear(*ctx, static_cast<const cu::Bf16*>(x), M, w.K, static_cast<const cu::Bf16*>(w.w), w.N, y,
                      cu::OutType::kF32);
  }
  return absl::InternalError("fp32 output from an fp8 weight");
}

absl::Status CudaEngine::Impl::LinAcc(const void* x, int64_t M, const DevLinear& w, float* y) {
  if (M == 0) return absl::OkStatus();
  switch (w.type) {
    case WType::kF32:
      return cu::GemmF32(DenseF32(x, M, w, y, /*accumulate=*/true), stream);
    case WType::kBf16:
      return cu::Linear(*ctx, static_cast<const cu::Bf16*>(x), M, w.K, static_cast<const cu::Bf16*>(w.w), w.N, y,
                        cu::OutType::kF32, /*accumulate=*/true);
    case WType::kFp8: {
      cu::PoolScope scope(ctx->pool());
      ASSIGN_OR_RETURN(void* tmp, ScratchAct(M * w.N));
      RETURN_IF_ERROR(Lin(x, M, w, tmp));
      return cu::AddInto(tmp, Act::kBf16, M * w.N, y, stream);
    }
  }
  return absl::InternalError("unknown weight type");
}

absl::Status CudaEngine::Impl::SiluMul(const void* gu, int64_t T, int64_t I, void* out) {
  if (bf) return cu::SiluMulRows(static_cast<const cu::Bf16*>(gu), T, I, static_cast<cu::Bf16*>(out), stream);
  return cu::SiluMulRowsF32(static_cast<const float*>(gu), T, I, static_cast<float*>(out), stream);
}

absl::Status CudaEngine::Impl::Ffn(const void* x, int64_t T, const DevLinear& gu, const DevLinear& down, float* y) {
  if (T == 0) return absl::OkStatus();
  const int64_t I = gu.N / 2;
  cu::PoolScope scope(ctx->pool());
  ASSIGN_OR_RETURN(void* g, ScratchAct(T * 2 * I));
  ASSIGN_OR_RETURN(void* a, ScratchAct(T * I));
  RETURN_IF_ERROR(Lin(x, T, gu, g));
  RETURN_IF_ERROR(SiluMul(g, T, I, a));
  return LinAcc(a, T, down, y);
}

// ---------------------------------------------------------------- layers

absl::Status CudaEngine::Impl::Attention(const DevLayer& Ly, size_t slot, const StepPlan& p, const void* x,
                                         float* resid) {
  const ModelConfig& c = cfg;
  const int64_t T = p.T, nh = c.num_attention_heads, qd = c.qk_head_dim(), dn = c.qk_nope_head_dim, dv = c.v_head_dim,
                L = c.kv_lora_rank, R = c.qk_rope_head_dim;
  cu::PoolScope scope(ctx->pool());
  ASSIGN_OR_RETURN(void* q, ScratchAct(T * nh * qd));
  if (c.q_lora_rank > 0) {
    ASSIGN_OR_RETURN(void* qa, ScratchAct(T * c.q_lora_rank));
    RETURN_IF_ERROR(Lin(x, T, Ly.q_a, qa));
    cu::RowNormArgs n;
    n.x = qa;
    n.x_type = act;
    n.x_stride = c.q_lora_rank;
    n.n = T;
    n.H = c.q_lora_rank;
    n.w = Ly.q_a_norm;
    n.eps = static_cast<float>(c.rms_norm_eps);
    n.y = qa;
    n.y_type = act;
    n.y_stride = c.q_lora_rank;
    RETURN_IF_ERROR(cu::RowRmsNorm(n, stream));
    RETURN_IF_ERROR(Lin(qa, T, Ly.q_b, q));
  } else {
    RETURN_IF_ERROR(Lin(x, T, Ly.q, q));
  }
  ASSIGN_OR_RETURN(void* kv, ScratchAct(T * (L + R)));
  RETURN_IF_ERROR(Lin(x, T, Ly.kv_a, kv));
  const int32_t* pos = d_in + p.o_pos;
  cu::KvAppendArgs ka;
  ka.kv = kv;
  ka.type = act;
  ka.T = T;
  ka.L = L;
  ka.R = R;
  ka.norm_w = Ly.kv_a_norm;
  ka.eps = static_cast<float>(c.rms_norm_eps);
  ka.positions = pos;
  ka.slots = d_in + p.o_slots;
  ka.inv_freq = inv_freq;
  ka.cache = cache[slot];
  RETURN_IF_ERROR(cu::KvAppend(ka, stream));
  // Rotary on the queries' rope parts, then the absorbed query.
  ASSIGN_OR_RETURN(void* q_abs, ScratchAct(T * nh * (L + R)));
  if (bf) {
    RETURN_IF_ERROR(cu::RopeApply(static_cast<cu::Bf16*>(q) + dn, T, nh, nh * qd, qd, R, pos, inv_freq, stream));
    RETURN_IF_ERROR(cu::MlaAbsorbQuery(*ctx, mla, static_cast<const cu::Bf16*>(q), T,
                                       static_cast<const cu::Bf16*>(Ly.kv_b.w), static_cast<cu::Bf16*>(q_abs)));
  } else {
    RETURN_IF_ERROR(cu::RopeApplyF32(static_cast<float*>(q) + dn, T, nh, nh * qd, qd, R, pos, inv_freq, stream));
    cu::GemmF32Args g;  // q_abs[t, h, :L] = q_nope[t, h] . W_uk[h]  (W_uk [dn, L])
    g.x = static_cast<const float*>(q);
    g.ldx = nh * qd;
    g.sx = qd;
    g.w = static_cast<const float*>(Ly.kv_b.w);
    g.ldw = L;
    g.sw = (dn + dv) * L;
    g.w_kn = true;
    g.y = static_cast<float*>(q_abs);
    g.ldy = nh * (L + R);
    g.sy = L + R;
    g.M = T;
    g.N = L;
    g.K = dn;
    g.batch = nh;
    RETURN_IF_ERROR(cu::GemmF32(g, stream));
    RETURN_IF_ERROR(
        cu::CopyRopePartF32(static_cast<const float*>(q), T * nh, dn, R, L, static_cast<float*>(q_abs), stream));
  }
  // Latent attention: decode steps in one call, else one call per segment.
  ASSIGN_OR_RETURN(void* o_lat, ScratchAct(T * nh * L));
  auto attend = [&](int64_t row, int64_t seg, int64_t batch, int64_t q_len) -> absl::Status {
    const int64_t qoff = row * nh * (L + R), ooff = row * nh * L;
    if (bf) {
      cu::MlaDecodeParams m;
      m.q = static_cast<const cu::Bf16*>(q_abs) + qoff;
      m.kv_cache = static_cast<const cu::Bf16*>(cache[slot]);
      m.block_table = d_in + p.o_table + seg * p.MP;
      m.seq_lens = d_in + p.o_lens + seg;
      m.out = static_cast<cu::Bf16*>(o_lat) + ooff;
      m.batch = batch;
      m.q_len = q_len;
      m.heads = nh;
      m.kv_lora = L;
      m.rope = R;
      m.page_size = opts.page_size;
      m.max_pages = p.MP;
      m.softmax_scale = mla.softmax_scale;
      return cu::MlaDecode(*ctx, m);
    }
    cu::MlaDecodeF32Params m;
    m.q = static_cast<const float*>(q_abs) + qoff;
    m.kv_cache = static_cast<const float*>(cache[slot]);
    m.block_table = d_in + p.o_table + seg * p.MP;
    m.seq_lens = d_in + p.o_lens + seg;
    m.out = static_cast<float*>(o_lat) + ooff;
    m.batch = batch;
    m.q_len = q_len;
    m.heads = nh;
    m.kv_lora = L;
    m.rope = R;
    m.page_size = opts.page_size;
    m.max_pages = p.MP;
    m.softmax_scale = mla.softmax_scale;
    return cu::MlaDecodeF32(m, stream);
  };
  if (p.decode) {
    RETURN_IF_ERROR(attend(0, 0, p.S, 1));
  } else {
    for (size_t s = 0; s < p.seg_n.size(); ++s) {
      if (p.seg_n[s] > 0) RETURN_IF_ERROR(attend(p.seg_rows[s], static_cast<int64_t>(s), 1, p.seg_n[s]));
    }
  }
  ASSIGN_OR_RETURN(void* ao, ScratchAct(T * nh * dv));
  if (bf) {
    RETURN_IF_ERROR(cu::MlaProjectOut(*ctx, mla, static_cast<const cu::Bf16*>(o_lat), T,
                                      static_cast<const cu::Bf16*>(Ly.kv_b.w), static_cast<cu::Bf16*>(ao)));
  } else {
    cu::GemmF32Args g;  // out[t, h] = o_lat[t, h] . W_uv[h]^T  (W_uv [dv, L])
    g.x = static_cast<const float*>(o_lat);
    g.ldx = nh * L;
    g.sx = L;
    g.w = static_cast<const float*>(Ly.kv_b.w) + dn * L;
    g.ldw = L;
    g.sw = (dn + dv) * L;
    g.y = static_cast<float*>(ao);
    g.ldy = nh * dv;
    g.sy = dv;
    g.M = T;
    g.N = dv;
    g.K = L;
    g.batch = nh;
    RETURN_IF_ERROR(cu::GemmF32(g, stream));
  }
  return LinAcc(ao, T, Ly.o, resid);
}

absl::Status CudaEngine::Impl::RoutedLocal(const DevLayer& Ly, const void* x, int64_t T, const int32_t* ids,
                                           const float* weights, int64_t k, float* y) {
  if (T == 0) return absl::OkStatus();
  const DevExperts& ex = Ly.experts;
  const int64_t H = cfg.hidden_size, I = cfg.moe_intermediate_size, E = ex.slots, rows = T * k;
  cu::PoolScope scope(ctx->pool());
  ASSIGN_OR_RETURN(void* off, Scratch((E + 1) * sizeof(int32_t)));
  ASSIGN_OR_RETURN(void* pos, Scratch(rows * sizeof(int32_t)));
  int32_t* offsets = static_cast<int32_t*>(off);
  int32_t* p = static_cast<int32_t*>(pos);
  RETURN_IF_ERROR(cu::ExpertLayout(*ctx, ids, T, k, E, offsets, p));
  ASSIGN_OR_RETURN(void* xp, ScratchAct(rows * H));
  ASSIGN_OR_RETURN(void* op, ScratchAct(rows * H));
  if (bf) {
    RETURN_IF_ERROR(cu::Permute(static_cast<const cu::Bf16*>(x), T, H, p, k, static_cast<cu::Bf16*>(xp), stream));
  } else {
    RETURN_IF_ERROR(cu::PermuteF32(static_cast<const float*>(x), T, H, p, k, static_cast<float*>(xp), stream));
  }
  const bool device_offsets = !bf || capturing || rows <= opts.decode_expert_rows;
  if (device_offsets) {
    ASSIGN_OR_RETURN(void* ab, ScratchAct(rows * I));
    cu::GroupedFfnArgs g;
    g.num_experts = E;
    g.H = H;
    g.I = I;
    g.w_type = ex.type;
    g.gate_up = ex.d_gate_up;
    g.down = ex.d_down;
    g.gate_up_scale = ex.d_gate_up_scale;
    g.down_scale = ex.d_down_scale;
    g.offsets = offsets;
    g.max_rows = rows;
    g.act = act;
    g.x_perm = xp;
    g.act_buf = ab;
    g.out_perm = op;
    RETURN_IF_ERROR(cu::GroupedSwiGluFfn(g, stream));
  } else {
    // Prefill-sized: the offsets come back to the host for one cuBLASLt GEMM pair per expert.
    if (offsets_cap < E + 1) {
      if (h_offsets != nullptr) cudaFreeHost(h_offsets);
      if (h_offsets32 != nullptr) cudaFreeHost(h_offsets32);
      RETURN_IF_ERROR(Cuda(cudaMallocHost(&h_offsets, (E + 1) * sizeof(int64_t)), "cudaMallocHost"));
      RETURN_IF_ERROR(Cuda(cudaMallocHost(&h_offsets32, (E + 1) * sizeof(int32_t)), "cudaMallocHost"));
      offsets_cap = E + 1;
    }
    RETURN_IF_ERROR(
        Cuda(cudaMemcpyAsync(h_offsets32, offsets, (E + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
             "expert offsets to host"));
    RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "expert offsets to host"));
    for (int64_t e = 0; e <= E; ++e) h_offsets[e] = h_offsets32[e];
    RETURN_IF_ERROR(cu::GroupedExperts(*ctx, ex.lt, static_cast<const cu::Bf16*>(xp), h_offsets,
                                       static_cast<cu::Bf16*>(op), offsets));
  }
  return cu::CombineAddF32(op, act, p, weights, T, k, H, y, stream);
}

absl::Status CudaEngine::Impl::Moe(const DevLayer& Ly, const void* x, int64_t T, float* resid) {
  const int64_t E = cfg.n_routed_experts, k = Ly.router_params.top_k;
  cu::PoolScope scope(ctx->pool());
  ASSIGN_OR_RETURN(void* lg, Scratch(std::max<int64_t>(T, 1) * E * sizeof(float)));
  ASSIGN_OR_RETURN(void* id, Scratch(std::max<int64_t>(T, 1) * k * sizeof(int32_t)));
  ASSIGN_OR_RETURN(void* wt, Scratch(std::max<int64_t>(T, 1) * k * sizeof(float)));
  int32_t* ids = static_cast<int32_t*>(id);
  float* weights = static_cast<float*>(wt);
  if (T > 0) {
    RETURN_IF_ERROR(LinF32(x, T, Ly.router, static_cast<float*>(lg)));
    RETURN_IF_ERROR(cu::Route(static_cast<const float*>(lg), Ly.bias, T, Ly.router_params, ids, weights, stream));
  }
  if (exchange != nullptr) {
    RETURN_IF_ERROR(exchange->RunLayer(Ly.index, T, x, ids, weights, resid, on_route ? &on_route : nullptr));
  } else {
    RETURN_IF_ERROR(RoutedLocal(Ly, x, T, ids, weights, k, resid));
  }
  if (cfg.n_shared_experts > 0) RETURN_IF_ERROR(Ffn(x, T, Ly.shared_gu, Ly.shared_down, resid));
  return absl::OkStatus();
}

absl::Status CudaEngine::Impl::DeviceStep(const StepPlan& p, const float* hidden_in, bool hidden_on_device,
                                          const float** out) {
  const ModelConfig& c = cfg;
  const int64_t H = c.hidden_size, T = p.T;
  const float eps = static_cast<float>(c.rms_norm_eps);
  // The residual stream is allocated first and outlives the per-layer scratch.
  ASSIGN_OR_RETURN(void* rp, Scratch(std::max<int64_t>(T, 1) * H * sizeof(float)));
  float* resid = static_cast<float*>(rp);
  if (embed) {
    RETURN_IF_ERROR(cu::EmbedRowsF32(embed_table, act, H, d_in + p.o_tokens, T, resid, stream));
  } else if (T > 0) {
    RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(resid, hidden_in, T * H * sizeof(float),
                                         hidden_on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice, stream),
                         "hidden states to the device"));
  }
  ASSIGN_OR_RETURN(void* xn, ScratchAct(std::max<int64_t>(T, 1) * H));
  cu::RowNormArgs n;
  n.x = resid;
  n.x_type = Act::kF32;
  n.x_stride = H;
  n.n = T;
  n.H = H;
  n.eps = eps;
  n.y = xn;
  n.y_type = act;
  n.y_stride = H;
  for (size_t li = 0; li < layers.size(); ++li) {
    const DevLayer& Ly = layers[li];
    n.w = Ly.input_norm;
    RETURN_IF_ERROR(cu::RowRmsNorm(n, stream));
    if (T > 0) RETURN_IF_ERROR(Attention(Ly, li, p, xn, resid));
    n.w = Ly.post_norm;
    RETURN_IF_ERROR(cu::RowRmsNorm(n, stream));
    if (Ly.is_moe) {
      RETURN_IF_ERROR(Moe(Ly, xn, T, resid));
    } else {
      RETURN_IF_ERROR(Ffn(xn, T, Ly.dense_gu, Ly.dense_down, resid));
    }
  }
  if (!head) {
    *out = resid;
    return absl::OkStatus();
  }
  // Final norm of each segment's last token, then the head (fp32 logits).
  cu::RowNormArgs h = n;
  h.rows = d_in + p.o_last;
  h.n = p.S_out;
  h.w = final_norm;
  RETURN_IF_ERROR(cu::RowRmsNorm(h, stream));
  ASSIGN_OR_RETURN(void* lg, Scratch(std::max<int64_t>(p.S_out, 1) * c.vocab_size * sizeof(float)));
  RETURN_IF_ERROR(LinF32(xn, p.S_out, lm_head, static_cast<float*>(lg)));
  *out = static_cast<const float*>(lg);
  return absl::OkStatus();
}

absl::Status CudaEngine::Impl::EnsureInputCapacity(int64_t n) {
  if (n <= in_cap) return absl::OkStatus();
  RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "step inputs"));
  ClearGraphs();  // graphs read the old buffer
  const int64_t cap = std::max<int64_t>(n, 2 * in_cap);
  if (d_in != nullptr) cudaFree(d_in);
  if (h_in != nullptr) cudaFreeHost(h_in);
  d_in = nullptr;
  h_in = nullptr;
  in_cap = 0;
  RETURN_IF_ERROR(Cuda(cudaMalloc(&d_in, cap * sizeof(int32_t)), "step input buffer"));
  RETURN_IF_ERROR(Cuda(cudaMallocHost(&h_in, cap * sizeof(int32_t)), "pinned step input buffer"));
  in_cap = cap;
  return absl::OkStatus();
}

absl::Status CudaEngine::Impl::EnsureOutputCapacity(int64_t n) {
  if (n <= out_cap) return absl::OkStatus();
  if (h_out != nullptr) cudaFreeHost(h_out);
  h_out = nullptr;
  const int64_t cap = std::max<int64_t>(n, 2 * out_cap);
  RETURN_IF_ERROR(Cuda(cudaMallocHost(&h_out, cap * sizeof(float)), "pinned output buffer"));
  out_cap = cap;
  return absl::OkStatus();
}

absl::Status CudaEngine::Impl::Step(const std::vector<Segment>& segs, const StageIo& io) {
  const ModelConfig& c = cfg;
  StepPlan p;
  p.S = static_cast<int64_t>(segs.size());
  p.decode = p.S > 0;
  int64_t max_len = 0;
  for (const Segment& s : segs) {
    auto it = seqs.find(s.seq);
    if (it == seqs.end()) return absl::InvalidArgumentError(absl::StrCat("CUDA engine: unknown sequence ", s.seq));
    if (s.n < 0) return absl::InvalidArgumentError("CUDA engine: negative segment length");
    if (embed && s.n > 0 && s.tokens == nullptr)
      return absl::InvalidArgumentError("CUDA engine: segment without tokens");
    for (int64_t i = 0; embed && i < s.n; ++i) {
      if (s.tokens[i] < 0 || s.tokens[i] >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("CUDA engine: token id ", s.tokens[i], " out of range [0, ", c.vocab_size, ")"));
      }
    }
    if (it->second.length + s.n > c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("CUDA engine: sequence ", s.seq, " would pass the context of ",
                                                     c.max_position_embeddings, " tokens"));
    }
    p.seg_rows.push_back(p.T);
    p.seg_n.push_back(s.n);
    p.T += s.n;
    if (s.n > 0) ++p.S_out;
    if (s.n != 1) p.decode = false;
    max_len = std::max(max_len, it->second.length + s.n);
  }
  if (head && io.logits == nullptr)
    return absl::InvalidArgumentError("CUDA engine: a shard with the head needs logits");
  if (!embed && p.T > 0 && io.hidden_in == nullptr) {
    return absl::InvalidArgumentError("CUDA engine: a shard without the embedding needs hidden_in");
  }
  if (p.S_out > opts.max_step_sequences) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CUDA engine: a step of ", p.S_out, " sequences exceeds max_step_sequences = ", opts.max_step_sequences));
  }
  if (p.T > opts.max_step_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA engine: a step of ", p.T, " tokens exceeds max_step_tokens = ",
                                                   opts.max_step_tokens, " (raise --cuda-max-step-tokens)"));
  }
  // Pages for the new tokens.
  for (const Segment& s : segs) {
    Sequence& q = seqs[s.seq];
    const int64_t need = CeilDiv(q.length + s.n, opts.page_size);
    while (static_cast<int64_t>(q.pages.size()) < need) {
      if (free_pages.empty()) {
        return absl::ResourceExhaustedError(
            absl::StrCat("CUDA engine: the latent cache is full (", num_pages * opts.page_size,
                         " tokens over all sequences); raise --cuda-cache-tokens or run fewer sequences at once"));
      }
      q.pages.push_back(free_pages.back());
      free_pages.pop_back();
    }
  }
  const bool graphable = opts.cuda_graphs && !graphs_broken && p.decode && embed && head && io.logits != nullptr &&
                         exchange == nullptr && p.T * c.num_experts_per_tok <= opts.decode_expert_rows;
  p.MP = std::max<int64_t>(1, CeilDiv(max_len, opts.page_size));
  if (graphable) {  // a few table widths only, so that graphs are reused as caches grow
    int64_t b = 1;
    while (b < p.MP) b *= 2;
    p.MP = b;
  }
  p.o_tokens = 0;
  p.o_pos = p.T;
  p.o_slots = 2 * p.T;
  p.o_last = 3 * p.T;
  p.o_lens = p.o_last + p.S;
  p.o_table = p.o_lens + p.S;
  p.total = p.o_table + p.S * p.MP;
  RETURN_IF_ERROR(EnsureInputCapacity(std::max<int64_t>(p.total, 1)));
  // Fill the inputs (the previous step's copy has completed: steps end synchronised).
  int64_t row = 0, out_i = 0;
  for (size_t si = 0; si < segs.size(); ++si) {
    const Segment& s = segs[si];
    const Sequence& q = seqs[s.seq];
    for (int64_t i = 0; i < s.n; ++i, ++row) {
      const int64_t pos = q.length + i;
      h_in[p.o_tokens + row] = embed ? s.tokens[i] : 0;
      h_in[p.o_pos + row] = static_cast<int32_t>(pos);
      h_in[p.o_slots + row] =
          static_cast<int32_t>(q.pages[pos / opts.page_size] * opts.page_size + pos % opts.page_size);
    }
    if (s.n > 0) h_in[p.o_last + out_i++] = static_cast<int32_t>(row - 1);
    h_in[p.o_lens + si] = static_cast<int32_t>(q.length + s.n);
    int32_t* tab = h_in + p.o_table + si * p.MP;
    for (int64_t j = 0; j < p.MP; ++j) tab[j] = j < static_cast<int64_t>(q.pages.size()) ? q.pages[j] : 0;
  }
  RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(d_in, h_in, p.total * sizeof(int32_t), cudaMemcpyHostToDevice, stream),
                       "step inputs to the device"));
  const float* out = nullptr;
  const size_t mark = ctx->pool().Mark();
  absl::Status st;
  bool ran = false;
  if (graphable) {
    const auto key = std::make_pair(p.S, p.MP);
    auto it = graphs.find(key);
    if (it == graphs.end()) {
      if (static_cast<int64_t>(graphs.size()) >= opts.max_graphs) {  // drop the least recently used
        auto lru = graphs.begin();
        for (auto g = graphs.begin(); g != graphs.end(); ++g) {
          if (g->second.last_use < lru->second.last_use) lru = g;
        }
        cudaGraphExecDestroy(lru->second.exec);
        graphs.erase(lru);
      }
      GraphEntry e;
      cudaGraph_t graph = nullptr;
      st = Cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
      if (st.ok()) {
        capturing = true;
        st = DeviceStep(p, nullptr, false, &e.logits);
        capturing = false;
        const cudaError_t end = cudaStreamEndCapture(stream, &graph);
        if (st.ok()) st = Cuda(end, "cudaStreamEndCapture");
        if (st.ok()) st = Cuda(cudaGraphInstantiate(&e.exec, graph, 0), "cudaGraphInstantiate");
        if (graph != nullptr) cudaGraphDestroy(graph);
      }
      ctx->pool().Release(mark);
      if (!st.ok()) {
        LOG(WARNING) << "CUDA engine: decode-step capture failed, running eagerly from now on: " << st.message();
        cudaGetLastError();
        graphs_broken = true;
      } else {
        ++stats.graph_captures;
        it = graphs.emplace(key, e).first;
      }
    }
    if (it != graphs.end()) {
      it->second.last_use = ++graph_clock;
      RETURN_IF_ERROR(Cuda(cudaGraphLaunch(it->second.exec, stream), "cudaGraphLaunch"));
      out = it->second.logits;
      ++stats.graph_replays;
      ran = true;
    }
  }
  if (!ran) {
    st = DeviceStep(p, io.hidden_in, io.hidden_on_device, &out);
    ctx->pool().Release(mark);  // stream order keeps `out` valid until the copies below
    if (!st.ok()) {
      cudaStreamSynchronize(stream);
      return st;
    }
    ++stats.eager_steps;
  }
  ++stats.steps;
  // Outputs.
  if (head) {
    const int64_t n = p.S_out * c.vocab_size;
    RETURN_IF_ERROR(EnsureOutputCapacity(std::max<int64_t>(n, 1)));
    RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(h_out, out, n * sizeof(float), cudaMemcpyDeviceToHost, stream), "logits"));
    RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "step"));
    io.logits->assign(h_out, h_out + n);
  } else {
    const int64_t n = p.T * c.hidden_size;
    if (io.device_hidden_out != nullptr) {
      *io.device_hidden_out = out;
      RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "step"));
    }
    if (io.hidden_out != nullptr) {
      RETURN_IF_ERROR(EnsureOutputCapacity(std::max<int64_t>(n, 1)));
      RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(h_out, out, n * sizeof(float), cudaMemcpyDeviceToHost, stream), "hidden"));
      RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "step"));
      io.hidden_out->assign(h_out, h_out + n);
    } else {
      RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "step"));
    }
  }
  for (const Segment& s : segs) seqs[s.seq].length += s.n;
  return absl::OkStatus();
}

// ---------------------------------------------------------------- CudaEngine

CudaEngine::CudaEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaEngine::~CudaEngine() = default;

namespace {

absl::Status CheckDevice(const CudaEngineOptions& o) {
  std::string why;
  if (!CudaEngineAvailable(&why)) return absl::FailedPreconditionError(why);
  if (o.page_size <= 0 || o.cache_tokens <= 0 || o.max_step_tokens <= 0) {
    return absl::InvalidArgumentError("CUDA engine: page_size, cache_tokens and max_step_tokens must be positive");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Load(const std::string& dir, const ShardFilter& filter,
                                                             const CudaEngineOptions& options) {
  ASSIGN_OR_RETURN(ModelConfig cfg, ModelConfig::FromFile(dir + "/config.json"));
  RETURN_IF_ERROR(CheckCudaArchitecture(cfg));
  RETURN_IF_ERROR(CheckDevice(options));
  ASSIGN_OR_RETURN(auto ckpt, ShardedCheckpoint::Open(dir));
  RETURN_IF_ERROR(ValidateCheckpoint(*ckpt, CheckpointSpec(cfg, filter), cfg));
  auto impl = std::make_unique<Impl>();
  impl->cfg = cfg;
  impl->opts = options;
  RETURN_IF_ERROR(impl->Init());
  const ShardedCheckpoint* ck = ckpt.get();
  const bool bf16 = options.precision == CudaPrecision::kBf16;
  RETURN_IF_ERROR(impl->Build(filter, [ck, &cfg, bf16](const TensorSpec& s) -> absl::StatusOr<HostTensor> {
    HostTensor t;
    const TensorView* v = ck->Find(s.name);
    if (bf16 && v != nullptr && v->dtype == DType::kF8E4M3) {
      const TensorView* sc = ck->Find(ScaleName(s.name));
      if (sc == nullptr || sc->dtype != DType::kF32) {
        return absl::InvalidArgumentError(absl::StrCat(ScaleName(s.name), ": missing or not F32"));
      }
      t.fp8.assign(v->data, v->data + v->nbytes);
      const float* f = reinterpret_cast<const float*>(sc->data);
      t.scale.assign(f, f + sc->numel());
      return t;
    }
    ASSIGN_OR_RETURN(t.f32, LoadF32(*ck, s, cfg));
    return t;
  }));
  return std::unique_ptr<CudaEngine>(new CudaEngine(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Random(const ModelConfig& cfg, const ShardFilter& filter,
                                                               uint64_t seed, const CudaEngineOptions& options) {
  RETURN_IF_ERROR(CheckCudaArchitecture(cfg));
  RETURN_IF_ERROR(CheckDevice(options));
  RETURN_IF_ERROR(cfg.Validate());
  auto impl = std::make_unique<Impl>();
  impl->cfg = cfg;
  impl->opts = options;
  RETURN_IF_ERROR(impl->Init());
  RETURN_IF_ERROR(impl->Build(filter, [seed](const TensorSpec& s) -> absl::StatusOr<HostTensor> {
    HostTensor t;
    t.f32 = RandomTensor(s, seed);
    return t;
  }));
  return std::unique_ptr<CudaEngine>(new CudaEngine(std::move(impl)));
}

const ModelConfig& CudaEngine::config() const { return impl_->cfg; }
const CudaEngineOptions& CudaEngine::options() const { return impl_->opts; }
bool CudaEngine::has_embed() const { return impl_->embed; }
bool CudaEngine::has_head() const { return impl_->head; }
void* CudaEngine::stream() const { return impl_->stream; }
bool CudaEngine::bf16() const { return impl_->bf; }
const CudaEngine::Stats& CudaEngine::stats() const { return impl_->stats; }
void CudaEngine::SetExpertExchange(ExpertExchange* ex) { impl_->exchange = ex; }
void CudaEngine::SetRouteObserver(RouteObserver observer) { impl_->on_route = std::move(observer); }

std::string CudaEngine::Describe() const {
  const Impl& m = *impl_;
  return absl::StrFormat("%s, %s activations%s, %.1f MiB of weights, latent cache %d tokens, CUDA graphs %s",
                         m.device_name, CudaPrecisionName(m.opts.precision),
                         m.fp8_tensors > 0 ? absl::StrCat(", ", m.fp8_tensors, " fp8 weights") : "",
                         m.weight_bytes / 1048576.0, m.num_pages * m.opts.page_size, m.opts.cuda_graphs ? "on" : "off");
}

CudaEngine::SeqId CudaEngine::NewSequence() {
  const SeqId id = impl_->next_seq++;
  impl_->seqs[id] = Sequence{};
  return id;
}

void CudaEngine::ReleaseSequence(SeqId seq) {
  auto it = impl_->seqs.find(seq);
  if (it == impl_->seqs.end()) return;
  // Pages return to the free list; a later step reuses them in stream order.
  for (int32_t p : it->second.pages) impl_->free_pages.push_back(p);
  impl_->seqs.erase(it);
}

int64_t CudaEngine::SequenceLength(SeqId seq) const {
  auto it = impl_->seqs.find(seq);
  return it == impl_->seqs.end() ? -1 : it->second.length;
}

absl::Status CudaEngine::Forward(const std::vector<Segment>& segs, std::vector<float>* logits) {
  if (!impl_->embed || !impl_->head || impl_->layer_begin != 0 || impl_->layer_end != impl_->cfg.num_hidden_layers) {
    return absl::FailedPreconditionError("Forward needs a shard holding the whole model");
  }
  for (const auto& s : segs) {
    if (s.n <= 0) return absl::InvalidArgumentError("Forward: every segment needs at least one token");
  }
  StageIo io;
  io.logits = logits;
  return impl_->Step(segs, io);
}

absl::Status CudaEngine::Step(const std::vector<Segment>& segs, const StageIo& io) { return impl_->Step(segs, io); }

absl::Status CudaEngine::RunLocalExperts(int64_t layer, const void* x, int64_t rows, const int32_t* ids,
                                         const float* weights, int64_t k, float* out_f32) {
  Impl& m = *impl_;
  const DevLayer* ly = nullptr;
  for (const DevLayer& l : m.layers) {
    if (l.index == layer) ly = &l;
  }
  if (ly == nullptr || !ly->is_moe) return absl::InvalidArgumentError(absl::StrCat("no MoE layer ", layer, " here"));
  if (rows == 0) return absl::OkStatus();
  RETURN_IF_ERROR(Cuda(cudaMemsetAsync(out_f32, 0, rows * m.cfg.hidden_size * sizeof(float), m.stream), "memset"));
  return m.RoutedLocal(*ly, x, rows, ids, weights, k, out_f32);
}

// ---------------------------------------------------------------- generation

namespace {

// Forward in consecutive groups of segments that fit one step (max_step_tokens,
// max_step_sequences); sequences are independent, so the logits are those of
// one big step.
absl::Status ForwardInSteps(CudaEngine* engine, const std::vector<CudaEngine::Segment>& segs,
                            std::vector<float>* logits) {
  const CudaEngineOptions& o = engine->options();
  logits->clear();
  std::vector<CudaEngine::Segment> group;
  std::vector<float> part;
  int64_t tokens = 0;
  for (size_t i = 0; i <= segs.size(); ++i) {
    const bool fits = i < segs.size() && tokens + segs[i].n <= o.max_step_tokens &&
                      static_cast<int64_t>(group.size()) < o.max_step_sequences;
    if (!group.empty() && !fits) {
      RETURN_IF_ERROR(engine->Forward(group, &part));
      logits->insert(logits->end(), part.begin(), part.end());
      group.clear();
      tokens = 0;
    }
    if (i == segs.size()) break;
    group.push_back(segs[i]);  // a segment longer than a step is refused by Forward with the reason
    tokens += segs[i].n;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<GenerationResult>> GenerateBatchCuda(CudaEngine* engine,
                                                                const std::vector<GenerationRequest>& reqs,
                                                                GenerationStats* stats) {
  const size_t n = reqs.size();
  std::vector<GenerationResult> results(n);
  std::vector<CudaEngine::SeqId> seq(n);
  for (auto& s : seq) s = engine->NewSequence();
  struct Release {
    CudaEngine* e;
    std::vector<CudaEngine::SeqId>* s;
    ~Release() {
      for (auto id : *s) e->ReleaseSequence(id);
    }
  } release{engine, &seq};
  std::vector<CudaEngine::Segment> segs;
  return RunGeneration(
      reqs,
      [&](const std::vector<StepItem>& items, std::vector<float>* logits) {
        segs.clear();
        for (const StepItem& it : items) segs.push_back({seq[it.request], it.tokens, it.n});
        return ForwardInSteps(engine, segs, logits);
      },
      stats);
}

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

bool CudaEngineAvailable(std::string* why) {
  std::string w;
  if (!cu::DeviceAvailable(&w)) {
    absl::string_view r = absl::StripPrefix(w, "no usable CUDA device: ");
    if (r == "no CUDA device present") r = "none present";
    if (why != nullptr) *why = absl::StrCat("no CUDA device: ", r);
    return false;
  }
  return true;
}

}  // namespace expertmesh::worker
