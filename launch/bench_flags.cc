#include "launch/bench_flags.h"

#include "absl/flags/flag.h"

ABSL_FLAG(int64_t, tokens, 512, "tokens per rank (per step) in the benchmarked batch");
ABSL_FLAG(int64_t, iters, 0, "timed iterations (0: as many as fit in --min_seconds)");
ABSL_FLAG(double, min_seconds, 2.0, "minimum time spent in timed iterations per measurement");
