// Flash attention forward on the CPU: one OpenMP work item per (batch, head, query tile of
// kBlockQ rows); with variable-length packed sequences (cu_seqlens) per (sequence, head, query
// tile of its real rows), each sequence its own problem over its own keys, so no padding is
// ever computed (dense is the case of equal lengths and batch strides). The query tile is
// packed once, transposed and pre-scaled; each key tile is packed to fp32, scores St = K Qt
// come from the register-blocked GEMM of attention_tiles.h, the online softmax keeps a running
// max m and sum l per query (vectors across the tile's queries), and O = O * alpha + P V
// accumulates in fp32 scratch. Only the key range the tile's causal / sliding-window band
// reaches is visited; the mask pass runs only on tiles that straddle a band edge or have a
// mask. Scores are soft-capped (softcap * tanh(s / softcap)), then get ALiBi (from positions,
// no bias tensor), then the mask. A sink only enters the finalisation: lse = logaddexp(m +
// log l, sink), and O / l shrinks by exp(m + log l - lse). Dropout scales P by Triton's keep /
// (1 - p) (philox.h) after the softmax update, so m and l (hence lse) are the undropped ones.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "attention_tiles.h"

namespace fastlm::cpu::attn {
namespace {

struct Scratch {
  std::vector<float> buf;
  float *Qt, *Kp, *Vp, *St, *O, *m, *l, *alpha;
  bool live[kBlockK];
  Scratch(int64_t d, int64_t dvp) {
    carve(buf, {{&Qt, d * kBlockQ}, {&Kp, kBlockK * d}, {&Vp, kBlockK * dvp}, {&St, kBlockK * kBlockQ},
                {&O, kBlockQ * dvp}, {&m, kBlockQ}, {&l, kBlockQ}, {&alpha, kBlockQ}});
  }
};

template <typename T>
void forward(const AttentionShape& sh, Strided4 q, Strided4 k, Strided4 v, Strided4 mask, T* out, float* lse) {
  const int64_t D = sh.head_dim, Dv = sh.value_dim, Dvp = round_up(Dv, kLanes);
  const std::vector<int64_t> tiles = query_tile_starts(sh);  // per sequence: its query tiles
  const int64_t items = sh.heads * tiles.back();              // (sequence, head, query tile)
  const int64_t group = sh.heads / sh.kv_heads;
  const bool drop = sh.dropout_p > 0.0f;
  const RowLayout ol = rows_layout(sh, sh.heads, sh.tq, Dv), ll = lse_layout(sh);
  const T* qd = static_cast<const T*>(q.data);
  const T* kd = static_cast<const T*>(k.data);
  const T* vd = static_cast<const T*>(v.data);
#pragma omp parallel if (items > 1)
  {
    Scratch w(D, Dvp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      // sequence b owns items [heads * tiles[b], heads * tiles[b + 1]), head-major inside
      const int64_t b = std::upper_bound(tiles.begin(), tiles.end(), item / sh.heads) - tiles.begin() - 1;
      const int64_t n_qt = tiles[b + 1] - tiles[b], r = item - sh.heads * tiles[b];
      const int64_t h = r / n_qt, i0 = r % n_qt * kBlockQ;
      const Seq s = sequence(sh, b);
      const int64_t hk = h / group, nq = std::min(kBlockQ, s.tq - i0);
      const T* qp = qd + b * q.s[0] + h * q.s[1] + (s.q0 + i0) * q.s[2];
      const T* kp = kd + b * k.s[0] + hk * k.s[1] + s.k0 * k.s[2];
      const T* vp = vd + b * v.s[0] + hk * v.s[1] + s.k0 * v.s[2];
      pack_transposed(qp, q.s[2], q.s[3], nq, D, w.Qt, kBlockQ, sh.scale);
      std::fill(w.O, w.O + kBlockQ * Dvp, 0.0f);
      std::fill(w.m, w.m + kBlockQ, kNegInf);
      std::fill(w.l, w.l + kBlockQ, 0.0f);
      TileMask t = tile_mask<T>(sh, mask, s, b, h, i0, nq);
      const auto [key_begin, key_end] = t.keys(s.tk);
      const Dropout dr = dropout_of(sh, b, h, s.tk);
      for (int64_t j0 = key_begin; j0 < key_end; j0 += kBlockK) {
        t.j0 = j0, t.nk = std::min(kBlockK, key_end - j0);
        pack_rows(kp + j0 * k.s[2], k.s[2], k.s[3], t.nk, D, w.Kp, D);
        gemm(t.nk, t.nqp, D, w.Kp, D, 1, w.Qt, kBlockQ, w.St, kBlockQ, nullptr, false);
        const bool any_dead = finish_scores<T>(t, sh.softcap, w.St, nullptr, w.live);
        softmax_tile(w.St, t.nk, t.nqp, w.m, w.l, w.alpha);
        if (drop) drop_probs(dr, i0, j0, t.nk, t.nqp, w.St);  // l, m stay the undropped P's
        pack_rows(vp + j0 * v.s[2], v.s[2], v.s[3], t.nk, Dv, w.Vp, Dvp);
        if (any_dead) zero_dead_rows(w.Vp, Dvp, w.live, t.nk);
        gemm(nq, Dvp, t.nk, w.St, 1, kBlockQ, w.Vp, Dvp, w.O, Dvp, w.alpha, true);
      }
      T* o = out + ol.at(b, h, s.q0 + i0);
      float* ls = lse + ll.at(b, h, s.q0 + i0);
      const float sink = sh.sinks ? sh.sinks[h] : kNegInf;
      for (int64_t i = 0; i < nq; ++i) write_row(o + i * ol.t, w.O + i * Dvp, Dv, finish_row(w.m[i], w.l[i], sink, ls + i));
    }
  }
}

}  // namespace
}  // namespace fastlm::cpu::attn

namespace fastlm {

void attention_forward_cpu(const AttentionShape& shape, Strided4 q, Strided4 k, Strided4 v, Strided4 mask,
                           void* out, float* lse) {
  cpu::attn::with_type(shape.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::attn::forward<T>(shape, q, k, v, mask, static_cast<T*>(out), lse);
  });
}

}  // namespace fastlm
