// One layer of the placement planner: from scratch, and from a current map.
#include "core/eplb/layer_planner.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include "core/check.h"

namespace moe_ext::core::eplb::detail {

namespace {

double total_of(const double* load, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += load[i];
  return sum;
}

int64_t iteration_cap(const LayerGeometry& geometry) { return 4 * geometry.num_replicas + 64; }

// The relaxed alternative of a strict layer is only reported: it is planned
// to within this factor of the global bound (the last 0.1% costs about as
// much swap search as all the rest; measured on the benchmark traces).
constexpr double kReportTolerance = 1e-3;

// Most repair runs per layer when planning from a current map under a move
// budget (see plan_layer_from_current).
constexpr int64_t kMaxRepairRuns = 24;

// Largest load one GPU must carry for expert e with c replicas spread over at
// most cap GPUs (ceil(c / cap) copies on some GPU; cap <= 0: no limit).
double per_gpu_share(double load, int32_t count, int64_t cap) {
  const int64_t copies = cap > 0 ? (count + cap - 1) / cap : 1;
  return load * static_cast<double>(copies) / static_cast<double>(count);
}

// max(1, largest per-GPU share of an expert / mean GPU load) for counts that
// minimise it (greedy with the cap): no placement of the layer does better.
double lower_bound_of(const LayerGeometry& geometry, const double* load,
                      const std::vector<int32_t>& optimal_counts, int64_t cap) {
  const double total = total_of(load, geometry.num_logical);
  if (!(total > 0.0)) return 1.0;
  double largest = 0.0;
  for (int64_t e = 0; e < geometry.num_logical; ++e) {
    largest = std::max(largest, per_gpu_share(load[e], optimal_counts[e], cap));
  }
  return std::max(1.0, largest / (total / static_cast<double>(geometry.num_gpus)));
}

// Strict hierarchy, for one group-to-node assignment (home) and node-local
// counts (greedy within each node, capped at its GPUs): no node-confined
// placement does better than max over nodes of (node load / its GPUs, the
// largest per-GPU share of one of its experts), over the mean GPU load.
double strict_bound_of(const LayerGeometry& geometry, const double* load,
                       const std::vector<int32_t>& home, const std::vector<int32_t>& node_counts) {
  const double total = total_of(load, geometry.num_logical);
  if (!(total > 0.0)) return 1.0;
  std::vector<double> node_load(static_cast<size_t>(geometry.num_nodes), 0.0);
  double largest = 0.0;
  for (int64_t e = 0; e < geometry.num_logical; ++e) {
    node_load[home[e]] += load[e];
    largest = std::max(largest, per_gpu_share(load[e], node_counts[e], geometry.gpus_per_node));
  }
  for (double node : node_load) {
    largest = std::max(largest, node / static_cast<double>(geometry.gpus_per_node));
  }
  return std::max(1.0, largest / (total / static_cast<double>(geometry.num_gpus)));
}

// Hierarchical planning from a current map: each group lives on the node that
// holds most of its replicas now (each node keeps groups_per_node groups).
std::vector<int32_t> node_of_group_from_current(const LayerGeometry& geometry,
                                                const int64_t* current) {
  const int64_t num_groups = geometry.num_groups;
  const int64_t num_nodes = geometry.num_nodes;
  const int64_t slots_per_node = geometry.gpus_per_node * geometry.slots_per_gpu;
  std::vector<int64_t> overlap(static_cast<size_t>(num_groups * num_nodes), 0);
  for (int64_t p = 0; p < geometry.num_replicas; ++p) {
    overlap[(current[p] / geometry.group_size) * num_nodes + p / slots_per_node] += 1;
  }
  std::vector<std::tuple<int64_t, int64_t, int64_t>> pairs;
  for (int64_t g = 0; g < num_groups; ++g) {
    for (int64_t n = 0; n < num_nodes; ++n) pairs.emplace_back(-overlap[g * num_nodes + n], g, n);
  }
  std::sort(pairs.begin(), pairs.end());
  const int64_t groups_per_node = num_groups / num_nodes;
  std::vector<int32_t> node_of_group(static_cast<size_t>(num_groups), -1);
  std::vector<int64_t> taken(static_cast<size_t>(num_nodes), 0);
  for (const auto& [negative_overlap, g, n] : pairs) {
    if (node_of_group[g] < 0 && taken[n] < groups_per_node) {
      node_of_group[g] = static_cast<int32_t>(n);
      taken[n] += 1;
    }
  }
  return node_of_group;
}

// Replicas outside their group's node, for the group-to-node assignment that
// keeps most replicas home (0 exactly when the plan keeps the hierarchy).
int64_t strict_violations(const LayerGeometry& geometry, const int32_t* slot_expert) {
  if (!geometry.hierarchical || geometry.num_nodes <= 1) return 0;
  std::vector<int64_t> map(slot_expert, slot_expert + geometry.num_replicas);
  const std::vector<int32_t> node_of_group = node_of_group_from_current(geometry, map.data());
  const int64_t slots_per_node = geometry.gpus_per_node * geometry.slots_per_gpu;
  int64_t outside = 0;
  for (int64_t p = 0; p < geometry.num_replicas; ++p) {
    outside += node_of_group[slot_expert[p] / geometry.group_size] != p / slots_per_node;
  }
  return outside;
}

// Summarise a slot map as a LayerPlan (bounds filled by the caller).
LayerPlan finish(const LayerGeometry& geometry, const double* load,
                 const std::vector<int32_t>& slot_expert, const int64_t* current) {
  LayerPlan plan;
  plan.slot_expert = slot_expert;
  std::vector<int64_t> phy2log(plan.slot_expert.begin(), plan.slot_expert.end());
  plan.imbalance = placement_imbalance(load, phy2log.data(), geometry.num_logical,
                                       geometry.num_replicas, geometry.num_gpus);
  plan.relaxed_imbalance = plan.imbalance;
  SlotState view;
  view.num_gpus = geometry.num_gpus;
  view.slots_per_gpu = geometry.slots_per_gpu;
  view.expert = plan.slot_expert;
  plan.moves = count_moves(view, current);
  plan.duplicates = count_same_gpu_duplicates(view);
  plan.cross_node = strict_violations(geometry, plan.slot_expert.data());
  plan.relaxed = plan.cross_node > 0;
  return plan;
}

// Balanced assignment of groups to nodes (groups_per_node each): largest
// first, then swaps while the hottest node improves.
std::vector<int32_t> assign_groups_to_nodes(const LayerGeometry& geometry, const double* load) {
  const int64_t groups_per_node = geometry.num_groups / geometry.num_nodes;
  std::vector<PackItem> items;
  double total = 0.0;
  for (int64_t g = 0; g < geometry.num_groups; ++g) {
    const double group_load = total_of(load + g * geometry.group_size, geometry.group_size);
    total += group_load;
    items.push_back({static_cast<int32_t>(g), group_load, -1});
  }
  SlotState nodes =
      pack_largest_first(std::move(items), geometry.num_nodes, groups_per_node, geometry.num_nodes);
  int64_t unused_moves = 0;
  refine_by_swaps(nodes, total / geometry.num_nodes, nullptr, 0, &unused_moves,
                  4 * geometry.num_groups + 16);
  std::vector<int32_t> node_of_group(static_cast<size_t>(geometry.num_groups));
  for (int64_t slot = 0; slot < geometry.num_groups; ++slot) {
    node_of_group[nodes.expert[slot]] = static_cast<int32_t>(slot / groups_per_node);
  }
  return node_of_group;
}

std::vector<int32_t> expert_home_of(const LayerGeometry& geometry,
                                    const std::vector<int32_t>& node_of_group) {
  std::vector<int32_t> home(static_cast<size_t>(geometry.num_logical));
  for (int64_t e = 0; e < geometry.num_logical; ++e) home[e] = node_of_group[e / geometry.group_size];
  return home;
}

int64_t count_move_cap(const LayerGeometry& geometry) { return geometry.num_logical; }

double peak_of(const SlotState& state) { return state.gpu_load[state.hottest_gpu()]; }

// Pack, refine by swaps, then re-pair: change replica counts where that lowers
// the peak on the packed state, pack the new counts afresh (largest first is
// the optimal pairing with 2 slots per GPU) and keep it when its peak is lower.
// items_for(counts) builds the items (with their pins) of a count vector.
// Twins left by the packing are swapped away; when that fails although every
// count fits its domain (round_robin_home given: {} = one domain, else the
// node of each expert, all replicas pinned), the twin-free round-robin
// packing replaces it and the swaps balance that.
template <typename ItemsFor>
SlotState pack_and_refine(const LayerGeometry& geometry, const double* load,
                          const std::vector<int32_t>& counts, const ItemsFor& items_for,
                          int64_t gpus_per_domain, double stop_load, bool change_counts,
                          const std::vector<int32_t>* round_robin_home, int64_t max_swaps) {
  auto pack = [&](const std::vector<int32_t>& replica_counts, bool refine) {
    SlotState state = pack_largest_first(items_for(replica_counts), geometry.num_gpus,
                                         geometry.slots_per_gpu, gpus_per_domain);
    state.gpus_per_node = geometry.gpus_per_node;  // pins always refer to real nodes
    if (count_same_gpu_duplicates(state) > 0 && repair_twins(state) > 0 &&
        round_robin_home != nullptr &&
        *std::max_element(replica_counts.begin(), replica_counts.end()) <= gpus_per_domain) {
      state = pack_round_robin(load, replica_counts, *round_robin_home, geometry.num_gpus,
                               geometry.slots_per_gpu, geometry.gpus_per_node);
      refine = true;
    }
    int64_t unused_moves = 0;
    if (refine) refine_by_swaps(state, stop_load, nullptr, 0, &unused_moves, max_swaps);
    return state;
  };
  SlotState best = pack(counts, true);
  std::vector<int32_t> new_counts(static_cast<size_t>(geometry.num_logical));
  for (int round = 0; change_counts && round < 8 && peak_of(best) > stop_load; ++round) {
    SlotState trial = best;
    int64_t unused_moves = 0;
    if (refine_by_count_moves(trial, load, geometry.num_logical, nullptr, stop_load, nullptr, 0,
                              &unused_moves, count_move_cap(geometry)) == 0) {
      break;
    }
    std::fill(new_counts.begin(), new_counts.end(), 0);
    for (int32_t e : trial.expert) new_counts[e] += 1;
    // With 2 slots per GPU largest-first is already the optimal pairing and
    // the swap scan (the costly part) rarely finds anything.
    SlotState repacked = pack(new_counts, geometry.slots_per_gpu > 2);
    const double trial_peak = peak_of(trial), repacked_peak = peak_of(repacked);
    SlotState& winner = repacked_peak <= trial_peak ? repacked : trial;
    if (!(peak_of(winner) < peak_of(best) * (1.0 - 1e-12))) break;
    best = std::move(winner);
  }
  return best;
}

// Greedy matching of "new" bins to "old" bins by overlap (largest first, ties
// by index), then leftovers in index order. pairs: (-overlap, new, old) for
// every pair that shares something (each pair once).
std::vector<int64_t> match_by_overlap(std::vector<std::tuple<int64_t, int64_t, int64_t>>& pairs,
                                      int64_t count) {
  std::sort(pairs.begin(), pairs.end());
  std::vector<int64_t> old_of_new(static_cast<size_t>(count), -1);
  std::vector<char> old_taken(static_cast<size_t>(count), 0);
  for (const auto& [negative_overlap, a, b] : pairs) {
    if (old_of_new[a] < 0 && !old_taken[b]) {
      old_of_new[a] = b;
      old_taken[b] = 1;
    }
  }
  int64_t next_old = 0;
  for (int64_t a = 0; a < count; ++a) {
    if (old_of_new[a] >= 0) continue;
    while (old_taken[next_old]) ++next_old;
    old_of_new[a] = next_old;
    old_taken[next_old] = 1;
  }
  return old_of_new;
}

// Relabel a plan's nodes and GPUs (which changes no load) so that it keeps as
// many of the current slots as the greedy matching finds.
std::vector<int32_t> relabel_onto_current(const LayerGeometry& geometry,
                                          const std::vector<int32_t>& plan,
                                          const int64_t* current) {
  const int64_t per_gpu = geometry.slots_per_gpu;
  const int64_t num_experts = geometry.num_logical;
  const int64_t num_nodes = geometry.hierarchical ? geometry.num_nodes : 1;
  const int64_t gpus_per_domain = geometry.num_gpus / num_nodes;
  const int64_t slots_per_domain = gpus_per_domain * per_gpu;

  std::vector<int64_t> old_node_of_new(static_cast<size_t>(num_nodes), 0);
  if (num_nodes > 1) {
    std::vector<int32_t> new_count(static_cast<size_t>(num_nodes * num_experts), 0);
    std::vector<int32_t> old_count(static_cast<size_t>(num_nodes * num_experts), 0);
    for (int64_t p = 0; p < geometry.num_replicas; ++p) {
      new_count[(p / slots_per_domain) * num_experts + plan[p]] += 1;
      old_count[(p / slots_per_domain) * num_experts + current[p]] += 1;
    }
    std::vector<std::tuple<int64_t, int64_t, int64_t>> pairs;
    for (int64_t a = 0; a < num_nodes; ++a) {
      for (int64_t b = 0; b < num_nodes; ++b) {
        int64_t shared = 0;
        for (int64_t e = 0; e < num_experts; ++e) {
          shared += std::min(new_count[a * num_experts + e], old_count[b * num_experts + e]);
        }
        if (shared > 0) pairs.emplace_back(-shared, a, b);
      }
    }
    old_node_of_new = match_by_overlap(pairs, num_nodes);
  }

  std::vector<int32_t> result(plan.size(), -1);
  std::vector<int32_t> remaining, first_of, holder, fill;
  std::vector<std::tuple<int64_t, int64_t, int64_t>> pairs;
  std::vector<std::pair<int32_t, int64_t>> shared_with;
  for (int64_t new_node = 0; new_node < num_nodes; ++new_node) {
    const int64_t old_node = old_node_of_new[new_node];
    // Slots shared by new GPU a and old GPU b (as multisets of experts),
    // for the pairs that share any: through the old GPUs holding each expert.
    first_of.assign(static_cast<size_t>(num_experts + 1), 0);
    for (int64_t j = 0; j < slots_per_domain; ++j) first_of[current[old_node * slots_per_domain + j] + 1] += 1;
    for (int64_t e = 0; e < num_experts; ++e) first_of[e + 1] += first_of[e];
    holder.assign(static_cast<size_t>(slots_per_domain), 0);
    fill.assign(first_of.begin(), first_of.end() - 1);
    for (int64_t j = 0; j < slots_per_domain; ++j) {
      holder[fill[current[old_node * slots_per_domain + j]]++] = static_cast<int32_t>(j / per_gpu);
    }
    pairs.clear();
    for (int64_t a = 0; a < gpus_per_domain; ++a) {
      const int32_t* new_slots = plan.data() + (new_node * gpus_per_domain + a) * per_gpu;
      shared_with.clear();
      for (int64_t i = 0; i < per_gpu; ++i) {
        const int32_t e = new_slots[i];
        bool seen = false;  // each expert of this GPU once, with its multiplicity
        for (int64_t k = 0; k < i && !seen; ++k) seen = new_slots[k] == e;
        if (seen) continue;
        int64_t copies = 0;
        for (int64_t k = i; k < per_gpu; ++k) copies += new_slots[k] == e;
        for (int32_t h = first_of[e]; h < first_of[e + 1]; ++h) {
          const int32_t b = holder[h];
          if (h > first_of[e] && holder[h - 1] == b) continue;  // b counted once per expert
          int64_t old_copies = 0;
          for (int32_t k = h; k < first_of[e + 1] && holder[k] == b; ++k) ++old_copies;
          const int64_t shared = std::min(copies, old_copies);
          auto it = std::find_if(shared_with.begin(), shared_with.end(),
                                 [&](const std::pair<int32_t, int64_t>& x) { return x.first == b; });
          if (it == shared_with.end()) shared_with.emplace_back(b, shared); else it->second += shared;
        }
      }
      for (const auto& [b, shared] : shared_with) pairs.emplace_back(-shared, a, b);
    }
    const std::vector<int64_t> old_gpu_of_new = match_by_overlap(pairs, gpus_per_domain);
    for (int64_t a = 0; a < gpus_per_domain; ++a) {
      const int64_t new_first = (new_node * gpus_per_domain + a) * per_gpu;
      const int64_t old_first = (old_node * gpus_per_domain + old_gpu_of_new[a]) * per_gpu;
      remaining.assign(plan.begin() + new_first, plan.begin() + new_first + per_gpu);
      for (int64_t j = 0; j < per_gpu; ++j) {  // keep experts already in their slot
        auto it = std::find(remaining.begin(), remaining.end(), current[old_first + j]);
        if (it != remaining.end()) {
          result[old_first + j] = *it;
          remaining.erase(it);
        }
      }
      size_t next = 0;
      for (int64_t j = 0; j < per_gpu; ++j) {
        if (result[old_first + j] < 0) result[old_first + j] = remaining[next++];
      }
    }
  }
  return result;
}

// Walk a plan back toward the current map: revert single slots to the expert
// they hold now (slot order, repeated until nothing changes) whenever the
// layer stays at or below limit_imbalance, every expert keeps a replica and no
// GPU gains a twin (strict hierarchy: and no expert gets a replica outside
// the node that holds its replicas in the plan). Used on the relabelled from-scratch plan, where most slots
// changed only because the from-scratch packing knows nothing of current.
void revert_toward_current(const LayerGeometry& geometry, const double* load,
                           std::vector<int32_t>& plan, const int64_t* current,
                           double limit_imbalance, bool keep_experts_in_their_node) {
  const int64_t num_slots = geometry.num_replicas, per_gpu = geometry.slots_per_gpu;
  const double total = total_of(load, geometry.num_logical);
  if (!(total > 0.0)) return;
  const double limit_load = limit_imbalance * total / static_cast<double>(geometry.num_gpus);
  std::vector<int32_t> counts(static_cast<size_t>(geometry.num_logical), 0);
  for (int32_t e : plan) counts[e] += 1;
  const int64_t slots_per_node = per_gpu * geometry.gpus_per_node;
  std::vector<int64_t> node_of_expert;
  if (keep_experts_in_their_node) {
    node_of_expert.assign(static_cast<size_t>(geometry.num_logical), -1);
    for (int64_t p = 0; p < num_slots; ++p) node_of_expert[plan[p]] = p / slots_per_node;
  }
  std::vector<double> gpu_load(static_cast<size_t>(geometry.num_gpus), 0.0);
  auto recompute = [&]() {
    std::fill(gpu_load.begin(), gpu_load.end(), 0.0);
    for (int64_t p = 0; p < num_slots; ++p) gpu_load[p / per_gpu] += load[plan[p]] / counts[plan[p]];
  };
  auto holds = [&](int64_t gpu, int32_t expert, int64_t except_slot) {
    for (int64_t q = gpu * per_gpu; q < (gpu + 1) * per_gpu; ++q) {
      if (q != except_slot && plan[q] == expert) return true;
    }
    return false;
  };
  recompute();
  // Slots of every expert in the plan (kept current through the swaps below).
  std::vector<std::vector<int32_t>> slots_of(static_cast<size_t>(geometry.num_logical));
  for (int64_t p = 0; p < num_slots; ++p) slots_of[plan[p]].push_back(static_cast<int32_t>(p));
  auto move_slot = [&](int32_t from_expert, int32_t to_expert, int64_t slot) {
    auto& from = slots_of[from_expert];
    from.erase(std::find(from.begin(), from.end(), static_cast<int32_t>(slot)));
    auto& to = slots_of[to_expert];
    to.insert(std::lower_bound(to.begin(), to.end(), static_cast<int32_t>(slot)),
              static_cast<int32_t>(slot));
  };
  std::vector<double> delta(static_cast<size_t>(geometry.num_gpus), 0.0);
  std::vector<char> touched_mark(static_cast<size_t>(geometry.num_gpus), 0);
  std::vector<int64_t> touched;
  bool changed = true;
  for (int pass = 0; changed && pass < 4; ++pass) {
    changed = false;
    for (int64_t p = 0; p < num_slots; ++p) {
      const int32_t now = plan[p], before = static_cast<int32_t>(current[p]);
      if (now == before) continue;
      const int64_t gpu = p / per_gpu;
      if (!node_of_expert.empty() && node_of_expert[before] != p / slots_per_node) continue;
      // (a) Swap with a changed slot q that holds `before` in the plan: no
      // replica count changes, only the two GPUs' loads.
      bool done = false;
      for (const int32_t q : slots_of[before]) {  // ascending, as a scan of all slots
        if (plan[q] == current[q]) continue;
        const int64_t other = q / per_gpu;
        if (other != gpu && (holds(gpu, before, p) || holds(other, now, q))) continue;
        if (!node_of_expert.empty() && node_of_expert[now] != q / slots_per_node) continue;
        const double delta = load[before] / counts[before] - load[now] / counts[now];
        if (other != gpu && std::max(gpu_load[gpu] + delta, gpu_load[other] - delta) >
                                limit_load * (1.0 + 1e-12)) {
          continue;
        }
        std::swap(plan[p], plan[q]);
        gpu_load[gpu] += delta;
        gpu_load[other] -= delta;
        move_slot(now, before, p);
        move_slot(before, now, q);  // invalidates this loop's range: leave it now
        done = true;
        break;
      }
      if (done) {
        changed = true;
        continue;
      }
      // (b) Give the slot back to `before` outright when `now` can spare it.
      // Two replica counts change: only the GPUs holding `now` or `before`
      // change load, so only they are evaluated (the others are within the
      // limit already: every accepted step keeps all GPUs within it).
      if (counts[now] < 2 || holds(gpu, before, p)) continue;
      const double old_now = load[now] / counts[now], new_now = load[now] / (counts[now] - 1);
      const double old_before = counts[before] > 0 ? load[before] / counts[before] : 0.0;
      const double new_before = load[before] / (counts[before] + 1);
      touched.clear();
      auto add = [&](int64_t g, double value) {
        if (!touched_mark[g]) {
          touched_mark[g] = 1;
          touched.push_back(g);
        }
        delta[g] += value;
      };
      for (const int32_t q : slots_of[now]) {
        if (q != p) add(q / per_gpu, new_now - old_now);
      }
      for (const int32_t q : slots_of[before]) add(q / per_gpu, new_before - old_before);
      add(gpu, new_before - old_now);
      double peak = 0.0;
      for (int64_t g : touched) peak = std::max(peak, gpu_load[g] + delta[g]);
      const bool accept = peak <= limit_load * (1.0 + 1e-12);
      for (int64_t g : touched) {
        if (accept) gpu_load[g] += delta[g];
        delta[g] = 0.0;
        touched_mark[g] = 0;
      }
      if (!accept) continue;
      plan[p] = before;
      counts[now] -= 1;
      counts[before] += 1;
      move_slot(now, before, p);
      changed = true;
    }
  }
}

}  // namespace

LayerPlan plan_layer_from_scratch(const LayerGeometry& geometry, const double* load,
                                  const PlacementOptions& options) {
  const int64_t num_experts = geometry.num_logical;
  const double mean = total_of(load, num_experts) / static_cast<double>(geometry.num_gpus);
  // Counts capped at the GPUs an expert may use: more would force a twin.
  std::vector<int32_t> counts(static_cast<size_t>(num_experts));
  greedy_replica_counts(load, num_experts, geometry.num_replicas, counts.data(), geometry.num_gpus);
  const double global_bound = lower_bound_of(geometry, load, counts, geometry.num_gpus);

  auto items_from = [&](const std::vector<int32_t>& replica_counts,
                        const std::vector<int32_t>& home, bool pin_all) {
    std::vector<PackItem> items;
    items.reserve(static_cast<size_t>(geometry.num_replicas));
    for (int64_t e = 0; e < num_experts; ++e) {
      const double per_replica = load[e] / replica_counts[e];
      for (int32_t r = 0; r < replica_counts[e]; ++r) {
        const int32_t pin = home.empty() ? -1 : (pin_all || r == 0 ? home[e] : -1);
        items.push_back({static_cast<int32_t>(e), per_replica, pin});
      }
    }
    return items;
  };
  const std::vector<int32_t> no_home;
  auto global_plan = [&](double stop_load, int64_t max_swaps) {
    SlotState state = pack_and_refine(
        geometry, load, counts, [&](const std::vector<int32_t>& c) { return items_from(c, no_home, false); },
        geometry.num_gpus, stop_load, options.refine_counts, &no_home, max_swaps);
    return finish(geometry, load, state.expert, nullptr);
  };

  if (!geometry.hierarchical || geometry.num_nodes == 1) {
    LayerPlan plan = global_plan(global_bound * mean * (1.0 + 1e-9), iteration_cap(geometry));
    plan.lower_bound = plan.global_lower_bound = global_bound;
    return plan;
  }

  // Strict hierarchy: groups to nodes, then each node replicates its own
  // experts into its own slots (at most one replica per GPU of the node).
  const std::vector<int32_t> home = expert_home_of(geometry, assign_groups_to_nodes(geometry, load));
  const int64_t slots_per_node = geometry.num_replicas / geometry.num_nodes;
  std::vector<int32_t> node_counts(static_cast<size_t>(num_experts), 0);
  {
    std::vector<double> node_load;
    std::vector<int32_t> node_experts, local_counts;
    for (int64_t node = 0; node < geometry.num_nodes; ++node) {
      node_load.clear();
      node_experts.clear();
      for (int64_t e = 0; e < num_experts; ++e) {
        if (home[e] == node) {
          node_experts.push_back(static_cast<int32_t>(e));
          node_load.push_back(load[e]);
        }
      }
      local_counts.assign(node_experts.size(), 0);
      greedy_replica_counts(node_load.data(), static_cast<int64_t>(node_experts.size()),
                            slots_per_node, local_counts.data(), geometry.gpus_per_node);
      for (size_t i = 0; i < node_experts.size(); ++i) node_counts[node_experts[i]] = local_counts[i];
    }
  }
  const double strict_bound =
      std::max(global_bound, strict_bound_of(geometry, load, home, node_counts));
  SlotState strict_state = pack_and_refine(
      geometry, load, node_counts, [&](const std::vector<int32_t>& c) { return items_from(c, home, true); },
      geometry.gpus_per_node, strict_bound * mean * (1.0 + 1e-9), options.refine_counts, &home,
      iteration_cap(geometry));
  LayerPlan plan = finish(geometry, load, strict_state.expert, nullptr);
  plan.lower_bound = strict_bound;
  plan.global_lower_bound = global_bound;
  if ((options.evaluate_relaxed || options.allow_cross_node) &&
      plan.imbalance > global_bound * (1.0 + options.relax_threshold)) {
    // What relaxing would give. Allowed: every expert keeps its primary
    // replica at home and the redundant ones go where the load is lowest; if
    // the node is still too hot, placement as in global mode. Strict: the
    // global-mode plan alone, to report (one packing, not two).
    const double stop_load = global_bound * mean * (1.0 + 1e-9);
    LayerPlan relaxed;
    if (options.allow_cross_node) {  // primaries at home first: fewer replicas leave
      SlotState relaxed_state = pack_and_refine(
          geometry, load, counts, [&](const std::vector<int32_t>& c) { return items_from(c, home, false); },
          geometry.gpus_per_node, stop_load, options.refine_counts, nullptr, iteration_cap(geometry));
      relaxed = finish(geometry, load, relaxed_state.expert, nullptr);
    }
    // Reporting only (strict): the global-mode plan alone says what relaxing gives.
    if (!options.allow_cross_node || relaxed.imbalance > global_bound * (1.0 + options.relax_threshold)) {
      // Only reported (strict): planned to within kReportTolerance of the bound.
      LayerPlan global = options.allow_cross_node
                             ? global_plan(stop_load, iteration_cap(geometry))
                             : global_plan(global_bound * mean * (1.0 + kReportTolerance), iteration_cap(geometry));
      if (!options.allow_cross_node || global.imbalance < relaxed.imbalance * (1.0 - 1e-9)) {
        relaxed = std::move(global);
      }
    }
    if (relaxed.imbalance < plan.imbalance * (1.0 - 1e-9)) {
      if (options.allow_cross_node && relaxed.imbalance < plan.imbalance * (1.0 - options.relax_threshold)) {
        relaxed.lower_bound = relaxed.global_lower_bound = global_bound;
        relaxed.relaxed_imbalance = relaxed.imbalance;
        return relaxed;
      }
      plan.relaxed_imbalance = relaxed.imbalance;
    }
  }
  return plan;
}

LayerPlan plan_layer_from_current(const LayerGeometry& geometry, const double* load,
                                  const int64_t* current, const PlacementOptions& options,
                                  int64_t layer_index) {
  const int64_t num_experts = geometry.num_logical;
  const int64_t num_slots = geometry.num_replicas;
  const double tolerance = options.migration_tolerance;
  const int64_t budget = options.max_moves >= 0 ? options.max_moves : num_slots;
  const LayerPlan scratch = plan_layer_from_scratch(geometry, load, options);
  const double mean = total_of(load, num_experts) / static_cast<double>(geometry.num_gpus);
  const double target_load = scratch.imbalance * (1.0 + tolerance) * mean;

  if (budget == 0) {  // nothing may move: the placement in force is the plan
    LayerPlan kept = finish(geometry, load, std::vector<int32_t>(current, current + num_slots), current);
    kept.lower_bound = scratch.lower_bound;
    kept.global_lower_bound = scratch.global_lower_bound;
    kept.relaxed_imbalance = std::min(kept.imbalance, scratch.relaxed_imbalance);
    return kept;
  }

  std::vector<int32_t> home;
  if (geometry.hierarchical && geometry.num_nodes > 1) {
    home = expert_home_of(geometry, node_of_group_from_current(geometry, current));
  }

  // Replica counts: keep the current ones unless an expert's load per replica
  // would exceed the optimum by more than the tolerance.
  std::vector<int32_t> current_counts(static_cast<size_t>(num_experts), 0);
  for (int64_t p = 0; p < num_slots; ++p) current_counts[current[p]] += 1;
  std::vector<int32_t> optimal(static_cast<size_t>(num_experts));
  greedy_replica_counts(load, num_experts, num_slots, optimal.data(),
                        home.empty() ? geometry.num_gpus : geometry.gpus_per_node);
  double largest = 0.0;
  for (int64_t e = 0; e < num_experts; ++e) largest = std::max(largest, load[e] / optimal[e]);
  const double threshold = largest * (1.0 + tolerance);
  std::vector<int32_t> needed(static_cast<size_t>(num_experts), 1);
  for (int64_t e = 0; e < num_experts; ++e) {
    if (threshold > 0.0) {
      const double ratio = load[e] / threshold;
      needed[e] = std::max<int32_t>(1, static_cast<int32_t>(std::ceil(ratio * (1.0 - 1e-12))));
      needed[e] = std::min(needed[e], optimal[e]);  // sum(needed) <= slots
    }
  }

  auto node_of_slot = [&](int64_t p) { return p / geometry.slots_per_gpu / geometry.gpus_per_node; };
  // The repair under a budget: keep every slot that can stay, grant slots to
  // experts short of replicas, then swaps and count moves charged by the
  // slots they change. *peak is raised to the most moves it ever held: the
  // same run results under any budget from that peak up.
  auto repair = [&](int64_t budget, int64_t* peak) -> LayerPlan {
  std::vector<int32_t> counts = current_counts;
  SlotState state;
  state.num_gpus = geometry.num_gpus;
  state.slots_per_gpu = geometry.slots_per_gpu;
  state.gpus_per_node = geometry.gpus_per_node;
  state.expert.assign(current, current + num_slots);
  state.slot_load.resize(static_cast<size_t>(num_slots));
  state.home_node.assign(static_cast<size_t>(num_slots), -1);
  for (int64_t p = 0; p < num_slots; ++p) state.slot_load[p] = load[current[p]] / counts[current[p]];
  state.recompute_gpu_loads();
  if (!home.empty()) {  // pin replicas at home: all of them (strict) or the first one
    std::vector<char> has_primary(static_cast<size_t>(num_experts), 0);
    for (int64_t p = 0; p < num_slots; ++p) {
      const int32_t e = state.expert[p];
      if (home[e] != node_of_slot(p)) continue;
      if (!options.allow_cross_node || !has_primary[e]) state.home_node[p] = home[e];
      has_primary[e] = 1;
    }
  }

  // Grants: one slot at a time to the neediest expert (missing ones first),
  // taken from the expert that loses least by giving one up. Strict
  // hierarchy: from a donor with a replica in the receiver's node, whose slot
  // there is freed (the new replica then stays in its node; a receiver with
  // no such donor gets nothing, unless it is missing altogether).
  const bool strict_nodes = !home.empty() && !options.allow_cross_node;
  const int64_t slots_per_node = geometry.slots_per_gpu * geometry.gpus_per_node;
  std::vector<char> blocked(static_cast<size_t>(num_experts), 0), in_node;
  std::vector<int32_t> freed_slots, receivers;
  while (static_cast<int64_t>(freed_slots.size()) < budget) {
    int64_t receiver = -1;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (counts[e] >= needed[e] || blocked[e]) continue;
      if (receiver < 0) { receiver = e; continue; }
      const bool missing = counts[e] == 0, best_missing = counts[receiver] == 0;
      if (missing != best_missing) { if (missing) receiver = e; continue; }
      if (!missing && load[e] / counts[e] > load[receiver] / counts[receiver]) receiver = e;
    }
    if (receiver < 0) break;
    int64_t node = -1;  // strict: the node the freed slot must be in
    if (strict_nodes) {
      node = home[receiver];
      in_node.assign(static_cast<size_t>(num_experts), 0);
      for (int64_t p = node * slots_per_node; p < (node + 1) * slots_per_node; ++p) {
        if (state.expert[p] >= 0) in_node[state.expert[p]] = 1;
      }
    }
    int64_t donor = -1;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (counts[e] <= needed[e] || (node >= 0 && !in_node[e])) continue;
      if (donor < 0 || load[e] / (counts[e] - 1) < load[donor] / (counts[donor] - 1)) donor = e;
    }
    if (donor < 0 && node >= 0) {
      if (counts[receiver] > 0) {
        blocked[receiver] = 1;
        continue;
      }
      node = -1;  // a missing expert takes a slot wherever one can be spared
      for (int64_t e = 0; e < num_experts; ++e) {
        if (counts[e] <= needed[e]) continue;
        if (donor < 0 || load[e] / (counts[e] - 1) < load[donor] / (counts[donor] - 1)) donor = e;
      }
    }
    MOE_INTERNAL_ASSERT(donor >= 0, "no donor of a replica in layer ", layer_index);
    int64_t give_up = -1;  // the donor's replica on the hottest GPU, unpinned if possible
    for (int64_t p = 0; p < num_slots; ++p) {
      if (state.expert[p] != donor || (node >= 0 && node_of_slot(p) != node)) continue;
      if (give_up < 0) { give_up = p; continue; }
      const bool pinned = state.home_node[p] >= 0, best_pinned = state.home_node[give_up] >= 0;
      if (pinned != best_pinned) { if (!pinned) give_up = p; continue; }
      if (state.gpu_load[p / geometry.slots_per_gpu] >
          state.gpu_load[give_up / geometry.slots_per_gpu]) give_up = p;
    }
    state.gpu_load[give_up / geometry.slots_per_gpu] -= state.slot_load[give_up];
    state.expert[give_up] = -1;
    state.slot_load[give_up] = 0.0;
    state.home_node[give_up] = -1;
    counts[donor] -= 1;
    counts[receiver] += 1;
    freed_slots.push_back(static_cast<int32_t>(give_up));
    receivers.push_back(static_cast<int32_t>(receiver));
  }
  for (int64_t p = 0; p < num_slots; ++p) {
    if (state.expert[p] >= 0) state.slot_load[p] = load[state.expert[p]] / counts[state.expert[p]];
  }
  state.recompute_gpu_loads();
  // Freed slots to receivers, heaviest replica first, lightest GPU without a twin.
  std::stable_sort(receivers.begin(), receivers.end(), [&](int32_t a, int32_t b) {
    const double la = load[a] / counts[a], lb = load[b] / counts[b];
    return la != lb ? la > lb : a < b;
  });
  std::vector<char> filled(freed_slots.size(), 0);
  for (int32_t e : receivers) {
    int64_t best = -1;
    bool best_twin = true, best_home = false;
    for (size_t i = 0; i < freed_slots.size(); ++i) {
      if (filled[i]) continue;
      const int64_t p = freed_slots[i];
      const int64_t gpu = p / geometry.slots_per_gpu;
      const bool twin = state.gpu_holds(gpu, e);
      const bool at_home = !home.empty() && home[e] == node_of_slot(p);
      bool better = best < 0;
      if (!better && strict_nodes && at_home != best_home) better = at_home;  // home first (strict)
      else if (!better && twin != best_twin) better = !twin;
      else if (!better && at_home != best_home) better = at_home && !options.allow_cross_node;
      else if (!better) {
        const int64_t best_gpu = freed_slots[best] / geometry.slots_per_gpu;
        better = state.gpu_load[gpu] < state.gpu_load[best_gpu];
      }
      if (better) { best = static_cast<int64_t>(i); best_twin = twin; best_home = at_home; }
    }
    const int64_t p = freed_slots[best];
    filled[best] = 1;
    state.expert[p] = e;
    state.slot_load[p] = load[e] / counts[e];
    state.gpu_load[p / geometry.slots_per_gpu] += state.slot_load[p];
    if (!home.empty() && home[e] == node_of_slot(p)) {
      bool pinned_elsewhere = false;
      for (int64_t q = 0; q < num_slots && options.allow_cross_node; ++q) {
        pinned_elsewhere = pinned_elsewhere || (q != p && state.expert[q] == e && state.home_node[q] >= 0);
      }
      if (!pinned_elsewhere) state.home_node[p] = home[e];
    }
  }
  int64_t moves = count_moves(state, current);
  *peak = std::max(*peak, moves);
  // Swaps and count moves, both charged by the slots they change; a confined
  // expert's new replicas stay in its node.
  const int32_t* confine = !home.empty() && !options.allow_cross_node ? home.data() : nullptr;
  refine_placement(state, load, num_experts, confine, target_load, current, budget, &moves,
                   iteration_cap(geometry), options.refine_counts ? count_move_cap(geometry) : 0, peak);
  return finish(geometry, load, state.expert, current);
  };

  // Candidates: current itself (0 moves); the from-scratch plan relabelled
  // onto the current GPUs and walked back toward current while within
  // tolerance (if within the budget); and repairs. The result is chosen from
  // them by one rule: the fewest moves among those within tolerance of the
  // from-scratch imbalance (ties: the better balanced), else the best
  // balanced (ties: fewer moves, current first). A candidate must add no
  // replica outside its node (strict) and, to be preferred, no avoidable
  // twin beyond current's; one with twins wins only by being strictly
  // better than every twin-free one (its twins are reported).
  //
  // More moves allowed is never worse: the repair under budget B depends on B
  // only through the moves it refuses, so it equals the repair under any
  // budget from its peak up to B. Repairs are run for B, then for peak - 1 of
  // the last run, ... (each covers a range of budgets), until one lands
  // within tolerance (the result is then within tolerance, as under any
  // larger budget) or every budget down to the fewest possible is covered.
  // Then the candidates under B include those under any smaller budget, and
  // the rule picks one no worse. At most kMaxRepairRuns runs: beyond them
  // (large binding budgets) smaller budgets are not all covered.
  const double limit = scratch.imbalance * (1.0 + tolerance);
  const LayerPlan kept = finish(geometry, load,
                                std::vector<int32_t>(current, current + num_slots), current);
  auto within = [&](const LayerPlan& candidate) { return candidate.imbalance <= limit * (1.0 + 1e-9); };
  auto node_rule = [&](const LayerPlan& candidate) {
    return candidate.moves <= budget &&
           (options.allow_cross_node || candidate.cross_node <= kept.cross_node);
  };
  auto twin_free = [&](const LayerPlan& candidate) {
    return candidate.duplicates == 0 || candidate.duplicates <= kept.duplicates;
  };
  std::vector<LayerPlan> candidates;
  auto offer = [&](LayerPlan&& candidate) {
    if (node_rule(candidate)) candidates.push_back(std::move(candidate));
  };
  {
    std::vector<int32_t> relabelled_map = relabel_onto_current(geometry, scratch.slot_expert, current);
    revert_toward_current(geometry, load, relabelled_map, current, limit,
                          geometry.hierarchical && geometry.num_nodes > 1 && !options.allow_cross_node);
    offer(finish(geometry, load, relabelled_map, current));
  }
  int64_t fewest = 0;  // every expert needs a replica: budgets below this are refused
  {
    std::vector<char> seen(static_cast<size_t>(num_experts), 0);
    for (int64_t p = 0; p < num_slots; ++p) seen[current[p]] = 1;
    for (char held : seen) fewest += held ? 0 : 1;
  }
  const bool relabelled_within = !candidates.empty() && within(candidates.back()) &&
                                 twin_free(candidates.back());
  for (int64_t run_budget = budget, runs = 0; run_budget >= std::max<int64_t>(fewest, 1) && runs < kMaxRepairRuns;
       ++runs) {
    int64_t peak = 0;
    LayerPlan repaired = repair(run_budget, &peak);
    const bool done = within(repaired) && twin_free(repaired) && node_rule(repaired);
    offer(std::move(repaired));
    // Within tolerance (here or by the relabelled plan): smaller budgets
    // cannot change the choice's standing (it is within tolerance already).
    if (done || relabelled_within || peak == 0) break;
    run_budget = std::min(peak, run_budget) - 1;
  }
  // current itself is a candidate when it holds every expert (else the
  // budget covers the missing ones and some repair holds them all).
  LayerPlan plan = kept;
  bool have_plan = fewest == 0;
  bool plan_within = have_plan && within(kept);
  for (const LayerPlan& candidate : candidates) {
    if (!twin_free(candidate)) continue;
    if (!have_plan) {
      plan = candidate;
      plan_within = within(candidate);
      have_plan = true;
      continue;
    }
    const bool candidate_within = within(candidate);
    bool better;
    if (candidate_within != plan_within) {
      better = candidate_within;
    } else if (candidate_within) {
      better = candidate.moves < plan.moves ||
               (candidate.moves == plan.moves && candidate.imbalance < plan.imbalance * (1.0 - 1e-12));
    } else {
      better = candidate.imbalance < plan.imbalance * (1.0 - 1e-12) ||
               (!(plan.imbalance < candidate.imbalance * (1.0 - 1e-12)) && candidate.moves < plan.moves);
    }
    if (better) {
      plan = candidate;
      plan_within = candidate_within;
    }
  }
  // Under a move budget every twin-free candidate may be no better than one
  // that adds a twin (a second replica on a GPU still halves that expert's
  // load per replica). Refusing it would freeze the placement at a budget
  // where a rebalance pays off, so the best such candidate is taken when it
  // is strictly better than the twin-free choice outside tolerance.
  if (!plan_within) {
    for (const LayerPlan& candidate : candidates) {
      if (twin_free(candidate)) continue;
      if (!have_plan || candidate.imbalance < plan.imbalance * (1.0 - 1e-9)) {
        plan = candidate;
        have_plan = true;
      }
    }
  }
  MOE_INTERNAL_ASSERT(have_plan, "no candidate placement in layer ", layer_index);
  plan.lower_bound = scratch.lower_bound;
  plan.global_lower_bound = scratch.global_lower_bound;
  plan.relaxed_imbalance = std::min(plan.imbalance, scratch.relaxed_imbalance);
  return plan;
}

}  // namespace moe_ext::core::eplb::detail
