// Expert rebalancing in the coordinator: pending and committed placement
// versions, what Heartbeat, Sync, Register and the status say, the rules that
// drop a pending placement, and the journal that keeps a committed one.
// Workers are played by the test through the Coordinator object.
#include <algorithm>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "coordinator/coordinator.h"
#include "coordinator/journal.h"
#include "coordinator/journal_records.pb.h"
#include "gtest/gtest.h"
#include "tests/coordinator/test_util.h"
#include "topology/eplb.h"
#include "topology/plan_proto.h"

namespace expertmesh::coordinator {
namespace {

using testing::TempDir;
using testing::WriteTinyCheckpoint;
using topology::PlanFromProto;
using topology::PlanToProto;

// The expert placement of MoE layer `layer` of stage `stage` in `p`.
topology::ExpertPlacement PlacementOf(const v1::Plan& p, int stage, int layer) {
  auto pl = topology::PlacementFromProto(p.stages(stage).placement().at(layer), "test");
  EXPECT_OK(pl);
  return pl.ok() ? *std::move(pl) : topology::ExpertPlacement();
}

// Registers every place (Register blocks until all are taken); with
// `running`, as serving workers do with a restarted coordinator, each sending
// it as the plan it runs.
void RegisterPlaces(Coordinator* c, const v1::Plan* running, std::vector<v1::RegisterResponse>* out) {
  const int n = static_cast<int>(c->plan().num_workers());
  out->assign(static_cast<size_t>(n), v1::RegisterResponse());
  std::vector<std::thread> t;
  for (int i = 0; i < n; ++i) {
    t.emplace_back([c, i, running, out] {
      v1::RegisterRequest r;
      r.set_worker_id(i);
      r.set_host("fakehost");
      r.set_pid(100 + i);
      if (running != nullptr) *r.mutable_running_plan() = *running;
      auto resp = c->Register(r, absl::Now() + absl::Seconds(10), [] { return false; });
      ASSERT_OK(resp);
      (*out)[static_cast<size_t>(i)] = *resp;
    });
  }
  for (auto& x : t) x.join();
}

class RebalanceTest : public ::testing::Test {
 protected:
  CoordinatorOptions Options(int pp, int ep, int redundant = 0) {
    CoordinatorOptions o;
    o.checkpoint = WriteTinyCheckpoint(dir_.path());
    o.pp = pp;
    o.ep = ep;
    o.redundant_experts = redundant;
    o.journal_path = dir_.path() + "/journal";
    o.heartbeat_timeout_s = 60;
    o.register_timeout_s = 10;
    o.eplb_min_tokens = 100;
    return o;
  }

  void Start(const CoordinatorOptions& o) {
    c_.reset();
    auto c = Coordinator::Create(o);
    ASSERT_OK(c);
    c_ = *std::move(c);
  }

  // Registers every place (Register blocks until all are taken) and makes them READY.
  void RegisterAll() {
    std::vector<v1::RegisterResponse> regs;
    RegisterPlaces(c_.get(), nullptr, &regs);
    for (int i = 0; i < static_cast<int>(regs.size()); ++i) Beat(i, 1, 0);
    ASSERT_TRUE(c_->serving());
  }

  v1::HeartbeatResponse Beat(int id, int64_t active, int64_t staged, const std::string& error = "",
                             const std::vector<v1::LayerExpertLoad>& load = {}, bool exiting = false) {
    v1::HeartbeatRequest r;
    r.set_worker_id(id);
    r.set_host("fakehost");  // as registered by RegisterPlaces
    r.set_pid(100 + id);
    r.set_placement_version(active);
    r.set_staged_placement_version(staged);
    r.set_staging_error(error);
    r.set_exiting(exiting);
    for (const auto& l : load) *r.add_expert_load() = l;
    auto resp = c_->Heartbeat(r);
    EXPECT_OK(resp);
    return resp.ok() ? *resp : v1::HeartbeatResponse();
  }

  // Experts of each layer: `hot` tokens for the first 16 of rank 0's slots in
  // the placement in use (all on rank 0), `cold` for the others.
  v1::LayerExpertLoad Load(int layer, int64_t hot, int64_t cold) const {
    v1::LayerExpertLoad l;
    l.set_layer(layer);
    std::vector<int64_t> counts(256, cold);
    for (const auto& stage : c_->plan().stages) {
      auto it = stage.placement.find(layer);
      if (it == stage.placement.end()) continue;
      const std::vector<int32_t>& slots = it->second.slots_of_rank(0);
      for (size_t i = 0; i < 16 && i < slots.size(); ++i) counts[static_cast<size_t>(slots[i])] = hot;
    }
    for (int64_t c : counts) l.add_tokens_per_expert(c);
    return l;
  }
  // The same as per-expert doubles.
  static std::vector<double> Doubles(const v1::LayerExpertLoad& l) {
    return std::vector<double>(l.tokens_per_expert().begin(), l.tokens_per_expert().end());
  }

  // Reports the skewed load of every MoE layer of the tiny model (1..3) from the stage that runs it.
  void ReportSkewedLoad() {
    const int ep = static_cast<int>(c_->plan().ep);
    for (int id = 0; id < static_cast<int>(c_->plan().num_workers()); id += ep) {
      std::vector<v1::LayerExpertLoad> load;
      for (const auto& [layer, p] : c_->plan().stages[static_cast<size_t>(id / ep)].placement) {
        load.push_back(Load(static_cast<int>(layer), 1000, 10));
      }
      Beat(id, c_->plan_proto().placement_version(), 0, "", load);
    }
  }

  absl::StatusOr<v1::RebalanceExpertsResponse> Rebalance(bool force = false) {
    v1::RebalanceExpertsRequest r;
    r.set_force(force);
    return c_->RebalanceExperts(r);
  }

  TempDir dir_;
  std::unique_ptr<Coordinator> c_;
};

// Elastic EP, replicas first: a lost rank's slots go to live ranks that
// already hold their expert (nothing to load); only experts with no live copy
// are loaded; nothing moves between the survivors; a rank back evens out.
TEST(PlaceOverLiveTest, ReplicasFirstThenTheFewestSlots) {
  auto loads = [](const topology::ExpertPlacement& a, const topology::ExpertPlacement& b) {
    int64_t n = 0;
    for (int64_t r = 0; r < b.num_ranks(); ++r) {
      const std::set<int32_t> have(a.slots_of_rank(r).begin(), a.slots_of_rank(r).end());
      for (int32_t e : std::set<int32_t>(b.slots_of_rank(r).begin(), b.slots_of_rank(r).end())) n += !have.count(e);
    }
    return n;
  };
  // 8 experts, 4 ranks, every expert twice (full redundancy): rank 1 lost.
  auto full = topology::ExpertPlacement::Create(8, {{0, 1, 4, 5}, {2, 3, 6, 7}, {0, 1, 2, 3}, {4, 5, 6, 7}});
  ASSERT_OK(full);
  auto p = PlaceOverLive(*full, {true, false, true, true});
  ASSERT_OK(p);
  EXPECT_TRUE(p->slots_of_rank(1).empty());
  EXPECT_EQ(p->num_slots(), full->num_slots());
  EXPECT_EQ(loads(*full, *p), 0);  // every lost slot had a replica on a survivor
  for (int64_t r : {0, 2, 3}) {    // the survivors keep what they had
    for (int32_t e : full->slots_of_rank(r)) {
      EXPECT_NE(std::count(p->slots_of_rank(r).begin(), p->slots_of_rank(r).end(), e), 0);
    }
  }
  for (int64_t e = 0; e < 8; ++e) EXPECT_EQ(p->replicas(e).size(), 2u) << e;
  // A second loss (rank 2): experts 2 and 3 lost both copies (ranks 1 and 2)
  // and are loaded; the slots of 0 and 1 go to rank 0, which holds them.
  auto p2 = PlaceOverLive(*p, {true, false, false, true});
  ASSERT_OK(p2);
  EXPECT_EQ(loads(*p, *p2), 2);
  for (int64_t e = 0; e < 8; ++e) EXPECT_EQ(p2->replicas(e).size(), 2u) << e;
  EXPECT_EQ(p2->num_slots(), full->num_slots());
  // Without replicas: each lost expert is loaded once, by the survivor with the fewest slots.
  auto none = topology::ExpertPlacement::Create(8, {{0, 1}, {2, 3}, {4, 5}, {6, 7}});
  ASSERT_OK(none);
  auto q = PlaceOverLive(*none, {true, true, false, true});
  ASSERT_OK(q);
  EXPECT_EQ(loads(*none, *q), 2);
  EXPECT_TRUE(q->slots_of_rank(2).empty());
  EXPECT_EQ(q->replicas(4).size(), 1u);
  EXPECT_NE(q->ReplicaRank(4, 0), q->ReplicaRank(5, 0));  // spread over the fewest-slot ranks
  // Partial replicas: expert 2 has a copy on rank 0, expert 3 none: one load.
  auto some = topology::ExpertPlacement::Create(8, {{0, 1, 2}, {2, 3, 4}, {5, 6, 7}});
  ASSERT_OK(some);
  auto s = PlaceOverLive(*some, {true, false, true});
  ASSERT_OK(s);
  EXPECT_EQ(loads(*some, *s), 2);  // 3 and 4 have no live copy; 2 is held by rank 0 already
  EXPECT_EQ(std::count(s->slots_of_rank(0).begin(), s->slots_of_rank(0).end(), 2), 2);
  // Rank 1 back: it takes its share from the fullest ranks.
  auto back = PlaceOverLive(*p, {true, true, true, true});
  ASSERT_OK(back);
  EXPECT_GE(back->slots_of_rank(1).size(), 3u);
  EXPECT_EQ(back->num_slots(), full->num_slots());
  // No live rank: refused.
  EXPECT_FALSE(PlaceOverLive(*none, {false, false, false, false}).ok());
}

TEST_F(RebalanceTest, CommitsWhenEveryWorkerStagedAndEveryAnswerSaysSo) {
  Start(Options(2, 2));
  RegisterAll();
  const v1::Plan before = c_->plan_proto();
  EXPECT_EQ(before.placement_version(), 1);
  EXPECT_ERROR(Rebalance().status(), absl::StatusCode::kFailedPrecondition, "no expert load observed");
  std::map<int, std::vector<double>> skew;
  for (int layer = 1; layer <= 3; ++layer) skew[layer] = Doubles(Load(layer, 1000, 10));
  ReportSkewedLoad();
  v1::ClusterStatus st = c_->GetClusterStatus();
  EXPECT_GT(st.rebalance().window_imbalance(), 1.5);  // the 16 hot experts all on rank 0
  EXPECT_EQ(st.rebalance().window_tokens(), (16 * 1000 + 240 * 10) / 8);

  auto r = Rebalance();
  ASSERT_OK(r);
  ASSERT_TRUE(r->started()) << r->reason();
  EXPECT_EQ(r->pending_version(), 2);
  EXPECT_NEAR(r->imbalance_before(), st.rebalance().window_imbalance(), 1e-12);
  EXPECT_LT(r->imbalance_after(), 1.02);
  EXPECT_GT(r->experts_to_load(), 0);
  EXPECT_ERROR(Rebalance().status(), absl::StatusCode::kFailedPrecondition, "still being loaded (0 of 4 workers");

  // Every worker is sent the pending plan until it reports it staged; nothing is committed before all did.
  v1::HeartbeatResponse hb = Beat(0, 1, 0);
  EXPECT_EQ(hb.placement_version(), 1);
  EXPECT_EQ(hb.next_placement_version(), 2);
  ASSERT_TRUE(hb.has_next_plan());
  const v1::Plan next = hb.next_plan();
  EXPECT_EQ(next.placement_version(), 2);
  auto next_plan = PlanFromProto(next);
  ASSERT_OK(next_plan);
  // Balanced, and the experts a rank must load are counted (ranks keep what they can:
  // fewer than EPLB's own numbering of the ranks would need).
  auto old_plan = PlanFromProto(before);
  ASSERT_TRUE(old_plan.ok());
  int64_t to_load = 0, unnumbered = 0;
  for (size_t s = 0; s < next_plan->stages.size(); ++s) {
    for (const auto& [layer, p] : next_plan->stages[s].placement) {
      const std::vector<double>& load = skew[static_cast<int>(layer)];
      EXPECT_LT(topology::ImbalanceFactor(p, load), 1.02) << "layer " << layer;
      const topology::ExpertPlacement& was = old_plan->stages[s].placement.at(layer);
      auto eplb = topology::RebalanceExperts({load}, {.num_ranks = 2, .ranks_per_node = 2, .num_groups = 8});
      ASSERT_TRUE(eplb.ok());
      for (int64_t rank = 0; rank < 2; ++rank) {
        const std::set<int32_t> had(was.slots_of_rank(rank).begin(), was.slots_of_rank(rank).end());
        for (int32_t e : p.slots_of_rank(rank)) to_load += had.count(e) ? 0 : 1;
        for (int32_t e : (*eplb)[0].slots_of_rank(rank)) unnumbered += had.count(e) ? 0 : 1;
      }
    }
  }
  EXPECT_EQ(r->experts_to_load(), to_load);
  EXPECT_LE(to_load, unnumbered);
  for (int id = 0; id < 3; ++id) {
    hb = Beat(id, 1, 2);
    EXPECT_FALSE(hb.has_next_plan()) << "worker " << id << " staged it already";
    EXPECT_EQ(hb.next_placement_version(), 2);
  }
  st = c_->GetClusterStatus();
  EXPECT_EQ(st.rebalance().pending_version(), 2);
  EXPECT_EQ(st.rebalance().workers_staged(), 3);
  EXPECT_EQ(st.plan().placement_version(), 1);
  v1::SyncRequest sync;
  sync.set_worker_id(0);
  sync.set_host("fakehost");  // as registered by RegisterPlaces
  sync.set_pid(100);
  sync.set_epoch(c_->epoch());
  sync.set_generation(1);
  EXPECT_EQ(c_->Sync(sync)->placement_version(), 1);

  hb = Beat(3, 1, 2);  // the last one: committed
  EXPECT_EQ(hb.placement_version(), 2);
  EXPECT_EQ(hb.next_placement_version(), 0);
  EXPECT_FALSE(hb.has_next_plan());
  EXPECT_EQ(c_->Sync(sync)->placement_version(), 2);
  st = c_->GetClusterStatus();
  EXPECT_EQ(st.plan().placement_version(), 2);
  EXPECT_EQ(PlacementOf(st.plan(), 1, 2), PlacementOf(next, 1, 2));
  EXPECT_NE(PlacementOf(st.plan(), 1, 2), PlacementOf(before, 1, 2));
  EXPECT_EQ(st.rebalance().placement_version(), 2);
  EXPECT_EQ(st.rebalance().pending_version(), 0);
  EXPECT_EQ(st.rebalance().rebalances(), 1);
  EXPECT_NEAR(st.rebalance().imbalance_after(), r->imbalance_after(), 1e-12);
  EXPECT_EQ(st.rebalance().window_tokens(), 0);  // a new observation window
  EXPECT_GT(st.rebalance().last_unix_ms(), 0);
  EXPECT_ERROR(Rebalance().status(), absl::StatusCode::kFailedPrecondition, "no expert load observed");
  // The load since start is kept for `status`.
  EXPECT_EQ(Doubles(st.expert_load(0)), skew[1]);

  // A restarted coordinator serves the committed placement (the workers run it).
  Start(Options(2, 2));
  EXPECT_EQ(c_->plan_proto().placement_version(), 2);
  EXPECT_EQ(PlacementOf(c_->plan_proto(), 0, 1), PlacementOf(next, 0, 1));
  EXPECT_EQ(c_->plan(), *next_plan);
  // ... also after a journal compaction.
  CoordinatorOptions o = Options(2, 2);
  o.journal_compact_min_waste_bytes = 0;
  o.job_retention_s = 0.001;
  v1::SubmitJobRequest big;
  for (int i = 0; i < 300; ++i) {
    v1::SequenceRequest* s = big.add_sequences();
    for (int t = 0; t < 60; ++t) s->add_tokens(t);
    s->set_max_new_tokens(1);
  }
  auto job = c_->SubmitJob(big);
  ASSERT_OK(job);
  ASSERT_TRUE(c_->CancelJob(job->job_id()).ok());
  absl::SleepFor(absl::Milliseconds(20));
  Start(o);  // forgets the cancelled job and compacts
  EXPECT_EQ(c_->journal_stats().compactions, 1);
  Start(Options(2, 2));
  EXPECT_EQ(c_->plan_proto().placement_version(), 2);
  EXPECT_EQ(c_->plan(), *next_plan);
}

TEST_F(RebalanceTest, ThresholdsDecideUnlessForced) {
  CoordinatorOptions o = Options(1, 2);
  o.eplb_min_tokens = 1000000;
  Start(o);
  RegisterAll();
  Beat(0, 1, 0, "", {Load(1, 20, 20), Load(2, 20, 20), Load(3, 20, 20)});  // uniform, 640 tokens per layer
  auto r = Rebalance();
  ASSERT_OK(r);
  EXPECT_FALSE(r->started());
  EXPECT_NE(r->reason().find("640 routed tokens per MoE layer"), std::string::npos) << r->reason();
  EXPECT_NE(r->reason().find("--eplb-min-tokens 1000000"), std::string::npos) << r->reason();
  // Enough tokens, but a uniform load gains nothing.
  o.eplb_min_tokens = 100;
  Start(o);
  RegisterAll();
  Beat(0, 1, 0, "", {Load(1, 20, 20), Load(2, 20, 20), Load(3, 20, 20)});
  r = Rebalance();
  ASSERT_OK(r);
  EXPECT_FALSE(r->started());
  EXPECT_NEAR(r->imbalance_before(), 1.0, 1e-9);
  EXPECT_TRUE(r->reason().find("--eplb-min-gain") != std::string::npos ||
              r->reason().find("is the one in use") != std::string::npos)
      << r->reason();
  EXPECT_EQ(c_->GetClusterStatus().rebalance().pending_version(), 0);
}

TEST_F(RebalanceTest, StagingErrorOrANewGenerationDropsThePendingPlacement) {
  Start(Options(1, 2, 2));
  RegisterAll();
  ReportSkewedLoad();
  auto r = Rebalance();
  ASSERT_TRUE(r.ok() && r->started()) << r.status() << (r.ok() ? r->reason() : "");
  Beat(0, 1, 2);
  v1::HeartbeatResponse hb = Beat(1, 1, 0, "no space left on device");
  EXPECT_EQ(hb.next_placement_version(), 0);
  EXPECT_EQ(hb.placement_version(), 1);
  v1::ClusterStatus st = c_->GetClusterStatus();
  EXPECT_EQ(st.rebalance().pending_version(), 0);
  EXPECT_EQ(st.rebalance().placement_version(), 1);
  EXPECT_NE(st.rebalance().last_error().find("worker 1 could not load it: no space left on device"),
            std::string::npos)
      << st.rebalance().last_error();
  // The observed load is still there: a new attempt gets a new version number (worker 0
  // still holds what it staged for version 2).
  r = Rebalance();
  ASSERT_TRUE(r.ok() && r->started()) << r.status();
  EXPECT_EQ(r->pending_version(), 3);
  hb = Beat(0, 1, 2);
  EXPECT_EQ(hb.next_placement_version(), 3);
  EXPECT_TRUE(hb.has_next_plan()) << "version 2 is not version 3";
  // A worker exits unasked: new data-plane generation, the pending placement goes.
  Beat(1, 1, 0, "", {}, /*exiting=*/true);
  st = c_->GetClusterStatus();
  EXPECT_EQ(st.generation(), 2);
  EXPECT_EQ(st.rebalance().pending_version(), 0);
  EXPECT_NE(st.rebalance().last_error().find("data-plane generation 2"), std::string::npos)
      << st.rebalance().last_error();
  EXPECT_ERROR(Rebalance().status(), absl::StatusCode::kFailedPrecondition, "not serving");
}

TEST_F(RebalanceTest, ClustersThatCannotRebalanceSaySo) {
  Start(Options(2, 1));
  RegisterAll();
  EXPECT_ERROR(Rebalance().status(), absl::StatusCode::kFailedPrecondition, "--ep > 1");
  Start(Options(1, 2, 1));
  RegisterAll();
  EXPECT_ERROR(Rebalance().status(), absl::StatusCode::kFailedPrecondition, "(256 + 1) divisible by --ep 2");
}

// Journals written before the plan became a message hold a committed
// placement as JSON text (PlacementCommitted.plan_json): a restarted
// coordinator still serves it, and journals it as a v1.Plan from then on.
TEST_F(RebalanceTest, ReplaysAPlacementJournaledAsJson) {
  const CoordinatorOptions o = Options(2, 2);
  Start(o);
  topology::Plan ran = c_->plan();
  topology::ExpertPlacement& p2 = ran.stages[1].placement.at(2);
  ASSERT_OK_AND_ASSIGN(topology::ExpertPlacement swapped,
                       topology::ExpertPlacement::Create(p2.num_experts(), {p2.slots_of_rank(1), p2.slots_of_rank(0)}));
  p2 = swapped;
  ASSERT_NE(c_->plan(), ran);
  c_.reset();
  {
    std::vector<std::string> records;
    ASSERT_OK_AND_ASSIGN(auto journal, Journal::Open(o.journal_path, &records));
    JournalRecord rec;
    rec.set_unix_ms(absl::ToUnixMillis(absl::Now()));
    rec.mutable_placement()->set_version(3);
    rec.mutable_placement()->set_plan_json(ran.ToJson().dump());  // the old encoding
    ASSERT_OK(journal->Append({rec.SerializeAsString()}));
  }
  Start(o);
  EXPECT_EQ(c_->plan_proto().placement_version(), 3);
  EXPECT_EQ(c_->plan(), ran);
  EXPECT_EQ(PlacementOf(c_->plan_proto(), 1, 2), swapped);

  // A compaction rewrites the placement record as a message; the next start reads that.
  v1::SubmitJobRequest big;  // a forgotten job makes the next start compact
  for (int i = 0; i < 300; ++i) {
    v1::SequenceRequest* s = big.add_sequences();
    for (int t = 0; t < 60; ++t) s->add_tokens(t);
    s->set_max_new_tokens(1);
  }
  ASSERT_OK_AND_ASSIGN(v1::SubmitJobResponse job, c_->SubmitJob(big));
  ASSERT_OK(c_->CancelJob(job.job_id()));
  absl::SleepFor(absl::Milliseconds(20));
  CoordinatorOptions compacting = o;
  compacting.journal_compact_min_waste_bytes = 0;
  compacting.job_retention_s = 0.001;
  Start(compacting);
  EXPECT_EQ(c_->journal_stats().compactions, 1);
  c_.reset();
  {
    std::vector<std::string> records;
    ASSERT_OK_AND_ASSIGN(auto journal, Journal::Open(o.journal_path, &records));
    int placements = 0;
    for (const std::string& bytes : records) {
      JournalRecord rec;
      ASSERT_TRUE(rec.ParseFromString(bytes));
      if (!rec.has_placement()) continue;
      ++placements;
      EXPECT_TRUE(rec.placement().plan_json().empty());
      EXPECT_TRUE(rec.placement().has_plan());
      ASSERT_OK_AND_ASSIGN(topology::Plan journaled, PlanFromProto(rec.placement().plan()));
      EXPECT_EQ(journaled, ran);
    }
    EXPECT_EQ(placements, 1);
  }
  Start(o);
  EXPECT_EQ(c_->plan_proto().placement_version(), 3);
  EXPECT_EQ(c_->plan(), ran);
}

TEST_F(RebalanceTest, ACoordinatorRestartedWithoutItsJournalAdoptsThePlacementTheWorkersRun) {
  CoordinatorOptions o = Options(2, 2);
  o.journal_path.clear();
  Start(o);
  // The workers run placement version 3: layer 2's two ranks swapped.
  topology::Plan ran = c_->plan();
  topology::ExpertPlacement& p2 = ran.stages[1].placement.at(2);
  auto swapped = topology::ExpertPlacement::Create(p2.num_experts(), {p2.slots_of_rank(1), p2.slots_of_rank(0)});
  ASSERT_TRUE(swapped.ok());
  p2 = *swapped;
  const v1::Plan running = PlanToProto(ran, o.checkpoint, c_->plan_proto().model_json(), /*placement_version=*/3);
  std::vector<v1::RegisterResponse> regs;
  RegisterPlaces(c_.get(), &running, &regs);
  EXPECT_EQ(c_->plan_proto().placement_version(), 3);
  EXPECT_EQ(c_->plan(), ran);
  for (const auto& r : regs) {
    EXPECT_EQ(r.plan().placement_version(), 3);
    EXPECT_EQ(PlacementOf(r.plan(), 1, 2), PlacementOf(running, 1, 2));
  }
  // The next rebalance gets a newer number.
  for (int i = 0; i < 4; ++i) Beat(i, 3, 0);
  ReportSkewedLoad();
  auto r = Rebalance(/*force=*/true);
  ASSERT_TRUE(r.ok() && r->started()) << r.status();
  EXPECT_EQ(r->pending_version(), 4);

  // A plan of another shape (another layer split) is not adopted; nor is anything
  // by a coordinator that has rebalanced itself.
  Start(o);
  auto other = topology::BuildPlan(c_->config(), {.pp = 2, .ep = 2, .layers_per_stage = {1, 3}});
  ASSERT_OK(other);
  const v1::Plan other_proto = PlanToProto(*other, o.checkpoint, c_->plan_proto().model_json(), 5);
  RegisterPlaces(c_.get(), &other_proto, &regs);
  EXPECT_EQ(c_->plan_proto().placement_version(), 1);

  // With a journal, an adopted placement is journaled: a later restart serves it.
  Start(Options(2, 2));
  RegisterPlaces(c_.get(), &running, &regs);
  EXPECT_EQ(c_->plan_proto().placement_version(), 3);
  Start(Options(2, 2));
  EXPECT_EQ(c_->plan_proto().placement_version(), 3);
  EXPECT_EQ(c_->plan(), ran);
}

TEST_F(RebalanceTest, AutomaticRebalanceStartsAfterTheInterval) {
  CoordinatorOptions o = Options(1, 2);
  o.eplb_interval_s = 0.2;
  Start(o);
  RegisterAll();
  EXPECT_EQ(c_->GetClusterStatus().rebalance().interval_s(), 0.2);
  ReportSkewedLoad();
  // The monitor's Tick tries every interval (timing-tolerant: up to 10 s).
  for (int i = 0; i < 200 && c_->GetClusterStatus().rebalance().pending_version() == 0; ++i) {
    absl::SleepFor(absl::Milliseconds(50));
    c_->Tick();
  }
  EXPECT_EQ(c_->GetClusterStatus().rebalance().pending_version(), 2);
}

}  // namespace
}  // namespace expertmesh::coordinator
