// Argument checks that name the argument and the expectation (STYLE.md practice 8).
// Used by bindings.cpp on the invariants the kernels rely on; the Python wrappers
// validate first, with torch tensors in hand, so these firing means a wrapper bug.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#define DF_CHECK(cond, ...)                                                   \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::ostringstream df_msg_;                                             \
      df_msg_ << __func__ << ": " << __VA_ARGS__;                             \
      throw std::invalid_argument(df_msg_.str());                             \
    }                                                                         \
  } while (0)

#define DF_CHECK_POSITIVE(name) DF_CHECK((name) > 0, #name " must be > 0, got " << (name))
#define DF_CHECK_NONNEG(name) DF_CHECK((name) >= 0, #name " must be >= 0, got " << (name))
#define DF_CHECK_PTR(name) DF_CHECK((name) != 0, #name " is a null pointer")
