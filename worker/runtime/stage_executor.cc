#include "worker/runtime/stage_executor.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "glog/logging.h"
#include "worker/generation.h"

namespace expertmesh::worker::runtime {

namespace {

// The engine's routed experts, for the placement stager; new experts are
// read from the checkpoint on the host (ModelShard::LoadExperts).
class EngineExperts : public ExpertStore {
 public:
  explicit EngineExperts(StageEngine* engine) : engine_(engine) {}
  absl::Status CanStage() const override { return engine_->CanReplaceExperts(); }
  std::vector<int32_t> LoadedExperts(int64_t layer) const override { return engine_->LoadedExperts(layer); }
  absl::StatusOr<ExpertSet> LoadExperts(const std::string& dir,
                                        const std::map<int64_t, std::vector<int32_t>>& need) override {
    RETURN_IF_ERROR(engine_->CanReplaceExperts());
    return ModelShard::LoadExperts(dir, need);
  }
  absl::Status ReplaceExperts(ExpertSet experts, const std::map<int64_t, std::set<int32_t>>& keep) override {
    return engine_->ReplaceExperts(std::move(experts), keep);
  }

 private:
  StageEngine* engine_;
};

}  // namespace

// ------------------------------------------------------------ caches

struct StageCache::Impl {
  StageSequence seq;
};

StageCache::StageCache() = default;
StageCache::~StageCache() = default;
StageCache::StageCache(StageCache&&) noexcept = default;
StageCache& StageCache::operator=(StageCache&&) noexcept = default;

int64_t StageCache::length() const { return impl_ == nullptr ? 0 : impl_->seq.length(); }

// ------------------------------------------------------------ the executor

struct StageExecutor::Impl {
  const topology::Plan* plan = nullptr;
  int stage = 0;
  StageStats* stats = nullptr;
  DataPlane* dp = nullptr;
  comm::Communicator* ep_comm = nullptr;  // the engine's exchange's, while attached
  std::unique_ptr<StageEngine> engine;
  std::unique_ptr<ExpertStore> experts;
  std::vector<float> logits;              // the last stage's last Step
  const float* dev_hidden_in = nullptr;   // RecvHidden's rows (engine memory)
  const float* dev_hidden_out = nullptr;  // the last Step's output on the device
  double embed_head_seen = 0;             // engine times already added to the stats
  ExchangeTimes moe_seen;

  const std::map<int64_t, topology::ExpertPlacement>* placements() const { return &plan->stages[stage].placement; }
  std::vector<StageEngine::Segment> Segments(const std::vector<StepSegment>& segs) const {
    std::vector<StageEngine::Segment> out;
    out.reserve(segs.size());
    for (const StepSegment& s : segs) out.push_back({s.cache->impl_->seq.id(), s.tokens, s.n});
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
  StageEngineOptions eo;
  eo.checkpoint = dir;
  eo.cuda = options.cuda;
  eo.cuda_options = options.cuda_options;
  eo.filter.layer_begin = sp.layer_begin;
  eo.filter.layer_end = sp.layer_end;
  eo.filter.embed = sp.has_embedding;
  eo.filter.head = sp.has_head;
  eo.filter.expert = [&sp, ep_rank](int64_t layer, int64_t e) {
    auto it = sp.placement.find(layer);
    if (it == sp.placement.end()) return false;
    const auto& slots = it->second.slots_of_rank(ep_rank);
    return std::find(slots.begin(), slots.end(), e) != slots.end();
  };
  ASSIGN_OR_RETURN(impl->engine, MakeStageEngine(eo));
  // Expert load: counted from the routes each MoE layer computes once.
  const int64_t num_experts = impl->engine->config().n_routed_experts;
  LoadCounter* load = &stats->load;
  impl->engine->SetRouteObserver([load, num_experts](int64_t layer, const int32_t* ids, int64_t n) {
    load->Add(layer, num_experts, std::vector<int32_t>(ids, ids + n));
  });
  impl->experts = std::make_unique<EngineExperts>(impl->engine.get());
  return std::unique_ptr<StageExecutor>(new StageExecutor(options, std::move(impl)));
}

const ModelConfig& StageExecutor::config() const { return impl_->engine->config(); }

std::string StageExecutor::Describe() const { return impl_->engine->Describe(); }

bool StageExecutor::wants_nccl_twins() const { return o_.nccl_data_plane && impl_->engine->caps().device_hidden; }

absl::Status StageExecutor::AttachDataPlane(DataPlane* dp) {
  Impl& m = *impl_;
  m.dp = dp;
  if (m.plan->ep <= 1) return absl::OkStatus();
  m.ep_comm = dp->stage_device() != nullptr ? dp->stage_device() : dp->stage();
  return m.engine->SetExpertParallel(m.ep_comm, m.placements(), o_.step_timeout);
}

void StageExecutor::DetachDataPlane() {
  Impl& m = *impl_;
  if (m.plan->ep > 1) {
    m.ep_comm = nullptr;
    absl::Status s = m.engine->SetExpertParallel(nullptr, m.placements(), o_.step_timeout);
    if (!s.ok()) LOG(WARNING) << "detaching the engine's exchange: " << s;
  }
  m.dp = nullptr;
}

void StageExecutor::PlacementSwitched() {
  Impl& m = *impl_;
  if (m.plan->ep <= 1) return;
  absl::Status s = m.engine->SetExpertParallel(m.ep_comm, m.placements(), o_.step_timeout);
  // The next MoE step reports it (the engine has no exchange then).
  if (!s.ok()) LOG(ERROR) << "the engine's exchange on the new placement: " << s;
}

ExpertStore* StageExecutor::expert_store() { return impl_->experts.get(); }

StageCache StageExecutor::NewCache() {
  StageCache c;
  c.impl_ = std::make_unique<StageCache::Impl>();
  c.impl_->seq = StageSequence(impl_->engine.get());
  return c;
}

bool StageExecutor::device_hidden() const { return impl_->dp != nullptr && impl_->dp->lane_device() != nullptr; }

absl::Status StageExecutor::Step(bool first, const std::vector<StepSegment>& segs, std::vector<float>* hidden) {
  Impl& m = *impl_;
  const bool dev = device_hidden();
  StageEngine::StepIo io;
  if (!first) {
    io.hidden_in = dev ? m.dev_hidden_in : hidden->data();
    io.hidden_on_device = dev;
  }
  std::vector<float> out;
  m.dev_hidden_out = nullptr;
  if (m.engine->has_head()) {
    io.logits = &m.logits;
  } else if (dev) {
    io.device_hidden_out = &m.dev_hidden_out;
  } else {
    io.hidden_out = &out;
  }
  absl::Status s = m.engine->Step(m.Segments(segs), io);
  m.dev_hidden_in = nullptr;
  AccountTimes();
  RETURN_IF_ERROR(s);
  if (io.hidden_out != nullptr) {
    *hidden = std::move(out);
  } else {
    hidden->clear();  // the logits wait for Sample, or the output stayed on the device
  }
  return absl::OkStatus();
}

void StageExecutor::AccountTimes() {
  Impl& m = *impl_;
  StageTimes& t = m.stats->times;
  const double embed_head = m.engine->times().embed_head;
  AddTime(&t.embed_head, embed_head - m.embed_head_seen);
  m.embed_head_seen = embed_head;
  const ExchangeTimes now = m.engine->moe_times();
  AddTime(&t.dispatch, now.dispatch - m.moe_seen.dispatch);
  AddTime(&t.combine, now.combine - m.moe_seen.combine);
  AddTime(&t.expert, std::max(0.0, now.expert - m.moe_seen.expert));
  m.moe_seen = now;
}

Return StageExecutor::Sample(const MicroBatch& mb) {
  Impl& m = *impl_;
  const absl::Time t0 = absl::Now();
  Return r;
  r.tick = mb.tick;
  for (size_t i = 0; i < mb.segments.size(); ++i) {  // every segment has n >= 1: one logits row each
    const SegmentMeta& sm = mb.segments[i];
    kernels::SamplingParams sp{sm.temperature, sm.top_k, sm.top_p, sm.seed};
    r.keys.push_back(sm.key);
    if (sm.sample == 0) {  // a prefill chunk before the prompt's last: nothing to sample
      r.tokens.push_back(0);
      continue;
    }
    const int64_t V = config().vocab_size;
    if (!AllFinite(m.logits.data() + static_cast<int64_t>(i) * V, V)) {  // sampling would give token 0
      LOG(WARNING) << "stage executor: the logits of sequence key " << sm.key << " at step " << sm.step
                   << " are not finite (NaN or inf); failing it";
      r.tokens.push_back(kNonFiniteLogitsToken);
      continue;
    }
    r.tokens.push_back(m.engine->Sample(m.logits, static_cast<int64_t>(i), sp, sm.step));
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
  b.Send(peer, m.dev_hidden_out, static_cast<size_t>(T * config().hidden_size) * sizeof(float));
  absl::Status s = m.dp->lane_device()->Run(b, absl::Now() + o_.step_timeout);
  AddTime(&m.stats->times.transfer, SecondsSince(t0));
  return s;
}

absl::Status StageExecutor::RecvHidden(int peer, int64_t T) {
  Impl& m = *impl_;
  const absl::Time t0 = absl::Now();
  ASSIGN_OR_RETURN(float* buf, m.engine->DeviceHiddenBuffer(T));
  comm::Batch b;
  b.memory = comm::MemoryKind::kDevice;
  b.Recv(peer, buf, static_cast<size_t>(T * config().hidden_size) * sizeof(float));
  RETURN_IF_ERROR(m.dp->lane_device()->Run(b, absl::Now() + o_.step_timeout));
  m.dev_hidden_in = buf;
  AddTime(&m.stats->times.transfer, SecondsSince(t0));
  return absl::OkStatus();
}

EngineTimes StageExecutor::compute_times() const { return impl_->engine->times(); }

}  // namespace expertmesh::worker::runtime
