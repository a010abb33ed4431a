// Flash attention backward on the CPU. One OpenMP work item per (batch, key/value head) (with
// variable-length packed sequences: per (sequence, key/value head), over that sequence's real query
// and key rows only): it owns dK and dV of that head (fp32 scratch, Tk rows), so no two threads
// ever write the same gradient and the result doesn't depend on scheduling. Inside, for every query
// head of the GQA group and every query tile: pack Q (transposed and row-major, pre-scaled) and dO
// (both ways), then for each key tile of the range its causal / sliding-window band reaches (tiles
// outside are never visited; a tile that reaches no key just writes dQ = 0) recompute St = K Qt,
// softcap, ALiBi and mask as the forward, P = exp(St - lse), dPt = V dOt, dSt = P (dPt - delta)
// (times 1 - tanh^2 of the capped raw scores under a softcap: ALiBi is added after the cap and
// doesn't change it), and accumulate dV += P^T dO, dK += dS^T Q, dQ += dS K with the same register-
// blocked GEMM as the forward. Sinks need nothing here: the forward's lse already holds them, so P
// is right. Dropout regenerates the forward's keep-mask Z (Triton's Philox, philox.h) per tile:
// dV += (P Z)^T dO, dP = (dO V^T) Z, dS = P (dP - delta), delta = rowsum(dO O) of the dropped O.
#include <omp.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "attention_tiles.h"

namespace fastlm::cpu::attn {
namespace {

struct Scratch {
  std::vector<float> buf;
  float *Qt, *Qs, *dOt, *dOp, *Kp, *Vp, *St, *dSt, *Gt, *dQ, *lse, *delta, *dK, *dV;
  bool live[kBlockK];
  Scratch(int64_t d, int64_t dkp, int64_t dv, int64_t dvp, int64_t tk, bool softcap) {
    carve(buf, {{&Qt, d * kBlockQ}, {&Qs, kBlockQ * dkp}, {&dOt, dv * kBlockQ}, {&dOp, kBlockQ * dvp},
                {&Kp, kBlockK * dkp}, {&Vp, kBlockK * dvp}, {&St, kBlockK * kBlockQ}, {&dSt, kBlockK * kBlockQ},
                {&Gt, softcap ? kBlockK * kBlockQ : 0}, {&dQ, kBlockQ * dkp}, {&lse, kBlockQ}, {&delta, kBlockQ},
                {&dK, tk * dkp}, {&dV, tk * dvp}});
  }
};

// St (scores, -inf where hidden) becomes P = exp(St - lse); dSt becomes dS = P (dP - delta), times
// Gt = 1 - tanh^2 (d capped / d raw score) under a softcap (kCap). With dropout (kDrop) dSt holds
// (dO V^T) before the keep-mask Z = keep / (1 - p) of query tile i0, key tile j0: dP = dSt Z, and St
// becomes P Z, what dV = (P Z)^T dO needs (dS keeps the undropped P).
template <bool kCap, bool kDrop>
FASTLM_INLINE void probs_and_dscores(float* St, float* dSt, int64_t nk, int64_t nqp, const float* lse,
                                     const float* delta, const float* Gt, const Dropout& dr, int64_t i0, int64_t j0) {
  for (int64_t c = 0; c < nqp; c += kLanes) {
    const vf ls = load(lse + c), dl = load(delta + c);
    const vu rows = drop_offsets(dr, i0 + c, j0);
    for (int64_t j = 0; j < nk; ++j) {
      const vf s = load(St + j * kBlockQ + c);
      const vf hidden = select(s == kNegInf, splat(1.0f), splat(0.0f));
      const vf p = select(hidden != 0.0f, splat(0.0f), vexp(s - ls));
      vf dp = load(dSt + j * kBlockQ + c);
      vf pz = p;
      if constexpr (kDrop) {
        const vf z = drop_factor(dr, rows + uint32_t(j));
        dp = dp * z;
        pz = p * z;
      }
      vf ds = p * (dp - dl);
      if constexpr (kCap) ds = ds * load(Gt + j * kBlockQ + c);
      ds = select(hidden != 0.0f, splat(0.0f), ds);
      store(St + j * kBlockQ + c, pz);
      store(dSt + j * kBlockQ + c, ds);
    }
  }
}

template <typename T>
void backward(const AttentionShape& sh, Strided4 go, Strided4 q, Strided4 k, Strided4 v, Strided4 mask, Strided4 o,
              const float* lse, T* gq, T* gk, T* gv) {
  const int64_t D = sh.head_dim, Dv = sh.value_dim;
  const int64_t Dkp = round_up(D, kLanes), Dvp = round_up(Dv, kLanes);
  const int64_t items = sh.batch * sh.kv_heads, group = sh.heads / sh.kv_heads;
  const bool drop = sh.dropout_p > 0.0f;
  // Sequences longest first (varlen: their work differs, and the dynamic schedule balances best
  // that way; each item owns its outputs, so the order changes no result), and the longest key
  // range, which sizes the dK/dV scratch.
  std::vector<int64_t> order(size_t(sh.batch));
  std::iota(order.begin(), order.end(), int64_t{0});
  int64_t max_tk = sh.tk;
  if (is_varlen(sh)) {
    max_tk = 0;
    for (int64_t b = 0; b < sh.batch; ++b) max_tk = std::max(max_tk, sequence(sh, b).tk);
    const auto work = [&](int64_t b) { const Seq s = sequence(sh, b); return s.tq * s.tk; };
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work(a) > work(b); });
  }
  const RowLayout dql = rows_layout(sh, sh.heads, sh.tq, D), ll = lse_layout(sh);
  const RowLayout dkl = rows_layout(sh, sh.kv_heads, sh.tk, D), dvl = rows_layout(sh, sh.kv_heads, sh.tk, Dv);
  const T *qd = static_cast<const T*>(q.data), *kd = static_cast<const T*>(k.data);
  const T *vd = static_cast<const T*>(v.data), *god = static_cast<const T*>(go.data);
  const T* od = static_cast<const T*>(o.data);
#pragma omp parallel if (items > 1)
  {
    Scratch w(D, Dkp, Dv, Dvp, max_tk, sh.softcap > 0.0f);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = order[item / sh.kv_heads], hk = item % sh.kv_heads;
      const Seq s = sequence(sh, b);
      const T* kp = kd + b * k.s[0] + hk * k.s[1] + s.k0 * k.s[2];
      const T* vp = vd + b * v.s[0] + hk * v.s[1] + s.k0 * v.s[2];
      std::fill(w.dK, w.dK + s.tk * Dkp, 0.0f);
      std::fill(w.dV, w.dV + s.tk * Dvp, 0.0f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < s.tq; i0 += kBlockQ) {
          const int64_t nq = std::min(kBlockQ, s.tq - i0);
          TileMask t = tile_mask<T>(sh, mask, s, b, h, i0, nq);
          const auto [key_begin, key_end] = t.keys(s.tk);
          const Dropout dr = dropout_of(sh, b, h, s.tk);
          T* dq = gq + dql.at(b, h, s.q0 + i0);
          if (key_begin >= key_end) {  // every row fully masked: dQ = 0, nothing else to add
            for (int64_t i = 0; i < nq; ++i) std::fill(dq + i * dql.t, dq + i * dql.t + D, T{});
            continue;
          }
          const T* qp = qd + b * q.s[0] + h * q.s[1] + (s.q0 + i0) * q.s[2];
          const T* gop = god + b * go.s[0] + h * go.s[1] + (s.q0 + i0) * go.s[2];
          const T* op = od + b * o.s[0] + h * o.s[1] + (s.q0 + i0) * o.s[2];
          pack_transposed(qp, q.s[2], q.s[3], nq, D, w.Qt, kBlockQ, sh.scale);
          pack_rows(qp, q.s[2], q.s[3], nq, D, w.Qs, Dkp, sh.scale);
          pack_transposed(gop, go.s[2], go.s[3], nq, Dv, w.dOt, kBlockQ, 1.0f);
          pack_rows(gop, go.s[2], go.s[3], nq, Dv, w.dOp, Dvp);
          const float* ls = lse + ll.at(b, h, s.q0 + i0);
          for (int64_t i = 0; i < kBlockQ; ++i) {
            w.lse[i] = i < nq ? ls[i] : kNegInf;
            float d = 0.0f;
            for (int64_t c = 0; i < nq && c < Dv; ++c) d += w.dOp[i * Dvp + c] * scalar_to_float(op[i * o.s[2] + c * o.s[3]]);
            w.delta[i] = d;
          }
          std::fill(w.dQ, w.dQ + kBlockQ * Dkp, 0.0f);
          for (int64_t j0 = key_begin; j0 < key_end; j0 += kBlockK) {
            t.j0 = j0, t.nk = std::min(kBlockK, key_end - j0);
            pack_rows(kp + j0 * k.s[2], k.s[2], k.s[3], t.nk, D, w.Kp, Dkp);
            pack_rows(vp + j0 * v.s[2], v.s[2], v.s[3], t.nk, Dv, w.Vp, Dvp);
            gemm(t.nk, t.nqp, D, w.Kp, Dkp, 1, w.Qt, kBlockQ, w.St, kBlockQ, nullptr, false);
            if (finish_scores<T, true>(t, sh.softcap, w.St, w.Gt, w.live)) {
              zero_dead_rows(w.Kp, Dkp, w.live, t.nk);
              zero_dead_rows(w.Vp, Dvp, w.live, t.nk);
            }
            gemm(t.nk, t.nqp, Dv, w.Vp, Dvp, 1, w.dOt, kBlockQ, w.dSt, kBlockQ, nullptr, false);
            const bool cap = sh.softcap > 0.0f;
            if (drop) {
              if (cap) probs_and_dscores<true, true>(w.St, w.dSt, t.nk, t.nqp, w.lse, w.delta, w.Gt, dr, i0, j0);
              else probs_and_dscores<false, true>(w.St, w.dSt, t.nk, t.nqp, w.lse, w.delta, nullptr, dr, i0, j0);
            } else {
              if (cap) probs_and_dscores<true, false>(w.St, w.dSt, t.nk, t.nqp, w.lse, w.delta, w.Gt, dr, i0, j0);
              else probs_and_dscores<false, false>(w.St, w.dSt, t.nk, t.nqp, w.lse, w.delta, nullptr, dr, i0, j0);
            }
            gemm(t.nk, Dvp, nq, w.St, kBlockQ, 1, w.dOp, Dvp, w.dV + j0 * Dvp, Dvp, nullptr, true);
            gemm(t.nk, Dkp, nq, w.dSt, kBlockQ, 1, w.Qs, Dkp, w.dK + j0 * Dkp, Dkp, nullptr, true);
            gemm(nq, Dkp, t.nk, w.dSt, 1, kBlockQ, w.Kp, Dkp, w.dQ, Dkp, nullptr, true);
          }
          for (int64_t i = 0; i < nq; ++i) write_row(dq + i * dql.t, w.dQ + i * Dkp, D, sh.scale);
        }
      }
      T* dk = gk + dkl.at(b, hk, s.k0);
      T* dv = gv + dvl.at(b, hk, s.k0);
      for (int64_t j = 0; j < s.tk; ++j) {
        write_row(dk + j * dkl.t, w.dK + j * Dkp, D, 1.0f);
        write_row(dv + j * dvl.t, w.dV + j * Dvp, Dv, 1.0f);
      }
    }
  }
}

}  // namespace
}  // namespace fastlm::cpu::attn

namespace fastlm {

void attention_backward_cpu(const AttentionShape& shape, Strided4 grad_out, Strided4 q, Strided4 k, Strided4 v,
                            Strided4 mask, Strided4 out, const float* lse, void* grad_q, void* grad_k, void* grad_v) {
  cpu::attn::with_type(shape.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::attn::backward<T>(shape, grad_out, q, k, v, mask, out, lse, static_cast<T*>(grad_q),
                           static_cast<T*>(grad_k), static_cast<T*>(grad_v));
  });
}

}  // namespace fastlm
