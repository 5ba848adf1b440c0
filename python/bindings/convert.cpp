#include "convert.h"

#include <cmath>
#include <limits>

#include "core/error.h"

namespace tmbind {

using tmill::ErrorKind;
using tmill::fail;

void bad_arg(const std::string& msg) { fail(ErrorKind::invalid_arg, msg); }

namespace {

// numpy, imported once and kept for the life of the process
py::module_& numpy() {
    static py::module_* np = new py::module_(py::module_::import("numpy"));
    return *np;
}

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

bool is_integer(py::handle obj) {
    return (PyLong_Check(obj.ptr()) && !PyBool_Check(obj.ptr())) || py::isinstance(obj, numpy().attr("integer"));
}

// int64 value of a Python or numpy integer; false when it does not fit
bool int64_of(py::handle obj, int64_t& out) {
    py::object as_int = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
    if (!as_int) {
        PyErr_Clear();
        return false;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(as_int.ptr(), &overflow);
    if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return false;
    }
    out = static_cast<int64_t>(v);
    return true;
}

// obj as a numpy array of its own dtype (no conversion of values), or a failure naming `what`
py::array as_array(py::handle obj, const std::string& what) {
    if (obj.is_none()) bad_arg(what + " must not be None");
    if (py::isinstance<py::str>(obj) || py::isinstance<py::bytes>(obj) || py::isinstance<py::dict>(obj) ||
        py::isinstance<py::set>(obj))
        bad_arg(what + " must be a sequence of numbers, got " + type_name(obj));
    if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
    try {
        return numpy().attr("asarray")(obj);
    } catch (py::error_already_set& e) {
        bad_arg(what + " must be a sequence of numbers (" + std::string(e.what()) + ")");
    }
}

// Integers of a 1-D array (any integer dtype, or Python ints of any size in an object array),
// each passed to fn(index, value) after a check that it fits int64.
template <typename Fn>
void for_each_integer(py::handle obj, const std::string& what, Fn&& fn) {
    py::array a = as_array(obj, what);
    if (a.ndim() != 1)
        bad_arg(what + " must be 1-D, got " + std::to_string(a.ndim()) + " dimensions");
    const char kind = a.dtype().kind();
    const int64_t n = static_cast<int64_t>(a.shape(0));
    if (kind == 'i') {
        auto v = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
        for (int64_t i = 0; i < n; ++i) fn(i, v.data()[i]);
    } else if (kind == 'u') {
        auto v = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
        for (int64_t i = 0; i < n; ++i) {
            if (v.data()[i] > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
                bad_arg(what + " value " + std::to_string(v.data()[i]) + " is out of range");
            fn(i, static_cast<int64_t>(v.data()[i]));
        }
    } else if (kind == 'O' || (kind == 'f' && n == 0)) {
        for (int64_t i = 0; i < n; ++i) {
            py::object item = a.attr("__getitem__")(i);
            int64_t value = 0;
            if (!is_integer(item))
                bad_arg(what + " must hold integers, got " + type_name(item) + " at position " + std::to_string(i));
            if (!int64_of(item, value)) bad_arg(what + " value " + std::string(py::str(item)) + " is out of range");
            fn(i, value);
        }
    } else {
        bad_arg(what + " must hold integers, got dtype " + std::string(py::str(a.dtype())));
    }
}

}  // namespace

std::vector<int32_t> token_ids(py::handle obj, int64_t n_vocab, const std::string& what, bool allow_empty) {
    std::vector<int32_t> out;
    for_each_integer(obj, what, [&](int64_t i, int64_t v) {
        if (v < 0 || v >= n_vocab)
            bad_arg(what + ": token id " + std::to_string(v) + " at position " + std::to_string(i) +
                    " is outside the vocabulary [0, " + std::to_string(n_vocab) + ")");
        out.push_back(static_cast<int32_t>(v));
    });
    if (out.empty() && !allow_empty) bad_arg(what + " must not be empty");
    return out;
}

std::vector<int64_t> indices(py::handle obj, const std::string& what) {
    std::vector<int64_t> out;
    for_each_integer(obj, what, [&](int64_t i, int64_t v) {
        if (v < 0) bad_arg(what + ": index " + std::to_string(v) + " at position " + std::to_string(i) + " is negative");
        out.push_back(v);
    });
    return out;
}

int64_t to_int(py::handle obj, const std::string& what, int64_t lo, int64_t hi) {
    int64_t v = 0;
    if (!is_integer(obj)) bad_arg(what + " must be an integer, got " + type_name(obj));
    if (!int64_of(obj, v) || v < lo || v > hi)
        bad_arg(what + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                std::string(py::str(obj)));
    return v;
}

double to_float(py::handle obj, const std::string& what) {
    if (PyBool_Check(obj.ptr()) || !(PyFloat_Check(obj.ptr()) || is_integer(obj) ||
                                     py::isinstance(obj, numpy().attr("floating"))))
        bad_arg(what + " must be a number, got " + type_name(obj));
    double v = PyFloat_AsDouble(obj.ptr());
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        bad_arg(what + " is out of range");
    }
    return v;
}

bool to_bool(py::handle obj, const std::string& what) {
    if (!PyBool_Check(obj.ptr()) && !py::isinstance(obj, numpy().attr("bool_")))
        bad_arg(what + " must be True or False, got " + type_name(obj));
    return PyObject_IsTrue(obj.ptr()) == 1;
}

std::string to_str(py::handle obj, const std::string& what) {
    if (!py::isinstance<py::str>(obj)) bad_arg(what + " must be a string, got " + type_name(obj));
    return obj.cast<std::string>();
}

py::array_t<float, py::array::c_style> float_array(py::handle obj, const std::string& what, int ndim, bool finite) {
    py::array a = as_array(obj, what);
    const char kind = a.dtype().kind();
    if (kind != 'f' && kind != 'i' && kind != 'u')
        bad_arg(what + " must hold real numbers, got dtype " + std::string(py::str(a.dtype())));
    if (a.ndim() != ndim)
        bad_arg(what + " must have " + std::to_string(ndim) + " dimensions, got " + std::to_string(a.ndim()));
    auto f = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
    if (!f) {
        PyErr_Clear();
        bad_arg(what + " cannot be converted to float32");
    }
    if (finite) {
        const float* p = f.data();
        for (py::ssize_t i = 0; i < f.size(); ++i)
            if (!std::isfinite(p[i])) fail(ErrorKind::numeric, what + " contains NaN or infinity at element " + std::to_string(i));
    }
    return f;
}

void reject_call(const std::string& qualname, const py::args& args, const py::kwargs& kwargs) {
    std::string got;
    for (py::handle a : args) got += (got.empty() ? "" : ", ") + type_name(a);
    for (auto item : kwargs) got += (got.empty() ? "" : ", ") + std::string(py::str(item.first)) + "=" + type_name(item.second);
    bad_arg(qualname + "() got arguments it does not take: (" + got + "); see help(tokenmill._core) for its signature");
}

void register_error_translator() {
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const tmill::Error& e) {
            const char* cls = "TokenmillError";
            switch (e.kind()) {
                case ErrorKind::format: cls = "ModelFormatError"; break;
                case ErrorKind::unsupported: cls = "UnsupportedModelError"; break;
                case ErrorKind::invalid_arg: cls = "InvalidArgumentError"; break;
                case ErrorKind::context: cls = "ContextOverflowError"; break;
                case ErrorKind::io: cls = "ModelFileError"; break;
                case ErrorKind::numeric: cls = "NumericalError"; break;
                case ErrorKind::resource: cls = "KVPoolFullError"; break;
                case ErrorKind::device: cls = "DeviceError"; break;
                case ErrorKind::interrupted: break;   // the binding re-raises the KeyboardInterrupt itself
            }
            py::object type = py::module_::import("tokenmill.errors").attr(cls);
            // Messages quote names read from files, which need not be valid UTF-8.
            std::string_view what = e.what();
            py::object msg = py::reinterpret_steal<py::object>(
                PyUnicode_DecodeUTF8(what.data(), static_cast<Py_ssize_t>(what.size()), "replace"));
            PyErr_SetObject(type.ptr(), msg.ptr());
        }
    });
}

}  // namespace tmbind
