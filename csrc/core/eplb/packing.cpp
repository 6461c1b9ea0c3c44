// Largest-first packing and swap refinement of replicas onto GPUs.
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "core/check.h"
#include "core/eplb/slot_state.h"

namespace moe_ext::core::eplb::detail {

void SlotState::recompute_gpu_loads() {
  gpu_load.assign(static_cast<size_t>(num_gpus), 0.0);
  for (int64_t g = 0; g < num_gpus; ++g) {
    double sum = 0.0;
    for (int64_t s = 0; s < slots_per_gpu; ++s) sum += slot_load[g * slots_per_gpu + s];
    gpu_load[g] = sum;
  }
}

bool SlotState::gpu_holds(int64_t gpu, int32_t expert_id, int64_t except_slot) const {
  const int64_t first = gpu * slots_per_gpu;
  for (int64_t p = first; p < first + slots_per_gpu; ++p) {
    if (p != except_slot && expert[p] == expert_id) return true;
  }
  return false;
}

int64_t SlotState::hottest_gpu() const {
  int64_t best = 0;
  for (int64_t g = 1; g < num_gpus; ++g) {
    if (gpu_load[g] > gpu_load[best]) best = g;
  }
  return best;
}

namespace {

// Heaviest first; a pinned twin before its free copies so it gets first pick.
// The key is the whole item, so equal items are interchangeable and an
// unstable sort gives the same order as a stable one. Items usually come as
// runs (an expert's replicas, equal loads, listed together): the runs are
// sorted, not the items (half the work or less), and the result is checked.
struct HeavierFirst {
  bool operator()(const PackItem& a, const PackItem& b) const {
    if (a.load != b.load) return a.load > b.load;
    if (a.expert != b.expert) return a.expert < b.expert;
    return a.home_node > b.home_node;
  }
};

void sort_heaviest_first(std::vector<PackItem>& items) {
  const HeavierFirst heavier_first;
  const size_t n = items.size();
  std::vector<uint32_t> run_start;
  run_start.reserve(n + 1);
  for (size_t i = 0; i < n; ++i) {
    if (i == 0 || items[i].expert != items[i - 1].expert || items[i].load != items[i - 1].load) {
      run_start.push_back(static_cast<uint32_t>(i));
    }
  }
  run_start.push_back(static_cast<uint32_t>(n));
  const size_t runs = run_start.size() - 1;
  if (runs == 0) return;
  for (size_t r = 0; r < runs; ++r) {  // within a run only the pins differ
    const auto first = items.begin() + run_start[r], last = items.begin() + run_start[r + 1];
    if (last - first > 1 && !std::is_sorted(first, last, heavier_first)) std::sort(first, last, heavier_first);
  }
  // Runs by load, heaviest first: a stable LSD radix sort on the high 32
  // bits of the loads (non-negative doubles order as their bits; a
  // comparison sort of random doubles is mostly branch misses), then an
  // insertion pass, linear on sorted input, settles loads equal in those
  // bits and ties of load exactly (heavier_first is the order).
  std::vector<std::pair<uint32_t, uint32_t>> keys(runs), spare(runs);
  for (size_t r = 0; r < runs; ++r) {
    const double load = items[run_start[r]].load;
    uint64_t bits = 0;
    if (load > 0.0) std::memcpy(&bits, &load, sizeof bits);
    keys[r] = {~static_cast<uint32_t>(bits >> 32), static_cast<uint32_t>(r)};
  }
  for (int shift = 0; shift < 32; shift += 8) {
    uint32_t count[257] = {0};
    for (const auto& key : keys) count[((key.first >> shift) & 0xFFu) + 1] += 1;
    if (count[((keys[0].first >> shift) & 0xFFu) + 1] == runs) continue;  // one digit: nothing to do
    for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
    for (const auto& key : keys) spare[count[(key.first >> shift) & 0xFFu]++] = key;
    keys.swap(spare);
  }
  std::vector<PackItem> sorted(n);
  size_t out = 0;
  for (const auto& key : keys) {
    for (uint32_t i = run_start[key.second]; i < run_start[key.second + 1]; ++i) sorted[out++] = items[i];
  }
  for (size_t i = 1; i < n; ++i) {
    if (!heavier_first(sorted[i], sorted[i - 1])) continue;
    const PackItem moving = sorted[i];
    size_t j = i;
    for (; j > 0 && heavier_first(moving, sorted[j - 1]); --j) sorted[j] = sorted[j - 1];
    sorted[j] = moving;
  }
  items.swap(sorted);
}

// Two slots per GPU, one domain, no pins: largest first puts the k-th
// heaviest item alone on a GPU (k < num_gpus), then each remaining item, in
// order, on the lightest GPU that does not hold its expert, i.e. pairs the
// k-th heaviest with the k-th lightest (the pairing that minimises the
// largest pair) except where that would be a twin. Done here with a queue
// instead of a heap. Returns false (state untouched) when a twin is forced.
bool pair_two_per_gpu(const std::vector<PackItem>& items, int64_t num_gpus, SlotState& state) {
  const int64_t n = 2 * num_gpus;
  std::vector<int64_t> skipped;  // GPUs passed over (lighter than the queue's head)
  int64_t next = num_gpus - 1;   // GPU holding the lightest unpaired heavy item
  state.num_gpus = num_gpus;
  state.slots_per_gpu = 2;
  state.gpus_per_node = num_gpus;
  state.expert.resize(static_cast<size_t>(n));
  state.slot_load.resize(static_cast<size_t>(n));
  state.home_node.assign(static_cast<size_t>(n), -1);
  state.gpu_load.resize(static_cast<size_t>(num_gpus));
  for (int64_t g = 0; g < num_gpus; ++g) {
    state.expert[2 * g] = items[g].expert;
    state.slot_load[2 * g] = items[g].load;
  }
  for (int64_t k = num_gpus; k < n; ++k) {
    const PackItem& item = items[k];
    int64_t gpu = -1;
    for (size_t i = 0; i < skipped.size(); ++i) {
      if (state.expert[2 * skipped[i]] != item.expert) {
        gpu = skipped[i];
        skipped.erase(skipped.begin() + static_cast<std::ptrdiff_t>(i));
        break;
      }
    }
    while (gpu < 0 && next >= 0) {
      if (state.expert[2 * next] != item.expert) {
        gpu = next;
      } else {
        skipped.push_back(next);
      }
      --next;
    }
    if (gpu < 0) return false;
    state.expert[2 * gpu + 1] = item.expert;
    state.slot_load[2 * gpu + 1] = item.load;
  }
  for (int64_t g = 0; g < num_gpus; ++g) state.gpu_load[g] = state.slot_load[2 * g] + state.slot_load[2 * g + 1];
  return true;
}

struct HeapEntry {
  double load;
  int32_t gpu;
  uint32_t version;
};

// Min-heap on (load, gpu) through std::*_heap (which builds max-heaps).
struct LighterFirst {
  bool operator()(const HeapEntry& a, const HeapEntry& b) const {
    if (a.load != b.load) return a.load > b.load;
    return a.gpu > b.gpu;
  }
};

class LargestFirstPacker {
 public:
  LargestFirstPacker(int64_t num_gpus, int64_t slots_per_gpu, int64_t gpus_per_node)
      : num_nodes_(num_gpus / gpus_per_node), heaps_(static_cast<size_t>(num_nodes_)),
        version_(static_cast<size_t>(num_gpus), 0), fill_(static_cast<size_t>(num_gpus), 0),
        free_slots_(static_cast<size_t>(num_nodes_), gpus_per_node * slots_per_gpu),
        pending_pinned_(static_cast<size_t>(num_nodes_), 0) {
    state_.num_gpus = num_gpus;
    state_.slots_per_gpu = slots_per_gpu;
    state_.gpus_per_node = gpus_per_node;
    const size_t slots = static_cast<size_t>(num_gpus * slots_per_gpu);
    state_.expert.assign(slots, -1);
    state_.slot_load.assign(slots, 0.0);
    state_.home_node.assign(slots, -1);
    state_.gpu_load.assign(static_cast<size_t>(num_gpus), 0.0);
    for (int64_t g = 0; g < num_gpus; ++g) {
      heaps_[g / gpus_per_node].push_back({0.0, static_cast<int32_t>(g), 0});
    }
    for (auto& heap : heaps_) std::make_heap(heap.begin(), heap.end(), LighterFirst{});
  }

  SlotState run(std::vector<PackItem>& items) {
    for (const PackItem& item : items) {
      if (item.home_node >= 0) pending_pinned_[item.home_node] += 1;
    }
    sort_heaviest_first(items);
    for (const PackItem& item : items) place(item);
    return std::move(state_);
  }

 private:
  struct Pick {
    int32_t gpu = -1;
    bool twin = false;
  };

  // Lightest GPU of a node with room, preferring one without the expert.
  Pick pick_in_node(int64_t node, int32_t expert) {
    auto& heap = heaps_[node];
    rejected_.clear();
    Pick pick;
    while (!heap.empty()) {
      const HeapEntry top = heap.front();
      const bool stale = top.version != version_[top.gpu] ||
                         fill_[top.gpu] == state_.slots_per_gpu;
      if (!stale && !state_.gpu_holds(top.gpu, expert)) {
        pick.gpu = top.gpu;
        break;
      }
      std::pop_heap(heap.begin(), heap.end(), LighterFirst{});
      heap.pop_back();
      if (!stale) rejected_.push_back(top);
    }
    if (pick.gpu < 0 && !rejected_.empty()) pick = {rejected_.front().gpu, true};
    for (const HeapEntry& entry : rejected_) {
      heap.push_back(entry);
      std::push_heap(heap.begin(), heap.end(), LighterFirst{});
    }
    return pick;
  }

  void place(const PackItem& item) {
    Pick best;
    if (item.home_node >= 0) {
      best = pick_in_node(item.home_node, item.expert);
    } else {
      for (int64_t node = 0; node < num_nodes_; ++node) {
        if (free_slots_[node] <= pending_pinned_[node]) continue;  // reserved for pinned items
        const Pick pick = pick_in_node(node, item.expert);
        if (pick.gpu < 0) continue;
        if (best.gpu < 0 || (best.twin && !pick.twin) ||
            (best.twin == pick.twin && state_.gpu_load[pick.gpu] < state_.gpu_load[best.gpu])) {
          best = pick;
        }
      }
    }
    MOE_INTERNAL_ASSERT(best.gpu >= 0, "no GPU with a free slot for expert ", item.expert);
    const int64_t gpu = best.gpu;
    const int64_t slot = gpu * state_.slots_per_gpu + fill_[gpu];
    state_.expert[slot] = item.expert;
    state_.slot_load[slot] = item.load;
    state_.home_node[slot] = item.home_node;
    state_.gpu_load[gpu] += item.load;
    fill_[gpu] += 1;
    version_[gpu] += 1;
    const int64_t node = gpu / state_.gpus_per_node;
    free_slots_[node] -= 1;
    if (item.home_node >= 0) pending_pinned_[item.home_node] -= 1;
    if (fill_[gpu] < state_.slots_per_gpu) {
      auto& heap = heaps_[node];
      heap.push_back({state_.gpu_load[gpu], static_cast<int32_t>(gpu), version_[gpu]});
      std::push_heap(heap.begin(), heap.end(), LighterFirst{});
    }
  }

  int64_t num_nodes_;
  SlotState state_;
  std::vector<std::vector<HeapEntry>> heaps_;
  std::vector<uint32_t> version_;
  std::vector<int64_t> fill_;
  std::vector<int64_t> free_slots_;
  std::vector<int64_t> pending_pinned_;
  std::vector<HeapEntry> rejected_;
};

}  // namespace

SlotState pack_largest_first(std::vector<PackItem> items, int64_t num_gpus, int64_t slots_per_gpu,
                             int64_t gpus_per_node) {
  MOE_INTERNAL_ASSERT(static_cast<int64_t>(items.size()) == num_gpus * slots_per_gpu);
  if (slots_per_gpu == 2 && gpus_per_node == num_gpus) {
    bool pinned = false;
    for (const PackItem& item : items) pinned = pinned || item.home_node >= 0;
    if (!pinned) {
      sort_heaviest_first(items);
      SlotState state;
      if (pair_two_per_gpu(items, num_gpus, state)) return state;
    }
  }
  LargestFirstPacker packer(num_gpus, slots_per_gpu, gpus_per_node);
  return packer.run(items);
}

int64_t repair_twins(SlotState& state) {
  const int64_t per_gpu = state.slots_per_gpu, num_gpus = state.num_gpus;
  const int64_t num_slots = per_gpu * num_gpus;
  auto node_of = [&](int64_t gpu) { return static_cast<int32_t>(gpu / state.gpus_per_node); };
  // A slot whose expert also sits in an earlier slot of its GPU, from `from` on.
  auto next_twin = [&](int64_t from) -> int64_t {
    for (int64_t p = from; p < num_slots; ++p) {
      const int64_t first = (p / per_gpu) * per_gpu;
      for (int64_t q = first; q < p; ++q) {
        if (state.expert[q] == state.expert[p]) return p;
      }
    }
    return -1;
  };
  int64_t left = 0;
  for (int64_t p = next_twin(0); p >= 0; p = next_twin(p + 1)) {
    const int64_t gpu = p / per_gpu;
    const int32_t a = state.expert[p];
    int64_t best_q = -1;
    double best_peak = 0.0;
    for (int64_t other = 0; other < num_gpus; ++other) {
      if (other == gpu || state.gpu_holds(other, a)) continue;
      if (state.home_node[p] >= 0 && node_of(other) != state.home_node[p]) continue;
      for (int64_t q = other * per_gpu; q < (other + 1) * per_gpu; ++q) {
        const int32_t b = state.expert[q];
        if (state.gpu_holds(gpu, b)) continue;
        if (state.home_node[q] >= 0 && node_of(gpu) != state.home_node[q]) continue;
        const double delta = state.slot_load[p] - state.slot_load[q];
        const double peak = std::max(state.gpu_load[gpu] - delta, state.gpu_load[other] + delta);
        if (best_q < 0 || peak < best_peak) {
          best_q = q;
          best_peak = peak;
        }
      }
    }
    if (best_q < 0) {
      ++left;
      continue;
    }
    const double delta = state.slot_load[p] - state.slot_load[best_q];
    std::swap(state.expert[p], state.expert[best_q]);
    std::swap(state.slot_load[p], state.slot_load[best_q]);
    std::swap(state.home_node[p], state.home_node[best_q]);
    state.gpu_load[gpu] -= delta;
    state.gpu_load[best_q / per_gpu] += delta;
    p -= 1;  // the slot now holds another expert: look at it again
  }
  return left;
}

SlotState pack_round_robin(const double* load, const std::vector<int32_t>& counts,
                           const std::vector<int32_t>& home, int64_t num_gpus,
                           int64_t slots_per_gpu, int64_t gpus_per_node) {
  SlotState state;
  state.num_gpus = num_gpus;
  state.slots_per_gpu = slots_per_gpu;
  state.gpus_per_node = gpus_per_node;
  const int64_t num_slots = num_gpus * slots_per_gpu;
  state.expert.assign(static_cast<size_t>(num_slots), -1);
  state.slot_load.assign(static_cast<size_t>(num_slots), 0.0);
  state.home_node.assign(static_cast<size_t>(num_slots), -1);
  const int64_t num_experts = static_cast<int64_t>(counts.size());
  const int64_t num_domains = home.empty() ? 1 : num_gpus / gpus_per_node;
  const int64_t gpus_per_domain = num_gpus / num_domains;
  std::vector<int32_t> order(static_cast<size_t>(num_experts));
  std::vector<int64_t> fill(static_cast<size_t>(num_gpus), 0);
  for (int64_t domain = 0; domain < num_domains; ++domain) {
    order.clear();
    for (int64_t e = 0; e < num_experts; ++e) {
      if (home.empty() || home[e] == domain) order.push_back(static_cast<int32_t>(e));
    }
    std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) {
      return load[x] / counts[x] > load[y] / counts[y];
    });
    int64_t next = 0;
    for (int32_t e : order) {
      for (int32_t r = 0; r < counts[e]; ++r, ++next) {
        const int64_t gpu = domain * gpus_per_domain + next % gpus_per_domain;
        MOE_INTERNAL_ASSERT(fill[gpu] < slots_per_gpu, "round-robin overflow on GPU ", gpu);
        const int64_t slot = gpu * slots_per_gpu + fill[gpu]++;
        state.expert[slot] = e;
        state.slot_load[slot] = load[e] / counts[e];
        state.home_node[slot] = home.empty() ? -1 : home[e];
      }
    }
  }
  state.recompute_gpu_loads();
  return state;
}

int64_t count_moves(const SlotState& state, const int64_t* current) {
  if (current == nullptr) return 0;
  int64_t moves = 0;
  for (size_t p = 0; p < state.expert.size(); ++p) moves += state.expert[p] != current[p];
  return moves;
}

int64_t count_same_gpu_duplicates(const SlotState& state) {
  int64_t duplicates = 0;
  for (int64_t g = 0; g < state.num_gpus; ++g) {
    const int64_t first = g * state.slots_per_gpu;
    for (int64_t p = first + 1; p < first + state.slots_per_gpu; ++p) {
      for (int64_t q = first; q < p; ++q) {
        if (state.expert[q] == state.expert[p]) {
          ++duplicates;
          break;
        }
      }
    }
  }
  return duplicates;
}

int64_t refine_by_swaps(SlotState& state, double stop_load, const int64_t* current,
                        int64_t move_budget, int64_t* moves, int64_t max_iterations,
                        int64_t* peak_moves) {
  const int64_t num_gpus = state.num_gpus;
  const int64_t per_gpu = state.slots_per_gpu;
  if (num_gpus < 2) return 0;
  double scale = 0.0;
  for (double load : state.gpu_load) scale = std::max(scale, load);
  const double eps = 1e-12 * std::max(scale, 1e-300);
  std::vector<int32_t> node_of(static_cast<size_t>(num_gpus));
  for (int64_t g = 0; g < num_gpus; ++g) node_of[g] = static_cast<int32_t>(g / state.gpus_per_node);
  auto changed = [&](int64_t slot, int32_t expert) -> int64_t {
    return current != nullptr && current[slot] != expert ? 1 : 0;
  };
  auto lighter = [&](int32_t x, int32_t y) {
    return state.gpu_load[x] != state.gpu_load[y] ? state.gpu_load[x] < state.gpu_load[y] : x < y;
  };

  // Without current every swap costs nothing, so GPUs are visited lightest
  // first and the scan stops once no lighter partner can beat the best peak
  // found (a swap with `other` never ends below (hot + other) / 2). The
  // order is kept sorted across iterations (a swap changes two GPUs), and a
  // replica pinned to the hot GPU's node scans only that node's GPUs.
  std::vector<int32_t> by_load(static_cast<size_t>(num_gpus)), in_node;
  for (int64_t g = 0; g < num_gpus; ++g) by_load[g] = static_cast<int32_t>(g);
  // Lightest first only without current (the break below needs the order;
  // with current the swaps are ranked by cost first, and keeping the order
  // sorted would cost more than it saves).
  const bool ordered = current == nullptr;
  if (ordered) std::sort(by_load.begin(), by_load.end(), lighter);
  // With current: slots per GPU that differ from it. A swap between two
  // slots that both hold their current expert costs 2 (the most); past the
  // point where no lighter partner can lower the peak, only swaps that cost
  // less than the best found can still win, and those need a changed slot.
  std::vector<int32_t> changed_on(current != nullptr ? static_cast<size_t>(num_gpus) : 0, 0);
  auto count_changed = [&](int64_t g) {
    int32_t n = 0;
    for (int64_t q = g * per_gpu; q < (g + 1) * per_gpu; ++q) n += state.expert[q] != current[q];
    changed_on[g] = n;
  };
  if (current != nullptr) {
    for (int64_t g = 0; g < num_gpus; ++g) count_changed(g);
  }
  in_node.reserve(static_cast<size_t>(num_gpus));
  // Lightest replica of every GPU: a GPU whose lightest replica is not
  // lighter than the hot replica offers no swap for it.
  std::vector<double> lightest(static_cast<size_t>(num_gpus));
  auto update_lightest = [&](int64_t g) {
    double low = state.slot_load[g * per_gpu];
    for (int64_t q = g * per_gpu + 1; q < (g + 1) * per_gpu; ++q) low = std::min(low, state.slot_load[q]);
    lightest[g] = low;
  };
  for (int64_t g = 0; g < num_gpus; ++g) update_lightest(g);
  int64_t swaps = 0;
  for (int64_t iteration = 0; iteration < max_iterations; ++iteration) {
    const int64_t hot = state.hottest_gpu();
    const double hot_load = state.gpu_load[hot];
    if (hot_load <= stop_load) return swaps;
    const int32_t hot_node = node_of[hot];
    in_node.clear();
    for (int32_t g : by_load) {
      if (node_of[g] == hot_node) in_node.push_back(g);
    }
    int64_t best_cost = std::numeric_limits<int64_t>::max();
    double best_peak = hot_load - eps;
    int64_t best_p = -1, best_q = -1;
    double heaviest_hot = 0.0;  // heaviest replica on the hot GPU
    bool all_pinned_home = true;
    for (int64_t p = hot * per_gpu; p < (hot + 1) * per_gpu; ++p) {
      heaviest_hot = std::max(heaviest_hot, state.slot_load[p]);
      all_pinned_home = all_pinned_home && state.home_node[p] == hot_node;
    }
    // Partners lightest first (the bound below only holds in that order),
    // every replica of the hot GPU against each: a good swap with a light
    // GPU found first cuts the scan of the heavier ones short.
    const std::vector<int32_t>& partners = all_pinned_home ? in_node : by_load;
    for (const int32_t other : partners) {
      const double other_load = state.gpu_load[other];
      const double gap = hot_load - other_load;
      const bool past_peak = ordered && 0.5 * (hot_load + other_load) >= best_peak - eps;
      if (past_peak) break;
      if (other == hot || gap <= eps || lightest[other] >= heaviest_hot - eps) continue;
      const int32_t other_node = node_of[other];
      for (int64_t p = hot * per_gpu; p < (hot + 1) * per_gpu; ++p) {
        const int32_t a = state.expert[p];
        const double load_a = state.slot_load[p];
        const int32_t home_a = state.home_node[p];
        // A swap with `other` leaves the hot GPU at >= hot - (load_a - its lightest replica).
        const bool peak_bound = hot_load - load_a + lightest[other] >= best_peak - eps;
        if (lightest[other] >= load_a - eps || (peak_bound && current == nullptr)) continue;
        // With p and every slot of `other` unchanged each swap costs 2 (the
        // most): it loses to a cheaper best, and to an equal one past the
        // peak bound.
        if (current != nullptr && state.expert[p] == current[p] && changed_on[other] == 0 &&
            (best_cost < 2 || (best_cost == 2 && peak_bound))) {
          continue;
        }
        if (home_a >= 0 && other_node != home_a) continue;
        if (state.gpu_holds(other, a)) continue;
        for (int64_t q = other * per_gpu; q < (other + 1) * per_gpu; ++q) {
          const double delta = load_a - state.slot_load[q];
          if (delta <= eps || delta >= gap - eps) continue;
          const int32_t b = state.expert[q];
          const int32_t home_b = state.home_node[q];
          if (home_b >= 0 && hot_node != home_b) continue;
          if (state.gpu_holds(hot, b, p)) continue;
          const int64_t cost = changed(p, b) + changed(q, a) - changed(p, a) - changed(q, b);
          if (*moves + cost > move_budget) continue;
          const double peak = std::max(hot_load - delta, other_load + delta);
          if (cost < best_cost || (cost == best_cost && peak < best_peak - eps)) {
            best_cost = cost;
            best_peak = peak;
            best_p = p;
            best_q = q;
          }
        }
      }
    }
    if (best_p < 0) return swaps;
    const double delta = state.slot_load[best_p] - state.slot_load[best_q];
    const int64_t partner = best_q / per_gpu;
    std::swap(state.expert[best_p], state.expert[best_q]);
    std::swap(state.slot_load[best_p], state.slot_load[best_q]);
    std::swap(state.home_node[best_p], state.home_node[best_q]);
    state.gpu_load[hot] -= delta;
    state.gpu_load[partner] += delta;
    *moves += best_cost;
    if (peak_moves != nullptr) *peak_moves = std::max(*peak_moves, *moves);
    ++swaps;
    update_lightest(hot);
    update_lightest(partner);
    if (current != nullptr) {
      count_changed(hot);
      count_changed(partner);
    }
    if (ordered) {  // re-sort: only two GPUs moved (insertion passes are linear)
      for (int pass = 0; pass < 2; ++pass) {
        for (int64_t i = 1; i < num_gpus; ++i) {
          for (int64_t j = i; j > 0 && lighter(by_load[j], by_load[j - 1]); --j) {
            std::swap(by_load[j], by_load[j - 1]);
          }
        }
      }
    }
  }
  return swaps;
}

}  // namespace moe_ext::core::eplb::detail
