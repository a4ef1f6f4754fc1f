// The stage-0 scheduler of a lane against a fake coordinator: continuous
// batching (micro-batch size, prefill then decode, chunked prefill under a
// token budget, resuming after tokens generated elsewhere), finishing, cancelling,
// epoch and generation changes, an unreachable coordinator.
#include "worker/runtime/scheduler.h"

#include <atomic>

#include "gtest/gtest.h"
#include "tests/worker/fake_coordinator.h"

namespace expertmesh::worker::runtime {
namespace {

using testing::FakeCoordinator;
using testing::RecordingCommFactory;

v1::SequenceAssignment Assign(const std::string& id, std::vector<int32_t> prompt, int max_new,
                              std::vector<int32_t> stop = {}) {
  v1::SequenceAssignment a;
  a.set_seq_id(id);
  for (int32_t t : prompt) a.mutable_request()->add_tokens(t);
  a.mutable_request()->set_max_new_tokens(max_new);
  for (int32_t t : stop) a.mutable_request()->add_stop_token_ids(t);
  a.mutable_request()->mutable_sampling()->set_seed(9);
  return a;
}

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override { Make(/*pp=*/2); }
  void Make(int64_t pp, int64_t max_step_tokens = 2048) {
    cfg_ = *ModelConfig::Preset("tiny");
    dp_ = std::make_unique<DataPlane>(&factory_, DataPlane::Options{}, pp, 1, 0, 0, 0);
    dp_->SetGeneration("e1", 1, false);
    Scheduler::Options o;
    o.worker_id = 0;
    o.pp = pp;
    o.max_sequences = 8;
    o.max_step_tokens = max_step_tokens;
    o.coordinator_timeout = absl::Milliseconds(200);
    sched_ = std::make_unique<Scheduler>(o, &fake_, dp_.get(), &shutdown_, &cfg_, [] { return StageCache(); });
    sched_->SetEpoch("e1", 1);
  }
  v1::SyncResponse Ok() {
    v1::SyncResponse r;
    r.set_epoch("e1");
    r.set_generation(1);
    r.set_placement_version(1);
    return r;
  }
  absl::Status Sync() { return sched_->Sync(&want_stop_); }
  // Builds a micro-batch and returns its keys.
  std::vector<uint64_t> Build(MicroBatch* mb) {
    std::vector<StepSegment> segs;
    sched_->BuildMicroBatch(mb, &segs);
    EXPECT_EQ(segs.size(), mb->segments.size());
    std::vector<uint64_t> keys;
    int64_t off = 0;
    for (size_t i = 0; i < segs.size(); ++i) {
      EXPECT_EQ(segs[i].n, mb->segments[i].n);
      EXPECT_EQ(segs[i].tokens, mb->tokens.data() + off);
      off += segs[i].n;
      keys.push_back(mb->segments[i].key);
    }
    EXPECT_EQ(off, static_cast<int64_t>(mb->tokens.size()));
    return keys;
  }
  // One stage: `assign` arrive in one Sync, go into one micro-batch, and
  // `tokens` (one per sequence, in batch order) come back from it. The keys.
  std::vector<uint64_t> StepOnce(const std::vector<v1::SequenceAssignment>& assign, std::vector<int32_t> tokens) {
    v1::SyncResponse r = Ok();
    for (const auto& a : assign) *r.add_assign() = a;
    Make(1);
    fake_.AnswerSync(r);
    EXPECT_OK(Sync());
    MicroBatch mb;
    Return ret;
    ret.keys = Build(&mb);
    EXPECT_EQ(ret.keys.size(), tokens.size());
    ret.tokens = std::move(tokens);
    sched_->ApplyReturn(ret);
    return ret.keys;
  }
  Return Tokens(const std::vector<uint64_t>& keys, int32_t token) {
    Return r;
    r.keys = keys;
    r.tokens.assign(keys.size(), token);
    return r;
  }

  ModelConfig cfg_;
  FakeCoordinator fake_;
  RecordingCommFactory factory_;
  std::unique_ptr<DataPlane> dp_;
  std::atomic<bool> shutdown_{false};
  std::unique_ptr<Scheduler> sched_;
  bool want_stop_ = false;
};

TEST_F(SchedulerTest, MicroBatchesHoldAFractionOfTheLaneThenDecode) {
  v1::SyncResponse r = Ok();
  *r.add_assign() = Assign("j/0", {1, 2, 3}, 4);
  *r.add_assign() = Assign("j/1", {4, 5}, 4);
  *r.add_assign() = Assign("j/2", {6}, 4);
  fake_.AnswerSync(r);
  ASSERT_OK(Sync());
  EXPECT_EQ(sched_->size(), 3);
  EXPECT_EQ(fake_.syncs()[0].free_slots(), 8);
  EXPECT_EQ(fake_.syncs()[0].epoch(), "e1");
  EXPECT_EQ(fake_.syncs()[0].generation(), 1);
  // pp = 2: ceil(3 / 2) = 2 sequences per micro-batch, prefill segments first.
  MicroBatch a, b, c;
  const auto ka = Build(&a);
  ASSERT_EQ(ka.size(), 2u);
  EXPECT_EQ(a.tokens, (std::vector<int32_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(a.segments[0].start, 0);
  EXPECT_EQ(a.segments[0].seed, 9u);
  EXPECT_EQ(a.segments[0].step, 0u);
  const auto kb = Build(&b);  // the in-flight ones are skipped
  ASSERT_EQ(kb.size(), 1u);
  EXPECT_EQ(b.tokens, (std::vector<int32_t>{6}));
  EXPECT_TRUE(Build(&c).empty());  // everything in flight
  sched_->ApplyReturn(Tokens(ka, 100));
  MicroBatch d;
  const auto kd = Build(&d);  // decode: one token each, the sampled one
  ASSERT_EQ(kd, ka);
  EXPECT_EQ(d.tokens, (std::vector<int32_t>{100, 100}));
  EXPECT_EQ(d.segments[0].n, 1);
  EXPECT_EQ(d.segments[0].step, 1u);
  // The tokens go to the coordinator with the next Sync.
  EXPECT_EQ(sched_->pending_updates().size(), 2u);
  fake_.AnswerSync(Ok());
  ASSERT_OK(Sync());
  ASSERT_EQ(fake_.syncs()[1].updates_size(), 2);
  EXPECT_EQ(fake_.syncs()[1].updates(0).new_tokens(0), 100);
  EXPECT_EQ(fake_.syncs()[1].free_slots(), 5);
  EXPECT_TRUE(sched_->pending_updates().empty());
}

TEST_F(SchedulerTest, StopTokenAndLengthFinishAndReleaseTheCache) {
  // j/0 emits its stop token; j/1 reaches max_new_tokens = 1.
  const auto keys = StepOnce({Assign("j/0", {1}, 5, {42}), Assign("j/1", {2}, 1)}, {42, 7});
  ASSERT_EQ(keys.size(), 2u);
  EXPECT_TRUE(sched_->empty());
  const auto released = sched_->TakeReleases();
  EXPECT_EQ(released, keys);
  const auto& u = sched_->pending_updates();
  ASSERT_EQ(u.size(), 2u);
  EXPECT_EQ(u[0].finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(u[1].finish_reason(), v1::FINISH_REASON_LENGTH);
}

// Issue 15: the last stage marks a key whose logits row was not finite;
// that sequence fails (ERROR, naming the step), the other one goes on.
TEST_F(SchedulerTest, NonFiniteLogitsFailTheSequenceWithAnError) {
  const auto keys = StepOnce({Assign("j/0", {1, 2}, 8), Assign("j/1", {3}, 8)}, {kNonFiniteLogitsToken, 7});
  ASSERT_EQ(keys.size(), 2u);
  EXPECT_EQ(sched_->TakeReleases(), std::vector<uint64_t>{keys[0]});
  const auto& u = sched_->pending_updates();
  ASSERT_EQ(u.size(), 2u);
  EXPECT_EQ(u[0].seq_id(), "j/0");
  EXPECT_EQ(u[0].finish_reason(), v1::FINISH_REASON_ERROR);
  EXPECT_EQ(u[0].new_tokens_size(), 0);
  EXPECT_NE(u[0].error().find("step 0: the model's logits are not finite"), std::string::npos) << u[0].error();
  EXPECT_EQ(u[1].seq_id(), "j/1");
  EXPECT_EQ(u[1].finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
  EXPECT_FALSE(sched_->empty());
}

TEST_F(SchedulerTest, CancelledInFlightIsDroppedWhenItsTokenReturns) {
  v1::SyncResponse r = Ok();
  *r.add_assign() = Assign("j/0", {1, 2}, 8);
  fake_.AnswerSync(r);
  ASSERT_OK(Sync());
  MicroBatch mb;
  const auto keys = Build(&mb);
  ASSERT_EQ(keys.size(), 1u);
  v1::SyncResponse c = Ok();
  c.add_cancel("j/0");
  fake_.AnswerSync(c);
  ASSERT_OK(Sync());
  ASSERT_EQ(sched_->pending_updates().size(), 1u);
  EXPECT_EQ(sched_->pending_updates()[0].finish_reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_TRUE(sched_->TakeReleases().empty());  // still in flight: the stages hold its cache
  MicroBatch none;
  EXPECT_TRUE(Build(&none).empty());
  sched_->ApplyReturn(Tokens(keys, 5));
  EXPECT_TRUE(sched_->empty());
  EXPECT_EQ(sched_->TakeReleases(), keys);
  EXPECT_EQ(sched_->pending_updates().size(), 1u);  // no token for a cancelled sequence
}

TEST_F(SchedulerTest, NewCoordinatorEpochDropsEverySequence) {
  v1::SyncResponse r = Ok();
  *r.add_assign() = Assign("j/0", {1}, 8);
  *r.add_assign() = Assign("j/1", {2}, 8);
  fake_.AnswerSync(r);
  ASSERT_OK(Sync());
  MicroBatch mb;
  Build(&mb);
  v1::SyncResponse e = Ok();
  e.set_epoch("e2");
  *e.add_assign() = Assign("j/9", {3}, 8);  // not taken: it belongs to the new epoch's next Sync
  fake_.AnswerSync(e);
  ASSERT_OK(Sync());
  EXPECT_EQ(sched_->epoch(), "e2");
  EXPECT_TRUE(sched_->pending_updates().empty());  // the restarted coordinator requeued them
  sched_->ApplyReturn(Tokens({mb.segments[0].key}, 1));  // the in-flight one comes back
  EXPECT_TRUE(sched_->empty());
  EXPECT_EQ(sched_->TakeReleases().size(), 2u);
}

TEST_F(SchedulerTest, GenerationMovedOnOurCoordinatorAbortsTheStep) {
  v1::SyncResponse g = Ok();
  g.set_generation(2);
  *g.add_assign() = Assign("j/0", {1}, 8);
  fake_.AnswerSync(g);
  EXPECT_EQ(Sync().code(), absl::StatusCode::kAborted);
  EXPECT_TRUE(sched_->empty());
  // Ours is another epoch's data plane (the coordinator restarted): wait for
  // the heartbeat thread's re-registration instead.
  sched_->SetEpoch("e2", 1);
  v1::SyncResponse other = Ok();
  other.set_epoch("e2");
  other.set_generation(4);
  fake_.AnswerSync(other);
  ASSERT_OK(Sync());
  EXPECT_EQ(fake_.syncs().back().epoch(), "e2");
}

TEST_F(SchedulerTest, CommittedPlacementAndShutdownComeWithSync) {
  v1::SyncResponse r = Ok();
  r.set_placement_version(3);
  r.set_shutdown(true);
  fake_.AnswerSync(r);
  ASSERT_OK(Sync());
  EXPECT_EQ(sched_->committed_placement(), 3);
  EXPECT_TRUE(want_stop_);
  EXPECT_TRUE(shutdown_.load());
}

TEST_F(SchedulerTest, UnreachableCoordinatorKeepsUpdatesThenGivesUp) {
  v1::SyncResponse r = Ok();
  *r.add_assign() = Assign("j/0", {1}, 8);
  fake_.AnswerSync(r);
  ASSERT_OK(Sync());
  sched_->ResetSyncClock();
  MicroBatch mb;
  sched_->ApplyReturn(Tokens(Build(&mb), 3));
  ASSERT_OK(Sync());  // unavailable, within the timeout: retried later
  EXPECT_EQ(sched_->pending_updates().size(), 1u);
  absl::SleepFor(absl::Milliseconds(250));
  const absl::Status s = Sync();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("unreachable"), std::string::npos) << s;
  EXPECT_EQ(fake_.syncs().back().updates_size(), 1);  // the kept update was offered each time
}

TEST_F(SchedulerTest, InvalidPromptIsRejectedWithoutBeingScheduled) {
  v1::SyncResponse r = Ok();
  *r.add_assign() = Assign("j/bad", {1, 1 << 20}, 4);  // id beyond the vocabulary
  *r.add_assign() = Assign("j/good", {1}, 4);
  fake_.AnswerSync(r);
  ASSERT_OK(Sync());
  EXPECT_EQ(sched_->size(), 1);
  ASSERT_EQ(sched_->pending_updates().size(), 1u);
  EXPECT_EQ(sched_->pending_updates()[0].seq_id(), "j/bad");
  EXPECT_EQ(sched_->pending_updates()[0].finish_reason(), v1::FINISH_REASON_CANCELLED);
}

TEST_F(SchedulerTest, DropAllForgetsEverything) {
  v1::SyncResponse r = Ok();
  *r.add_assign() = Assign("j/0", {1}, 1);
  fake_.AnswerSync(r);
  ASSERT_OK(Sync());
  MicroBatch mb;
  sched_->ApplyReturn(Tokens(Build(&mb), 3));
  sched_->DropAll();
  EXPECT_TRUE(sched_->empty());
  EXPECT_TRUE(sched_->TakeReleases().empty());
  EXPECT_TRUE(sched_->pending_updates().empty());
}

// Issue 15: a micro-batch holds at most max_step_tokens tokens, decode
// tokens first, then prefill chunks (oldest first); only a prompt's last
// chunk samples, and its token is the sequence's first.
TEST_F(SchedulerTest, ChunkedPrefillKeepsToTheTokenBudgetDecodeFirst) {
  Make(/*pp=*/1, /*max_step_tokens=*/4);
  v1::SyncResponse r = Ok();
  *r.add_assign() = Assign("j/0", {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 4);
  *r.add_assign() = Assign("j/1", {11, 12, 13}, 4);
  fake_.AnswerSync(r);
  ASSERT_OK(Sync());
  MicroBatch a;
  auto ka = Build(&a);  // j/0's first chunk takes the whole budget
  ASSERT_EQ(ka.size(), 1u);
  EXPECT_EQ(a.tokens, (std::vector<int32_t>{1, 2, 3, 4}));
  EXPECT_EQ(a.segments[0].start, 0);
  EXPECT_EQ(a.segments[0].sample, 0u);
  sched_->ApplyReturn(Tokens(ka, 0));
  EXPECT_TRUE(sched_->pending_updates().empty());  // no token from a chunk before the last
  MicroBatch b;
  auto kb = Build(&b);
  ASSERT_EQ(kb, ka);
  EXPECT_EQ(b.tokens, (std::vector<int32_t>{5, 6, 7, 8}));
  EXPECT_EQ(b.segments[0].start, 4);
  sched_->ApplyReturn(Tokens(kb, 0));
  MicroBatch c;  // j/0's last 2 tokens (sampled), then 2 of j/1's 3
  auto kc = Build(&c);
  ASSERT_EQ(kc.size(), 2u);
  EXPECT_EQ(c.tokens, (std::vector<int32_t>{9, 10, 11, 12}));
  EXPECT_EQ(c.segments[0].start, 8);
  EXPECT_EQ(c.segments[0].sample, 1u);
  EXPECT_EQ(c.segments[0].step, 0u);
  EXPECT_EQ(c.segments[1].start, 0);
  EXPECT_EQ(c.segments[1].sample, 0u);
  Return rc;
  rc.keys = kc;
  rc.tokens = {50, 0};
  sched_->ApplyReturn(rc);
  ASSERT_EQ(sched_->pending_updates().size(), 1u);
  EXPECT_EQ(sched_->pending_updates()[0].seq_id(), "j/0");
  EXPECT_EQ(sched_->pending_updates()[0].new_tokens(0), 50);
  MicroBatch d;  // decode first: j/0's token, then j/1's last prompt token
  auto kd = Build(&d);
  ASSERT_EQ(kd, kc);
  EXPECT_EQ(d.tokens, (std::vector<int32_t>{50, 13}));
  EXPECT_EQ(d.segments[0].start, 10);
  EXPECT_EQ(d.segments[0].step, 1u);
  EXPECT_EQ(d.segments[1].start, 2);
  EXPECT_EQ(d.segments[1].sample, 1u);
  rc.tokens = {51, 60};
  sched_->ApplyReturn(rc);
  ASSERT_EQ(sched_->pending_updates().size(), 3u);
  EXPECT_EQ(sched_->pending_updates()[2].seq_id(), "j/1");
  EXPECT_EQ(sched_->pending_updates()[2].new_tokens(0), 60);
}

// Issue 15: a sequence cancelled in the middle of its prefill is dropped
// when the chunk in flight comes back; no further chunk is scheduled.
TEST_F(SchedulerTest, CancelMidPrefillTakesEffectAtTheNextStep) {
  Make(/*pp=*/1, /*max_step_tokens=*/2);
  v1::SyncResponse r = Ok();
  std::vector<int32_t> prompt(100, 3);
  *r.add_assign() = Assign("j/0", prompt, 4);
  fake_.AnswerSync(r);
  ASSERT_OK(Sync());
  MicroBatch a;
  const auto ka = Build(&a);
  ASSERT_EQ(ka.size(), 1u);
  EXPECT_EQ(a.segments[0].n, 2);
  v1::SyncResponse c = Ok();
  c.add_cancel("j/0");
  fake_.AnswerSync(c);
  ASSERT_OK(Sync());
  sched_->ApplyReturn(Tokens(ka, 0));
  EXPECT_TRUE(sched_->empty());
  EXPECT_EQ(sched_->TakeReleases(), ka);
  MicroBatch none;
  EXPECT_TRUE(Build(&none).empty());
}

// Issue 15: an assignment with tokens generated on a lost worker prefills
// prompt + those tokens, samples at the step after them, and reports only
// the new tokens; max_new_tokens counts the resumed ones.
TEST_F(SchedulerTest, ResumeAfterGeneratedTokensContinuesAtTheirStep) {
  Make(/*pp=*/1);
  v1::SyncResponse r = Ok();
  v1::SequenceAssignment a = Assign("j/0", {1, 2, 3}, 4);
  a.add_resume_tokens(7);
  a.add_resume_tokens(8);
  *r.add_assign() = a;
  fake_.AnswerSync(r);
  ASSERT_OK(Sync());
  MicroBatch mb;
  const auto k = Build(&mb);
  ASSERT_EQ(k.size(), 1u);
  EXPECT_EQ(mb.tokens, (std::vector<int32_t>{1, 2, 3, 7, 8}));
  EXPECT_EQ(mb.segments[0].step, 2u);
  EXPECT_EQ(mb.segments[0].sample, 1u);
  sched_->ApplyReturn(Tokens(k, 9));
  MicroBatch d;
  ASSERT_EQ(Build(&d), k);
  EXPECT_EQ(d.tokens, (std::vector<int32_t>{9}));
  EXPECT_EQ(d.segments[0].start, 5);
  EXPECT_EQ(d.segments[0].step, 3u);
  sched_->ApplyReturn(Tokens(k, 10));
  EXPECT_TRUE(sched_->empty());  // 2 resumed + 2 new = max_new_tokens
  const auto& u = sched_->pending_updates();
  ASSERT_EQ(u.size(), 2u);
  EXPECT_EQ(u[0].new_tokens_size(), 1);
  EXPECT_EQ(u[0].new_tokens(0), 9);
  EXPECT_EQ(u[1].new_tokens(0), 10);
  EXPECT_EQ(u[1].finish_reason(), v1::FINISH_REASON_LENGTH);
}

}  // namespace
}  // namespace expertmesh::worker::runtime
