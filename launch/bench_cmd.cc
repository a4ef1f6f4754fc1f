// Placeholder while this verb is being written; replaced in the same series of commits.
#include <cstdio>
#include "launch/verbs.h"
namespace expertmesh::launch {
int BenchMain(int argc, char** argv) {
  ParseVerbFlags(argc, argv);
  std::fprintf(stderr, "expertmesh: this verb is not built yet\n");
  return 3;
}
}  // namespace expertmesh::launch
