// Register fragment layouts of the warp-level matrix instructions, as the PTX ISA documents them
// ("Matrix Fragments for mma.m16n8k16" with .f16/.bf16 operands, and ldmatrix). gid = lane / 4
// (the "groupID"), tig = lane % 4 ("threadID_in_group"). Element i of a lane is the i-th 16-bit
// half of its registers in order (a0..a7 over four .b32 registers for A), or the i-th float.
// tests/test_emulator.py checks these formulas against tables written out from the ISA.
#pragma once
#include <cstdint>

namespace fastlm::emu::frag {

struct RowCol {
  int row, col;
};

// mma.m16n8k16 A (16 x 16, row = m, col = k): 8 elements per lane.
constexpr RowCol mma_a(int lane, int i) {
  return {lane / 4 + 8 * ((i / 2) % 2), (lane % 4) * 2 + (i % 2) + 8 * (i / 4)};
}
// mma.m16n8k16 B (16 x 8, row = k, col = n): 4 elements per lane.
constexpr RowCol mma_b(int lane, int i) { return {(lane % 4) * 2 + (i % 2) + 8 * (i / 2), lane / 4}; }
// mma.m16n8k16 C / D (16 x 8, fp32): 4 elements per lane.
constexpr RowCol mma_c(int lane, int i) { return {lane / 4 + 8 * (i / 2), (lane % 4) * 2 + (i % 2)}; }

// ldmatrix .m8n8 .b16: register j of a lane holds two adjacent elements of matrix j; element
// e (0 or 1) of that register is (row, col) of the 8 x 8 matrix (transposed with .trans).
constexpr RowCol ldmatrix(int lane, int e, bool trans) {
  return trans ? RowCol{(lane % 4) * 2 + e, lane / 4} : RowCol{lane / 4, (lane % 4) * 2 + e};
}

// wmma m16n16k16: the ISA leaves fragment layouts unspecified; the emulator composes them from
// the mma.m16n8k16 ones (A as is, B and C as two n8 halves), as sm_80 compilers do. Kernels may
// only rely on num_elements and element-wise operations, never on this mapping.
constexpr RowCol wmma_a(int lane, int i) { return mma_a(lane, i); }
constexpr RowCol wmma_b(int lane, int i) {
  return {mma_b(lane, i % 4).row, mma_b(lane, i % 4).col + 8 * (i / 4)};
}
constexpr RowCol wmma_c(int lane, int i) {
  return {mma_c(lane, i % 4).row, mma_c(lane, i % 4).col + 8 * (i / 4)};
}

// ---- wgmma (sm_90a), per warpgroup: wt = thread % 128, w = wt / 32 its warp in the group.
// D of m64nNk16 with fp32 accumulators (64 x N): N/2 floats per thread, i = 0..N/2-1.
constexpr RowCol wgmma_d(int wt, int i) {
  return {16 * (wt / 32) + (wt % 32) / 4 + 8 * ((i / 2) % 2), 8 * (i / 4) + 2 * (wt % 4) + i % 2};
}
// A (64 x 16, row = m, col = k) from registers (.f16 / .bf16): 8 halves in 4 .b32 registers;
// each warp holds its 16 rows as mma.m16n8k16's A fragment.
constexpr RowCol wgmma_a(int wt, int j) {
  return {16 * (wt / 32) + mma_a(wt % 32, j).row, mma_a(wt % 32, j).col};
}
// Byte offset, before the swizzle, of element (mn, k) of a shared-memory operand whose matrix
// descriptor says (lbo, sbo, span = 0 for no swizzle or 32 / 64 / 128), 16-bit elements.
// K-major: rows of mn, k contiguous; MN-major: rows of k, mn contiguous (the ISA's "Shared
// Memory Matrix Layout"; ptx_sm90.cuh's header has the formulas).
constexpr uint32_t wgmma_smem_offset(bool mn_major, int span, uint32_t lbo, uint32_t sbo, int mn, int k) {
  if (!mn_major)
    return span == 0 ? uint32_t((mn % 8) * 16 + (mn / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo)
                     : uint32_t((mn % 8) * span + (mn / 8) * sbo + k * 2);
  return span == 0 ? uint32_t((mn % 8) * 2 + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo)
                   : uint32_t((mn % (span / 2)) * 2 + (mn / (span / 2)) * lbo + (k % 8) * span + (k / 8) * sbo);
}

}  // namespace fastlm::emu::frag
