// bitnet CPU decode engine: a phase's chunks shared by its threads with stealing (torch-free).
//
// Each GEMV phase of a decode step (a projection group, the head) is a range of equal chunks. A static split
// gives thread t the share [total * t / n, total * (t + 1) / n): it streams its rows in order, and the engine
// prefetches the start of its next share while it waits at the barrier. A static split alone loses the whole
// difference between the slowest and the fastest thread at every barrier (270 of them per 2B-4T step), and on a
// shared host one thread is often slower (its core busy with another tenant for a while). So each thread takes
// its own share from the front, a few chunks at a time, and a thread whose share is done takes single chunks
// from the back of the others' shares. Every chunk is computed by exactly one thread, with the same arithmetic
// whichever thread it is: results do not depend on who took what.
//
// One 64-bit word per thread (its own cache line) holds [tag:16 | next:24 | end:24]: the range still to do,
// and the phase it belongs to. The phases of a step are numbered 1, 2, ... in the same order by every thread;
// a word still tagged with an earlier phase holds that phase's (exhausted) range, and whoever touches it first
// in the new phase -- its owner or a thief that got there first -- installs the new phase's static share.
// Barriers separate the phases, so a word is never ahead of the phase a thread is in; and every phase rewrites
// every word (its owner always takes from it), so a stale tag is always the previous phase's and 16 bits of tag
// never alias.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace bitnet_cpu {

class PhaseQueues {
 public:
  //! Most chunks a phase may have (24 bits for next / end).
  static constexpr int64_t kMaxChunks = (int64_t(1) << 24) - 1;

  explicit PhaseQueues(int max_threads)
      : threads_(max_threads), words_(new Word[size_t(max_threads > 0 ? max_threads : 1)]) {}

  int threads() const { return threads_; }

  //! The threads the parallel region really has (at most the constructor's count; set before the first phase).
  void set_threads(int threads) { threads_ = threads; }

  //! Static share of thread t.
  int64_t share_begin(int t, int64_t total) const { return total * t / threads_; }
  int64_t share_end(int t, int64_t total) const { return total * (t + 1) / threads_; }

  //! Thread t's part of phase `phase` (`total` chunks): its own share, `per_take` chunks at a time, then single
  //! chunks of the others' shares. run(c0, c1) computes chunks [c0, c1); before each take of its own share is
  //! computed, prefetch(c, end) is given the first chunk c of the next take and the share's end (c < end).
  template <class Run, class Prefetch>
  void run_phase(int t, uint32_t phase, int64_t total, int64_t per_take, Run&& run, Prefetch&& prefetch) {
    const int64_t end = share_end(t, total);
    int64_t c0, c1;
    while (take_front(t, phase, total, per_take, &c0, &c1)) {
      if (c1 < end) prefetch(c1, end);
      run(c0, c1);
    }
    for (int i = 1; i < threads_; ++i) {
      const int victim = (t + i) % threads_;
      while (take_back(victim, phase, total, &c0)) run(c0, c0 + 1);
    }
  }

  //! Thread t's next chunks [*c0, *c1) (at most n, from the front of its own share); false when none are left.
  bool take_front(int t, uint32_t phase, int64_t total, int64_t n, int64_t* c0, int64_t* c1) {
    std::atomic<uint64_t>& word = words_[size_t(t)].value;
    uint64_t w = current(t, phase, total);
    for (;;) {
      const int64_t next = next_of(w), end = end_of(w);
      if (next >= end) return false;
      const int64_t upto = next + n < end ? next + n : end;
      if (word.compare_exchange_weak(w, pack(phase, upto, end), std::memory_order_acq_rel)) {
        *c0 = next;
        *c1 = upto;
        return true;
      }
    }
  }

  //! One chunk *c0 taken from the back of thread v's share; false when v has none left.
  bool take_back(int v, uint32_t phase, int64_t total, int64_t* c0) {
    std::atomic<uint64_t>& word = words_[size_t(v)].value;
    uint64_t w = current(v, phase, total);
    for (;;) {
      const int64_t next = next_of(w), end = end_of(w);
      if (next >= end) return false;
      if (word.compare_exchange_weak(w, pack(phase, next, end - 1), std::memory_order_acq_rel)) {
        *c0 = end - 1;
        return true;
      }
    }
  }

 private:
  struct alignas(64) Word {
    std::atomic<uint64_t> value{0};  // tag 0: no phase yet
  };

  static uint64_t pack(uint32_t phase, int64_t next, int64_t end) {
    return (uint64_t(phase & 0xFFFF) << 48) | (uint64_t(next) << 24) | uint64_t(end);
  }
  static uint32_t tag_of(uint64_t w) { return uint32_t(w >> 48); }
  static int64_t next_of(uint64_t w) { return int64_t((w >> 24) & 0xFFFFFF); }
  static int64_t end_of(uint64_t w) { return int64_t(w & 0xFFFFFF); }

  //! Thread t's word for `phase`, installing its static share if it still belongs to an earlier phase.
  uint64_t current(int t, uint32_t phase, int64_t total) {
    std::atomic<uint64_t>& word = words_[size_t(t)].value;
    uint64_t w = word.load(std::memory_order_acquire);
    while (tag_of(w) != (phase & 0xFFFF)) {
      const uint64_t fresh = pack(phase, share_begin(t, total), share_end(t, total));
      if (word.compare_exchange_weak(w, fresh, std::memory_order_acq_rel)) return fresh;
    }
    return w;
  }

  int threads_;
  std::unique_ptr<Word[]> words_;
};

}  // namespace bitnet_cpu
