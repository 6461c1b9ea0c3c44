// Host-side helpers shared by the CUDA glue files.
#pragma once

#include "common/op_checks.h"
#include <cuda_runtime_api.h>

// A failed launch or CUDA call, reported with the op's name.
#define MOE_CUDA_CHECK(op, expr)                                                       \
  do {                                                                                 \
    const cudaError_t moe_status = (expr);                                             \
    MOE_CHECK(moe_status == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(moe_status)); \
  } while (0)
