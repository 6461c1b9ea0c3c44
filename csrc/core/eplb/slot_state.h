// Internal building blocks of the placement planner (not a public API).
//
// A layer's placement is held as a SlotState: which expert each physical slot
// holds, the per-replica load of that slot, the node the replica is pinned to
// (-1: free to live anywhere), and the resulting GPU loads.
#pragma once

#include <cstdint>
#include <vector>

namespace moe_ext::core::eplb::detail {

struct LayerGeometry {
  int64_t num_logical = 0;
  int64_t num_replicas = 0;
  int64_t num_gpus = 0;
  int64_t num_nodes = 1;
  int64_t slots_per_gpu = 0;
  int64_t gpus_per_node = 0;
  bool hierarchical = false;
  int64_t num_groups = 1;
  int64_t group_size = 0;  // logical experts per group (hierarchical only)
};

struct SlotState {
  int64_t num_gpus = 0;
  int64_t slots_per_gpu = 0;
  int64_t gpus_per_node = 0;  // for pinned replicas
  std::vector<int32_t> expert;     // [slots]
  std::vector<double> slot_load;   // [slots]
  std::vector<int32_t> home_node;  // [slots] -1 = anywhere
  std::vector<double> gpu_load;    // [gpus]

  void recompute_gpu_loads();
  bool gpu_holds(int64_t gpu, int32_t expert_id, int64_t except_slot = -1) const;
  int64_t hottest_gpu() const;  // lowest index among ties
};

// Replica counts that minimise the largest per-replica load: every expert gets
// one, each further slot goes to the expert with the highest load per replica
// (ties: fewer replicas, then lower id). counts must have num_experts entries.
// cap > 0: no expert gets more than cap replicas (the GPUs it may use), unless
// num_experts * cap < num_slots, where the cap cannot hold and is ignored.
void greedy_replica_counts(const double* load, int64_t num_experts, int64_t num_slots,
                           int32_t* counts, int64_t cap = 0);

// Remove replicas of one expert sharing a GPU by swapping a twin with a
// replica of another expert on another GPU (same node when the twin is
// pinned, and only into its pin's node for the other replica). Picks the swap
// that changes the two GPUs' loads least. Returns the twins left.
int64_t repair_twins(SlotState& state);

// A twin-free packing of counts (every count <= the GPUs of its domain):
// replicas listed expert by expert (heaviest per-replica load first) and dealt
// round-robin over the domain's GPUs; domain = node when home is given.
// counts sum to num_gpus * slots_per_gpu (per node, when home is given).
SlotState pack_round_robin(const double* load, const std::vector<int32_t>& counts,
                           const std::vector<int32_t>& home, int64_t num_gpus,
                           int64_t slots_per_gpu, int64_t gpus_per_node);

struct PackItem {
  int32_t expert;    // id used to keep twins apart (an expert, or a group)
  double load;       // per-replica load
  int32_t home_node; // -1 = any node
};

// Largest-first packing into num_gpus bins of exactly slots_per_gpu items:
// each item goes to the least-loaded GPU with room that does not already hold
// its expert (a twin only when nothing else has room). Items pinned to a node
// stay in it; unpinned items never take a slot a pinned item still needs.
// items.size() must equal num_gpus * slots_per_gpu.
SlotState pack_largest_first(std::vector<PackItem> items, int64_t num_gpus, int64_t slots_per_gpu,
                             int64_t gpus_per_node);

// Pairwise-swap local search on the hottest GPU: swap one of its replicas
// with a lighter replica elsewhere while that lowers the hotter of the two
// GPUs, respecting pins and never creating twins on a GPU. Stops at stop_load,
// when nothing improves, or after max_iterations. With current (the slot map
// in force), a swap costs the change in slots that differ from it: cheaper
// swaps win, and *moves never exceeds move_budget. Returns the swaps made.
// peak_moves, when given, is raised to the largest *moves reached (the run
// is the same under any budget >= that: the budget only ever refused more).
int64_t refine_by_swaps(SlotState& state, double stop_load, const int64_t* current,
                        int64_t move_budget, int64_t* moves, int64_t max_iterations,
                        int64_t* peak_moves = nullptr);

// Count moves only (see refine_placement); returns how many were made.
int64_t refine_by_count_moves(SlotState& state, const double* expert_load, int64_t num_experts,
                              const int32_t* confine_to_node, double stop_load,
                              const int64_t* current, int64_t move_budget, int64_t* moves,
                              int64_t max_count_moves, int64_t* peak_moves = nullptr);

// Swap refinement alternated with replica-count moves: give an expert on the
// hottest GPU one more replica, taken from an expert with >= 2 replicas, when
// every GPU the move touches ends below the current peak (pins as for swaps;
// confine_to_node, when given, keeps an expert's new replicas in its node).
// Moves are charged against current like swaps; at most max_count_moves.
void refine_placement(SlotState& state, const double* expert_load, int64_t num_experts,
                      const int32_t* confine_to_node, double stop_load, const int64_t* current,
                      int64_t move_budget, int64_t* moves, int64_t max_iterations,
                      int64_t max_count_moves, int64_t* peak_moves = nullptr);

// Slots whose expert differs from current.
int64_t count_moves(const SlotState& state, const int64_t* current);
// Replica pairs of one expert sharing a GPU (each extra copy counts once).
int64_t count_same_gpu_duplicates(const SlotState& state);

}  // namespace moe_ext::core::eplb::detail
