// Stand-in (see tests/cpp/npu_standins/README.md) for torch_npu's OpCommand.h.
#pragma once
#include <functional>
#include <string>
namespace at_npu::native {
struct OpCommand {
  static void RunOpApi(const std::string& op_name, const std::function<int()>& func);
};
}  // namespace at_npu::native
