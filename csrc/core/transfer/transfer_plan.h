// Transfer plan for rearranging expert weights when the placement changes.
//
// Input, per MoE layer: the old and the new physical->logical maps
// (phy2log[slot] = logical expert held by that physical slot, -1 = empty),
// both of ep_size * slots_per_rank slots, slot s living on rank s / slots_per_rank
// at local row s % slots_per_rank.
//
// Output: for every (layer, rank), what that rank does so that afterwards each
// local row whose new id is e >= 0 holds the weights of expert e:
//   unchanged        rows with old id == new id >= 0: nothing to do;
//   local copies     the rank held e in the old map: copy src_row -> dst_row,
//                    at the stage given (LocalCopyStage): straight into place
//                    before the exchange when the exchange does not read
//                    dst_row, else through buffer row `buffer_row`, or straight
//                    after the exchange when the source row keeps its expert;
//   receives         e arrives from src_rank into buffer row `buffer_row`, then
//                    goes to dst_row, or straight into dst_row (buffer_row -1)
//                    when the exchange does not read that row; one receive per
//                    (rank, expert), the smallest number of rows any plan moves;
//   sends            the matching side: (expert, src_row, dst_rank);
//   duplicate fills  further rows of an expert already placed on the rank by a
//                    buffered local copy or a receive: src_row -> dst_row.
// Rows whose new id is -1 keep whatever they held.
//
// Execution order that the plan is built for (the executor follows it):
//   1. local copies of stage "before" (into place) and "through buffer" (into
//      the buffer); they read old rows and write only rows nothing else reads;
//   2. sends (read old rows) and receives (into the buffer, or into rows that no
//      send reads), all posted as one batch;
//   3. after they complete: buffer -> dst rows, then local copies of stage
//      "after", then duplicate fills (their sources are rows already in place).
// With write_before_commit = false nothing is written in place before step 3.
//
// Pairing: the sends of rank h to rank r and the receives of rank r from rank h
// list the same experts in the same order (both are the layer's transfer list
// filtered by the pair), so P2P messages between a pair match one to one.
//
// Choice of sender for each (receiving rank, expert): among the ranks holding
// the expert in the old map, those on the receiver's node first (when
// ranks_per_node > 0), then the one with the fewest rows sent so far in this
// layer, then the one closest after the receiver in rank order. Experts with
// fewer holders are assigned first so that the forced choices are made before
// the free ones.
//
// Deterministic: every rank computes the same plan from the same maps with no
// communication. All arguments are checked before anything is planned; a bad
// argument throws std::invalid_argument and returns nothing.
#pragma once

#include <cstdint>
#include <vector>

namespace moe_ext::core {

struct TransferPlanArgs {
  int64_t num_layers = 0;
  int64_t ep_size = 0;
  int64_t slots_per_rank = 0;
  int64_t ranks_per_node = 0;        // 0: no node structure
  int64_t num_logical_experts = -1;  // -1: unknown, ids only need to be >= -1 (and < 2^31)
  // true: rows that the exchange does not read are written directly (local
  // copies before the exchange, receives straight into place), saving the
  // buffer and a copy. false: no weight row is written before the exchange
  // has completed (layer-by-layer serving, where the model still reads them).
  bool write_before_commit = true;
  // Threads planning chunks of layers concurrently (0: automatic). The plan
  // does not depend on it.
  int64_t num_threads = 0;
};

// Every list is grouped by (layer, rank): the entries of (l, r) are
// [offsets[l * ep_size + r], offsets[l * ep_size + r + 1]); offsets has
// num_layers * ep_size + 1 entries. Rows are local rows of that rank.
// Columns are int32 (ids, ranks and rows are checked to fit; narrow columns
// halve the memory the plan touches, which dominates planning time).
using PlanColumn = std::vector<int32_t>;
struct UnchangedSlots {
  std::vector<int64_t> offsets;
  PlanColumn rows;
};
// When a local copy happens (LocalCopies::stages).
enum LocalCopyStage : int32_t {
  kCopyBeforeExchange = 0,  // straight into place, before the exchange (dst is not read by it)
  kCopyThroughBuffer = 1,   // into the buffer before the exchange, into place after it
  kCopyAfterExchange = 2,   // straight into place after the exchange, from a row that keeps the expert
};
struct LocalCopies {
  std::vector<int64_t> offsets;
  PlanColumn src_rows, dst_rows, buffer_rows, stages;
};
struct Sends {
  std::vector<int64_t> offsets;
  PlanColumn experts, src_rows, dst_ranks, dst_rows;
};
struct Receives {
  std::vector<int64_t> offsets;
  PlanColumn experts, dst_rows, src_ranks, src_rows, buffer_rows;
};
struct DuplicateFills {
  std::vector<int64_t> offsets;
  PlanColumn src_rows, dst_rows;
};

struct ExpertTransferPlan {
  int64_t num_layers = 0;
  int64_t ep_size = 0;
  int64_t slots_per_rank = 0;
  UnchangedSlots unchanged;
  LocalCopies local_copies;
  Sends sends;
  Receives receives;
  DuplicateFills duplicate_fills;
  // Per (layer, rank): rows of the one-layer buffer the rank uses (buffered
  // local copies + receives), always <= slots_per_rank.
  PlanColumn buffer_rows;
};

// old_phy2log / new_phy2log: num_layers x (ep_size * slots_per_rank), row-major.
ExpertTransferPlan plan_expert_transfer(const int64_t* old_phy2log, const int64_t* new_phy2log,
                                        const TransferPlanArgs& args);

}  // namespace moe_ext::core
