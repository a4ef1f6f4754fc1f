#include "worker/comm/vacant_communicator.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace expertmesh::comm {

absl::StatusOr<std::unique_ptr<VacantRankCommunicator>> VacantRankCommunicator::Create(
    std::unique_ptr<Communicator> inner, std::vector<int> live, int size) {
  if (inner == nullptr) return absl::InvalidArgumentError("vacant-rank communicator: no inner communicator");
  if (static_cast<int>(live.size()) != inner->size()) {
    return absl::InvalidArgumentError(absl::StrCat("vacant-rank communicator: ", live.size(),
                                                   " live ranks for an inner communicator of ", inner->size()));
  }
  std::vector<int> physical(static_cast<size_t>(size < 0 ? 0 : size), -1);
  for (size_t i = 0; i < live.size(); ++i) {
    if (live[i] < 0 || live[i] >= size || (i > 0 && live[i] <= live[i - 1])) {
      return absl::InvalidArgumentError(absl::StrCat("vacant-rank communicator: live ranks must increase inside [0, ",
                                                     size, "); got ", live[i], " at ", i));
    }
    physical[static_cast<size_t>(live[i])] = static_cast<int>(i);
  }
  const int rank = live[static_cast<size_t>(inner->rank())];
  return std::unique_ptr<VacantRankCommunicator>(
      new VacantRankCommunicator(std::move(inner), rank, size, std::move(physical)));
}

std::vector<int> VacantRankCommunicator::VacantRanks() const {
  std::vector<int> v;
  for (int r = 0; r < size(); ++r) {
    if (vacant(r)) v.push_back(r);
  }
  return v;
}

absl::Status VacantRankCommunicator::Barrier(absl::Time deadline) {
  if (aborted()) return abort_status();
  return inner_->Barrier(deadline);
}

absl::Status VacantRankCommunicator::RunRemote(const Batch& batch, absl::Time deadline,
                                               const RecvDoneFn* on_recv_done) {
  mapped_.Clear();
  mapped_recv_index_.clear();
  mapped_.memory = batch.memory;
  mapped_.patient = batch.patient;
  std::vector<size_t> vacant_done;
  for (const Batch::Op& op : batch.sends) {
    const int p = physical_[static_cast<size_t>(op.peer)];
    if (p < 0) continue;  // nobody there: a vacant rank gets nothing
    Batch::Op m = op;
    m.peer = p;
    mapped_.sends.push_back(m);
  }
  for (size_t i = 0; i < batch.recvs.size(); ++i) {
    const Batch::Op& op = batch.recvs[i];
    const int p = physical_[static_cast<size_t>(op.peer)];
    if (p >= 0) {
      Batch::Op m = op;
      m.peer = p;
      mapped_.recvs.push_back(m);
      mapped_recv_index_.push_back(i);
      continue;
    }
    if (op.bytes > 0) {
      if (batch.memory != MemoryKind::kHost) {
        return absl::InvalidArgumentError(absl::StrCat("receive of ", op.bytes, " device bytes from vacant rank ",
                                                       op.peer, " (its worker was lost; nothing will come)"));
      }
      std::memset(op.data, 0, op.bytes);
    }
    vacant_done.push_back(i);
  }
  if (on_recv_done != nullptr) {
    for (size_t i : vacant_done) {
      if (absl::Status s = (*on_recv_done)(i); !s.ok()) return s;
    }
  }
  if (aborted()) return abort_status();
  if (mapped_.sends.empty() && mapped_.recvs.empty()) return absl::OkStatus();
  if (on_recv_done == nullptr) return inner_->Run(mapped_, deadline);
  return inner_->Run(mapped_, deadline, [&](size_t i) { return (*on_recv_done)(mapped_recv_index_[i]); });
}

}  // namespace expertmesh::comm
