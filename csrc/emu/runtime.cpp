// The SIMT emulator's runtime (the model is described in include/fastlm_emu/runtime.h): fibers
// and their scheduler, barriers and warp collectives, the per-block shared-memory arena with its
// checker, cp.async queues, ldmatrix / mma.sync, the TSan-ABI memory hooks and the slice of the
// CUDA runtime API the launchers call. Compiled without instrumentation. The sm_90 primitives
// live in sm90.cpp; the state both share is in runtime_internal.h.
#include <sys/mman.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "fastlm_emu/cuda.h"
#include "fastlm_emu/fragments.h"
#include "fastlm_emu/ptx.h"
#include "runtime_internal.h"

namespace fastlm::emu {

Current g_cur;

namespace {

// ---------------------------------------------------------------- fibers
// x86-64: a six-register switch (System V callee-saved set).
extern "C" void fastlm_emu_switch(void** save_sp, void* load_sp);
extern "C" void fastlm_emu_fiber_start();
extern "C" void fastlm_emu_fiber_main();
// A new fiber's stack holds six zeroed registers and then the address of fastlm_emu_fiber_start,
// so the first switch to it pops the zeros and its `ret` enters the entry trampoline, which
// calls fiber_main.
asm(R"(
  .text
  .globl fastlm_emu_switch
  .type fastlm_emu_switch, @function
fastlm_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastlm_emu_switch, .-fastlm_emu_switch
  .globl fastlm_emu_fiber_start
  .type fastlm_emu_fiber_start, @function
fastlm_emu_fiber_start:
  andq $-16, %rsp
  call fastlm_emu_fiber_main
  ud2
  .size fastlm_emu_fiber_start, .-fastlm_emu_fiber_start
)");
static_assert(sizeof(void*) == 8, "x86-64 only");

constexpr size_t kStackBytes = 128 << 10;
constexpr size_t kRedZone = 256;             // bytes between shared allocations
constexpr size_t kArenaBytes = 1024 << 10;   // more than any GPU's shared memory plus red zones
constexpr size_t kStaticLimit = 48 << 10;    // static __shared__ per block, on every GPU

}  // namespace

Block g_block;
Cluster g_cluster;
std::vector<Thread> g_threads(kMaxThreads);
unsigned char* g_arena = nullptr;
uintptr_t g_arena_lo = 0, g_arena_span = 0;  // span 0 outside a block: the hooks' fast exit

namespace {

std::mutex g_launch_mutex;
Context g_sched;
Shadow* g_shadow = nullptr;  // kArenaBytes entries, mapped lazily (zero pages until touched)
size_t g_shadow_dirty = 0;
std::string g_fault;  // the running launch's kernel error (empty: none so far)
KernelThunk g_thunk = nullptr;
const void* g_args = nullptr;
Stats g_stats{};
cudaError_t g_last_error = cudaSuccess;  // sticky until cudaGetLastError reads it, as in CUDA
std::string g_last_message;              // what went wrong, in words, for the error below
cudaError_t g_message_error = cudaSuccess;
std::unordered_map<const void*, int> g_max_dynamic;  // cudaFuncAttributeMaxDynamicSharedMemorySize

constexpr DeviceProfile kProfiles[] = {
    {8, 0, 108, 1024, 65535, 65535, 49152, 166912, 2048, 167936, 7},  // A100
    {8, 6, 84, 1024, 65535, 65535, 49152, 101376, 1536, 102400, 7},   // RTX 3090 / A10 class
    {8, 9, 128, 1024, 65535, 65535, 49152, 101376, 1536, 102400, 11}, // RTX 4090 / L4 / L40S class
    {9, 0, 132, 1024, 65535, 65535, 49152, 232448, 2048, 233472, 8},  // H100 / H200
};
const DeviceProfile* g_device = &kProfiles[0];
int g_gpc_sms = 0;  // set_gpc_sms


void* map_or_die(size_t bytes, const char* what) {
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    std::fprintf(stderr, "fastlm emulator: cannot map %s\n", what);
    std::abort();
  }
  return mem;
}

// One CTA's resources: kMaxThreads fibers with guarded stacks, a shared arena and its shadow.
void make_cta(std::vector<Thread>& threads, unsigned char*& arena, Shadow*& shadow) {
  arena = static_cast<unsigned char*>(map_or_die(kArenaBytes, "a shared-memory arena"));
  shadow = static_cast<Shadow*>(map_or_die(kArenaBytes * sizeof(Shadow), "a shadow arena"));
  threads.resize(kMaxThreads);
  for (Thread& t : threads) {
    auto* mem = static_cast<unsigned char*>(map_or_die(kStackBytes + 4096, "fiber stacks"));
    mprotect(mem, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    t.stack = mem + 4096;
  }
}

void init_once() {
  if (!g_arena) make_cta(g_threads, g_arena, g_shadow);
}

}  // namespace

void switch_to_scheduler(Thread& t) { fastlm_emu_switch(&t.ctx.sp, g_sched.sp); }

std::string thread_name(const Thread& t) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) of block (%u,%u,%u) [warp %d lane %d]", t.idx.x, t.idx.y, t.idx.z,
                g_cur.block_idx.x, g_cur.block_idx.y, g_cur.block_idx.z, t.warp, t.lane);
  return buf;
}

std::string accessor_name(int tid) {
  if (tid >= kRemoteAccessor) {  // a thread of another CTA of the cluster, through DSMEM
    const int rank = (tid - kRemoteAccessor) / kMaxThreads, i = (tid - kRemoteAccessor) % kMaxThreads;
    const unsigned bx = g_cur.block_dim.x, by = g_cur.block_dim.y;
    const uint3 from = cluster_block_idx(rank);
    char buf[224];
    std::snprintf(buf, sizeof buf,
                  "thread (%u,%u,%u) of block (%u,%u,%u) [warp %d lane %d, cluster rank %d] through DSMEM into block "
                  "(%u,%u,%u) (cluster rank %d)",
                  unsigned(i) % bx, unsigned(i) / bx % by, unsigned(i) / (bx * by), from.x, from.y, from.z, i / 32,
                  i % 32, rank, g_cur.block_idx.x, g_cur.block_idx.y, g_cur.block_idx.z, g_block.rank);
    return buf;
  }
  if (tid < g_block.n) return thread_name(g_threads[size_t(tid)]);
  char buf[96];
  std::snprintf(buf, sizeof buf, "the wgmma shared-memory reads of warpgroup %d (threads %d..%d)", tid - g_block.n,
                128 * (tid - g_block.n), 128 * (tid - g_block.n) + 127);
  return buf;
}

// ---------------------------------------------------------------- happens-before
void hb_enable() {
  Block& b = g_block;
  if (b.hb) return;
  b.hb = true;
  b.hb_dim = b.n + (b.n + 127) / 128;
  b.clocks.assign(size_t(b.hb_dim) * size_t(b.hb_dim), 0);
  for (int i = 0; i < b.hb_dim; ++i) clock_of(i)[i] = 1;  // every access so far carries clock 1
}

void hb_join(uint32_t* into, const uint32_t* from) {
  for (int i = 0; i < g_block.hb_dim; ++i) into[i] = into[i] < from[i] ? from[i] : into[i];
}

void hb_release(int tid, std::vector<uint32_t>& into) {
  hb_enable();
  if (into.empty()) into.assign(size_t(g_block.hb_dim), 0);
  hb_join(into.data(), clock_of(tid));
  ++clock_of(tid)[tid];
}

void hb_acquire(int tid, const std::vector<uint32_t>& from) {
  if (!from.empty()) hb_join(clock_of(tid), from.data());
}

bool ordered_after(int tc, int ta, uint32_t ep_a, uint32_t clk_a) {
  if (ta == tc || ep_a != g_block.epoch) return true;  // same accessor, or a __syncthreads between
  return g_block.hb && clock_of(tc)[ta] >= clk_a;
}

// ---------------------------------------------------------------- shared-memory checker
const Alloc* find_alloc(size_t off) {
  for (const Alloc& a : g_block.allocs)
    if (off >= a.offset && off < a.offset + a.bytes) return &a;
  return nullptr;
}

std::string describe(size_t off) {
  char buf[160];
  if (const Alloc* a = find_alloc(off)) {
    std::snprintf(buf, sizeof buf, "byte %zu of shared '%s' (%zu bytes)", off - a->offset, a->name, a->bytes);
    return buf;
  }
  const Alloc* below = nullptr;
  for (const Alloc& a : g_block.allocs)
    if (a.offset + a.bytes <= off && (!below || a.offset > below->offset)) below = &a;
  if (below)
    std::snprintf(buf, sizeof buf, "%zu bytes past the end of shared '%s' (%zu bytes)", off - below->offset - below->bytes,
                  below->name, below->bytes);
  else
    std::snprintf(buf, sizeof buf, "shared offset %zu, before every allocation", off);
  return buf;
}

namespace {
// Accessor ta (at block epoch ep_a, warp epoch wep_a, clock entry clk_a, cluster epoch cep_a)
// before tc's access now. A DSMEM access on either side: only a cluster barrier between orders.
bool ordered(uint16_t ta, uint32_t ep_a, uint32_t wep_a, uint32_t clk_a, uint32_t cep_a, int tc, uint32_t wep_c) {
  if (ta >= kRemoteAccessor || tc >= kRemoteAccessor) return ta == tc || cep_a != g_cluster.epoch;
  if (ordered_after(tc, ta, ep_a, clk_a)) return true;
  return ta < g_block.n && tc < g_block.n && ta / 32 == tc / 32 && wep_a != wep_c;  // a __syncwarp between
}

[[noreturn]] void race(const char* kind, size_t off, int other_tid, int tid) {
  fail("shared-memory race (%s) on %s: %s and %s with no barrier between them", kind, describe(off).c_str(),
       accessor_name(other_tid).c_str(), accessor_name(tid).c_str());
}
}  // namespace

void check_access(int tc, uintptr_t p, size_t n, bool write) {
  ++g_stats.shared_accesses;
  const size_t off = p - g_arena_lo;
  const Alloc* a = find_alloc(off);
  if (!a || off + n > a->offset + a->bytes)
    fail("out-of-bounds shared-memory %s of %zu bytes at %s by %s", write ? "write" : "read", n,
         describe(a ? a->offset + a->bytes : off).c_str(), accessor_name(tc).c_str());
  const uint32_t ep = g_block.epoch, wep = tc < g_block.n ? g_block.warps[tc / 32].epoch : 0;
  const uint32_t clk = g_block.hb && tc < g_block.hb_dim ? clock_of(tc)[tc] : 1, cep = g_cluster.epoch;
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = g_shadow[off + i];
    if (write) {
      if ((s.flags & kWritten) && !ordered(s.w_tid, s.w_ep, s.w_wep, s.w_clk, s.w_cep, tc, wep))
        race("write after write", off + i, s.w_tid, tc);
      if ((s.flags & kR1) && !ordered(s.r1_tid, s.r1_ep, s.r1_wep, s.r1_clk, s.r1_cep, tc, wep))
        race("write after read", off + i, s.r1_tid, tc);
      if ((s.flags & kR2) && !ordered(s.r2_tid, s.r2_ep, s.r2_wep, s.r2_clk, s.r2_cep, tc, wep))
        race("write after read", off + i, s.r2_tid, tc);
      s.w_tid = uint16_t(tc), s.w_ep = ep, s.w_wep = wep, s.w_clk = clk, s.w_cep = cep;
      s.flags |= kWritten;
    } else {
      if (!(s.flags & kWritten))
        fail("read of uninitialized shared memory: %s by %s (nothing in this block wrote it)", describe(off + i).c_str(),
             accessor_name(tc).c_str());
      if (!ordered(s.w_tid, s.w_ep, s.w_wep, s.w_clk, s.w_cep, tc, wep))
        race("read after write", off + i, s.w_tid, tc);
      // keep two distinct readers of the current epoch (enough to see a reader other than a writer)
      if ((s.flags & kR1) && s.r1_tid == tc) s.r1_ep = ep, s.r1_wep = wep, s.r1_clk = clk, s.r1_cep = cep;
      else if ((s.flags & kR2) && s.r2_tid == tc) s.r2_ep = ep, s.r2_wep = wep, s.r2_clk = clk, s.r2_cep = cep;
      else if (!(s.flags & kR1) || s.r1_ep != ep || s.r1_cep != cep)
        s.r1_tid = uint16_t(tc), s.r1_ep = ep, s.r1_wep = wep, s.r1_clk = clk, s.r1_cep = cep, s.flags |= kR1;
      else s.r2_tid = uint16_t(tc), s.r2_ep = ep, s.r2_wep = wep, s.r2_clk = clk, s.r2_cep = cep, s.flags |= kR2;
    }
  }
}

namespace {

// ---------------------------------------------------------------- scheduling
void open_barrier() {
  g_block.at_barrier = 0;
  ++g_block.epoch;
  ++g_stats.barriers;
  for (int i = 0; i < g_block.n; ++i)
    if ((*g_block.threads)[i].state == State::AtBarrier) (*g_block.threads)[i].state = State::Runnable;
}

void finish_collective(Warp& w, int warp) {
  ++g_stats.collectives;
  w.op(w.slots, w.mask);
  w.arrived = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if (!(w.mask >> lane & 1)) continue;
    Thread& t = (*g_block.threads)[warp * 32 + lane];
    if (t.state == State::AtWarp) t.state = State::Runnable;
  }
  w.what = nullptr;
}

void do_copies(Thread& t, size_t upto) {
  for (size_t i = 0; i < upto; ++i) {
    const Copy& c = t.copies[i];
    check_access(t.tid, reinterpret_cast<uintptr_t>(c.dst), size_t(c.bytes), true);
    std::memcpy(c.dst, c.src, size_t(c.src_bytes));
    std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
  }
  t.copies.erase(t.copies.begin(), t.copies.begin() + long(upto));
}

void thread_exit(Thread& t) {
  t.group_ends.clear();
  do_copies(t, t.copies.size());  // copies never waited for still land
  Warp& w = g_block.warps[t.warp];
  if (w.arrived > 0 && (w.mask >> t.lane & 1))
    fail("%s exited while its warp waits for it at %s", thread_name(t).c_str(), w.what);
  const Warpgroup& wg = g_block.warpgroups[t.tid / 128];
  if (wg.arrived > 0)
    fail("%s exited while its warpgroup waits for it at %s", thread_name(t).c_str(), wg.what);
  if (t.wg_open || !t.wg_groups.empty())
    fail("%s exited with wgmma operations it never waited for (%zu committed groups%s): their accumulators are "
         "undefined", thread_name(t).c_str(), t.wg_groups.size(), t.wg_open ? " and uncommitted ones" : "");
  w.exited |= 1u << t.lane;
  t.state = State::Done;
  --g_block.live;
  cluster_thread_exit(t);
  if (g_block.at_barrier > 0 && g_block.at_barrier == g_block.live) open_barrier();
}

}  // namespace
}  // namespace fastlm::emu

extern "C" void fastlm_emu_fiber_main() {
  using namespace fastlm::emu;
  Thread& t = *g_cur.thread;
  g_thunk(g_args);
  thread_exit(t);
  switch_to_scheduler(t);
  std::abort();  // a finished fiber is never resumed
}

// ---------------------------------------------------------------- the API the kernels see
namespace fastlm::emu {

Thread& me() { return *g_cur.thread; }

namespace {

std::string block_name() {
  char buf[64];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u)", g_cur.block_idx.x, g_cur.block_idx.y, g_cur.block_idx.z);
  return buf;
}

// align: 128, or up to 1024 for a static declaration that asks for it (a 128B-swizzled TMA /
// wgmma tile needs 1024). The dynamic buffer gets 128 only, as on a GPU when the kernel also has
// static shared memory (it comes first there): kernels round its start up themselves.
size_t place(size_t bytes, const char* name, size_t align = 128) {
  const size_t offset = (g_block.used + kRedZone + align - 1) / align * align;
  if (offset + bytes + kRedZone > kArenaBytes) fail("shared memory: '%s' (%zu bytes) does not fit the arena", name, bytes);
  g_block.used = offset + bytes;
  g_block.allocs.push_back(Alloc{offset, bytes, name});
  std::memset(g_arena + offset, 0xff, bytes);  // NaN in every float format: unwritten data shows
  return offset;
}

// What the running CTA's blocked threads wait for, in words (its cluster-barrier waits aside).
std::string block_waits() {
  std::string msg;
  int at_bar = 0;
  for (int i = 0; i < g_block.n; ++i) at_bar += g_threads[i].state == State::AtBarrier;
  if (at_bar) msg += " " + std::to_string(at_bar) + " of " + std::to_string(g_block.live) + " live threads wait at __syncthreads;";
  // mbarrier waits, by barrier and parity; named barriers, by id
  std::vector<std::pair<std::pair<size_t, int>, int>> mbar_waits;
  int named_waits[16] = {};
  for (int i = 0; i < g_block.n; ++i) {
    const Thread& t = g_threads[i];
    if (t.state == State::AtNamedBarrier) ++named_waits[t.wait_arg];
    if (t.state != State::AtMbarrier) continue;
    bool counted = false;
    for (auto& m : mbar_waits)
      if (m.first == std::make_pair(t.wait_object, t.wait_arg)) ++m.second, counted = true;
    if (!counted) mbar_waits.push_back({{t.wait_object, t.wait_arg}, 1});
  }
  for (const auto& m : mbar_waits) {
    const Mbarrier& bar = g_block.mbarriers[m.first.first];
    char buf[320];
    std::snprintf(buf, sizeof buf,
                  " %d threads wait on the mbarrier at %s for the phase of parity %d to complete (it has completed %u "
                  "phases; the current one still expects %d arrivals and %lld transaction bytes);",
                  m.second, describe(m.first.first).c_str(), m.first.second, bar.phase, bar.pending,
                  static_cast<long long>(bar.tx));
    msg += buf;
  }
  for (int id = 0; id < 16; ++id)
    if (named_waits[id])
      msg += " " + std::to_string(named_waits[id]) + " threads wait at named barrier " + std::to_string(id) + " (" +
             std::to_string(g_block.named[id].arrived) + " of " + std::to_string(g_block.named[id].expected) +
             " arrived);";
  for (int g = 0; g < kMaxWarpgroups; ++g)
    if (g_block.warpgroups[g].arrived)
      msg += " warpgroup " + std::to_string(g) + ": " + std::to_string(g_block.warpgroups[g].arrived) +
             " of 128 threads wait at " + g_block.warpgroups[g].what + ";";
  for (int w = 0; w < (g_block.n + 31) / 32; ++w) {
    const Warp& wp = g_block.warps[w];
    if (wp.arrived == 0) continue;
    char buf[160];
    std::snprintf(buf, sizeof buf, " warp %d: %d lanes wait at %s (mask %#x), the others are elsewhere;", w, wp.arrived,
                  wp.what, wp.mask);
    msg += buf;
  }
  return msg;
}

std::string cluster_name() {
  const uint3 a = cluster_block_idx(0), z = cluster_block_idx(g_cluster.size - 1);
  char buf[96];
  std::snprintf(buf, sizeof buf, "the cluster of blocks (%u,%u,%u)..(%u,%u,%u)", a.x, a.y, a.z, z.x, z.y, z.z);
  return buf;
}

// Nobody can run: who waits for what, in every CTA of the cluster.
std::string deadlock() {
  Cluster& c = g_cluster;
  if (c.size == 1) return "deadlock in " + block_name() + ":" + block_waits();
  std::string msg = "deadlock in " + cluster_name() + ":";
  char buf[256];
  if (c.arrived > 0) {
    std::snprintf(buf, sizeof buf, " barrier.cluster phase %lld: %d of the cluster's %d live threads arrived;",
                  static_cast<long long>(c.phase), c.arrived, c.live);
    msg += buf;
    for (int r = 0; r < c.size; ++r) {
      activate(r);
      int waiting = 0, missing = 0;
      for (int i = 0; i < g_block.n; ++i) {
        const Thread& t = g_threads[size_t(i)];
        waiting += t.state == State::AtClusterBarrier;
        missing += t.state != State::Done && t.cluster_arrival != c.phase;
      }
      std::snprintf(buf, sizeof buf, " rank %d (%s): %d wait at barrier.cluster.wait, %d have not arrived;", r,
                    block_name().c_str(), waiting, missing);
      msg += buf;
    }
  }
  for (int r = 0; r < c.size; ++r) {
    activate(r);
    const std::string waits = block_waits();
    if (!waits.empty()) msg += " rank " + std::to_string(r) + " (" + block_name() + "):" + waits;
  }
  return msg;
}

// Resets the running CTA for a launch: block bidx, rank `rank` of its cluster.
void start_cta(uint3 bidx, int rank, size_t dynamic_bytes) {
  Block& b = g_block;
  const int n = int(g_cur.block_dim.x * g_cur.block_dim.y * g_cur.block_dim.z);
  b.threads = &g_threads;
  b.rank = rank;
  b.waited_epoch = 0;
  b.has_dynamic = dynamic_bytes > 0;
  b.n = b.live = n;
  b.at_barrier = 0;
  b.epoch = 0;
  b.hb = false;
  b.hb_dim = 0;
  b.clocks.clear();
  for (Warpgroup& wg : b.warpgroups) wg = Warpgroup{};
  b.mbarriers.clear();
  for (NamedBarrier& nb : b.named) nb = NamedBarrier{};
  for (int w = 0; w < (n + 31) / 32; ++w) {
    b.warps[w] = Warp{};
    const int lanes = n - w * 32 >= 32 ? 32 : n - w * 32;
    b.warps[w].present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  }
  std::memset(static_cast<void*>(g_shadow), 0, g_shadow_dirty * sizeof(Shadow));
  b.allocs.clear();
  b.used = 0;
  b.static_bytes = 0;
  g_cur.block_idx = bidx;
  g_arena_lo = reinterpret_cast<uintptr_t>(g_arena);
  g_arena_span = kArenaBytes;
  if (dynamic_bytes) place(dynamic_bytes, "dynamic shared memory");
  for (int i = 0; i < n; ++i) {
    Thread& t = g_threads[i];
    const unsigned bx = g_cur.block_dim.x, by = g_cur.block_dim.y;
    t.idx = uint3{unsigned(i) % bx, unsigned(i) / bx % by, unsigned(i) / (bx * by)};
    t.tid = i, t.warp = i / 32, t.lane = i % 32;
    t.state = State::Runnable;
    t.decls = 0;
    t.copies.clear();
    t.group_ends.clear();
    t.wait_object = 0, t.wait_arg = 0;
    t.wg_fenced = false, t.wg_open = 0, t.wg_commits = 0;
    t.wg_groups.clear();
    t.wg_acc.clear();
    t.cluster_arrival = -1;
    uintptr_t top = (reinterpret_cast<uintptr_t>(t.stack) + kStackBytes) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top) - 8;  // r15 r14 r13 r12 rbx rbp, return address, pad
    for (int k = 0; k < 8; ++k) sp[k] = nullptr;
    sp[6] = reinterpret_cast<void*>(&fastlm_emu_fiber_start);
    t.ctx.sp = sp;
  }
  ++g_stats.blocks;
  g_stats.threads += n;
}

// Runs the CTAs of the cluster whose rank 0 is block `origin` (one CTA without clusters) to
// their end or to the first fault (then g_fault says what).
bool run_cluster(uint3 origin, size_t dynamic_bytes) {
  Cluster& c = g_cluster;
  const int n = int(g_cur.block_dim.x * g_cur.block_dim.y * g_cur.block_dim.z);
  c.origin = origin;
  c.epoch = 0, c.phase = 0, c.arrived = 0, c.live = c.size * n;
  g_fault.clear();
  for (int r = c.size - 1; r >= 0; --r) {
    activate(r);
    start_cta(cluster_block_idx(r), r, dynamic_bytes);
  }
  bool ok = g_fault.empty();
  for (;;) {
    bool ran = false, done = true;
    // The last CTA first and, in each, the last thread first: a consumer at rank 0 / thread 0
    // (the common "rank 0 / thread 0 gathers" shape) then runs after its producers, so a missing
    // barrier shows as a race (or a read of an exited CTA) rather than as garbage.
    c.restart = false;
    for (int r = c.size - 1; r >= 0 && ok && !c.restart; --r) {
      activate(r);
      for (int i = n - 1; i >= 0 && ok && !c.restart; --i) {
        Thread& t = g_threads[i];
        if (t.state == State::Done) continue;
        done = false;
        if (t.state != State::Runnable) continue;
        ran = true;
        g_cur.thread = &t;
        g_cur.thread_idx = t.idx;
        fastlm_emu_switch(&g_sched.sp, t.ctx.sp);
        g_cur.thread = nullptr;
        activate(r);  // a fault inside a DSMEM access leaves its target CTA active
        ok = g_fault.empty();
      }
    }
    if (!ok || done) break;
    if (!ran) {
      g_fault = deadlock();
      ok = false;
      break;
    }
  }
  for (int r = c.size - 1; r >= 0; --r) {
    activate(r);
    g_shadow_dirty = g_block.used + kRedZone;
  }
  g_arena_span = 0;
  return ok;
}

}  // namespace

static void set_error(cudaError_t code, const std::string& msg) {
  g_last_error = g_message_error = code;
  g_last_message = msg;
}

void fail(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (!g_cur.thread) {  // an emulator bug, not a kernel's: nothing to unwind to
    std::fprintf(stderr, "fastlm emulator: %s (outside a kernel)\n", buf);
    std::abort();
  }
  if (g_fault.empty()) g_fault = buf;
  Thread& t = me();
  t.state = State::Failed;
  switch_to_scheduler(t);
  std::abort();  // a failed fiber is never resumed
}

// ---------------------------------------------------------------- clusters
namespace {
void swap_in(CtaState& s) {
  std::swap(g_block, s.block);
  g_threads.swap(s.threads);
  std::swap(g_arena, s.arena);
  std::swap(g_shadow, s.shadow);
  std::swap(g_shadow_dirty, s.shadow_dirty);
  std::swap(g_cur.block_idx, s.block_idx);
}
}  // namespace

void activate(int rank) {
  Cluster& c = g_cluster;
  if (rank == c.active) return;
  swap_in(c.parked[size_t(c.active)]);  // the running CTA back to its slot, the empty state out
  swap_in(c.parked[size_t(rank)]);
  c.active = rank;
  g_arena_lo = reinterpret_cast<uintptr_t>(g_arena);
}

uint3 cluster_block_idx(int rank) {
  const dim3 d = g_cluster.dims;
  const unsigned r = unsigned(rank);
  return uint3{g_cluster.origin.x + r % d.x, g_cluster.origin.y + r / d.x % d.y, g_cluster.origin.z + r / (d.x * d.y)};
}

Block& block_of(int rank) { return rank == g_cluster.active ? g_block : g_cluster.parked[size_t(rank)].block; }

void cluster_shared_access(int rank, size_t off, void* data, size_t bytes, bool write, const char* what) {
  Thread& t = me();
  const int home = g_cluster.active;
  if (off + bytes > kArenaBytes)
    fail("%s: shared offset %zu lies past every shared allocation of cluster rank %d (%s)", what, off, rank,
         thread_name(t).c_str());
  if (off % bytes)
    fail("%s: misaligned address: shared offset %zu of cluster rank %d is not %zu-byte aligned (%s)", what, off, rank,
         bytes, thread_name(t).c_str());
  if (rank != home && block_of(rank).live == 0) {
    const uint3 to = cluster_block_idx(rank);
    fail("%s by %s: cluster rank %d (block (%u,%u,%u)) has exited, its shared memory is gone (a cluster barrier "
         "before it exits keeps it)", what, thread_name(t).c_str(), rank, to.x, to.y, to.z);
  }
  // Before the first cluster barrier the target may not have reached its shared declarations yet
  // (nor, on a GPU, have started at all).
  const std::string who = g_cluster.phase == 0 ? thread_name(t) : std::string();
  activate(rank);  // the target's arena and shadow; a fault reports from there
  if (g_cluster.phase == 0 && !find_alloc(off))
    fail("%s by %s: shared offset %zu lies outside everything cluster rank %d (%s) has declared so far, and no "
         "cluster barrier has completed yet: that CTA may not even have started (a cluster_sync before the first "
         "DSMEM access makes sure it has)", what, who.c_str(), off, rank, block_name().c_str());
  check_access(rank == home ? t.tid : remote_accessor(home, t.tid), g_arena_lo + off, bytes, write);
  if (write) std::memcpy(g_arena + off, data, bytes);
  else std::memcpy(data, g_arena + off, bytes);
  activate(home);
}

namespace {
void complete_cluster_phase() {
  Cluster& c = g_cluster;
  ++c.phase, ++c.epoch;
  c.arrived = 0;
  c.restart = true;
  ++g_stats.barriers;
  for (int r = 0; r < c.size; ++r) {
    Block& b = block_of(r);
    ++b.epoch;  // every thread of the CTA took part: as a __syncthreads for its own accesses
    std::vector<Thread>& threads = r == c.active ? g_threads : c.parked[size_t(r)].threads;
    for (int i = 0; i < b.n; ++i)
      if (threads[size_t(i)].state == State::AtClusterBarrier) threads[size_t(i)].state = State::Runnable;
  }
}
}  // namespace

void cluster_arrive(const char* what) {
  Thread& t = me();
  if (t.cluster_arrival >= 0)
    fail("%s: %s arrives again without a barrier.cluster.wait since its last arrive", what, thread_name(t).c_str());
  t.cluster_arrival = g_cluster.phase;
  if (++g_cluster.arrived == g_cluster.live) complete_cluster_phase();
}

namespace {
// The running CTA exits: every DSMEM access into its shared memory must be ordered before that,
// by a cluster barrier that completed after the access and that this CTA waited for. An access
// not yet made fails when it comes (cluster_shared_access); one already made is in the shadow.
void check_exit_orders_remote_accesses() {
  for (size_t off = 0; off < g_block.used; ++off) {
    const Shadow& s = g_shadow[off];
    int who = -1;
    if ((s.flags & kWritten) && s.w_tid >= kRemoteAccessor && s.w_cep >= g_block.waited_epoch) who = s.w_tid;
    else if ((s.flags & kR1) && s.r1_tid >= kRemoteAccessor && s.r1_cep >= g_block.waited_epoch) who = s.r1_tid;
    else if ((s.flags & kR2) && s.r2_tid >= kRemoteAccessor && s.r2_cep >= g_block.waited_epoch) who = s.r2_tid;
    if (who < 0) continue;
    fail("cluster rank %d (%s) exits while its shared memory may still be in use: %s accessed %s, and no cluster "
         "barrier that this CTA waited for lies between that access and its exit (a cluster_wait before exit "
         "keeps the memory alive)", g_block.rank, block_name().c_str(), accessor_name(who).c_str(),
         describe(off).c_str());
  }
}
}  // namespace

void cluster_thread_exit(const Thread& t) {
  Cluster& c = g_cluster;
  if (c.size > 1 && g_block.live == 0) check_exit_orders_remote_accesses();
  --c.live;
  if (t.cluster_arrival == c.phase) --c.arrived;  // it stays arrived: count it out of both
  if (c.arrived > 0 && c.arrived == c.live) complete_cluster_phase();
}

void cluster_wait() {
  Thread& t = me();
  if (t.cluster_arrival < 0)
    fail("barrier.cluster.wait: %s waits without a barrier.cluster.arrive before it", thread_name(t).c_str());
  if (g_cluster.phase <= t.cluster_arrival) {
    while (g_cluster.phase <= t.cluster_arrival) {
      t.state = State::AtClusterBarrier;
      switch_to_scheduler(t);
    }
  } else {
    // it completed the phase itself: the others run first (the scheduler starts over from the
    // last rank), so a CTA that exits without a later barrier is gone before this thread reads it
    t.state = State::Runnable;
    switch_to_scheduler(t);
  }
  t.cluster_arrival = -1;
  if (g_block.waited_epoch < g_cluster.epoch) g_block.waited_epoch = g_cluster.epoch;
}

void syncthreads() {
  Thread& t = me();
  if (++g_block.at_barrier == g_block.live) return open_barrier();
  t.state = State::AtBarrier;
  switch_to_scheduler(t);
}

void warp_collective(unsigned mask, const char* what, void* slot, CollectiveOp op) {
  Thread& t = me();
  Warp& w = g_block.warps[t.warp];
  if (!(mask >> t.lane & 1)) fail("%s: %s calls it with mask %#x, which leaves its own lane out", what, thread_name(t).c_str(), mask);
  if (mask & ~w.present) fail("%s: mask %#x names lanes past the block's last thread", what, mask);
  if (mask & w.exited) fail("%s: mask %#x names lanes that have exited (%#x)", what, mask, mask & w.exited);
  if (w.arrived == 0) {
    w.mask = mask, w.what = what, w.op = op;
  } else if (w.mask != mask || std::strcmp(w.what, what) != 0) {
    fail("warp divergence: %s reached %s (mask %#x) while %d lanes of its warp wait at %s (mask %#x)",
         thread_name(t).c_str(), what, mask, w.arrived, w.what, w.mask);
  }
  w.slots[t.lane] = slot;
  if (++w.arrived == __builtin_popcount(mask)) return finish_collective(w, t.warp);
  t.state = State::AtWarp;
  switch_to_scheduler(t);
}

void warpgroup_collective(const char* what, void* slot, WarpgroupOp op) {
  Thread& t = me();
  const int g = t.tid / 128;
  if (g_block.n < 128 * (g + 1))
    fail("%s: warpgroup %d is incomplete: the block has %d threads, a warpgroup is threads %d..%d (%s)", what, g,
         g_block.n, 128 * g, 128 * g + 127, thread_name(t).c_str());
  for (int i = 128 * g; i < 128 * (g + 1); ++i)
    if (g_threads[i].state == State::Done)
      fail("%s: %s of warpgroup %d has exited; all 128 threads must take part (%s)", what,
           thread_name(g_threads[i]).c_str(), g, thread_name(t).c_str());
  Warpgroup& wg = g_block.warpgroups[g];
  if (wg.arrived == 0) {
    wg.what = what, wg.op = op;
  } else if (std::strcmp(wg.what, what) != 0) {
    fail("warpgroup divergence: %s reached %s while %d threads of its warpgroup wait at %s", thread_name(t).c_str(),
         what, wg.arrived, wg.what);
  }
  wg.slots[t.tid % 128] = slot;
  if (++wg.arrived == 128) {
    ++g_stats.collectives;
    wg.op(g, wg.slots);
    wg.arrived = 0;
    wg.what = nullptr;
    for (int i = 128 * g; i < 128 * (g + 1); ++i)
      if (g_threads[i].state == State::AtWarpgroup) g_threads[i].state = State::Runnable;
    return;
  }
  t.state = State::AtWarpgroup;
  switch_to_scheduler(t);
}

void* shared_alloc(size_t bytes, size_t align, const char* name) {
  Thread& t = me();
  const int k = t.decls++;
  const size_t first_static = g_block.has_dynamic ? 1 : 0;
  if (size_t(k) + first_static < g_block.allocs.size()) {
    const Alloc& a = g_block.allocs[size_t(k) + first_static];
    if (a.bytes != bytes || std::strcmp(a.name, name) != 0)
      fail("shared declaration %d is '%s' (%zu bytes) in one thread and '%s' (%zu bytes) in %s", k, a.name, a.bytes,
           name, bytes, thread_name(t).c_str());
    return g_arena + a.offset;
  }
  if (align > 1024) fail("shared '%s': alignment %zu over 1024 is not emulated", name, align);
  g_block.static_bytes += bytes;
  const size_t dynamic = g_block.has_dynamic ? g_block.allocs[0].bytes : 0;
  if (g_block.static_bytes > kStaticLimit)
    fail("static shared memory: %zu bytes exceed the %zu a kernel may declare", g_block.static_bytes, kStaticLimit);
  if (g_block.static_bytes + dynamic > size_t(g_device->smem_per_block_optin))
    fail("shared memory: %zu static + %zu dynamic bytes exceed sm_%d%d's %d bytes per block", g_block.static_bytes,
         dynamic, g_device->major, g_device->minor, g_device->smem_per_block_optin);
  return g_arena + place(bytes, name, align > 128 ? align : 128);
}

unsigned char* dynamic_shared() {
  if (!g_block.has_dynamic) fail("dynamic shared memory used, but the launch asked for 0 bytes");
  return g_arena + g_block.allocs[0].offset;
}

bool in_shared_arena(const void* p) { return reinterpret_cast<uintptr_t>(p) - g_arena_lo < g_arena_span; }

void shared_access_by_lane(int lane, const void* p, size_t n, bool write) {
  check_access(me().warp * 32 + lane, reinterpret_cast<uintptr_t>(p), n, write);
}

void cp_async_queue(void* dst, const void* src, int bytes, int src_bytes) {
  Thread& t = me();
  if (!in_shared_arena(dst)) fail("cp.async: destination %p is not shared memory (%s)", dst, thread_name(t).c_str());
  if (in_shared_arena(src))
    fail("cp.async: source %p is shared memory, not a global address (even a 0-byte copy needs one) (%s)", src,
         thread_name(t).c_str());
  if (reinterpret_cast<uintptr_t>(dst) % unsigned(bytes) || reinterpret_cast<uintptr_t>(src) % unsigned(bytes))
    fail("cp.async: misaligned address: a %d-byte copy needs %d-byte aligned addresses, got shared %p and global %p (%s)",
         bytes, bytes, dst, src, thread_name(t).c_str());
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async: src-size %d outside [0, %d]", src_bytes, bytes);
  t.copies.push_back(Copy{dst, src, bytes, src_bytes});
}

void cp_async_commit() { me().group_ends.push_back(me().copies.size()); }

void cp_async_wait(int groups_left) {
  Thread& t = me();
  const size_t g = t.group_ends.size();
  if (g <= size_t(groups_left)) return;
  const size_t done_groups = g - size_t(groups_left), upto = t.group_ends[done_groups - 1];
  do_copies(t, upto);
  t.group_ends.erase(t.group_ends.begin(), t.group_ends.begin() + long(done_groups));
  for (size_t& e : t.group_ends) e -= upto;
}

namespace {
// The launch rules CUDA checks before any block runs (the caller holds g_launch_mutex): cudaSuccess,
// or the error, also left for cudaGetLastError with its words.
cudaError_t check_launch(const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem, dim3 cluster) {
  const DeviceProfile& d = *g_device;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  char buf[512];
  if (threads == 0 || threads > uint64_t(d.max_threads_per_block) || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > unsigned(d.max_grid_y) || grid.z > unsigned(d.max_grid_z)) {
    std::snprintf(buf, sizeof buf,
                  "invalid configuration argument: grid (%u,%u,%u), block (%u,%u,%u); the limits are grid.x < 2^31, "
                  "grid.y and grid.z <= %d, 1..%d threads per block",
                  grid.x, grid.y, grid.z, block.x, block.y, block.z, d.max_grid_y, d.max_threads_per_block);
    set_error(cudaErrorInvalidConfiguration, buf);
    return cudaErrorInvalidConfiguration;
  }
  const auto allowed = g_max_dynamic.find(kernel_id);
  const size_t limit = allowed == g_max_dynamic.end() ? size_t(d.smem_per_block) : size_t(allowed->second);
  if (dynamic_smem > limit) {
    std::snprintf(buf, sizeof buf,
                  "invalid argument: %zu bytes of dynamic shared memory, more than the %zu this kernel may use "
                  "(cudaFuncSetAttribute raises it up to sm_%d%d's %d)",
                  dynamic_smem, limit, d.major, d.minor, d.smem_per_block_optin);
    set_error(cudaErrorInvalidValue, buf);
    return cudaErrorInvalidValue;
  }
  // Clusters: the CUDA rules (cudaLaunchKernelEx with cudaLaunchAttributeClusterDimension)
  const uint64_t cluster_size = uint64_t(cluster.x) * cluster.y * cluster.z;
  const char* bad_cluster = nullptr;
  if (cluster_size == 0) bad_cluster = "every cluster dimension must be at least 1";
  else if (cluster_size > 1 && d.major < 9) bad_cluster = "thread-block clusters need sm_90";
  else if (cluster_size > 8) bad_cluster = "a cluster holds at most 8 CTAs (the portable limit)";
  else if (grid.x % cluster.x || grid.y % cluster.y || grid.z % cluster.z)
    bad_cluster = "the grid must be a multiple of the cluster shape in every dimension";
  if (bad_cluster) {
    std::snprintf(buf, sizeof buf, "invalid cluster size: grid (%u,%u,%u), cluster (%u,%u,%u) on sm_%d%d: %s", grid.x,
                  grid.y, grid.z, cluster.x, cluster.y, cluster.z, d.major, d.minor, bad_cluster);
    set_error(cudaErrorInvalidClusterSize, buf);
    return cudaErrorInvalidClusterSize;
  }
  return cudaSuccess;
}

// The cluster occupancy model: CTAs per SM by threads and by shared memory (the dynamic bytes and
// the 1 KB the driver reserves per CTA; static arrays are allocated as a kernel runs, so they are
// not counted), and each cluster's CTAs on the SMs of one GPC.
int clusters_resident(dim3 block, uint64_t cluster_size, size_t dynamic_smem) {
  const DeviceProfile& d = *g_device;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  const uint64_t per_sm = std::min<uint64_t>(uint64_t(d.threads_per_sm) / threads,
                                             uint64_t(d.smem_per_sm) / (dynamic_smem + 1024));
  const uint64_t gpc_sms = uint64_t(g_gpc_sms ? g_gpc_sms : d.sms / d.gpcs);
  return int(uint64_t(d.gpcs) * (gpc_sms * per_sm / cluster_size));
}
}  // namespace

int launch_raw(const void* kernel_id, KernelThunk thunk, const void* args, dim3 grid, dim3 block, size_t dynamic_smem,
               dim3 cluster) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  init_once();
  ++g_stats.launches;
  if (const cudaError_t e = check_launch(kernel_id, grid, block, dynamic_smem, cluster)) return e;
  const uint64_t cluster_size = uint64_t(cluster.x) * cluster.y * cluster.z;
  if (cluster_size > 1 && clusters_resident(block, cluster_size, dynamic_smem) == 0) {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "invalid cluster size: no GPC of sm_%d%d can hold a cluster of %u CTAs of %u threads and %zu "
                  "bytes of dynamic shared memory each",
                  g_device->major, g_device->minor, unsigned(cluster_size), block.x * block.y * block.z, dynamic_smem);
    set_error(cudaErrorInvalidClusterSize, buf);
    return cudaErrorInvalidClusterSize;
  }
  char buf[512];
  Cluster& c = g_cluster;
  c.dims = cluster, c.size = int(cluster_size);
  if (c.parked.size() < cluster_size) c.parked.resize(cluster_size);
  for (size_t r = 1; r < cluster_size; ++r)  // the running CTA (rank 0 between launches) owns slot 0's resources
    if (!c.parked[r].arena) make_cta(c.parked[r].threads, c.parked[r].arena, c.parked[r].shadow);
  g_thunk = thunk, g_args = args;
  g_cur.grid_dim = grid, g_cur.block_dim = block;
  for (unsigned z = 0; z < grid.z; z += cluster.z)
    for (unsigned y = 0; y < grid.y; y += cluster.y)
      for (unsigned x = 0; x < grid.x; x += cluster.x) {
        const bool ok = run_cluster(uint3{x, y, z}, dynamic_smem);
        activate(0);
        if (ok) continue;
        std::snprintf(buf, sizeof buf, " of grid (%u,%u,%u) x block (%u,%u,%u)", grid.x, grid.y, grid.z, block.x,
                      block.y, block.z);
        std::string where = c.size == 1 ? block_name() + buf : cluster_name() + buf;
        if (c.size > 1) {
          std::snprintf(buf, sizeof buf, " in clusters of (%u,%u,%u)", cluster.x, cluster.y, cluster.z);
          where += buf;
        }
        set_error(cudaErrorLaunchFailure, "kernel fault under emulation, " + where + ": " + g_fault);
        ++g_stats.faults;
        return cudaErrorLaunchFailure;
      }
  return cudaSuccess;
}

const DeviceProfile& device() { return *g_device; }

void set_gpc_sms(int sms) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_gpc_sms = sms > 0 ? sms : 0;
}

int max_active_clusters(int* count, const void* kernel_id, dim3 block, dim3 cluster, size_t dynamic_smem) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  *count = 0;
  if (const cudaError_t e = check_launch(kernel_id, cluster, block, dynamic_smem, cluster)) return e;
  *count = clusters_resident(block, uint64_t(cluster.x) * cluster.y * cluster.z, dynamic_smem);
  return cudaSuccess;
}

bool set_device_arch(const char* arch) {
  for (const DeviceProfile& p : kProfiles) {
    char name[8];
    std::snprintf(name, sizeof name, "%d.%d", p.major, p.minor);
    if (std::strcmp(name, arch) == 0) {
      std::lock_guard<std::mutex> lock(g_launch_mutex);
      g_device = &p;
      return true;
    }
  }
  return false;
}

Stats stats() { return g_stats; }

// ---------------------------------------------------------------- warp-level operations
namespace {
struct ShuffleSlot {
  uint64_t value, result;
  int arg, width, kind;
};
void shuffle_op(void** slots, unsigned mask) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1)) continue;
    auto* s = static_cast<ShuffleSlot*>(slots[lane]);
    if (s->width < 1 || s->width > 32 || (s->width & (s->width - 1)))
      fail("__shfl*_sync: width %d is not a power of two in [1, 32]", s->width);
    const int seg = lane & ~(s->width - 1);
    int src = lane;
    switch (s->kind) {
      case 0: src = seg + (s->arg & (s->width - 1)); break;
      case 1: src = lane - s->arg >= seg ? lane - s->arg : lane; break;
      case 2: src = lane + s->arg < seg + s->width ? lane + s->arg : lane; break;
      default: src = (lane ^ s->arg) < seg + s->width ? lane ^ s->arg : lane; break;
    }
    if (!(mask >> src & 1)) fail("__shfl*_sync: lane %d reads lane %d, which is not in the mask %#x", lane, src, mask);
    s->result = static_cast<ShuffleSlot*>(slots[src])->value;
  }
}
struct VoteSlot {
  int pred;
  unsigned result;
};
void vote_op(void** slots, unsigned mask) {
  unsigned ballot = 0;
  for (int lane = 0; lane < 32; ++lane)
    if ((mask >> lane & 1) && static_cast<VoteSlot*>(slots[lane])->pred) ballot |= 1u << lane;
  for (int lane = 0; lane < 32; ++lane)
    if (mask >> lane & 1) static_cast<VoteSlot*>(slots[lane])->result = ballot;
}
void syncwarp_op(void**, unsigned mask) {
  const int warp = me().warp;
  ++g_block.warps[warp].epoch;
  if (!g_block.hb) return;
  std::vector<uint32_t> joined;  // the lanes' clocks, joined: each lane acquires all of them
  for (int lane = 0; lane < 32; ++lane)
    if (mask >> lane & 1) hb_release(warp * 32 + lane, joined);
  for (int lane = 0; lane < 32; ++lane)
    if (mask >> lane & 1) hb_acquire(warp * 32 + lane, joined);
}

struct LdmatrixSlot {
  uint32_t* out;
  const void* addr;
  int count;
  bool trans;
};
void ldmatrix_op(void** slots, unsigned mask) {
  if (mask != 0xffffffffu) fail("ldmatrix: all 32 lanes must take part");
  const auto* s0 = static_cast<LdmatrixSlot*>(slots[0]);
  const uint16_t* rows[4][8];
  for (int j = 0; j < s0->count; ++j)
    for (int r = 0; r < 8; ++r) {
      const int lane = 8 * j + r;
      const auto* s = static_cast<LdmatrixSlot*>(slots[lane]);
      if (s->count != s0->count || s->trans != s0->trans) fail("ldmatrix: lanes disagree on .x%d / .trans", s->count);
      if (!in_shared_arena(s->addr)) fail("ldmatrix: lane %d's row address %p is not shared memory", lane, s->addr);
      if (reinterpret_cast<uintptr_t>(s->addr) % 16)
        fail("ldmatrix: misaligned address: lane %d's row address %p is not 16-byte aligned", lane, s->addr);
      shared_access_by_lane(lane, s->addr, 16, false);
      rows[j][r] = static_cast<const uint16_t*>(s->addr);
    }
  for (int lane = 0; lane < 32; ++lane) {
    auto* s = static_cast<LdmatrixSlot*>(slots[lane]);
    for (int j = 0; j < s0->count; ++j) {
      const frag::RowCol e0 = frag::ldmatrix(lane, 0, s0->trans), e1 = frag::ldmatrix(lane, 1, s0->trans);
      s->out[j] = uint32_t(rows[j][e0.row][e0.col]) | uint32_t(rows[j][e1.row][e1.col]) << 16;
    }
  }
}

struct MmaSlot {
  float* c;
  const uint32_t* a;
  uint32_t b[2];
  int dtype;
};
float lo_hi(uint32_t reg, int half, int dtype) {
  const uint16_t bits = uint16_t(half ? reg >> 16 : reg & 0xffff);
  return dtype == 1 ? __half2float(__half{bits}) : __bfloat162float(__nv_bfloat16{bits});
}
void mma_op(void** slots, unsigned mask) {
  if (mask != 0xffffffffu) fail("mma.sync: all 32 lanes must take part");
  float A[16][16], B[16][8], C[16][8];
  const int dtype = static_cast<MmaSlot*>(slots[0])->dtype;
  for (int lane = 0; lane < 32; ++lane) {
    const auto* s = static_cast<MmaSlot*>(slots[lane]);
    if (s->dtype != dtype) fail("mma.sync: lanes disagree on the operand type");
    for (int i = 0; i < 8; ++i) {
      const frag::RowCol rc = frag::mma_a(lane, i);
      A[rc.row][rc.col] = lo_hi(s->a[i / 2], i % 2, dtype);
    }
    for (int i = 0; i < 4; ++i) {
      frag::RowCol rc = frag::mma_b(lane, i);
      B[rc.row][rc.col] = lo_hi(s->b[i / 2], i % 2, dtype);
      rc = frag::mma_c(lane, i);
      C[rc.row][rc.col] = s->c[i];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* s = static_cast<MmaSlot*>(slots[lane]);
    for (int i = 0; i < 4; ++i) {
      const frag::RowCol rc = frag::mma_c(lane, i);
      float acc = C[rc.row][rc.col];
      for (int k = 0; k < 16; ++k) acc += A[rc.row][k] * B[k][rc.col];
      s->c[i] = acc;
    }
  }
}
}  // namespace

uint64_t shuffle(unsigned mask, uint64_t value, int arg, int width, int kind) {
  ShuffleSlot s{value, 0, arg, width, kind};
  warp_collective(mask, "__shfl_sync", &s, &shuffle_op);
  return s.result;
}

void ldmatrix(uint32_t* out, int count, const void* row_address, bool trans) {
  LdmatrixSlot s{out, row_address, count, trans};
  warp_collective(0xffffffffu, "ldmatrix", &s, &ldmatrix_op);
}

void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, int dtype) {
  MmaSlot s{c, a, {b0, b1}, dtype};
  warp_collective(0xffffffffu, "mma.sync.m16n8k16", &s, &mma_op);
}

}  // namespace fastlm::emu

using fastlm::emu::VoteSlot;

void __syncwarp(unsigned mask) { fastlm::emu::warp_collective(mask, "__syncwarp", nullptr, &fastlm::emu::syncwarp_op); }
unsigned __ballot_sync(unsigned mask, int pred) {
  fastlm::emu::VoteSlot s{pred != 0, 0};
  fastlm::emu::warp_collective(mask, "vote", &s, &fastlm::emu::vote_op);
  return s.result;
}
int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
unsigned __activemask() {
  const auto& w = fastlm::emu::g_block.warps[fastlm::emu::g_cur.thread->warp];
  return w.present & ~w.exited;
}

// ---------------------------------------------------------------- the CUDA runtime API slice
cudaError_t cudaGetLastError() {
  const cudaError_t e = fastlm::emu::g_last_error;
  fastlm::emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return fastlm::emu::g_last_error; }

// The emulator's own words for the last error it raised; CUDA's fixed strings otherwise.
const char* cudaGetErrorString(cudaError_t err) {
  if (err != cudaSuccess && err == fastlm::emu::g_message_error) return fastlm::emu::g_last_message.c_str();
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorInvalidClusterSize: return "invalid cluster size";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
  }
  return "unknown error";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const fastlm::emu::DeviceProfile& d = fastlm::emu::device();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = d.max_threads_per_block; return cudaSuccess;
    case cudaDevAttrMaxGridDimY: *value = d.max_grid_y; return cudaSuccess;
    case cudaDevAttrMaxGridDimZ: *value = d.max_grid_z; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = d.smem_per_block; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.minor; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_per_block_optin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaFuncSetAttribute_raw(const void* kernel, cudaFuncAttribute attr, int value) {
  using namespace fastlm::emu;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  const DeviceProfile& d = device();
  if (value < 0 || value > d.smem_per_block_optin) {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "invalid argument: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d) exceeds sm_%d%d's %d bytes "
                  "of shared memory per block",
                  value, d.major, d.minor, d.smem_per_block_optin);
    set_error(cudaErrorInvalidValue, buf);
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_max_dynamic[kernel] = value;
  return cudaSuccess;
}

// ---------------------------------------------------------------- TSan-ABI memory hooks
// The kernel files are compiled with -fsanitize=thread; these replace TSan's runtime. Accesses
// outside the running block's arena (global memory, stacks) return at the first compare.
namespace {
inline void hook(void* p, size_t n, bool write) {
  using namespace fastlm::emu;
  if (reinterpret_cast<uintptr_t>(p) - g_arena_lo < g_arena_span && g_cur.thread)
    check_access(g_cur.thread->tid, reinterpret_cast<uintptr_t>(p), n, write);
}
}  // namespace

extern "C" {
#define FASTLM_EMU_HOOKS(n)                                                   \
  void __tsan_read##n(void* p) { hook(p, n, false); }                         \
  void __tsan_write##n(void* p) { hook(p, n, true); }                         \
  void __tsan_unaligned_read##n(void* p) { hook(p, n, false); }               \
  void __tsan_unaligned_write##n(void* p) { hook(p, n, true); }               \
  void __tsan_volatile_read##n(void* p) { hook(p, n, false); }                \
  void __tsan_volatile_write##n(void* p) { hook(p, n, true); }
FASTLM_EMU_HOOKS(1)
FASTLM_EMU_HOOKS(2)
FASTLM_EMU_HOOKS(4)
FASTLM_EMU_HOOKS(8)
FASTLM_EMU_HOOKS(16)
#undef FASTLM_EMU_HOOKS
void __tsan_read_range(void* p, unsigned long n) { hook(p, n, false); }
void __tsan_write_range(void* p, unsigned long n) { hook(p, n, true); }
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
