#include "worker/runtime/stage_executor.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "glog/logging.h"
#include "worker/cuda_ep.h"
#include "worker/cuda_stage.h"
#include "worker/dispatch.h"

namespace expertmesh::worker::runtime {

namespace {

// ------------------------------------------------------------ MoE runners with load counting

class CountingLocalMoe : public MoeRunner {
 public:
  CountingLocalMoe(LoadCounter* counter, StageTimes* times) : counter_(counter), times_(times) {}
  absl::Status Run(const MoeWeights& w, int64_t layer, const float* x, int64_t T, float* y) override {
    const absl::Time t0 = absl::Now();
    absl::Status s = RunImpl(w, layer, x, T, y);
    AddTime(&times_->expert, SecondsSince(t0));
    return s;
  }

 private:
  absl::Status RunImpl(const MoeWeights& w, int64_t layer, const float* x, int64_t T, float* y) {
    std::fill(y, y + T * w.hidden, 0.0f);
    if (T == 0) return absl::OkStatus();
    std::vector<int32_t> ids;
    std::vector<float> weights;
    RouteTokens(w, x, T, &ids, &weights);
    counter_->Add(layer, w.router_params.num_experts, ids);
    RoutedExpertsAccumulate(w, x, T, ids.data(), weights.data(), w.router_params.top_k, y);
    SharedExpertAccumulate(w, x, T, y);
    return absl::OkStatus();
  }

  LoadCounter* counter_;
  StageTimes* times_;
};

class ExpertParallelRunner : public MoeRunner {
 public:
  ExpertParallelRunner(comm::Communicator* comm, const topology::StagePlan* stage, LoadCounter* counter,
                       StageTimes* times, absl::Duration timeout)
      : comm_(comm), stage_(stage), counter_(counter), times_(times), timeout_(timeout) {}
  // A new data plane (after a lost peer) or placement: the per-layer engines go with the old one.
  void Reset(comm::Communicator* comm) {
    comm_ = comm;
    engines_.clear();
  }
  comm::Communicator* comm() const { return comm_; }
  absl::Status Run(const MoeWeights& w, int64_t layer, const float* x, int64_t T, float* y) override {
    if (comm_ == nullptr) return absl::FailedPreconditionError("no data plane (being rebuilt)");
    auto it = engines_.find(layer);
    if (it == engines_.end()) {
      auto pl = stage_->placement.find(layer);
      if (pl == stage_->placement.end()) return absl::InternalError(absl::StrCat("no placement for layer ", layer));
      DispatchOptions o;
      o.hidden = w.hidden;
      o.top_k = w.router_params.top_k;
      o.timeout = timeout_;
      it = engines_.emplace(layer, std::make_unique<ExpertParallelMoe>(comm_, &pl->second, &w, o)).first;
    }
    const absl::Time t0 = absl::Now();
    if (T > 0) {  // load report: the router is cheap next to the experts (E*H vs 9*3*H*I per token)
      std::vector<int32_t> ids;
      std::vector<float> weights;
      RouteTokens(w, x, T, &ids, &weights);
      counter_->Add(layer, w.router_params.num_experts, ids);
    }
    absl::Status s = it->second->Forward(x, T, y);
    const double total = SecondsSince(t0);
    const DispatchTimes& dt = it->second->dispatcher().times();
    AddTime(&times_->dispatch, dt.dispatch_total());
    AddTime(&times_->combine, dt.combine_total());
    AddTime(&times_->expert, std::max(0.0, total - dt.dispatch_total() - dt.combine_total()));
    return s;
  }

 private:
  comm::Communicator* comm_;
  const topology::StagePlan* stage_;
  LoadCounter* counter_;
  StageTimes* times_;
  absl::Duration timeout_;
  std::map<int64_t, std::unique_ptr<ExpertParallelMoe>> engines_;
};

// ------------------------------------------------------------ expert stores

class ShardExperts : public ExpertStore {
 public:
  explicit ShardExperts(ModelShard* shard) : shard_(shard) {}
  absl::Status CanStage() const override { return absl::OkStatus(); }
  std::vector<int32_t> LoadedExperts(int64_t layer) const override { return shard_->LoadedExperts(layer); }
  absl::StatusOr<ExpertSet> LoadExperts(const std::string& dir,
                                        const std::map<int64_t, std::vector<int32_t>>& need) override {
    return ModelShard::LoadExperts(dir, need);
  }
  absl::Status ReplaceExperts(ExpertSet experts, const std::map<int64_t, std::set<int32_t>>& keep) override {
    return shard_->ReplaceExperts(std::move(experts), keep);
  }

 private:
  ModelShard* shard_;
};

class GpuExperts : public ExpertStore {
 public:
  absl::Status CanStage() const override {
    return absl::UnimplementedError(
        "expert rebalancing is not implemented for --device cuda workers (their experts live on the GPU)");
  }
  std::vector<int32_t> LoadedExperts(int64_t) const override { return {}; }
  absl::StatusOr<ExpertSet> LoadExperts(const std::string&, const std::map<int64_t, std::vector<int32_t>>&) override {
    return CanStage();
  }
  absl::Status ReplaceExperts(ExpertSet, const std::map<int64_t, std::set<int32_t>>&) override { return CanStage(); }
};

}  // namespace

// ------------------------------------------------------------ caches

struct StageCache::Impl {
  SequenceCache cpu;
  CudaSequence gpu;
  bool on_gpu = false;
};

StageCache::StageCache() = default;
StageCache::~StageCache() = default;
StageCache::StageCache(StageCache&&) noexcept = default;
StageCache& StageCache::operator=(StageCache&&) noexcept = default;

int64_t StageCache::length() const {
  if (impl_ == nullptr) return 0;
  return impl_->on_gpu ? impl_->gpu.length() : impl_->cpu.length;
}

// ------------------------------------------------------------ the executor

struct StageExecutor::Impl {
  const topology::Plan* plan = nullptr;
  int stage = 0;
  StageStats* stats = nullptr;
  ModelConfig cfg;
  DataPlane* dp = nullptr;
  std::vector<float> logits;
  // CPU engine.
  std::unique_ptr<ModelShard> shard;
  std::unique_ptr<MoeRunner> moe;
  ExpertParallelRunner* ep_runner = nullptr;  // moe when it is the EP runner
  std::unique_ptr<Engine> engine;
  std::unique_ptr<ExpertStore> experts;
  // CUDA engine, its EP exchange, and the device hidden states.
  std::unique_ptr<CudaEngine> gpu;
  std::unique_ptr<CudaEpExchange> gpu_ep;
  CudaDeviceBuffer gpu_hidden;      // hidden states received over the lane's NCCL twin
  const float* dev_hidden_out = nullptr;  // the last Step's output on the device
  CudaEpTimes gpu_ep_seen;          // exchange times already added to the stats

  std::vector<Segment> CpuSegments(const std::vector<StepSegment>& segs) const {
    std::vector<Segment> out;
    out.reserve(segs.size());
    for (const StepSegment& s : segs) out.push_back({&s.cache->impl_->cpu, s.tokens, s.n});
    return out;
  }
  std::vector<CudaEngine::Segment> GpuSegments(const std::vector<StepSegment>& segs) const {
    std::vector<CudaEngine::Segment> out;
    out.reserve(segs.size());
    for (const StepSegment& s : segs) out.push_back({s.cache->impl_->gpu.id(), s.tokens, s.n});
    return out;
  }
};

StageExecutor::StageExecutor(const StageExecutorOptions& o, std::unique_ptr<Impl> impl)
    : o_(o), impl_(std::move(impl)) {}
StageExecutor::~StageExecutor() = default;

absl::StatusOr<std::unique_ptr<StageExecutor>> StageExecutor::Load(const StageExecutorOptions& options,
                                                                   const std::string& dir,
                                                                   const topology::Plan* plan, int stage,
                                                                   int ep_rank, StageStats* stats) {
  auto impl = std::make_unique<Impl>();
  impl->plan = plan;
  impl->stage = stage;
  impl->stats = stats;
  const topology::StagePlan& sp = plan->stages[stage];
  ShardFilter f;
  f.layer_begin = sp.layer_begin;
  f.layer_end = sp.layer_end;
  f.embed = sp.has_embedding;
  f.head = sp.has_head;
  f.expert = [&sp, ep_rank](int64_t layer, int64_t e) {
    auto it = sp.placement.find(layer);
    if (it == sp.placement.end()) return false;
    const auto& slots = it->second.slots_of_rank(ep_rank);
    return std::find(slots.begin(), slots.end(), e) != slots.end();
  };
  if (options.cuda) {
    ASSIGN_OR_RETURN(impl->gpu, CudaEngine::Load(dir, f, options.cuda_options));
    impl->cfg = impl->gpu->config();
    impl->experts = std::make_unique<GpuExperts>();
  } else {
    ASSIGN_OR_RETURN(impl->shard, ModelShard::Load(dir, f));
    impl->cfg = impl->shard->config();
    if (plan->ep > 1) {
      auto runner = std::make_unique<ExpertParallelRunner>(nullptr, &sp, &stats->load, &stats->times,
                                                           options.step_timeout);
      impl->ep_runner = runner.get();
      impl->moe = std::move(runner);
    } else {
      impl->moe = std::make_unique<CountingLocalMoe>(&stats->load, &stats->times);
    }
    impl->engine = std::make_unique<Engine>(impl->shard.get(), impl->moe.get());
    impl->experts = std::make_unique<ShardExperts>(impl->shard.get());
  }
  return std::unique_ptr<StageExecutor>(new StageExecutor(options, std::move(impl)));
}

const ModelConfig& StageExecutor::config() const { return impl_->cfg; }

std::string StageExecutor::Describe() const { return impl_->gpu != nullptr ? impl_->gpu->Describe() : "cpu"; }

absl::Status StageExecutor::AttachDataPlane(DataPlane* dp) {
  Impl& m = *impl_;
  m.dp = dp;
  if (m.plan->ep <= 1) return absl::OkStatus();
  if (m.gpu != nullptr) {
    CudaEpOptions eo;
    eo.timeout = o_.step_timeout;
    comm::Communicator* c = o_.nccl_data_plane ? dp->stage_device() : dp->stage();
    ASSIGN_OR_RETURN(m.gpu_ep, CudaEpExchange::Create(m.gpu.get(), c, &m.plan->stages[m.stage].placement, eo));
    const int64_t num_experts = m.cfg.n_routed_experts;
    LoadCounter* load = &m.stats->load;
    m.gpu_ep->set_on_route([load, num_experts](int64_t layer, const int32_t* ids, int64_t n) {
      load->Add(layer, num_experts, std::vector<int32_t>(ids, ids + n));
    });
    m.gpu->SetExpertExchange(m.gpu_ep.get());
    m.gpu_ep_seen = m.gpu_ep->times();
  } else {
    m.ep_runner->Reset(dp->stage());
  }
  return absl::OkStatus();
}

void StageExecutor::DetachDataPlane() {
  Impl& m = *impl_;
  if (m.gpu != nullptr) m.gpu->SetExpertExchange(nullptr);
  m.gpu_ep.reset();
  if (m.ep_runner != nullptr) m.ep_runner->Reset(nullptr);
  m.dp = nullptr;
}

void StageExecutor::PlacementSwitched() {
  Impl& m = *impl_;
  if (m.ep_runner != nullptr) m.ep_runner->Reset(m.dp != nullptr ? m.dp->stage() : nullptr);
}

ExpertStore* StageExecutor::expert_store() { return impl_->experts.get(); }

StageCache StageExecutor::NewCache() {
  StageCache c;
  c.impl_ = std::make_unique<StageCache::Impl>();
  if (impl_->gpu != nullptr) {
    c.impl_->gpu = CudaSequence(impl_->gpu.get());
    c.impl_->on_gpu = true;
  } else {
    c.impl_->cpu = impl_->engine->NewCache();
  }
  return c;
}

bool StageExecutor::device_hidden() const { return impl_->dp != nullptr && impl_->dp->lane_device() != nullptr; }

absl::Status StageExecutor::Step(bool first, const std::vector<StepSegment>& segs, std::vector<float>* hidden) {
  Impl& m = *impl_;
  if (m.gpu == nullptr) {
    const std::vector<Segment> cs = m.CpuSegments(segs);
    if (first) {
      const absl::Time t0 = absl::Now();
      m.engine->Embed(cs, hidden);
      AddTime(&m.stats->times.embed_head, SecondsSince(t0));
    }
    return m.engine->RunLayers(cs, hidden);
  }
  const bool dev = device_hidden();
  CudaEngine::StageIo io;
  if (!first) {
    io.hidden_in = dev ? static_cast<const float*>(m.gpu_hidden.data()) : hidden->data();
    io.hidden_on_device = dev;
  }
  std::vector<float> out;
  m.dev_hidden_out = nullptr;
  if (m.gpu->has_head()) {
    io.logits = &m.logits;
  } else if (dev) {
    io.device_hidden_out = &m.dev_hidden_out;
  } else {
    io.hidden_out = &out;
  }
  absl::Status s = m.gpu->Step(m.GpuSegments(segs), io);
  if (m.gpu_ep != nullptr) {  // exchange phases into the heartbeat's breakdown
    const CudaEpTimes& now = m.gpu_ep->times();
    StageTimes& t = m.stats->times;
    AddTime(&t.dispatch, now.layout + now.dispatch_comm - m.gpu_ep_seen.layout - m.gpu_ep_seen.dispatch_comm);
    AddTime(&t.combine, now.combine_comm + now.combine - m.gpu_ep_seen.combine_comm - m.gpu_ep_seen.combine);
    AddTime(&t.expert, now.expert - m.gpu_ep_seen.expert);
    m.gpu_ep_seen = now;
  }
  RETURN_IF_ERROR(s);
  if (io.hidden_out != nullptr) {
    *hidden = std::move(out);
  } else if (io.device_hidden_out != nullptr) {
    hidden->clear();
  }
  return absl::OkStatus();
}

Return StageExecutor::Sample(const MicroBatch& mb, const std::vector<StepSegment>& segs,
                             const std::vector<float>& hidden) {
  Impl& m = *impl_;
  const absl::Time t0 = absl::Now();
  Return r;
  r.tick = mb.tick;
  if (m.gpu == nullptr) m.engine->Head(m.CpuSegments(segs), hidden, &m.logits);  // the GPU step filled logits
  const int64_t V = m.cfg.vocab_size;
  for (size_t i = 0; i < mb.segments.size(); ++i) {  // every segment has n >= 1: one logits row each
    const SegmentMeta& sm = mb.segments[i];
    kernels::SamplingParams sp{sm.temperature, sm.top_k, sm.top_p, sm.seed};
    r.keys.push_back(sm.key);
    r.tokens.push_back(kernels::Sample(m.logits.data() + i * V, V, sp, sm.step));
  }
  AddTime(&m.stats->times.embed_head, SecondsSince(t0));
  return r;
}

absl::Status StageExecutor::SendHidden(int peer, int64_t T) {
  Impl& m = *impl_;
  if (m.dev_hidden_out == nullptr) return absl::InternalError("no hidden states on the device to send");
  const absl::Time t0 = absl::Now();
  comm::Batch b;
  b.memory = comm::MemoryKind::kDevice;
  b.Send(peer, m.dev_hidden_out, static_cast<size_t>(T * m.cfg.hidden_size) * sizeof(float));
  absl::Status s = m.dp->lane_device()->Run(b, absl::Now() + o_.step_timeout);
  AddTime(&m.stats->times.transfer, SecondsSince(t0));
  return s;
}

absl::Status StageExecutor::RecvHidden(int peer, int64_t T) {
  Impl& m = *impl_;
  const absl::Time t0 = absl::Now();
  const size_t bytes = static_cast<size_t>(T * m.cfg.hidden_size) * sizeof(float);
  RETURN_IF_ERROR(m.gpu_hidden.Reserve(std::max<size_t>(bytes, 1)));
  comm::Batch b;
  b.memory = comm::MemoryKind::kDevice;
  b.Recv(peer, m.gpu_hidden.data(), bytes);
  RETURN_IF_ERROR(m.dp->lane_device()->Run(b, absl::Now() + o_.step_timeout));
  AddTime(&m.stats->times.transfer, SecondsSince(t0));
  return absl::OkStatus();
}

EngineTimes StageExecutor::compute_times() const {
  return impl_->engine != nullptr ? impl_->engine->times() : EngineTimes{};
}

}  // namespace expertmesh::worker::runtime
