// The emulator's sm_90a primitives (declared in include/fastlm_emu/ptx_sm90.h). Stage 1: the
// API links; every primitive stops the launch until its emulation lands.
#include "fastlm_emu/cuda.h"
#include "../cuda/ptx_sm90.cuh"

namespace fastlm::emu::sm90 {
#define FASTLM_NOT_YET(what) fail("%s: not yet emulated", what)
void require_sm90(const char* what) { FASTLM_NOT_YET(what); }
void mbar_init(uint64_t*, int) { FASTLM_NOT_YET("mbarrier.init"); }
void fence_barrier_init() { FASTLM_NOT_YET("fence.mbarrier_init"); }
void mbar_arrive(uint64_t*, bool, uint32_t) { FASTLM_NOT_YET("mbarrier.arrive"); }
void mbar_wait(uint64_t*, int) { FASTLM_NOT_YET("mbarrier.try_wait"); }
void tma_load(void*, const TmaDesc*, int, const int*, uint64_t*) { FASTLM_NOT_YET("cp.async.bulk.tensor"); }
void tma_prefetch(const TmaDesc*) { FASTLM_NOT_YET("prefetch.tensormap"); }
void fence_proxy_async() { FASTLM_NOT_YET("fence.proxy.async"); }
void named_barrier(int, int, bool) { FASTLM_NOT_YET("bar.sync"); }
void setmaxnreg(int) { FASTLM_NOT_YET("setmaxnreg"); }
uint32_t smem_offset(const void*, const char* what) { FASTLM_NOT_YET(what); }
void wgmma(float*, int, int, bool, bool, uint64_t, const uint32_t*, uint64_t, bool) { FASTLM_NOT_YET("wgmma"); }
void wgmma_fence() { FASTLM_NOT_YET("wgmma.fence"); }
void wgmma_commit() { FASTLM_NOT_YET("wgmma.commit_group"); }
void wgmma_wait(int) { FASTLM_NOT_YET("wgmma.wait_group"); }
}  // namespace fastlm::emu::sm90
