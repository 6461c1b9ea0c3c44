// Stand-in (see tests/cpp/npu_standins/README.md) for torch_npu's NPUStream.h.
#pragma once
#include "acl_standin.h"
namespace c10_npu {
struct NPUStream {
  aclrtStream stream(bool need_empty) const;
};
NPUStream getCurrentNPUStream(signed char device_index = -1);
}  // namespace c10_npu
