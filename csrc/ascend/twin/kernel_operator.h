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
// What the twin does NOT model: timing, pipe concurrency (EnQue/DeQue order is
// checked, the overlap is not), real vector-instruction repeat/mask limits,
// bf16/fp16 arithmetic (kernels here are tested in fp32 and integer types).
#pragma once

#include <cstdint>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __aicore__
#define __gm__
#define GM_ADDR uint8_t*

namespace AscendC {

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
    kernel();
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
    length_ = static_cast<int64_t>(length);
  }
  T GetValue(int64_t index) const {
    check(index, 1);
    return data_[index];
  }
  void SetValue(int64_t index, T value) {
    check(index, 1);
    data_[index] = value;
  }
  GlobalTensor operator[](int64_t offset) const {
    check(offset, 0);
    GlobalTensor sub;
    sub.data_ = data_ + offset;
    sub.length_ = length_ - offset;
    return sub;
  }
  T* raw(int64_t count) const {  // twin only: the span [0, count) after a bounds check
    check(0, count);
    return data_;
  }
  int64_t length() const { return length_; }

 private:
  void check(int64_t index, int64_t count) const {
    if (index < 0 || count < 0 || index + count > length_)
      twin::violate("R5 (GlobalTensor bounds)", "access [" + std::to_string(index) + ", " +
                                                    std::to_string(index + count) + ") of a tensor of " +
                                                    std::to_string(length_) + " elements");
  }
  T* data_ = nullptr;
  int64_t length_ = 0;
};

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
  std::memcpy(dst.raw(count), src.operand(count, "DataCopy"), static_cast<size_t>(bytes));
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
  uint8_t* gm = reinterpret_cast<uint8_t*>(dst.raw((gm_block * (blocks - 1) + block_bytes) / elem));
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

}  // namespace AscendC

// A device-side check: on hardware `assert` (CANN traps the core); in the twin an exception.
#define MOE_ASCEND_CHECK(cond, message)                                             \
  do {                                                                              \
    if (!(cond)) ::AscendC::twin::violate("kernel check", message);                 \
  } while (0)
