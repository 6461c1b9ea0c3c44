// A device-side check that survives NDEBUG.
//
// Used where validating on the host would need a device-to-host copy (a
// synchronisation that breaks CUDA graphs and stalls the stream). On failure
// the kernel stops through the CUDA assert path: the message is printed and
// the next synchronising call raises "device-side assert triggered", the same
// way torch's own indexing ops report out-of-range indices on CUDA. Kernels
// must never write out of bounds before the check fires.
#pragma once

#include <cassert>

#define MOE_DEVICE_CHECK(cond, message)                          \
  do {                                                           \
    if (!(cond)) {                                               \
      __assert_fail(message, __FILE__, __LINE__, __func__);      \
    }                                                            \
  } while (0)
