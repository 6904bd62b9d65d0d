// torch.ops.sgl_kernel.shm_*: message passing and collectives through a shared-memory segment,
// for ranks on one host (the TKNP scatter/gather and batch/logits exchange, TP's all-reduce and
// all-gather), in place of gloo over loopback.
//
// The segment is a uint8 tensor every rank maps (srt/distributed/shm_comm.py lays it out and
// passes byte offsets). Two structures live in it:
//
// - A channel (one per ordered pair of ranks): a ring of `num_slots` slots of `slot_bytes`,
//   with a 32-bit produced counter (written by the sender) and a consumed counter (written by
//   the receiver), each on its own cache line. A message is cut into slot-sized chunks; the
//   sender waits for a free slot, copies, publishes (release); the receiver waits for a full
//   slot, copies out, frees it. One sender and one receiver per channel, FIFO, like gloo's
//   point-to-point send/recv.
// - A collective area: per rank, a 32-bit generation counter and two slot-sized buffers used
//   alternately. A rank writes its chunk for generation g into buffer g % 2, publishes g, waits
//   until every rank has published g, then reads every rank's buffer. Two buffers suffice: a
//   rank can only reach generation g + 2 (and overwrite buffer g % 2) once every rank has
//   published g + 1, which each does after it finished reading generation g.
//
// Waiting spins briefly (`spin` pause iterations), then sleeps on the counter's futex (shared,
// not private: the word lives in a file mapping). A rank whose cores are all lent to another (a
// TKNP rank on the core its root's OpenMP thread borrows) passes a negative `spin`: it yields
// the CPU -spin times first, where pausing would take the core from the thread that needs it and
// sleeping at once idles the CPU. In a VM an idle vCPU halts, and waking it (for this rank's next
// layer, or the root's thread's next parallel region) costs tens of microseconds. The word after
// each counter, on its cache line, counts the processes asleep on it, so that publishing makes
// the wake-up system call only when one is (most waits end while spinning, and every message
// would otherwise pay two calls). Every 100 ms of waiting it checks the peers' pids: a peer that
// died raises (RuntimeError in Python) instead of waiting forever.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "shm.h"

namespace sgl_kernel {
namespace {

constexpr int64_t kLine = 64;                // counters sit on their own cache lines
constexpr int64_t kChannelHeader = 2 * kLine;  // produced, consumed
constexpr int64_t kParallelCopyBytes = 1 << 20;

using Counter = std::atomic<uint32_t>;
static_assert(sizeof(Counter) == 4, "a futex word is 32 bits");

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

Counter* counter_at(uint8_t* base, int64_t offset) { return reinterpret_cast<Counter*>(base + offset); }

// The processes asleep on a counter: the next word of its cache line.
Counter* sleepers_of(Counter* word) { return word + 1; }

void futex_wait(Counter* word, uint32_t seen, int64_t timeout_ns) {
  timespec ts{static_cast<time_t>(timeout_ns / 1000000000), static_cast<long>(timeout_ns % 1000000000)};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, seen, &ts, nullptr, 0);
}

void futex_wake(Counter* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

// A process that exited is gone even while it waits, a zombie, for its parent to reap it.
bool alive(int64_t pid) {
  if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const auto paren = text.rfind(')');
  if (paren == std::string::npos || paren + 2 >= text.size()) return true;  // no /proc: trust kill()
  const char state = text[paren + 2];
  return state != 'Z' && state != 'X';
}

void check_alive(const std::vector<int64_t>& pids) {
  for (int64_t pid : pids)
    TORCH_CHECK(pid <= 0 || alive(pid), "sgl_kernel.shm: peer process ", pid,
                " is gone (a rank died during a transfer)");
}

// Waits until ready(word's value) holds; see the file comment.
template <typename Ready>
void wait_for(Counter* word, Ready ready, int64_t spin, const std::vector<int64_t>& peers) {
  for (int64_t i = 0; i < spin; ++i) {
    if (ready(word->load(std::memory_order_acquire))) return;
    cpu_relax();
  }
  for (int64_t i = 0; i < -spin; ++i) {
    if (ready(word->load(std::memory_order_acquire))) return;
    sched_yield();
  }
  auto last_check = std::chrono::steady_clock::now();
  Counter* sleepers = sleepers_of(word);
  while (true) {
    // Counted before the last look at the word (both sequentially consistent, as is publish's
    // store then load): either publish sees this sleeper and wakes it, or this look sees the
    // new value. futex_wait returns at once if the word moved since.
    sleepers->fetch_add(1);
    const uint32_t seen = word->load();
    if (!ready(seen)) futex_wait(word, seen, 100 * 1000 * 1000);
    sleepers->fetch_sub(1);
    if (ready(seen)) return;
    const auto now = std::chrono::steady_clock::now();
    if (now - last_check >= std::chrono::milliseconds(100)) {
      check_alive(peers);
      last_check = now;
    }
  }
}

void publish(Counter* word, uint32_t value) {
  word->store(value);
  if (sleepers_of(word)->load() != 0) futex_wake(word);
}

void copy_bytes(uint8_t* dst, const uint8_t* src, int64_t n) {
  if (n < kParallelCopyBytes) {
    std::memcpy(dst, src, n);
    return;
  }
  at::parallel_for(0, n, kParallelCopyBytes / 4, [&](int64_t begin, int64_t end) {
    std::memcpy(dst + begin, src + begin, end - begin);
  });
}

uint8_t* segment_base(const at::Tensor& segment) {
  TORCH_CHECK(segment.device().is_cpu() && segment.scalar_type() == at::kByte && segment.is_contiguous(),
              "sgl_kernel.shm: the segment is a contiguous CPU uint8 tensor");
  return segment.data_ptr<uint8_t>();
}

void check_range(const at::Tensor& segment, int64_t offset, int64_t bytes) {
  TORCH_CHECK(offset >= 0 && offset % kLine == 0 && offset + bytes <= segment.numel(),
              "sgl_kernel.shm: offset ", offset, " + ", bytes, " bytes lies outside the segment of ",
              segment.numel(), " bytes (or is not cache-line aligned)");
}

void check_data(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "sgl_kernel.shm: ", what, " is a contiguous CPU tensor");
}

// ---- channels ---------------------------------------------------------------------------------

// Slot-sized chunks of a message; an empty message still takes one (empty) slot, so that every
// send meets exactly one recv.
int64_t num_chunks(int64_t bytes, int64_t slot_bytes) { return std::max<int64_t>(1, (bytes + slot_bytes - 1) / slot_bytes); }

}  // namespace

void shm_send(const at::Tensor& segment, int64_t channel, int64_t slot_bytes, int64_t num_slots,
              const at::Tensor& src, int64_t peer_pid, int64_t spin) {
  check_data(src, "src");
  check_range(segment, channel, kChannelHeader + slot_bytes * num_slots);
  uint8_t* base = segment_base(segment);
  Counter* produced = counter_at(base, channel);
  Counter* consumed = counter_at(base, channel + kLine);
  uint8_t* slots = base + channel + kChannelHeader;
  const auto* data = static_cast<const uint8_t*>(src.data_ptr());
  const int64_t total = src.numel() * src.element_size();
  const std::vector<int64_t> peers{peer_pid};
  uint32_t count = produced->load(std::memory_order_relaxed);  // only this process writes it
  for (int64_t c = 0, chunks = num_chunks(total, slot_bytes); c < chunks; ++c) {
    wait_for(consumed, [&](uint32_t done) { return count - done < static_cast<uint32_t>(num_slots); }, spin, peers);
    const int64_t at = c * slot_bytes;
    copy_bytes(slots + (count % num_slots) * slot_bytes, data + at, std::min(slot_bytes, total - at));
    publish(produced, ++count);
  }
}

// Returns the nanoseconds spent waiting for the message's first chunk: the time its sender took
// to produce it, as opposed to moving it (benchmarks tell the two apart).
int64_t shm_recv(const at::Tensor& segment, int64_t channel, int64_t slot_bytes, int64_t num_slots, at::Tensor& dst,
                 int64_t peer_pid, int64_t spin) {
  check_data(dst, "dst");
  check_range(segment, channel, kChannelHeader + slot_bytes * num_slots);
  uint8_t* base = segment_base(segment);
  Counter* produced = counter_at(base, channel);
  Counter* consumed = counter_at(base, channel + kLine);
  const uint8_t* slots = base + channel + kChannelHeader;
  auto* data = static_cast<uint8_t*>(dst.data_ptr());
  const int64_t total = dst.numel() * dst.element_size();
  const std::vector<int64_t> peers{peer_pid};
  uint32_t count = consumed->load(std::memory_order_relaxed);  // only this process writes it
  const auto start = std::chrono::steady_clock::now();
  int64_t waited_ns = 0;
  for (int64_t c = 0, chunks = num_chunks(total, slot_bytes); c < chunks; ++c) {
    wait_for(produced, [&](uint32_t made) { return made != count; }, spin, peers);
    if (c == 0)
      waited_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
    const int64_t at = c * slot_bytes;
    copy_bytes(data + at, slots + (count % num_slots) * slot_bytes, std::min(slot_bytes, total - at));
    publish(consumed, ++count);
  }
  return waited_ns;
}

namespace {

// ---- collectives ------------------------------------------------------------------------------

struct Area {
  uint8_t* base;
  int64_t offset, slot_bytes, world, rank;
  int64_t stride() const { return kLine + 2 * slot_bytes; }
  Counter* generation(int64_t r) const { return counter_at(base, offset + r * stride()); }
  uint8_t* buffer(int64_t r, uint32_t gen) const { return base + offset + r * stride() + kLine + (gen % 2) * slot_bytes; }
};

Area area_of(const at::Tensor& segment, int64_t offset, int64_t slot_bytes, int64_t rank, int64_t world) {
  TORCH_CHECK(world >= 1 && rank >= 0 && rank < world, "sgl_kernel.shm: rank ", rank, " of ", world);
  TORCH_CHECK(slot_bytes > 0 && slot_bytes % kLine == 0, "sgl_kernel.shm: slot_bytes is a positive multiple of 64");
  check_range(segment, offset, world * (kLine + 2 * slot_bytes));
  return Area{segment_base(segment), offset, slot_bytes, world, rank};
}

// One step of a collective: publish this rank's chunk for generation `gen`, wait for everyone's.
void exchange(const Area& a, uint32_t gen, const uint8_t* chunk, int64_t n, int64_t spin,
              const std::vector<int64_t>& pids) {
  copy_bytes(a.buffer(a.rank, gen), chunk, n);
  publish(a.generation(a.rank), gen);
  for (int64_t r = 0; r < a.world; ++r) {
    if (r == a.rank) continue;
    wait_for(a.generation(r), [&](uint32_t g) { return static_cast<int32_t>(g - gen) >= 0; }, spin, pids);
  }
}

// out (world * n bytes, rank-major) = every rank's src (n bytes each).
void shm_all_gather(const at::Tensor& segment, int64_t offset, int64_t slot_bytes, int64_t rank, at::IntArrayRef pids,
                    const at::Tensor& src, at::Tensor& out, int64_t spin) {
  check_data(src, "src");
  check_data(out, "out");
  const int64_t world = static_cast<int64_t>(pids.size());
  const Area a = area_of(segment, offset, slot_bytes, rank, world);
  const int64_t n = src.numel() * src.element_size();
  TORCH_CHECK(out.numel() * out.element_size() == world * n, "sgl_kernel.shm_all_gather: out holds world * src");
  const std::vector<int64_t> peers(pids.begin(), pids.end());
  const auto* in = static_cast<const uint8_t*>(src.data_ptr());
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  uint32_t gen = a.generation(rank)->load(std::memory_order_relaxed);  // only this process writes it
  for (int64_t done = 0; done < n; done += slot_bytes) {
    const int64_t len = std::min(slot_bytes, n - done);
    exchange(a, ++gen, in + done, len, spin, peers);
    for (int64_t r = 0; r < world; ++r) copy_bytes(dst + r * n + done, a.buffer(r, gen), len);
  }
}

// x = the sum of every rank's x, added in rank order in float32 (so every rank gets the same
// bits) and rounded once to x's dtype; torch's vectorized kernels do the arithmetic.
void shm_all_reduce(const at::Tensor& segment, int64_t offset, int64_t slot_bytes, int64_t rank, at::IntArrayRef pids,
                    at::Tensor& x, int64_t spin) {
  check_data(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "sgl_kernel.shm_all_reduce: float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t world = static_cast<int64_t>(pids.size());
  const Area a = area_of(segment, offset, slot_bytes, rank, world);
  const std::vector<int64_t> peers(pids.begin(), pids.end());
  const at::Tensor flat = x.view({-1});
  const int64_t per_chunk = slot_bytes / x.element_size();
  uint32_t gen = a.generation(rank)->load(std::memory_order_relaxed);  // only this process writes it
  for (int64_t done = 0; done < flat.numel(); done += per_chunk) {
    const int64_t len = std::min(per_chunk, flat.numel() - done);
    at::Tensor part = flat.narrow(0, done, len);
    exchange(a, ++gen, static_cast<const uint8_t*>(part.data_ptr()), len * x.element_size(), spin, peers);
    at::Tensor sum;
    for (int64_t r = 0; r < world; ++r) {
      at::Tensor theirs = at::from_blob(a.buffer(r, gen), {len}, x.options());
      sum = r == 0 ? theirs.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true) : sum.add_(theirs);
    }
    part.copy_(sum);
  }
}

// How long one iteration of a spin-wait (a pause) takes on this CPU, in nanoseconds: the best of
// a few timed runs, as preemption only lengthens one. Pause latency differs tenfold between CPUs
// (about 3 ns to 70 ns), so spin counts meant as a time are scaled by it (cpu_binding.py).
double spin_pause_ns() {
  constexpr int64_t kPauses = 2000;
  double best = 0.0;
  for (int run = 0; run < 5; ++run) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < kPauses; ++i) cpu_relax();
    const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
    best = run == 0 ? ns : std::min(best, ns);
  }
  return best / kPauses;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgl_kernel, m) {
  m.def("spin_pause_ns() -> float", spin_pause_ns);
  m.def("shm_send(Tensor segment, int channel, int slot_bytes, int num_slots, Tensor src, int peer_pid, int spin) -> ()",
        shm_send);
  m.def(
      "shm_recv(Tensor segment, int channel, int slot_bytes, int num_slots, Tensor(a!) dst, int peer_pid, int spin) -> int",
      shm_recv);
  m.def(
      "shm_all_gather(Tensor segment, int offset, int slot_bytes, int rank, int[] pids, Tensor src, Tensor(a!) out, "
      "int spin) -> ()",
      shm_all_gather);
  m.def(
      "shm_all_reduce(Tensor segment, int offset, int slot_bytes, int rank, int[] pids, Tensor(a!) x, int spin) -> ()",
      shm_all_reduce);
}

}  // namespace sgl_kernel
