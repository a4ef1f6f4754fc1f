// RunGeneration's check of the logits before sampling (issue 15): a
// non-finite row fails the batch naming the prompt and the step, instead of
// sampling token 0 from it.
#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "worker/generation.h"

namespace expertmesh::worker {
namespace {

TEST(CheckLogitsFinite, AcceptsFiniteRowsAndNamesPromptAndStep) {
  std::vector<float> row = {0.5f, -3.0f, 1e30f, -1e30f};
  EXPECT_TRUE(CheckLogitsFinite(row.data(), 4, 0, 0).ok());
  EXPECT_TRUE(CheckLogitsFinite(row.data(), 0, 0, 0).ok());  // empty row
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    row[2] = bad;
    absl::Status s = CheckLogitsFinite(row.data(), 4, 3, 7);
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(s.message().find("prompt 3, step 7"), absl::string_view::npos) << s.message();
    EXPECT_NE(s.message().find("not finite"), absl::string_view::npos) << s.message();
    EXPECT_NE(s.message().find("token 2"), absl::string_view::npos) << s.message();
    EXPECT_NE(s.message().find("weight_scale_inv"), absl::string_view::npos) << s.message();
  }
}

// A fake engine: vocab 4, the argmax is token 2 unless the step and request
// are the poisoned ones, whose row is NaN.
absl::StatusOr<std::vector<GenerationResult>> RunFake(int poisoned_call, size_t poisoned_request) {
  std::vector<GenerationRequest> reqs(2);
  for (auto& r : reqs) {
    r.prompt = {1, 2};
    r.max_new_tokens = 3;
  }
  int call = 0;
  return RunGeneration(reqs, [&](const std::vector<StepItem>& items, std::vector<float>* logits) {
    logits->assign(items.size() * 4, 0.0f);
    for (size_t k = 0; k < items.size(); ++k) {
      (*logits)[k * 4 + 2] = 1.0f;
      if (call == poisoned_call && items[k].request == poisoned_request) {
        (*logits)[k * 4 + 1] = std::numeric_limits<float>::quiet_NaN();
      }
    }
    ++call;
    return absl::OkStatus();
  });
}

TEST(RunGeneration, FiniteLogitsGenerate) {
  auto r = RunFake(-1, 0);
  ASSERT_TRUE(r.ok()) << r.status();
  for (const auto& g : *r) EXPECT_EQ(g.tokens, (std::vector<int32_t>{2, 2, 2}));
}

TEST(RunGeneration, NonFinitePrefillRowFailsNamingPromptAndStep0) {
  auto r = RunFake(0, 1);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("prompt 1, step 0:"), absl::string_view::npos) << r.status();
}

TEST(RunGeneration, NonFiniteDecodeRowFailsNamingItsStep) {
  auto r = RunFake(2, 0);  // the second decode step samples each request's third token
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("prompt 0, step 2:"), absl::string_view::npos) << r.status();
}

}  // namespace
}  // namespace expertmesh::worker
