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
//     contiguous groups; each group is given to one node, and the replicas of
//     its experts stay in that node. When a node's groups are so hot that the
//     node cannot be balanced (imbalance above lower bound * (1 + relax
//     threshold)), redundant replicas may go to other nodes (the primary
//     replica of every expert stays home); the result says so per layer.
//   global (otherwise): groups and nodes are ignored.
//
// Planning from scratch: greedy replica counts (optimal for the largest
// per-replica load), largest-first packing that keeps replicas of one expert on
// different GPUs, then pairwise-swap refinement of the hottest GPU, then
// replica-count moves with re-packing (options.refine_counts).
// Planning from a current placement: keep every slot that can stay, repair the
// replica counts with as few slot changes as possible, refine with swaps that
// are charged by the slots they change; a second candidate is the from-scratch
// plan relabelled onto the current GPUs and walked back toward current while
// within tolerance. The layer takes the one that moves fewer slots within
// tolerance (else the better balanced), never beyond max_moves.
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
  int64_t gpus_per_node() const { return num_gpus / num_nodes; }
  // Width of log2phy: the most replicas one expert can get.
  int64_t max_replicas() const { return num_replicas - num_logical + 1; }
};

struct PlacementOptions {
  // Hierarchical mode: may redundant replicas leave their node when the node
  // cannot be balanced on its own?
  bool allow_cross_node = true;
  // Relax the hierarchy of a layer when its node-confined imbalance exceeds
  // lower_bound * (1 + relax_threshold) and relaxing does better.
  double relax_threshold = 0.02;
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
  std::vector<double> lower_bound;        // [layers] max(1, best max replica load / mean)
  std::vector<int64_t> moves;             // [layers] slots whose expert changed (0 without current)
  std::vector<int64_t> cross_node_replicas;  // [layers] replicas outside their group's node
  std::vector<int64_t> same_gpu_duplicates;  // [layers] replicas sharing a GPU with their twin
  std::vector<uint8_t> hierarchy_relaxed;    // [layers] 1 when replicas left their node
};

// Refuse bad shapes / options (std::invalid_argument naming the argument).
void check_placement_shape(const PlacementShape& shape, const PlacementOptions& options);
// Refuse negative or non-finite loads.
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
// layer carries no load.
double placement_imbalance(const double* load, const int64_t* phy2log, int64_t num_logical,
                           int64_t num_replicas, int64_t num_gpus);

}  // namespace moe_ext::core::eplb
