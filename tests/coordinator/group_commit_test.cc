// The journal's group commit (coordinator/journal.h): concurrent appends are
// all durable and in ticket order after replay, no append is acknowledged
// before its batch's fdatasync (a slow-disk hook holds it), and a compaction
// running concurrently with appends loses nothing. Then the same through the
// Coordinator: concurrent SubmitJob calls with compactions under way, every
// acknowledged job present after a restart on the journal.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "coordinator/coordinator.h"
#include "coordinator/journal.h"
#include "gtest/gtest.h"
#include "tests/coordinator/test_util.h"

namespace expertmesh::coordinator {
namespace {

using testing::TempDir;

std::vector<std::string> Replay(const std::string& path) {
  std::vector<std::string> records;
  auto j = Journal::Open(path, &records);
  EXPECT_TRUE(j.ok()) << j.status();
  return records;
}

// Appenders enqueue under one lock (the order a caller fixes, as the
// coordinator does under its mutex) and wait for durability without it.
struct OrderedAppender {
  Journal* journal;
  std::mutex mu;
  std::vector<std::string> order;  // every record, in enqueue order

  absl::Status Append(const std::string& payload) {
    uint64_t ticket = 0;
    {
      std::lock_guard<std::mutex> lock(mu);
      absl::StatusOr<uint64_t> t = journal->Enqueue({payload});
      if (!t.ok()) return t.status();
      ticket = *t;
      order.push_back(payload);
    }
    return journal->Wait(ticket);
  }
};

TEST(GroupCommitTest, ConcurrentAppendsAreAllDurableAndInOrder) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::vector<std::string> records;
  auto j = Journal::Open(path, &records);
  ASSERT_OK(j.status());
  // A slow disk: while one batch syncs, the others queue up behind it.
  (*j)->SetBeforeSyncHookForTest([] { std::this_thread::sleep_for(std::chrono::milliseconds(2)); });
  OrderedAppender app{j->get()};
  constexpr int kThreads = 16, kEach = 40;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        if (!app.Append(absl::StrCat("t", t, "-", i)).ok()) ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_LT((*j)->batches_written(), kThreads * kEach) << "waiting appenders share an fdatasync";
  EXPECT_GE((*j)->batches_written(), 1);
  j->reset();
  const std::vector<std::string> replayed = Replay(path);
  ASSERT_EQ(replayed.size(), static_cast<size_t>(kThreads * kEach));
  EXPECT_EQ(replayed, app.order) << "the file holds the records in enqueue order";
}

TEST(GroupCommitTest, NoAcknowledgementBeforeTheFsync) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::vector<std::string> records;
  auto j = Journal::Open(path, &records);
  ASSERT_OK(j.status());
  std::mutex mu;
  std::condition_variable cv;
  int hooks_entered = 0;
  bool disk_done = false;
  (*j)->SetBeforeSyncHookForTest([&] {
    std::unique_lock<std::mutex> lock(mu);
    ++hooks_entered;
    cv.notify_all();
    cv.wait(lock, [&] { return disk_done; });  // the fdatasync cannot start before this returns
  });
  std::atomic<bool> first_acked{false}, second_acked{false};
  std::thread first([&] {
    EXPECT_TRUE((*j)->Append({"first"}).ok());
    first_acked = true;
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return hooks_entered == 1; }));
  }
  // A second append while the first batch is "on the disk": it waits for a
  // batch of its own, and neither is acknowledged before its sync.
  std::thread second([&] {
    EXPECT_TRUE((*j)->Append({"second"}).ok());
    second_acked = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(first_acked.load()) << "acknowledged before its fdatasync";
  EXPECT_FALSE(second_acked.load()) << "acknowledged before its fdatasync";
  {
    std::lock_guard<std::mutex> lock(mu);
    disk_done = true;
    cv.notify_all();
  }
  first.join();
  second.join();
  EXPECT_TRUE(first_acked.load());
  EXPECT_TRUE(second_acked.load());
  EXPECT_EQ(hooks_entered, 2) << "the second record had its own batch";
  j->reset();
  EXPECT_EQ(Replay(path), (std::vector<std::string>{"first", "second"}));
}

TEST(GroupCommitTest, CompactionConcurrentWithAppendsLosesNothing) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::vector<std::string> records;
  auto j = Journal::Open(path, &records);
  ASSERT_OK(j.status());
  (*j)->SetBeforeSyncHookForTest([] { std::this_thread::sleep_for(std::chrono::milliseconds(1)); });
  OrderedAppender app{j->get()};
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; !stop.load() || i < 20; ++i) {
        if (!app.Append(absl::StrCat("t", t, "-", i)).ok()) ++failures;
      }
    });
  }
  // Compactions that keep every record (the "state" is all records so far):
  // whatever is enqueued or written while one runs must survive it.
  int compactions = 0;
  for (int round = 0; round < 20; ++round) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::vector<Journal::SnapshotRecord> snap;
    uint64_t covers = 0;
    {
      std::lock_guard<std::mutex> lock(app.mu);
      covers = (*j)->BeginSnapshot();
      for (const std::string& r : app.order) snap.push_back({r, 0});
    }
    ASSERT_OK((*j)->RewriteSnapshot(snap, covers));
    ++compactions;
  }
  stop = true;
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(compactions, 20);
  j->reset();
  const std::vector<std::string> replayed = Replay(path);
  EXPECT_EQ(replayed.size(), app.order.size());
  EXPECT_EQ(replayed, app.order) << "every record exactly once, in enqueue order";
}

TEST(GroupCommitTest, ConditionalSnapshotRecordsAndClose) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::vector<std::string> records;
  auto j = Journal::Open(path, &records);
  ASSERT_OK(j.status());
  ASSERT_OK((*j)->Append({"a"}));
  auto t = (*j)->Enqueue({"b"});
  ASSERT_OK(t.status());
  const uint64_t covers = (*j)->BeginSnapshot();
  // "b" was written (by the rewrite, which writes what it covers first): kept.
  ASSERT_OK((*j)->RewriteSnapshot({{"a", 0}, {"b", *t}}, covers));
  ASSERT_OK((*j)->Wait(*t));
  (*j)->Close();
  EXPECT_EQ((*j)->Append({"c"}).code(), absl::StatusCode::kUnavailable);
  j->reset();
  EXPECT_EQ(Replay(path), (std::vector<std::string>{"a", "b"}));
}

// ---------------------------------------------------------------- through the Coordinator

TEST(GroupCommitTest, ConcurrentSubmitsWithCompactionsSurviveARestart) {
  TempDir dir;
  CoordinatorOptions o;
  o.checkpoint = testing::WriteTinyCheckpoint(dir.path());
  o.pp = 1;
  o.ep = 2;
  o.journal_path = dir.path() + "/c.journal";
  // Every third job is cancelled at once and forgotten 1 ms later: the
  // journal is compacted again and again while the submits arrive.
  o.journal_compact_min_waste_bytes = 0;
  o.job_retention_s = 0.001;
  o.monitor_interval_s = 0.001;  // maintenance on every Tick
  std::set<std::string> accepted;
  {
    auto c = Coordinator::Create(o);
    ASSERT_OK(c.status());
    std::mutex mu;
    std::atomic<bool> stop{false};
    std::thread monitor([&] {
      while (!stop.load()) {
        (*c)->Tick();
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < 25; ++i) {
          v1::SubmitJobRequest r;
          r.set_client_request_id(absl::StrCat("c", t, "-", i));
          v1::SequenceRequest* s = r.add_sequences();
          for (int k = 0; k < 40; ++k) s->add_tokens(k + 1);
          s->set_max_new_tokens(4);
          auto resp = (*c)->SubmitJob(r);
          ASSERT_OK(resp.status());
          if (i % 5 == 0) {  // a retried submit: deduplicated to the same job
            auto again = (*c)->SubmitJob(r);
            ASSERT_OK(again.status());
            EXPECT_TRUE(again->deduplicated());
            EXPECT_EQ(again->job_id(), resp->job_id());
          }
          if (i % 3 == 0) {
            ASSERT_OK((*c)->CancelJob(resp->job_id()).status());
            std::this_thread::sleep_for(std::chrono::milliseconds(3));  // let retention and compaction run
            continue;
          }
          std::lock_guard<std::mutex> lock(mu);
          accepted.insert(resp->job_id());
        }
      });
    }
    for (auto& t : threads) t.join();
    stop = true;
    monitor.join();
    EXPECT_EQ(accepted.size(), 8u * 16u);
    EXPECT_GE((*c)->journal_stats().compactions, 1) << "retention compacts while submits arrive";
    (*c)->Stop();
  }
  auto c = Coordinator::Create(o);
  ASSERT_OK(c.status());
  v1::ListJobsRequest all;
  all.set_limit(1000);
  auto list = (*c)->ListJobs(all);
  ASSERT_OK(list.status());
  std::set<std::string> replayed;
  for (const v1::Job& job : list->jobs()) {
    replayed.insert(job.job_id());
    EXPECT_EQ(job.state(), v1::JOB_STATE_QUEUED);
  }
  EXPECT_EQ(replayed, accepted) << "every acknowledged job is in the journal";
}

}  // namespace
}  // namespace expertmesh::coordinator
