// Argument conversion shared by tokenmill._core and tokenmill._testing: every value that comes from
// Python is checked here (type, dtype, shape, range) and a bad one raises a tokenmill exception that
// names the argument, never pybind11's TypeError, a wrapped-around integer or a truncated float.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace tmbind {

namespace py = pybind11;

[[noreturn]] void bad_arg(const std::string& msg);

// A 1-D sequence of integer token ids (list, tuple, numpy array of any integer dtype) checked
// against [0, n_vocab) at full width; floats, bools, strings and nested sequences are refused.
std::vector<int32_t> token_ids(py::handle obj, int64_t n_vocab, const std::string& what, bool allow_empty = false);
// Non-negative integer indices (rows, positions), unchecked against any upper bound.
std::vector<int64_t> indices(py::handle obj, const std::string& what);
// Scalars: exact types only (an int is not a float's truncation, a bool is not an int).
int64_t to_int(py::handle obj, const std::string& what, int64_t lo, int64_t hi);
double to_float(py::handle obj, const std::string& what);
bool to_bool(py::handle obj, const std::string& what);
std::string to_str(py::handle obj, const std::string& what);
// A C-contiguous float32 array of `ndim` dimensions from any real-valued numeric array or sequence
// (converted if needed); `finite` also refuses NaN and infinities.
py::array_t<float, py::array::c_style> float_array(py::handle obj, const std::string& what, int ndim, bool finite);

// The last overload of a function or method: any call the real overloads did not accept raises
// InvalidArgumentError naming `qualname` and the argument types it got.
[[noreturn]] void reject_call(const std::string& qualname, const py::args& args, const py::kwargs& kwargs);

template <typename Scope>
void reject_other_calls(Scope& scope, const char* name, const std::string& qualname) {
    scope.def(name, [qualname](const py::args& args, const py::kwargs& kwargs) { reject_call(qualname, args, kwargs); });
}

template <typename Class>
void reject_other_static_calls(Class& cls, const char* name, const std::string& qualname) {
    cls.def_static(name, [qualname](const py::args& args, const py::kwargs& kwargs) { reject_call(qualname, args, kwargs); });
}

template <typename Class>
void reject_other_inits(Class& cls, const std::string& qualname) {
    cls.def(py::init([qualname](const py::args& args, const py::kwargs& kwargs) -> typename Class::holder_type {
        reject_call(qualname, args, kwargs);
    }));
}

// tmill::Error -> tokenmill.errors classes (registered once, by _core).
void register_error_translator();

}  // namespace tmbind
