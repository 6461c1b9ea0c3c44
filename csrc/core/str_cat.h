// Message building without iostreams.
//
// Why not std::ostringstream (or c10::str, which uses it): on the GPU machine's
// torch 2.11 image, merely constructing an ostringstream inside an extension
// loaded next to torch segfaults (scripts/probe/value_error_probe.py,
// f_oss_only). Error messages are built here from strings and integers instead,
// which works everywhere.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

namespace moe_ext::core {

namespace detail {

inline void append_part(std::string& out, std::string_view text) { out.append(text); }
inline void append_part(std::string& out, const char* text) { out.append(text ? text : "(null)"); }
inline void append_part(std::string& out, const std::string& text) { out.append(text); }
inline void append_part(std::string& out, char c) { out.push_back(c); }
inline void append_part(std::string& out, bool value) { out.append(value ? "true" : "false"); }

template <typename Number, std::enable_if_t<std::is_arithmetic_v<Number>, int> = 0>
void append_part(std::string& out, Number value) {
  out.append(std::to_string(value));
}

}  // namespace detail

// str_cat("got ", 3, " rows") == "got 3 rows"
template <typename... Parts>
std::string str_cat(const Parts&... parts) {
  std::string out;
  (detail::append_part(out, parts), ...);
  return out;
}

}  // namespace moe_ext::core
