// CUDA device discovery. Safe to call on machines without a GPU or driver:
// the CUDA runtime is linked statically and finds the driver at run time.
#pragma once

#include <string>

namespace expertmesh::kernels::cuda {

// True when a CUDA device can be used; otherwise `why` says why not
// (no driver, no device, ...), in one line.
bool DeviceAvailable(std::string* why);
// "NVIDIA H100 80GB HBM3 (sm_90, 79 GiB)" or the reason there is none.
std::string DeviceDescription();

}  // namespace expertmesh::kernels::cuda
