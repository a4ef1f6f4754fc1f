#include "common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace expertmesh {

using nlohmann::json;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

namespace {
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // as the reference implementation
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open (", std::strerror(errno), ")"));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": fstat failed (", std::strerror(err), ")"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, ": truncated safetensors file (", size,
                                            " bytes; expected at least an 8-byte header length)"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) {
    return absl::InternalError(absl::StrCat(path, ": mmap failed (", std::strerror(errno), ")"));
  }
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_ = map;
  f->size_ = size;
  const uint8_t* base = static_cast<const uint8_t*>(map);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];
  if (header_len > kMaxHeaderBytes || header_len > size - 8) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", header_len,
                                            " exceeds the file (", size, " bytes): truncated or corrupt"));
  }
  json header = json::parse(base + 8, base + 8 + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) {
    return absl::DataLossError(absl::StrCat(path, ": header is not a JSON object: corrupt file"));
  }
  const uint8_t* data = base + 8 + header_len;
  const size_t data_size = size - 8 - header_len;
  std::vector<std::string> errs;
  std::vector<std::pair<uint64_t, std::pair<uint64_t, std::string>>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (it->is_object()) {
        for (auto m = it->begin(); m != it->end(); ++m) {
          if (m->is_string()) f->metadata_[m.key()] = m->get<std::string>();
        }
      }
      continue;
    }
    const json& e = it.value();
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets") ||
        !e["dtype"].is_string() || !e["shape"].is_array() || !e["data_offsets"].is_array() ||
        e["data_offsets"].size() != 2) {
      errs.push_back(absl::StrCat(name, ": malformed entry (need dtype, shape, data_offsets[2])"));
      continue;
    }
    TensorView v;
    v.name = name;
    v.file = path;
    auto dt = ParseDType(e["dtype"].get<std::string>());
    if (!dt.ok()) {
      errs.push_back(absl::StrCat(name, ": ", dt.status().message()));
      continue;
    }
    v.dtype = *dt;
    bool bad_shape = false;
    for (const auto& d : e["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        bad_shape = true;
        break;
      }
      v.shape.push_back(d.get<int64_t>());
    }
    const auto& off = e["data_offsets"];
    if (bad_shape || !off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      errs.push_back(absl::StrCat(name, ": shape or data_offsets are not non-negative integers"));
      continue;
    }
    const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    // Element and byte counts in 64 bits without wrapping: a shape such as
    // [2^32, 2^32] must not pass as an empty tensor.
    uint64_t want = DTypeSize(v.dtype);
    bool too_big = false;
    for (int64_t d : v.shape) {
      const uint64_t ud = static_cast<uint64_t>(d);
      if (ud != 0 && want > UINT64_MAX / ud) too_big = true;
      want *= ud;
    }
    if (too_big) {
      errs.push_back(absl::StrCat(name, ": shape ", ShapeString(v.shape), " has more than 2^64 bytes: corrupt"));
      continue;
    }
    if (b > en || en > data_size) {
      errs.push_back(absl::StrCat(name, ": data_offsets [", b, ", ", en, ") out of range (data section is ",
                                  data_size, " bytes): truncated or corrupt"));
      continue;
    }
    if (en - b != want) {
      errs.push_back(absl::StrCat(name, ": ", en - b, " bytes for ", DTypeName(v.dtype), " ",
                                  ShapeString(v.shape), " (expected ", want, ")"));
      continue;
    }
    v.data = data + b;
    v.nbytes = en - b;
    ranges.push_back({b, {en, name}});
    f->tensors_[name] = std::move(v);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second.first) {
      errs.push_back(absl::StrCat("tensors ", ranges[i - 1].second.second, " and ", ranges[i].second.second,
                                  " overlap in the data section"));
    }
  }
  if (!errs.empty()) {
    return absl::DataLossError(absl::StrCat(path, ": ", absl::StrJoin(errs, "; ")));
  }
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, size_);
}

const TensorView* SafetensorsFile::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::StatusOr<std::unique_ptr<ShardedCheckpoint>> ShardedCheckpoint::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": checkpoint folder does not exist"));
  }
  auto ck = std::unique_ptr<ShardedCheckpoint>(new ShardedCheckpoint());
  ck->dir_ = dir;
  std::vector<std::string> shard_files;
  std::map<std::string, std::string> weight_map;
  const std::string index_path = dir + "/model.safetensors.index.json";
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    std::stringstream ss;
    ss << in.rdbuf();
    json j = json::parse(ss.str(), nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
      return absl::DataLossError(absl::StrCat(index_path, ": not a JSON object with a \"weight_map\""));
    }
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it->is_string()) return absl::DataLossError(absl::StrCat(index_path, ": weight_map[", it.key(), "] is not a file name"));
      weight_map[it.key()] = it->get<std::string>();
      shard_files.push_back(it->get<std::string>());
    }
    std::sort(shard_files.begin(), shard_files.end());
    shard_files.erase(std::unique(shard_files.begin(), shard_files.end()), shard_files.end());
  } else {
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      if (e.path().extension() == ".safetensors") shard_files.push_back(e.path().filename().string());
    }
    std::sort(shard_files.begin(), shard_files.end());
    if (shard_files.empty()) {
      return absl::NotFoundError(absl::StrCat(dir, ": no model.safetensors.index.json and no *.safetensors file"));
    }
  }
  std::vector<std::string> errs;
  for (const auto& s : shard_files) {
    auto f = SafetensorsFile::Open(dir + "/" + s);
    if (!f.ok()) {
      errs.push_back(std::string(f.status().message()));
      continue;
    }
    ck->files_.push_back(std::move(*f));
  }
  if (!errs.empty()) return absl::DataLossError(absl::StrJoin(errs, "; "));  // one line
  for (const auto& f : ck->files_) {
    const std::string base = fs::path(f->path()).filename().string();
    for (const auto& [name, view] : f->tensors()) {
      if (!weight_map.empty()) {
        auto it = weight_map.find(name);
        if (it == weight_map.end()) continue;  // not indexed: ignore, as HF does
        if (it->second != base) continue;
      }
      if (ck->index_.count(name)) {
        errs.push_back(absl::StrCat(name, ": present in two shards (", ck->index_[name]->file, ", ", f->path(), ")"));
        continue;
      }
      ck->index_[name] = &view;
    }
  }
  for (const auto& [name, file] : weight_map) {
    if (!ck->index_.count(name)) {
      errs.push_back(absl::StrCat(name, ": listed in the index under ", file, " but not found in that shard"));
    }
  }
  if (!errs.empty()) return absl::DataLossError(absl::StrCat(dir, ": ", absl::StrJoin(errs, "; ")));
  return ck;
}

const TensorView* ShardedCheckpoint::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

std::vector<std::string> ShardedCheckpoint::Names() const {
  std::vector<std::string> n;
  for (const auto& [k, v] : index_) n.push_back(k);
  return n;
}

void SafetensorsWriter::Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            std::vector<uint8_t> bytes) {
  data_bytes_ += bytes.size();
  entries_.push_back({name, dtype, std::move(shape), std::move(bytes)});
}

void SafetensorsWriter::AddF32(const std::string& name, std::vector<int64_t> shape,
                               const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  Add(name, DType::kF32, std::move(shape), std::move(b));
}

std::vector<std::string> SafetensorsWriter::names() const {
  std::vector<std::string> n;
  for (const auto& e : entries_) n.push_back(e.name);
  return n;
}

absl::Status SafetensorsWriter::Write(const std::string& path) const {
  json header = json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t off = 0;
  for (const auto& e : entries_) {
    header[e.name] = {{"dtype", DTypeName(e.dtype)}, {"shape", e.shape}, {"data_offsets", {off, off + e.bytes.size()}}};
    off += e.bytes.size();
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h.push_back(' ');  // align the data section to 8 bytes
  const std::string tmp = path + ".tmp";
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(tmp, ": cannot create file"));
  uint8_t len[8];
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (const auto& e : entries_) {
    out.write(reinterpret_cast<const char*>(e.bytes.data()), static_cast<std::streamsize>(e.bytes.size()));
  }
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat(tmp, ": write failed (disk full?)"));
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat(path, ": rename failed: ", ec.message()));
  return absl::OkStatus();
}

}  // namespace expertmesh
