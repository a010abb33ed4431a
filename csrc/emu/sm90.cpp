// The emulator's sm_90a primitives (semantics: include/fastlm_emu/ptx_sm90.h): mbarriers whose
// waits block the fiber, TMA box loads with zero fill and swizzle, named barriers, and wgmma as
// a warpgroup collective that decodes the shared-memory matrix descriptors as the PTX ISA does.
// Synchronization feeds the race checker's vector clocks (runtime_internal.h).
#include <cstdio>

#include "../cuda/ptx_sm90.cuh"
#include "fastlm_emu/fragments.h"
#include "runtime_internal.h"

namespace fastlm::emu::sm90 {
namespace {

using cuda::sm90::swizzle_address;
using cuda::sm90::swizzle_span;

size_t shared_offset(const void* p, size_t bytes, size_t align, const char* what, const char* arg) {
  if (!in_shared_arena(p)) fail("%s: %s %p is not a shared-memory address (%s)", what, arg, p, thread_name(me()).c_str());
  const size_t off = reinterpret_cast<uintptr_t>(p) - g_arena_lo;
  const Alloc* a = find_alloc(off);
  if (!a || off + bytes > a->offset + a->bytes)
    fail("%s: %s at %s lies outside every shared allocation (%s)", what, arg, describe(off).c_str(),
         thread_name(me()).c_str());
  if (off % align)
    fail("%s: misaligned address: %s at %s is not %zu-byte aligned (%s)", what, arg, describe(off).c_str(), align,
         thread_name(me()).c_str());
  return off;
}

Mbarrier& barrier(uint64_t* bar, const char* what) {
  require_sm90(what);
  const size_t off = shared_offset(bar, 8, 8, what, "the mbarrier");
  const auto it = g_block.mbarriers.find(off);
  if (it == g_block.mbarriers.end())
    fail("%s on the uninitialized mbarrier at %s (%s)", what, describe(off).c_str(), thread_name(me()).c_str());
  Mbarrier& b = it->second;
  // the init must happen before every use (mbarrier.init, fence, __syncthreads, then use)
  if (!ordered_after(me().tid, b.init_tid, b.init_ep, b.init_clk))
    fail("%s on the mbarrier at %s by %s, with no barrier after %s initialized it", what, describe(off).c_str(),
         thread_name(me()).c_str(), thread_name(g_threads[size_t(b.init_tid)]).c_str());
  return b;
}

void complete_if_done(Mbarrier& b, size_t off) {
  if (b.pending != 0 || b.tx != 0) return;
  const int parity = int(b.phase & 1);
  b.done[parity] = b.clock;
  std::fill(b.clock.begin(), b.clock.end(), 0u);
  ++b.phase;
  b.pending = b.expected;
  for (int i = 0; i < g_block.n; ++i) {
    Thread& t = g_threads[size_t(i)];
    if (t.state == State::AtMbarrier && t.wait_object == off && t.wait_arg == parity) t.state = State::Runnable;
  }
}

// A release lets the others run at once (the scheduler continues with the next thread): a
// producer then cannot run far ahead of its consumers, so a stage it overwrites without
// waiting for them is still being read, and the checker sees the race.
void yield_after_release() {
  Thread& t = me();
  t.state = State::Runnable;
  switch_to_scheduler(t);
}

void complete_tx(Mbarrier& b, size_t off, int64_t bytes, const char* what) {
  b.tx -= bytes;
  if (b.tx < 0)
    fail("%s: the mbarrier at %s received %lld transaction bytes more than its current phase expects (expect_tx must "
         "come first)", what, describe(off).c_str(), static_cast<long long>(-b.tx));
  complete_if_done(b, off);
}

}  // namespace

void require_sm90(const char* what) {
  if (device().major != 9) fail("%s needs sm_90a; the emulated device is sm_%d%d", what, device().major, device().minor);
}

// ---------------------------------------------------------------- mbarrier
void mbar_init(uint64_t* bar, int arrivals) {
  require_sm90("mbarrier.init");
  const size_t off = shared_offset(bar, 8, 8, "mbarrier.init", "the mbarrier");
  if (arrivals < 1 || arrivals > (1 << 20) - 1) fail("mbarrier.init: arrival count %d outside [1, 2^20 - 1]", arrivals);
  if (g_block.mbarriers.count(off)) fail("mbarrier.init: the mbarrier at %s is initialized twice", describe(off).c_str());
  hb_enable();
  Mbarrier& b = g_block.mbarriers[off];
  b.expected = b.pending = arrivals;
  b.init_tid = me().tid, b.init_ep = g_block.epoch, b.init_clk = clock_of(me().tid)[me().tid];
  ++clock_of(me().tid)[me().tid];  // a release: later uses must be ordered after the init
}

void fence_barrier_init() { require_sm90("fence.mbarrier_init"); }

void mbar_arrive(uint64_t* bar, bool expect_tx, uint32_t tx_bytes) {
  const char* what = expect_tx ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive";
  Mbarrier& b = barrier(bar, what);
  const size_t off = reinterpret_cast<uintptr_t>(bar) - g_arena_lo;
  if (expect_tx) {
    if (tx_bytes > (1u << 20) - 1) fail("%s: %u bytes exceed the tx-count range (2^20 - 1)", what, tx_bytes);
    b.tx += tx_bytes;
  }
  if (b.pending == 0)
    fail("%s: more arrivals than the %d the mbarrier at %s expects in its phase %u (%s)", what, b.expected,
         describe(off).c_str(), b.phase, thread_name(me()).c_str());
  hb_release(me().tid, b.clock);
  --b.pending;
  complete_if_done(b, off);
  yield_after_release();
}

void mbar_wait(uint64_t* bar, int phase_parity) {
  Mbarrier* b = &barrier(bar, "mbarrier.try_wait.parity");
  const size_t off = reinterpret_cast<uintptr_t>(bar) - g_arena_lo;
  const int parity = phase_parity & 1;
  Thread& t = me();
  // The phase of that parity has completed unless it is the current one.
  while (int(b->phase & 1) == parity) {
    t.state = State::AtMbarrier;
    t.wait_object = off, t.wait_arg = parity;
    switch_to_scheduler(t);
    b = &g_block.mbarriers[off];
  }
  hb_acquire(t.tid, b->done[parity]);
}

// ---------------------------------------------------------------- TMA
void tma_load(void* smem_dst, const TmaDesc* desc, int rank, const int* coords, uint64_t* bar) {
  const char* what = rank == 2 ? "cp.async.bulk.tensor.2d" : rank == 3 ? "cp.async.bulk.tensor.3d"
                                                                        : "cp.async.bulk.tensor.4d";
  require_sm90(what);
  TmaMap m;
  std::memcpy(&m, desc->bytes, sizeof m);
  if (m.magic != kTmaMagic) fail("%s: the tensor map was not made by make_tma_desc_2d/3d/4d", what);
  if (m.rank != rank) fail("%s: the tensor map has rank %d", what, m.rank);
  const TmaSwizzle sw = TmaSwizzle(m.swizzle);
  const int span = swizzle_span(sw);
  const int64_t row_bytes = int64_t(m.box[0]) * m.elem_bytes;
  if (span && row_bytes != span)
    fail("%s: a swizzled box whose inner extent (%lld bytes) is not the swizzle span (%d) is not emulated", what,
         static_cast<long long>(row_bytes), span);
  int64_t box_elems = 1;
  for (int d = 0; d < rank; ++d) box_elems *= m.box[d];
  const int64_t box_bytes = box_elems * m.elem_bytes;
  const size_t align = span ? size_t(8 * span) : 128;  // the swizzle pattern repeats every 8 rows
  const size_t dst = shared_offset(smem_dst, size_t(box_bytes), align, what, "the destination");
  Mbarrier& b = barrier(bar, what);
  const size_t bar_off = reinterpret_cast<uintptr_t>(bar) - g_arena_lo;
  Thread& t = me();
  // The copy lands now, as the issuing thread's writes; complete_tx then releases them to the
  // waiters of the barrier's current phase.
  // the box's elements in shared-memory order (innermost first), each at its coordinates
  for (int64_t i = 0; i < box_elems; ++i) {
        int64_t c[4] = {0, 0, 0, 0}, rest = i;
        for (int d = 0; d < rank; ++d) c[d] = coords[d] + rest % m.box[d], rest /= m.box[d];
        bool inside = true;
        int64_t src = 0;
        for (int d = 0; d < rank; ++d) {
          inside = inside && c[d] >= 0 && c[d] < m.dims[d];
          src += c[d] * m.strides[d];
        }
        const uint32_t linear = uint32_t(dst + size_t(i * m.elem_bytes));
        const uint32_t at = swizzle_address(linear, sw);  // the arena is 4 KB aligned: offsets swizzle like addresses
        check_access(t.tid, g_arena_lo + at, size_t(m.elem_bytes), true);
        if (inside) std::memcpy(g_arena + at, m.base + src, size_t(m.elem_bytes));
        else std::memset(g_arena + at, 0, size_t(m.elem_bytes));
  }
  hb_release(t.tid, b.clock);
  complete_tx(b, bar_off, box_bytes, what);
  yield_after_release();
}

void tma_prefetch(const TmaDesc* desc) {
  require_sm90("prefetch.tensormap");
  TmaMap m;
  std::memcpy(&m, desc->bytes, sizeof m);
  if (m.magic != kTmaMagic) fail("prefetch.tensormap: the tensor map was not made by make_tma_desc_2d/3d/4d");
}

void fence_proxy_async() { require_sm90("fence.proxy.async"); }

// ---------------------------------------------------------------- named barriers
void named_barrier(int id, int threads, bool wait) {
  const char* what = wait ? "bar.sync" : "bar.arrive";
  require_sm90(what);
  Thread& t = me();
  if (id < 1 || id > 15) fail("%s: barrier id %d outside 1..15 (0 is __syncthreads') (%s)", what, id, thread_name(t).c_str());
  if (threads < 32 || threads % 32 || threads > g_block.n)
    fail("%s %d: thread count %d is not a multiple of 32 in [32, %d] (%s)", what, id, threads, g_block.n,
         thread_name(t).c_str());
  NamedBarrier& nb = g_block.named[id];
  if (nb.arrived == 0) nb.expected = threads;
  else if (nb.expected != threads)
    fail("%s %d: %s says %d threads while %d arrived saying %d", what, id, thread_name(t).c_str(), threads, nb.arrived,
         nb.expected);
  hb_release(t.tid, nb.clock);
  if (++nb.arrived == nb.expected) {
    for (int i = 0; i < g_block.n; ++i) {
      Thread& o = g_threads[size_t(i)];
      if (o.state == State::AtNamedBarrier && o.wait_arg == id) {
        hb_acquire(i, nb.clock);
        o.state = State::Runnable;
      }
    }
    if (wait) hb_acquire(t.tid, nb.clock);
    nb.arrived = 0;
    std::fill(nb.clock.begin(), nb.clock.end(), 0u);
    return;
  }
  if (!wait) return;
  t.state = State::AtNamedBarrier;
  t.wait_arg = id;
  switch_to_scheduler(t);
}

void setmaxnreg(int regs) {
  require_sm90("setmaxnreg");
  if (regs % 8 || regs < 24 || regs > 256) fail("setmaxnreg: %d is not a multiple of 8 in [24, 256]", regs);
}

uint32_t smem_offset(const void* p, const char* what) {
  require_sm90(what);
  const size_t off = shared_offset(p, 1, 16, what, "the matrix");
  if (off >= (size_t(1) << 18)) fail("%s: shared offset %zu does not fit the descriptor's 18 bits", what, off);
  return uint32_t(off);
}

// ---------------------------------------------------------------- wgmma
namespace {

struct WgmmaSlot {
  float* d;
  int n, dtype;
  bool trans_a, trans_b, accumulate;
  uint64_t desc_a, desc_b;
  const uint32_t* a_regs;  // null: A from desc_a
};

struct Operand {
  uint32_t start, lbo, sbo;
  int span;
};

Operand decode(uint64_t desc, const char* which) {
  const uint32_t layout = uint32_t(desc >> 62);
  if ((desc >> 49) & 7) fail("wgmma: %s's descriptor has a base offset (bits 49-51), which is not emulated", which);
  return {uint32_t(desc & 0x3fff) << 4, uint32_t((desc >> 16) & 0x3fff) << 4, uint32_t((desc >> 32) & 0x3fff) << 4,
          layout == 1 ? 128 : layout == 2 ? 64 : layout == 3 ? 32 : 0};
}

float to_float(uint16_t bits, int dtype) {
  return dtype == 1 ? __half2float(__half{bits}) : __bfloat162float(__nv_bfloat16{bits});
}

// Reads element (mn, k) of a shared-memory operand as the async-proxy reader of warpgroup g.
float read_operand(const Operand& o, bool mn_major, int mn, int k, int dtype, int reader) {
  const uint32_t linear = o.start + frag::wgmma_smem_offset(mn_major, o.span, o.lbo, o.sbo, mn, k);
  const uint32_t at = swizzle_address(linear, o.span == 128   ? TmaSwizzle::k128B
                                              : o.span == 64 ? TmaSwizzle::k64B
                                              : o.span == 32 ? TmaSwizzle::k32B
                                                             : TmaSwizzle::kNone);
  check_access(reader, g_arena_lo + at, 2, false);
  uint16_t bits;
  std::memcpy(&bits, g_arena + at, 2);
  return to_float(bits, dtype);
}

void wgmma_op(int g, void** slots) {
  const auto* s0 = static_cast<WgmmaSlot*>(slots[0]);
  for (int i = 1; i < 128; ++i) {
    const auto* s = static_cast<WgmmaSlot*>(slots[i]);
    if (s->n != s0->n || s->dtype != s0->dtype || s->trans_a != s0->trans_a || s->trans_b != s0->trans_b ||
        s->accumulate != s0->accumulate || s->desc_b != s0->desc_b || (s->a_regs == nullptr) != (s0->a_regs == nullptr) ||
        (!s0->a_regs && s->desc_a != s0->desc_a))
      fail("wgmma: thread %d of warpgroup %d passed other arguments than its thread 0 (N, type, transposes, "
           "descriptors and scale-d must agree)", 128 * g + i, g);
  }
  const int n = s0->n, dtype = s0->dtype;
  // The async proxy reads after every thread issued the wgmma: its clock joins all 128.
  hb_enable();
  const int reader = async_proxy(g);
  for (int i = 0; i < 128; ++i) hb_join(clock_of(reader), clock_of(128 * g + i));
  static float A[64][16], B[16][256];
  if (s0->a_regs) {
    for (int wt = 0; wt < 128; ++wt) {
      const uint32_t* r = static_cast<WgmmaSlot*>(slots[wt])->a_regs;
      for (int j = 0; j < 8; ++j) {
        const frag::RowCol rc = frag::wgmma_a(wt, j);
        A[rc.row][rc.col] = to_float(uint16_t(j % 2 ? r[j / 2] >> 16 : r[j / 2] & 0xffff), dtype);
      }
    }
  } else {
    const Operand a = decode(s0->desc_a, "A");
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) A[m][k] = read_operand(a, s0->trans_a, m, k, dtype, reader);
  }
  const Operand b = decode(s0->desc_b, "B");
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < n; ++c) B[k][c] = read_operand(b, s0->trans_b, c, k, dtype, reader);
  for (int wt = 0; wt < 128; ++wt) {
    auto* s = static_cast<WgmmaSlot*>(slots[wt]);
    Thread& t = g_threads[size_t(128 * g + wt)];
    // D in flight: the result goes to the emulator's copy, and a wgmma chained on the same
    // accumulators before the wait reads that copy; the registers hold NaN until the wait
    Thread::InFlight* acc = nullptr;
    for (auto& f : t.wg_acc)
      if (f.d == s->d && f.group == t.wg_commits) acc = &f;
    if (!acc) {
      std::vector<float> c(s->d, s->d + n / 2);
      for (const auto& f : t.wg_acc)  // a chain across groups: the latest value in flight
        if (f.d == s->d) c = f.value;
      t.wg_acc.push_back({s->d, t.wg_commits, std::move(c)});
      acc = &t.wg_acc.back();
    }
    for (int i = 0; i < n / 2; ++i) {
      const frag::RowCol rc = frag::wgmma_d(wt, i);
      float sum = s->accumulate ? acc->value[size_t(i)] : 0.0f;  // fp32 in k order; 16-bit products are exact
      for (int k = 0; k < 16; ++k) sum += A[rc.row][k] * B[k][rc.col];
      acc->value[size_t(i)] = sum;
      s->d[i] = __int_as_float(0x7fc00000);  // undefined until wgmma_wait: NaN
    }
    // the thread learns that these reads are done only when it waits for the group
    t.wg_open = clock_of(reader)[reader];
  }
  ++clock_of(reader)[reader];
}

}  // namespace

void wgmma(float* d, int n, int dtype, bool trans_a, bool trans_b, uint64_t desc_a, const uint32_t* a_regs,
           uint64_t desc_b, bool accumulate) {
  require_sm90("wgmma.mma_async");
  Thread& t = me();
  if (!t.wg_fenced)
    fail("wgmma.mma_async without a wgmma_fence() since this thread's last wgmma_wait (or start) (%s)",
         thread_name(t).c_str());
  WgmmaSlot s{d, n, dtype, trans_a, trans_b, accumulate, desc_a, desc_b, a_regs};
  warpgroup_collective("wgmma.mma_async", &s, &wgmma_op);
}

namespace {
void no_op(int, void**) {}
}  // namespace

void wgmma_fence() {
  require_sm90("wgmma.fence");
  warpgroup_collective("wgmma.fence", nullptr, &no_op);
  me().wg_fenced = true;
}

void wgmma_commit() {
  require_sm90("wgmma.commit_group");
  warpgroup_collective("wgmma.commit_group", nullptr, &no_op);
  Thread& t = me();
  t.wg_groups.push_back(t.wg_open);  // an empty group (no wgmma since the last commit) is legal
  t.wg_open = 0;
  ++t.wg_commits;
}

void wgmma_wait(int groups_left) {
  require_sm90("wgmma.wait_group");
  warpgroup_collective("wgmma.wait_group", nullptr, &no_op);
  Thread& t = me();
  const int reader = async_proxy(t.tid / 128);
  while (t.wg_groups.size() > size_t(groups_left)) {
    const uint64_t group = t.wg_commits - t.wg_groups.size();
    const uint32_t done = t.wg_groups.front();
    t.wg_groups.erase(t.wg_groups.begin());
    if (done && g_block.hb && clock_of(t.tid)[reader] < done) clock_of(t.tid)[reader] = done;
    for (auto it = t.wg_acc.begin(); it != t.wg_acc.end();) {  // the group's accumulators land
      if (it->group != group) {
        ++it;
        continue;
      }
      bool overwritten = false;  // a later wgmma in flight on the same registers: they stay NaN
      for (const auto& f : t.wg_acc) overwritten = overwritten || (f.d == it->d && f.group > group);
      if (!overwritten) std::memcpy(it->d, it->value.data(), it->value.size() * sizeof(float));
      it = t.wg_acc.erase(it);
    }
  }
  t.wg_fenced = false;
}

// ---------------------------------------------------------------- clusters and DSMEM
namespace {
constexpr int kWindowShift = 24;  // shared::cluster address: (rank + 1) << 24 | offset in the arena
}  // namespace

uint32_t cluster_ctarank() {
  require_sm90("%cluster_ctarank");
  return uint32_t(g_block.rank);
}

uint32_t cluster_nctarank() {
  require_sm90("%cluster_nctarank");
  return uint32_t(g_cluster.size);
}

uint3 cluster_ctaid() {
  require_sm90("%cluster_ctaid");
  const dim3 d = g_cluster.dims;
  const unsigned r = unsigned(g_block.rank);
  return uint3{r % d.x, r / d.x % d.y, r / (d.x * d.y)};
}

uint3 cluster_nctaid() {
  require_sm90("%cluster_nctaid");
  return uint3{g_cluster.dims.x, g_cluster.dims.y, g_cluster.dims.z};
}

void cluster_arrive(bool release) {
  const char* what = release ? "barrier.cluster.arrive.release" : "barrier.cluster.arrive.relaxed";
  require_sm90(what);
  emu::cluster_arrive(what);
}

void cluster_wait() {
  require_sm90("barrier.cluster.wait");
  emu::cluster_wait();
}

uint32_t smem_u32(const void* p) {
  require_sm90("cvta.to.shared");
  if (!in_shared_arena(p)) fail("cvta.to.shared: %p is not a shared-memory address (%s)", p, thread_name(me()).c_str());
  return uint32_t(reinterpret_cast<uintptr_t>(p) - g_arena_lo);  // checked where it is dereferenced
}

uint32_t mapa(uint32_t smem_addr, uint32_t rank) {
  require_sm90("mapa.shared::cluster");
  if (smem_addr >> kWindowShift)
    fail("mapa.shared::cluster: %#x is not a shared::cta address (smem_u32 of a shared pointer) (%s)", smem_addr,
         thread_name(me()).c_str());
  if (rank >= uint32_t(g_cluster.size))
    fail("mapa.shared::cluster: rank %u outside the cluster of %d CTAs (ranks 0..%d) (%s)", rank, g_cluster.size,
         g_cluster.size - 1, thread_name(me()).c_str());
  return (rank + 1) << kWindowShift | smem_addr;
}

void dsmem_access(uint32_t cluster_addr, void* data, int bytes, bool write) {
  const char* what = write ? "st.shared::cluster" : "ld.shared::cluster";
  require_sm90(what);
  const uint32_t window = cluster_addr >> kWindowShift;
  if (window > uint32_t(g_cluster.size))
    fail("%s: address %#x names rank %u, outside the cluster of %d CTAs (%s)", what, cluster_addr, window - 1,
         g_cluster.size, thread_name(me()).c_str());
  const int rank = window ? int(window) - 1 : g_block.rank;
  cluster_shared_access(rank, cluster_addr & ((1u << kWindowShift) - 1), data, size_t(bytes), write, what);
}

}  // namespace fastlm::emu::sm90
