// The coordinator's state: jobs and their sequences, the journal, the
// scheduler that hands sequences to the stage-0 workers, the worker registry
// with its health monitor, and the expert load summed from heartbeats.
//
// This class is a facade over parts, each in its own file with a contract
// (threads, locks, ownership) at the top of its header:
//   job_store.{h,cc}   jobs, journal (group commit), retention, compaction
//   scheduler.{h,cc}   the queue, Sync's updates and assignments
//   membership.{h,cc}  workers, health, generations, the key-value store
//   rebalance.cc       placement: EPLB and live expert rebalancing
//   coordinator.cc     creation, replay at start, Tick, shutdown, Stop
//
// A plain object: every RPC of JobService, ClusterService and WorkerService
// is one method here taking and returning the API's messages and an
// absl::Status whose code is the gRPC code to answer (services.h only
// translates). Thread-safe: one mutex guards the state; methods that wait
// (Register, WaitJobResults) wait on condition variables with deadlines.
// Journal records are enqueued under the mutex (their order is the state's)
// and waited for without it (group commit, coordinator/journal.h): SubmitJob,
// CancelJob and Sync answer once their records are durable, and no fsync
// runs under the mutex except a placement commit's (rare).
//
//   ASSIGN_OR_RETURN(auto c, Coordinator::Create(options));
//   ASSIGN_OR_RETURN(v1::SubmitJobResponse r, c->SubmitJob(request));
//   ... a monitor thread calls c->Tick() every options.monitor_interval_s.
//
// Semantics the workers rely on (docs/API.md says the same for users):
//  * Register: worker_id -1 takes the lowest free place (registration order);
//    a worker_id >= 0 keeps that place (re-registration after a coordinator
//    restart). The call blocks until all pp*ep places are taken, then returns
//    stage = worker_id / ep, ep_rank = worker_id % ep, the plan and the epoch.
//  * Serving (gRPC health SERVING): every worker READY and registered (or
//    rejoined) in the current generation, so a survivor's report of a failed
//    data plane (a wedged peer) ends SERVING before any heartbeat timeout.
//  * Health: STARTING after Register; the first Heartbeat makes it READY; a
//    READY worker silent for heartbeat_timeout_s (a STARTING one for
//    startup_timeout_s) becomes MISSING and the sequences it held go back to
//    the queue (and are sent as `cancel` should it sync again).
//  * Sync (stage 0 only): a request with another epoch gets the current epoch
//    and nothing else, its updates ignored. Otherwise updates are applied
//    (tokens appended; a finish_reason finishes the sequence and journals its
//    result), pending cancellations are returned, and queued sequences are
//    assigned: at most free_slots, and at most the worker's fair share
//    ceil((queued + running on stage 0) / live stage-0 workers) minus what it
//    already holds, oldest job first.
//  * Epoch: random per Coordinator; the journal is replayed at creation, so
//    unfinished sequences of unfinished jobs are queued again from scratch.
//  * Retention: a job final (SUCCEEDED, CANCELLED, FAILED) for longer than
//    job_retention_s is forgotten (memory and, at the next compaction, the
//    journal); GetJob / WatchJob / CancelJob then answer NOT_FOUND saying it
//    expired, and its client_request_id no longer deduplicates. Job ids are
//    never reused.
//  * Journal compaction rewrites the journal with only the records the
//    retained jobs need (Journal::RewriteSnapshot): the state is copied under
//    the mutex, serialised and written without it while appends go on; at
//    creation when
//    the records of forgotten jobs take journal_compact_min_waste_bytes and a
//    quarter of the file, likewise whenever retention forgets jobs, and when
//    the file grows past max(journal_compact_min_bytes, 2 x its size after the
//    last compaction or check) with at least an eighth of it reclaimable.
//  * Generation: the data plane's version, 1 at start. It grows when a
//    worker that served is found MISSING, exits unasked, or reports through
//    Register(rejoin_after_generation) that its data plane failed. Every
//    running sequence then goes back to the front of the queue with the
//    tokens generated so far, and the worker it goes to next resumes it
//    (SequenceAssignment.resume_tokens; generation is deterministic per
//    sequence and step), Heartbeat and Sync answer the new
//    generation (Sync ignores updates of another generation and assigns
//    nothing), and the workers rebuild their communicators once every place
//    is held by a live worker again. "Complete" means every place registered
//    and live (STARTING or READY), so a rejoining worker waits for the
//    replacement of a lost one; it keeps its place while it waits.
//  * Placement version (expert rebalancing): 1 at start. RebalanceExperts
//    (or every eplb_interval_s) computes EPLB placements from the load
//    observed since the last rebalance (layers without load keep theirs) and,
//    when the mean imbalance (max / mean rank load) drops by eplb_min_gain,
//    makes it *pending* (a version never used before): Heartbeat sends the pending plan to
//    every worker until it reports it staged (its new experts loaded next to
//    the ones in use). Once every worker staged it the placement is
//    *committed*: journaled, answered by Register/Status, and Heartbeat and
//    Sync report its version; stage-0 workers switch at the first step all of
//    them know it and carry the version down the pipeline in that
//    micro-batch, so every rank of a stage switches at the same step. A
//    staging error or a new generation drops a pending placement; a restart
//    replays the last committed one from the journal.
//  * Vacant places (elastic_ep, ep > 1): a worker lost while another
//    of its stage is live leaves its place *vacant*: the coordinator commits
//    at once a placement version in which the vacant ranks hold no expert
//    slot (their slots move to the live ranks with the fewest slots) and
//    moves to a new generation whose RegisterResponse lists the vacant
//    places; "complete" and "serving" skip them. The survivors load the
//    experts they gain before they rebuild their data plane over the live
//    workers. A worker registering for a vacant place (a replacement, or the
//    lost one back) ends the vacancy: a placement that gives it slots again
//    and another generation. With pp > 1 the pipeline lanes are re-paired
//    around the vacant places (topology/lanes.h): Sync assigns sequences
//    only to stage-0 workers that have a lane; a live worker without one
//    holds its experts and takes part in its stage's all-to-alls with zero
//    tokens. A stage that loses its last live worker waits for a
//    replacement.
//  * Shutdown: Heartbeat and Sync answer shutdown=true from then on; done
//    once every registered worker sent exiting=true (or is MISSING), or
//    shutdown_timeout_s after the request.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/config.h"
#include "coordinator/journal.h"
#include "coordinator/membership.h"
#include "proto/expertmesh.pb.h"
#include "proto/security.h"
#include "topology/plan.h"

namespace expertmesh::coordinator {

class JournalRecord;  // coordinator/journal_records.proto (private to the coordinator)
class PlacementCommitted;

struct CoordinatorOptions {
  std::string checkpoint;                 // folder with config.json (weights are never read here)
  int pp = 1, ep = 1, redundant_experts = 0;
  std::vector<int64_t> layers_per_stage;  // optional explicit split
  // Optional observed expert load for placement: JSON {"<layer>": [tokens per
  // expert]} or the output of `expertmesh status --json`.
  std::string expert_load_file;
  std::string listen = "127.0.0.1:0";     // host:port; port 0 picks a free one
  std::string journal_path;               // empty: no journal (accepted jobs die with the process)
  std::string metrics_listen;             // host:port for Prometheus GET /metrics; empty: off
  int max_queued_sequences = 65536;       // sequences waiting for a worker, over all jobs
  int max_sequences_per_job = 4096;
  double heartbeat_timeout_s = 10;        // READY -> MISSING without a heartbeat
  double startup_timeout_s = 1800;        // STARTING (registered, loading) -> MISSING without a first heartbeat
  double register_timeout_s = 600;        // how long Register waits for the cluster to be complete
  double shutdown_timeout_s = 30;         // Shutdown: how long to wait for the workers' exiting heartbeats
  double monitor_interval_s = 0.1;        // health monitor period
  // Jobs final for longer than this are forgotten; 0 keeps them forever.
  double job_retention_s = 86400;
  // Journal compaction thresholds (see the header comment). Tests use small ones.
  int64_t journal_compact_min_bytes = int64_t{64} << 20;
  int64_t journal_compact_min_waste_bytes = int64_t{1} << 20;
  // Expert rebalancing while serving (see the header comment).
  double eplb_interval_s = 0;       // automatic: every this many seconds; 0: only on RebalanceExperts
  double eplb_min_gain = 0.05;      // start only when the imbalance drops by at least this fraction
  int64_t eplb_min_tokens = 2048;   // routed tokens per MoE layer (mean) observed since the last rebalance
  // Elastic expert parallelism (pp = 1): a lost worker's place turns vacant
  // and the survivors serve without it (its experts re-placed over them)
  // instead of waiting for a replacement; see "Vacant places" above.
  bool elastic_ep = false;
  // Access control (docs/SECURITY.md). Empty: that part is open.
  // Clients (JobService, ClusterService, HTTP: /metrics and the OpenAI API;
  // GET /health stays open) send
  // "authorization: Bearer <client_auth_token>".
  std::string client_auth_token;
  // Workers (WorkerService) send "x-expertmesh-worker-secret: <cluster_secret>";
  // the client token does not grant WorkerService.
  std::string cluster_secret;
  rpc::ServerSecurity tls;          // TLS (and mTLS) of the gRPC server; empty: plaintext
  // The OpenAI-compatible HTTP API (coordinator/openai_server.h); empty: off.
  std::string http_listen;           // host:port
  std::string served_model_name;     // the model id it answers to; empty: the checkpoint folder's basename
  std::string chat_template;         // --chat-template name; empty: recognised from tokenizer_config.json
  std::string reasoning_field = "reasoning_content";  // R1 reasoning's JSON field: reasoning_content or reasoning
};

// Elastic EP (rebalance.cc): the placement `p` of one MoE layer with the
// slots of the ranks whose live[r] is false moved to live ranks. Replicas
// first: a slot whose expert a live rank already holds goes to such a rank
// (nothing to load); only an expert with no live copy left goes to the live
// rank with the fewest slots (which loads it). Nothing moves between live
// ranks after a loss; a rank back from vacancy (live, no slot in p) takes
// its share of slots from the fullest ranks. Slot count and experts stay the
// same. kFailedPrecondition when no rank is live.
absl::StatusOr<topology::ExpertPlacement> PlaceOverLive(const topology::ExpertPlacement& p,
                                                        const std::vector<bool>& live);

class Coordinator {
 public:
  // Reads <checkpoint>/config.json, builds the plan, opens and replays the
  // journal. Errors name the file or flag at fault.
  static absl::StatusOr<std::unique_ptr<Coordinator>> Create(const CoordinatorOptions& options);
  ~Coordinator();

  // ---- JobService
  // INVALID_ARGUMENT (names the field), RESOURCE_EXHAUSTED (queue full),
  // UNAVAILABLE (shutting down, journal write failed). A known
  // client_request_id returns its job with deduplicated = true.
  absl::StatusOr<v1::SubmitJobResponse> SubmitJob(const v1::SubmitJobRequest& request);
  absl::StatusOr<v1::Job> GetJob(const std::string& job_id) const;  // NOT_FOUND
  // The id of the accepted job submitted with `client_request_id`, if any.
  std::optional<std::string> FindJobByRequestId(const std::string& client_request_id) const;
  // WatchJob's engine: waits until the job has results past *cursor or is
  // final, or until `deadline`; appends the new messages to *out and advances
  // *cursor. Returns true when the job is final and everything was handed out.
  // NOT_FOUND for unknown jobs, UNAVAILABLE once Stop() was called.
  //
  // Per-token progress: with `token_offsets` (one entry per sequence, sized
  // by the first call; start with an empty vector) it also waits for tokens
  // generated past token_offsets[i] and hands them out as SequenceDeltas in
  // one message (its `state` the job's, no `result`) before the results.
  // Each sequence's token stream only grows: tokens are published once, and
  // a sequence that restarts after a lost worker (or coordinator) publishes
  // only tokens past those already published (generation is deterministic
  // per (seed, step), so the regenerated prefix is the same). Every token of
  // a sequence is handed out before its result.
  absl::StatusOr<bool> WaitJobResults(const std::string& job_id, size_t* cursor, absl::Time deadline,
                                      std::vector<v1::WatchJobResponse>* out,
                                      std::vector<int64_t>* token_offsets = nullptr);
  absl::StatusOr<v1::Job> CancelJob(const std::string& job_id);  // idempotent; NOT_FOUND
  // Ends one unfinished sequence now with FINISH_REASON_STOP and the tokens
  // published so far (journaled like any result; the worker holding it is
  // told to drop it). For stop strings matched on text by a front end. A
  // sequence already finished is left as it is (OK). NOT_FOUND,
  // INVALID_ARGUMENT (index out of range), UNAVAILABLE (journal).
  absl::Status StopSequence(const std::string& job_id, int index);
  absl::StatusOr<v1::ListJobsResponse> ListJobs(const v1::ListJobsRequest& request) const;
  // How many jobs the coordinator holds in each state (for metrics: no copies).
  std::map<v1::JobState, int64_t> JobCountsByState() const;

  // ---- ClusterService
  v1::ClusterStatus GetClusterStatus() const;
  void RequestShutdown();
  // Starts a rebalance (see the header comment). started = false with a
  // reason when there is nothing to gain; FAILED_PRECONDITION when the
  // cluster cannot rebalance now.
  absl::StatusOr<v1::RebalanceExpertsResponse> RebalanceExperts(const v1::RebalanceExpertsRequest& request);

  // ---- WorkerService
  // Blocks until the cluster is complete, `deadline`, Stop(), or `cancelled()`
  // turns true (the caller went away: its place is freed while the cluster is
  // still incomplete). INVALID_ARGUMENT (worker_id out of range),
  // ALREADY_EXISTS (the place is held by a live worker), RESOURCE_EXHAUSTED
  // (every place held by a live worker), DEADLINE_EXCEEDED, UNAVAILABLE.
  absl::StatusOr<v1::RegisterResponse> Register(const v1::RegisterRequest& request, absl::Time deadline,
                                                const std::function<bool()>& cancelled);
  // NOT_FOUND for a worker_id not registered with this coordinator (register
  // again); INVALID_ARGUMENT for a malformed expert_load; FAILED_PRECONDITION
  // when host/pid are given and another process now holds the place.
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  // NOT_FOUND (not registered), FAILED_PRECONDITION (not a stage-0 worker).
  absl::StatusOr<v1::SyncResponse> Sync(const v1::SyncRequest& request);
  absl::Status StoreSet(const std::string& key, const std::string& value);
  absl::StatusOr<std::optional<std::string>> StoreGet(const std::string& key) const;

  // ---- life cycle
  // Health monitor step: MISSING workers, shutdown progress, serving changes.
  void Tick();
  // Called with the new value whenever `serving` changes (and once when set).
  void SetServingListener(std::function<void(bool)> listener);
  bool serving() const;
  // Blocks until shutdown completed (true) or `timeout` passed (false).
  bool WaitForShutdown(absl::Duration timeout);
  bool shutdown_done() const;
  // Wakes every waiting call; later waits answer UNAVAILABLE. No journal
  // writes happen after it.
  void Stop();

  const std::string& epoch() const { return epoch_; }
  const v1::Plan& plan_proto() const { return plan_proto_; }
  const topology::Plan& plan() const { return plan_; }
  const ModelConfig& config() const { return config_; }
  const CoordinatorOptions& options() const { return options_; }

  // The journal as the compaction logic sees it (zeros without a journal).
  struct JournalStats {
    int64_t size_bytes = 0;          // the file now
    int64_t live_bytes = 0;          // what a compaction would keep (estimate)
    int64_t compacted_bytes = 0;     // the file right after the last compaction (or at start)
    int64_t compactions = 0;         // by this Coordinator, including at start
    absl::Duration last_compaction;  // how long the last one took (the mutex is held only to copy the state)
  };
  JournalStats journal_stats() const;

 private:
  enum class SeqState { kQueued, kAssigned, kDone };
  struct Sequence {
    SeqState state = SeqState::kQueued;
    int worker = -1;               // while kAssigned
    std::vector<int32_t> tokens;   // generated so far (kAssigned) or final (kDone)
    // Tokens handed out as progress (WaitJobResults' deltas): only grows.
    std::vector<int32_t> published;
  };
  struct Job {
    std::string id;
    std::string client_request_id;
    v1::SubmitJobRequest request;
    v1::JobState state = v1::JOB_STATE_QUEUED;
    std::vector<Sequence> seqs;
    std::vector<v1::SequenceResult> results;   // in finishing order
    std::vector<v1::JobState> result_states;   // job state after each result
    std::vector<int64_t> result_ms;            // when each result was journaled (kept by compaction)
    int64_t order = 0;                         // key in job_order_
    int64_t journal_bytes = 0;                 // bytes its records take in a compacted journal
    int64_t submitted_ms = 0, finished_ms = 0, generated_tokens = 0;
    int num_assigned = 0, num_done = 0;
    std::string error;
    // While its JobSubmitted record is being written (SubmitJob waits for it
    // outside mu_): the journal ticket. Such a job is not accepted yet:
    // FindJob, ListJobs and the scheduler do not see it.
    uint64_t pending_ticket = 0;
    // The payload of its JobSubmitted record (immutable; compaction copies it
    // into the new journal without serialising the request again).
    std::shared_ptr<const std::string> submitted_record;
  };
  // The state a compaction writes, copied under mu_ (cheap: the submitted
  // records are shared) and serialised and written without it.
  struct CompactionSnapshot {
    std::string why;
    uint64_t covers = 0;             // Journal::BeginSnapshot
    absl::Time started;
    int64_t size_before = 0, live_before = 0;
    int64_t placement_version = 0;
    std::string placement_record;    // empty at version 1
    struct JobRecords {
      std::string id;
      uint64_t pending_ticket = 0;
      std::shared_ptr<const std::string> submitted;
      std::vector<std::pair<v1::SequenceResult, int64_t>> results;  // (result, unix ms), CANCELLED ones left out
      bool cancelled = false;
      int64_t finished_ms = 0;
      int64_t bytes_before = 0;      // Job::journal_bytes when copied
    };
    std::vector<JobRecords> jobs;
    std::string id_mark;             // the last id's mark when its job is gone
  };
  struct Worker {
    bool registered = false;
    std::string host;
    int pid = 0;
    v1::WorkerHealth health = v1::WORKER_HEALTH_UNSPECIFIED;
    absl::Time registered_at, last_heartbeat;
    bool heartbeat_seen = false;
    int32_t active_sequences = 0;
    int64_t steps = 0, tokens_processed = 0;
    v1::StageTimes times;
    std::set<std::string> assigned;            // seq_ids (stage-0 workers)
    std::vector<std::string> pending_cancel;   // seq_ids to send as `cancel`
    int64_t staged_placement_version = 0;      // from its heartbeats
    // The data-plane generation of its last answered Register: it builds
    // (or runs) that generation's data plane. One behind generation_ (a
    // wedged worker that the survivors reported): the cluster is not serving.
    int64_t joined_generation = 0;
    // Lost and not replaced, served around (elastic_ep): holds no expert slot.
    bool vacant = false;
  };
  // A rebalanced placement the workers are loading.
  struct PendingPlacement {
    int64_t version = 0;
    topology::Plan plan;
    v1::Plan proto;
    double imbalance_before = 0, imbalance_after = 0;
  };

  explicit Coordinator(const CoordinatorOptions& options) : options_(options) {}
  absl::Status Init();
  absl::Status Replay(const std::vector<std::string>& records);

  // All below run with mu_ held.
  bool Final(const Job& j) const;
  // Call once when a job turns final: starts its retention clock.
  void BecameFinal(Job* j);
  void UpdateJobState(Job* j, int64_t now_ms);
  // Records a final result and queues its journal record (see FlushJournal).
  // FINISH_REASON_ERROR (with `error`) also fails the job: FAILED with an
  // error naming the sequence, its other unfinished sequences cancelled (not
  // journaled: the failed sequence's record covers them, as on replay).
  void FinishSequence(Job* j, int index, std::vector<int32_t> tokens, v1::FinishReason reason, int64_t now_ms,
                      const std::string& error = "");
  void CancelUnfinished(Job* j, int64_t now_ms);
  // Puts an assigned sequence back at the front of the queue; its tokens so
  // far stay, and the next worker resumes after them.
  void Requeue(Job* j, int index);
  // Extends s.published with the tokens past it (`tokens`: the sequence's
  // tokens from its first one).
  static void Publish(Sequence* s, const std::vector<int32_t>& tokens);
  // Requeues every sequence of a worker; `tell_worker` also queues them as `cancel` for it.
  void RevokeSequences(int worker_id, bool tell_worker);
  // Moves the data plane to the next generation (see the header comment):
  // requeues every running sequence and drops the store keys of older ones.
  void NewGenerationLocked(const std::string& reason);
  // A live worker went MISSING or exited unasked (`how` says which): counts
  // it and moves to a new generation (nothing during shutdown).
  void WorkerLostLocked(int worker_id, const std::string& how);
  Job* FindJob(const std::string& job_id) const;
  // NOT_FOUND for a job_id FindJob does not know: "expired" for ids this
  // coordinator (or its journal) handed out, "no job" otherwise.
  absl::Status JobNotFound(const std::string& job_id) const;
  // Adds one journal record of `payload_bytes` to the job's live bytes.
  void CountJournalRecord(Job* j, size_t payload_bytes);
  // Retention and compaction; at most once per monitor interval from Tick.
  // Returns the snapshot of a compaction to run (RunCompaction, without mu_).
  std::optional<CompactionSnapshot> MaintainLocked();
  // Forgets jobs final since before now_ms - job_retention_s; returns how many.
  int64_t ExpireJobsLocked(int64_t now_ms);
  // When a threshold of the header comment is passed (and no compaction
  // runs): the snapshot to compact to.
  std::optional<CompactionSnapshot> MaybeCompactJournalLocked();
  CompactionSnapshot TakeSnapshotLocked(const std::string& why);
  // Without mu_: serialises the snapshot, rewrites the journal (appends go on
  // meanwhile), then takes mu_ to update the byte accounting.
  absl::Status RunCompaction(CompactionSnapshot snap);
  // Tick's body; `maintain`: also retention and compaction (the monitor
  // thread and explicit Tick calls, not Heartbeat).
  void TickImpl(bool maintain);
  // Any job, also one whose submission is still being written.
  Job* FindAnyJob(const std::string& job_id) const;
  bool ParseSeqId(const std::string& seq_id, Job** job, int* index) const;
  v1::Job JobProto(const Job& j, bool with_results) const;
  bool ServingLocked() const;
  bool ClusterCompleteLocked() const;
  std::vector<int> VacantIdsLocked() const;  // worker ids, ascending
  bool Live(const Worker& w) const {
    return w.registered &&
           (w.health == v1::WORKER_HEALTH_STARTING || w.health == v1::WORKER_HEALTH_READY);
  }
  // Enqueues the records queued by FinishSequence in the journal; returns
  // their ticket (0: nothing to write) for WaitJournal after mu_ is released.
  uint64_t EnqueuePendingRecordsLocked();
  // Without mu_: waits until `ticket` is durable (group commit); logs errors.
  absl::Status WaitJournal(uint64_t ticket);
  void NotifyServing();
  // Rebalancing (coordinator/rebalance.cc), mu_ held.
  absl::Status StartRebalanceLocked(bool force, v1::RebalanceExpertsResponse* resp);
  // Heartbeat's part: records the worker's placement versions, hands out
  // the pending plan, drops it on a staging error, commits when all staged.
  void PlacementHeartbeatLocked(int worker_id, const v1::HeartbeatRequest& request, v1::HeartbeatResponse* resp);
  void CommitPlacementLocked();
  void DropPendingPlacementLocked(const std::string& why);
  void AutoRebalanceLocked();
  // Mean over MoE layers with observed load of max / mean rank load; also the mean tokens per layer.
  double WindowImbalanceLocked(const topology::Plan& plan, int64_t* tokens_per_layer) const;
  v1::RebalanceStatus RebalanceStatusLocked() const;
  // Replay of a PlacementCommitted record (its plan message, or the JSON of
  // journals written before): adopts it when it fits the plan's stages.
  void ReplayPlacement(const PlacementCommitted& rec);
  // The PlacementCommitted record of the committed placement (version > 1).
  JournalRecord PlacementRecord() const;
  // Appends PlacementRecord() to the journal (if any) and counts its bytes as live.
  absl::Status JournalPlacementLocked();
  // Workers that reported the pending placement staged.
  int WorkersStagedLocked() const;
  // Register's part: adopts the newer placement a re-registering worker runs
  // when this coordinator has not rebalanced itself (see RegisterRequest).
  void AdoptRunningPlacementLocked(int worker_id, const v1::Plan& running);
  // Elastic EP (rebalance.cc): commits (journals) a placement version in
  // which the vacant workers' ranks hold no slot and every other rank at
  // least its share; false (logged) when it cannot, e.g. the journal failed.
  bool ReplaceForVacanciesLocked(const std::string& why);

  CoordinatorOptions options_;
  ModelConfig config_;
  std::string model_json_;
  topology::Plan plan_;
  v1::Plan plan_proto_;
  std::string epoch_;

  mutable std::mutex mu_;
  std::condition_variable changed_;   // jobs, workers, shutdown: any change wakes waiters
  std::unique_ptr<Journal> journal_;
  std::vector<std::string> pending_records_;
  bool replaying_ = false;
  std::map<std::string, std::unique_ptr<Job>> jobs_;
  std::map<int64_t, Job*> job_order_;                     // submission order (Job::order)
  int64_t next_order_ = 1;
  std::set<std::pair<int64_t, Job*>> final_by_time_;      // (finished_ms, job): the retention clock
  std::unordered_map<std::string, std::string> by_request_id_;
  int64_t live_journal_bytes_ = 0;                        // sum of Job::journal_bytes (+ the id mark)
  int64_t compacted_bytes_ = 0;                           // journal size after the last compaction
  int64_t compactions_ = 0;
  absl::Duration last_compaction_;
  int64_t compact_retry_at_ms_ = 0;                       // back-off after a failed compaction
  bool compacting_ = false;                               // a RunCompaction is under way
  absl::Time next_maintenance_;
  std::deque<std::pair<Job*, int>> queue_;                // entries whose sequence left kQueued are skipped
  int64_t queued_ = 0, running_ = 0;
  int64_t next_job_ = 1;
  std::vector<Worker> workers_;
  std::map<int64_t, std::vector<int64_t>> expert_load_;   // MoE layer -> tokens per logical expert
  int64_t generation_ = 1;
  int64_t placement_version_ = 1;
  int64_t last_pending_version_ = 1;   // versions are never reused, also of dropped placements
  std::optional<PendingPlacement> pending_placement_;
  std::map<int64_t, std::vector<int64_t>> window_load_;   // expert load since the last rebalance
  int64_t rebalances_ = 0;
  double last_imbalance_before_ = 0, last_imbalance_after_ = 0;
  int64_t last_rebalance_ms_ = 0;
  std::string rebalance_error_;
  int64_t placement_record_bytes_ = 0;   // its PlacementCommitted record in the journal
  absl::Time next_auto_rebalance_ = absl::InfiniteFuture();
  bool generation_issued_ = false;   // some Register answered with generation_ (a data plane may exist)
  int64_t workers_lost_ = 0;
  int64_t experts_loaded_for_vacancies_ = 0;   // ClusterStatus.vacancy_experts_to_load
  KeyValueStore store_;   // its own lock (coordinator/membership.h)
  bool shutdown_requested_ = false, shutdown_done_ = false, stopped_ = false;
  absl::Time shutdown_at_;

  std::mutex notify_mu_;                      // serializes serving notifications
  std::function<void(bool)> serving_listener_;
  std::optional<bool> last_serving_;
};

}  // namespace expertmesh::coordinator
