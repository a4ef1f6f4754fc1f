// The stage-0 scheduler of a lane: continuous batching of the sequences the
// coordinator assigns to this worker.
//
// Lanes: EP rank r of every stage forms lane r, and stage 0 of the lane owns
// its sequences. The scheduler syncs with the coordinator (Sync: finished
// tokens and finish reasons out, new and cancelled sequences in), builds
// micro-batches, applies the tokens the last stage returns, and collects the
// sequences whose caches the stages can free.
//
// A micro-batch holds at most 1/P of the live sequences (so P micro-batches
// are in flight and the stages overlap) and at most max_step_tokens tokens
// (chunked prefill, like vLLM's max_num_batched_tokens): first one decode
// token for each sequence that has its prompt cached, then prefill chunks of
// the waiting prompts (oldest first) up to the budget. A long prompt is
// prefilled over several micro-batches; only its last chunk samples a token.
// A sequence is in at most one micro-batch at a time; one cancelled while in
// flight (also mid-prefill) is dropped when its micro-batch comes back, so a
// cancel takes effect within one step.
//
// Resume: an assignment may carry tokens already generated (the sequence ran
// on a lost worker): they are prefilled after the prompt, and generation
// continues at that step (the same seeded/greedy tokens), reporting only the
// new ones.
//
// Threads: the stage thread only (nothing is locked). Sync blocks on one RPC
// (10 s at most); everything else is in memory.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/config.h"
#include "kernels/cpu/kernels.h"
#include "proto/expertmesh.pb.h"
#include "worker/runtime/coordinator_client.h"
#include "worker/runtime/data_plane.h"
#include "worker/runtime/messages.h"
#include "worker/runtime/stage_executor.h"

namespace expertmesh::worker::runtime {

class Scheduler {
 public:
  struct Options {
    int worker_id = 0;
    std::string host;               // sent with Sync with our pid: the coordinator takes results from the registered process only
    int64_t pp = 1;                 // stages of the lane (micro-batches in flight)
    int max_sequences = 64;         // sequences held at once
    int64_t max_step_tokens = 2048; // tokens (decode + prefill chunks) in one micro-batch; >= 1
    absl::Duration coordinator_timeout = absl::Seconds(300);  // Sync failing that long: give up
  };
  // client: Sync. data_plane: the generation Sync names (and that a moved
  // one is ours). shutdown: set when the coordinator says so (shared with
  // the heartbeat thread). cfg: prompts are validated against it.
  // new_cache: a cache for a new sequence on this stage.
  Scheduler(const Options& options, CoordinatorClient* client, const DataPlane* data_plane,
            std::atomic<bool>* shutdown, const ModelConfig* cfg, std::function<StageCache()> new_cache);

  // The coordinator epoch this lane's sequences belong to, and its committed
  // placement version (from Register or a rejoin).
  void SetEpoch(const std::string& epoch, int64_t committed_placement);
  const std::string& epoch() const { return epoch_; }
  int64_t committed_placement() const { return committed_placement_; }

  // One Sync with the coordinator. An unreachable coordinator is retried by
  // the next call (updates kept) until coordinator_timeout has passed since
  // the last success (then kUnavailable). kAborted when the coordinator of
  // our data plane moved to another generation (rebuild). *want_stop: the
  // cluster is shutting down.
  absl::Status Sync(bool* want_stop);
  // Restarts the coordinator_timeout clock (a stage loop starts).
  void ResetSyncClock() { last_sync_ok_ = absl::Now(); }

  // Fills mb's segments and tokens and the step segments of the next
  // micro-batch (possibly none), marking its sequences in flight.
  void BuildMicroBatch(MicroBatch* mb, std::vector<StepSegment>* segs);
  // The last stage's sampled tokens.
  void ApplyReturn(const Return& r);
  // Keys whose caches the stages can free; Defer puts keys back for later.
  std::vector<uint64_t> TakeReleases() { return std::exchange(release_, {}); }
  void DeferReleases(const std::vector<uint64_t>& keys) { release_.insert(release_.end(), keys.begin(), keys.end()); }
  // Drops every sequence without reporting (the coordinator requeues them).
  void DropAll();

  int64_t size() const { return static_cast<int64_t>(seqs_.size()); }
  bool empty() const { return seqs_.empty(); }
  // Updates not yet delivered to the coordinator (tests).
  const std::vector<v1::SequenceUpdate>& pending_updates() const { return updates_; }

 private:
  struct Seq {
    std::string seq_id;
    v1::SequenceRequest req;
    kernels::SamplingParams sp;
    std::vector<int32_t> context;    // prompt, then the tokens generated before a resume
    std::vector<int32_t> generated;  // all generated tokens (resumed ones included)
    int64_t fed = 0;                 // tokens sent through the model (cached once returned)
    int64_t chunk = 0;               // tokens of the micro-batch in flight
    StageCache cache;
    bool in_flight = false, dropped = false;
    int32_t next_token = 0;
    bool prefilled() const { return fed >= static_cast<int64_t>(context.size()); }
  };
  void Finish(uint64_t key, v1::FinishReason reason);
  void ApplyToken(uint64_t key, int32_t token);

  const Options o_;
  CoordinatorClient* client_;
  const DataPlane* dp_;
  std::atomic<bool>* shutdown_;
  const ModelConfig* cfg_;
  std::function<StageCache()> new_cache_;
  std::string epoch_;
  int64_t committed_placement_ = 1;
  std::map<uint64_t, Seq> seqs_;
  uint64_t next_key_ = 1;
  std::vector<uint64_t> release_;
  std::vector<v1::SequenceUpdate> updates_;
  absl::Time last_sync_ok_ = absl::Now();
  bool sync_warned_ = false;
};

}  // namespace expertmesh::worker::runtime
