// The emulator runtime's own state, shared by runtime.cpp (fibers, scheduler, checker, warp
// collectives) and sm90.cpp (mbarrier, TMA, named barriers, wgmma). Not for kernel code.
//
// Happens-before beyond __syncthreads: once a block uses an mbarrier, a named barrier or wgmma,
// every thread (and one "async proxy" reader per warpgroup, for wgmma's shared reads) gets a
// vector clock. A release (mbarrier arrive, TMA completing tx, bar.arrive/sync, __syncwarp)
// joins the releaser's clock into the sync object's and then advances the releaser's own entry;
// an acquire (the wait that sees the phase complete, a completed bar.sync, __syncwarp) joins the
// object's clock into the waiter's. Two accesses are ordered if a __syncthreads lies between
// them (block epoch), a __syncwarp between two lanes of one warp (warp epoch), or the later
// accessor's clock covers the earlier access's clock entry.
//
// Clusters (sm_90): the CTAs of a cluster run together, as one group of fibers. The running CTA's
// state lives in the globals below (g_block, g_threads, the arena and its shadow); the others'
// is parked in g_cluster.parked and swapped in by activate(rank), so all the single-CTA code
// works unchanged on "the running CTA". A DSMEM access visits the target CTA (activates it,
// checks the access against its shadow, activates the accessor's CTA again). Its accessor id is
// remote_accessor(rank, tid); such an access is ordered with another only by a completed cluster
// barrier between them (the cluster epoch), never by the target's own __syncthreads.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "fastlm_emu/cuda.h"

namespace fastlm::emu {

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarpgroups = kMaxThreads / 128;

enum class State : uint8_t {
  Runnable, AtBarrier, AtWarp, AtMbarrier, AtNamedBarrier, AtWarpgroup, AtClusterBarrier, Done, Failed
};

struct Context {
  void* sp = nullptr;
};

struct Copy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
};

struct Thread {
  Context ctx;
  unsigned char* stack = nullptr;
  uint3 idx{0, 0, 0};
  int tid = 0, warp = 0, lane = 0;
  State state = State::Runnable;
  int decls = 0;                    // FASTLM_SHARED declarations reached
  std::vector<Copy> copies;         // cp.async issued, not yet done
  std::vector<size_t> group_ends;   // committed groups: end index into copies
  // what a blocked thread waits for (mbarrier: its shared offset and parity; named barrier: id)
  size_t wait_object = 0;
  int wait_arg = 0;
  // wgmma bookkeeping: fenced since the last wait; the async-proxy clock of the wgmmas not yet
  // committed (0: none) and of each committed group not yet waited for; commits so far (the id
  // of the open group); the accumulators in flight, which reach the thread's registers only
  // when their group is waited for (until then those registers read NaN)
  bool wg_fenced = false;
  uint32_t wg_open = 0;
  std::vector<uint32_t> wg_groups;
  uint64_t wg_commits = 0;
  struct InFlight {
    float* d;
    uint64_t group;
    std::vector<float> value;
  };
  std::vector<InFlight> wg_acc;
  int64_t cluster_arrival = -1;  // the cluster-barrier phase it arrived in and has not yet waited for
};

struct Shadow {  // per shared byte: the last write and up to two reads of the current epoch
  uint32_t w_ep, w_wep, r1_ep, r1_wep, r2_ep, r2_wep;
  uint32_t w_cep, r1_cep, r2_cep;  // the cluster epoch at the access (orders DSMEM accesses)
  uint32_t w_clk, r1_clk, r2_clk;  // the accessor's own vector-clock entry at the access
  uint16_t w_tid, r1_tid, r2_tid;
  uint8_t flags;  // kWritten | kR1 | kR2
};
constexpr uint8_t kWritten = 1, kR1 = 2, kR2 = 4;

struct Alloc {
  size_t offset, bytes;
  const char* name;
};

struct Warp {
  int arrived = 0;
  unsigned mask = 0, present = 0, exited = 0;
  const char* what = nullptr;
  CollectiveOp op = nullptr;
  uint32_t epoch = 0;  // advances at every __syncwarp
  void* slots[32] = {};
};

// A warpgroup collective (wgmma): all 128 threads arrive, the last runs op on every slot.
using WarpgroupOp = void (*)(int warpgroup, void** slots);
struct Warpgroup {
  int arrived = 0;
  const char* what = nullptr;
  WarpgroupOp op = nullptr;
  void* slots[128] = {};
};

struct Mbarrier {
  int expected = 0, pending = 0;  // arrivals per phase / still to come in this phase
  int64_t tx = 0;                 // transaction bytes still to come in this phase
  uint32_t phase = 0;             // phases completed so far
  int init_tid = 0;               // who initialized it, when (its clock entry then)
  uint32_t init_ep = 0, init_clk = 0;
  std::vector<uint32_t> clock;     // joined releases of the current phase
  std::vector<uint32_t> done[2];   // the clock of the last completed phase of each parity
};

struct NamedBarrier {
  int expected = 0, arrived = 0;
  std::vector<uint32_t> clock;
};

struct Block {
  std::vector<Thread>* threads = nullptr;
  int rank = 0;  // %cluster_ctarank
  uint32_t waited_epoch = 0;  // the cluster epoch when the latest barrier.cluster.wait of its threads returned
  int n = 0, live = 0, at_barrier = 0;
  uint32_t epoch = 0;  // advances at every __syncthreads
  // (vectors, not arrays: activate() swaps whole Blocks, and a DSMEM access swaps twice)
  std::vector<Warp> warps = std::vector<Warp>(kMaxThreads / 32);
  std::vector<Alloc> allocs;  // [0]: the dynamic buffer when the launch asked for one
  size_t used = 0;            // arena bytes handed out so far (red zones included)
  size_t static_bytes = 0;
  bool has_dynamic = false;
  // happens-before by vector clocks, switched on by the first sm_90 synchronization
  bool hb = false;
  int hb_dim = 0;               // n threads + one async-proxy reader per warpgroup
  std::vector<uint32_t> clocks;  // hb_dim x hb_dim
  std::vector<Warpgroup> warpgroups = std::vector<Warpgroup>(kMaxWarpgroups);
  std::unordered_map<size_t, Mbarrier> mbarriers;  // by shared offset
  NamedBarrier named[16];
};

extern Block g_block;
extern std::vector<Thread> g_threads;
extern unsigned char* g_arena;
extern uintptr_t g_arena_lo, g_arena_span;

// A CTA of the running cluster that is not the running one: what the globals above hold for it.
struct CtaState {
  Block block;
  std::vector<Thread> threads;
  unsigned char* arena = nullptr;
  Shadow* shadow = nullptr;
  size_t shadow_dirty = 0;
  uint3 block_idx{0, 0, 0};
};

struct Cluster {
  dim3 dims{1, 1, 1};
  int size = 1;
  int active = 0;               // the rank whose state is in the globals
  uint3 origin{0, 0, 0};        // blockIdx of rank 0
  uint32_t epoch = 0;           // advances at every completed cluster barrier
  int64_t phase = 0;            // cluster-barrier phases completed
  int arrived = 0, live = 0;    // arrivals in the current phase; threads in the cluster not exited
  bool restart = false;         // a phase completed: the scheduler starts over from the last rank
  std::vector<CtaState> parked; // [rank]: that CTA's state while another runs (the active one's: empty)
};
extern Cluster g_cluster;

// Swaps CTA `rank` of the running cluster into the globals (and the active one out).
void activate(int rank);
uint3 cluster_block_idx(int rank);
Block& block_of(int rank);  // the running cluster's CTA `rank`, active or parked
constexpr int kRemoteAccessor = 2 * kMaxThreads;  // accessor ids of DSMEM accesses from here on
inline int remote_accessor(int rank, int tid) { return kRemoteAccessor + rank * kMaxThreads + tid; }
// A 1..16-byte DSMEM load (write false) or store by the running thread at shared offset `off` of
// CTA `rank` of its cluster, through `data`; checked like any shared access, in the target's shadow.
void cluster_shared_access(int rank, size_t off, void* data, size_t bytes, bool write, const char* what);
// barrier.cluster: completes when every thread of the cluster that has not exited has arrived
// (PTX: exiting threads release a barrier they alone hold up).
void cluster_arrive(const char* what);
void cluster_wait();
void cluster_thread_exit(const Thread& t);

Thread& me();
void switch_to_scheduler(Thread& t);
std::string thread_name(const Thread& t);
std::string accessor_name(int tid);  // a thread, or a warpgroup's async-proxy reader
std::string describe(size_t arena_offset);
const Alloc* find_alloc(size_t arena_offset);
// Checks an access by accessor tid (a thread, or async_proxy(g)) to shared memory.
void check_access(int tid, uintptr_t p, size_t n, bool write);
void warpgroup_collective(const char* what, void* slot, WarpgroupOp op);

// vector clocks
void hb_enable();
inline int async_proxy(int warpgroup) { return g_block.n + warpgroup; }
inline uint32_t* clock_of(int tid) { return &g_block.clocks[size_t(tid) * size_t(g_block.hb_dim)]; }
void hb_join(uint32_t* into, const uint32_t* from);
// releases tid's clock into `into` (sized on first use) and advances tid's own entry
void hb_release(int tid, std::vector<uint32_t>& into);
void hb_acquire(int tid, const std::vector<uint32_t>& from);
bool ordered_after(int tc, int ta, uint32_t ep_a, uint32_t clk_a);  // is tc's next access after ta's?

}  // namespace fastlm::emu
