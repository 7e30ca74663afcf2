// Shared by every file of imgclf's C++ shim (plugin-api/cpp/*.cpp).
//
// Convention: every extern "C" function returns `char*`: NULL on success, otherwise a message
// allocated with malloc that the Rust side reads and frees with imgclf_shim_free. Tensors cross
// as `at::Tensor*` (tch::Tensor::as_mut_ptr / as_ptr). No C++ exception crosses into Rust:
// wrap each body in SHIM_TRY { ... } SHIM_CATCH.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace imgclf_shim {

inline char *error_message(const char *what) {
  size_t n = std::strlen(what);
  char *out = static_cast<char *>(std::malloc(n + 1));
  if (out != nullptr) std::memcpy(out, what, n + 1);
  return out;
}

// The tensors behind `n` pointers, as a vector ATen's TensorList views can borrow.
inline std::vector<at::Tensor> tensors(at::Tensor *const *ptrs, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*ptrs[i]);
  return out;
}

}  // namespace imgclf_shim

#define SHIM_TRY try
#define SHIM_CATCH                                                          \
  catch (const c10::Error &e) {                                             \
    return imgclf_shim::error_message(e.what_without_backtrace());          \
  }                                                                         \
  catch (const std::exception &e) {                                         \
    return imgclf_shim::error_message(e.what());                            \
  }                                                                         \
  catch (...) {                                                             \
    return imgclf_shim::error_message("unknown C++ exception in libtorch"); \
  }                                                                         \
  return nullptr;
