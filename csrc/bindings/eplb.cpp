// pybind11 access to the EPLB placement planner. Takes numpy arrays (Python
// converts tensors with .numpy(), no copy for contiguous CPU tensors) and
// returns numpy arrays; the planner runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "bindings/bindings.h"
#include "core/check.h"
#include "core/eplb/placement.h"

namespace py = pybind11;

namespace moe_ext::bindings {

namespace {

template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& values, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(values));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, owned->data(), free_when_done);
}

py::dict plan(py::array_t<double, py::array::c_style | py::array::forcecast> weight,
              int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus,
              std::optional<py::array_t<int64_t, py::array::c_style | py::array::forcecast>> current,
              int64_t max_moves, bool allow_cross_node, double relax_threshold, double tolerance,
              int64_t num_threads, bool with_log2phy, bool refine_counts, bool evaluate_relaxed) {
  MOE_CHECK_ARG(weight.ndim() == 2, "eplb: weight must be 2-D [layers, logical experts], got ",
                weight.ndim(), " dimensions");
  core::eplb::PlacementShape shape;
  shape.num_layers = weight.shape(0);
  shape.num_logical = weight.shape(1);
  shape.num_replicas = num_replicas;
  shape.num_groups = num_groups;
  shape.num_nodes = num_nodes;
  shape.num_gpus = num_gpus;
  core::eplb::PlacementOptions options;
  options.allow_cross_node = allow_cross_node;
  options.relax_threshold = relax_threshold;
  options.migration_tolerance = tolerance;
  options.max_moves = max_moves;
  options.num_threads = num_threads;
  options.build_log2phy = with_log2phy;
  options.refine_counts = refine_counts;
  options.evaluate_relaxed = evaluate_relaxed;
  const int64_t* current_data = nullptr;
  if (current.has_value()) {
    MOE_CHECK_ARG(current->ndim() == 2 && current->shape(0) == shape.num_layers &&
                      current->shape(1) == num_replicas,
                  "eplb: current must have shape [", shape.num_layers, ", ", num_replicas,
                  "] (layers, num_replicas)");
    current_data = current->data();
  }
  // Validate before sizing the outputs from the shape; the planner checks again.
  core::eplb::check_placement_shape(shape, options);
  const py::ssize_t layers = shape.num_layers, experts = shape.num_logical;
  const py::ssize_t max_replicas = shape.max_replicas();
  // numpy owns the outputs (its allocator backs large arrays with huge pages,
  // so the 32 MB log2phy of the largest case costs no page-fault storm); the
  // planner writes them in place, each layer by the thread that plans it.
  py::array_t<int64_t> phy2log({layers, static_cast<py::ssize_t>(num_replicas)});
  py::array_t<int64_t> log2phy;
  if (with_log2phy) log2phy = py::array_t<int64_t>({layers, experts, max_replicas});
  py::array_t<int64_t> logcnt({layers, experts});
  py::array_t<double> imbalance(layers), lower_bound(layers), global_lower_bound(layers),
      relaxed_imbalance(layers);
  py::array_t<int64_t> moves(layers), cross_node(layers), duplicates(layers);
  py::array_t<uint8_t> relaxed(layers);
  core::eplb::PlacementOutputs outputs;
  outputs.phy2log = phy2log.mutable_data();
  outputs.log2phy = with_log2phy ? log2phy.mutable_data() : nullptr;
  outputs.logcnt = logcnt.mutable_data();
  outputs.imbalance = imbalance.mutable_data();
  outputs.lower_bound = lower_bound.mutable_data();
  outputs.global_lower_bound = global_lower_bound.mutable_data();
  outputs.relaxed_imbalance = relaxed_imbalance.mutable_data();
  outputs.moves = moves.mutable_data();
  outputs.cross_node_replicas = cross_node.mutable_data();
  outputs.same_gpu_duplicates = duplicates.mutable_data();
  outputs.hierarchy_relaxed = relaxed.mutable_data();
  {
    py::gil_scoped_release release;
    core::eplb::plan_placement_into(shape, weight.data(), current_data, options, outputs);
  }
  py::dict out;
  out["phy2log"] = phy2log;
  if (with_log2phy) out["log2phy"] = log2phy;
  out["logcnt"] = logcnt;
  out["imbalance"] = imbalance;
  out["lower_bound"] = lower_bound;
  out["global_lower_bound"] = global_lower_bound;
  out["relaxed_imbalance"] = relaxed_imbalance;
  out["moves"] = moves;
  out["cross_node_replicas"] = cross_node;
  out["same_gpu_duplicates"] = duplicates;
  out["hierarchy_relaxed"] = relaxed;
  return out;
}

}  // namespace

void bind_eplb(py::module_& m) {
  m.def("eplb_plan", &plan, py::arg("weight"), py::arg("num_replicas"), py::arg("num_groups"),
        py::arg("num_nodes"), py::arg("num_gpus"), py::arg("current") = py::none(),
        py::arg("max_moves") = -1, py::arg("allow_cross_node") = false,
        py::arg("relax_threshold") = 0.02, py::arg("tolerance") = 0.02,
        py::arg("num_threads") = 1, py::arg("with_log2phy") = true,
        py::arg("refine_counts") = true, py::arg("evaluate_relaxed") = true,
        "Plan expert placement (numpy in, dict of numpy arrays out). See moe_ext.eplb.");
  m.def(
      "eplb_imbalance",
      [](py::array_t<double, py::array::c_style | py::array::forcecast> weight,
         py::array_t<int64_t, py::array::c_style | py::array::forcecast> phy2log,
         int64_t num_gpus) {
        MOE_CHECK_ARG(weight.ndim() == 2 && phy2log.ndim() == 2 &&
                          weight.shape(0) == phy2log.shape(0),
                      "eplb: weight [layers, experts] and phy2log [layers, slots] must agree");
        MOE_CHECK_ARG(num_gpus >= 1 && phy2log.shape(1) % num_gpus == 0,
                      "eplb: num_gpus must divide the slots, got ", num_gpus);
        core::eplb::PlacementShape shape;
        shape.num_layers = weight.shape(0);
        shape.num_logical = weight.shape(1);
        shape.num_replicas = phy2log.shape(1);
        core::eplb::check_current_placement(shape, phy2log.data());
        core::eplb::check_placement_loads(shape, weight.data());
        std::vector<double> out(static_cast<size_t>(shape.num_layers));
        for (int64_t l = 0; l < shape.num_layers; ++l) {
          out[l] = core::eplb::placement_imbalance(weight.data() + l * shape.num_logical,
                                                   phy2log.data() + l * shape.num_replicas,
                                                   shape.num_logical, shape.num_replicas, num_gpus);
        }
        return to_numpy(std::move(out), {shape.num_layers});
      },
      py::arg("weight"), py::arg("phy2log"), py::arg("num_gpus"),
      "Per-layer imbalance (max GPU load / mean GPU load) of a placement.");
}

}  // namespace moe_ext::bindings
