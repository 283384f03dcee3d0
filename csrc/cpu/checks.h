// Metadata checks shared by the native op wrappers (CPU and CUDA): a ValueError naming the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

namespace kangaroo {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

// t must have `shape` (-1: any size).
inline void check_shape(const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape,
                        const char* expected) {
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  int64_t d = 0;
  for (int64_t s : shape) {
    if (ok && s >= 0 && t.size(d) != s) ok = false;
    ++d;
  }
  TORCH_CHECK_VALUE(ok, name, " must have shape ", expected, ", got ", shape_str(t));
}

// t must be contiguous and live on `dev`.
inline void check_layout(const char* name, const at::Tensor& t, const c10::Device& dev) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == dev, name, " must be on ", dev, ", got ", t.device());
}

// t must have `shape` (-1: any size), be contiguous and live on `dev`.
inline void check_meta(const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape,
                       const char* expected, const c10::Device& dev) {
  check_shape(name, t, shape, expected);
  check_layout(name, t, dev);
}

// check_meta for a tensor of one dtype (the dtype checked right after the shape).
inline void check_typed(const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape,
                        const char* expected, at::ScalarType dtype, const char* dtype_name, const c10::Device& dev) {
  check_shape(name, t, shape, expected);
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype_name, ", got ", t.scalar_type());
  check_layout(name, t, dev);
}

// check_typed for an int32 tensor.
inline void check_i32(const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape,
                      const char* expected, const c10::Device& dev) {
  check_typed(name, t, shape, expected, at::kInt, "int32", dev);
}

}  // namespace kangaroo
