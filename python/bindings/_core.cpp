// tokenmill._core: thin pybind11 bindings over the C++ core. Ownership and policy live in the
// Python package (tokenmill.engine.native is the only module that imports this one); this file
// converts and checks arguments (convert.h), keeps native objects used across a GIL release alive
// (shared_ptr arguments), releases the GIL around native work and maps tmill::Error kinds onto
// tokenmill.errors classes. Every function ends with a catch-all overload, so a call with wrong
// argument types raises InvalidArgumentError, never pybind11's TypeError.
#include <chrono>
#include <cmath>
#include <memory>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "backend/cpu/kernels.h"
#include "convert.h"
#include "adapters.h"
#include "memory.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/kquants.h"
#include "core/quants.h"
#include "core/threadpool.h"
#include "io/gguf.h"
#include "kv/kv_pool.h"
#include "model/model.h"
#include "sampling/sampler.h"

namespace py = pybind11;
using namespace tmill;
using namespace tmbind;

namespace {

using FloatArray = py::array_t<float, py::array::c_style>;

py::object gguf_value_to_py(const GGUFValue& v) {
    switch (v.type) {
        case GGUFType::string: return py::bytes(v.str);   // decoded by the caller (may be any bytes)
        case GGUFType::f32: case GGUFType::f64: return py::float_(v.real);
        case GGUFType::boolean: return py::bool_(v.integer != 0);
        case GGUFType::u64: return py::int_(static_cast<uint64_t>(v.integer));
        case GGUFType::array: {
            py::list out;
            for (int64_t x : v.integers)
                out.append(v.elem_type == GGUFType::boolean ? py::object(py::bool_(x != 0))
                           : v.elem_type == GGUFType::u64   ? py::object(py::int_(static_cast<uint64_t>(x)))
                                                            : py::object(py::int_(x)));
            for (double x : v.reals) out.append(py::float_(x));
            for (const std::string& s : v.strings) out.append(py::bytes(s));
            for (const GGUFValue& a : v.arrays) out.append(gguf_value_to_py(a));
            return std::move(out);
        }
        default: return py::int_(v.integer);
    }
}

DType dtype_from_name(const std::string& name) {
    for (uint32_t id = 0; id < 64; ++id) {
        DTypeInfo info = dtype_info(id);
        if (info.block_bytes != 0 && name == info.name) return static_cast<DType>(id);
    }
    if (name == "nf4") return DType::nf4;
    fail(ErrorKind::invalid_arg, "unknown tensor type '" + name + "'");
}

// A quantizable type: one quantize_row and dequantize_row know.
DType storage_type(py::handle name) {
    DType t = dtype_from_name(to_str(name, "type"));
    if (!(t == DType::f32 || t == DType::f16 || t == DType::bf16 || t == DType::q8_0 || t == DType::q4_0 ||
          t == DType::q4_1 || t == DType::nf4 || quantizes_extra(t)))
        fail(ErrorKind::invalid_arg, "type must be one of f32, f16, bf16, q8_0, q4_0, q4_1, nf4, q5_0, q5_1, q4_k, "
                                     "q5_k, q6_k, got " + dtype_name(t));
    return t;
}

LoadOptions load_options(py::handle n_threads, py::handle weights, py::handle int8_prefill, py::handle device,
                         py::handle int8_decode) {
    LoadOptions options;
    options.backend.n_threads = static_cast<int>(to_int(n_threads, "n_threads", 0, 1 << 16));
    options.backend.int8_prefill = to_bool(int8_prefill, "int8_prefill");
    options.backend.int8_decode = to_bool(int8_decode, "int8_decode");
    options.backend.device = to_str(device, "device");
    const std::string w = to_str(weights, "weights");
    options.convert = !w.empty();
    if (options.convert) options.weight_type = dtype_from_name(w);
    return options;
}

std::vector<std::string> strings(py::handle obj, const std::string& what) {
    if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
        bad_arg(what + " must be a list of strings");
    std::vector<std::string> out;
    for (py::handle item : obj) out.push_back(to_str(item, what));
    return out;
}

// Rows of a forward pass: None or "none", "last" (of each sequence), "all", or explicit indices.
std::vector<int64_t> output_rows(py::handle spec, const std::vector<int64_t>& lengths, const std::string& what) {
    std::vector<int64_t> rows;
    if (spec.is_none()) return rows;
    if (py::isinstance<py::str>(spec)) {
        const std::string which = spec.cast<std::string>();
        int64_t row = 0;
        for (int64_t n : lengths) {
            if (which == "all") for (int64_t i = 0; i < n; ++i) rows.push_back(row + i);
            else if (which == "last") rows.push_back(row + n - 1);
            else if (which != "none") bad_arg(what + " must be 'last', 'all', 'none', None or row indices, got '" + which + "'");
            row += n;
        }
        return rows;
    }
    return indices(spec, what);
}

// While a pass runs without the GIL, Ctrl-C is seen by polling Python's signal handlers between
// layers (at most every few milliseconds). A pending KeyboardInterrupt stops the pass (caches
// unchanged) and is raised in the caller.
class SignalPoll {
public:
    bool operator()() {
        const auto now = std::chrono::steady_clock::now();
        if (now - last_ < std::chrono::milliseconds(5)) return false;
        last_ = now;
        py::gil_scoped_acquire gil;
        if (PyErr_CheckSignals() == 0) return false;
        pending_ = std::make_shared<py::error_already_set>();
        return true;
    }
    void rethrow_pending() {
        if (pending_) throw *pending_;
    }

private:
    std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
    std::shared_ptr<py::error_already_set> pending_;
};

py::tuple forward(Model& m, py::handle caches_obj, py::handle inputs_obj, py::handle logit_spec, py::handle hidden_spec,
                  py::handle layer_spec, py::handle adapters_obj, py::handle decode_exact, py::handle invariant,
                  py::handle decode_rows) {
    const HParams& hp = m.hparams();
    if (!py::isinstance<py::list>(caches_obj) && !py::isinstance<py::tuple>(caches_obj))
        bad_arg("caches must be a list of KVCache");
    if (!py::isinstance<py::list>(inputs_obj) && !py::isinstance<py::tuple>(inputs_obj))
        bad_arg("inputs must be a list with one token-id array (or [n, n_embd] embeddings) per cache");
    const py::sequence caches_seq = py::reinterpret_borrow<py::sequence>(caches_obj);
    const py::sequence inputs_seq = py::reinterpret_borrow<py::sequence>(inputs_obj);
    if (caches_seq.size() != inputs_seq.size())
        bad_arg("one input per cache is needed (" + std::to_string(caches_seq.size()) + " caches, " +
                std::to_string(inputs_seq.size()) + " inputs)");
    // owned for the whole call: another thread may empty the Python lists while the GIL is released
    std::vector<std::shared_ptr<KVCache>> caches;
    std::vector<std::vector<int32_t>> ids(caches_seq.size());
    std::vector<FloatArray> embeds(caches_seq.size());
    std::vector<int64_t> lengths;
    ForwardRequest req;
    for (size_t i = 0; i < caches_seq.size(); ++i) {
        py::handle c = caches_seq[i];
        if (!py::isinstance<KVCache>(c)) bad_arg("caches[" + std::to_string(i) + "] is not a KVCache");
        caches.push_back(c.cast<std::shared_ptr<KVCache>>());
        py::object in = inputs_seq[i];
        SequenceInput seq;
        seq.cache = caches.back().get();
        const std::string what = "inputs[" + std::to_string(i) + "]";
        bool float_2d = py::isinstance<py::array>(in) && py::reinterpret_borrow<py::array>(in).ndim() == 2;
        if (float_2d) {
            embeds[i] = float_array(in, what, 2, true);
            if (embeds[i].shape(1) != hp.n_embd)
                bad_arg(what + ": embeddings must have shape [n, " + std::to_string(hp.n_embd) + "]");
            seq.embeds = embeds[i].data();
            seq.n = embeds[i].shape(0);
        } else {
            ids[i] = token_ids(in, hp.n_vocab, what);
            seq.tokens = ids[i].data();
            seq.n = static_cast<int64_t>(ids[i].size());
        }
        lengths.push_back(seq.n);
        req.batch.push_back(seq);
    }
    if (!adapters_obj.is_none()) {
        std::vector<int64_t> slots;
        for (py::handle a : adapters_obj) slots.push_back(to_int(a, "adapters", -1, 1 << 20));
        if (slots.size() != req.batch.size()) bad_arg("adapters must give one slot per sequence");
        for (size_t i = 0; i < slots.size(); ++i) req.batch[i].adapter = static_cast<int32_t>(slots[i]);
    }
    req.rows_as_decode = to_bool(decode_exact, "decode_exact");
    req.batch_invariant = to_bool(invariant, "batch_invariant");
    req.decode_rows = to_int(decode_rows, "decode_rows", 0, INT64_MAX);
    req.logit_rows = output_rows(logit_spec, lengths, "logit_rows");
    req.hidden_rows = output_rows(hidden_spec, lengths, "hidden_rows");
    const int64_t L = static_cast<int64_t>(req.logit_rows.size()), H = static_cast<int64_t>(req.hidden_rows.size());
    py::object logits = py::none(), hidden = py::none();
    if (!logit_spec.is_none()) {
        FloatArray a({L, hp.n_vocab});
        req.logits = a.mutable_data();
        logits = a;
    }
    if (!hidden_spec.is_none()) {
        FloatArray a({H, hp.n_embd});
        req.hidden = a.mutable_data();
        hidden = a;
    }
    py::dict layers;
    if (!layer_spec.is_none()) {
        if (!py::isinstance<py::dict>(layer_spec)) bad_arg("layer_rows must be a dict {layer: rows}");
        for (auto item : py::reinterpret_borrow<py::dict>(layer_spec)) {
            LayerRows lr;
            lr.layer = to_int(item.first, "layer_rows layer", 0, hp.n_layer);
            lr.rows = output_rows(item.second, lengths, "layer_rows[" + std::to_string(lr.layer) + "]");
            FloatArray a({static_cast<int64_t>(lr.rows.size()), hp.n_embd});
            lr.out = a.mutable_data();
            layers[py::int_(lr.layer)] = a;
            req.layer_rows.push_back(std::move(lr));
        }
    }
    SignalPoll poll;
    req.interrupted = [&poll] { return poll(); };
    try {
        py::gil_scoped_release release;
        m.forward(req);
    } catch (const Error& e) {
        if (e.kind() == ErrorKind::interrupted) poll.rethrow_pending();
        throw;
    }
    return py::make_tuple(logits, hidden, layers);
}

std::shared_ptr<KVCache> make_cache(py::handle model, py::handle capacity, py::handle config, py::handle reserve) {
    if (py::isinstance<KVPool>(model)) {   // a paged cache: the pool holds the layout and the memory
        auto pool = model.cast<std::shared_ptr<KVPool>>();
        return std::make_shared<KVCache>(pool, to_int(capacity, "capacity", 1, int64_t(1) << 24));
    }
    if (!py::isinstance<Model>(model)) bad_arg("KVCache(model, ...): model must be a tokenmill._core.Model or a KVPool");
    if (!py::isinstance<KVCacheConfig>(config)) bad_arg("KVCache(..., config): config must be a KVCacheConfig");
    auto m = model.cast<std::shared_ptr<Model>>();
    const int64_t cap = to_int(capacity, "capacity", 1, int64_t(1) << 24);
    const int64_t res = to_int(reserve, "reserve", -1, int64_t(1) << 24);
    const KVCacheConfig cfg = config.cast<KVCacheConfig>();
    py::gil_scoped_release release;
    return std::make_shared<KVCache>(m, cap, cfg, res);
}

// A checked property: the getter reads the field, the setter converts with `conv`.
template <typename Class, typename T, typename Conv>
void checked_field(py::class_<Class>& cls, const char* name, T Class::*field, Conv conv) {
    cls.def_property(
        name, [field](const Class& c) { return c.*field; },
        [field, conv, name](Class& c, py::handle value) { c.*field = static_cast<T>(conv(value, name)); });
}

}  // namespace

PYBIND11_MODULE(_core, mod) {
    mod.doc() = "tokenmill native core";
    register_error_translator();

    mod.def("default_thread_count", &default_thread_count);
    mod.def("available_cpus", &available_cpus, "CPUs this process may run on (n_threads may not exceed it).");
    mod.def("devices", &built_devices, "Devices this build has backends for.");
    mod.def("cpu_level", [] { return std::string(cpu::kernels().name); }, "The active CPU kernel level.");
    mod.def("cpu_levels", [] {
        std::vector<std::string> names;
        for (cpu::Level l : cpu::supported_levels()) names.push_back(cpu::level_name(l));
        return names;
    }, "Kernel levels this CPU can run, best last.");
    mod.def("set_cpu_level", [](py::handle name) {
        const std::string level = to_str(name, "name");
        py::gil_scoped_release release;   // waits for running passes, which may need the GIL to finish
        cpu::set_level(level);
    }, py::arg("name"), "Forces a kernel level (tests, benchmarks); takes effect between forward passes.");
    for (const char* name : {"default_thread_count", "available_cpus", "devices", "cpu_level", "cpu_levels", "set_cpu_level"})
        reject_other_calls(mod, name, name);

    // ---- formats
    py::class_<GGUFFile, std::shared_ptr<GGUFFile>> gguf(mod, "GGUFFile");
    gguf.def(py::init([](py::handle path) {
             const std::string p = to_str(path, "path");
             py::gil_scoped_release release;
             return std::make_shared<GGUFFile>(p);
         }), py::arg("path"))
        .def_property_readonly("version", &GGUFFile::version)
        .def_property_readonly("alignment", &GGUFFile::alignment)
        .def("metadata", [](const GGUFFile& f) {
            py::dict d;
            for (const auto& [k, v] : f.metadata()) d[py::str(k)] = gguf_value_to_py(v);
            return d;
        })
        .def("tensors", [](const GGUFFile& f) {
            py::list out;
            for (const GGUFTensorInfo& t : f.tensors())
                out.append(py::make_tuple(t.name, dtype_name(t.type), t.shape, t.offset, t.nbytes));
            return out;
        })
        .def("dequantize", [](const GGUFFile& f, py::handle name_obj) {
            const std::string name = to_str(name_obj, "name");
            const GGUFTensorInfo* t = f.find_tensor(name);
            if (!t) fail(ErrorKind::invalid_arg, "no tensor named '" + name + "'");
            if (!dtype_info(t->type).runnable)
                fail(ErrorKind::unsupported, "tensor '" + name + "' has type " + dtype_name(t->type) + ", which cannot be dequantized yet");
            std::vector<int64_t> shape(t->shape.rbegin(), t->shape.rend());
            FloatArray out(shape);
            int64_t n = 1;
            for (int64_t d : shape) n *= d;
            float* dst = out.mutable_data();
            py::gil_scoped_release release;
            dequantize_row(t->type, t->data, dst, n);
            return out;
        }, py::arg("name"), "The tensor as float32, in numpy (row-major) order.");
    reject_other_inits(gguf, "GGUFFile");
    reject_other_calls(gguf, "dequantize", "GGUFFile.dequantize");
    reject_other_calls(gguf, "metadata", "GGUFFile.metadata");
    reject_other_calls(gguf, "tensors", "GGUFFile.tensors");

    mod.def("quantize", [](py::handle type, py::handle x_obj) {
        DType t = storage_type(type);
        FloatArray x = float_array(x_obj, "x", 1, false);
        int64_t n = static_cast<int64_t>(x.size());
        if (n % dtype_info(t).block_size != 0)
            fail(ErrorKind::invalid_arg, "length " + std::to_string(n) + " is not a multiple of the block size " +
                                             std::to_string(dtype_info(t).block_size));
        std::string out(row_bytes(t, n), '\0');
        {
            py::gil_scoped_release release;
            // blocks are independent: large inputs split over the cores in whole blocks of 256
            const int64_t chunk = int64_t{1} << 16;
            if (n <= chunk) {
                quantize_row(t, x.data(), out.data(), n);
            } else {
                ThreadPool pool(default_thread_count());
                pool.parallel_for((n + chunk - 1) / chunk, [&](int64_t c0, int64_t c1, int) {
                    for (int64_t c = c0; c < c1; ++c) {
                        const int64_t i0 = c * chunk, len = std::min(chunk, n - i0);
                        quantize_row(t, x.data() + i0, out.data() + row_bytes(t, i0), len);
                    }
                });
            }
        }
        return py::bytes(out);
    }, py::arg("type"), py::arg("x"), "The reference quantization of x (1-D float) into blocks of `type`.");
    reject_other_calls(mod, "quantize", "quantize");
    mod.def("dequantize", [](py::handle type, py::bytes data, py::handle n_obj) {
        const std::string name = to_str(type, "type");
        const DType parsed = dtype_from_name(name);
        DType t = extra_type(parsed) ? parsed : storage_type(type);   // storage types, and q5_* / the K-quants
        const int64_t n = to_int(n_obj, "n", 0, int64_t(1) << 40);
        std::string_view view = data;
        if (n % dtype_info(t).block_size != 0 || view.size() != row_bytes(t, n))
            fail(ErrorKind::invalid_arg, "byte length does not match " + std::to_string(n) + " elements of " + dtype_name(t));
        FloatArray out(n);
        float* dst = out.mutable_data();
        py::gil_scoped_release release;
        dequantize_row(t, view.data(), dst, n);
        return out;
    }, py::arg("type"), py::arg("data"), py::arg("n"), "The reference dequantization of n values of `type`.");
    reject_other_calls(mod, "dequantize", "dequantize");

    // ---- model
    py::enum_<RopeStyle>(mod, "RopeStyle")
        .value("none", RopeStyle::none)
        .value("adjacent", RopeStyle::adjacent)
        .value("halves", RopeStyle::halves);

    py::class_<HParams> hparams(mod, "HParams");
    hparams.def(py::init<>());
    auto int_conv = [](py::handle v, const char* name) { return to_int(v, name, INT64_MIN, INT64_MAX); };
    auto float_conv = [](py::handle v, const char* name) { return to_float(v, name); };
    hparams.def_property("arch", [](const HParams& h) { return h.arch; },
                         [](HParams& h, py::handle v) { h.arch = to_str(v, "arch"); });
    checked_field(hparams, "n_vocab", &HParams::n_vocab, int_conv);
    checked_field(hparams, "n_embd", &HParams::n_embd, int_conv);
    checked_field(hparams, "n_layer", &HParams::n_layer, int_conv);
    checked_field(hparams, "n_head", &HParams::n_head, int_conv);
    checked_field(hparams, "n_head_kv", &HParams::n_head_kv, int_conv);
    checked_field(hparams, "head_dim", &HParams::head_dim, int_conv);
    checked_field(hparams, "n_ff", &HParams::n_ff, int_conv);
    checked_field(hparams, "n_ctx_train", &HParams::n_ctx_train, int_conv);
    checked_field(hparams, "norm_eps", &HParams::norm_eps, float_conv);
    checked_field(hparams, "rope_theta", &HParams::rope_theta, float_conv);
    checked_field(hparams, "sliding_window", &HParams::sliding_window, int_conv);
    hparams.def_property("rope_style", [](const HParams& h) { return h.rope_style; }, [](HParams& h, py::handle v) {
        if (!py::isinstance<RopeStyle>(v)) bad_arg("rope_style must be a tokenmill._core.RopeStyle");
        h.rope_style = v.cast<RopeStyle>();
    });
    hparams.def_property("rope_freq_factors", [](const HParams& h) { return h.rope_freq_factors; },
                         [](HParams& h, py::handle v) {
                             if (!py::isinstance<py::sequence>(v) || py::isinstance<py::str>(v))
                                 bad_arg("rope_freq_factors must be a sequence of numbers");
                             std::vector<float> out;
                             for (py::handle item : py::iter(v)) out.push_back(to_float(item, "rope_freq_factors"));
                             h.rope_freq_factors = std::move(out);
                         });
    hparams.def_property("tied_embeddings", [](const HParams& h) { return h.tied_embeddings; },
                         [](HParams& h, py::handle v) { h.tied_embeddings = to_bool(v, "tied_embeddings"); });
    checked_field(hparams, "attn_scale", &HParams::attn_scale, float_conv);
    checked_field(hparams, "rope_theta_local", &HParams::rope_theta_local, float_conv);
    checked_field(hparams, "norm_offset", &HParams::norm_offset, float_conv);
    hparams.def_property("local_layers", [](const HParams& h) { return h.local_layers; }, [](HParams& h, py::handle v) {
        if (!py::isinstance<py::sequence>(v) || py::isinstance<py::str>(v)) bad_arg("local_layers must be a sequence of 0 / 1");
        std::vector<int32_t> out;
        for (py::handle item : py::iter(v)) out.push_back(to_bool(item, "local_layers") ? 1 : 0);
        h.local_layers = std::move(out);
    });
    reject_other_inits(hparams, "HParams");

    py::class_<Model, std::shared_ptr<Model>> model(mod, "Model");
    model.def_static("from_gguf", [](py::handle path, py::handle n_threads, py::handle weights, py::handle int8_prefill,
                                    py::handle device, py::handle int8_decode) {
            const std::string p = to_str(path, "path");
            LoadOptions options = load_options(n_threads, weights, int8_prefill, device, int8_decode);
            py::gil_scoped_release release;
            return Model::from_gguf(p, options);
        }, py::arg("path"), py::arg("n_threads") = 0, py::arg("weights") = "", py::arg("int8_prefill") = false,
        py::arg("device") = "cpu", py::arg("int8_decode") = false,
        "weights: a type every weight matrix is converted to on load (\"\" keeps the file's); int8_prefill / "
        "int8_decode: 4-bit weights meet activations rounded to int8 in prefill / decode; device: where the model runs")
        .def_static("from_safetensors", [](py::handle files, const HParams& hp, py::handle n_threads, py::handle weights,
                                           py::handle int8_prefill, py::handle device, py::handle int8_decode) {
            std::vector<std::string> paths = strings(files, "files");
            LoadOptions options = load_options(n_threads, weights, int8_prefill, device, int8_decode);
            py::gil_scoped_release release;
            return Model::from_safetensors(paths, hp, options);
        }, py::arg("files"), py::arg("hparams"), py::arg("n_threads") = 0, py::arg("weights") = "",
           py::arg("int8_prefill") = false, py::arg("device") = "cpu", py::arg("int8_decode") = false)
        .def_property_readonly("hparams", &Model::hparams)
        .def_property_readonly("n_params", &Model::n_params)
        .def_property_readonly("weight_bytes", &Model::weight_bytes)
        .def_property_readonly("n_threads", [](const Model& m) { return m.backend().n_threads(); })
        .def_property_readonly("backend", [](const Model& m) { return m.backend().name(); })
        .def("kv_bytes_per_token", [](const Model& m, const KVCacheConfig& c) { return KVCache::bytes_per_token(m, c); },
             py::arg("config"), "Bytes a cache with this configuration stores per token (all layers, K and V).")
        .def("kv_cache_bytes", [](const Model& m, py::handle capacity, const KVCacheConfig& c) {
            return KVCache::bytes_for(m, to_int(capacity, "capacity", 1, int64_t(1) << 24), c);
        }, py::arg("capacity"), py::arg("config"), "Bytes a full cache of this capacity and configuration holds.")
        .def("forward", &forward, py::arg("caches"), py::arg("inputs"), py::arg("logit_rows") = "last",
             py::arg("hidden_rows") = py::none(), py::arg("layer_rows") = py::none(), py::arg("adapters") = py::none(),
             py::arg("decode_exact") = false, py::arg("batch_invariant") = false, py::arg("decode_rows") = 0,
             "One forward pass over a batch: inputs[i] (token ids, or float embeddings [n, n_embd]) are appended to "
             "caches[i]. Rows are numbered across the batch; logit_rows / hidden_rows / each layer_rows value is "
             "'last' (of each sequence), 'all', None or row indices. Returns (logits [rows, n_vocab] or None, final "
             "hidden states [rows, n_embd] or None, {layer: residual stream [rows, n_embd]}). decode_exact: every row "
             "computed bit for bit as a one-token pass would (speculative verification); batch_invariant: every "
             "sequence's outputs independent of the rest of the batch, its first decode_rows rows computed as decode "
             "steps and the rest as prompt rows (a scheduler's passes). Ctrl-C stops a long "
             "pass within milliseconds and leaves every cache as it was.");
    py::class_<ForwardExtension, std::shared_ptr<ForwardExtension>>(mod, "ForwardExtension",
        "Something that joins a model's forward passes (an adapter, a memory layer); made by native modules.");
    model.def("add_extension", [](Model& m, std::shared_ptr<ForwardExtension> ext) {
            py::gil_scoped_release release;   // waits for a running pass
            m.add_extension(std::move(ext));
        }, py::arg("extension").none(false), "Joins every later forward pass.")
        .def("remove_extension", [](Model& m, const std::shared_ptr<ForwardExtension>& ext) {
            py::gil_scoped_release release;
            m.remove_extension(ext.get());
        }, py::arg("extension").none(false));
    register_adapters(mod);
    register_memory(mod);
    reject_other_calls(model, "add_extension", "Model.add_extension");
    reject_other_calls(model, "remove_extension", "Model.remove_extension");
    reject_other_static_calls(model, "from_gguf", "Model.from_gguf");
    reject_other_static_calls(model, "from_safetensors", "Model.from_safetensors");
    reject_other_calls(model, "kv_bytes_per_token", "Model.kv_bytes_per_token");
    reject_other_calls(model, "kv_cache_bytes", "Model.kv_cache_bytes");
    reject_other_calls(model, "forward", "Model.forward");

    py::class_<KVCacheConfig> kvconfig(mod, "KVCacheConfig");
    kvconfig.def(py::init([](py::handle k_kind, py::handle v_kind, py::handle residual_len, py::handle fp16_prefix_layers,
                             py::handle local_window) {
            KVCacheConfig c;
            c.k_type = kv_type_from_name(to_str(k_kind, "k_kind"));
            c.v_type = kv_type_from_name(to_str(v_kind, "v_kind"));
            c.residual_len = to_int(residual_len, "residual_len", 0, int64_t(1) << 20);
            c.fp16_prefix_layers = to_int(fp16_prefix_layers, "fp16_prefix_layers", 0, 4096);
            c.local_window = to_int(local_window, "local_window", 0, int64_t(1) << 24);
            return c;
        }), py::arg("k_kind") = "fp32", py::arg("v_kind") = "fp32", py::arg("residual_len") = 0,
            py::arg("fp16_prefix_layers") = 0, py::arg("local_window") = 0)
        .def_property_readonly("k_kind", [](const KVCacheConfig& c) { return kv_type_name(c.k_type); })
        .def_property_readonly("v_kind", [](const KVCacheConfig& c) { return kv_type_name(c.v_type); })
        .def_readonly("residual_len", &KVCacheConfig::residual_len)
        .def_readonly("fp16_prefix_layers", &KVCacheConfig::fp16_prefix_layers)
        .def_readonly("local_window", &KVCacheConfig::local_window);
    reject_other_inits(kvconfig, "KVCacheConfig");

    py::class_<KVCache, std::shared_ptr<KVCache>> cache(mod, "KVCache");
    cache.def(py::init(&make_cache), py::arg("model"), py::arg("capacity"), py::arg("config") = KVCacheConfig{},
              py::arg("reserve") = -1,
              "A cache for up to `capacity` tokens; memory for `reserve` of them now (-1: all), the rest on demand. "
              "Given a KVPool instead of a model: a paged cache whose positions live in the pool's blocks.")
        .def_property_readonly("capacity", &KVCache::capacity)
        .def_property_readonly("allocated", &KVCache::allocated)
        .def_property_readonly("n_past", &KVCache::n_past)
        .def_property_readonly("bytes", &KVCache::bytes)
        .def_property_readonly("config", &KVCache::config)
        .def("truncate", [](KVCache& c, py::handle n) { c.truncate(to_int(n, "n", INT64_MIN, INT64_MAX)); }, py::arg("n"))
        .def("reserve", [](KVCache& c, py::handle n) {
            const int64_t tokens = to_int(n, "n", 0, c.capacity());
            KVCache::Claim claim(c);
            py::gil_scoped_release release;
            c.reserve(tokens);
        }, py::arg("n"), "Allocates memory for n tokens now (n <= capacity).");
    cache.def_property_readonly("paged", &KVCache::paged)
        .def_property_readonly("block_table", &KVCache::block_table)
        .def("adopt", [](KVCache& c, py::handle blocks, py::handle n_tokens) {
            std::vector<int32_t> b;
            for (int64_t v : indices(blocks, "blocks")) b.push_back(static_cast<int32_t>(std::min<int64_t>(v, INT32_MAX)));
            c.adopt(b, to_int(n_tokens, "n_tokens", 0, int64_t(1) << 24));
        }, py::arg("blocks"), py::arg("n_tokens"), "An empty paged cache takes over n_tokens positions of shared blocks.");
    reject_other_inits(cache, "KVCache");
    reject_other_calls(cache, "adopt", "KVCache.adopt");

    py::class_<KVPool, std::shared_ptr<KVPool>> pool(mod, "KVPool");
    pool.def(py::init([](py::handle model, py::handle n_blocks, py::handle block_size, py::handle config) {
            if (!py::isinstance<Model>(model)) bad_arg("KVPool(model, ...): model must be a tokenmill._core.Model");
            if (!py::isinstance<KVCacheConfig>(config)) bad_arg("KVPool(..., config): config must be a KVCacheConfig");
            auto m = model.cast<std::shared_ptr<Model>>();
            const int64_t n = to_int(n_blocks, "n_blocks", 1, int64_t(1) << 24), bs = to_int(block_size, "block_size", 1, 4096);
            const KVCacheConfig cfg = config.cast<KVCacheConfig>();
            py::gil_scoped_release release;
            return std::make_shared<KVPool>(m, n, bs, cfg);
        }), py::arg("model"), py::arg("n_blocks"), py::arg("block_size"), py::arg("config") = KVCacheConfig{},
        "n_blocks blocks of block_size positions of every layer's K and V, shared by paged caches.")
        .def_property_readonly("n_blocks", &KVPool::n_blocks)
        .def_property_readonly("block_size", &KVPool::block_size)
        .def_property_readonly("free_blocks", &KVPool::free_blocks)
        .def_property_readonly("bytes", &KVPool::bytes)
        .def("retain", [](KVPool& p, py::handle b) { p.retain(static_cast<int32_t>(to_int(b, "block", 0, INT32_MAX))); },
             py::arg("block"))
        .def("release", [](KVPool& p, py::handle b) { p.release(static_cast<int32_t>(to_int(b, "block", 0, INT32_MAX))); },
             py::arg("block"))
        .def("refcount", [](const KVPool& p, py::handle b) { return p.refcount(static_cast<int32_t>(to_int(b, "block", 0, INT32_MAX))); },
             py::arg("block"));
    reject_other_inits(pool, "KVPool");
    for (const char* name : {"retain", "release", "refcount"}) reject_other_calls(pool, name, std::string("KVPool.") + name);
    model.def("kv_block_bytes", [](const Model& m, py::handle block_size, const KVCacheConfig& c) {
        return KVPool::bytes_per_block(m, to_int(block_size, "block_size", 1, 4096), c);
    }, py::arg("block_size"), py::arg("config"), "Bytes one KV pool block of this size and configuration takes.");
    reject_other_calls(model, "kv_block_bytes", "Model.kv_block_bytes");
    reject_other_calls(cache, "truncate", "KVCache.truncate");
    reject_other_calls(cache, "reserve", "KVCache.reserve");

    // ---- sampling
    py::class_<SamplerParams> params(mod, "SamplerParams");
    params.def(py::init<>());
    checked_field(params, "temperature", &SamplerParams::temperature, float_conv);
    checked_field(params, "top_k", &SamplerParams::top_k, [](py::handle v, const char* n) { return to_int(v, n, 0, INT32_MAX); });
    checked_field(params, "top_p", &SamplerParams::top_p, float_conv);
    checked_field(params, "min_p", &SamplerParams::min_p, float_conv);
    checked_field(params, "typical_p", &SamplerParams::typical_p, float_conv);
    checked_field(params, "repetition_penalty", &SamplerParams::repetition_penalty, float_conv);
    checked_field(params, "presence_penalty", &SamplerParams::presence_penalty, float_conv);
    checked_field(params, "frequency_penalty", &SamplerParams::frequency_penalty, float_conv);
    checked_field(params, "repeat_last_n", &SamplerParams::repeat_last_n,
                  [](py::handle v, const char* n) { return to_int(v, n, -1, INT32_MAX); });
    checked_field(params, "seed", &SamplerParams::seed, [](py::handle v, const char* n) {
        if (!PyLong_Check(v.ptr()) || PyBool_Check(v.ptr())) bad_arg(std::string(n) + " must be an integer");
        const unsigned long long s = PyLong_AsUnsignedLongLong(v.ptr());
        if (PyErr_Occurred()) {
            PyErr_Clear();
            bad_arg(std::string(n) + " must be in [0, 2**64)");
        }
        return s;
    });
    params.def_property("logit_bias", [](const SamplerParams& p) { return p.logit_bias; }, [](SamplerParams& p, py::handle v) {
        if (!py::isinstance<py::list>(v) && !py::isinstance<py::tuple>(v))
            bad_arg("logit_bias must be a list of (token id, bias) pairs");
        std::vector<std::pair<int32_t, float>> out;
        for (py::handle item : v) {
            if (!py::isinstance<py::tuple>(item) || py::len(item) != 2) bad_arg("logit_bias must be a list of (token id, bias) pairs");
            py::tuple pair = py::reinterpret_borrow<py::tuple>(item);
            out.emplace_back(static_cast<int32_t>(to_int(pair[0], "logit_bias token id", 0, INT32_MAX)),
                             static_cast<float>(to_float(pair[1], "logit_bias value")));
        }
        p.logit_bias = std::move(out);
    });
    reject_other_inits(params, "SamplerParams");

    py::class_<Sampler> sampler(mod, "Sampler");
    sampler.def(py::init([](const SamplerParams& p, py::handle n_vocab) {
            return std::make_unique<Sampler>(p, to_int(n_vocab, "n_vocab", INT64_MIN, INT64_MAX));
        }), py::arg("params"), py::arg("n_vocab"))
        .def("sample", [](Sampler& s, py::handle logits_obj, py::handle history_obj, py::handle allowed_obj) {
            FloatArray logits = float_array(logits_obj, "logits", 1, false);
            if (logits.shape(0) != s.n_vocab())
                fail(ErrorKind::invalid_arg, "logits must have the vocabulary size " + std::to_string(s.n_vocab()) +
                                                 ", got " + std::to_string(logits.shape(0)));
            // An int32 array is read in place and only the window the penalties use is checked, so a
            // sampling step costs O(repeat_last_n), not O(history).
            using IdArray = py::array_t<int32_t, py::array::c_style>;
            std::vector<int32_t> converted;
            const int32_t* history = nullptr;
            int64_t n = 0;
            IdArray view;
            if (py::isinstance<IdArray>(history_obj) && py::reinterpret_borrow<py::array>(history_obj).ndim() == 1) {
                view = py::reinterpret_borrow<IdArray>(history_obj);
                history = view.data();
                n = static_cast<int64_t>(view.size());
                const int64_t window = s.params().repeat_last_n < 0 ? n : std::min<int64_t>(n, s.params().repeat_last_n);
                for (int64_t i = n - window; i < n; ++i)
                    if (history[i] < 0 || history[i] >= s.n_vocab())
                        bad_arg("history: token id " + std::to_string(history[i]) + " is outside the vocabulary");
            } else {
                converted = token_ids(history_obj, s.n_vocab(), "history", true);
                history = converted.data();
                n = static_cast<int64_t>(converted.size());
            }
            std::vector<int32_t> allowed;
            const bool restricted = !allowed_obj.is_none();
            if (restricted) allowed = token_ids(allowed_obj, s.n_vocab(), "allowed", true);
            py::gil_scoped_release release;
            return restricted ? s.sample(logits.data(), history, n, allowed) : s.sample(logits.data(), history, n);
        }, py::arg("logits"), py::arg("history"), py::arg("allowed") = py::none(),
           "The next token; with `allowed`, only those token ids are eligible (structured output).")
        .def("distribution", [](Sampler& s, py::handle logits_obj, py::handle history_obj) {
            FloatArray logits = float_array(logits_obj, "logits", 1, false);
            if (logits.shape(0) != s.n_vocab())
                fail(ErrorKind::invalid_arg, "logits must have the vocabulary size " + std::to_string(s.n_vocab()));
            std::vector<int32_t> history = token_ids(history_obj, s.n_vocab(), "history", true);
            std::vector<int32_t> ids;
            std::vector<double> probs;
            {
                py::gil_scoped_release release;
                s.distribution(logits.data(), history.data(), static_cast<int64_t>(history.size()), ids, probs);
            }
            py::array_t<int32_t> ids_out(static_cast<py::ssize_t>(ids.size()));
            py::array_t<double> probs_out(static_cast<py::ssize_t>(probs.size()));
            std::copy(ids.begin(), ids.end(), ids_out.mutable_data());
            std::copy(probs.begin(), probs.end(), probs_out.mutable_data());
            return py::make_tuple(ids_out, probs_out);
        }, py::arg("logits"), py::arg("history"),
           "(ids, probabilities): what sample() would draw from, the most likely first.")
        .def("draw", [](Sampler& s, py::handle ids_obj, py::handle probs_obj) {
            std::vector<int32_t> ids = token_ids(ids_obj, s.n_vocab(), "ids");
            auto probs = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(probs_obj);
            if (!probs || probs.ndim() != 1 || static_cast<size_t>(probs.shape(0)) != ids.size()) {
                PyErr_Clear();
                bad_arg("probs must be a 1-D array of floats, one per id");
            }
            return s.draw(ids.data(), probs.data(), ids.size());
        }, py::arg("ids"), py::arg("probs"), "A token drawn from (ids, probabilities summing to 1).")
        .def("uniform", &Sampler::uniform, "The sampler generator's next uniform in [0, 1).")
        .def("last_candidates", &Sampler::last_candidates);
    reject_other_inits(sampler, "Sampler");
    reject_other_calls(sampler, "distribution", "Sampler.distribution");
    reject_other_calls(sampler, "draw", "Sampler.draw");
    reject_other_calls(sampler, "uniform", "Sampler.uniform");
    reject_other_calls(sampler, "sample", "Sampler.sample");
    reject_other_calls(sampler, "last_candidates", "Sampler.last_candidates");
}
