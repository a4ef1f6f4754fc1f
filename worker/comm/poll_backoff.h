// How a communicator waits for a patient batch (Batch::patient: a receive
// that waits for a peer's whole step, or for work). The wait first yields for
// 100 ms (lowest latency: a serving pipeline hands micro-batches on within
// that); one that goes on is a rank waiting for work (an idle cluster, whose
// keep-alives come once a second), which then sleeps in short and later
// longer steps instead of keeping a core busy: an idle downstream worker uses
// ~10% of a core instead of all of it. Worst added latency: 0.1 ms for waits
// of 0.1-0.5 s, 1 ms beyond.
//
//   PollBackoff backoff;
//   while (!done) {
//     if (Poll() > 0) backoff.Reset(); else backoff.Wait();
//   }
#pragma once

#include <sched.h>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace expertmesh::comm {

class PollBackoff {
 public:
  // After a poll that made no progress.
  void Wait() {
    const absl::Duration waited = absl::Now() - since_;
    if (waited < kYield) {
      sched_yield();
    } else {
      absl::SleepFor(waited < kShortSleeps ? absl::Microseconds(100) : absl::Milliseconds(1));
    }
  }
  // After a poll that completed something: the next wait starts short again.
  void Reset() { since_ = absl::Now(); }

 private:
  static constexpr absl::Duration kYield = absl::Milliseconds(100);
  static constexpr absl::Duration kShortSleeps = absl::Milliseconds(500);
  absl::Time since_ = absl::Now();
};

}  // namespace expertmesh::comm
