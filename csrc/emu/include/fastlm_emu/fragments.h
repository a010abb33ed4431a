// Register fragment layouts of the warp-level matrix instructions, as the PTX ISA documents them
// ("Matrix Fragments for mma.m16n8k16" with .f16/.bf16 operands, and ldmatrix). gid = lane / 4
// (the "groupID"), tig = lane % 4 ("threadID_in_group"). Element i of a lane is the i-th 16-bit
// half of its registers in order (a0..a7 over four .b32 registers for A), or the i-th float.
// tests/test_emulator.py checks these formulas against tables written out from the ISA.
#pragma once

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

}  // namespace fastlm::emu::frag
