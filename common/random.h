// Counter-based randomness shared by the checkpoint generator and sampling:
// values depend only on their inputs, never on call order or threads.
#pragma once

#include <cstdint>

namespace expertmesh {

// splitmix64: a small, well-mixed bijection on 64-bit words.
inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The top 53 bits of `bits` as a double in the open interval (0, 1).
inline double UnitInterval(uint64_t bits) {
  return (static_cast<double>(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

}  // namespace expertmesh
