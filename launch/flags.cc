#include "launch/flags.h"

#include <vector>

#include <cstdlib>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "worker/comm/registry.h"
#include "worker/cuda_engine.h"

ABSL_FLAG(std::string, checkpoint, "", "checkpoint folder (config.json + safetensors shards + index)");
ABSL_FLAG(std::string, preset, "tiny",
          "model preset: tiny, tiny-text (tiny with the 129280-token vocabulary), small or deepseek-v3 (DeepSeek-V3); "
          "r1-distill-qwen-1.5b, r1-distill-qwen-7b, r1-distill-llama-8b, r1-distill-qwen-14b, r1-distill-qwen-32b, "
          "r1-distill-llama-70b (the dense R1-Distill models, Qwen2 / Llama), tiny-qwen2 or tiny-llama (tiny-qwen2-text / "
          "tiny-llama-text: with the distills' vocabulary sizes, for the qwen3 / llama3 tokenizers)");
ABSL_FLAG(uint64_t, seed, 0, "random seed (weights for `checkpoint`, sampling for `generate`)");
ABSL_FLAG(bool, json, false, "print one JSON object instead of a table");

ABSL_FLAG(std::string, prompts, "", "JSON-lines file, one {\"tokens\":[ids...]} per prompt");
ABSL_FLAG(int64_t, max_new_tokens, 16, "tokens to generate per prompt");
ABSL_FLAG(double, temperature, 0.0, "sampling temperature; 0 = greedy");
ABSL_FLAG(int64_t, top_k, 0, "keep the k most likely tokens (0 = all)");
ABSL_FLAG(double, top_p, 1.0, "keep the smallest set of tokens whose probability reaches p (1 = all)");
ABSL_FLAG(std::vector<std::string>, stop_token_ids, {}, "comma-separated ids that end a sequence when generated");

ABSL_FLAG(int32_t, pp, 1, "pipeline stages");
ABSL_FLAG(int32_t, ep, 1, "expert-parallel (and attention data-parallel) ranks per stage");
ABSL_FLAG(int32_t, redundant_experts, 0, "extra expert slots per MoE layer for replicas of hot experts");
ABSL_FLAG(std::vector<std::string>, layers_per_stage, {},
          "explicit split, e.g. 2,2 (sums to num_hidden_layers); default: balanced by cost");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "host:port the coordinator serves gRPC on (port 0 picks a free one; 0.0.0.0 for other machines)");
ABSL_FLAG(std::string, journal, "",
          "coordinator journal file: accepted jobs survive a restart on the same file (empty: none)");

ABSL_FLAG(std::string, device, "cpu", "where the model runs: cpu or cuda (one GPU per process)");
ABSL_FLAG(std::string, cuda_precision, "bf16",
          "--device cuda: bf16 (bf16 activations, bf16/fp8 weights, fp32 residual) or fp32 (matches the CPU)");
ABSL_FLAG(bool, cuda_graphs, true, "--device cuda: capture decode steps in CUDA graphs and replay them");
ABSL_FLAG(int64_t, cuda_cache_tokens, 1 << 17, "--device cuda: latent-cache capacity in tokens (all sequences)");
ABSL_FLAG(int64_t, cuda_max_step_tokens, 16384, "--device cuda: most tokens in one step (sizes GPU scratch)");
ABSL_FLAG(int32_t, cuda_device, -1,
          "--device cuda: the GPU of this process; -1: the MPI/Slurm local rank modulo the GPUs seen, else 0");
ABSL_FLAG(std::string, device_data_plane, "auto",
          "workers with --device cuda: nccl (EP tokens and pipeline hidden states GPU to GPU), host (through the "
          "host data plane) or auto (nccl when this build has it)");

namespace expertmesh::launch {

absl::StatusOr<bool> DeviceFromFlags(worker::CudaEngineOptions* o) {
  const std::string d = absl::GetFlag(FLAGS_device);
  if (d == "cpu") return false;
  if (d != "cuda") return absl::InvalidArgumentError(absl::StrCat("--device ", d, ": expected cpu or cuda"));
  auto p = worker::ParseCudaPrecision(absl::GetFlag(FLAGS_cuda_precision));
  if (!p.ok()) return absl::InvalidArgumentError(absl::StrCat("--cuda-precision: ", p.status().message()));
  o->precision = *p;
  o->cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  o->cache_tokens = absl::GetFlag(FLAGS_cuda_cache_tokens);
  o->max_step_tokens = absl::GetFlag(FLAGS_cuda_max_step_tokens);
  o->device = absl::GetFlag(FLAGS_cuda_device);
  if (o->device < 0) {  // one GPU per process on a node: by local rank
    int local = 0;
    for (const char* v : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
      const char* e = std::getenv(v);
      if (e != nullptr) {
        local = std::atoi(e);
        break;
      }
    }
    const int n = worker::CudaDeviceCount();
    o->device = n > 0 ? local % n : 0;
  }
  if (o->cache_tokens <= 0 || o->max_step_tokens <= 0) {
    return absl::InvalidArgumentError("--cuda-cache-tokens and --cuda-max-step-tokens must be positive");
  }
  std::string why;
  if (!worker::CudaEngineAvailable(&why)) return absl::FailedPreconditionError(absl::StrCat("--device cuda: ", why));
  return true;
}

absl::StatusOr<std::string> DeviceDataPlaneFromFlags() {
  const std::string d = absl::GetFlag(FLAGS_device_data_plane);
  if (d == "nccl" || d == "host") return d;
  if (d != "auto") {
    return absl::InvalidArgumentError(absl::StrCat("--device-data-plane ", d, ": expected nccl, host or auto"));
  }
  for (const auto& b : comm::AvailableBackends()) {
    if (b == "nccl") return std::string("nccl");
  }
  return std::string("host");
}

}  // namespace expertmesh::launch
