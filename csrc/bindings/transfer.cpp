// The expert transfer planner on numpy arrays: maps in, the plan's columns out
// (zero-copy: each column's std::vector is handed to numpy with its storage).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <utility>
#include <vector>

#include "bindings/bindings.h"
#include "core/transfer/transfer_plan.h"

namespace py = pybind11;

namespace moe_ext::bindings {
namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& column) {
  auto* owned = new std::vector<T>(std::move(column));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, {sizeof(T)}, owned->data(),
                        free_when_done);
}

py::dict plan_to_dict(core::ExpertTransferPlan&& plan) {
  py::dict out;
  out["num_layers"] = plan.num_layers;
  out["ep_size"] = plan.ep_size;
  out["slots_per_rank"] = plan.slots_per_rank;
  auto put = [&](const std::string& prefix, const char* name, auto& column) {
    out[py::str(prefix + name)] = to_numpy(std::move(column));
  };
  put("unchanged_", "offsets", plan.unchanged.offsets);
  put("unchanged_", "rows", plan.unchanged.rows);
  put("local_copy_", "offsets", plan.local_copies.offsets);
  put("local_copy_", "src_rows", plan.local_copies.src_rows);
  put("local_copy_", "dst_rows", plan.local_copies.dst_rows);
  put("local_copy_", "buffer_rows", plan.local_copies.buffer_rows);
  put("local_copy_", "stages", plan.local_copies.stages);
  put("send_", "offsets", plan.sends.offsets);
  put("send_", "experts", plan.sends.experts);
  put("send_", "src_rows", plan.sends.src_rows);
  put("send_", "dst_ranks", plan.sends.dst_ranks);
  put("send_", "dst_rows", plan.sends.dst_rows);
  put("recv_", "offsets", plan.receives.offsets);
  put("recv_", "experts", plan.receives.experts);
  put("recv_", "dst_rows", plan.receives.dst_rows);
  put("recv_", "src_ranks", plan.receives.src_ranks);
  put("recv_", "src_rows", plan.receives.src_rows);
  put("recv_", "buffer_rows", plan.receives.buffer_rows);
  put("duplicate_fill_", "offsets", plan.duplicate_fills.offsets);
  put("duplicate_fill_", "src_rows", plan.duplicate_fills.src_rows);
  put("duplicate_fill_", "dst_rows", plan.duplicate_fills.dst_rows);
  put("", "buffer_rows", plan.buffer_rows);
  return out;
}

}  // namespace

void bind_transfer(py::module_& m) {
  m.def(
      "plan_expert_transfer",
      [](const Int64Array& old_phy2log, const Int64Array& new_phy2log, int64_t ep_size,
         int64_t slots_per_rank, int64_t ranks_per_node, int64_t num_logical_experts,
         bool write_before_commit) {
        if (old_phy2log.ndim() != 2 || new_phy2log.ndim() != 2)
          throw py::value_error("plan_expert_transfer: old_phy2log and new_phy2log must be 2-D "
                                "(num_layers, num_slots), got " + std::to_string(old_phy2log.ndim()) +
                                "-D and " + std::to_string(new_phy2log.ndim()) + "-D");
        if (old_phy2log.shape(0) != new_phy2log.shape(0) || old_phy2log.shape(1) != new_phy2log.shape(1))
          throw py::value_error("plan_expert_transfer: old_phy2log and new_phy2log must have the same "
                                "shape, got (" + std::to_string(old_phy2log.shape(0)) + ", " +
                                std::to_string(old_phy2log.shape(1)) + ") and (" +
                                std::to_string(new_phy2log.shape(0)) + ", " +
                                std::to_string(new_phy2log.shape(1)) + ")");
        if (ep_size >= 1 && slots_per_rank >= 1 && old_phy2log.shape(1) != ep_size * slots_per_rank)
          throw py::value_error("plan_expert_transfer: maps must have ep_size * slots_per_rank = " +
                                std::to_string(ep_size * slots_per_rank) + " columns, got " +
                                std::to_string(old_phy2log.shape(1)));
        core::TransferPlanArgs args;
        args.num_layers = old_phy2log.shape(0);
        args.ep_size = ep_size;
        args.slots_per_rank = slots_per_rank;
        args.ranks_per_node = ranks_per_node;
        args.num_logical_experts = num_logical_experts;
        args.write_before_commit = write_before_commit;
        core::ExpertTransferPlan plan;
        {
          py::gil_scoped_release release;
          plan = core::plan_expert_transfer(old_phy2log.data(), new_phy2log.data(), args);
        }
        return plan_to_dict(std::move(plan));
      },
      py::arg("old_phy2log"), py::arg("new_phy2log"), py::arg("ep_size"), py::arg("slots_per_rank"),
      py::arg("ranks_per_node") = 0, py::arg("num_logical_experts") = -1,
      py::arg("write_before_commit") = true,
      "Plan the expert weight transfer for every layer at once; returns the plan's columns "
      "as numpy arrays: offsets int64, the other columns int32 (see core/transfer/transfer_plan.h).");
}

}  // namespace moe_ext::bindings
