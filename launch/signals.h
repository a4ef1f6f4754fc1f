// SIGTERM / SIGINT for the long-running verbs (`coordinator`, `worker`).
//
// WatchTerminationSignals blocks both signals in the calling thread and
// starts a thread that takes them for the whole process; call it first in
// the verb, before any other thread starts (threads inherit the mask, so no
// other thread is interrupted). While *graceful is false (still starting:
// nothing to hand back) a signal ends the process at once with exit code
// 128 + signo. Once it is true the first signal only sets
// TerminationSignal() and the program winds down by itself; a second signal
// ends it at once, as a user pressing Ctrl-C twice expects.
//
//   static std::atomic<bool> graceful{false};
//   WatchTerminationSignals(&graceful);
//   ... graceful = true; ... while (TerminationSignal() == 0) Work();
#pragma once

#include <atomic>

namespace expertmesh::launch {

void WatchTerminationSignals(const std::atomic<bool>* graceful);

// 0 until the first SIGTERM or SIGINT, then that signal's number.
const std::atomic<int>& TerminationSignal();

}  // namespace expertmesh::launch
