// BASE layers' balanced assignment on the CPU: the auction of fastlm/ops/base_assignment.py in
// float64, step for step as csrc/cuda/moe_base_assignment.cu runs it (same warm start, same eps
// phases, same tie rules), so the two backends return the same ids and prices.
//   1. Dual warm start: kBaseDualSweeps sweeps over the experts; expert e's price is set between
//      the c_e-th and c_e+1-th largest margin a_te - max_{k != e} (a_tk - p_k) (nth_element).
//      The margins are the cost, T * E per expert: parallel over tokens.
//   2. eps phases from spread / 64 down to eps, each a Jacobi forward auction from the last
//      phase's prices: every free token bids for its best expert (parallel over tokens: E loads
//      each), bids are grouped by expert and sorted (descending bid, ties to the lower token);
//      the r-th bid takes the r-th cheapest slot while it beats that slot's price. Each expert's
//      slot prices stay sorted (the winners' bids are merged in), so the cheapest and second
//      cheapest slots are the first two.
// With warm-started prices a phase takes a few rounds (2 per phase at T = 4096, E = 8), so the
// warm start's 5 * E margin passes over T x E scores dominate.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fastlm/moe.h"
#include "vec_math.h"

namespace fastlm::cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Scores {
  const BaseAssignmentArgs& a;
  double operator()(int64_t t, int64_t e) const {
    const int64_t at = t * a.scores_stride0 + e * a.scores_stride1;
    if (a.dtype == DType::kFloat32) return double(static_cast<const float*>(a.scores)[at]);
    return double(scalar_to_float(static_cast<const uint16_t*>(a.scores)[at]));
  }
};

void mark_invalid(int64_t T, int64_t E, int32_t* ids, double* prices) {
  std::fill(ids, ids + T, -1);
  std::fill(prices, prices + E, std::numeric_limits<double>::quiet_NaN());
}

// The dual warm start (the reference's _dual_prices).
std::vector<double> dual_prices(const Scores& a, int64_t T, int64_t E, const std::vector<int64_t>& cap) {
  std::vector<double> p(E, 0.0), margin(T);
  if (E < 2 || T == 0) return p;
  for (int sweep = 0; sweep < kBaseDualSweeps; ++sweep)
    for (int64_t ex = 0; ex < E; ++ex) {
#pragma omp parallel for schedule(static) if (T * E > 32768)
      for (int64_t t = 0; t < T; ++t) {
        double others = -kInf;
        for (int64_t k = 0; k < E; ++k)
          if (k != ex) others = std::max(others, a(t, k) - p[k]);
        margin[t] = a(t, ex) - others;
      }
      const int64_t c = cap[ex];
      double hi, lo;
      if (c > 0) {
        std::nth_element(margin.begin(), margin.begin() + (c - 1), margin.end(), std::greater<double>());
        hi = margin[c - 1];
        lo = c < T ? *std::max_element(margin.begin() + c, margin.end()) : hi - 1;
      } else {
        lo = *std::max_element(margin.begin(), margin.end());
        hi = lo + 1;
      }
      p[ex] = (hi + lo) / 2;
    }
  return p;
}

struct Bid {
  double value;
  int32_t token;
};

}  // namespace
}  // namespace fastlm::cpu

namespace fastlm {

void moe_base_assignment_cpu(const BaseAssignmentArgs& args, int32_t* ids, double* prices_out) {
  const int64_t T = args.tokens, E = args.experts;
  using namespace cpu;
  const Scores a{args};
  std::vector<int64_t> cap(E), base(E + 1, 0);
  int64_t total = 0;
  bool capacity_ok = true;
  for (int64_t e = 0; e < E; ++e) {
    cap[e] = args.capacity ? args.capacity[e] : T / E + (e < T % E);
    capacity_ok = capacity_ok && cap[e] >= 0;
    base[e + 1] = base[e] + cap[e];
    total += cap[e];
  }
  double lo_score = kInf, hi_score = -kInf;
  bool finite = true;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      const double v = a(t, e);
      finite = finite && std::isfinite(v);
      lo_score = std::min(lo_score, v);
      hi_score = std::max(hi_score, v);
    }
  if (!finite || !capacity_ok || total != T) return mark_invalid(T, E, ids, prices_out);
  const double spread = T ? hi_score - lo_score : 0.0;
  const double eps = args.eps > 0 ? args.eps : std::max(spread, 1e-12) * kBaseDefaultEpsFactor * (1.0 / double(E));

  // slot s of expert e is price[base[e] + s], kept ascending; holder -1: empty
  const std::vector<double> p0 = dual_prices(a, T, E, cap);
  std::vector<double> price(T), merged_price(T);
  std::vector<int32_t> holder(T), merged_holder(T), owner(T), choice(T);
  std::vector<double> bid(T);
  for (int64_t e = 0; e < E; ++e) std::fill(price.begin() + base[e], price.begin() + base[e + 1], p0[e]);
  std::vector<std::vector<Bid>> bucket(E);
  std::vector<int32_t> free_tokens;
  free_tokens.reserve(T);

  double step = T ? std::max(spread, eps) / kBaseFirstStepDivisor : eps;
  int64_t rounds = 0;
  while (true) {
    step = std::max(step, eps);
    std::fill(owner.begin(), owner.end(), -1);
    std::fill(holder.begin(), holder.end(), -1);
    while (true) {
      free_tokens.clear();
      for (int64_t t = 0; t < T; ++t)
        if (owner[t] < 0) free_tokens.push_back(int32_t(t));
      if (free_tokens.empty()) break;
      if (rounds++ >= args.max_rounds) return mark_invalid(T, E, ids, prices_out);
      const int64_t F = int64_t(free_tokens.size());
#pragma omp parallel for schedule(static) if (F * E > 32768)
      for (int64_t f = 0; f < F; ++f) {
        const int64_t t = free_tokens[f];
        // best expert at its cheapest slot (ties to the lower expert), the best other expert
        double best = -kInf, other = -kInf;
        int64_t j = 0;
        for (int64_t k = 0; k < E; ++k) {
          const double v = cap[k] ? a(t, k) - price[base[k]] : -kInf;
          if (v > best) {
            other = best;
            best = v;
            j = k;
          } else {
            other = std::max(other, v);
          }
        }
        const double aj = a(t, j);
        const double same = cap[j] > 1 ? aj - price[base[j] + 1] : -kInf;  // j's next-cheapest slot
        double runner_up = std::max(other, same);
        if (!std::isfinite(runner_up)) runner_up = best - 1.0;  // a single option: bid + 1
        choice[t] = int32_t(j);
        bid[t] = aj - runner_up + step;
      }
      for (int64_t e = 0; e < E; ++e) bucket[e].clear();
      for (int32_t t : free_tokens) bucket[choice[t]].push_back({bid[t], t});
      for (int64_t e = 0; e < E; ++e) {
        std::vector<Bid>& b = bucket[e];
        if (b.empty()) continue;
        std::sort(b.begin(), b.end(),
                  [](const Bid& x, const Bid& y) { return x.value != y.value ? x.value > y.value : x.token < y.token; });
        const int64_t first = base[e], c = cap[e];
        int64_t won = 0;
        while (won < int64_t(b.size()) && won < c && b[won].value > price[first + won]) ++won;
        if (won == 0) continue;
        for (int64_t r = 0; r < won; ++r) {
          const int32_t evicted = holder[first + r];
          if (evicted >= 0) owner[evicted] = -1;
          owner[b[r].token] = int32_t(e);
        }
        // merge the kept slots [won, c) (ascending) with the winners (ascending: rank won-1 .. 0);
        // at equal prices the kept slot goes first
        int64_t i = won, w = won - 1, out = first;
        while (i < c || w >= 0) {
          if (w < 0 || (i < c && price[first + i] <= b[w].value)) {
            merged_price[out] = price[first + i];
            merged_holder[out++] = holder[first + i++];
          } else {
            merged_price[out] = b[w].value;
            merged_holder[out++] = b[w--].token;
          }
        }
        std::copy(merged_price.begin() + first, merged_price.begin() + first + c, price.begin() + first);
        std::copy(merged_holder.begin() + first, merged_holder.begin() + first + c, holder.begin() + first);
      }
    }
    if (step <= eps) break;
    step /= kBaseStepDivisor;
  }
  std::copy(owner.begin(), owner.end(), ids);
  for (int64_t e = 0; e < E; ++e) prices_out[e] = cap[e] ? price[base[e]] : 0.0;
}

}  // namespace fastlm
