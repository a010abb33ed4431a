// The MoE router on the CPU, forward and backward, one pass per token row: scores (softmax or
// sigmoid) in fp32, top-k by partial selection (descending score, ties to the lower expert, NaN
// ranked above everything as torch's descending sort does, so a NaN row never breaks the
// ordering), renormalisation, then GShard capacity as a serial slot-major scan over the T*k
// assignments (cheap next to reading the logits). The losses are reduced per fixed chunk of rows
// in double and the chunks combined in order, so results do not depend on the thread count.
// The backward recomputes scores, selection and drops from the logits (nothing saved but the
// logits), then applies the chain rule of moe_spec.md per row.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "fastlm/moe.h"
#include "vec_math.h"

namespace fastlm::cpu {
namespace {

constexpr int64_t kRowsPerChunk = 64;

struct Chunks {
  int64_t count;
  explicit Chunks(int64_t rows) : count((rows + kRowsPerChunk - 1) / kRowsPerChunk) {}
  static int64_t begin(int64_t c) { return c * kRowsPerChunk; }
  static int64_t end(int64_t c, int64_t rows) { return std::min(rows, (c + 1) * kRowsPerChunk); }
};

// Per-thread row scratch: logits l, scores s, softmax q, the selection order.
struct RowScratch {
  std::vector<float> l, s, q, ds;
  std::vector<int32_t> order;
  explicit RowScratch(int64_t e) : l(e), s(e), q(e), ds(e), order(e) {}
};

// Fills l, q = softmax(l), s (= q, or sigmoid(l)); returns logsumexp(l). NaN propagates.
float row_scores(const MoeRouterArgs& a, int64_t t, RowScratch& r) {
  const int64_t E = a.experts;
  if (a.dtype == DType::kFloat32) {
    const float* p = static_cast<const float*>(a.logits) + t * a.logits_stride0;
    for (int64_t e = 0; e < E; ++e) r.l[e] = p[e * a.logits_stride1];
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(a.logits) + t * a.logits_stride0;
    for (int64_t e = 0; e < E; ++e) r.l[e] = scalar_to_float(p[e * a.logits_stride1]);
  }
  float m = -INFINITY;
  for (int64_t e = 0; e < E; ++e) m = r.l[e] > m ? r.l[e] : m;  // NaN skipped here, caught by exp below
  float sum = 0.0f;
  for (int64_t e = 0; e < E; ++e) {
    r.q[e] = std::exp(r.l[e] - m);
    sum += r.q[e];
  }
  const float inv = 1.0f / sum;
  for (int64_t e = 0; e < E; ++e) r.q[e] *= inv;
  if (a.sigmoid) {
    for (int64_t e = 0; e < E; ++e) r.s[e] = 1.0f / (1.0f + std::exp(-r.l[e]));
  } else {
    std::copy(r.q.begin(), r.q.end(), r.s.begin());
  }
  return m + std::log(sum);
}

// order[0..k) = the k best experts, best first (a strict total order: NaN first, then
// descending score, ties by ascending index).
void row_select(int64_t E, int64_t k, RowScratch& r) {
  std::iota(r.order.begin(), r.order.end(), 0);
  const float* s = r.s.data();
  auto better = [s](int32_t x, int32_t y) {
    const float a = s[x], b = s[y];
    const bool an = a != a, bn = b != b;
    if (an || bn) return an != bn ? an : x < y;
    return a != b ? a > b : x < y;
  };
  if (k == 1) {
    r.order[0] = int32_t(std::min_element(r.order.begin(), r.order.end(), better) - r.order.begin());
    return;
  }
  std::partial_sort(r.order.begin(), r.order.begin() + k, r.order.end(), better);
}

// GShard capacity, slot-major: sel (T, k) holds expert indices; dropped ones become ~e (< 0).
// kept (E,) receives the kept count per expert.
void apply_capacity(int64_t T, int64_t k, int64_t E, int64_t capacity, int32_t* sel, std::vector<int64_t>* kept) {
  kept->assign(size_t(E), 0);
  for (int64_t slot = 0; slot < k; ++slot)
    for (int64_t t = 0; t < T; ++t) {
      int32_t& e = sel[t * k + slot];
      if (capacity < 0 || (*kept)[e] < capacity) ++(*kept)[e];
      else e = ~e;
    }
}

// Runs body(thread_scratch, chunk) over every chunk of rows, in parallel when it pays.
template <typename F>
void for_each_chunk(const MoeRouterArgs& a, const Chunks& chunks, F&& body) {
  const bool parallel = chunks.count > 1 && a.tokens * a.experts >= (1 << 12);
#pragma omp parallel if (parallel)
  {
    RowScratch scratch(a.experts);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks.count; ++c) body(scratch, c);
  }
}

}  // namespace
}  // namespace fastlm::cpu

namespace fastlm {

void moe_router_forward_cpu(const MoeRouterArgs& a, int32_t* expert_ids, float* weights, int32_t* counts,
                            float* aux_loss, float* z_loss) {
  using namespace cpu;
  const int64_t T = a.tokens, E = a.experts, k = a.top_k;
  if (T == 0) {
    std::fill(counts, counts + E, 0);
    *aux_loss = 0.0f;
    *z_loss = 0.0f;
    return;
  }
  const Chunks chunks(T);
  std::vector<int64_t> chunk_counts(size_t(chunks.count * E), 0);
  std::vector<double> chunk_prob(size_t(chunks.count * E), 0.0), chunk_z(size_t(chunks.count), 0.0);
  for_each_chunk(a, chunks, [&](RowScratch& r, int64_t c) {
    int64_t* cnt = chunk_counts.data() + c * E;
    double* prob = chunk_prob.data() + c * E;
    double z = 0.0;
    for (int64_t t = Chunks::begin(c); t < Chunks::end(c, T); ++t) {
      const float lse = row_scores(a, t, r);
      z += double(lse) * double(lse);
      row_select(E, k, r);
      float sum = 0.0f;
      for (int64_t i = 0; i < k; ++i) sum += r.s[r.order[i]];
      for (int64_t i = 0; i < k; ++i) {
        const int32_t e = r.order[i];
        expert_ids[t * k + i] = e;
        weights[t * k + i] = a.normalize ? r.s[e] / sum : r.s[e];
        ++cnt[e];
      }
      if (a.sigmoid) {  // p = s / sum(s)
        float total = 0.0f;
        for (int64_t e = 0; e < E; ++e) total += r.s[e];
        for (int64_t e = 0; e < E; ++e) prob[e] += double(r.s[e] / total);
      } else {
        for (int64_t e = 0; e < E; ++e) prob[e] += double(r.q[e]);
      }
    }
    chunk_z[c] = z;
  });
  // Combine the chunks in order: the same sums for every thread count.
  double z = 0.0, aux = 0.0;
  for (int64_t c = 0; c < chunks.count; ++c) z += chunk_z[c];
  for (int64_t e = 0; e < E; ++e) {
    int64_t selected = 0;
    double prob = 0.0;
    for (int64_t c = 0; c < chunks.count; ++c) {
      selected += chunk_counts[c * E + e];
      prob += chunk_prob[c * E + e];
    }
    aux += (double(selected) / double(T)) * (prob / double(T));
  }
  *aux_loss = float(double(E) * aux);
  *z_loss = float(z / double(T));

  std::vector<int64_t> kept;
  apply_capacity(T, k, E, a.capacity, expert_ids, &kept);
  for (int64_t e = 0; e < E; ++e) counts[e] = int32_t(kept[e]);
  if (a.capacity >= 0) {
    for (int64_t i = 0; i < T * k; ++i)
      if (expert_ids[i] < 0) {
        expert_ids[i] = -1;
        weights[i] = 0.0f;
      }
  }
}

void moe_router_backward_cpu(const MoeRouterArgs& a, const float* grad_weights, int64_t gw_stride0,
                             int64_t gw_stride1, float grad_aux, float grad_z, void* grad_logits) {
  using namespace cpu;
  const int64_t T = a.tokens, E = a.experts, k = a.top_k;
  if (T == 0) return;
  const Chunks chunks(T);
  // Pass 1: the selection (and the pre-capacity counts f_e), then the drops.
  std::vector<int32_t> sel(size_t(T * k));
  std::vector<int64_t> chunk_counts(size_t(chunks.count * E), 0);
  for_each_chunk(a, chunks, [&](RowScratch& r, int64_t c) {
    int64_t* cnt = chunk_counts.data() + c * E;
    for (int64_t t = Chunks::begin(c); t < Chunks::end(c, T); ++t) {
      row_scores(a, t, r);
      row_select(E, k, r);
      for (int64_t i = 0; i < k; ++i) {
        sel[t * k + i] = r.order[i];
        ++cnt[r.order[i]];
      }
    }
  });
  std::vector<float> dp(static_cast<size_t>(E));  // d aux / d p_te = grad_aux * E * f_e / T, the same for every row
  for (int64_t e = 0; e < E; ++e) {
    int64_t selected = 0;
    for (int64_t c = 0; c < chunks.count; ++c) selected += chunk_counts[c * E + e];
    dp[e] = float(double(grad_aux) * double(E) * (double(selected) / double(T)) / double(T));
  }
  std::vector<int64_t> kept;
  if (a.capacity >= 0) apply_capacity(T, k, E, a.capacity, sel.data(), &kept);

  // Pass 2: per row, the chain rule in fp32.
  const float z_coef = float(2.0 * double(grad_z) / double(T));
  for_each_chunk(a, chunks, [&](RowScratch& r, int64_t c) {
    for (int64_t t = Chunks::begin(c); t < Chunks::end(c, T); ++t) {
      const float lse = row_scores(a, t, r);
      float* ds = r.ds.data();
      std::fill(r.ds.begin(), r.ds.end(), 0.0f);
      const int32_t* st = sel.data() + t * k;
      float S = 0.0f;
      for (int64_t i = 0; i < k; ++i) S += r.s[st[i] < 0 ? ~st[i] : st[i]];
      float gw = 0.0f;  // sum_j g_j w_j over kept j (w pre-drop, normalized)
      for (int64_t i = 0; i < k; ++i) {
        if (st[i] < 0) continue;
        const float g = grad_weights[t * gw_stride0 + i * gw_stride1];
        if (a.normalize) gw += g * (r.s[st[i]] / S);
        ds[st[i]] += g;  // finished below for normalize
      }
      if (a.normalize) {
        for (int64_t i = 0; i < k; ++i) {
          const int32_t e = st[i] < 0 ? ~st[i] : st[i];
          ds[e] = (ds[e] - gw) / S;  // ds[e] holds g_i (0 when dropped)
        }
      }
      float* dl = r.l.data();  // logits are no longer needed: reuse the row
      if (!a.sigmoid) {
        float dot = 0.0f;
        for (int64_t e = 0; e < E; ++e) dot += r.s[e] * (ds[e] + dp[e]);
        for (int64_t e = 0; e < E; ++e) dl[e] = r.s[e] * (ds[e] + dp[e] - dot);
      } else {
        float total = 0.0f, dot = 0.0f;
        for (int64_t e = 0; e < E; ++e) total += r.s[e];
        for (int64_t e = 0; e < E; ++e) dot += dp[e] * (r.s[e] / total);
        for (int64_t e = 0; e < E; ++e)
          dl[e] = (ds[e] + (dp[e] - dot) / total) * r.s[e] * (1.0f - r.s[e]);
      }
      const float zc = z_coef * lse;
      for (int64_t e = 0; e < E; ++e) dl[e] += zc * r.q[e];
      if (a.dtype == DType::kFloat32) {
        std::copy(dl, dl + E, static_cast<float*>(grad_logits) + t * E);
      } else {
        uint16_t* out = static_cast<uint16_t*>(grad_logits) + t * E;
        for_each_vector(E, [&](int64_t i, int64_t m) { store_n(out + i, load_n(dl + i, m), m); });
      }
    }
  });
}

}  // namespace fastlm
