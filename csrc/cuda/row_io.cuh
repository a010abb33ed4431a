// Row I/O for the memory-bound kernels: 16-byte packs for a row of ANY width, row stride and
// storage offset, with several packs per thread in flight.
//
// Why: a kernel that vectorises only when cols, every stride and every pointer are multiples of
// 16 bytes drops to 2-byte loads for GPT-2's 50257-wide vocab, any odd slice, any odd width: 8x
// the load instructions, ~20-30 % of copy bandwidth. Here the row is split by its own address:
//
//   [ head: < VEC scalars up to the first 16-byte boundary ][ body: packs of VEC ][ tail: < VEC ]
//
// so at most 2 (VEC - 1) elements of a row (VEC = 16 / sizeof(T): 8 halves, 4 floats) take scalar
// accesses, whatever the layout. Precondition: the row pointer is aligned to sizeof(T) (every
// torch tensor is).
//
// API (namespace fastlm::cuda):
//   Pack<T, N>                 N elements, aligned to their size: one LDG/STG.128 when N * sizeof(T) = 16
//   kVec<T>                    16 / sizeof(T)
//   split_row(row, cols)       RowSplit {head, packs, tail} of that row (host or device)
//   get_pack(body, p, vec), put_pack(body, p, pack, vec)
//                              pack p of a row's body (the elements from its first 16-byte boundary
//                              on): one 16-byte access when vec, else element by element (an
//                              operand out of phase with the one the body was split by);
//                              get_pack<VEC>(body, p) when vec is known at compile time
//   same_phase(a, b)           a and b are equal mod 16 bytes: a second operand (an output, a
//                              gradient) can use 16-byte accesses at the first operand's body positions
//   phase_period(bytes, {strides})  rows whose starts are equal mod 16 bytes in EVERY operand: row r
//                              and r + P, P = 16 / gcd(16, each row stride in bytes) <= 16 / elem
//                              bytes (host). A kernel that gives one thread the same columns of
//                              several rows (per-column sums) walks rows of one phase, r = q + P i:
//                              their splits are equal, so a slot is one column for all of them
//   Slots<T, TPR, K>           the elements one of the TPR threads that own a row holds: K packs
//                              (pack p0 + lane + k TPR, coalesced across the threads) and, when
//                              `edges`, head element `lane` and tail element `lane` (TPR >= VEC - 1,
//                              so one of each suffices). Methods:
//     load(row, vec)  -> Held  every pack load issued before any is used (K x 16 B in flight per
//                              thread); vec = false: the same positions element by element (a second
//                              operand out of phase with the first)
//     for_each(f)              f(slot, col) for each held element; slots are compile-time after
//                              unrolling, so Held::at(slot) is a register
//     store(row, vec, f)       row[col] = f(slot, col) for each held element, 16-byte stores when vec
//   Held<T, K>                 the loaded registers (raw T: 4 registers per pack for every dtype)
//   stream_row<T, TPR, K>(split, lane, f)
//                              chunks of TPR K packs: f(slots) per chunk, the edges in the first.
//                              For one-pass kernels and rows too long to hold.
//
// Holding a row: Slots with p0 = 0 and K packs per thread hold TPR K VEC + 2 (VEC - 1) elements
// in registers, so a kernel that reduces over the row and then writes from it reads it once.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "activations.cuh"

namespace fastlm::cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
inline constexpr int kVec = int(16 / sizeof(T));

struct RowSplit {
  int64_t head;   // scalar elements before the first 16-byte boundary (< VEC)
  int64_t packs;  // whole 16-byte packs after them
  int64_t tail;   // scalar elements after the last pack (< VEC)
};

template <typename T>
__host__ __device__ __forceinline__ RowSplit split_row(const T* row, int64_t cols) {
  const uint64_t misaligned = reinterpret_cast<uintptr_t>(row) % 16;
  int64_t head = int64_t((16 - misaligned) % 16 / sizeof(T));
  head = head < cols ? head : cols;
  const int64_t packs = (cols - head) / kVec<T>;
  return RowSplit{head, packs, cols - head - packs * kVec<T>};
}

template <typename T>
__device__ __forceinline__ Pack<T, kVec<T>> get_pack(const T* body, int64_t p, bool vec) {
  Pack<T, kVec<T>> v;
  if (vec) {
    v = reinterpret_cast<const Pack<T, kVec<T>>*>(body)[p];
  } else {
#pragma unroll
    for (int j = 0; j < kVec<T>; ++j) v.v[j] = body[p * kVec<T> + j];
  }
  return v;
}

template <bool VEC, typename T>
__device__ __forceinline__ Pack<T, kVec<T>> get_pack(const T* body, int64_t p) {
  return get_pack(body, p, VEC);
}

template <typename T>
__device__ __forceinline__ void put_pack(T* body, int64_t p, const Pack<T, kVec<T>>& v, bool vec) {
  if (vec) {
    reinterpret_cast<Pack<T, kVec<T>>*>(body)[p] = v;
  } else {
#pragma unroll
    for (int j = 0; j < kVec<T>; ++j) body[p * kVec<T> + j] = v.v[j];
  }
}

__host__ __device__ __forceinline__ bool same_phase(const void* a, const void* b) {
  return ((reinterpret_cast<uintptr_t>(a) ^ reinterpret_cast<uintptr_t>(b)) & 15) == 0;
}

// Rows r and r + P start at the same address mod 16 in every operand whose row stride (elements)
// is listed: P = 16 / gcd(16, stride bytes...), 1 when every stride is a multiple of 16 bytes.
inline int phase_period(int elem_bytes, std::initializer_list<int64_t> strides) {
  int64_t g = 16;
  for (int64_t s : strides) {
    int64_t b = ((s * elem_bytes) % 16 + 16) % 16;  // negative strides too
    while (b) { const int64_t t = g % b; g = b; b = t; }
  }
  return int(16 / g);
}

template <typename T, int K>
struct Held {
  static constexpr int kV = kVec<T>;
  static constexpr int kHead = K * kV, kTail = K * kV + 1, kSlots = K * kV + 2;
  Pack<T, kV> body[K];
  T head, tail;  // named, not an array: a merged edge path must select, not index local memory
  __device__ __forceinline__ float at(int slot) const {
    return slot < kHead ? to_float(body[slot / kV].v[slot % kV]) : to_float(slot == kHead ? head : tail);
  }
};

template <typename T, int TPR, int K>
struct Slots {
  static constexpr int kV = kVec<T>;
  static_assert(TPR >= kV - 1, "one head and one tail element per thread");
  RowSplit s;
  int lane;       // this thread's index among the row's TPR threads
  int64_t p0;     // the first pack of this chunk
  bool edges;     // this chunk holds the head and tail elements

  __device__ __forceinline__ bool has_pack(int k) const { return p0 + lane + int64_t(k) * TPR < s.packs; }
  __device__ __forceinline__ int64_t pack_col(int k) const { return s.head + (p0 + lane + int64_t(k) * TPR) * kV; }
  __device__ __forceinline__ bool has_head() const { return edges && lane < s.head; }
  __device__ __forceinline__ bool has_tail() const { return edges && lane < s.tail; }
  __device__ __forceinline__ int64_t tail_col() const { return s.head + s.packs * kV + lane; }

  // load / store spell their pack accesses out rather than call get_pack / put_pack: the same
  // accesses through those (body pointer + pack index) moved ptxas's register allocation in
  // bias_act's 16-bit backward (spills under 128 registers, or half the loads in flight).
  __device__ __forceinline__ Held<T, K> load(const T* __restrict__ row, bool vec) const {
    Held<T, K> h;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (!has_pack(k)) continue;
      if (vec) {
        h.body[k] = *reinterpret_cast<const Pack<T, kV>*>(row + pack_col(k));
      } else {
#pragma unroll
        for (int i = 0; i < kV; ++i) h.body[k].v[i] = row[pack_col(k) + i];
      }
    }
    if (has_head()) h.head = row[lane];
    if (has_tail()) h.tail = row[tail_col()];
    return h;
  }

  template <typename F>
  __device__ __forceinline__ void for_each(F&& f) const {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (!has_pack(k)) continue;
#pragma unroll
      for (int i = 0; i < kV; ++i) f(k * kV + i, pack_col(k) + i);
    }
    if (has_head()) f(Held<T, K>::kHead, int64_t(lane));
    if (has_tail()) f(Held<T, K>::kTail, tail_col());
  }

  template <typename F>
  __device__ __forceinline__ void store(T* __restrict__ row, bool vec, F&& f) const {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (!has_pack(k)) continue;
      Pack<T, kV> out;
#pragma unroll
      for (int i = 0; i < kV; ++i) out.v[i] = from_float<T>(f(k * kV + i, pack_col(k) + i));
      if (vec) {
        *reinterpret_cast<Pack<T, kV>*>(row + pack_col(k)) = out;
      } else {
#pragma unroll
        for (int i = 0; i < kV; ++i) row[pack_col(k) + i] = out.v[i];
      }
    }
    if (has_head()) row[lane] = from_float<T>(f(Held<T, K>::kHead, int64_t(lane)));
    if (has_tail()) row[tail_col()] = from_float<T>(f(Held<T, K>::kTail, tail_col()));
  }
};

// The whole row as it is held by one thread (K packs per thread cover it: packs <= TPR K).
template <typename T, int TPR, int K>
__device__ __forceinline__ Slots<T, TPR, K> whole_row(const RowSplit& s, int lane) {
  return Slots<T, TPR, K>{s, lane, 0, true};
}

// f(Slots) for each chunk of TPR K packs. The first chunk (always called, so rows without packs
// see their edges) is peeled: the loop's chunks have no edge code (and nothing for ptxas to keep
// live across it).
template <typename T, int TPR, int K, typename F>
__device__ __forceinline__ void stream_row(const RowSplit& s, int lane, F&& f) {
  f(Slots<T, TPR, K>{s, lane, 0, true});
  for (int64_t p0 = int64_t(TPR) * K; p0 < s.packs; p0 += int64_t(TPR) * K) f(Slots<T, TPR, K>{s, lane, p0, false});
}

}  // namespace fastlm::cuda
