// Argument checks, threads over layers, and the three maps of the contract.
#include "core/eplb/placement.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <thread>
#include <vector>

#include "core/check.h"
#include "core/eplb/layer_planner.h"

namespace moe_ext::core::eplb {

void check_placement_shape(const PlacementShape& shape, const PlacementOptions& options) {
  MOE_CHECK_ARG(shape.num_layers >= 0, "eplb: weight must have >= 0 layers, got ", shape.num_layers);
  MOE_CHECK_ARG(shape.num_logical >= 1, "eplb: weight must have >= 1 logical expert, got ",
                shape.num_logical);
  MOE_CHECK_ARG(shape.num_gpus >= 1, "eplb: num_gpus must be >= 1, got ", shape.num_gpus);
  MOE_CHECK_ARG(shape.num_nodes >= 1, "eplb: num_nodes must be >= 1, got ", shape.num_nodes);
  MOE_CHECK_ARG(shape.num_groups >= 1, "eplb: num_groups must be >= 1, got ", shape.num_groups);
  MOE_CHECK_ARG(shape.num_replicas >= shape.num_logical,
                "eplb: num_replicas must be >= the number of logical experts (", shape.num_logical,
                "), got ", shape.num_replicas);
  MOE_CHECK_ARG(shape.num_replicas % shape.num_gpus == 0,
                "eplb: num_replicas must be divisible by num_gpus (", shape.num_gpus, "), got ",
                shape.num_replicas);
  if (shape.hierarchical()) {  // global mode ignores num_nodes, as the public algorithm does
    MOE_CHECK_ARG(shape.num_gpus % shape.num_nodes == 0,
                  "eplb: num_gpus must be divisible by num_nodes (", shape.num_nodes,
                  ") in hierarchical mode, got ", shape.num_gpus);
  }
  MOE_CHECK_ARG(shape.num_replicas <= (int64_t{1} << 30),
                "eplb: num_replicas must be <= 2^30, got ", shape.num_replicas);
  if (shape.hierarchical()) {
    MOE_CHECK_ARG(shape.num_logical % shape.num_groups == 0,
                  "eplb: the number of logical experts must be divisible by num_groups (",
                  shape.num_groups, ") in hierarchical mode, got ", shape.num_logical);
  }
  MOE_CHECK_ARG(options.relax_threshold >= 0.0 && std::isfinite(options.relax_threshold),
                "eplb: relax_threshold must be finite and >= 0, got ", options.relax_threshold);
  MOE_CHECK_ARG(options.migration_tolerance >= 0.0 && std::isfinite(options.migration_tolerance),
                "eplb: tolerance must be finite and >= 0, got ", options.migration_tolerance);
  MOE_CHECK_ARG(options.num_threads >= 0, "eplb: num_threads must be >= 0, got ",
                options.num_threads);
}

void check_placement_loads(const PlacementShape& shape, const double* weight) {
  const int64_t total = shape.num_layers * shape.num_logical;
  for (int64_t i = 0; i < total; ++i) {
    MOE_CHECK_ARG(std::isfinite(weight[i]) && weight[i] >= 0.0,
                  "eplb: weight must be finite and >= 0, got ", weight[i], " at [layer ",
                  i / shape.num_logical, ", expert ", i % shape.num_logical, "]");
  }
}

void check_current_placement(const PlacementShape& shape, const int64_t* current) {
  const int64_t total = shape.num_layers * shape.num_replicas;
  for (int64_t i = 0; i < total; ++i) {
    MOE_CHECK_ARG(current[i] >= 0 && current[i] < shape.num_logical,
                  "eplb: current must hold expert ids in [0, ", shape.num_logical, "), got ",
                  current[i], " at [layer ", i / shape.num_replicas, ", slot ",
                  i % shape.num_replicas, "]");
  }
}

double placement_imbalance(const double* load, const int64_t* phy2log, int64_t num_logical,
                           int64_t num_replicas, int64_t num_gpus) {
  // Scale by the largest load so that sums of loads near the double range
  // stay finite (the ratio does not depend on the scale).
  double scale = 0.0;
  for (int64_t e = 0; e < num_logical; ++e) {
    MOE_CHECK_ARG(std::isfinite(load[e]) && load[e] >= 0.0,
                  "eplb: weight must be finite and >= 0, got ", load[e], " at expert ", e);
    scale = std::max(scale, load[e]);
  }
  if (!(scale > 0.0)) return 1.0;
  std::vector<int64_t> counts(static_cast<size_t>(num_logical), 0);
  for (int64_t p = 0; p < num_replicas; ++p) counts[phy2log[p]] += 1;
  const int64_t per_gpu = num_replicas / num_gpus;
  double total = 0.0, hottest = 0.0;
  for (int64_t g = 0; g < num_gpus; ++g) {
    double gpu_load = 0.0;
    for (int64_t p = g * per_gpu; p < (g + 1) * per_gpu; ++p) {
      gpu_load += load[phy2log[p]] / scale / static_cast<double>(counts[phy2log[p]]);
    }
    total += gpu_load;
    hottest = std::max(hottest, gpu_load);
  }
  if (!(total > 0.0)) return 1.0;
  return hottest / (total / static_cast<double>(num_gpus));
}

void plan_placement_into(const PlacementShape& shape, const double* weight,
                         const int64_t* current, const PlacementOptions& options,
                         const PlacementOutputs& outputs) {
  check_placement_shape(shape, options);
  check_placement_loads(shape, weight);
  const int64_t layers = shape.num_layers, experts = shape.num_logical, slots = shape.num_replicas;
  if (current != nullptr) {
    check_current_placement(shape, current);
    if (options.max_moves >= 0) {
      for (int64_t l = 0; l < layers; ++l) {
        std::vector<char> seen(static_cast<size_t>(experts), 0);
        int64_t missing = experts;
        for (int64_t p = 0; p < slots; ++p) {
          missing -= !seen[current[l * slots + p]];
          seen[current[l * slots + p]] = 1;
        }
        MOE_CHECK_ARG(missing <= options.max_moves, "eplb: max_moves (", options.max_moves,
                      ") is below the ", missing, " experts that current lacks in layer ", l,
                      " (every expert needs a replica)");
      }
    }
  }

  detail::LayerGeometry geometry;
  geometry.num_logical = experts;
  geometry.num_replicas = slots;
  geometry.num_gpus = shape.num_gpus;
  geometry.num_nodes = shape.effective_nodes();
  geometry.slots_per_gpu = shape.slots_per_gpu();
  geometry.gpus_per_node = shape.gpus_per_node();
  geometry.hierarchical = shape.hierarchical();
  geometry.num_groups = shape.num_groups;
  geometry.group_size = geometry.hierarchical ? experts / shape.num_groups : experts;

  const int64_t max_replicas = shape.max_replicas();
  if (layers == 0) return;  // (empty outputs may be null)
  MOE_INTERNAL_ASSERT(outputs.phy2log != nullptr && outputs.logcnt != nullptr &&
                      outputs.imbalance != nullptr && outputs.lower_bound != nullptr &&
                      outputs.global_lower_bound != nullptr && outputs.relaxed_imbalance != nullptr &&
                      outputs.moves != nullptr && outputs.cross_node_replicas != nullptr &&
                      outputs.same_gpu_duplicates != nullptr && outputs.hierarchy_relaxed != nullptr);

  auto plan_one = [&](int64_t l) {
    // The layer's loads over their maximum: every sum the planner forms stays
    // below experts (no overflow for loads near the double range).
    std::vector<double> scaled(weight + l * experts, weight + (l + 1) * experts);
    const double scale = *std::max_element(scaled.begin(), scaled.end());
    if (scale > 0.0) {
      for (double& x : scaled) x /= scale;
    }
    const double* load = scaled.data();
    detail::LayerPlan plan =
        current == nullptr
            ? detail::plan_layer_from_scratch(geometry, load, options)
            : detail::plan_layer_from_current(geometry, load, current + l * slots, options, l);
    int64_t* phy2log = outputs.phy2log + l * slots;
    int64_t* logcnt = outputs.logcnt + l * experts;
    std::fill(logcnt, logcnt + experts, int64_t{0});
    int64_t* log2phy =
        outputs.log2phy != nullptr ? outputs.log2phy + l * experts * max_replicas : nullptr;
    if (log2phy != nullptr) std::fill(log2phy, log2phy + experts * max_replicas, int64_t{-1});
    for (int64_t p = 0; p < slots; ++p) {
      const int64_t e = plan.slot_expert[p];
      MOE_INTERNAL_ASSERT(e >= 0 && e < experts, "slot ", p, " of layer ", l, " holds ", e);
      phy2log[p] = e;
      MOE_INTERNAL_ASSERT(logcnt[e] < max_replicas, "expert ", e, " over-replicated");
      if (log2phy != nullptr) log2phy[e * max_replicas + logcnt[e]] = p;
      logcnt[e] += 1;
    }
    for (int64_t e = 0; e < experts; ++e) {
      MOE_INTERNAL_ASSERT(logcnt[e] >= 1, "expert ", e, " of layer ", l, " has no replica");
    }
    outputs.imbalance[l] = plan.imbalance;
    outputs.lower_bound[l] = plan.lower_bound;
    outputs.global_lower_bound[l] = plan.global_lower_bound;
    outputs.relaxed_imbalance[l] = plan.relaxed_imbalance;
    outputs.moves[l] = plan.moves;
    outputs.cross_node_replicas[l] = plan.cross_node;
    outputs.same_gpu_duplicates[l] = plan.duplicates;
    outputs.hierarchy_relaxed[l] = plan.relaxed ? 1 : 0;
  };

  int64_t threads = options.num_threads;
  if (threads == 0) threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  threads = std::min(threads, layers);
  if (threads <= 1) {
    for (int64_t l = 0; l < layers; ++l) plan_one(l);
    return;
  }
  // Layers are independent and each writes only its own rows: the plan does
  // not depend on the number of threads or their timing.
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  std::vector<std::thread> workers;
  for (int64_t t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      try {
        for (int64_t l = t; l < layers; l += threads) plan_one(l);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (auto& worker : workers) worker.join();
  for (auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

PlacementResult plan_placement(const PlacementShape& shape, const double* weight,
                               const int64_t* current, const PlacementOptions& options) {
  check_placement_shape(shape, options);  // before sizing anything from the shape
  const size_t layers = static_cast<size_t>(std::max<int64_t>(shape.num_layers, 0));
  const size_t experts = static_cast<size_t>(shape.num_logical);
  PlacementResult result;
  result.max_replicas = shape.max_replicas();
  result.phy2log.assign(layers * static_cast<size_t>(shape.num_replicas), -1);
  if (options.build_log2phy) {
    result.log2phy.assign(layers * experts * static_cast<size_t>(result.max_replicas), -1);
  }
  result.logcnt.assign(layers * experts, 0);
  result.imbalance.assign(layers, 1.0);
  result.lower_bound.assign(layers, 1.0);
  result.global_lower_bound.assign(layers, 1.0);
  result.relaxed_imbalance.assign(layers, 1.0);
  result.moves.assign(layers, 0);
  result.cross_node_replicas.assign(layers, 0);
  result.same_gpu_duplicates.assign(layers, 0);
  result.hierarchy_relaxed.assign(layers, 0);
  PlacementOutputs outputs;
  outputs.phy2log = result.phy2log.data();
  outputs.log2phy = options.build_log2phy ? result.log2phy.data() : nullptr;
  outputs.logcnt = result.logcnt.data();
  outputs.imbalance = result.imbalance.data();
  outputs.lower_bound = result.lower_bound.data();
  outputs.global_lower_bound = result.global_lower_bound.data();
  outputs.relaxed_imbalance = result.relaxed_imbalance.data();
  outputs.moves = result.moves.data();
  outputs.cross_node_replicas = result.cross_node_replicas.data();
  outputs.same_gpu_duplicates = result.same_gpu_duplicates.data();
  outputs.hierarchy_relaxed = result.hierarchy_relaxed.data();
  plan_placement_into(shape, weight, current, options, outputs);
  return result;
}

}  // namespace moe_ext::core::eplb
