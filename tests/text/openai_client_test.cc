// launch/openai_client: the server-sent-events parser (any split of the bytes,
// \n / \r\n / \r line ends, multi-line data, comments), --server parsing and
// OpenAI error bodies to canonical codes.
#include "launch/openai_client.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace expertmesh::launch {
namespace {

std::vector<std::string> ParseAll(const std::vector<std::string>& pieces) {
  std::vector<std::string> events;
  SseParser p([&](absl::string_view d) {
    events.emplace_back(d);
    return true;
  });
  for (const auto& piece : pieces) EXPECT_TRUE(p.Feed(piece));
  return events;
}

TEST(SseParser, EventsInAnySplit) {
  const std::string body =
      ": keep-alive comment\n\n"
      "data: {\"a\":1}\n\n"
      "event: message\r\nid: 7\r\ndata: {\"b\":\r\ndata:2}\r\n\r\n"
      "retry: 100\rdata:  two spaces\r\r"
      "data: [DONE]\n\n";
  const std::vector<std::string> want = {"{\"a\":1}", "{\"b\":\n2}", " two spaces", "[DONE]"};
  EXPECT_EQ(ParseAll({body}), want);
  for (size_t cut = 0; cut <= body.size(); ++cut) {  // every split in two
    EXPECT_EQ(ParseAll({body.substr(0, cut), body.substr(cut)}), want) << "cut at " << cut;
  }
  std::vector<std::string> bytes;
  for (char c : body) bytes.emplace_back(1, c);
  EXPECT_EQ(ParseAll(bytes), want);
}

TEST(SseParser, IncompleteEventIsNotDelivered) {
  EXPECT_TRUE(ParseAll({"data: x\n"}).empty());
  EXPECT_TRUE(ParseAll({"event: ping\n\n"}).empty());
}

TEST(SseParser, StopsWhenAsked) {
  int seen = 0;
  SseParser p([&](absl::string_view) { return ++seen < 2; });
  EXPECT_FALSE(p.Feed("data: 1\n\ndata: 2\n\ndata: 3\n\n"));
  EXPECT_EQ(seen, 2);
  EXPECT_FALSE(p.Feed("data: 4\n\n"));
  EXPECT_EQ(seen, 2);
}

TEST(ParseHttpServer, Forms) {
  auto a = ParseHttpServer("127.0.0.1:8000");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 8000);
  EXPECT_EQ(a->Url(), "http://127.0.0.1:8000");
  auto b = ParseHttpServer("http://localhost:80/");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->host, "localhost");
  auto c = ParseHttpServer("[::1]:9000");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->host, "::1");
  EXPECT_EQ(c->Url(), "http://[::1]:9000");
  for (const char* bad : {"localhost", "host:0", "host:99999", "host:x", "https://h:1", "http://h:1/v1", ":80"}) {
    EXPECT_EQ(ParseHttpServer(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(HttpError, OpenAiShapeToCodes) {
  absl::Status s = HttpError(400, R"({"error":{"message":"temperature: must be >= 0","type":"invalid_request_error",
                                      "param":"temperature","code":null}})");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "HTTP 400: temperature: must be >= 0 (param: temperature)");
  EXPECT_EQ(HttpError(404, "{}").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(HttpError(429, "").code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(HttpError(503, R"({"error":{"message":"not serving"}})").message(), "HTTP 503: not serving");
  EXPECT_EQ(HttpError(503, "").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(HttpError(500, "<html>").message(), "HTTP 500: <html>");
  EXPECT_EQ(HttpError(401, "").code(), absl::StatusCode::kUnauthenticated);
}

TEST(OpenAiClient, ServerDownIsUnavailableAndSaysWhere) {
  // Port 1 on loopback: nothing listens there (connection refused).
  OpenAiClient client({"127.0.0.1", 1}, "", 5);
  auto r = client.Get("/v1/models");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(r.status().message().find("http://127.0.0.1:1"), std::string::npos) << r.status();
  absl::Status s = client.Stream("/v1/chat/completions", {{"stream", true}}, {}, [](const nlohmann::json&) {
    return true;
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
}

}  // namespace
}  // namespace expertmesh::launch
