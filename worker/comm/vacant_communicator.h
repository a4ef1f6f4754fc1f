// A communicator with vacant ranks: elastic expert parallelism serves a stage
// on the ranks that survived a loss without renumbering anyone. The group
// keeps its logical size (the plan's EP size) and every member keeps its
// logical rank; the ranks whose worker was lost are *vacant*. The data moves
// over `inner`, a communicator of the live members only (physical rank i of
// `inner` is logical rank live[i]).
//
// Towards a vacant rank: a send is dropped (it must not matter: a vacant rank
// holds no expert slot, so all-to-all-v counts to it are zero); a receive from
// it completes at once, zero-filled in host memory (all-to-all counts from it
// read 0; an all-gather gives its block as zeros, which callers of an
// agreement treat as "no vote": see VacantRanks()). Device-memory receives
// from a vacant rank must be empty (kInvalidArgument otherwise): fill a device
// block yourself.
//
// Abort aborts `inner` too; everything else follows communicator.h.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/comm/communicator.h"

namespace expertmesh::comm {

class VacantRankCommunicator : public Communicator {
 public:
  // `size` logical ranks; live[i] is the logical rank of inner's rank i
  // (strictly increasing, inside [0, size)); this rank is live[inner->rank()].
  static absl::StatusOr<std::unique_ptr<VacantRankCommunicator>> Create(std::unique_ptr<Communicator> inner,
                                                                        std::vector<int> live, int size);

  absl::string_view backend() const override { return inner_->backend(); }
  Caps caps() const override { return inner_->caps(); }
  absl::Status Barrier(absl::Time deadline) override;
  bool vacant(int logical_rank) const { return physical_[static_cast<size_t>(logical_rank)] < 0; }
  // The vacant logical ranks, ascending.
  std::vector<int> VacantRanks() const;
  Communicator* inner() const { return inner_.get(); }

 protected:
  absl::Status RunRemote(const Batch& batch, absl::Time deadline, const RecvDoneFn* on_recv_done) override;
  void OnAbort(const absl::Status& reason) override { inner_->Abort(reason); }

 private:
  VacantRankCommunicator(std::unique_ptr<Communicator> inner, int rank, int size, std::vector<int> physical)
      : Communicator(rank, size), inner_(std::move(inner)), physical_(std::move(physical)) {}

  std::unique_ptr<Communicator> inner_;
  std::vector<int> physical_;  // logical rank -> inner rank, -1 when vacant
  Batch mapped_;               // scratch
  std::vector<size_t> mapped_recv_index_;
};

}  // namespace expertmesh::comm
