// Host twin of the Ascend C API subset that moe_ext's AscendC kernels use.
//
// CANN (and with it the AscendC compiler, CANN's own CPU debug mode and the
// real `kernel_operator.h`) cannot be installed on the machines this project
// is built and tested on. So that the kernels in csrc/ascend/ do not rot and
// their logic is checked, CI compiles them against this header - same source,
// same calls - and runs each launch block by block on the host
// (`AscendC::twin::launch`), comparing results with the core reference.
//
// The twin checks the rules the hardware imposes and throws
// `AscendC::twin::RuleViolation` where a kernel breaks one. Each rule, with the
// Ascend C documentation page it comes from (hiascend.com, CANN 8.x "Ascend C
// API reference"), so that a user with CANN can check them:
//
//  R1  Unified Buffer (UB) operands start 32-byte aligned
//      ("General Restrictions" / "General Description and Restrictions":
//      alignment requirements per memory unit, UB: 32-byte aligned).
//  R2  DataCopy between GM and UB moves a multiple of 32 bytes; unaligned
//      lengths go through DataCopyPad ("DataCopy" and "DataCopyPad (ISASI)":
//      non-aligned movement). DataCopyPad's GM-side strides are in bytes, its
//      UB-side strides in 32-byte blocks, and each UB block occupies its length
//      rounded up to 32 bytes; padding bytes are unspecified unless isPad (the
//      twin fills them with 0xA5 so a kernel that reads them gets garbage).
//  R3  Everything a kernel allocates in UB (queues x buffer count x length,
//      TBuf lengths, each rounded to 32 bytes) fits the UB of one core. The
//      capacity differs by processor ("Storage Units"; query it with
//      GetCoreMemSize on device); the twin takes it per launch, default the
//      Atlas A2 vector core's 192 KiB (kA2UbBytes).
//  R4  A TQue holds at most its declared depth of enqueued tensors, and at most
//      InitBuffer's `num` tensors are allocated from it at once ("TQue",
//      "TPipe::InitBuffer": AllocTensor / EnQue / DeQue / FreeTensor).
//  R5  Accesses stay inside the tensors: GlobalTensor lengths from
//      SetGlobalBuffer, LocalTensor lengths from the buffer they came from.
//  R6  The block index and count come from the launch ("GetBlockIdx",
//      "GetBlockNum"); blocks run independently (no block reads what another
//      block writes in the same launch - the twin runs them one after another,
//      which would hide such a race, so kernels here never rely on ordering).
//
//  R7  Precision conversion ("Cast", atlasascendc_api_07_0072, and the
//      RoundMode enum on "ScalarCast", atlasascendc_api_07_0018): the kernels
//      widen half / bfloat16_t to float with CAST_NONE (exact) and narrow float
//      to half / bfloat16_t with CAST_RINT (round half to even, the page's
//      rule: carry when the first dropped bit is 1 and the rest are not all 0,
//      or all are 0 and the kept last bit is 1). Only these pairs and modes are
//      modelled; any other Cast is refused at compile time or as a violation.
//      half and bfloat16_t are storage types here: the twin's arithmetic
//      instructions (Muls, Add, Mul, ReduceSum) only take float or integers,
//      so a kernel that forgot to widen does not compile.
//  R8  ReduceSum, count form ("ReduceSum", atlasascendc_api_07_0078): float
//      only on A2; the sum is a binary tree inside each 256-byte repeat (64
//      floats) and the repeats' results are added in order ("method 2", what
//      the page gives for the count form on Atlas A2); the twin computes
//      exactly that order, so the result differs from a sequential sum within
//      rounding. sharedTmpBuffer must hold at least one float per repeat
//      (rounded to 32 bytes) - the page's size formula is not modelled beyond that.
//  R9  Scalar writes to GM ("SetValue", atlasascendc_api_07_00028, and
//      "DataCacheCleanAndInvalid", atlasascendc_api_07_0177): GlobalTensor::
//      SetValue writes the core's data cache, not GM; the line (64 bytes) is
//      written out whole, later or by DataCacheCleanAndInvalid; cores writing
//      GM with SetValue must keep at least a cache line apart, or their lines
//      overwrite each other. The twin counts lines from the buffer given to
//      SetGlobalBuffer (device allocations are line aligned) and refuses: a
//      block ending with SetValue lines not cleaned by DataCacheCleanAndInvalid;
//      a line one block dirtied with SetValue that another block of the launch
//      writes (SetValue or DataCopy); and a DataCopy to GM over a line the same
//      block still holds dirty (the later write-back would undo the copy).
//      DMA copies (DataCopy / DataCopyPad) do not go through the data cache.
//
// What the twin does NOT model: timing, pipe concurrency (EnQue/DeQue order is
// checked, the overlap is not), real vector-instruction repeat/mask limits,
// Cast pairs and modes other than R7, half arithmetic (kernels widen to float),
// saturation of float -> half overflow (IEEE infinity here; the hardware's
// overflow mode is not checked).
#pragma once

#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <utility>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __aicore__
#define __gm__
#define GM_ADDR uint8_t*

// 16-bit floating types as the kernels see them (global names, as on device): storage only (R7).
struct half {
  uint16_t bits = 0;
};
struct bfloat16_t {
  uint16_t bits = 0;
};

namespace AscendC {

enum class RoundMode { CAST_NONE = 0, CAST_RINT, CAST_FLOOR, CAST_CEIL, CAST_ROUND, CAST_TRUNC, CAST_ODD };

enum class TPosition { GM, VECIN, VECOUT, VECCALC };
enum pipe_t { PIPE_ALL, PIPE_V, PIPE_S, PIPE_MTE2, PIPE_MTE3 };

namespace twin {

constexpr int64_t kUbAlignBytes = 32;
constexpr int64_t kA2UbBytes = 192 * 1024;

class RuleViolation : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

[[noreturn]] inline void violate(const std::string& rule, const std::string& what) {
  throw RuleViolation("AscendC twin: " + rule + " violated: " + what);
}

struct CoreState {
  std::vector<uint8_t> ub;     // this core's Unified Buffer
  int64_t ub_capacity = kA2UbBytes;
  int64_t ub_used = 0;         // bytes handed out by TPipe::InitBuffer
  int64_t block_idx = 0;
  int64_t block_num = 1;
};

inline CoreState& core() {
  thread_local CoreState state;
  return state;
}

// R9: GM cache lines of the current launch, keyed by (buffer, line index).
constexpr int64_t kCacheLineBytes = 64;
using GmLine = std::pair<const void*, int64_t>;
struct LineState {
  std::map<GmLine, int64_t> scalar;  // line -> the block that wrote it with SetValue
  std::map<GmLine, int64_t> dma;     // line -> a block that wrote it by DataCopy (-1: several)
  std::set<GmLine> dirty;            // the running block's SetValue lines not yet cleaned
};
inline LineState& lines() {
  thread_local LineState state;
  return state;
}

inline int64_t round_up(int64_t bytes) { return (bytes + kUbAlignBytes - 1) / kUbAlignBytes * kUbAlignBytes; }

// Runs `kernel()` once per block, each with a fresh UB of `ub_bytes` (R3, R6).
template <typename Kernel>
void launch(int64_t blocks, int64_t ub_bytes, Kernel&& kernel) {
  if (blocks < 1) violate("R6 (launch)", "block count must be >= 1, got " + std::to_string(blocks));
  for (int64_t block = 0; block < blocks; ++block) {
    CoreState& state = core();
    state.ub.assign(static_cast<size_t>(ub_bytes), 0x5A);
    state.ub_capacity = ub_bytes;
    state.ub_used = 0;
    state.block_idx = block;
    state.block_num = blocks;
    if (block == 0) lines() = LineState{};
    kernel();
    if (!lines().dirty.empty())
      violate("R9 (data cache)", "block " + std::to_string(block) + " ended with " +
                                     std::to_string(lines().dirty.size()) +
                                     " GM cache line(s) written by SetValue and never cleaned by "
                                     "DataCacheCleanAndInvalid");
  }
}

}  // namespace twin

inline int64_t GetBlockIdx() { return twin::core().block_idx; }
inline int64_t GetBlockNum() { return twin::core().block_num; }

template <pipe_t pipe>
inline void PipeBarrier() {}

template <typename T>
class GlobalTensor {
 public:
  void SetGlobalBuffer(__gm__ T* buffer, uint64_t length) {
    data_ = buffer;
    base_ = buffer;
    length_ = static_cast<int64_t>(length);
  }
  T GetValue(int64_t index) const {
    check(index, 1);
    return data_[index];
  }
  void SetValue(int64_t index, T value) {  // R9: into this core's data cache line
    check(index, 1);
    const twin::GmLine line{base_, byte_offset(index) / twin::kCacheLineBytes};
    const int64_t block = twin::core().block_idx;
    auto& state = twin::lines();
    const auto scalar = state.scalar.find(line);
    const auto dma = state.dma.find(line);
    if ((scalar != state.scalar.end() && scalar->second != block) || (dma != state.dma.end() && dma->second != block))
      twin::violate("R9 (data cache)", "block " + std::to_string(block) + " SetValue into a 64-byte GM line that " +
                                           "another block of the launch also writes (line " +
                                           std::to_string(line.second) + ")");
    state.scalar[line] = block;
    state.dirty.insert(line);
    data_[index] = value;
  }
  GlobalTensor operator[](int64_t offset) const {
    check(offset, 0);
    GlobalTensor sub;
    sub.data_ = data_ + offset;
    sub.base_ = base_;
    sub.length_ = length_ - offset;
    return sub;
  }
  T* raw(int64_t count) const {  // twin only: the span [0, count) after a bounds check
    check(0, count);
    return data_;
  }
  // twin only: a DMA write of `bytes` from the start of this view (R5, R9)
  uint8_t* dma_write(int64_t count, int64_t bytes) const {
    check(0, count);
    if (bytes <= 0) return reinterpret_cast<uint8_t*>(data_);
    const int64_t block = twin::core().block_idx;
    auto& state = twin::lines();
    const int64_t first = byte_offset(0) / twin::kCacheLineBytes, last = (byte_offset(0) + bytes - 1) / twin::kCacheLineBytes;
    for (int64_t l = first; l <= last; ++l) {
      const twin::GmLine line{base_, l};
      if (state.dirty.count(line))
        twin::violate("R9 (data cache)", "DataCopy to a GM line this block still holds dirty from SetValue (line " +
                                             std::to_string(l) + "): clean it first");
      const auto scalar = state.scalar.find(line);
      if (scalar != state.scalar.end() && scalar->second != block)
        twin::violate("R9 (data cache)", "DataCopy to a GM line another block wrote with SetValue (line " +
                                             std::to_string(l) + ")");
      const auto dma = state.dma.find(line);
      if (dma == state.dma.end()) {
        state.dma[line] = block;
      } else if (dma->second != block) {
        dma->second = -1;
      }
    }
    return reinterpret_cast<uint8_t*>(data_);
  }
  void clean_line() const {  // twin only: DataCacheCleanAndInvalid(SINGLE_CACHE_LINE) of this address
    twin::lines().dirty.erase(twin::GmLine{base_, byte_offset(0) / twin::kCacheLineBytes});
  }
  int64_t length() const { return length_; }

 private:
  void check(int64_t index, int64_t count) const {
    if (index < 0 || count < 0 || index + count > length_)
      twin::violate("R5 (GlobalTensor bounds)", "access [" + std::to_string(index) + ", " +
                                                    std::to_string(index + count) + ") of a tensor of " +
                                                    std::to_string(length_) + " elements");
  }
  int64_t byte_offset(int64_t index) const {
    return static_cast<int64_t>(reinterpret_cast<const uint8_t*>(data_ + index) -
                                reinterpret_cast<const uint8_t*>(base_));
  }
  T* data_ = nullptr;
  T* base_ = nullptr;
  int64_t length_ = 0;
};

enum class CacheLine { SINGLE_CACHE_LINE, ENTIRE_DATA_CACHE };
enum class DcciDst { CACHELINE_ALL, CACHELINE_UB, CACHELINE_OUT, CACHELINE_ATOMIC };

// R9: writes this core's dirty lines out to GM (ENTIRE_DATA_CACHE) or the one holding `tensor`'s address.
template <typename T, CacheLine kEntire, DcciDst kDst>
void DataCacheCleanAndInvalid(const GlobalTensor<T>& tensor) {
  static_assert(kDst == DcciDst::CACHELINE_OUT || kDst == DcciDst::CACHELINE_ALL,
                "R9: only the GM-coherence destinations are modelled");
  if (kEntire == CacheLine::ENTIRE_DATA_CACHE) {
    twin::lines().dirty.clear();
  } else {
    tensor.clean_line();
  }
}

template <typename T>
class LocalTensor {
 public:
  LocalTensor() = default;
  LocalTensor(int64_t byte_offset, int64_t length, int64_t buffer_id)
      : byte_offset_(byte_offset), length_(length), buffer_id_(buffer_id) {}

  T GetValue(int64_t index) const {
    check(index, 1);
    T value;
    std::memcpy(&value, address(index), sizeof(T));
    return value;
  }
  void SetValue(int64_t index, T value) {
    check(index, 1);
    std::memcpy(address(index), &value, sizeof(T));
  }
  LocalTensor operator[](int64_t offset) const {
    check(offset, 0);
    return LocalTensor(byte_offset_ + offset * static_cast<int64_t>(sizeof(T)), length_ - offset, buffer_id_);
  }
  int64_t GetSize() const { return length_; }

  // twin only: the operand checks of R1 / R5, then the bytes
  uint8_t* operand(int64_t count, const char* api) const {
    check(0, count);
    if (byte_offset_ % twin::kUbAlignBytes != 0)
      twin::violate("R1 (UB operand alignment)", std::string(api) + " operand at UB offset " +
                                                     std::to_string(byte_offset_) + " is not 32-byte aligned");
    return address(0);
  }
  int64_t buffer_id() const { return buffer_id_; }

 private:
  void check(int64_t index, int64_t count) const {
    if (index < 0 || count < 0 || index + count > length_)
      twin::violate("R5 (LocalTensor bounds)", "access [" + std::to_string(index) + ", " +
                                                   std::to_string(index + count) + ") of a UB tensor of " +
                                                   std::to_string(length_) + " elements");
  }
  uint8_t* address(int64_t index) const {
    return twin::core().ub.data() + byte_offset_ + index * static_cast<int64_t>(sizeof(T));
  }
  int64_t byte_offset_ = 0;
  int64_t length_ = 0;
  int64_t buffer_id_ = -1;
};

namespace twin {
// UB space handed out by TPipe (R3).
inline int64_t reserve_ub(int64_t bytes) {
  const int64_t offset = core().ub_used;
  const int64_t rounded = round_up(bytes);
  if (bytes <= 0 || offset + rounded > core().ub_capacity)
    violate("R3 (UB capacity)", "InitBuffer of " + std::to_string(bytes) + " bytes with " + std::to_string(offset) +
                                    " of " + std::to_string(core().ub_capacity) + " already allocated");
  core().ub_used = offset + rounded;
  return offset;
}
}  // namespace twin

template <TPosition kPosition, int32_t kDepth>
class TQue {
 public:
  template <typename T>
  LocalTensor<T> AllocTensor() {
    for (size_t i = 0; i < in_use_.size(); ++i) {
      if (!in_use_[i]) {
        in_use_[i] = true;
        return LocalTensor<T>(offsets_[i], capacity<T>(), static_cast<int64_t>(i));
      }
    }
    twin::violate("R4 (queue buffers)", "AllocTensor with all " + std::to_string(in_use_.size()) +
                                            " buffers of the queue in use (InitBuffer num)");
  }
  template <typename T>
  void EnQue(const LocalTensor<T>& tensor) {
    if (static_cast<int32_t>(queued_.size()) >= kDepth)
      twin::violate("R4 (queue depth)", "EnQue beyond the declared depth " + std::to_string(kDepth));
    check_owned(tensor.buffer_id(), "EnQue");
    queued_.push_back(tensor.buffer_id());
  }
  template <typename T>
  LocalTensor<T> DeQue() {
    if (queued_.empty()) twin::violate("R4 (queue order)", "DeQue from an empty queue");
    const int64_t id = queued_.front();
    queued_.pop_front();
    return LocalTensor<T>(offsets_[id], capacity<T>(), id);
  }
  template <typename T>
  void FreeTensor(const LocalTensor<T>& tensor) {
    check_owned(tensor.buffer_id(), "FreeTensor");
    in_use_[tensor.buffer_id()] = false;
  }
  // A tensor spans its whole buffer, which InitBuffer rounded up to 32 bytes.
  template <typename T>
  int64_t capacity() const {
    return twin::round_up(length_bytes_) / static_cast<int64_t>(sizeof(T));
  }
  void init(int64_t num, int64_t length_bytes) {  // called by TPipe::InitBuffer
    length_bytes_ = length_bytes;
    for (int64_t i = 0; i < num; ++i) offsets_.push_back(twin::reserve_ub(length_bytes));
    in_use_.assign(static_cast<size_t>(num), false);
  }

 private:
  void check_owned(int64_t id, const char* api) const {
    if (id < 0 || id >= static_cast<int64_t>(in_use_.size()) || !in_use_[id])
      twin::violate("R4 (queue buffers)", std::string(api) + " of a tensor not allocated from this queue");
  }
  std::vector<int64_t> offsets_;
  std::vector<bool> in_use_;
  std::deque<int64_t> queued_;
  int64_t length_bytes_ = 0;
};

template <TPosition kPosition>
class TBuf {
 public:
  template <typename T>
  LocalTensor<T> Get() const {
    return LocalTensor<T>(offset_, twin::round_up(length_bytes_) / static_cast<int64_t>(sizeof(T)), -1);
  }
  void init(int64_t length_bytes) {
    offset_ = twin::reserve_ub(length_bytes);
    length_bytes_ = length_bytes;
  }

 private:
  int64_t offset_ = 0;
  int64_t length_bytes_ = 0;
};

class TPipe {
 public:
  template <TPosition kPosition, int32_t kDepth>
  void InitBuffer(TQue<kPosition, kDepth>& queue, int64_t num, int64_t length_bytes) {
    if (num < 1 || num > 8) twin::violate("R4 (InitBuffer)", "num must be in [1, 8], got " + std::to_string(num));
    queue.init(num, length_bytes);
  }
  template <TPosition kPosition>
  void InitBuffer(TBuf<kPosition>& buffer, int64_t length_bytes) {
    buffer.init(length_bytes);
  }
};

// ---------------------------------------------------------------- data movement (R2)

template <typename T>
void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, int64_t count) {
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  if (bytes % twin::kUbAlignBytes != 0)
    twin::violate("R2 (DataCopy length)", "GM->UB DataCopy of " + std::to_string(bytes) +
                                              " bytes, not a multiple of 32 (use DataCopyPad)");
  std::memcpy(dst.operand(count, "DataCopy"), src.raw(count), static_cast<size_t>(bytes));
}

template <typename T>
void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, int64_t count) {
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  if (bytes % twin::kUbAlignBytes != 0)
    twin::violate("R2 (DataCopy length)", "UB->GM DataCopy of " + std::to_string(bytes) +
                                              " bytes, not a multiple of 32 (use DataCopyPad)");
  std::memcpy(dst.dma_write(count, bytes), src.operand(count, "DataCopy"), static_cast<size_t>(bytes));
}

struct DataCopyExtParams {
  uint16_t blockCount = 1;
  uint32_t blockLen = 0;   // bytes per block
  uint32_t srcStride = 0;  // GM->UB: bytes between GM blocks; UB->GM: 32-byte blocks between UB blocks
  uint32_t dstStride = 0;  // GM->UB: 32-byte blocks between UB blocks; UB->GM: bytes between GM blocks
  uint32_t rsv = 0;
};

template <typename T>
struct DataCopyPadExtParams {
  bool isPad = false;
  uint8_t leftPadding = 0;
  uint8_t rightPadding = 0;
  T paddingValue = T();
};

template <typename T>
void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyExtParams& params,
                 const DataCopyPadExtParams<T>& pad) {
  const int64_t block_bytes = params.blockLen, elem = sizeof(T);
  if (block_bytes % elem != 0) twin::violate("R2 (DataCopyPad)", "blockLen is not a whole number of elements");
  if (pad.isPad && pad.leftPadding != 0)
    twin::violate("R2 (DataCopyPad)", "left padding is not used by moe_ext kernels and not modelled");
  const int64_t ub_block = twin::round_up(block_bytes) + int64_t(params.dstStride) * twin::kUbAlignBytes;
  const int64_t gm_block = block_bytes + int64_t(params.srcStride);
  const int64_t blocks = params.blockCount;
  if (blocks == 0) return;
  uint8_t* ub = dst.operand((ub_block * (blocks - 1) + twin::round_up(block_bytes)) / elem, "DataCopyPad");
  const uint8_t* gm = reinterpret_cast<const uint8_t*>(src.raw((gm_block * (blocks - 1) + block_bytes) / elem));
  for (int64_t b = 0; b < blocks; ++b) {
    uint8_t* to = ub + b * ub_block;
    std::memcpy(to, gm + b * gm_block, static_cast<size_t>(block_bytes));
    std::memset(to + block_bytes, 0xA5, static_cast<size_t>(twin::round_up(block_bytes) - block_bytes));
    if (pad.isPad) {
      for (int64_t i = 0; i < pad.rightPadding && block_bytes + (i + 1) * elem <= twin::round_up(block_bytes); ++i)
        std::memcpy(to + block_bytes + i * elem, &pad.paddingValue, sizeof(T));
    }
  }
}

template <typename T>
void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& params) {
  const int64_t block_bytes = params.blockLen, elem = sizeof(T);
  if (block_bytes % elem != 0) twin::violate("R2 (DataCopyPad)", "blockLen is not a whole number of elements");
  const int64_t ub_block = twin::round_up(block_bytes) + int64_t(params.srcStride) * twin::kUbAlignBytes;
  const int64_t gm_block = block_bytes + int64_t(params.dstStride);
  const int64_t blocks = params.blockCount;
  if (blocks == 0) return;
  const uint8_t* ub = src.operand((ub_block * (blocks - 1) + twin::round_up(block_bytes)) / elem, "DataCopyPad");
  const int64_t span = gm_block * (blocks - 1) + block_bytes;
  uint8_t* gm = dst.dma_write(span / elem, span);
  for (int64_t b = 0; b < blocks; ++b)
    std::memcpy(gm + b * gm_block, ub + b * ub_block, static_cast<size_t>(block_bytes));
}

// ---------------------------------------------------------------- vector instructions (count form)

template <typename T>
void Duplicate(const LocalTensor<T>& dst, T value, int64_t count) {
  uint8_t* out = dst.operand(count, "Duplicate");
  for (int64_t i = 0; i < count; ++i) std::memcpy(out + i * sizeof(T), &value, sizeof(T));
}

template <typename T>
void Muls(const LocalTensor<T>& dst, const LocalTensor<T>& src, T scalar, int64_t count) {
  static_assert(std::is_arithmetic_v<T>, "twin Muls models arithmetic types only");
  uint8_t* out = dst.operand(count, "Muls");
  const uint8_t* in = src.operand(count, "Muls");
  for (int64_t i = 0; i < count; ++i) {
    T value;
    std::memcpy(&value, in + i * sizeof(T), sizeof(T));
    value = static_cast<T>(value * scalar);
    std::memcpy(out + i * sizeof(T), &value, sizeof(T));
  }
}

template <typename T>
void Add(const LocalTensor<T>& dst, const LocalTensor<T>& a, const LocalTensor<T>& b, int64_t count) {
  static_assert(std::is_arithmetic_v<T>, "twin Add models arithmetic types only");
  uint8_t* out = dst.operand(count, "Add");
  const uint8_t* x = a.operand(count, "Add");
  const uint8_t* y = b.operand(count, "Add");
  for (int64_t i = 0; i < count; ++i) {
    T u, v;
    std::memcpy(&u, x + i * sizeof(T), sizeof(T));
    std::memcpy(&v, y + i * sizeof(T), sizeof(T));
    u = static_cast<T>(u + v);
    std::memcpy(out + i * sizeof(T), &u, sizeof(T));
  }
}

template <typename T>
void Mul(const LocalTensor<T>& dst, const LocalTensor<T>& a, const LocalTensor<T>& b, int64_t count) {
  static_assert(std::is_arithmetic_v<T>, "twin Mul models arithmetic types only");
  uint8_t* out = dst.operand(count, "Mul");
  const uint8_t* x = a.operand(count, "Mul");
  const uint8_t* y = b.operand(count, "Mul");
  for (int64_t i = 0; i < count; ++i) {
    T u, v;
    std::memcpy(&u, x + i * sizeof(T), sizeof(T));
    std::memcpy(&v, y + i * sizeof(T), sizeof(T));
    u = static_cast<T>(u * v);
    std::memcpy(out + i * sizeof(T), &u, sizeof(T));
  }
}

// ---------------------------------------------------------------- R8: ReduceSum (count form)

namespace twin {
constexpr int64_t kRepeatBytes = 256;

// The documented A2 order: a pairwise tree inside each 64-float repeat (a short last repeat
// padded with zeros, which adds nothing), then the repeats' sums added in order.
inline float reduce_sum_a2(const float* values, int64_t count) {
  constexpr int64_t per_repeat = kRepeatBytes / static_cast<int64_t>(sizeof(float));
  float total = 0.0f;
  for (int64_t first = 0; first < count; first += per_repeat) {
    float lane[per_repeat] = {};
    const int64_t n = count - first < per_repeat ? count - first : per_repeat;
    for (int64_t i = 0; i < n; ++i) lane[i] = values[first + i];
    for (int64_t width = per_repeat / 2; width >= 1; width /= 2)
      for (int64_t i = 0; i < width; ++i) lane[i] = lane[2 * i] + lane[2 * i + 1];
    total = first == 0 ? lane[0] : total + lane[0];
  }
  return total;
}
}  // namespace twin

template <typename T>
void ReduceSum(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work, int64_t count) {
  static_assert(std::is_same_v<T, float>, "R8: ReduceSum on Atlas A2 takes float");
  constexpr int64_t per_repeat = twin::kRepeatBytes / static_cast<int64_t>(sizeof(float));
  const int64_t repeats = (count + per_repeat - 1) / per_repeat;
  if (count < 1) twin::violate("R8 (ReduceSum)", "count must be >= 1, got " + std::to_string(count));
  (void)work.operand(twin::round_up(repeats * 4) / 4, "ReduceSum work");  // R8: one float per repeat, R1, R5
  std::vector<float> values(static_cast<size_t>(count));
  std::memcpy(values.data(), src.operand(count, "ReduceSum"), static_cast<size_t>(count) * sizeof(float));
  const float sum = twin::reduce_sum_a2(values.data(), count);
  std::memcpy(dst.operand(1, "ReduceSum"), &sum, sizeof(float));
}

// ---------------------------------------------------------------- R7: Cast

namespace twin {
inline float widen(bfloat16_t value) {
  const uint32_t bits = static_cast<uint32_t>(value.bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float widen(half value) {
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000u) << 16;
  const uint32_t exponent = (value.bits >> 10) & 0x1Fu, mantissa = value.bits & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    uint32_t e = 113, m = mantissa;
    while ((m & 0x400u) == 0) {
      m <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((m & 0x3FFu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// float -> bfloat16_t, CAST_RINT: keep the top 16 bits, round the dropped 16 half to even.
inline bfloat16_t narrow_bf16_rint(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bfloat16_t out;
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0) {
    out.bits = static_cast<uint16_t>((bits >> 16) | 0x0040u);  // nan stays a (quiet) nan
    return out;
  }
  const uint32_t dropped = bits & 0xFFFFu, kept = bits >> 16;
  const bool carry = dropped > 0x8000u || (dropped == 0x8000u && (kept & 1u) != 0);
  out.bits = static_cast<uint16_t>(kept + (carry ? 1u : 0u));
  return out;
}

// float -> half, CAST_RINT (IEEE round half to even; overflow to infinity, see the header).
inline half narrow_half_rint(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xFFu);
  uint32_t mantissa = bits & 0x7FFFFFu;
  half out;
  if (exponent == 0xFF) {
    out.bits = static_cast<uint16_t>(sign | 0x7C00u | (mantissa != 0 ? 0x200u : 0u));
    return out;
  }
  int32_t e = exponent - 127 + 15;
  if (e >= 0x1F) {
    out.bits = static_cast<uint16_t>(sign | 0x7C00u);
    return out;
  }
  uint32_t shift = 13;
  if (e <= 0) {  // subnormal or zero half
    if (e < -10) {
      out.bits = static_cast<uint16_t>(sign);
      return out;
    }
    mantissa |= 0x800000u;
    shift = static_cast<uint32_t>(14 - e);
    e = 0;
  }
  uint32_t kept = mantissa >> shift;
  const uint32_t dropped = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
  if (dropped > halfway || (dropped == halfway && (kept & 1u) != 0)) ++kept;
  // a carry out of the mantissa moves into the exponent, which is what the bit layout gives
  out.bits = static_cast<uint16_t>(sign | ((static_cast<uint32_t>(e) << 10) + kept));
  return out;
}

template <typename To, typename From>
To convert(From value, RoundMode mode) {
  if constexpr (std::is_same_v<To, float> && (std::is_same_v<From, half> || std::is_same_v<From, bfloat16_t>)) {
    if (mode != RoundMode::CAST_NONE) violate("R7 (Cast)", "widening to float is modelled with CAST_NONE only");
    return widen(value);
  } else if constexpr (std::is_same_v<From, float> && std::is_same_v<To, bfloat16_t>) {
    if (mode != RoundMode::CAST_RINT) violate("R7 (Cast)", "float -> bfloat16_t is modelled with CAST_RINT only");
    return narrow_bf16_rint(value);
  } else if constexpr (std::is_same_v<From, float> && std::is_same_v<To, half>) {
    if (mode != RoundMode::CAST_RINT) violate("R7 (Cast)", "float -> half is modelled with CAST_RINT only");
    return narrow_half_rint(value);
  } else {
    static_assert(sizeof(To) == 0, "R7: this Cast pair is not modelled by the twin");
  }
}
}  // namespace twin

template <typename To, typename From>
void Cast(const LocalTensor<To>& dst, const LocalTensor<From>& src, RoundMode mode, int64_t count) {
  uint8_t* out = dst.operand(count, "Cast");
  const uint8_t* in = src.operand(count, "Cast");
  std::vector<From> values(static_cast<size_t>(count));
  std::memcpy(values.data(), in, static_cast<size_t>(count) * sizeof(From));  // dst may alias src
  for (int64_t i = 0; i < count; ++i) {
    const To value = twin::convert<To>(values[static_cast<size_t>(i)], mode);
    std::memcpy(out + i * sizeof(To), &value, sizeof(To));
  }
}

}  // namespace AscendC

// A device-side check: on hardware `assert` (CANN traps the core); in the twin an exception.
#define MOE_ASCEND_CHECK(cond, message)                                             \
  do {                                                                              \
    if (!(cond)) ::AscendC::twin::violate("kernel check", message);                 \
  } while (0)
