#include "kernels/cuda/device.h"

#include <cuda_runtime.h>

#include <cstdio>

namespace expertmesh::kernels::cuda {

bool DeviceAvailable(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why) *why = std::string("no usable CUDA device: ") + cudaGetErrorString(e);
    cudaGetLastError();  // clear the sticky error
    return false;
  }
  if (n == 0) {
    if (why) *why = "no CUDA device present";
    return false;
  }
  return true;
}

std::string DeviceDescription() {
  std::string why;
  if (!DeviceAvailable(&why)) return why;
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  char buf[256];
  std::snprintf(buf, sizeof(buf), "%s (sm_%d%d, %zu GiB)", p.name, p.major, p.minor,
                static_cast<size_t>(p.totalGlobalMem >> 30));
  return buf;
}

}  // namespace expertmesh::kernels::cuda
