// safetensors files (read through mmap) and HF sharded checkpoints
// (`model.safetensors.index.json`), plus a writer.
//
// Format: 8-byte little-endian header length N, N bytes of JSON
// {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the data; offsets are relative to the end of the header.
//
//   ASSIGN_OR_RETURN(auto ckpt, ShardedCheckpoint::Open("ckpt/"));
//   const TensorView* t = ckpt->Find("model.norm.weight");
//
// Opening validates the header (size in range, JSON, dtypes, shapes, offsets
// inside the file, no overlaps, byte sizes consistent) and reports all
// problems of a file at once. Data pages are touched only when read.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace expertmesh {

struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // inside the mmap of `file`
  size_t nbytes = 0;
  std::string file;               // the shard this tensor lives in
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

std::string ShapeString(const std::vector<int64_t>& shape);

// One memory-mapped .safetensors file.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const TensorView* Find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint folder: either `model.safetensors.index.json` with its shards,
// or a single `model.safetensors` (or any one *.safetensors file).
class ShardedCheckpoint {
 public:
  static absl::StatusOr<std::unique_ptr<ShardedCheckpoint>> Open(const std::string& dir);
  const TensorView* Find(const std::string& name) const;
  std::vector<std::string> Names() const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
};

// Writes one safetensors file. Tensors are laid out in the order added.
class SafetensorsWriter {
 public:
  void Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
           std::vector<uint8_t> bytes);
  void AddF32(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v);
  void SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  size_t data_bytes() const { return data_bytes_; }
  bool empty() const { return entries_.empty(); }
  std::vector<std::string> names() const;
  absl::Status Write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
  size_t data_bytes_ = 0;
};

}  // namespace expertmesh
