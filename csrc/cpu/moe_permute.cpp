// MoE token permutation on the CPU. Forward: a counting sort of the T*k assignments by expert
// (per-chunk counts in parallel, an exclusive scan over (expert, chunk) giving each chunk its
// first row per expert, then stable placement with the row copies, chunks in parallel), so the
// order within an expert is the flat index t*k + slot without any comparison sort. The
// reductions (permute backward, unpermute and its backward) run per token over the token's k
// rows in fp32, vectorized along H, every output row written by exactly one thread.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fastlm/moe.h"
#include "vec_math.h"

namespace fastlm::cpu {
namespace {

constexpr int64_t kAssignmentsPerChunk = 1024;
constexpr int64_t kParallelMinBytes = 1 << 16;

template <typename T>
void unpermute_forward(int64_t tokens, int64_t k, int64_t H, const T* y, int64_t y_stride, const int32_t* ri,
                       int64_t ri0, int64_t ri1, const float* w, int64_t w0, int64_t w1, T* out,
                       int64_t out_stride) {
#pragma omp parallel for schedule(static) if (tokens * H * k * int64_t(sizeof(T)) >= kParallelMinBytes)
  for (int64_t t = 0; t < tokens; ++t) {
    T* o = out + t * out_stride;
    for_each_vector(H, [&](int64_t i, int64_t m) {
      vf acc = splat(0.0f);
      for (int64_t s = 0; s < k; ++s) {
        const int32_t r = ri[t * ri0 + s * ri1];
        if (r >= 0) acc = acc + (w ? w[t * w0 + s * w1] : 1.0f) * load_n(y + r * y_stride + i, m);
      }
      store_n(o + i, acc, m);
    });
  }
}

template <typename T>
void unpermute_backward(int64_t tokens, int64_t k, int64_t H, int64_t rows, const T* go, int64_t go_stride,
                        const T* y, int64_t y_stride, const int32_t* ri, int64_t ri0, int64_t ri1, const float* w,
                        int64_t w0, int64_t w1, T* gy, int64_t gy_stride, float* gw) {
  const bool parallel = tokens * H * k * int64_t(sizeof(T)) >= kParallelMinBytes;
  std::vector<uint8_t> referenced(size_t(rows), 0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t s = 0; s < k; ++s) {
      const int32_t r = ri[t * ri0 + s * ri1];
      if (r >= 0) referenced[r] = 1;
    }
#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < tokens; ++t) {
      const T* g = go + t * go_stride;
      for (int64_t s = 0; s < k; ++s) {
        const int32_t r = ri[t * ri0 + s * ri1];
        if (r < 0) {
          gw[t * k + s] = 0.0f;
          continue;
        }
        const float wt = w[t * w0 + s * w1];
        const T* yr = y + r * y_stride;
        T* out = gy + r * gy_stride;
        vf dot = splat(0.0f);
        for_each_vector(H, [&](int64_t i, int64_t m) {
          const vf gv = load_n(g + i, m);
          store_n(out + i, wt * gv, m);
          dot = dot + gv * load_n(yr + i, m);
        });
        gw[t * k + s] = reduce_add(dot);
      }
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      if (!referenced[r]) std::memset(gy + r * gy_stride, 0, size_t(H) * sizeof(T));
  }
}

}  // namespace
}  // namespace fastlm::cpu

namespace fastlm {

int64_t moe_permute_forward_cpu(int64_t tokens, int64_t top_k, int64_t experts, const int32_t* expert_ids,
                                int64_t ids_stride0, int64_t ids_stride1, const void* x, int64_t x_stride_bytes,
                                int64_t row_bytes, void* x_sorted, int32_t* row_index, int32_t* offsets) {
  const int64_t n = tokens * top_k, E = experts, k = top_k;
  const int64_t chunks = (n + cpu::kAssignmentsPerChunk - 1) / cpu::kAssignmentsPerChunk;
  const bool parallel = chunks > 1 && n * row_bytes >= cpu::kParallelMinBytes;
  auto id_at = [&](int64_t a) { return expert_ids[(a / k) * ids_stride0 + (a % k) * ids_stride1]; };
  // 1. per-chunk counts, and the first out-of-range id of each chunk.
  std::vector<int32_t> start(size_t(chunks * E), 0);  // counts, then each chunk's first row per expert
  std::vector<int64_t> first_bad(size_t(chunks), -1);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) {
    int32_t* cnt = start.data() + c * E;
    const int64_t end = std::min(n, (c + 1) * cpu::kAssignmentsPerChunk);
    for (int64_t a = c * cpu::kAssignmentsPerChunk; a < end; ++a) {
      const int32_t e = id_at(a);
      if (e < -1 || e >= E) {
        first_bad[c] = a;
        break;
      }
      if (e >= 0) ++cnt[e];
    }
  }
  for (int64_t c = 0; c < chunks; ++c)
    if (first_bad[c] >= 0) return first_bad[c];
  // 2. exclusive scan, expert-major then chunk order: stable rows within each expert.
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e] = int32_t(row);
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t cnt = start[c * E + e];
      start[c * E + e] = int32_t(row);
      row += cnt;
    }
  }
  offsets[E] = int32_t(row);
  // 3. placement and the row copies.
  const char* src = static_cast<const char*>(x);
  char* dst = static_cast<char*>(x_sorted);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) {
    int32_t* next = start.data() + c * E;
    const int64_t end = std::min(n, (c + 1) * cpu::kAssignmentsPerChunk);
    for (int64_t a = c * cpu::kAssignmentsPerChunk; a < end; ++a) {
      const int32_t e = id_at(a);
      if (e < 0) {
        row_index[a] = -1;
        continue;
      }
      const int32_t r = next[e]++;
      row_index[a] = r;
      std::memcpy(dst + int64_t(r) * row_bytes, src + (a / k) * x_stride_bytes, size_t(row_bytes));
    }
  }
  // 4. the dropped tail.
  if (row < n) std::memset(dst + row * row_bytes, 0, size_t((n - row) * row_bytes));
  return -1;
}

int64_t moe_check_row_index_cpu(int64_t tokens, int64_t top_k, const int32_t* row_index, int64_t ri_stride0,
                                int64_t ri_stride1, int64_t rows, bool unique, bool* duplicate) {
  *duplicate = false;
  std::vector<uint8_t> seen(unique ? size_t(rows) : 0, 0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t s = 0; s < top_k; ++s) {
      const int32_t r = row_index[t * ri_stride0 + s * ri_stride1];
      if (r < -1 || r >= rows) return t * top_k + s;
      if (!unique || r < 0) continue;
      if (seen[r]) {
        *duplicate = true;
        return t * top_k + s;
      }
      seen[r] = 1;
    }
  return -1;
}


void moe_unpermute_forward_cpu(DType dtype, int64_t tokens, int64_t top_k, int64_t hidden, const void* y_sorted,
                               int64_t y_stride, const int32_t* row_index, int64_t ri_stride0, int64_t ri_stride1,
                               const float* weights, int64_t w_stride0, int64_t w_stride1, void* out,
                               int64_t out_stride) {
  if (dtype == DType::kFloat32)
    cpu::unpermute_forward(tokens, top_k, hidden, static_cast<const float*>(y_sorted), y_stride, row_index,
                           ri_stride0, ri_stride1, weights, w_stride0, w_stride1, static_cast<float*>(out),
                           out_stride);
  else
    cpu::unpermute_forward(tokens, top_k, hidden, static_cast<const uint16_t*>(y_sorted), y_stride, row_index,
                           ri_stride0, ri_stride1, weights, w_stride0, w_stride1, static_cast<uint16_t*>(out),
                           out_stride);
}

// grad_x[t] = sum of the token's rows of grad_sorted: the unpermute with unit weights
void moe_permute_backward_cpu(DType dtype, int64_t tokens, int64_t top_k, int64_t hidden, const void* grad_sorted,
                              int64_t gs_stride, const int32_t* row_index, int64_t ri_stride0, int64_t ri_stride1,
                              void* grad_x, int64_t gx_stride) {
  moe_unpermute_forward_cpu(dtype, tokens, top_k, hidden, grad_sorted, gs_stride, row_index, ri_stride0, ri_stride1,
                            nullptr, 0, 0, grad_x, gx_stride);
}

void moe_unpermute_backward_cpu(DType dtype, int64_t tokens, int64_t top_k, int64_t hidden, int64_t rows,
                                const void* grad_out, int64_t go_stride, const void* y_sorted, int64_t y_stride,
                                const int32_t* row_index, int64_t ri_stride0, int64_t ri_stride1,
                                const float* weights, int64_t w_stride0, int64_t w_stride1, void* grad_y_sorted,
                                int64_t gy_stride, float* grad_weights) {
  if (dtype == DType::kFloat32)
    cpu::unpermute_backward(tokens, top_k, hidden, rows, static_cast<const float*>(grad_out), go_stride,
                            static_cast<const float*>(y_sorted), y_stride, row_index, ri_stride0, ri_stride1,
                            weights, w_stride0, w_stride1, static_cast<float*>(grad_y_sorted), gy_stride,
                            grad_weights);
  else
    cpu::unpermute_backward(tokens, top_k, hidden, rows, static_cast<const uint16_t*>(grad_out), go_stride,
                            static_cast<const uint16_t*>(y_sorted), y_stride, row_index, ri_stride0, ri_stride1,
                            weights, w_stride0, w_stride1, static_cast<uint16_t*>(grad_y_sorted), gy_stride,
                            grad_weights);
}

}  // namespace fastlm
