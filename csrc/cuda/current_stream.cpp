// torch's current CUDA stream, without linking libtorch_cuda.
//
// The stable C shim function aoti_torch_get_current_cuda_stream lives in
// libtorch_cuda.so, which a CPU build of torch (this project's CI, where _C_cuda
// is compiled) does not ship, so the library cannot be linked at build time.
// torch.stable's own Stream::nativeHandle() would avoid this but exists only
// from torch 2.13 (TORCH_FEATURE_VERSION >= 2.13). So the function is looked up
// once, at the first CUDA op call, in the libtorch_cuda.so that a CUDA torch has
// already loaded (RTLD_NOLOAD: never loads anything itself).
#include <dlfcn.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include "cuda/cuda_check.h"

namespace moe_ext::cuda {
namespace {

// Declared by shim.h only under USE_CUDA; its C signature is part of the stable ABI.
using GetCurrentCudaStream = AOTITorchError (*)(int32_t device_index, void** ret_stream);

GetCurrentCudaStream resolve_get_current_cuda_stream() {
  void* library = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
  MOE_CHECK(library != nullptr,
            "moe_ext: the CUDA ops need torch's libtorch_cuda.so, which the running torch has not "
            "loaded (is it a CPU-only build of torch?)");
  void* symbol = dlsym(library, "aoti_torch_get_current_cuda_stream");
  MOE_CHECK(symbol != nullptr,
            "moe_ext: the running torch's libtorch_cuda.so has no aoti_torch_get_current_cuda_stream");
  return reinterpret_cast<GetCurrentCudaStream>(symbol);
}

}  // namespace

cudaStream_t current_stream(int32_t device_index) {
  static const GetCurrentCudaStream get_current_cuda_stream = resolve_get_current_cuda_stream();
  void* stream = nullptr;
  MOE_CHECK(get_current_cuda_stream(device_index, &stream) == AOTI_TORCH_SUCCESS,
            "moe_ext: could not get the current CUDA stream of device ", device_index);
  return static_cast<cudaStream_t>(stream);
}

}  // namespace moe_ext::cuda
