// tokenmill._core: thin pybind11 bindings over the C++ core. Ownership and policy live in the
// Python package; this file only converts arguments, releases the GIL around native work and maps
// tmill::Error kinds onto tokenmill.errors classes.
#include <cmath>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../cpp/dtype.h"
#include "../cpp/error.h"
#include "../cpp/gguf.h"
#include "../cpp/model.h"
#include "../cpp/quants.h"
#include "../cpp/sampler.h"
#include "../cpp/threadpool.h"
#include "../cpp/cpu/kernels.h"

namespace py = pybind11;
using namespace tmill;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IdArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

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

// Rows to output: "last" of each sequence, "all" rows, or "none".
std::vector<int64_t> output_rows(const std::vector<int64_t>& lengths, const std::string& which) {
    std::vector<int64_t> rows;
    int64_t row = 0;
    for (int64_t n : lengths) {
        if (which == "all") for (int64_t i = 0; i < n; ++i) rows.push_back(row + i);
        else if (which == "last") rows.push_back(row + n - 1);
        else if (which != "none") fail(ErrorKind::invalid_arg, "logits must be 'last', 'all' or 'none', got '" + which + "'");
        row += n;
    }
    return rows;
}

py::tuple run_forward(Model& m, std::vector<SequenceInput>& batch, const std::vector<int64_t>& lengths,
                      const std::string& logits, bool hidden) {
    std::vector<int64_t> rows = output_rows(lengths, logits);
    const int64_t R = static_cast<int64_t>(rows.size());
    FloatArray out_logits({R, m.hparams().n_vocab});
    py::object out_hidden = py::none();
    float* hidden_ptr = nullptr;
    if (hidden) {
        FloatArray h({R, m.hparams().n_embd});
        hidden_ptr = h.mutable_data();
        out_hidden = h;
    }
    float* logits_ptr = out_logits.mutable_data();
    {
        py::gil_scoped_release release;
        m.forward(batch, rows, logits_ptr, hidden_ptr);
    }
    return py::make_tuple(out_logits, out_hidden);
}

LoadOptions load_options(int n_threads, const std::string& weights, bool int8_prefill) {
    LoadOptions options;
    options.n_threads = n_threads;
    options.int8_prefill = int8_prefill;
    options.convert = !weights.empty();
    if (options.convert) options.weight_type = dtype_from_name(weights);
    return options;
}

}  // namespace

PYBIND11_MODULE(_core, mod) {
    mod.doc() = "tokenmill native core";

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const Error& e) {
            const char* cls = "TokenmillError";
            switch (e.kind()) {
                case ErrorKind::format: cls = "ModelFormatError"; break;
                case ErrorKind::unsupported: cls = "UnsupportedModelError"; break;
                case ErrorKind::invalid_arg: cls = "InvalidArgumentError"; break;
                case ErrorKind::context: cls = "ContextOverflowError"; break;
                case ErrorKind::io: cls = "ModelFileError"; break;
            }
            py::object type = py::module_::import("tokenmill.errors").attr(cls);
            // Messages quote names read from files, which need not be valid UTF-8.
            std::string_view what = e.what();
            py::object msg = py::reinterpret_steal<py::object>(
                PyUnicode_DecodeUTF8(what.data(), static_cast<Py_ssize_t>(what.size()), "replace"));
            PyErr_SetObject(type.ptr(), msg.ptr());
        }
    });

    mod.def("default_thread_count", &default_thread_count);
    mod.def("cpu_level", [] { return std::string(cpu::kernels().name); }, "The active CPU kernel level.");
    mod.def("cpu_levels", [] {
        std::vector<std::string> names;
        for (cpu::Level l : cpu::supported_levels()) names.push_back(cpu::level_name(l));
        return names;
    }, "Kernel levels this CPU can run, best last.");
    mod.def("set_cpu_level", &cpu::set_level, py::arg("name"), "Forces a kernel level (tests, benchmarks).");

    // ---- formats
    py::class_<GGUFFile, std::shared_ptr<GGUFFile>>(mod, "GGUFFile")
        .def(py::init([](const std::string& path) {
                 py::gil_scoped_release release;
                 return std::make_shared<GGUFFile>(path);
             }),
             py::arg("path"))
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
        .def("dequantize", [](const GGUFFile& f, const std::string& name) {
            const GGUFTensorInfo* t = f.find_tensor(name);
            if (!t) fail(ErrorKind::invalid_arg, "no tensor named '" + name + "'");
            std::vector<int64_t> shape(t->shape.rbegin(), t->shape.rend());
            FloatArray out(shape);
            int64_t n = 1;
            for (int64_t d : shape) n *= d;
            dequantize_row(t->type, t->data, out.mutable_data(), n);
            return out;
        }, py::arg("name"), "The tensor as float32, in numpy (row-major) order.");

    mod.def("quantize", [](const std::string& type, FloatArray x) {
        DType t = dtype_from_name(type);
        int64_t n = static_cast<int64_t>(x.size());
        if (n % dtype_info(t).block_size != 0) fail(ErrorKind::invalid_arg, "length is not a multiple of the block size");
        std::string out(row_bytes(t, n), '\0');
        quantize_row(t, x.data(), out.data(), n);
        return py::bytes(out);
    }, py::arg("type"), py::arg("x"));
    mod.def("dequantize", [](const std::string& type, py::bytes data, int64_t n, bool active_level) {
        DType t = dtype_from_name(type);
        std::string_view view = data;
        if (n < 0 || n % dtype_info(t).block_size != 0 || view.size() != row_bytes(t, n))
            fail(ErrorKind::invalid_arg, "byte length does not match " + std::to_string(n) + " elements of " + type);
        FloatArray out(n);
        if (active_level) cpu::kernels().dequantize_row(t, view.data(), out.mutable_data(), n);
        else dequantize_row(t, view.data(), out.mutable_data(), n);
        return out;
    }, py::arg("type"), py::arg("data"), py::arg("n"), py::arg("active_level") = false,
       "The reference dequantization, or with active_level the active CPU level's kernel.");

    // Test ops: one weight row against vectors, through the kernels a decode or prefill step uses.
    auto check_row = [](const std::string& type, std::string_view row, int64_t n) {
        DType t = dtype_from_name(type);
        if (n % dtype_info(t).block_size != 0 || row.size() != row_bytes(t, n))
            fail(ErrorKind::invalid_arg, "row bytes do not match " + std::to_string(n) + " elements of " + type);
        return t;
    };
    mod.def("dot_row", [check_row](const std::string& type, py::bytes data, FloatArray x, bool prepared) {
        std::string_view view = data;
        int64_t n = static_cast<int64_t>(x.size());
        DType t = check_row(type, view, n);
        const cpu::Kernels& k = cpu::kernels();
        if (!prepared || !cpu::uses_prepared_x(k, t)) return k.dot_row(t, view.data(), x.data(), n);
        std::vector<int16_t> q(static_cast<size_t>(2 * n));
        std::vector<float> d(static_cast<size_t>(n / 32)), sum(static_cast<size_t>(n / 32));
        k.prepare_x(x.data(), n, q.data(), d.data(), sum.data());
        return k.dot_row_prepared(t, view.data(), q.data(), d.data(), sum.data(), n);
    }, py::arg("type"), py::arg("row"), py::arg("x"), py::arg("prepared") = true,
       "Dot product of one stored weight row with x: the integer path where the level has one for the "
       "type (prepared), else the float kernel.");
    mod.def("dot_row_x4", [check_row](const std::string& type, py::bytes data, FloatArray xs) {
        std::string_view view = data;
        if (xs.ndim() != 2 || xs.shape(0) != 4) fail(ErrorKind::invalid_arg, "xs must have shape [4, n]");
        const int64_t n = xs.shape(1);
        DType t = check_row(type, view, n);
        const cpu::Kernels& k = cpu::kernels();
        if (!cpu::uses_prepared_x(k, t)) fail(ErrorKind::invalid_arg, "no integer path for " + type + " at this level");
        std::vector<int16_t> q(static_cast<size_t>(8 * n));
        std::vector<float> d(static_cast<size_t>(n / 8)), sum(static_cast<size_t>(n / 8));
        for (int64_t r = 0; r < 4; ++r)
            k.prepare_x(xs.data() + r * n, n, q.data() + 2 * r * n, d.data() + r * (n / 32), sum.data() + r * (n / 32));
        FloatArray out(4);
        k.dot_row_prepared_x4(t, view.data(), q.data(), d.data(), sum.data(), n, out.mutable_data());
        return out;
    }, py::arg("type"), py::arg("row"), py::arg("xs"), "One weight row against four vectors (small batches).");

    mod.def("dot_rows_packed8", [check_row](const std::string& type, py::bytes data, FloatArray x) {
        std::string_view view = data;
        const int64_t n = static_cast<int64_t>(x.size());
        DType t = dtype_from_name(type);
        const cpu::Kernels& k = cpu::kernels();
        if (!cpu::packable8(t) || !k.dot_packed8 || !k.dequantize_packed8)
            fail(ErrorKind::invalid_arg, "no eight-row path for " + type + " at this level");
        if (n % 32 != 0 || view.size() != 8 * row_bytes(t, n)) fail(ErrorKind::invalid_arg, "expected 8 rows of n values");
        check_row(type, view.substr(0, row_bytes(t, n)), n);
        std::vector<uint8_t> group(static_cast<size_t>(n / 32) * cpu::packed8_column_bytes(t));
        cpu::pack_rows8(t, reinterpret_cast<const uint8_t*>(view.data()), row_bytes(t, n), n, group.data());
        std::string unpacked(view.size(), '\0');   // every row read back from the layout
        for (int j = 0; j < 8; ++j)
            cpu::unpack_row8(t, group.data(), n, j, reinterpret_cast<uint8_t*>(unpacked.data()) + j * row_bytes(t, n));
        std::vector<int8_t> q(static_cast<size_t>(4 * n));
        std::vector<float> d(static_cast<size_t>(n / 32)), sum(static_cast<size_t>(n / 32));
        k.prepare_x8(x.data(), n, q.data(), d.data(), sum.data());
        FloatArray out(8);
        k.dot_packed8(t, group.data(), q.data(), d.data(), sum.data(), n, out.mutable_data());
        FloatArray floats({int64_t{8}, n});
        k.dequantize_packed8(t, group.data(), n, floats.mutable_data(), n);
        return py::make_tuple(out, py::bytes(unpacked), floats);
    }, py::arg("type"), py::arg("rows"), py::arg("x"),
       "Eight stored 4-bit rows against x through the eight-row layout (decode on AVX-512), the rows "
       "read back from that layout as bytes, and as floats (prefill).");

    mod.def("dot_rows_tile16", [check_row](const std::string& type, py::bytes data, FloatArray xs) {
        std::string_view view = data;
        DType t = dtype_from_name(type);
        const cpu::Kernels& k = cpu::kernels();
        constexpr int NT = cpu::kTile16Tokens;
        if (!cpu::packable8(t) || !k.dot_tile16) fail(ErrorKind::invalid_arg, "no int8 prefill path for " + type + " at this level");
        if (xs.ndim() != 2 || xs.shape(0) != NT) fail(ErrorKind::invalid_arg, "xs must have shape [8, n]");
        const int64_t n = xs.shape(1), rb = static_cast<int64_t>(row_bytes(t, n));
        if (n <= 0 || n % 32 != 0 || (view.size() != static_cast<size_t>(8 * rb) && view.size() != static_cast<size_t>(16 * rb)))
            fail(ErrorKind::invalid_arg, "expected 8 or 16 rows of n values");
        check_row(type, view.substr(0, rb), n);
        const int64_t n_rows = static_cast<int64_t>(view.size()) / rb;
        const size_t group_bytes = static_cast<size_t>(n / 32) * cpu::packed8_column_bytes(t);
        std::vector<uint8_t> groups(2 * group_bytes), tile(static_cast<size_t>(n / 32) * cpu::tile16_column_bytes(t));
        const uint8_t* rows = reinterpret_cast<const uint8_t*>(view.data());
        for (int64_t g = 0; g < n_rows / 8; ++g)
            cpu::pack_rows8(t, rows + g * 8 * rb, rb, n, groups.data() + g * group_bytes);
        k.repack16(t, groups.data(), n_rows == 16 ? groups.data() + group_bytes : nullptr, n, tile.data());
        std::vector<int8_t> q(static_cast<size_t>(4 * n * NT));
        std::vector<int8_t> a(static_cast<size_t>(n * NT));
        std::vector<float> d(static_cast<size_t>(n / 32 * NT)), sum(d.size()), rounded(d.size());
        const int8_t* qp[NT];
        const float *dp[NT], *sp[NT];
        for (int j = 0; j < NT; ++j) {
            k.prepare_x8(xs.data() + j * n, n, q.data() + 4 * j * n, d.data() + j * (n / 32), sum.data() + j * (n / 32));
            cpu::first_part(q.data() + 4 * j * n, d.data() + j * (n / 32), n, a.data() + j * n, rounded.data() + j * (n / 32));
            qp[j] = a.data() + j * n;
            dp[j] = d.data() + j * (n / 32);
            sp[j] = rounded.data() + j * (n / 32);
        }
        float out[16 * NT];
        k.dot_tile16(t, tile.data(), n, qp, dp, sp, out);
        FloatArray result({int64_t{NT}, n_rows});
        for (int j = 0; j < NT; ++j)
            for (int64_t r = 0; r < n_rows; ++r) result.mutable_data()[j * n_rows + r] = out[16 * j + r];
        return result;
    }, py::arg("type"), py::arg("rows"), py::arg("xs"),
       "8 or 16 stored 4-bit rows against 8 vectors through the int8 prefill kernel -> [8, rows].");

    mod.def("attention", [](FloatArray q, FloatArray k, FloatArray v, int n_heads, int n_kv_heads,
                            const std::string& k_kind, const std::string& v_kind, int64_t window, int64_t ring,
                            int n_threads) {
        const int64_t T = q.ndim() == 2 ? q.shape(0) : 0, N = k.ndim() == 2 ? k.shape(0) : 0;
        if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 || T <= 0 || T > N ||
            q.shape(1) % n_heads != 0 || v.ndim() != 2 || v.shape(0) != N)
            fail(ErrorKind::invalid_arg, "attention: q [T, heads*hd], k and v [N >= T, kv_heads*hd] expected");
        const int64_t hd = q.shape(1) / n_heads;
        if (k.shape(1) != n_kv_heads * hd || v.shape(1) != n_kv_heads * hd)
            fail(ErrorKind::invalid_arg, "attention: k and v must have kv_heads * head_dim columns");
        KVCacheConfig cfg;
        cfg.k_type = kv_type_from_name(k_kind);
        cfg.v_type = kv_type_from_name(v_kind);
        cfg.validate(hd, 1);
        if (ring < 0 || ring > N) fail(ErrorKind::invalid_arg, "attention: ring must be in [0, N]");
        std::vector<std::vector<uint8_t>> memory;
        auto store = [&](DType type, int64_t rows) {
            KVStore st;
            if (rows == 0) return st;
            st.type = type;
            st.capacity = rows;
            st.row_bytes = row_bytes(type, hd);
            memory.emplace_back(st.row_bytes * static_cast<size_t>(rows * n_kv_heads));
            st.data = memory.back().data();
            return st;
        };
        KVLayerView kv{store(cfg.k_type, N), store(cfg.v_type, N), store(DType::f16, ring), store(DType::f16, ring), ring, 0};
        FloatArray out({T, static_cast<int64_t>(q.shape(1))});
        {
            py::gil_scoped_release release;
            auto be = make_cpu_backend(n_threads);
            const AttentionShape shape{n_heads, n_kv_heads, static_cast<int>(hd), 1.0f / std::sqrt(static_cast<float>(hd))};
            // the first N - T rows as an earlier call, then the last T with their queries
            if (N > T) {
                AttentionSegment past{0, N - T, 0, window, kv};
                be->kv_store(k.data(), v.data(), &past, 1, shape);
                kv.ring_valid_from = std::max<int64_t>(0, N - T - ring);
            }
            AttentionSegment seg{0, T, N - T, window, kv};
            const size_t skip = static_cast<size_t>((N - T) * n_kv_heads * hd);
            be->kv_store(k.data() + skip, v.data() + skip, &seg, 1, shape);
            be->attention(out.mutable_data(), q.data(), &seg, 1, shape);
        }
        return out;
    }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("k_kind") = "fp32",
       py::arg("v_kind") = "fp32", py::arg("window") = 0, py::arg("ring") = 0, py::arg("n_threads") = 1,
       "The CPU backend's causal attention of the last T of N positions, K and V stored in the given kinds "
       "(the newest `ring` positions in fp16), as the kernels run it inside a model.");

    // ---- model
    py::enum_<RopeStyle>(mod, "RopeStyle")
        .value("none", RopeStyle::none)
        .value("adjacent", RopeStyle::adjacent)
        .value("halves", RopeStyle::halves);

    py::class_<HParams>(mod, "HParams")
        .def(py::init<>())
        .def_readwrite("arch", &HParams::arch)
        .def_readwrite("n_vocab", &HParams::n_vocab)
        .def_readwrite("n_embd", &HParams::n_embd)
        .def_readwrite("n_layer", &HParams::n_layer)
        .def_readwrite("n_head", &HParams::n_head)
        .def_readwrite("n_head_kv", &HParams::n_head_kv)
        .def_readwrite("head_dim", &HParams::head_dim)
        .def_readwrite("n_ff", &HParams::n_ff)
        .def_readwrite("n_ctx_train", &HParams::n_ctx_train)
        .def_readwrite("norm_eps", &HParams::norm_eps)
        .def_readwrite("rope_theta", &HParams::rope_theta)
        .def_readwrite("rope_style", &HParams::rope_style)
        .def_readwrite("sliding_window", &HParams::sliding_window)
        .def_readwrite("tied_embeddings", &HParams::tied_embeddings);

    py::class_<Model, std::shared_ptr<Model>>(mod, "Model")
        .def_static("from_gguf", [](const std::string& path, int n_threads, const std::string& weights, bool int8_prefill) {
            LoadOptions options = load_options(n_threads, weights, int8_prefill);
            py::gil_scoped_release release;
            return Model::from_gguf(path, options);
        }, py::arg("path"), py::arg("n_threads") = 0, py::arg("weights") = "", py::arg("int8_prefill") = false,
           "weights: a type every weight matrix is converted to on load (\"\" keeps the file's); int8_prefill: "
           "4-bit weights meet activations rounded to int8 in prefill")
        .def_static("from_safetensors", [](const std::vector<std::string>& files, const HParams& hp, int n_threads,
                                           const std::string& weights, bool int8_prefill) {
            LoadOptions options = load_options(n_threads, weights, int8_prefill);
            py::gil_scoped_release release;
            return Model::from_safetensors(files, hp, options);
        }, py::arg("files"), py::arg("hparams"), py::arg("n_threads") = 0, py::arg("weights") = "",
           py::arg("int8_prefill") = false)
        .def_property_readonly("hparams", &Model::hparams)
        .def_property_readonly("n_params", &Model::n_params)
        .def_property_readonly("weight_bytes", &Model::weight_bytes)
        .def_property_readonly("n_threads", [](const Model& m) { return m.backend().n_threads(); })
        .def_property_readonly("backend", [](const Model& m) { return m.backend().name(); })
        .def("kv_bytes_per_token", [](const Model& m, const KVCacheConfig& c) { return KVCache::bytes_per_token(m, c); },
             py::arg("config"), "Bytes a cache with this configuration stores per token (all layers, K and V).")
        .def("kv_cache_bytes", [](const Model& m, int64_t capacity, const KVCacheConfig& c) {
            return KVCache::bytes_for(m, capacity, c);
        }, py::arg("capacity"), py::arg("config"), "Bytes a cache of this capacity and configuration allocates.")
        .def("eval", [](Model& m, KVCache& cache, IdArray tokens, const std::string& logits, bool hidden) {
            if (tokens.ndim() != 1) fail(ErrorKind::invalid_arg, "tokens must be a 1-D sequence of ids");
            std::vector<SequenceInput> batch{{&cache, tokens.data(), nullptr, static_cast<int64_t>(tokens.size())}};
            return run_forward(m, batch, {batch[0].n}, logits, hidden);
        }, py::arg("cache"), py::arg("tokens"), py::arg("logits") = "last", py::arg("hidden") = false,
           "Appends tokens to the cache; returns (logits [rows, vocab], hidden [rows, embd] or None).")
        .def("eval_embeds", [](Model& m, KVCache& cache, FloatArray embeds, const std::string& logits, bool hidden) {
            if (embeds.ndim() != 2 || embeds.shape(1) != m.hparams().n_embd)
                fail(ErrorKind::invalid_arg, "embeds must have shape [n, " + std::to_string(m.hparams().n_embd) + "]");
            std::vector<SequenceInput> batch{{&cache, nullptr, embeds.data(), static_cast<int64_t>(embeds.shape(0))}};
            return run_forward(m, batch, {batch[0].n}, logits, hidden);
        }, py::arg("cache"), py::arg("embeds"), py::arg("logits") = "last", py::arg("hidden") = false)
        .def("eval_batch", [](Model& m, std::vector<KVCache*> caches, std::vector<IdArray> tokens, const std::string& logits) -> py::object {
            if (caches.size() != tokens.size()) fail(ErrorKind::invalid_arg, "one token array per cache is needed");
            std::vector<SequenceInput> batch;
            std::vector<int64_t> lengths;
            for (size_t i = 0; i < caches.size(); ++i) {
                if (tokens[i].ndim() != 1) fail(ErrorKind::invalid_arg, "tokens must be 1-D sequences of ids");
                batch.push_back({caches[i], tokens[i].data(), nullptr, static_cast<int64_t>(tokens[i].size())});
                lengths.push_back(batch.back().n);
            }
            py::tuple out = run_forward(m, batch, lengths, logits, false);
            return py::object(out[0]);
        }, py::arg("caches"), py::arg("tokens"), py::arg("logits") = "last");

    py::class_<KVCacheConfig>(mod, "KVCacheConfig")
        .def(py::init([](const std::string& k_kind, const std::string& v_kind, int64_t residual_len,
                         int64_t fp16_prefix_layers, int64_t local_window) {
            KVCacheConfig c;
            c.k_type = kv_type_from_name(k_kind);
            c.v_type = kv_type_from_name(v_kind);
            c.residual_len = residual_len;
            c.fp16_prefix_layers = fp16_prefix_layers;
            c.local_window = local_window;
            return c;
        }), py::arg("k_kind") = "fp32", py::arg("v_kind") = "fp32", py::arg("residual_len") = 0,
            py::arg("fp16_prefix_layers") = 0, py::arg("local_window") = 0)
        .def_property_readonly("k_kind", [](const KVCacheConfig& c) { return kv_type_name(c.k_type); })
        .def_property_readonly("v_kind", [](const KVCacheConfig& c) { return kv_type_name(c.v_type); })
        .def_readonly("residual_len", &KVCacheConfig::residual_len)
        .def_readonly("fp16_prefix_layers", &KVCacheConfig::fp16_prefix_layers)
        .def_readonly("local_window", &KVCacheConfig::local_window);

    py::class_<KVCache, std::shared_ptr<KVCache>>(mod, "KVCache")
        .def(py::init([](std::shared_ptr<Model> m, int64_t capacity, const KVCacheConfig& config) {
            return std::make_shared<KVCache>(m, capacity, config);
        }), py::arg("model"), py::arg("capacity"), py::arg("config") = KVCacheConfig{})
        .def_property_readonly("capacity", &KVCache::capacity)
        .def_property_readonly("n_past", &KVCache::n_past)
        .def_property_readonly("bytes", &KVCache::bytes)
        .def_property_readonly("config", &KVCache::config)
        .def("truncate", &KVCache::truncate, py::arg("n"));

    // ---- sampling
    py::class_<SamplerParams>(mod, "SamplerParams")
        .def(py::init<>())
        .def_readwrite("temperature", &SamplerParams::temperature)
        .def_readwrite("top_k", &SamplerParams::top_k)
        .def_readwrite("top_p", &SamplerParams::top_p)
        .def_readwrite("min_p", &SamplerParams::min_p)
        .def_readwrite("typical_p", &SamplerParams::typical_p)
        .def_readwrite("repetition_penalty", &SamplerParams::repetition_penalty)
        .def_readwrite("presence_penalty", &SamplerParams::presence_penalty)
        .def_readwrite("frequency_penalty", &SamplerParams::frequency_penalty)
        .def_readwrite("repeat_last_n", &SamplerParams::repeat_last_n)
        .def_readwrite("logit_bias", &SamplerParams::logit_bias)
        .def_readwrite("seed", &SamplerParams::seed);

    py::class_<Sampler>(mod, "Sampler")
        .def(py::init<SamplerParams, int64_t>(), py::arg("params"), py::arg("n_vocab"))
        .def("sample", [](Sampler& s, FloatArray logits, IdArray history) {
            if (logits.ndim() != 1 || logits.shape(0) != s.n_vocab())
                fail(ErrorKind::invalid_arg, "logits must be a 1-D array of the vocabulary size");
            py::gil_scoped_release release;
            return s.sample(logits.data(), history.data(), static_cast<int64_t>(history.size()));
        }, py::arg("logits"), py::arg("history"))
        .def("last_candidates", &Sampler::last_candidates);
}
