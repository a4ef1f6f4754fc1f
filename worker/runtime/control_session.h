// The worker's control session with the coordinator: registration, the
// heartbeat thread, re-registration with a restarted coordinator and the
// registration that rejoins the cluster after a data-plane failure.
//
// Epochs and generations: each coordinator process has an epoch (a restarted
// one gets a new epoch and replays its journal); within an epoch the
// data-plane generation moves on whenever a worker is lost, leaves or is
// replaced. The heartbeat thread watches both:
//   * the coordinator of our epoch moved to another generation: the data
//     plane is marked stale and aborted, so the stage thread's next exchange
//     fails and the worker rejoins (Rejoin) and rebuilds;
//   * the coordinator does not know us (NOT_FOUND: restarted): re-register
//     at our old place with the plan we run; same processes, same data
//     plane, which now answers to the new epoch and generation (a different
//     plan makes the worker exit);
//   * our place was taken over (FAILED_PRECONDITION): fatal, the worker exits
//     with that error;
//   * any other failure: logged once, retried with the next heartbeat (the
//     stage thread gives up after coordinator_timeout without Sync);
//   * a stop signal: leave (abort the data plane; the worker's last heartbeat
//     says it is exiting).
//
// Threads: Register and Rejoin run on the stage thread (before the heartbeat
// thread starts, and while the stage loop is stopped); Start spawns the
// heartbeat thread, which calls the hooks and the data plane's thread-safe
// parts; Stop (stage thread) sends the last, "exiting" heartbeat and joins.
// BeatNow and the flag accessors are safe from any thread. Register blocks up
// to register_timeout, Rejoin up to rejoin_timeout, a heartbeat 5 s.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/expertmesh.pb.h"
#include "topology/plan.h"
#include "worker/runtime/coordinator_client.h"
#include "worker/runtime/data_plane.h"

namespace expertmesh::worker::runtime {

class ControlSession {
 public:
  struct Options {
    std::string host;                 // sent with Register and every Heartbeat
    int requested_worker_id = -1;     // -1: the coordinator assigns one
    absl::Duration register_timeout = absl::Seconds(300);
    absl::Duration rejoin_timeout = absl::Seconds(600);
    absl::Duration heartbeat_interval = absl::Seconds(1);
    const std::atomic<int>* stop_signal = nullptr;  // non-zero: leave
    std::atomic<bool>* serving = nullptr;           // set while the heartbeat thread runs
  };
  struct Hooks {
    // Heartbeat thread: adds this worker's counters, load and placement
    // state to the request.
    std::function<void(v1::HeartbeatRequest*)> report;
    // Heartbeat thread: a successful answer (pending placements).
    std::function<void(const v1::HeartbeatResponse&)> answered;
    // Heartbeat thread: the plan this worker runs, as a proto, and as the
    // plan itself in *running (re-registration with a restarted coordinator).
    std::function<v1::Plan(topology::Plan* running)> running_plan;
  };
  struct Registration {
    v1::RegisterResponse response;
    topology::Plan plan;  // parsed and checked
  };

  ControlSession(const Options& options, CoordinatorClient* client);
  ~ControlSession();  // Stop()

  // Registers (a replacement that finds every place held waits until one
  // frees up, within register_timeout) and checks the place against the plan.
  absl::StatusOr<Registration> Register();
  // After a data-plane failure of generation `failed`: registers again at our
  // place, waiting (up to rejoin_timeout) until the cluster is complete
  // again. nullopt: the cluster was shut down meanwhile (exit cleanly).
  absl::StatusOr<std::optional<Registration>> Rejoin(int64_t failed);

  // Starts the heartbeat thread (the first heartbeat goes out at once: the
  // worker is READY). data_plane: aborted or re-identified as the
  // coordinator says (outlives the session, or Stop first).
  void Start(DataPlane* data_plane, Hooks hooks);
  // Sends the final heartbeat (exiting) and joins the thread.
  void Stop();
  // Send the next heartbeat at once (e.g. a placement was staged).
  void BeatNow();
  // One heartbeat and its consequences (the thread's body; tests call it
  // directly instead of Start). Returns false for the final one.
  bool Beat();

  int worker_id() const { return worker_id_; }
  int stage() const { return stage_; }
  int ep_rank() const { return ep_rank_; }
  // The cluster is shutting down (a heartbeat or Sync said so).
  std::atomic<bool>* shutdown_flag() { return &shutdown_; }
  bool shutdown() const { return shutdown_.load(); }
  // Leaving on a stop signal.
  bool leaving() const { return leaving_.load(); }
  // OK, or why this worker must exit (its place was taken over, or a
  // restarted coordinator has another plan).
  absl::Status fatal() const;

 private:
  v1::RegisterRequest MakeRegisterRequest(int worker_id) const;
  absl::Status Reregister();
  void Loop();
  bool StopRequested() const { return o_.stop_signal != nullptr && o_.stop_signal->load() != 0; }

  const Options o_;
  CoordinatorClient* client_;
  int worker_id_ = -1, stage_ = 0, ep_rank_ = 0;
  DataPlane* dp_ = nullptr;
  Hooks hooks_;
  std::atomic<bool> shutdown_{false};
  std::atomic<bool> leaving_{false};
  mutable std::mutex mu_;  // guards fatal_
  absl::Status fatal_;
  // The heartbeat thread.
  std::thread thread_;
  std::mutex hb_mu_;
  std::condition_variable hb_cv_;
  bool beat_now_ = false;  // under hb_mu_
  std::atomic<bool> stop_{false};
  absl::Time last_heartbeat_ = absl::InfinitePast();
  bool warned_ = false;
};

}  // namespace expertmesh::worker::runtime
