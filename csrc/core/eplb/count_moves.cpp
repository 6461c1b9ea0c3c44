// Replica-count moves: give the expert on the hottest GPU one more replica,
// taken from an expert that can spare one, when that lowers the peak.
//
// Greedy replica counts minimise the largest per-replica load, but not the
// largest GPU load once replicas are packed a few per GPU (with 2 slots per
// GPU the packing of fixed counts is already optimal, and only other counts
// help). A count move changes the load of every GPU holding a replica of the
// receiver (down) or of the donor (up), so it is evaluated on all of them.
#include <algorithm>
#include <limits>
#include <vector>

#include "core/check.h"
#include "core/eplb/slot_state.h"

namespace moe_ext::core::eplb::detail {

namespace {

class CountMover {
 public:
  CountMover(SlotState& state, const double* expert_load, int64_t num_experts,
             const int32_t* confine_to_node)
      : state_(state), load_(expert_load), num_experts_(num_experts),
        confine_(confine_to_node), delta_(static_cast<size_t>(state.num_gpus), 0.0),
        touched_mark_(static_cast<size_t>(state.num_gpus), 0) {}

  // One best move (fewest changed slots against current, then lowest peak);
  // false when none lowers the hottest GPU.
  bool move_once(int64_t hot, const int64_t* current, int64_t move_budget, int64_t* moves, double eps,
                 int64_t* peak_moves) {
    rebuild_index();  // swaps in between moved replicas around
    const int64_t per_gpu = state_.slots_per_gpu;
    const double hot_load = state_.gpu_load[hot];
    int64_t best_cost = std::numeric_limits<int64_t>::max();
    double best_peak = hot_load - eps;
    int64_t best_slot = -1;
    int32_t best_receiver = -1;
    for (int64_t p = hot * per_gpu; p < (hot + 1) * per_gpu; ++p) {
      const int32_t a = state_.expert[p];
      if (a < 0) continue;
      const double count_a = static_cast<double>(count_[a]);
      const double drop_a = load_[a] / count_a - load_[a] / (count_a + 1.0);
      const double new_a = load_[a] / (count_a + 1.0);
      if (!(drop_a > eps)) continue;
      for (const int32_t d : donors_) {
        if (d == a) continue;
        const double count_d = static_cast<double>(count_[d]);
        const double old_d = load_[d] / count_d;
        const double rise_d = load_[d] / (count_d - 1.0) - old_d;
        // Every replica of d but the one given away gets heavier: when two of
        // d's GPUs would reach the peak (a GPU holding a falls by less than
        // drop_a... ignore that rare help), no q works; with one, only it.
        int32_t only = -1, reaching = 0;
        for (int32_t i = first_[d]; i < first_[d + 1] && reaching < 2; ++i) {
          const int64_t gpu = gpus_[i];
          const double risen = state_.gpu_load[gpu] + rise_d;
          if (risen >= hot_load - eps && risen - drop_a * holds(gpu, a) >= hot_load - eps) {
            only = i;
            ++reaching;
          }
        }
        if (reaching >= 2) continue;
        for (int32_t i = reaching == 1 ? only : first_[d]; i < (reaching == 1 ? only + 1 : first_[d + 1]); ++i) {
          const int64_t q = slots_[i];
          const int64_t gpu_q = gpus_[i];
          if (!allowed(q, a, d)) continue;
          if (state_.gpu_holds(gpu_q, a)) continue;
          const int64_t cost = current == nullptr
                                   ? 0
                                   : (current[q] != a ? 1 : 0) - (current[q] != d ? 1 : 0);
          if (cost > best_cost || *moves + cost > move_budget) continue;
          // New loads of every GPU the move touches.
          touched_.clear();
          add(gpu_q, new_a - old_d);
          for (int32_t j = first_[a]; j < first_[a + 1]; ++j) add(gpus_[j], -drop_a);
          for (int32_t j = first_[d]; j < first_[d + 1]; ++j) {
            if (slots_[j] != q) add(gpus_[j], rise_d);
          }
          double peak = 0.0;
          for (int64_t g : touched_) {
            peak = std::max(peak, state_.gpu_load[g] + delta_[g]);
            delta_[g] = 0.0;
            touched_mark_[g] = 0;
          }
          if (peak >= hot_load - eps) continue;
          if (cost < best_cost || peak < best_peak - eps) {
            best_cost = cost;
            best_peak = peak;
            best_slot = q;
            best_receiver = a;
          }
        }
      }
    }
    if (best_slot < 0) return false;
    const int32_t donor = state_.expert[best_slot];
    state_.expert[best_slot] = best_receiver;
    count_[donor] -= 1;
    count_[best_receiver] += 1;
    for (size_t q = 0; q < state_.expert.size(); ++q) {
      const int32_t e = state_.expert[q];
      if (e == donor || e == best_receiver) state_.slot_load[q] = load_[e] / count_[e];
    }
    state_.recompute_gpu_loads();
    *moves += best_cost;
    if (peak_moves != nullptr) *peak_moves = std::max(*peak_moves, *moves);
    return true;
  }

 private:
  // Pins: a slot pinned to a node may change hands only between two experts
  // that both keep a replica pinned there (strict hierarchy); a confined
  // receiver only takes slots of its own node.
  bool allowed(int64_t q, int32_t receiver, int32_t donor) const {
    const int64_t node = q / state_.slots_per_gpu / state_.gpus_per_node;
    if (confine_ != nullptr && confine_[receiver] != node) return false;
    const int32_t pin = state_.home_node[q];
    if (pin < 0) return true;
    bool receiver_pinned = false, donor_keeps_pin = false;
    for (int32_t j = first_[receiver]; j < first_[receiver + 1]; ++j) {
      receiver_pinned = receiver_pinned || state_.home_node[slots_[j]] == pin;
    }
    for (int32_t j = first_[donor]; j < first_[donor + 1]; ++j) {
      donor_keeps_pin = donor_keeps_pin || (slots_[j] != q && state_.home_node[slots_[j]] == pin);
    }
    return receiver_pinned && donor_keeps_pin;
  }

  double holds(int64_t gpu, int32_t expert) const {
    double copies = 0.0;
    for (int64_t p = gpu * state_.slots_per_gpu; p < (gpu + 1) * state_.slots_per_gpu; ++p) {
      copies += state_.expert[p] == expert ? 1.0 : 0.0;
    }
    return copies;
  }

  void add(int64_t gpu, double value) {
    if (!touched_mark_[gpu]) {
      touched_mark_[gpu] = 1;
      touched_.push_back(gpu);
    }
    delta_[gpu] += value;
  }

  // count_ and the slots of every expert (ascending), as CSR.
  void rebuild_index() {
    count_.assign(static_cast<size_t>(num_experts_), 0);
    for (int32_t e : state_.expert) {
      if (e >= 0) count_[e] += 1;
    }
    first_.assign(static_cast<size_t>(num_experts_ + 1), 0);
    for (int64_t e = 0; e < num_experts_; ++e) first_[e + 1] = first_[e] + count_[e];
    donors_.clear();
    for (int32_t e = 0; e < num_experts_; ++e) {
      if (count_[e] >= 2) donors_.push_back(e);
    }
    slots_.assign(static_cast<size_t>(first_[num_experts_]), 0);
    gpus_.assign(slots_.size(), 0);
    std::vector<int32_t> next(first_.begin(), first_.end() - 1);
    for (size_t q = 0; q < state_.expert.size(); ++q) {
      const int32_t e = state_.expert[q];
      if (e >= 0) {
        gpus_[next[e]] = static_cast<int32_t>(q / static_cast<size_t>(state_.slots_per_gpu));
        slots_[next[e]++] = static_cast<int32_t>(q);
      }
    }
  }

  SlotState& state_;
  const double* load_;
  int64_t num_experts_;
  const int32_t* confine_;
  std::vector<double> delta_;
  std::vector<char> touched_mark_;
  std::vector<int64_t> touched_;
  std::vector<int32_t> count_, first_, slots_, gpus_, donors_;  // gpus_: GPU of slots_[i]
   // donors_: experts with >= 2 replicas
};

}  // namespace

int64_t refine_by_count_moves(SlotState& state, const double* expert_load, int64_t num_experts,
                              const int32_t* confine_to_node, double stop_load,
                              const int64_t* current, int64_t move_budget, int64_t* moves,
                              int64_t max_count_moves, int64_t* peak_moves) {
  if (state.num_gpus < 2) return 0;
  double scale = 0.0;
  for (double load : state.gpu_load) scale = std::max(scale, load);
  const double eps = 1e-12 * std::max(scale, 1e-300);
  CountMover mover(state, expert_load, num_experts, confine_to_node);
  int64_t made = 0;
  while (made < max_count_moves) {
    const int64_t hot = state.hottest_gpu();
    if (!(state.gpu_load[hot] > stop_load) || !mover.move_once(hot, current, move_budget, moves, eps, peak_moves)) {
      break;
    }
    ++made;
  }
  return made;
}

void refine_placement(SlotState& state, const double* expert_load, int64_t num_experts,
                      const int32_t* confine_to_node, double stop_load, const int64_t* current,
                      int64_t move_budget, int64_t* moves, int64_t max_iterations,
                      int64_t max_count_moves, int64_t* peak_moves) {
  // From scratch swaps come first (they keep the greedy counts). Against a
  // current map count moves do: one changed slot can lower every GPU holding
  // a hot expert's replicas (a drifted-up expert's GPUs rise together), where
  // a swap changes two slots to fix one GPU (10% drift, 512 slots on 256
  // GPUs: 21% -> 13% of slots moved, at equal balance and half the time).
  int64_t count_moves_left = max_count_moves;
  if (current != nullptr) {
    count_moves_left -= refine_by_count_moves(state, expert_load, num_experts, confine_to_node, stop_load,
                                              current, move_budget, moves, count_moves_left, peak_moves);
  }
  refine_by_swaps(state, stop_load, current, move_budget, moves, max_iterations, peak_moves);
  // Count moves until none helps, then swaps until none helps, again while
  // either side changed something (swaps are the expensive scan).
  while (count_moves_left > 0) {
    const int64_t made = refine_by_count_moves(state, expert_load, num_experts, confine_to_node,
                                               stop_load, current, move_budget, moves,
                                               count_moves_left, peak_moves);
    count_moves_left -= made;
    if (made == 0) return;
    if (refine_by_swaps(state, stop_load, current, move_budget, moves, max_iterations, peak_moves) == 0) {
      return;
    }
  }
}

}  // namespace moe_ext::core::eplb::detail
