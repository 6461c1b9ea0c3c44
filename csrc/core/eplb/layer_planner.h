// One layer of the placement planner (internal).
#pragma once

#include <cstdint>
#include <vector>

#include "core/eplb/placement.h"
#include "core/eplb/slot_state.h"

namespace moe_ext::core::eplb::detail {

struct LayerPlan {
  std::vector<int32_t> slot_expert;  // [replicas]
  double imbalance = 1.0;
  double lower_bound = 1.0;         // of the mode the plan keeps (strict: node-level)
  double global_lower_bound = 1.0;  // any placement, hierarchy ignored
  double relaxed_imbalance = 1.0;   // best found with the hierarchy relaxed (else = imbalance)
  int64_t moves = 0;
  int64_t cross_node = 0;
  int64_t duplicates = 0;
  bool relaxed = false;
};

LayerPlan plan_layer_from_scratch(const LayerGeometry& geometry, const double* load,
                                  const PlacementOptions& options);

// current: this layer's [replicas] map in force now (ids already validated).
LayerPlan plan_layer_from_current(const LayerGeometry& geometry, const double* load,
                                  const int64_t* current, const PlacementOptions& options,
                                  int64_t layer_index);

}  // namespace moe_ext::core::eplb::detail
