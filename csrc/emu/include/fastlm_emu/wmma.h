// nvcuda::wmma for the emulator, m16n16k16 with f16/bf16 inputs and fp32 accumulators: the
// fragment types and the warp-collective load / store / mma with CUDA's argument rules (every
// lane passes the same pointer and ldm; the pointer is 32-byte aligned; ldm is a multiple of
// 16 bytes). Layouts: fragments.h.
#pragma once
#include <cstdint>
#include <type_traits>

#include "fastlm_emu/cuda.h"
#include "fastlm_emu/fragments.h"
#include "fastlm_emu/half.h"

#define FASTLM_EMU_UNCHECKED __attribute__((no_sanitize_thread, noinline))

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements wmma m16n16k16 only");
  using element_type = T;
  using storage_element_type = T;
  static constexpr int num_elements = 8;
  T x[num_elements];
};

namespace detail {
using fastlm::emu::frag::RowCol;

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use>
constexpr RowCol layout(int lane, int i) {
  if constexpr (std::is_same_v<Use, matrix_a>) return fastlm::emu::frag::wmma_a(lane, i);
  else if constexpr (std::is_same_v<Use, matrix_b>) return fastlm::emu::frag::wmma_b(lane, i);
  else return fastlm::emu::frag::wmma_c(lane, i);
}

template <typename T>
struct MoveSlot {
  T* x;          // this lane's fragment elements
  T* p;          // the matrix in memory
  unsigned ldm;
  bool col_major;  // memory layout: element (r, c) at p[c * ldm + r]
};

template <typename T>
void check_args(const char* what, void** slots) {
  const auto* s0 = static_cast<MoveSlot<T>*>(slots[0]);
  for (int lane = 1; lane < 32; ++lane) {
    const auto* s = static_cast<MoveSlot<T>*>(slots[lane]);
    if (s->p != s0->p || s->ldm != s0->ldm || s->col_major != s0->col_major)
      fastlm::emu::fail("%s: lane %d passed (%p, ldm %u) but lane 0 passed (%p, ldm %u); every lane must pass the same",
                        what, lane, static_cast<void*>(s->p), s->ldm, static_cast<void*>(s0->p), s0->ldm);
  }
  if (reinterpret_cast<uintptr_t>(s0->p) % 32)
    fastlm::emu::fail("%s: pointer %p is not 32-byte aligned", what, static_cast<void*>(s0->p));
  if (s0->ldm * sizeof(T) % 16)
    fastlm::emu::fail("%s: ldm %u is not a multiple of 16 bytes (%zu-byte elements)", what, s0->ldm, sizeof(T));
}

template <typename Use, typename T, bool Store>
FASTLM_EMU_UNCHECKED void move_op(void** slots, unsigned mask) {
  if (mask != 0xffffffffu) fastlm::emu::fail("wmma: all 32 lanes must take part (mask %#x)", mask);
  check_args<T>(Store ? "wmma::store_matrix_sync" : "wmma::load_matrix_sync", slots);
  for (int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1)) continue;
    auto* s = static_cast<MoveSlot<T>*>(slots[lane]);
    for (int i = 0; i < 8; ++i) {
      const RowCol rc = layout<Use>(lane, i);
      T* at = s->col_major ? s->p + size_t(rc.col) * s->ldm + rc.row : s->p + size_t(rc.row) * s->ldm + rc.col;
      if (fastlm::emu::in_shared_arena(at)) fastlm::emu::shared_access_by_lane(lane, at, sizeof(T), Store);
      if constexpr (Store) *at = s->x[i];
      else s->x[i] = *at;
    }
  }
}

template <typename TA, typename TC>
struct MmaSlot {
  const TA* a;
  const TA* b;
  const TC* c;
  TC* d;
};

template <typename TA, typename TC>
FASTLM_EMU_UNCHECKED void mma_op(void** slots, unsigned mask) {
  if (mask != 0xffffffffu) fastlm::emu::fail("wmma::mma_sync: all 32 lanes must take part (mask %#x)", mask);
  float A[16][16], B[16][16], C[16][16];
  for (int lane = 0; lane < 32; ++lane) {
    auto* s = static_cast<MmaSlot<TA, TC>*>(slots[lane]);
    for (int i = 0; i < 8; ++i) {
      RowCol rc = layout<matrix_a>(lane, i);
      A[rc.row][rc.col] = to_f(s->a[i]);
      rc = layout<matrix_b>(lane, i);
      B[rc.row][rc.col] = to_f(s->b[i]);
      rc = layout<accumulator>(lane, i);
      C[rc.row][rc.col] = to_f(s->c[i]);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* s = static_cast<MmaSlot<TA, TC>*>(slots[lane]);
    for (int i = 0; i < 8; ++i) {
      const RowCol rc = layout<accumulator>(lane, i);
      float acc = C[rc.row][rc.col];  // fp32 accumulation in k order; products of 16-bit values are exact
      for (int k = 0; k < 16; ++k) acc += A[rc.row][k] * B[k][rc.col];
      s->d[i] = TC(acc);
    }
  }
}
}  // namespace detail

template <typename Use, typename T, typename L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, T v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulators take a layout_t");
  detail::MoveSlot<T> s{f.x, const_cast<T*>(p), ldm, std::is_same_v<L, col_major>};
  fastlm::emu::warp_collective(0xffffffffu, "wmma::load_matrix_sync", &s, &detail::move_op<Use, T, false>);
}

template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& f, const T* p, unsigned ldm, layout_t l) {
  detail::MoveSlot<T> s{f.x, const_cast<T*>(p), ldm, l == mem_col_major};
  fastlm::emu::warp_collective(0xffffffffu, "wmma::load_matrix_sync", &s, &detail::move_op<accumulator, T, false>);
}

template <typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T, void>& f, unsigned ldm, layout_t l) {
  detail::MoveSlot<T> s{const_cast<T*>(f.x), p, ldm, l == mem_col_major};
  fastlm::emu::warp_collective(0xffffffffu, "wmma::store_matrix_sync", &s, &detail::move_op<accumulator, T, true>);
}

template <typename TA, typename LA, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TC, void>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TA, LB>& b,
                     const fragment<accumulator, 16, 16, 16, TC, void>& c) {
  static_assert(std::is_same_v<TC, float>, "the emulator implements fp32 accumulators");
  detail::MmaSlot<TA, TC> s{a.x, b.x, c.x, d.x};
  fastlm::emu::warp_collective(0xffffffffu, "wmma::mma_sync", &s, &detail::mma_op<TA, TC>);
}

}  // namespace nvcuda::wmma
