// linear with a prepacked weight, CPU fp32 inference: y = act(x @ weight^T + bias) + residual.
// Every GEMM call re-packs its weight into the BLAS kernel's panel layout, one read and one
// write of the whole weight: at GPT-2's 512 tokens that is 12-15% of each layer GEMM and ~15 ms
// of the LM head. Packing once (MKL's cblas_sgemm_pack, which torch's x86 builds export) and
// reusing it made the whole GPT-2-small forward 8-18% faster (e.g. 533 vs 646 ms). The pack is
// about twice the weight's size and goes stale when the weight changes; fastlm.nn.Linear.prepack
// (the only intended caller) tracks that by the weight's version. Builds without MKL report
// unavailable.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "cpu_output.h"
#include "linear_common.h"

// Weak: resolved from libtorch_cpu when its MKL exports them, null otherwise (aarch64, no MKL).
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace fastlm::bind {
namespace {

enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162 };

bool prepack_available() { return cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute; }

void check_available(const char* op) {
  TORCH_CHECK(prepack_available(), op, ": this torch build exports no MKL packed GEMM (cblas_sgemm_pack); "
              "prepacked weights are unavailable here, use fastlm.ops.linear");
}

void check_weight(const char* op, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(weight.device().is_cpu() && weight.scalar_type() == at::kFloat, op,
                    ": weight must be a float32 CPU tensor, got ", weight.scalar_type(), " on ", weight.device().str());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D (N, K), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) <= INT32_MAX && weight.size(1) <= INT32_MAX, op, ": weight shape ",
                    weight.sizes(), " is past the 32-bit BLAS interface");
}

// MKL picks the packed layout from the row count it is told. Told 1 (or 8), GPT-2's 512-row
// GEMMs ran 20-50% slower than unpacked; told 128-512 they ran 12-15% faster, and single-row
// (decode) calls were as fast as with any other layout. So every weight is packed for 512 rows.
constexpr int kPackRows = 512;

// The pack is a uint8 tensor: this header, then MKL's data from byte 64 (64-byte aligned, as at::empty
// is). MKL's data is bound to its address: a copy computed wrong results without any error when
// tried, so the header records where it was packed and the shape, and every use checks both.
struct PackHeader {
  uint64_t magic;
  uint64_t data_address;
  int64_t n, k, bytes;
  uint64_t check;  // of the fields above: a pack built for another weight, or garbage, fails
};
constexpr uint64_t kMagic = 0x6b6361706d6c7466ull;  // "ftlmpack"
constexpr int64_t kHeaderBytes = 64;
static_assert(sizeof(PackHeader) <= kHeaderBytes);

uint64_t header_check(const PackHeader& h) {
  return h.magic ^ (h.data_address * 0x9e3779b97f4a7c15ull) ^ (uint64_t(h.n) << 32) ^ uint64_t(h.k) ^
         (uint64_t(h.bytes) * 0xff51afd7ed558ccdull);
}

int64_t mkl_bytes(int64_t n, int64_t k) { return int64_t(cblas_sgemm_pack_get_size(kBMatrix, kPackRows, int(n), int(k))); }

at::Tensor linear_prepack_cpu(const at::Tensor& weight) {
  constexpr const char* op = "linear_prepack";
  check_available(op);
  check_weight(op, weight);
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), bytes = mkl_bytes(n, k);
  at::Tensor packed = at::empty({kHeaderBytes + bytes}, w.options().dtype(at::kByte));
  uint8_t* base = packed.data_ptr<uint8_t>();
  float* data = reinterpret_cast<float*>(base + kHeaderBytes);
  if (n > 0 && k > 0)  // B = weight^T (K, N): weight read row-major and transposed while packing
    cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, kPackRows, int(n), int(k), 1.0f, w.data_ptr<float>(), int(k), data);
  PackHeader h{kMagic, reinterpret_cast<uint64_t>(data), n, k, bytes, 0};
  h.check = header_check(h);
  std::memcpy(base, &h, sizeof h);
  return packed;
}

// MKL's data in `packed`, after checking it was packed here, at this address, for this weight's shape.
const float* pack_data(const char* op, const at::Tensor& packed, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                        packed.is_contiguous() && packed.numel() >= kHeaderBytes,
                    op, ": packed must be the uint8 tensor linear_prepack(weight) returned, got ",
                    packed.scalar_type(), " of shape ", packed.sizes());
  const uint8_t* base = static_cast<const uint8_t*>(packed.data_ptr());
  PackHeader h;
  std::memcpy(&h, base, sizeof h);
  const uint64_t here = reinterpret_cast<uint64_t>(base + kHeaderBytes);
  TORCH_CHECK_VALUE(h.magic == kMagic && h.check == header_check(h), op,
                    ": packed is not (or no longer) a linear_prepack result: its header does not check");
  TORCH_CHECK_VALUE(h.data_address == here, op, ": packed was copied or moved since linear_prepack made it; MKL's ",
                    "packed layout is bound to its address, so pack the weight again");
  TORCH_CHECK_VALUE(h.n == weight.size(0) && h.k == weight.size(1) && packed.numel() == kHeaderBytes + h.bytes, op,
                    ": packed was made for a (", h.n, ", ", h.k, ") weight, but weight has shape ", weight.sizes());
  return reinterpret_cast<const float*>(base + kHeaderBytes);
}

at::Tensor linear_prepacked_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                c10::string_view activation) {
  constexpr const char* op = "linear_prepacked";
  Activation act = Activation::kGelu;
  const bool has_act = optional_activation_arg(op, activation, &act);
  check_available(op);
  check_weight(op, weight);
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat, op,
                    ": x must be a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device().str());
  linear_args(op, x, weight, bias, residual);
  const float* pack = pack_data(op, packed, weight);
  TORCH_CHECK_VALUE(x.size(0) <= INT32_MAX, op, ": x has ", x.size(0), " rows, past the 32-bit BLAS interface");
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  at::Tensor y = empty_output({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) {
    y.zero_();
  } else {
    const at::Tensor xc = x.stride(1) == 1 && x.stride(0) >= K ? x : x.contiguous();
    cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(M), int(N), int(K), xc.data_ptr<float>(),
                        int(xc.stride(0)), pack, int(K), 0.0f, y.data_ptr<float>(), int(N));
  }
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual ? rows_view(*residual) : at::Tensor();
  if (has_act || b.defined() || r.defined())
    run_linear_epilogue_cpu(DType::kFloat32, has_act, act, y, b, r, y, at::Tensor());
  return y;
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("linear_prepack_available() -> bool", &fastlm::bind::prepack_available);
  m.def("linear_prepack(Tensor weight) -> Tensor");
  m.def("linear_prepacked(Tensor x, Tensor packed, Tensor weight, Tensor? bias, Tensor? residual, str activation)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("linear_prepack", &fastlm::bind::linear_prepack_cpu);
  m.impl("linear_prepacked", &fastlm::bind::linear_prepacked_cpu);
}
