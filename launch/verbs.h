// The verbs of the `expertmesh` command. Each verb is a function taking the
// arguments after the verb (argv[0] is "expertmesh <verb>"), parsing its own
// abseil flags, and returning the process exit code. Flags a verb defines live
// in that verb's .cc file; flags shared by several verbs live in flags.cc.
#pragma once

#include <vector>

#include "absl/status/status.h"

namespace expertmesh::coordinator {
struct CoordinatorOptions;
}  // namespace expertmesh::coordinator

namespace expertmesh::launch {

struct Verb {
  const char* name;
  const char* file;      // source files defining its flags start with this (for --help)
  const char* summary;   // one line for `expertmesh --help`
  const char* usage;     // usage text printed by `expertmesh <verb> --help`
  int (*main)(int argc, char** argv);
};

int CheckpointMain(int argc, char** argv);
int GenerateMain(int argc, char** argv);
int BenchMain(int argc, char** argv);
int PlanMain(int argc, char** argv);
int WorkerMain(int argc, char** argv);
int LaunchMain(int argc, char** argv);
int CoordinatorMain(int argc, char** argv);  // coordinator_cmd.cc
int SubmitMain(int argc, char** argv);       // client_cmd.cc: submit, status, cancel, jobs, shutdown
int StatusMain(int argc, char** argv);
int CancelMain(int argc, char** argv);
int JobsMain(int argc, char** argv);
int ShutdownMain(int argc, char** argv);
int RebalanceMain(int argc, char** argv);
int TokenizeMain(int argc, char** argv);     // text_cmd.cc
int ChatMain(int argc, char** argv);         // chat_cmd.cc

// The coordinator's options from the flags (--checkpoint, --pp, --ep, --redundant-experts,
// --layers-per-stage, --listen, --journal and coordinator_cmd.cc's own); `launch` uses it on rank 0.
absl::Status CoordinatorOptionsFromFlags(coordinator::CoordinatorOptions* options);

// Parses flags for a verb: prints usage and only that verb's flags on --help,
// returns the positional arguments, exits 1 with a clear line on unknown flags.
std::vector<char*> ParseVerbFlags(int argc, char** argv);

}  // namespace expertmesh::launch
