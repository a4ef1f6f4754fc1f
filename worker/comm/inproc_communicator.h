// An in-process communicator: the ranks of a group are threads of one
// process, and messages are copied through shared mailboxes. It implements
// the same contract as the mpi and ucx backends (communicator.h), so the
// shared multi-rank test bodies (tests/comm/bodies.h) run as threads, in one
// process, under a thread sanitizer and without mpirun; it also serves any
// single-process experiment that wants a real group.
//
// Sends are eager: Run copies every send into the destination's mailbox at
// once (so a send never waits for its receiver), and receives take messages
// from the mailbox in posting order per sender. A receive that waits polls
// the deadline and `Abort` at least every 2 ms. A receive from a rank whose
// communicator was destroyed, with nothing left from it, fails with
// kUnavailable (a dead peer).
//
//   std::vector<std::unique_ptr<Communicator>> comms = CreateInprocGroup(4);
//   std::vector<std::thread> ranks;
//   for (auto& c : comms) ranks.emplace_back([&c] { RunMyRank(c.get()); });
//   for (auto& t : ranks) t.join();
#pragma once

#include <memory>
#include <vector>

#include "worker/comm/communicator.h"

namespace expertmesh::comm {

// The shared state of one in-process group (the mailboxes); every
// communicator of the group holds it, so it outlives whichever goes first.
class InprocFabric;

// Creates a group of `n` >= 1 communicators; element r is rank r. Each has
// its own owner thread (the one that calls it), as for any backend.
std::vector<std::unique_ptr<Communicator>> CreateInprocGroup(int n);

}  // namespace expertmesh::comm
