// Greedy replica counts: optimal for the largest per-replica load.
#include <algorithm>
#include <queue>
#include <vector>

#include "core/check.h"
#include "core/eplb/slot_state.h"

namespace moe_ext::core::eplb::detail {

namespace {

struct Candidate {
  double per_replica;
  int32_t count;
  int32_t expert;
};

// "Less urgent" ordering for a max-heap: lower per-replica load, then more
// replicas, then higher id sit below.
struct LessUrgent {
  bool operator()(const Candidate& a, const Candidate& b) const {
    if (a.per_replica != b.per_replica) return a.per_replica < b.per_replica;
    if (a.count != b.count) return a.count > b.count;
    return a.expert > b.expert;
  }
};

}  // namespace

void greedy_replica_counts(const double* load, int64_t num_experts, int64_t num_slots,
                           int32_t* counts, int64_t cap) {
  MOE_INTERNAL_ASSERT(num_slots >= num_experts);
  // More replicas than the GPUs an expert may use put two on one GPU: that
  // GPU then carries 2/c of the expert's load, no better than c/2 replicas.
  // So the cap holds while any expert is below it; only when every expert is
  // at the cap (slots > experts * cap: twins forced by the slot arithmetic)
  // does the greedy go on without it.
  if (cap > 0 && num_experts * cap < num_slots) cap = 0;
  // The greedy takes the `extra` largest keys load[e] / k (k: the replicas
  // e has when it gets one more; k < cap). All keys above t = total / extra
  // are among them (there are fewer than total / t = extra such keys), so
  // they are given at once and the heap hands out the rest.
  const int64_t extra_slots = num_slots - num_experts;
  int64_t given = 0;
  double total = 0.0;
  if (4 * extra_slots >= num_experts) {
    for (int64_t e = 0; e < num_experts; ++e) total += load[e];
  }
  // (Worth a pass only when many slots are extra; with few the heap is small.)
  const double head_start = 4 * extra_slots >= num_experts && total > 0.0
                                ? total / static_cast<double>(extra_slots) : 0.0;
  std::vector<Candidate> heap;
  heap.reserve(static_cast<size_t>(num_experts));
  for (int64_t e = 0; e < num_experts; ++e) {
    int64_t k = 0;  // keys load[e] / j > head_start, j = 1..k (capped)
    if (head_start > 0.0 && load[e] > head_start) {
      k = static_cast<int64_t>(std::min(load[e] / head_start, 1e15));
      if (cap > 0) k = std::min<int64_t>(k, cap - 1);
      while (k > 0 && !(load[e] / static_cast<double>(k) > head_start)) --k;  // as the heap compares
    }
    counts[e] = static_cast<int32_t>(1 + k);
    given += k;
    if (cap <= 0 || counts[e] < cap) heap.push_back({load[e] / counts[e], counts[e], static_cast<int32_t>(e)});
  }
  if (given > extra_slots) {  // rounding gave too many (never seen): the plain greedy
    given = 0;
    heap.clear();
    for (int64_t e = 0; e < num_experts; ++e) {
      counts[e] = 1;
      heap.push_back({load[e], 1, static_cast<int32_t>(e)});
    }
  }
  // Only the `extra` most urgent experts can ever get a further replica: an
  // expert outside them is chosen only once each of them, more urgent at one
  // replica, has had an extra one already (or hit a cap >= 2), which takes
  // `extra` slots. So the heap need not hold the others.
  const int64_t left = extra_slots - given;
  if (left < static_cast<int64_t>(heap.size())) {
    std::nth_element(heap.begin(), heap.begin() + left, heap.end(),
                     [](const Candidate& a, const Candidate& b) { return LessUrgent{}(b, a); });
    heap.resize(static_cast<size_t>(left));
  }
  std::make_heap(heap.begin(), heap.end(), LessUrgent{});
  for (int64_t extra = num_experts + given; extra < num_slots; ++extra) {
    std::pop_heap(heap.begin(), heap.end(), LessUrgent{});
    Candidate& top = heap.back();
    top.count += 1;
    counts[top.expert] = top.count;
    top.per_replica = load[top.expert] / top.count;
    if (cap > 0 && top.count >= cap) {
      heap.pop_back();  // at its cap: never chosen again (sum of caps >= slots)
    } else {
      std::push_heap(heap.begin(), heap.end(), LessUrgent{});
    }
  }
}

}  // namespace moe_ext::core::eplb::detail
