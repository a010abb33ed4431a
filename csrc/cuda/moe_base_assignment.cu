// BASE layers' balanced assignment on CUDA: the whole auction of fastlm/ops/base_assignment.py in
// ONE launch of ONE CTA (kThreads threads) that loops its rounds on the device until no token is
// free, in float64, step for step as csrc/cpu/moe_base_assignment.cpp (same warm start, eps phases
// and tie rules: the two return the same ids and prices). Nothing is read back on the host.
//
// Why one CTA: the solve runs once per BASE layer per training step and is latency-bound, a chain
// of small dependent steps (an expert's dual price needs the previous one's; a round's bids need
// the last round's prices), each a pass over T tokens followed by a block barrier. One CTA keeps
// every barrier a __syncthreads (~30 cycles with 512 threads) where a multi-CTA solve would pay a
// grid-wide sync or a launch (~3-5 us) per step, thousands of them.
//   1. Dual warm start, kBaseDualSweeps (5) sweeps over the E experts: a margin pass (T/threads
//      tokens per thread, E score loads each) and an exact selection of the c_e-th largest margin
//      by bisection over the 64-bit order-preserving keys of the doubles (<= 64 counting passes of
//      T/threads loads + a one-barrier block reduction), then one max pass.
//   2. eps phases (spread / 64, then / 8 each down to eps), each a Jacobi auction from the last
//      phase's prices. A round: free tokens bid (E loads each), bids are counted per expert
//      (shared atomics), bucketed by expert, ranked within their bucket (descending bid, ties to
//      the lower token; a bid stops counting as soon as it can no longer win), and the r-th ranked
//      bid takes the expert's r-th cheapest slot while it beats that slot's price; each expert's
//      slot prices stay sorted by a merge of its kept slots and its winners (binary searches).
//      6 barriers per round.
// Rounds (measured on the CPU twin, which runs the same rounds): T = 4096, E = 8 needs 2 per eps
// phase, 10 in all; T = 16384, E = 64 needs between 30,000 and 100,000 (5 sweeps leave 64 prices
// far from equilibrium; each round then moves a few tokens), so at E = 64 the round loop rules.
// Estimate (H100/H200-class SM at ~1.8 GHz, 512 threads; L2-resident scores at ~64 B/clk/SM):
//   T = 4096, E = 8: warm start 5 x 8 x (64 counting passes x (8 loads + reduction ~60 clk) +
//     a margin pass of 8 x 8 loads) ~ 0.2 M clk, 10 rounds x ~2 k clk: ~0.15 ms in all.
//   T = 65536, E = 64 (bf16 scores, 8 MB): each margin pass streams all T x E scores through one
//     SM (8 MB at ~115 GB/s ~ 70 us), 5 x 64 of them ~ 22 ms, + 5 x 64 x 64 counting passes of
//     128 loads ~ 5 ms; then >= 10^5 rounds of 6 barriers + 128 owner checks per thread (~1-2 k
//     clk, ~1 us) ~ 0.1 s or more. Not per-step material at that size: more sweeps or a
//     multi-CTA warm start and an expert-parallel round would be the next steps.
// The default round cap is the reference's, 10^6 rounds (~1 s at that size).
// Bad inputs never hang: non-finite scores, a capacity that is not E values >= 0 summing to T,
// or more than max_rounds rounds give every id -1 and every price NaN (the invalid result).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "activations.cuh"
#include "fastlm/moe.h"
#include "launch.cuh"

namespace fastlm::cuda {
namespace {

constexpr int kThreads = 512, kWarps = kThreads / 32;
constexpr int kMaxExperts = int(kBaseMaxExpertsCuda);

// Global scratch, T entries each (slot arrays are indexed by slot: expert e owns [base[e], base[e+1])).
struct Workspace {
  double* price;        // slot prices, ascending within each expert
  double* price_next;   // the merge's output (swapped with price each round)
  double* bid;          // per token: its bid this round; during the warm start, its margin
  double* bucket_bid;   // bids grouped by expert
  int32_t* holder;      // per slot: its token, -1 empty
  int32_t* holder_next;
  int32_t* owner;       // per token: its expert, -1 free
  int32_t* choice;      // per token: the expert it bids for
  int32_t* bucket_token;
  int32_t* ranked;      // per slot base[e] + r: the token ranked r among e's winners
  int32_t* slot_expert; // per slot: its expert
};

inline size_t align16(size_t bytes) { return (bytes + 15) & ~size_t(15); }

struct Layout {
  size_t offsets[11], bytes;
  explicit Layout(int64_t tokens) {
    const size_t T = size_t(tokens), sizes[11] = {8 * T, 8 * T, 8 * T, 8 * T, 4 * T, 4 * T,
                                                   4 * T, 4 * T, 4 * T, 4 * T, 4 * T};
    bytes = 0;
    for (int i = 0; i < 11; ++i) {
      offsets[i] = bytes;
      bytes += align16(sizes[i]);
    }
  }
  Workspace carve(void* base) const {
    char* b = static_cast<char*>(base);
    auto d = [&](int i) { return reinterpret_cast<double*>(b + offsets[i]); };
    auto n = [&](int i) { return reinterpret_cast<int32_t*>(b + offsets[i]); };
    return Workspace{d(0), d(1), d(2), d(3), n(4), n(5), n(6), n(7), n(8), n(9), n(10)};
  }
};

struct Problem {
  int tokens, experts;
  const void* scores;
  int64_t stride0, stride1;
  const int64_t* capacity;  // device, or null: the default split
  double eps;               // 0: the default
  double inv_experts;       // 1 / E, divided on the host (a device double division is a call)
  int64_t max_rounds;
};

// Order-preserving map of a finite double to 64 bits (-0.0 taken as +0.0), and back.
__device__ __forceinline__ uint64_t order_key(double x) {
  const uint64_t bits = uint64_t(__double_as_longlong(x + 0.0));
  return (bits >> 63) ? ~bits : bits | (uint64_t(1) << 63);
}
__device__ __forceinline__ double from_order_key(uint64_t key) {
  const uint64_t bits = (key >> 63) ? key & ~(uint64_t(1) << 63) : ~key;
  return __longlong_as_double(static_cast<long long>(bits));
}

struct Max {
  __device__ double operator()(double a, double b) const { return a > b ? a : b; }
};
struct Min {
  __device__ double operator()(double a, double b) const { return a < b ? a : b; }
};
struct Sum {
  __device__ double operator()(double a, double b) const { return a + b; }
};

// A block-wide reduction with one barrier: warp shuffles, then every thread combines the warps'
// partials from scratch[parity] in warp order (the same result in every thread). Alternating
// the two halves of scratch makes a second barrier unnecessary: a half is rewritten only after
// the next reduction's barrier, which every reader of this one has passed. Counts travel as
// doubles (exact below 2^53).
template <typename Op>
__device__ double block_reduce(double v, Op op, double (*scratch)[kWarps], int& parity) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  double* half = scratch[parity];
  parity ^= 1;
  if (threadIdx.x % 32 == 0) half[threadIdx.x / 32] = v;
  __syncthreads();
  double r = half[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, half[w]);
  return r;
}

template <typename Scalar>
__device__ __forceinline__ double score(const Problem& pb, int t, int e) {
  return double(to_float(static_cast<const Scalar*>(pb.scores)[t * pb.stride0 + e * pb.stride1]));
}

// One CTA: __launch_bounds__(kThreads, 1) gives a thread all 128 registers it may have (no spills).
template <typename Scalar>
__global__ void __launch_bounds__(kThreads, 1) base_assignment_kernel(Problem pb, Workspace ws, int32_t* __restrict__ ids, double* __restrict__ prices_out) {
  FASTLM_SHARED(double, cheap, [kMaxExperts]);   // each expert's cheapest slot price (warm start: its price)
  FASTLM_SHARED(double, second, [kMaxExperts]);  // its next-cheapest slot price
  FASTLM_SHARED(int, cap, [kMaxExperts]);
  FASTLM_SHARED(int, base, [kMaxExperts + 1]);
  FASTLM_SHARED(int, count, [kMaxExperts]);      // bids per expert this round
  FASTLM_SHARED(int, start, [kMaxExperts]);      // where its bids start in the buckets
  FASTLM_SHARED(int, cursor, [kMaxExperts]);
  FASTLM_SHARED(int, won, [kMaxExperts]);        // its winners this round
  FASTLM_SHARED(double, scratch, [2][kWarps]);
  FASTLM_SHARED(int, capacity_bad, [1]);
  const int tid = threadIdx.x, lane = tid % 32, T = pb.tokens, E = pb.experts;
  int parity = 0;

  // capacities and slot offsets (thread 0: E <= 1024 additions, once)
  if (tid == 0) {
    int bad = 0;
    long long total = 0;
    base[0] = 0;
    for (int e = 0; e < E; ++e) {
      const long long c = pb.capacity ? pb.capacity[e] : T / E + (e < T % E);
      bad |= c < 0;
      total += c < 0 ? 0 : c;
      cap[e] = c < 0 || c > T ? 0 : int(c);
      base[e + 1] = int(total > T ? T : total);
    }
    capacity_bad[0] = bad || total != T;
  }
  double lo = INFINITY, hi = -INFINITY, finite = 1.0;
  for (int t = tid; t < T; t += kThreads)
    for (int e = 0; e < E; ++e) {
      const double v = score<Scalar>(pb, t, e);
      finite = isfinite(v) ? finite : 0.0;
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
  lo = block_reduce(lo, Min{}, scratch, parity);  // its barrier also publishes cap, base
  hi = block_reduce(hi, Max{}, scratch, parity);
  finite = block_reduce(finite, Min{}, scratch, parity);
  if (finite == 0.0 || capacity_bad[0]) {
    for (int t = tid; t < T; t += kThreads) ids[t] = -1;
    for (int e = tid; e < E; e += kThreads) prices_out[e] = NAN;
    return;
  }
  const double spread = T ? hi - lo : 0.0;
  const double eps = pb.eps > 0 ? pb.eps : fmax(spread, 1e-12) * kBaseDefaultEpsFactor * pb.inv_experts;
  for (int e = 0; e < E; ++e)
    for (int s = base[e] + tid; s < base[e + 1]; s += kThreads) ws.slot_expert[s] = e;

  // 1. the dual warm start: expert ex's price between its c-th and c+1-th largest margin
  for (int e = tid; e < E; e += kThreads) cheap[e] = 0.0;
  __syncthreads();
  double* margin = ws.bid;
  for (int sweep = 0; E >= 2 && T > 0 && sweep < kBaseDualSweeps; ++sweep)
    for (int ex = 0; ex < E; ++ex) {
      double top = -INFINITY;
      for (int t = tid; t < T; t += kThreads) {
        double others = -INFINITY;
        for (int k = 0; k < E; ++k)
          if (k != ex) others = fmax(others, score<Scalar>(pb, t, k) - cheap[k]);
        margin[t] = score<Scalar>(pb, t, ex) - others;
        top = fmax(top, margin[t]);
      }
      top = block_reduce(top, Max{}, scratch, parity);  // also publishes margin
      const int c = cap[ex];
      double price_hi, price_lo;
      if (c == 0) {
        price_lo = top;
        price_hi = top + 1;
      } else {
        // the largest key K with at least c margins >= K: the c-th largest margin
        uint64_t key_lo = 0, key_hi = order_key(top);
        while (key_lo < key_hi) {
          const uint64_t mid = key_lo + (key_hi - key_lo + 1) / 2;
          double n = 0;
          for (int t = tid; t < T; t += kThreads) n += order_key(margin[t]) >= mid;
          if (block_reduce(n, Sum{}, scratch, parity) >= c) key_lo = mid; else key_hi = mid - 1;
        }
        price_hi = from_order_key(key_lo);
        // the c+1-th largest: the largest margin below it, or it again when it repeats
        double at_least = 0, below = -INFINITY;
        for (int t = tid; t < T; t += kThreads) {
          const double m = margin[t];
          at_least += order_key(m) >= key_lo;
          below = order_key(m) < key_lo ? fmax(below, m) : below;
        }
        at_least = block_reduce(at_least, Sum{}, scratch, parity);
        below = block_reduce(below, Max{}, scratch, parity);
        price_lo = c == T ? price_hi - 1 : (at_least > c ? price_hi : below);
      }
      if (tid == 0) cheap[ex] = (price_hi + price_lo) / 2;
      __syncthreads();
    }
  for (int s = tid; s < T; s += kThreads) ws.price[s] = cheap[ws.slot_expert[s]];

  // 2. eps phases of the Jacobi auction
  double* price = ws.price;
  double* price_next = ws.price_next;
  int32_t* holder = ws.holder;
  int32_t* holder_next = ws.holder_next;
  double step = T ? fmax(spread, eps) / kBaseFirstStepDivisor : eps;
  int64_t rounds = 0;
  while (true) {
    step = fmax(step, eps);
    for (int t = tid; t < T; t += kThreads) {
      ws.owner[t] = -1;
      holder[t] = -1;
    }
    __syncthreads();  // also publishes the warm start's slot prices
    while (true) {
      for (int e = tid; e < E; e += kThreads) {
        count[e] = 0;
        won[e] = 0;
        cheap[e] = cap[e] ? price[base[e]] : INFINITY;
        second[e] = cap[e] > 1 ? price[base[e] + 1] : INFINITY;
      }
      __syncthreads();
      // bids: the best expert at its cheapest slot (ties to the lower expert) against the best
      // alternative (another expert, or the same expert's next slot), plus the step
      double free_tokens = 0;
      for (int t = tid; t < T; t += kThreads) {
        if (ws.owner[t] >= 0) continue;
        double best = -INFINITY, other = -INFINITY;
        int j = 0;
        for (int k = 0; k < E; ++k) {
          const double v = score<Scalar>(pb, t, k) - cheap[k];  // -inf for an expert without slots
          if (v > best) {
            other = best;
            best = v;
            j = k;
          } else {
            other = fmax(other, v);
          }
        }
        const double aj = score<Scalar>(pb, t, j);
        double runner_up = fmax(other, aj - second[j]);
        if (!isfinite(runner_up)) runner_up = best - 1.0;  // a single option: bid + 1
        ws.choice[t] = j;
        ws.bid[t] = aj - runner_up + step;
        atomicAdd(&count[j], 1);
        free_tokens += 1;
      }
      free_tokens = block_reduce(free_tokens, Sum{}, scratch, parity);
      if (free_tokens == 0) break;
      if (rounds++ >= pb.max_rounds) {
        for (int t = tid; t < T; t += kThreads) ids[t] = -1;
        for (int e = tid; e < E; e += kThreads) prices_out[e] = NAN;
        return;
      }
      // bucket starts: an exclusive scan of the counts by warp 0 (a lane per run of experts)
      if (tid < 32) {
        const int per = (E + 31) / 32, e0 = min(E, lane * per), e1 = min(E, e0 + per);
        int sum = 0;
        for (int e = e0; e < e1; ++e) sum += count[e];
        int inclusive = sum;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const int up = __shfl_up_sync(0xffffffffu, inclusive, off);
          inclusive += lane >= off ? up : 0;
        }
        int run = inclusive - sum;
        for (int e = e0; e < e1; ++e) {
          start[e] = run;
          cursor[e] = run;
          run += count[e];
        }
      }
      __syncthreads();
      for (int t = tid; t < T; t += kThreads) {
        if (ws.owner[t] >= 0) continue;
        const int pos = atomicAdd(&cursor[ws.choice[t]], 1);  // order within a bucket is free: ranks don't use it
        ws.bucket_bid[pos] = ws.bid[t];
        ws.bucket_token[pos] = t;
      }
      __syncthreads();
      // rank each bid in its bucket; it wins iff its rank r < cap and it beats the r-th cheapest slot
      for (int i = tid; i < int(free_tokens); i += kThreads) {
        const int t = ws.bucket_token[i], e = ws.choice[t], first = base[e], c = cap[e];
        const double b = ws.bucket_bid[i];
        int r = 0;
        bool wins = b > price[first];
        for (int q = start[e], end = start[e] + count[e]; wins && q < end; ++q) {
          const double b2 = ws.bucket_bid[q];
          if (b2 > b || (b2 == b && ws.bucket_token[q] < t)) {
            ++r;
            wins = r < c && b > price[first + r];
          }
        }
        if (wins) {
          ws.ranked[first + r] = t;
          atomicMax(&won[e], r + 1);
        }
      }
      __syncthreads();
      // winners take slots base + r (evicting their holders); every expert's kept slots and
      // winners merge into ascending order (at equal prices the kept slot first)
      for (int s = tid; s < T; s += kThreads) {
        const int e = ws.slot_expert[s], first = base[e], c = cap[e], k = won[e], i = s - first;
        double v;
        int h, pos;
        if (i < k) {
          h = ws.ranked[s];
          v = ws.bid[h];
          const int evicted = holder[s];
          if (evicted >= 0) ws.owner[evicted] = -1;
          ws.owner[h] = e;
          int a = first + k, z = first + c;  // kept slots with price <= v
          while (a < z) {
            const int m = (a + z) / 2;
            if (price[m] <= v) a = m + 1; else z = m;
          }
          pos = (k - 1 - i) + (a - first - k);
        } else {
          v = price[s];
          h = holder[s];
          int a = 0, z = k;  // winners (descending by rank) with bid >= v: a prefix
          while (a < z) {
            const int m = (a + z) / 2;
            if (ws.bid[ws.ranked[first + m]] >= v) a = m + 1; else z = m;
          }
          pos = (i - k) + (k - a);
        }
        price_next[first + pos] = v;
        holder_next[first + pos] = h;
      }
      __syncthreads();
      double* p = price;
      price = price_next;
      price_next = p;
      int32_t* hp = holder;
      holder = holder_next;
      holder_next = hp;
    }
    if (step <= eps) break;
    step /= kBaseStepDivisor;
  }
  for (int t = tid; t < T; t += kThreads) ids[t] = ws.owner[t];
  for (int e = tid; e < E; e += kThreads) prices_out[e] = cap[e] ? price[base[e]] : 0.0;
}

template <typename T>
int launch_t(const BaseAssignmentArgs& a, void* workspace, int32_t* ids, double* prices, cudaStream_t stream) {
  const Problem pb{int(a.tokens), int(a.experts), a.scores, a.scores_stride0, a.scores_stride1, a.capacity, a.eps,
                   1.0 / double(a.experts), a.max_rounds};
  launch_kernel(base_assignment_kernel<T>, 1, kThreads, 0, stream, pb, Layout(a.tokens).carve(workspace), ids,
                prices);
  return int(cudaGetLastError());
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

size_t moe_base_assignment_workspace_bytes_cuda(int64_t tokens, int64_t) { return cuda::Layout(tokens).bytes; }

int moe_base_assignment_cuda(const BaseAssignmentArgs& a, void* workspace, int32_t* expert_ids, double* prices,
                             cudaStream_t stream) {
  if (a.experts < 1 || a.experts > kBaseMaxExpertsCuda) return int(cudaErrorInvalidValue);
  switch (a.dtype) {
    case DType::kFloat32: return cuda::launch_t<float>(a, workspace, expert_ids, prices, stream);
    case DType::kFloat16: return cuda::launch_t<__half>(a, workspace, expert_ids, prices, stream);
    case DType::kBFloat16: return cuda::launch_t<__nv_bfloat16>(a, workspace, expert_ids, prices, stream);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace fastlm
