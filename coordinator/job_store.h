// The job store: one part of the Coordinator (coordinator/coordinator.h is
// the facade; the methods are in job_store.cc).
//
// Owns: the jobs (Coordinator::Job, their sequences and results), their
// submission order, the client_request_id index, the retention clock and the
// journal with its byte accounting and compaction. JobService (SubmitJob,
// GetJob, WatchJob, CancelJob, ListJobs) is answered here.
//
// Threads and locks:
//  * The job state is guarded by the Coordinator's mutex mu_, the same one
//    that guards the scheduler's queue and the membership's workers. A single
//    lock must remain there: a Sync finishes sequences of jobs, moves queued
//    sequences to a worker and journals results in one step; a worker lost
//    or a new generation requeues its sequences; CancelJob cancels sequences
//    that workers hold. Each of these changes jobs, queue and workers
//    together, and replay must see the same order of events as memory.
//  * The journal (coordinator/journal.h) has its own lock and is never
//    written under mu_ for jobs: records are enqueued under mu_ (which fixes
//    their order against the state) and waited for after releasing it; the
//    first waiter writes and fdatasyncs the whole batch (group commit).
//    Lock order: mu_, then the journal's (never the other way round).
//  * SubmitJob takes the job's id and queue room under mu_, enqueues its
//    JobSubmitted record, releases mu_ and waits: the job is accepted (seen
//    by FindJob, ListJobs and the scheduler) and answered only once the
//    record is durable; a failed write removes it. A retried submit with the
//    same client_request_id waits for that outcome. CancelJob and Sync are
//    applied under mu_ and answered once their records are durable.
//  * Compaction: Tick (the monitor thread) copies the state under mu_
//    (TakeSnapshotLocked: the submitted records are shared, not copied),
//    then serialises and rewrites the journal without mu_ (RunCompaction)
//    while appends go on; records written meanwhile follow the snapshot in
//    the new file. One compaction at a time (compacting_).
#pragma once

#include <cstdint>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "proto/expertmesh.pb.h"

namespace expertmesh::coordinator {

inline int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

// Job ids are handed out in order and never reused: job-000001, job-000002, ...
inline std::string JobIdOf(int64_t n) { return absl::StrFormat("job-%06d", n); }

inline bool IsFinalState(v1::JobState s) {
  return s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_CANCELLED || s == v1::JOB_STATE_FAILED;
}

}  // namespace expertmesh::coordinator
