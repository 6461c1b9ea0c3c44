// Error checks for the torch-free core.
//
// A user error (bad argument) throws std::invalid_argument: pybind11 turns it
// into ValueError, and the torch op layer rethrows it as a c10::ValueError, so
// Python callers see a ValueError either way. A broken internal invariant
// throws std::logic_error: it is a bug in moe_ext, never the caller's fault.
//
// Messages name the argument, what was expected and what was received:
//   MOE_CHECK_ARG(alignment >= 1, "alignment must be >= 1, got ", alignment);
#pragma once

#include <stdexcept>
#include <string>

#include "core/str_cat.h"

namespace moe_ext::core::detail {

template <typename... Parts>
[[noreturn]] void throw_invalid_argument(const Parts&... parts) {
  throw std::invalid_argument(::moe_ext::core::str_cat(parts...));
}

template <typename... Parts>
[[noreturn]] void throw_internal(const char* file, int line, const Parts&... parts) {
  throw std::logic_error(::moe_ext::core::str_cat("moe_ext internal error at ", file, ":", line, ": ", parts...));
}

}  // namespace moe_ext::core::detail

// Refuse a bad argument: the message parts are streamed together.
#define MOE_CHECK_ARG(cond, ...)                                  \
  do {                                                            \
    if (!(cond)) {                                                \
      ::moe_ext::core::detail::throw_invalid_argument(__VA_ARGS__); \
    }                                                             \
  } while (0)

// An invariant of our own code; failing it is a moe_ext bug.
#define MOE_INTERNAL_ASSERT(cond, ...)                                                  \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      ::moe_ext::core::detail::throw_internal(__FILE__, __LINE__, #cond, " ", ##__VA_ARGS__); \
    }                                                                                   \
  } while (0)
