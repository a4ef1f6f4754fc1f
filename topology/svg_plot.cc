#include "topology/svg_plot.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace expertmesh::topology {
namespace {

std::string Escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '<') o += "&lt;";
    else if (ch == '>') o += "&gt;";
    else if (ch == '&') o += "&amp;";
    else o += ch;
  }
  return o;
}

// "Nice" tick step (1, 2 or 5 times a power of ten) for about `n` ticks.
double NiceStep(double range, int n) {
  const double raw = range / n;
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (m * p >= raw) return m * p;
  }
  return 10 * p;
}

std::string Num(double v) {
  if (std::fabs(v) >= 10000) return absl::StrFormat("%.0fk", v / 1000);
  if (std::fabs(v) >= 100 || v == std::floor(v)) return absl::StrFormat("%.0f", v);
  return absl::StrFormat("%.3g", v);
}

struct Panel {
  double x0, y0, w, h;          // plot area in pixels
  double xmin, xmax, ymin, ymax;
  double X(double v) const { return x0 + (v - xmin) / (xmax - xmin) * w; }
  double Y(double v) const { return y0 + h - (v - ymin) / (ymax - ymin) * h; }
};

std::string Axes(const Panel& p, const std::string& xlabel, const std::string& ylabel, const std::string& title) {
  std::string s;
  absl::StrAppendFormat(&s, "<rect x='%.1f' y='%.1f' width='%.1f' height='%.1f' fill='white' stroke='#333'/>\n", p.x0,
                        p.y0, p.w, p.h);
  const double xs = NiceStep(p.xmax - p.xmin, 6), ys = NiceStep(p.ymax - p.ymin, 6);
  for (double v = std::ceil(p.xmin / xs) * xs; v <= p.xmax + 1e-9; v += xs) {
    absl::StrAppendFormat(&s, "<line x1='%.1f' y1='%.1f' x2='%.1f' y2='%.1f' stroke='#ddd'/>\n", p.X(v), p.y0, p.X(v),
                          p.y0 + p.h);
    absl::StrAppendFormat(&s, "<text x='%.1f' y='%.1f' font-size='12' text-anchor='middle'>%s</text>\n", p.X(v),
                          p.y0 + p.h + 16, Num(v));
  }
  for (double v = std::ceil(p.ymin / ys) * ys; v <= p.ymax + 1e-9; v += ys) {
    absl::StrAppendFormat(&s, "<line x1='%.1f' y1='%.1f' x2='%.1f' y2='%.1f' stroke='#ddd'/>\n", p.x0, p.Y(v),
                          p.x0 + p.w, p.Y(v));
    absl::StrAppendFormat(&s, "<text x='%.1f' y='%.1f' font-size='12' text-anchor='end'>%s</text>\n", p.x0 - 6,
                          p.Y(v) + 4, Num(v));
  }
  absl::StrAppendFormat(&s, "<text x='%.1f' y='%.1f' font-size='13' text-anchor='middle'>%s</text>\n", p.x0 + p.w / 2,
                        p.y0 + p.h + 36, Escape(xlabel));
  absl::StrAppendFormat(&s,
                        "<text x='%.1f' y='%.1f' font-size='13' text-anchor='middle' transform='rotate(-90 %.1f "
                        "%.1f)'>%s</text>\n",
                        p.x0 - 52, p.y0 + p.h / 2, p.x0 - 52, p.y0 + p.h / 2, Escape(ylabel));
  absl::StrAppendFormat(&s, "<text x='%.1f' y='%.1f' font-size='14' font-weight='bold' text-anchor='middle'>%s</text>\n",
                        p.x0 + p.w / 2, p.y0 - 10, Escape(title));
  return s;
}

}  // namespace

std::string ParetoSvg(const std::vector<SearchResult>& phases, const std::string& topo, const std::string& wl) {
  const double pw = 560, ph = 380, left = 80, top = 60, gap = 110;
  const double width = left + phases.size() * (pw + gap), height = top + ph + 90;
  std::string s = absl::StrFormat(
      "<svg xmlns='http://www.w3.org/2000/svg' width='%.0f' height='%.0f' font-family='sans-serif'>\n"
      "<rect width='100%%' height='100%%' fill='#fafafa'/>\n",
      width, height);
  absl::StrAppendFormat(&s, "<text x='%.1f' y='24' font-size='16' font-weight='bold'>expertmesh plan: %s, workload %s</text>\n",
                        left, Escape(topo), Escape(wl));
  for (size_t i = 0; i < phases.size(); ++i) {
    const SearchResult& sr = phases[i];
    if (sr.all.empty()) continue;
    const Phase phase = sr.all[0].deployment.phase;
    Panel p{left + i * (pw + gap), top, pw, ph, 0, 1, 0, 1};
    double xmax = 0, ymax = 0;
    for (const auto& r : sr.all) {
      xmax = std::max(xmax, LatencyMs(r));
      ymax = std::max(ymax, r.tokens_per_s_per_device);
    }
    p.xmax = xmax > 0 ? xmax * 1.05 : 1;
    p.ymax = ymax > 0 ? ymax * 1.08 : 1;
    const std::string lat = phase == Phase::kDecode ? "TPOT (ms)" : "TTFT (ms)";
    s += Axes(p, lat, phase == Phase::kDecode ? "output tokens/s per device" : "input tokens/s per device",
              absl::StrCat(PhaseName(phase), ": throughput vs latency (", sr.all.size(), " plans)"));
    for (const auto& r : sr.all) {
      absl::StrAppendFormat(&s, "<circle cx='%.1f' cy='%.1f' r='2.5' fill='#bbb'/>\n", p.X(LatencyMs(r)),
                            p.Y(r.tokens_per_s_per_device));
    }
    for (const auto& r : sr.ranked) {
      absl::StrAppendFormat(&s, "<circle cx='%.1f' cy='%.1f' r='3' fill='#3b6fb6'/>\n", p.X(LatencyMs(r)),
                            p.Y(r.tokens_per_s_per_device));
    }
    std::string pts;
    for (const auto& r : sr.pareto) {
      absl::StrAppendFormat(&pts, "%.1f,%.1f ", p.X(LatencyMs(r)), p.Y(r.tokens_per_s_per_device));
    }
    if (!pts.empty()) {
      absl::StrAppendFormat(&s, "<polyline points='%s' fill='none' stroke='#d62728' stroke-width='2'/>\n", pts);
      for (const auto& r : sr.pareto) {
        absl::StrAppendFormat(&s, "<circle cx='%.1f' cy='%.1f' r='4.5' fill='#d62728'/>\n", p.X(LatencyMs(r)),
                              p.Y(r.tokens_per_s_per_device));
      }
      const SimResult& best = sr.ranked.front();
      absl::StrAppendFormat(&s,
                            "<text x='%.1f' y='%.1f' font-size='12' fill='#d62728'>best: %d nodes, EP%d, PP%d, "
                            "batch %g: %.0f tok/s/dev</text>\n",
                            p.x0 + 8, p.y0 + 18, best.deployment.nodes, best.deployment.ep, best.deployment.pp,
                            best.deployment.batch_per_device, best.tokens_per_s_per_device);
    }
    // Legend.
    const double lx = p.x0 + p.w - 170, ly = p.y0 + p.h - 62;
    absl::StrAppendFormat(&s, "<rect x='%.1f' y='%.1f' width='162' height='56' fill='white' stroke='#999'/>\n", lx, ly);
    absl::StrAppendFormat(&s, "<circle cx='%.1f' cy='%.1f' r='3' fill='#bbb'/><text x='%.1f' y='%.1f' "
                              "font-size='11'>fits in memory</text>\n", lx + 10, ly + 12, lx + 20, ly + 16);
    absl::StrAppendFormat(&s, "<circle cx='%.1f' cy='%.1f' r='3' fill='#3b6fb6'/><text x='%.1f' y='%.1f' "
                              "font-size='11'>meets the SLO</text>\n", lx + 10, ly + 28, lx + 20, ly + 32);
    absl::StrAppendFormat(&s, "<circle cx='%.1f' cy='%.1f' r='4' fill='#d62728'/><text x='%.1f' y='%.1f' "
                              "font-size='11'>Pareto front</text>\n", lx + 10, ly + 44, lx + 20, ly + 48);
  }
  s += "</svg>\n";
  return s;
}

std::string BreakdownSvg(const SimResult& r, const std::string& topo) {
  std::vector<std::pair<std::string, double>> bars(r.critical_path_ms.begin(), r.critical_path_ms.end());
  std::sort(bars.begin(), bars.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  const double left = 200, top = 70, bar_h = 26, w = 520;
  const double height = top + bars.size() * (bar_h + 8) + 70;
  std::string s = absl::StrFormat(
      "<svg xmlns='http://www.w3.org/2000/svg' width='%.0f' height='%.0f' font-family='sans-serif'>\n"
      "<rect width='100%%' height='100%%' fill='#fafafa'/>\n",
      left + w + 120, height);
  absl::StrAppendFormat(&s, "<text x='20' y='26' font-size='15' font-weight='bold'>%s on %s</text>\n",
                        Escape(r.deployment.ToString()), Escape(topo));
  absl::StrAppendFormat(&s,
                        "<text x='20' y='48' font-size='13'>step %.2f ms per stage, %.0f tok/s per device, %.1f GiB "
                        "per device, bottleneck: %s</text>\n",
                        r.stage_time_ms, r.tokens_per_s_per_device, r.memory_gib_per_device, Escape(r.bottleneck));
  double mx = 0;
  for (const auto& b : bars) mx = std::max(mx, b.second);
  if (mx <= 0) mx = 1;
  for (size_t i = 0; i < bars.size(); ++i) {
    const double y = top + i * (bar_h + 8);
    absl::StrAppendFormat(&s, "<text x='%.1f' y='%.1f' font-size='13' text-anchor='end'>%s</text>\n", left - 8,
                          y + bar_h * 0.7, Escape(bars[i].first));
    absl::StrAppendFormat(&s, "<rect x='%.1f' y='%.1f' width='%.1f' height='%.1f' fill='#3b6fb6'/>\n", left, y,
                          std::max(1.0, bars[i].second / mx * w), bar_h);
    absl::StrAppendFormat(&s, "<text x='%.1f' y='%.1f' font-size='12'>%.2f ms</text>\n",
                          left + bars[i].second / mx * w + 6, y + bar_h * 0.7, bars[i].second);
  }
  absl::StrAppendFormat(&s, "<text x='%.1f' y='%.1f' font-size='12' fill='#555'>critical path of one step of the "
                            "slowest stage, by limiting resource</text>\n", left, height - 24);
  s += "</svg>\n";
  return s;
}

}  // namespace expertmesh::topology
