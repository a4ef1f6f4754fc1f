// The journal file format (torn tails, corruption, compaction by Rewrite) and request validation.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <limits>

#include "absl/strings/str_cat.h"
#include "coordinator/journal.h"
#include "coordinator/validation.h"
#include "gtest/gtest.h"
#include "tests/coordinator/test_util.h"

namespace expertmesh::coordinator {
namespace {

using testing::TempDir;

void AppendRaw(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::app) << bytes;
}

int64_t FileSize(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  return static_cast<int64_t>(in.tellg());
}

TEST(JournalTest, AppendsAndReplaysRecordsInOrder) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::vector<std::string> records;
  {
    auto j = Journal::Open(path, &records);
    ASSERT_OK(j.status());
    EXPECT_TRUE(records.empty());
    ASSERT_OK((*j)->Append({"first"}));
    ASSERT_OK((*j)->Append({"second", std::string("third\0with nul", 14), ""}));
  }
  auto j = Journal::Open(path, &records);
  ASSERT_OK(j.status());
  ASSERT_EQ(records.size(), 4u);
  EXPECT_EQ(records[0], "first");
  EXPECT_EQ(records[2], std::string("third\0with nul", 14));
  EXPECT_EQ(records[3], "");
}

TEST(JournalTest, TornLastRecordIsDroppedAndTruncated) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::vector<std::string> records;
  {
    auto j = Journal::Open(path, &records);
    ASSERT_OK(j.status());
    ASSERT_OK((*j)->Append({"kept-1", "kept-2"}));
  }
  const int64_t good = FileSize(path);
  const std::string full = Journal::EncodeRecord("lost in the crash");
  // Every prefix of a record (header cut, payload cut) is a torn tail.
  for (size_t cut : {size_t{1}, size_t{11}, size_t{12}, full.size() - 1}) {
    AppendRaw(path, full.substr(0, cut));
    auto j = Journal::Open(path, &records);
    ASSERT_OK(j.status());
    ASSERT_EQ(records.size(), 2u) << "cut at " << cut;
    EXPECT_EQ(records[1], "kept-2");
    EXPECT_EQ(FileSize(path), good) << "torn bytes must be truncated away";
  }
  // A full-length last record with a flipped payload byte is torn too.
  std::string bad = full;
  bad.back() ^= 0x55;
  AppendRaw(path, bad);
  {
    auto j = Journal::Open(path, &records);
    ASSERT_OK(j.status());
    EXPECT_EQ(records.size(), 2u);
    ASSERT_OK((*j)->Append({"after"}));  // appends start at the last good record
  }
  auto j = Journal::Open(path, &records);
  ASSERT_OK(j.status());
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[2], "after");
}

bool Exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

TEST(JournalTest, RewriteReplacesTheContentAndAppendsContinueInTheNewFile) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::vector<std::string> records;
  {
    auto j = Journal::Open(path, &records);
    ASSERT_OK(j.status());
    for (int i = 0; i < 50; ++i) ASSERT_OK((*j)->Append({"old record " + std::to_string(i)}));
    const int64_t before = (*j)->size_bytes();
    ASSERT_OK((*j)->Rewrite({"kept-1", "kept-2"}));
    const int64_t after = static_cast<int64_t>(Journal::EncodeRecord("kept-1").size() * 2);
    EXPECT_EQ((*j)->size_bytes(), after);
    EXPECT_EQ(FileSize(path), after);
    EXPECT_LT(after, before);
    EXPECT_FALSE(Exists((*j)->compact_path())) << "renamed away";
    ASSERT_OK((*j)->Append({"after"}));
    EXPECT_EQ(FileSize(path), (*j)->size_bytes());
    ASSERT_OK((*j)->Rewrite({}));  // an empty journal is fine too
    EXPECT_EQ(FileSize(path), 0);
    ASSERT_OK((*j)->Rewrite({"kept-1", "kept-2"}));
    ASSERT_OK((*j)->Append({"after"}));
  }
  auto j = Journal::Open(path, &records);
  ASSERT_OK(j.status());
  EXPECT_EQ(records, (std::vector<std::string>{"kept-1", "kept-2", "after"}));
}

TEST(JournalTest, LeftoverOfACrashedCompactionIsDeletedAndNothingIsLost) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::vector<std::string> records;
  {
    auto j = Journal::Open(path, &records);
    ASSERT_OK(j.status());
    ASSERT_OK((*j)->Append({"a", "b", "c"}));
  }
  // The crash hit between writing "<path>.compact" and the rename: a complete
  // or a half-written copy lies next to the complete old journal.
  for (const std::string& leftover : {Journal::EncodeRecord("b"), Journal::EncodeRecord("b").substr(0, 7)}) {
    AppendRaw(path + ".compact", leftover);
    auto j = Journal::Open(path, &records);
    ASSERT_OK(j.status());
    EXPECT_EQ(records, (std::vector<std::string>{"a", "b", "c"}));
    EXPECT_FALSE(Exists(path + ".compact"));
  }
}

TEST(JournalTest, TornTailAfterARewriteIsDropped) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::vector<std::string> records;
  {
    auto j = Journal::Open(path, &records);
    ASSERT_OK(j.status());
    ASSERT_OK((*j)->Append({"x", "y", "z"}));
    ASSERT_OK((*j)->Rewrite({"y"}));
    ASSERT_OK((*j)->Append({"w"}));
  }
  const int64_t good = FileSize(path);
  AppendRaw(path, Journal::EncodeRecord("torn by a crash").substr(0, 20));
  {
    auto j = Journal::Open(path, &records);
    ASSERT_OK(j.status());
    EXPECT_EQ(records, (std::vector<std::string>{"y", "w"}));
    EXPECT_EQ(FileSize(path), good);
  }
}

TEST(JournalTest, FailedRewriteKeepsTheOldJournalInUse) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::vector<std::string> records;
  {
    auto j = Journal::Open(path, &records);
    ASSERT_OK(j.status());
    ASSERT_OK((*j)->Append({"a", "b"}));
    // "<path>.compact" cannot be created: a folder is in the way.
    ASSERT_EQ(::mkdir((*j)->compact_path().c_str(), 0755), 0);
    EXPECT_FALSE((*j)->Rewrite({"b"}).ok());
    ASSERT_OK((*j)->Append({"c"}));
    ASSERT_EQ(::rmdir((*j)->compact_path().c_str()), 0);
  }
  auto j = Journal::Open(path, &records);
  ASSERT_OK(j.status());
  EXPECT_EQ(records, (std::vector<std::string>{"a", "b", "c"}));
}

TEST(JournalTest, CorruptionBeforeTheEndIsDataLoss) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::string a = Journal::EncodeRecord("aaaa"), b = Journal::EncodeRecord("bbbb");
  a[13] ^= 1;  // payload byte of the first record
  AppendRaw(path, a + b);
  std::vector<std::string> records;
  auto j = Journal::Open(path, &records);
  EXPECT_EQ(j.status().code(), absl::StatusCode::kDataLoss) << j.status();
  EXPECT_NE(std::string(j.status().message()).find("byte 0"), std::string::npos) << j.status();
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteRaw(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// An operator's report: the length field of the FIRST of three records was
// overwritten, and the coordinator dropped all three as "a torn last record".
TEST(JournalTest, BadLengthFieldIsDataLossNotATornTail) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  const std::string r0 = Journal::EncodeRecord("job one"), r1 = Journal::EncodeRecord("job two"),
                    r2 = Journal::EncodeRecord("job three");
  for (uint32_t bad_len : {0x7fffffffu, 0x00ffffffu, static_cast<uint32_t>(r0.size() + r1.size() + r2.size())}) {
    SCOPED_TRACE(bad_len);
    std::string data = r0 + r1 + r2;
    for (int i = 0; i < 4; ++i) data[4 + i] = static_cast<char>((bad_len >> (8 * i)) & 0xff);
    WriteRaw(path, data);
    std::vector<std::string> records;
    auto j = Journal::Open(path, &records);
    ASSERT_EQ(j.status().code(), absl::StatusCode::kDataLoss) << j.status();
    EXPECT_NE(std::string(j.status().message()).find("byte 0"), std::string::npos) << j.status();
    EXPECT_EQ(ReadFile(path), data) << "a damaged journal must be left untouched";
  }
  // The last record complete, only its length field too large: not torn either.
  std::string data = r0 + r1 + r2;
  const size_t last = r0.size() + r1.size();
  data[last + 4] = static_cast<char>(data[last + 4] + 3);
  WriteRaw(path, data);
  std::vector<std::string> records;
  auto j = Journal::Open(path, &records);
  ASSERT_EQ(j.status().code(), absl::StatusCode::kDataLoss) << j.status();
  EXPECT_NE(std::string(j.status().message()).find(absl::StrCat("byte ", last)), std::string::npos) << j.status();
  EXPECT_EQ(ReadFile(path), data);
}

// Corrupts every byte of a journal of many records in turn (two patterns):
// never a crash, never a silently lost or altered record before the damage,
// and damage anywhere but the last record is DATA_LOSS with the file untouched.
TEST(JournalTest, EveryByteCorruptedInTurn) {
  TempDir dir;
  const std::string path = dir.path() + "/j";
  std::vector<std::string> originals;
  std::string clean;
  std::vector<size_t> starts;
  for (int i = 0; i < 16; ++i) {
    std::string payload(static_cast<size_t>((i * 7) % 23), '\0');
    for (size_t k = 0; k < payload.size(); ++k) payload[k] = static_cast<char>((i * 31 + k * 17) & 0xff);
    originals.push_back(payload);
    starts.push_back(clean.size());
    clean += Journal::EncodeRecord(payload);
  }
  int data_loss = 0, dropped_tail = 0;
  for (size_t pos = 0; pos < clean.size(); ++pos) {
    const size_t rec = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), pos) - starts.begin()) - 1;
    for (unsigned char mask : {0x01, 0xff}) {
      SCOPED_TRACE(absl::StrCat("byte ", pos, " (record ", rec, ") xor ", mask));
      std::string data = clean;
      data[pos] = static_cast<char>(data[pos] ^ mask);
      WriteRaw(path, data);
      std::vector<std::string> records;
      auto j = Journal::Open(path, &records);
      if (!j.ok()) {
        ASSERT_EQ(j.status().code(), absl::StatusCode::kDataLoss) << j.status();
        EXPECT_NE(std::string(j.status().message()).find(absl::StrCat("byte ", starts[rec])), std::string::npos)
            << j.status();
        ASSERT_EQ(ReadFile(path), data) << "a damaged journal must be left untouched";
        ++data_loss;
        continue;
      }
      // Only the last record may be dropped as a torn tail; all before it are intact.
      ASSERT_EQ(rec, originals.size() - 1) << "damage before the last record was accepted";
      ASSERT_EQ(records.size(), originals.size() - 1);
      for (size_t k = 0; k < records.size(); ++k) ASSERT_EQ(records[k], originals[k]);
      ++dropped_tail;
    }
  }
  EXPECT_GT(data_loss, 0);
  EXPECT_GT(dropped_tail, 0);
}

TEST(JournalTest, UnwritableFolderIsAnError) {
  std::vector<std::string> records;
  auto j = Journal::Open("/nonexistent-dir/x/j", &records);
  EXPECT_FALSE(j.ok());
  EXPECT_EQ(Journal::Open("", &records).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(JournalTest, Crc32cKnownValue) {
  // RFC 3720 test vector: 32 bytes of zeros.
  const std::string zeros(32, '\0');
  EXPECT_EQ(Journal::Crc32c(zeros.data(), zeros.size()), 0x8a9136aau);
  EXPECT_EQ(Journal::Crc32c("123456789", 9), 0xe3069283u);
}

// ---------------------------------------------------------------- validation

v1::SubmitJobRequest OneSequence() {
  v1::SubmitJobRequest r;
  v1::SequenceRequest* s = r.add_sequences();
  s->add_tokens(1);
  s->add_tokens(2);
  s->set_max_new_tokens(4);
  return r;
}

void ExpectInvalid(const v1::SubmitJobRequest& r, const std::string& field) {
  const JobLimits limits{1024, 100, 8};
  absl::Status s = ValidateSubmitJob(r, limits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field << ": " << s;
  EXPECT_EQ(std::string(s.message()).rfind(field + ":", 0), 0u) << "\"" << s.message() << "\" should start with " << field;
}

TEST(ValidationTest, EveryBadFieldIsNamed) {
  const JobLimits limits{1024, 100, 8};
  EXPECT_TRUE(ValidateSubmitJob(OneSequence(), limits).ok());
  ExpectInvalid(v1::SubmitJobRequest(), "sequences");
  v1::SubmitJobRequest r = OneSequence();
  for (int i = 0; i < 8; ++i) *r.add_sequences() = r.sequences(0);
  ExpectInvalid(r, "sequences");  // 9 > 8 per job
  r = OneSequence();
  r.mutable_sequences(0)->clear_tokens();
  ExpectInvalid(r, "sequences[0].tokens");
  r = OneSequence();
  *r.add_sequences() = r.sequences(0);
  r.mutable_sequences(1)->add_tokens(1024);
  ExpectInvalid(r, "sequences[1].tokens[2]");
  r = OneSequence();
  r.mutable_sequences(0)->set_tokens(0, -1);
  ExpectInvalid(r, "sequences[0].tokens[0]");
  r = OneSequence();
  r.mutable_sequences(0)->set_max_new_tokens(0);
  ExpectInvalid(r, "sequences[0].max_new_tokens");
  r.mutable_sequences(0)->set_max_new_tokens(99);  // 2 + 99 > 100
  ExpectInvalid(r, "sequences[0].max_new_tokens");
  r.mutable_sequences(0)->set_max_new_tokens(98);
  EXPECT_TRUE(ValidateSubmitJob(r, limits).ok());
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (float t : {-0.5f, nan, std::numeric_limits<float>::infinity()}) {
    r = OneSequence();
    r.mutable_sequences(0)->mutable_sampling()->set_temperature(t);
    ExpectInvalid(r, "sequences[0].sampling.temperature");
  }
  r = OneSequence();
  r.mutable_sequences(0)->mutable_sampling()->set_top_k(-1);
  ExpectInvalid(r, "sequences[0].sampling.top_k");
  for (float p : {-0.1f, 1.5f, nan}) {
    r = OneSequence();
    r.mutable_sequences(0)->mutable_sampling()->set_top_p(p);
    ExpectInvalid(r, "sequences[0].sampling.top_p");
  }
  r = OneSequence();
  r.mutable_sequences(0)->mutable_sampling()->set_top_p(0);  // read as 1
  r.mutable_sequences(0)->mutable_sampling()->set_temperature(0.7f);
  r.mutable_sequences(0)->mutable_sampling()->set_top_k(5);
  EXPECT_TRUE(ValidateSubmitJob(r, limits).ok());
  r.mutable_sequences(0)->add_stop_token_ids(5000);
  ExpectInvalid(r, "sequences[0].stop_token_ids[0]");
  r = OneSequence();
  r.set_client_request_id(std::string(300, 'x'));
  ExpectInvalid(r, "client_request_id");
}

}  // namespace
}  // namespace expertmesh::coordinator
