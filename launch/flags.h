// Flags shared by several verbs (defined in flags.cc).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"

ABSL_DECLARE_FLAG(std::string, checkpoint);
ABSL_DECLARE_FLAG(std::string, preset);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(bool, json);

// Batches and sampling (generate, submit).
ABSL_DECLARE_FLAG(std::string, prompts);
ABSL_DECLARE_FLAG(int64_t, max_new_tokens);
ABSL_DECLARE_FLAG(double, temperature);
ABSL_DECLARE_FLAG(int64_t, top_k);
ABSL_DECLARE_FLAG(double, top_p);
ABSL_DECLARE_FLAG(std::vector<std::string>, stop_token_ids);

// The address of a running coordinator (client verbs: submit, status, ..., chat).
ABSL_DECLARE_FLAG(std::string, server);
// plan: the model (preset or config.json); chat: the served model's name (when given).
ABSL_DECLARE_FLAG(std::string, model);

// The cluster (coordinator, launch).
ABSL_DECLARE_FLAG(int32_t, pp);
ABSL_DECLARE_FLAG(int32_t, ep);
ABSL_DECLARE_FLAG(int32_t, redundant_experts);
ABSL_DECLARE_FLAG(std::vector<std::string>, layers_per_stage);
ABSL_DECLARE_FLAG(std::string, listen);
ABSL_DECLARE_FLAG(std::string, journal);
// Text (tokenize, coordinator and launch with --http-listen).
ABSL_DECLARE_FLAG(std::string, chat_template);

// The device that runs the model (generate, worker, launch).
ABSL_DECLARE_FLAG(std::string, device);
ABSL_DECLARE_FLAG(std::string, cuda_precision);
ABSL_DECLARE_FLAG(bool, cuda_graphs);
ABSL_DECLARE_FLAG(int64_t, cuda_cache_tokens);
ABSL_DECLARE_FLAG(int64_t, cuda_max_step_tokens);
ABSL_DECLARE_FLAG(int32_t, cuda_device);
ABSL_DECLARE_FLAG(std::string, device_data_plane);

namespace expertmesh::worker {
struct CudaEngineOptions;
}
namespace expertmesh::launch {
// Reads --device: false for "cpu"; true for "cuda", with *options filled from
// the --cuda-* flags; InvalidArgument (naming the flag) for anything else.
absl::StatusOr<bool> DeviceFromFlags(worker::CudaEngineOptions* options);
// --device-data-plane resolved: "nccl" or "host" ("auto": nccl when built).
absl::StatusOr<std::string> DeviceDataPlaneFromFlags();
}  // namespace expertmesh::launch
