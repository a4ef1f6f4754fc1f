// SafetensorsFile / ShardedCheckpoint / SafetensorsWriter on good and broken
// files: every broken file is an error naming the file (and tensor), never a
// crash.
#include "common/safetensors.h"

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/common/test_util.h"

namespace expertmesh {
namespace {

using absl::StatusCode;
using testing_util::SafetensorsBytes;
using testing_util::TempDir;
using testing_util::WriteFile;

std::string Floats(const std::vector<float>& v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), v.data(), s.size());
  return s;
}

// Two F32 tensors a [2] and b [2, 1], 16 bytes of data.
const char* kGoodHeader =
    R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
    R"("b":{"dtype":"F32","shape":[2,1],"data_offsets":[8,16]}})";

TEST(Safetensors, ReadsAGoodFile) {
  TempDir d;
  WriteFile(d.File("x.safetensors"), SafetensorsBytes(kGoodHeader, Floats({1, 2, 3, 4})));
  auto f = SafetensorsFile::Open(d.File("x.safetensors"));
  ASSERT_OK(f);
  const TensorView* b = (*f)->Find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::kF32);
  EXPECT_EQ(b->shape, (std::vector<int64_t>{2, 1}));
  ASSERT_EQ(b->nbytes, 8u);
  float v[2];
  std::memcpy(v, b->data, 8);
  EXPECT_EQ(v[0], 3.0f);
  EXPECT_EQ(v[1], 4.0f);
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  EXPECT_EQ((*f)->Find("c"), nullptr);
}

TEST(Safetensors, WriterRoundTrip) {
  TempDir d;
  SafetensorsWriter w;
  w.SetMetadata("k", "v");
  w.AddF32("x", {3}, {1.5f, -2.0f, 0.25f});
  w.Add("y", DType::kBF16, {2}, {0x80, 0x3f, 0x00, 0xc0});
  w.Add("z", DType::kF8E4M3, {1, 3}, {0x38, 0x7e, 0x01});
  ASSERT_OK(w.Write(d.File("w.safetensors")));
  auto f = SafetensorsFile::Open(d.File("w.safetensors"));
  ASSERT_OK(f);
  EXPECT_EQ((*f)->tensors().size(), 3u);
  const TensorView* y = (*f)->Find("y");
  ASSERT_NE(y, nullptr);
  EXPECT_EQ(y->dtype, DType::kBF16);
  float out[3];
  ConvertToFloat(y->dtype, y->data, 2, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  const TensorView* z = (*f)->Find("z");
  ConvertToFloat(z->dtype, z->data, 3, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], 448.0f);
  EXPECT_EQ(out[2], 1.0f / 512);
  EXPECT_EQ((*f)->metadata().at("k"), "v");
  // The data section starts 8-byte aligned.
  std::ifstream in(d.File("w.safetensors"), std::ios::binary);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ(n % 8, 0u);
}

TEST(Safetensors, MissingFile) {
  TempDir d;
  EXPECT_ERROR(SafetensorsFile::Open(d.File("nope.safetensors")), StatusCode::kNotFound, "nope.safetensors");
}

TEST(Safetensors, TruncatedOrEmpty) {
  TempDir d;
  for (const std::string& bytes : {std::string(), std::string("\x10\x00\x00", 3)}) {
    WriteFile(d.File("t.safetensors"), bytes);
    EXPECT_ERROR(SafetensorsFile::Open(d.File("t.safetensors")), StatusCode::kDataLoss, "t.safetensors",
                 "truncated");
  }
  // Cut in the data section: the offsets of b are past the end.
  std::string good = SafetensorsBytes(kGoodHeader, Floats({1, 2, 3, 4}));
  WriteFile(d.File("t.safetensors"), good.substr(0, good.size() - 4));
  EXPECT_ERROR(SafetensorsFile::Open(d.File("t.safetensors")), StatusCode::kDataLoss, "t.safetensors", "b:",
               "out of range");
  // Cut inside the header.
  WriteFile(d.File("t.safetensors"), good.substr(0, 20));
  EXPECT_ERROR(SafetensorsFile::Open(d.File("t.safetensors")), StatusCode::kDataLoss, "t.safetensors",
               "header length");
}

TEST(Safetensors, HeaderLengthBeyondFile) {
  TempDir d;
  for (uint64_t len : {uint64_t{1000}, uint64_t{1} << 63, ~uint64_t{0}}) {
    std::string bytes = SafetensorsBytes("{}", "");
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
    WriteFile(d.File("h.safetensors"), bytes);
    EXPECT_ERROR(SafetensorsFile::Open(d.File("h.safetensors")), StatusCode::kDataLoss, "h.safetensors",
                 "header length");
  }
}

TEST(Safetensors, CorruptHeader) {
  TempDir d;
  const std::vector<std::string> headers = {
      "{\"a\": {\"dtype\": ", "not json at all", "[1, 2, 3]", "\"a string\"", std::string(100000, '['),
      std::string("{\"a\"\0:1}", 8)};
  for (const auto& h : headers) {
    WriteFile(d.File("c.safetensors"), SafetensorsBytes(h, ""));
    EXPECT_ERROR(SafetensorsFile::Open(d.File("c.safetensors")), StatusCode::kDataLoss, "c.safetensors");
  }
}

struct BadEntry {
  const char* header;
  std::vector<std::string> fragments;
};

TEST(Safetensors, BadEntries) {
  TempDir d;
  const std::string data = Floats({1, 2, 3, 4});
  const std::vector<BadEntry> cases = {
      // out of range, reversed
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})", {"a:", "out of range"}},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", {"a:"}},
      // overlapping
      {R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       {"a", "b", "overlap"}},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
       {"a", "b", "overlap"}},
      // byte count does not match dtype x shape
      {R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", {"a:", "expected 12"}},
      {R"({"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,16]}})", {"a:", "expected 12"}},
      // shape whose element count overflows 64 bits (2^32 * 2^32 = 2^64 wraps to 0)
      {R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", {"a:"}},
      {R"({"a":{"dtype":"F8_E4M3","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}})", {"a:"}},
      // unknown dtype, malformed entries
      {R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", {"a:", "Q4"}},
      {R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", {"a:"}},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", {"a:"}},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":["0","8"]}})", {"a:"}},
      {R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", {"a:"}},
      {R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", {"a:"}},
      {R"({"a":[1,2]})", {"a:"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.header);
    WriteFile(d.File("e.safetensors"), SafetensorsBytes(c.header, data));
    std::vector<std::string> f = c.fragments;
    f.push_back("e.safetensors");
    auto r = SafetensorsFile::Open(d.File("e.safetensors"));
    ASSERT_FALSE(r.ok()) << "accepted: " << c.header;
    EXPECT_EQ(r.status().code(), StatusCode::kDataLoss) << r.status();
    for (const auto& frag : f) EXPECT_NE(r.status().message().find(frag), std::string::npos) << r.status();
  }
}

TEST(Safetensors, ReportsAllProblemsOfAFile) {
  TempDir d;
  WriteFile(d.File("m.safetensors"),
            SafetensorsBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,80]},)"
                             R"("b":{"dtype":"X","shape":[2],"data_offsets":[0,8]}})",
                             Floats({1, 2})));
  EXPECT_ERROR(SafetensorsFile::Open(d.File("m.safetensors")), StatusCode::kDataLoss, "a:", "b:");
}

TEST(ShardedCheckpoint, FolderAndIndexErrors) {
  TempDir d;
  EXPECT_ERROR(ShardedCheckpoint::Open(d.File("absent")), StatusCode::kNotFound, "absent");
  EXPECT_ERROR(ShardedCheckpoint::Open(d.path()), StatusCode::kNotFound, d.path());

  const std::string data = Floats({1, 2, 3, 4});
  WriteFile(d.File("s1.safetensors"), SafetensorsBytes(kGoodHeader, data));
  WriteFile(d.File("model.safetensors.index.json"), "{\"weight_map\": {\"a\": ");
  EXPECT_ERROR(ShardedCheckpoint::Open(d.path()), StatusCode::kDataLoss, "model.safetensors.index.json");

  WriteFile(d.File("model.safetensors.index.json"), R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  EXPECT_ERROR(ShardedCheckpoint::Open(d.path()), StatusCode::kDataLoss, "s2.safetensors");

  WriteFile(d.File("model.safetensors.index.json"), R"({"weight_map": {"a": "s1.safetensors", "c": "s1.safetensors"}})");
  EXPECT_ERROR(ShardedCheckpoint::Open(d.path()), StatusCode::kDataLoss, "c:", "s1.safetensors");

  WriteFile(d.File("model.safetensors.index.json"), R"({"weight_map": {"a": 7}})");
  EXPECT_ERROR(ShardedCheckpoint::Open(d.path()), StatusCode::kDataLoss, "model.safetensors.index.json");

  // A corrupt shard among good ones is named.
  WriteFile(d.File("s2.safetensors"), "garbage");
  WriteFile(d.File("model.safetensors.index.json"), R"({"weight_map": {"a": "s1.safetensors", "x": "s2.safetensors"}})");
  EXPECT_ERROR(ShardedCheckpoint::Open(d.path()), StatusCode::kDataLoss, "s2.safetensors");
  // Two corrupt shards: both named, still one line.
  WriteFile(d.File("s3.safetensors"), std::string(3, 'x'));
  WriteFile(d.File("model.safetensors.index.json"),
            R"({"weight_map": {"a": "s1.safetensors", "x": "s2.safetensors", "y": "s3.safetensors"}})");
  EXPECT_ERROR(ShardedCheckpoint::Open(d.path()), StatusCode::kDataLoss, "s2.safetensors", "s3.safetensors");
}

TEST(ShardedCheckpoint, IndexedShards) {
  TempDir d;
  WriteFile(d.File("s1.safetensors"), SafetensorsBytes(kGoodHeader, Floats({1, 2, 3, 4})));
  WriteFile(d.File("s2.safetensors"),
            SafetensorsBytes(R"({"c":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", Floats({9})));
  WriteFile(d.File("model.safetensors.index.json"),
            R"({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}})");
  auto ck = ShardedCheckpoint::Open(d.path());
  ASSERT_OK(ck);
  EXPECT_EQ((*ck)->Names(), (std::vector<std::string>{"a", "b", "c"}));
  ASSERT_NE((*ck)->Find("c"), nullptr);
  EXPECT_NE((*ck)->Find("c")->file.find("s2.safetensors"), std::string::npos);
  EXPECT_EQ((*ck)->Find("zz"), nullptr);
}

TEST(ShardedCheckpoint, SameTensorInTwoShardsWithoutIndex) {
  TempDir d;
  WriteFile(d.File("s1.safetensors"), SafetensorsBytes(kGoodHeader, Floats({1, 2, 3, 4})));
  WriteFile(d.File("s2.safetensors"), SafetensorsBytes(kGoodHeader, Floats({1, 2, 3, 4})));
  EXPECT_ERROR(ShardedCheckpoint::Open(d.path()), StatusCode::kDataLoss, "a:", "two shards");
}

}  // namespace
}  // namespace expertmesh
