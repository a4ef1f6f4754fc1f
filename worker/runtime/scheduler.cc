#include "worker/runtime/scheduler.h"

#include <unistd.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "worker/model.h"

namespace expertmesh::worker::runtime {

Scheduler::Scheduler(const Options& options, CoordinatorClient* client, const DataPlane* data_plane,
                     std::atomic<bool>* shutdown, const ModelConfig* cfg, std::function<StageCache()> new_cache)
    : o_(options), client_(client), dp_(data_plane), shutdown_(shutdown), cfg_(cfg),
      new_cache_(std::move(new_cache)) {}

void Scheduler::SetEpoch(const std::string& epoch, int64_t committed_placement) {
  epoch_ = epoch;
  committed_placement_ = committed_placement;
}

void Scheduler::DropAll() {
  seqs_.clear();  // the coordinator put them back in its queue
  release_.clear();
  updates_.clear();
}

void Scheduler::Finish(uint64_t key, v1::FinishReason reason) {
  auto it = seqs_.find(key);
  if (it == seqs_.end()) return;
  if (!it->second.dropped) {
    v1::SequenceUpdate u;
    u.set_seq_id(it->second.seq_id);
    u.set_finish_reason(reason);
    updates_.push_back(std::move(u));
  }
  if (it->second.in_flight) {  // released when its token comes back
    it->second.dropped = true;
    return;
  }
  release_.push_back(key);
  seqs_.erase(it);
}

void Scheduler::ApplyToken(uint64_t key, int32_t token) {
  auto it = seqs_.find(key);
  if (it == seqs_.end()) return;
  Seq& s = it->second;
  s.in_flight = false;
  s.fed += s.chunk;
  s.chunk = 0;
  if (s.dropped) {
    release_.push_back(key);
    seqs_.erase(it);
    return;
  }
  if (token == kNonFiniteLogitsToken) {  // the last stage found the logits row not finite
    v1::SequenceUpdate u;
    u.set_seq_id(s.seq_id);
    u.set_finish_reason(v1::FINISH_REASON_ERROR);
    u.set_error(absl::StrCat("step ", s.generated.size(),
                             ": the model's logits are not finite (NaN or inf): the checkpoint's weights or "
                             "weight_scale_inv hold NaN/inf values"));
    updates_.push_back(std::move(u));
    release_.push_back(key);
    seqs_.erase(it);
    return;
  }
  if (!s.prefilled()) return;  // a prefill chunk before the prompt's last: no token
  s.generated.push_back(token);
  s.next_token = token;
  v1::SequenceUpdate u;
  u.set_seq_id(s.seq_id);
  u.add_new_tokens(token);
  const auto& stop = s.req.stop_token_ids();
  v1::FinishReason reason = v1::FINISH_REASON_UNSPECIFIED;
  if (std::find(stop.begin(), stop.end(), token) != stop.end()) {
    reason = v1::FINISH_REASON_STOP;
  } else if (static_cast<int64_t>(s.generated.size()) >= s.req.max_new_tokens()) {
    reason = v1::FINISH_REASON_LENGTH;
  }
  u.set_finish_reason(reason);
  updates_.push_back(std::move(u));
  if (reason != v1::FINISH_REASON_UNSPECIFIED) {
    release_.push_back(key);
    seqs_.erase(it);
  }
}

void Scheduler::ApplyReturn(const Return& r) {
  for (size_t i = 0; i < r.keys.size(); ++i) ApplyToken(r.keys[i], r.tokens[i]);
}

absl::Status Scheduler::Sync(bool* want_stop) {
  v1::SyncRequest req;
  req.set_worker_id(o_.worker_id);
  req.set_host(o_.host);
  req.set_pid(getpid());
  req.set_epoch(epoch_);
  const DataPlane::Generation dp = dp_->generation();
  const int64_t generation = dp.generation;
  req.set_generation(generation);
  for (auto& u : updates_) *req.add_updates() = u;
  const int64_t live = static_cast<int64_t>(seqs_.size());
  req.set_free_slots(static_cast<int32_t>(std::max<int64_t>(0, o_.max_sequences - live)));
  auto r = client_->Sync(req, absl::Seconds(10));
  if (!r.ok()) {
    if (!sync_warned_) {
      LOG(WARNING) << "worker " << o_.worker_id << ": " << r.status().message() << " (will keep trying)";
      sync_warned_ = true;
    }
    if (absl::Now() - last_sync_ok_ > o_.coordinator_timeout) {
      return absl::UnavailableError(absl::StrCat("coordinator ", client_->address(), " unreachable for ",
                                                 absl::FormatDuration(o_.coordinator_timeout), ": ",
                                                 r.status().message()));
    }
    return absl::OkStatus();  // keep the updates for the next try
  }
  sync_warned_ = false;
  last_sync_ok_ = absl::Now();
  updates_.clear();
  if (r->epoch() == epoch_ && r->generation() == generation) committed_placement_ = r->placement_version();
  if (r->shutdown()) *shutdown_ = true;
  *want_stop = shutdown_->load();
  if (r->epoch() != epoch_) {
    LOG(INFO) << "worker " << o_.worker_id << ": coordinator epoch changed (" << epoch_ << " -> " << r->epoch()
              << "): dropping " << seqs_.size() << " sequences";
    epoch_ = r->epoch();
    std::vector<uint64_t> keys;
    for (auto& [k, s] : seqs_) keys.push_back(k);
    for (uint64_t k : keys) {
      seqs_[k].dropped = true;
      Finish(k, v1::FINISH_REASON_CANCELLED);
    }
    updates_.clear();
    return absl::OkStatus();
  }
  if (r->generation() != generation) {
    // Nothing was applied or assigned. With the coordinator our data plane was
    // built for, the generation moved on: rebuild. Otherwise (a restarted
    // coordinator) wait until the heartbeat thread registered again.
    if (r->epoch() == dp.epoch) {
      return absl::AbortedError(absl::StrCat("the cluster moved to data-plane generation ", r->generation()));
    }
    return absl::OkStatus();
  }
  for (const auto& id : r->cancel()) {
    for (auto& [k, s] : seqs_) {
      if (s.seq_id == id) {
        Finish(k, v1::FINISH_REASON_CANCELLED);
        break;
      }
    }
  }
  for (const auto& a : r->assign()) {
    Seq s;
    s.seq_id = a.seq_id();
    s.req = a.request();
    s.sp.temperature = s.req.sampling().temperature();
    s.sp.top_k = s.req.sampling().top_k();
    s.sp.top_p = s.req.sampling().top_p() > 0 ? s.req.sampling().top_p() : 1.0f;
    s.sp.seed = s.req.sampling().seed();
    s.cache = new_cache_();
    s.context.assign(s.req.tokens().begin(), s.req.tokens().end());
    s.generated.assign(a.resume_tokens().begin(), a.resume_tokens().end());
    s.context.insert(s.context.end(), s.generated.begin(), s.generated.end());
    absl::Status v = ValidatePrompt(*cfg_, s.context, s.req.max_new_tokens() - a.resume_tokens_size(), s.seq_id);
    if (!v.ok()) {  // the coordinator validates; this guards the worker against a bad peer
      LOG(ERROR) << "worker " << o_.worker_id << ": rejected " << v.message();
      v1::SequenceUpdate u;
      u.set_seq_id(s.seq_id);
      u.set_finish_reason(v1::FINISH_REASON_CANCELLED);
      updates_.push_back(u);
      continue;
    }
    seqs_.emplace(next_key_++, std::move(s));
  }
  return absl::OkStatus();
}

void Scheduler::BuildMicroBatch(MicroBatch* mb, std::vector<StepSegment>* segs) {
  // At most 1/P of the live sequences per micro-batch, so P micro-batches
  // are in flight at once and the stages overlap; at most max_step_tokens
  // tokens: decode tokens first, then prefill chunks.
  int64_t live = 0;
  for (auto& [k, s] : seqs_) live += s.dropped ? 0 : 1;
  const int64_t cap = std::max<int64_t>(1, (live + o_.pp - 1) / o_.pp);
  int64_t budget = std::max<int64_t>(1, o_.max_step_tokens);
  mb->segments.clear();
  mb->tokens.clear();
  segs->clear();
  std::vector<std::pair<uint64_t, Seq*>> chosen;
  for (const bool decode : {true, false}) {
    for (auto& [k, s] : seqs_) {
      if (static_cast<int64_t>(chosen.size()) >= cap || budget <= 0) break;
      if (s.in_flight || s.dropped || s.prefilled() != decode) continue;
      s.chunk = decode ? 1 : std::min<int64_t>(budget, static_cast<int64_t>(s.context.size()) - s.fed);
      budget -= s.chunk;
      chosen.push_back({k, &s});
    }
  }
  // Token storage first (segments point into it).
  for (auto& [k, s] : chosen) {
    SegmentMeta m;
    m.key = k;
    m.start = s->fed;
    m.n = s->chunk;
    if (!s->prefilled()) {
      mb->tokens.insert(mb->tokens.end(), s->context.begin() + s->fed, s->context.begin() + s->fed + s->chunk);
      m.sample = s->fed + s->chunk == static_cast<int64_t>(s->context.size()) ? 1 : 0;
    } else {
      mb->tokens.push_back(s->next_token);
    }
    m.temperature = s->sp.temperature;
    m.top_k = s->sp.top_k;
    m.top_p = s->sp.top_p;
    m.seed = s->sp.seed;
    m.step = s->generated.size();
    mb->segments.push_back(m);
    s->in_flight = true;
  }
  int64_t off = 0;
  for (size_t i = 0; i < chosen.size(); ++i) {
    segs->push_back({&chosen[i].second->cache, mb->tokens.data() + off, mb->segments[i].n});
    off += mb->segments[i].n;
  }
}

}  // namespace expertmesh::worker::runtime
