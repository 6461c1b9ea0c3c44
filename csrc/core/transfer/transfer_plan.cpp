#include "core/transfer/transfer_plan.h"

#include <algorithm>
#include <exception>
#include <limits>
#include <thread>
#include <utility>

#include "core/check.h"

namespace moe_ext::core {
namespace {

// Plan columns are int32: every value stored is a row, a rank or an expert id,
// all checked to fit before planning starts.
inline int32_t narrow(int64_t value) { return static_cast<int32_t>(value); }

void check_scalar_args(const TransferPlanArgs& args) {
  MOE_CHECK_ARG(args.num_layers >= 0, "plan_expert_transfer: num_layers must be >= 0, got ",
                args.num_layers);
  MOE_CHECK_ARG(args.ep_size >= 1, "plan_expert_transfer: ep_size must be >= 1, got ", args.ep_size);
  MOE_CHECK_ARG(args.slots_per_rank >= 1, "plan_expert_transfer: slots_per_rank must be >= 1, got ",
                args.slots_per_rank);
  MOE_CHECK_ARG(args.ranks_per_node >= 0,
                "plan_expert_transfer: ranks_per_node must be >= 0 (0 = no node structure), got ",
                args.ranks_per_node);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  MOE_CHECK_ARG(args.num_logical_experts >= -1 && args.num_logical_experts <= kMax,
                "plan_expert_transfer: num_logical_experts must be in [0, 2^31), or -1 for unknown, got ",
                args.num_logical_experts);
  MOE_CHECK_ARG(args.ep_size <= kMax / args.slots_per_rank,
                "plan_expert_transfer: ep_size * slots_per_rank must fit in int32, got ", args.ep_size,
                " * ", args.slots_per_rank);
  const int64_t slots = args.ep_size * args.slots_per_rank;
  MOE_CHECK_ARG(args.num_layers <= std::numeric_limits<int64_t>::max() / slots,
                "plan_expert_transfer: num_layers * slots overflows, got ", args.num_layers, " * ",
                slots);
}

// Checks every id of both maps; returns the number of expert ids to size tables by.
int64_t check_ids(const int64_t* old_phy2log, const int64_t* new_phy2log,
                  const TransferPlanArgs& args) {
  const int64_t slots = args.ep_size * args.slots_per_rank;
  const int64_t total = args.num_layers * slots;
  int64_t max_id = -1;
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t* map = pass == 0 ? old_phy2log : new_phy2log;
    const char* name = pass == 0 ? "old_phy2log" : "new_phy2log";
    for (int64_t i = 0; i < total; ++i) {
      const int64_t id = map[i];
      const bool ok = id >= -1 && (args.num_logical_experts < 0 || id < args.num_logical_experts);
      if (!ok) {
        if (args.num_logical_experts < 0) {
          MOE_CHECK_ARG(false, "plan_expert_transfer: ", name, "[layer ", i / slots, ", slot ",
                        i % slots, "] must be a logical expert id >= 0 or -1 (empty), got ", id);
        }
        MOE_CHECK_ARG(false, "plan_expert_transfer: ", name, "[layer ", i / slots, ", slot ",
                      i % slots, "] must be in [-1, ", args.num_logical_experts,
                      ") (num_logical_experts), got ", id);
      }
      max_id = std::max(max_id, id);
    }
  }
  if (args.num_logical_experts >= 0) return args.num_logical_experts;
  // Tables are indexed by expert id: refuse ids far beyond what the slots can hold.
  const int64_t limit = std::min<int64_t>(std::numeric_limits<int32_t>::max(),
                                         std::max<int64_t>(int64_t{1} << 20, 64 * slots));
  MOE_CHECK_ARG(max_id < limit, "plan_expert_transfer: expert ids must be < ", limit,
                " when num_logical_experts is not given, got ", max_id,
                "; pass num_logical_experts");
  return max_id + 1;
}

// Scratch tables reused across layers; "epoch" stamps avoid clearing them.
struct Workspace {
  explicit Workspace(int64_t num_experts, int64_t slots, int64_t ep_size)
      : holder_begin(static_cast<size_t>(num_experts + 1)),
        holder_fill(static_cast<size_t>(num_experts)),
        holder_mark(static_cast<size_t>(num_experts), -1),
        old_mark(static_cast<size_t>(num_experts), -1),
        old_row(static_cast<size_t>(num_experts)),
        kept_mark(static_cast<size_t>(num_experts), -1),
        kept_row(static_cast<size_t>(num_experts)),
        need_mark(static_cast<size_t>(num_experts), -1),
        primary_row(static_cast<size_t>(num_experts)),
        holder_rank(static_cast<size_t>(slots)),
        holder_row(static_cast<size_t>(slots)),
        send_load(static_cast<size_t>(ep_size)),
        by_holder_count_begin(static_cast<size_t>(ep_size + 2)),
        send_count(static_cast<size_t>(ep_size + 1)) {}

  std::vector<int64_t> holder_begin, holder_fill, holder_mark;
  std::vector<int64_t> old_mark, old_row, kept_mark, kept_row, need_mark, primary_row;
  std::vector<int64_t> holder_rank, holder_row;
  std::vector<int64_t> send_load, by_holder_count_begin, send_count;
  std::vector<int64_t> order;        // pending receives, by holder count
  std::vector<int64_t> read_mark;      // per slot: layer whose exchange reads it
  std::vector<int64_t> node_of_rank;   // all 0 without a node structure
  std::vector<int64_t> receiver_rank;  // per pending receive of the layer
  std::vector<int64_t> sender_rank;
};

// Plans args.num_layers layers (checked arguments) with its own workspace:
// layers are independent, so chunks of layers can be planned concurrently.
ExpertTransferPlan plan_layers(const int64_t* old_phy2log, const int64_t* new_phy2log,
                               const TransferPlanArgs& args, int64_t num_experts) {
  const int64_t num_layers = args.num_layers;
  const int64_t ep = args.ep_size;
  const int64_t per_rank = args.slots_per_rank;
  const int64_t slots = ep * per_rank;
  const int64_t rpn = args.ranks_per_node;

  ExpertTransferPlan plan;
  plan.num_layers = num_layers;
  plan.ep_size = ep;
  plan.slots_per_rank = per_rank;
  const size_t groups = static_cast<size_t>(num_layers * ep);
  for (auto* offsets : {&plan.unchanged.offsets, &plan.local_copies.offsets, &plan.sends.offsets,
                        &plan.receives.offsets, &plan.duplicate_fills.offsets})
    offsets->assign(groups + 1, 0);
  plan.buffer_rows.assign(groups, 0);
  // Each list has at most one entry per slot: reserving that much only maps
  // address space (pages are touched as entries are written) and saves every
  // regrowth copy.
  const size_t most = static_cast<size_t>(num_layers * slots);
  for (auto* column : {&plan.unchanged.rows, &plan.local_copies.src_rows,
                       &plan.local_copies.dst_rows, &plan.local_copies.buffer_rows,
                       &plan.local_copies.stages,
                       &plan.sends.experts, &plan.sends.src_rows, &plan.sends.dst_ranks,
                       &plan.sends.dst_rows, &plan.receives.experts, &plan.receives.dst_rows,
                       &plan.receives.src_ranks, &plan.receives.src_rows,
                       &plan.receives.buffer_rows, &plan.duplicate_fills.src_rows,
                       &plan.duplicate_fills.dst_rows})
    column->reserve(most);

  Workspace ws(num_experts, slots, ep);
  ws.read_mark.assign(static_cast<size_t>(slots), -1);
  ws.node_of_rank.resize(static_cast<size_t>(ep));
  for (int64_t rank = 0; rank < ep; ++rank)
    ws.node_of_rank[static_cast<size_t>(rank)] = rpn > 0 ? rank / rpn : 0;

  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const int64_t* old_map = old_phy2log + layer * slots;
    const int64_t* new_map = new_phy2log + layer * slots;

    // Holders of each expert in the old map: (rank, first row on that rank), by rank.
    std::fill(ws.holder_begin.begin(), ws.holder_begin.end(), 0);
    for (int64_t rank = 0; rank < ep; ++rank) {
      const int64_t stamp = layer * ep + rank;
      for (int64_t s = rank * per_rank; s < (rank + 1) * per_rank; ++s) {
        const int64_t e = old_map[s];
        if (e >= 0 && ws.holder_mark[static_cast<size_t>(e)] != stamp) {
          ws.holder_mark[static_cast<size_t>(e)] = stamp;
          ++ws.holder_begin[static_cast<size_t>(e + 1)];
        }
      }
    }
    for (int64_t e = 0; e < num_experts; ++e) {
      ws.holder_begin[static_cast<size_t>(e + 1)] += ws.holder_begin[static_cast<size_t>(e)];
      ws.holder_fill[static_cast<size_t>(e)] = ws.holder_begin[static_cast<size_t>(e)];
    }
    for (int64_t rank = 0; rank < ep; ++rank) {
      for (int64_t row = 0; row < per_rank; ++row) {
        const int64_t e = old_map[rank * per_rank + row];
        if (e < 0) continue;
        int64_t& fill = ws.holder_fill[static_cast<size_t>(e)];
        // Ranks come in order, so a rank already listed is the last one listed.
        if (fill > ws.holder_begin[static_cast<size_t>(e)] &&
            ws.holder_rank[static_cast<size_t>(fill - 1)] == rank)
          continue;
        ws.holder_rank[static_cast<size_t>(fill)] = rank;
        ws.holder_row[static_cast<size_t>(fill)] = row;
        ++fill;
      }
    }

    // Classify every slot, rank by rank.
    const size_t layer_receive_begin = plan.receives.experts.size();
    ws.receiver_rank.clear();
    for (int64_t rank = 0; rank < ep; ++rank) {
      const int64_t stamp = layer * ep + rank;
      const int64_t base = rank * per_rank;
      for (int64_t row = 0; row < per_rank; ++row) {
        const int64_t e = old_map[base + row];
        if (e < 0) continue;
        if (ws.old_mark[static_cast<size_t>(e)] != stamp) {
          ws.old_mark[static_cast<size_t>(e)] = stamp;
          ws.old_row[static_cast<size_t>(e)] = row;
        }
        if (new_map[base + row] == e && ws.kept_mark[static_cast<size_t>(e)] != stamp) {
          ws.kept_mark[static_cast<size_t>(e)] = stamp;
          ws.kept_row[static_cast<size_t>(e)] = row;
        }
      }
      for (int64_t row = 0; row < per_rank; ++row) {
        const int64_t e = new_map[base + row];
        if (e < 0) continue;
        const size_t ue = static_cast<size_t>(e);
        if (old_map[base + row] == e) {
          plan.unchanged.rows.push_back(narrow(row));
          continue;
        }
        if (ws.kept_mark[ue] == stamp) {
          // A row of this rank keeps e: copy from it after the exchange.
          plan.local_copies.src_rows.push_back(narrow(ws.kept_row[ue]));
          plan.local_copies.dst_rows.push_back(narrow(row));
          plan.local_copies.buffer_rows.push_back(-1);
          plan.local_copies.stages.push_back(kCopyAfterExchange);
          continue;
        }
        if (ws.need_mark[ue] == stamp) {
          plan.duplicate_fills.src_rows.push_back(narrow(ws.primary_row[ue]));
          plan.duplicate_fills.dst_rows.push_back(narrow(row));
          continue;
        }
        ws.need_mark[ue] = stamp;
        ws.primary_row[ue] = row;
        if (ws.old_mark[ue] == stamp) {
          plan.local_copies.src_rows.push_back(narrow(ws.old_row[ue]));
          plan.local_copies.dst_rows.push_back(narrow(row));
          plan.local_copies.buffer_rows.push_back(-1);  // decided below
          plan.local_copies.stages.push_back(kCopyThroughBuffer);
          continue;
        }
        MOE_CHECK_ARG(ws.holder_begin[ue + 1] > ws.holder_begin[ue], "plan_expert_transfer: layer ",
                      layer, ": logical expert ", e, " is placed by the new map at slot ",
                      base + row, " (rank ", rank, ", row ", row,
                      ") but no rank holds it in the old map; its weights would be lost");
        plan.receives.experts.push_back(narrow(e));
        plan.receives.dst_rows.push_back(narrow(row));
        plan.receives.buffer_rows.push_back(-1);  // decided below
        plan.receives.src_ranks.push_back(-1);  // chosen below, once the layer is classified
        plan.receives.src_rows.push_back(-1);
        ws.receiver_rank.push_back(rank);
      }
      const size_t group_end = static_cast<size_t>(stamp + 1);
      plan.unchanged.offsets[group_end] = static_cast<int64_t>(plan.unchanged.rows.size());
      plan.local_copies.offsets[group_end] = static_cast<int64_t>(plan.local_copies.dst_rows.size());
      plan.receives.offsets[group_end] = static_cast<int64_t>(plan.receives.experts.size());
      plan.duplicate_fills.offsets[group_end] =
          static_cast<int64_t>(plan.duplicate_fills.dst_rows.size());
    }

    // Choose a sender for every receive: experts with fewer holders first.
    const size_t layer_receive_end = plan.receives.experts.size();
    const size_t pending = layer_receive_end - layer_receive_begin;
    const int64_t* receive_offsets = plan.receives.offsets.data() + layer * ep;
    std::fill(ws.by_holder_count_begin.begin(), ws.by_holder_count_begin.end(), 0);
    for (size_t i = layer_receive_begin; i < layer_receive_end; ++i) {
      const size_t ue = static_cast<size_t>(plan.receives.experts[i]);
      ++ws.by_holder_count_begin[static_cast<size_t>(ws.holder_begin[ue + 1] - ws.holder_begin[ue] + 1)];
    }
    for (int64_t c = 0; c <= ep; ++c)
      ws.by_holder_count_begin[static_cast<size_t>(c + 1)] += ws.by_holder_count_begin[static_cast<size_t>(c)];
    ws.order.resize(pending);
    for (size_t i = layer_receive_begin; i < layer_receive_end; ++i) {
      const size_t ue = static_cast<size_t>(plan.receives.experts[i]);
      const size_t count = static_cast<size_t>(ws.holder_begin[ue + 1] - ws.holder_begin[ue]);
      ws.order[static_cast<size_t>(ws.by_holder_count_begin[count]++)] =
          static_cast<int64_t>(i - layer_receive_begin);
    }
    std::fill(ws.send_load.begin(), ws.send_load.end(), 0);
    ws.sender_rank.resize(pending);
    for (size_t k = 0; k < pending; ++k) {
      const size_t p = static_cast<size_t>(ws.order[k]);
      const size_t i = layer_receive_begin + p;
      const int64_t receiver = ws.receiver_rank[p];
      const int64_t receiver_node = ws.node_of_rank[static_cast<size_t>(receiver)];
      const size_t ue = static_cast<size_t>(plan.receives.experts[i]);
      // One ordered key per candidate: (other node, rows sent so far, distance
      // after the receiver); each part < 2^31, so the key is an exact order.
      int64_t best = ws.holder_begin[ue];
      uint64_t best_key = std::numeric_limits<uint64_t>::max();
      for (int64_t h = ws.holder_begin[ue]; h < ws.holder_begin[ue + 1]; ++h) {
        const int64_t rank = ws.holder_rank[static_cast<size_t>(h)];
        const uint64_t far = ws.node_of_rank[static_cast<size_t>(rank)] != receiver_node ? 1 : 0;
        const uint64_t load = static_cast<uint64_t>(ws.send_load[static_cast<size_t>(rank)]);
        const uint64_t distance = static_cast<uint64_t>(rank >= receiver ? rank - receiver : rank - receiver + ep);
        const uint64_t key = (far << 62) | (load << 31) | distance;
        if (key < best_key) {
          best_key = key;
          best = h;
        }
      }
      MOE_INTERNAL_ASSERT(best < ws.holder_begin[ue + 1], "receive without a holder");
      const int64_t sender = ws.holder_rank[static_cast<size_t>(best)];
      ++ws.send_load[static_cast<size_t>(sender)];
      plan.receives.src_ranks[i] = narrow(sender);
      plan.receives.src_rows[i] = narrow(ws.holder_row[static_cast<size_t>(best)]);
      ws.sender_rank[p] = sender;
    }

    // Sends: the layer's receives regrouped by sender, keeping their order (pairing).
    std::fill(ws.send_count.begin(), ws.send_count.end(), 0);
    for (size_t p = 0; p < pending; ++p) ++ws.send_count[static_cast<size_t>(ws.sender_rank[p] + 1)];
    const size_t send_base = plan.sends.experts.size();
    for (int64_t h = 0; h < ep; ++h) {
      ws.send_count[static_cast<size_t>(h + 1)] += ws.send_count[static_cast<size_t>(h)];
      plan.sends.offsets[static_cast<size_t>(layer * ep + h + 1)] =
          static_cast<int64_t>(send_base) + ws.send_count[static_cast<size_t>(h + 1)];
    }
    for (auto* column : {&plan.sends.experts, &plan.sends.src_rows, &plan.sends.dst_ranks,
                         &plan.sends.dst_rows})
      column->resize(send_base + pending);
    for (int64_t rank = 0; rank < ep; ++rank) {
      for (int64_t i = receive_offsets[rank]; i < receive_offsets[rank + 1]; ++i) {
        const size_t p = static_cast<size_t>(i) - layer_receive_begin;
        const size_t at = send_base + static_cast<size_t>(ws.send_count[static_cast<size_t>(ws.sender_rank[p])]++);
        plan.sends.experts[at] = plan.receives.experts[static_cast<size_t>(i)];
        plan.sends.src_rows[at] = plan.receives.src_rows[static_cast<size_t>(i)];
        plan.sends.dst_ranks[at] = narrow(rank);
        plan.sends.dst_rows[at] = plan.receives.dst_rows[static_cast<size_t>(i)];
      }
    }

    // Rows the exchange reads on each rank: send sources and local copy sources.
    // Any other row may be written before or during the exchange (when allowed):
    // local copies then go straight into place and receives land in place,
    // without the buffer.
    for (int64_t rank = 0; rank < ep; ++rank) {
      const size_t group = static_cast<size_t>(layer * ep + rank);
      for (int64_t i = plan.sends.offsets[group]; i < plan.sends.offsets[group + 1]; ++i)
        ws.read_mark[static_cast<size_t>(rank * per_rank + plan.sends.src_rows[static_cast<size_t>(i)])] = layer;
      for (int64_t i = plan.local_copies.offsets[group]; i < plan.local_copies.offsets[group + 1]; ++i)
        ws.read_mark[static_cast<size_t>(rank * per_rank + plan.local_copies.src_rows[static_cast<size_t>(i)])] = layer;
    }
    for (int64_t rank = 0; rank < ep; ++rank) {
      const size_t group = static_cast<size_t>(layer * ep + rank);
      auto free_row = [&](int32_t row) {
        return args.write_before_commit && ws.read_mark[static_cast<size_t>(rank * per_rank + row)] != layer;
      };
      int32_t buffer_rows = 0;
      for (int64_t i = plan.local_copies.offsets[group]; i < plan.local_copies.offsets[group + 1]; ++i) {
        const size_t at = static_cast<size_t>(i);
        if (plan.local_copies.stages[at] != kCopyThroughBuffer) continue;
        if (free_row(plan.local_copies.dst_rows[at])) {
          plan.local_copies.stages[at] = kCopyBeforeExchange;
        } else {
          plan.local_copies.buffer_rows[at] = buffer_rows++;
        }
      }
      for (int64_t i = plan.receives.offsets[group]; i < plan.receives.offsets[group + 1]; ++i) {
        const size_t at = static_cast<size_t>(i);
        if (!free_row(plan.receives.dst_rows[at])) plan.receives.buffer_rows[at] = buffer_rows++;
      }
      plan.buffer_rows[group] = buffer_rows;
    }
  }
  return plan;
}

template <typename Offsets, typename... Columns>
void append_list(Offsets& offsets, const Offsets& part_offsets, size_t group_base, Columns&&... columns) {
  const int64_t shift = offsets[group_base];
  for (size_t g = 1; g < part_offsets.size(); ++g) offsets[group_base + g] = shift + part_offsets[g];
  (columns.first.insert(columns.first.end(), columns.second.begin(), columns.second.end()), ...);
}

void append_plan(ExpertTransferPlan& plan, const ExpertTransferPlan& part, size_t group_base) {
  auto col = [](PlanColumn& into, const PlanColumn& from) {
    return std::pair<PlanColumn&, const PlanColumn&>(into, from);
  };
  append_list(plan.unchanged.offsets, part.unchanged.offsets, group_base,
              col(plan.unchanged.rows, part.unchanged.rows));
  append_list(plan.local_copies.offsets, part.local_copies.offsets, group_base,
              col(plan.local_copies.src_rows, part.local_copies.src_rows),
              col(plan.local_copies.dst_rows, part.local_copies.dst_rows),
              col(plan.local_copies.buffer_rows, part.local_copies.buffer_rows),
              col(plan.local_copies.stages, part.local_copies.stages));
  append_list(plan.sends.offsets, part.sends.offsets, group_base,
              col(plan.sends.experts, part.sends.experts), col(plan.sends.src_rows, part.sends.src_rows),
              col(plan.sends.dst_ranks, part.sends.dst_ranks), col(plan.sends.dst_rows, part.sends.dst_rows));
  append_list(plan.receives.offsets, part.receives.offsets, group_base,
              col(plan.receives.experts, part.receives.experts),
              col(plan.receives.dst_rows, part.receives.dst_rows),
              col(plan.receives.src_ranks, part.receives.src_ranks),
              col(plan.receives.src_rows, part.receives.src_rows),
              col(plan.receives.buffer_rows, part.receives.buffer_rows));
  append_list(plan.duplicate_fills.offsets, part.duplicate_fills.offsets, group_base,
              col(plan.duplicate_fills.src_rows, part.duplicate_fills.src_rows),
              col(plan.duplicate_fills.dst_rows, part.duplicate_fills.dst_rows));
  std::copy(part.buffer_rows.begin(), part.buffer_rows.end(), plan.buffer_rows.begin() + group_base);
}

}  // namespace

ExpertTransferPlan plan_expert_transfer(const int64_t* old_phy2log, const int64_t* new_phy2log,
                                        const TransferPlanArgs& args) {
  check_scalar_args(args);
  MOE_CHECK_ARG(args.num_threads >= 0, "plan_expert_transfer: num_threads must be >= 0 (0 = automatic), got ",
                args.num_threads);
  MOE_CHECK_ARG(args.num_layers == 0 || (old_phy2log != nullptr && new_phy2log != nullptr),
                "plan_expert_transfer: maps must not be null");
  const int64_t num_experts = check_ids(old_phy2log, new_phy2log, args);
  const int64_t slots = args.ep_size * args.slots_per_rank;

  // Chunks of consecutive layers on threads. Each layer's plan depends only on
  // its own maps, so the result is the same for any thread count.
  int64_t threads = args.num_threads;
  if (threads == 0) {
    // Automatic: a thread per ~4k slots (~0.2 ms of planning), at most the hardware's.
    const int64_t hardware = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
    threads = std::min<int64_t>(hardware, std::max<int64_t>(1, args.num_layers * slots / 4096));
  }
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, args.num_layers));
  if (threads == 1) return plan_layers(old_phy2log, new_phy2log, args, num_experts);

  std::vector<ExpertTransferPlan> parts(static_cast<size_t>(threads));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads));
  auto first_layer = [&](int64_t t) { return args.num_layers * t / threads; };
  for (int64_t t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      try {
        TransferPlanArgs chunk = args;
        chunk.num_layers = first_layer(t + 1) - first_layer(t);
        const int64_t offset = first_layer(t) * slots;
        parts[static_cast<size_t>(t)] = plan_layers(old_phy2log + offset, new_phy2log + offset, chunk, num_experts);
      } catch (...) {
        errors[static_cast<size_t>(t)] = std::current_exception();
      }
    });
  }
  for (auto& worker : workers) worker.join();
  for (auto& error : errors)
    if (error) std::rethrow_exception(error);

  ExpertTransferPlan plan;
  plan.num_layers = args.num_layers;
  plan.ep_size = args.ep_size;
  plan.slots_per_rank = args.slots_per_rank;
  const size_t groups = static_cast<size_t>(args.num_layers * args.ep_size);
  for (auto* offsets : {&plan.unchanged.offsets, &plan.local_copies.offsets, &plan.sends.offsets,
                        &plan.receives.offsets, &plan.duplicate_fills.offsets})
    offsets->assign(groups + 1, 0);
  plan.buffer_rows.assign(groups, 0);
  for (int64_t t = 0; t < threads; ++t)
    append_plan(plan, parts[static_cast<size_t>(t)], static_cast<size_t>(first_layer(t) * args.ep_size));
  return plan;
}

}  // namespace moe_ext::core
