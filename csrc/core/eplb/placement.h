// Expert-parallel load balancing (EPLB): where each expert replica lives.
//
// Given the measured load of every logical expert in every MoE layer, decide
// how many replicas each expert gets and which physical slot holds each
// replica. Physical slot p lives on GPU p / slots_per_gpu; GPU g lives on node
// g / gpus_per_node. A GPU's load is the sum, over its slots, of the slot's
// expert load divided by that expert's replica count (tokens are spread evenly
// over replicas). Imbalance of a layer = max GPU load / mean GPU load.
//
// Modes follow the public contract engines already call:
//   hierarchical (num_groups % num_nodes == 0): experts come in num_groups
//     contiguous groups; each group is given to one node, and every replica of
//     its experts stays in that node (the guarantee node-limited routing
//     relies on). By default this always holds. allow_cross_node is the
//     explicit opt-in to relax it per layer: redundant replicas may then leave
//     their node when that lowers the layer's imbalance by more than
//     relax_threshold. Either way the result reports, per layer, the best
//     imbalance found with the hierarchy relaxed (relaxed_imbalance), so a
//     caller can see what keeping it costs, and the node-level lower bound.
//   global (otherwise): groups and nodes are ignored (num_nodes need not
//     divide num_gpus), as in the public algorithm.
//
// Replica counts are chosen with their placement in mind: no expert gets more
// replicas than there are GPUs it may use (its node's GPUs in strict mode), so
// no GPU holds two replicas of one expert unless the slot arithmetic forces it
// (experts of a domain * its GPUs < its slots); any such twin is reported.
// Loads are scaled per layer by their maximum before planning (imbalance is
// scale-free), so loads up to the double range give finite results.
//
// Planning from scratch: capped greedy replica counts (optimal for the
// largest per-GPU share of one expert), largest-first packing that keeps
// replicas of one expert on different GPUs (twins it leaves are swapped away,
// else a round-robin packing is used), then pairwise-swap refinement of the
// hottest GPU, then replica-count moves with re-packing (options.refine_counts).
// Planning from a current placement: keep every slot that can stay, repair the
// replica counts with as few slot changes as possible, refine with swaps that
// are charged by the slots they change; a second candidate is the from-scratch
// plan relabelled onto the current GPUs and walked back toward current while
// within tolerance. The layer takes the one that moves fewer slots within
// tolerance (else the better balanced), never beyond max_moves, never adding
// replicas outside their node (strict) or avoidable twins; and the current
// placement itself (0 moves) whenever it is at least as balanced: the result
// is never worse than current under the same loads.
//
// Everything is deterministic: layers are independent and every tie is broken
// by index, so threads and ranks give identical plans.
#pragma once

#include <cstdint>
#include <vector>

namespace moe_ext::core::eplb {

struct PlacementShape {
  int64_t num_layers = 1;
  int64_t num_logical = 1;   // logical experts per layer
  int64_t num_replicas = 1;  // physical slots per layer
  int64_t num_groups = 1;
  int64_t num_nodes = 1;
  int64_t num_gpus = 1;

  bool hierarchical() const { return num_nodes > 0 && num_groups % num_nodes == 0; }
  int64_t slots_per_gpu() const { return num_replicas / num_gpus; }
  // Global mode has one node: num_nodes is ignored there.
  int64_t effective_nodes() const { return hierarchical() ? num_nodes : 1; }
  int64_t gpus_per_node() const { return num_gpus / effective_nodes(); }
  // Width of log2phy: the most replicas one expert can get.
  int64_t max_replicas() const { return num_replicas - num_logical + 1; }
};

struct PlacementOptions {
  // Hierarchical mode: may redundant replicas leave their node when the node
  // cannot be balanced on its own? (Off: the public guarantee, always kept.)
  bool allow_cross_node = false;
  // Relaxing is considered for a layer whose node-confined imbalance exceeds
  // global_lower_bound * (1 + relax_threshold), and taken (allow_cross_node)
  // when it lowers the imbalance by more than that fraction (relaxed <
  // imbalance * (1 - relax_threshold); the Python relax_gain is the same measure).
  double relax_threshold = 0.02;
  // Hierarchical mode without allow_cross_node: still plan the relaxed
  // alternative of such layers to report relaxed_imbalance (costs a second
  // packing of those layers); off: relaxed_imbalance = imbalance.
  bool evaluate_relaxed = true;
  // Planning from a current placement: stop moving experts once the layer is
  // within (1 + migration_tolerance) of the from-scratch imbalance.
  double migration_tolerance = 0.02;
  // Most slots per layer whose expert may change (negative: no bound).
  int64_t max_moves = -1;
  // From scratch: after packing, move replicas between experts (change the
  // greedy replica counts) where that lowers the hottest GPU, and re-pack the
  // new counts. Better balance when GPUs hold few slots (2 per GPU: 1.055 ->
  // 1.041 on the benchmark) at about 3x the planning time; off: greedy counts.
  bool refine_counts = true;
  // Layers are planned on this many threads (1: the calling thread only).
  int64_t num_threads = 1;
  // Fill log2phy (layers * logical * max_replicas entries: 32 MB for 61 x 256
  // x 512, which costs more than the planning itself); off leaves it empty.
  bool build_log2phy = true;
};

struct PlacementResult {
  int64_t max_replicas = 0;
  std::vector<int64_t> phy2log;           // [layers, replicas]
  std::vector<int64_t> log2phy;           // [layers, logical, max_replicas], -1 padded (or empty)
  std::vector<int64_t> logcnt;            // [layers, logical]
  std::vector<double> imbalance;          // [layers] max GPU load / mean GPU load
  std::vector<double> lower_bound;        // [layers] bound of the mode kept (strict: node-level)
  std::vector<double> global_lower_bound; // [layers] bound of any placement (hierarchy ignored)
  std::vector<double> relaxed_imbalance;  // [layers] best found with the hierarchy relaxed
  std::vector<int64_t> moves;             // [layers] slots whose expert changed (0 without current)
  std::vector<int64_t> cross_node_replicas;  // [layers] replicas outside their group's node
  std::vector<int64_t> same_gpu_duplicates;  // [layers] replicas sharing a GPU with their twin
  std::vector<uint8_t> hierarchy_relaxed;    // [layers] 1 when replicas left their node
};

// Refuse bad shapes / options (std::invalid_argument naming the argument).
void check_placement_shape(const PlacementShape& shape, const PlacementOptions& options);
// Refuse negative or non-finite loads (values up to the largest double are fine).
void check_placement_loads(const PlacementShape& shape, const double* weight);
// Refuse expert ids out of [0, num_logical).
void check_current_placement(const PlacementShape& shape, const int64_t* current);

// Caller-owned output buffers of plan_placement_into (sizes as in
// PlacementResult; log2phy may be null: not built). Every entry is written.
struct PlacementOutputs {
  int64_t* phy2log = nullptr;
  int64_t* log2phy = nullptr;
  int64_t* logcnt = nullptr;
  double* imbalance = nullptr;
  double* lower_bound = nullptr;
  double* global_lower_bound = nullptr;
  double* relaxed_imbalance = nullptr;
  int64_t* moves = nullptr;
  int64_t* cross_node_replicas = nullptr;
  int64_t* same_gpu_duplicates = nullptr;
  uint8_t* hierarchy_relaxed = nullptr;
};

// As plan_placement, written straight into the caller's buffers (the binding
// hands numpy arrays here: no copies, and each layer's log2phy rows are filled
// by the thread that plans the layer). options.build_log2phy is ignored: a
// null outputs.log2phy means none. Validates everything before writing.
void plan_placement_into(const PlacementShape& shape, const double* weight,
                         const int64_t* current, const PlacementOptions& options,
                         const PlacementOutputs& outputs);

// weight: [layers, logical] loads. current: [layers, replicas] physical->logical
// map in force now, or nullptr to plan from scratch. Validates everything first.
PlacementResult plan_placement(const PlacementShape& shape, const double* weight,
                               const int64_t* current, const PlacementOptions& options);

// Imbalance (max GPU load / mean GPU load) of one layer's placement; 1 when the
// layer carries no load. Loads must be finite and >= 0 (scaled internally, so
// any finite magnitude gives a finite result).
double placement_imbalance(const double* load, const int64_t* phy2log, int64_t num_logical,
                           int64_t num_replicas, int64_t num_gpus);

}  // namespace moe_ext::core::eplb
