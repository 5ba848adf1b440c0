// tokenmill._testing: kernels and extensions for the test suite only (the package never imports this
// module). The kernels run one weight row or one attention call exactly as a forward pass would; the
// extensions exercise the forward pass's seams (a low-rank addition to a projection, a vector added
// to the residual stream after a layer) the way adapters and memory layers will.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "backend/cpu/kernels.h"
#include "convert.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/quants.h"
#include "core/threadpool.h"
#include "kv/kv_cache.h"
#include "model/model.h"

namespace py = pybind11;
using namespace tmill;
using namespace tmbind;

namespace {

using FloatArray = py::array_t<float, py::array::c_style>;

DType type_of(py::handle name) {
    const std::string n = to_str(name, "type");
    for (uint32_t id = 0; id < 64; ++id) {
        DTypeInfo info = dtype_info(id);
        if (info.block_bytes != 0 && n == info.name && info.runnable) return static_cast<DType>(id);
    }
    if (n == "nf4") return DType::nf4;
    fail(ErrorKind::invalid_arg, "unknown or unrunnable tensor type '" + n + "'");
}

// One stored row of n values of type t.
DType check_row(py::handle type, std::string_view row, int64_t n) {
    DType t = type_of(type);
    if (n <= 0 || n % dtype_info(t).block_size != 0 || row.size() != row_bytes(t, n))
        fail(ErrorKind::invalid_arg, "row bytes do not match " + std::to_string(n) + " elements of " + dtype_name(t));
    return t;
}

// A backend (the CPU's or a device's) and the buffers an op test moves to and from it; the buffers
// go back before the backend does.
struct OpRunner {
    std::unique_ptr<Backend> be;
    std::vector<BackendBuffer> buffers;

    OpRunner(const std::string& device, int n_threads, bool int8 = false) {
        BackendOptions options;
        options.device = device;
        options.n_threads = n_threads;
        options.int8_prefill = options.int8_decode = int8;
        be = make_backend(options);
    }
    ~OpRunner() {
        buffers.clear();
        for (uint8_t* p : byte_buffers) be->free_bytes(p);
    }
    float* floats(size_t n) {
        buffers.emplace_back(*be, std::max<size_t>(n, 1));
        return buffers.back().get();
    }
    float* put(const float* host, size_t n) {
        float* p = floats(n);
        be->upload(p, host, n);
        return p;
    }
    uint8_t* bytes(size_t n) {
        byte_buffers.push_back(be->alloc_bytes(std::max<size_t>(n, 1)));
        return byte_buffers.back();
    }
    std::vector<uint8_t*> byte_buffers;
};

RowsMode rows_mode_of(const std::string& mode) {
    if (mode == "fast") return RowsMode::fast;
    if (mode == "as_decode") return RowsMode::as_decode;
    if (mode == "invariant") return RowsMode::invariant;
    fail(ErrorKind::invalid_arg, "unknown rows mode '" + mode + "' (fast, as_decode, invariant)");
}

Projection projection_of(py::handle name) {
    const std::string n = to_str(name, "projection");
    for (Projection p : {Projection::q, Projection::k, Projection::v, Projection::o, Projection::gate, Projection::up,
                         Projection::down})
        if (n == projection_name(p)) return p;
    fail(ErrorKind::invalid_arg, "unknown projection '" + n + "' (q, k, v, o, gate, up, down)");
}

// out += scale * B (A x) after one projection of one layer, for the sequences whose adapter slot
// matches (slot -1: every sequence): a LoRA adapter in miniature, computed through the backend on
// each sequence's own rows.
class LowRankAdd final : public ForwardExtension {
public:
    LowRankAdd(Model& m, int64_t layer, Projection p, const FloatArray& a, const FloatArray& b, double scale, int64_t slot)
        : layer_(layer), proj_(p), slot_(static_cast<int32_t>(slot)), rank_(a.shape(0)) {
        Backend& be = m.backend();
        std::vector<float> scaled(b.data(), b.data() + b.size());
        for (float& v : scaled) v = static_cast<float>(v * scale);
        a_ = be.upload_weight(DType::f32, a.shape(0), a.shape(1), host(a.data(), a.size()), nullptr, WeightUse::matmul);
        b_ = be.upload_weight(DType::f32, b.shape(0), b.shape(1), host(scaled.data(), scaled.size()), nullptr,
                              WeightUse::matmul);
    }

    void after_projections(const ForwardContext& ctx, int64_t layer, const ProjectionOutput* outs, int n, const float* x,
                           int64_t n_in) override {
        if (layer != layer_) return;
        for (int i = 0; i < n; ++i)
            if (outs[i].role == proj_) add(ctx, x, n_in, outs[i].out, outs[i].n_out);
    }

private:
    void add(const ForwardContext& ctx, const float* x, int64_t n_in, float* out, int64_t n_out) {
        if (n_in != a_.cols || n_out != b_.rows) fail(ErrorKind::invalid_arg, "LowRankAdd: shapes do not match the projection");
        Backend& be = ctx.backend;
        for (const BatchSegment& seg : ctx.segments) {
            if (slot_ >= 0 && seg.adapter != slot_) continue;
            BackendBuffer ax(be, static_cast<size_t>(seg.n_rows * rank_)), bax(be, static_cast<size_t>(seg.n_rows * n_out));
            be.matmul(ax.get(), x + seg.row0 * n_in, a_, seg.n_rows);      // [n, r] = x A^T
            be.matmul(bax.get(), ax.get(), b_, seg.n_rows);                // [n, out] = (x A^T) (sB)^T
            be.add(out + seg.row0 * n_out, bax.get(), seg.n_rows * n_out);
        }
    }

    // the weights' host bytes live with the extension (the CPU backend uses them in place)
    const uint8_t* host(const float* data, size_t n) {
        host_.emplace_back(reinterpret_cast<const uint8_t*>(data), reinterpret_cast<const uint8_t*>(data + n));
        return host_.back().data();
    }

    int64_t layer_;
    Projection proj_;
    int32_t slot_;
    int64_t rank_;
    std::vector<std::vector<uint8_t>> host_;
    Weight a_, b_;
};

// x[t] += v after one layer, for every row.
class AddAfterLayer final : public ForwardExtension {
public:
    AddAfterLayer(int64_t layer, const FloatArray& v) : layer_(layer), v_(v.data(), v.data() + v.size()) {}

    void after_layer(const ForwardContext& ctx, int64_t layer, float* x) override {
        if (layer != layer_) return;
        const int64_t E = static_cast<int64_t>(v_.size());
        std::vector<float> rows(static_cast<size_t>(ctx.n_rows * E));
        for (int64_t t = 0; t < ctx.n_rows; ++t) std::copy(v_.begin(), v_.end(), rows.begin() + t * E);
        BackendBuffer add(ctx.backend, rows.size());
        ctx.backend.upload(add.get(), rows.data(), rows.size());
        ctx.backend.add(x, add.get(), ctx.n_rows * E);
    }

private:
    int64_t layer_;
    std::vector<float> v_;
};

}  // namespace

PYBIND11_MODULE(_testing, mod) {
    mod.doc() = "tokenmill test-only kernels and extensions (never imported by the package)";
    py::module_::import("tokenmill._core");   // the shared types (Model, ForwardExtension) and error translation

    mod.def("dequantize_active", [](py::handle type, py::bytes data, py::handle n_obj) {
        DType t = type_of(type);
        const int64_t n = to_int(n_obj, "n", 0, int64_t(1) << 32);
        std::string_view view = data;
        if (n % dtype_info(t).block_size != 0 || view.size() != row_bytes(t, n))
            fail(ErrorKind::invalid_arg, "byte length does not match " + std::to_string(n) + " elements");
        FloatArray out(n);
        cpu::LevelPin pin;
        cpu::kernels().dequantize_row(t, view.data(), out.mutable_data(), n);
        return out;
    }, py::arg("type"), py::arg("data"), py::arg("n"), "Dequantization by the active CPU level's kernel.");

    mod.def("gelu_erf_active", [](py::handle x_obj) {
        FloatArray x = float_array(x_obj, "x", 1, false);
        FloatArray out(static_cast<int64_t>(x.size()));
        std::copy(x.data(), x.data() + x.size(), out.mutable_data());
        cpu::LevelPin pin;
        cpu::kernels().gelu_erf(out.mutable_data(), static_cast<int64_t>(x.size()));
        return out;
    }, py::arg("x"), "The exact GELU by the active CPU level's kernel.");

    mod.def("gelu_tanh_active", [](py::handle x_obj, py::handle up_obj) {
        FloatArray x = float_array(x_obj, "x", 1, false);
        std::optional<FloatArray> up;
        if (!up_obj.is_none()) {
            up = float_array(up_obj, "up", 1, false);
            if (up->size() != x.size()) fail(ErrorKind::invalid_arg, "up must have x's size");
        }
        FloatArray out(static_cast<int64_t>(x.size()));
        std::copy(x.data(), x.data() + x.size(), out.mutable_data());
        cpu::LevelPin pin;
        cpu::kernels().gelu_tanh(out.mutable_data(), up ? up->data() : nullptr, static_cast<int64_t>(x.size()));
        return out;
    }, py::arg("x"), py::arg("up") = py::none(), "The tanh GELU (times up: GeGLU) by the active CPU level's kernel.");

    mod.def("dot_row", [](py::handle type, py::bytes data, py::handle x_obj, bool prepared) {
        std::string_view view = data;
        FloatArray x = float_array(x_obj, "x", 1, false);
        int64_t n = static_cast<int64_t>(x.size());
        DType t = check_row(type, view, n);
        cpu::LevelPin pin;
        const cpu::Kernels& k = cpu::kernels();
        if (!prepared || !cpu::uses_prepared_x(k, t)) return k.dot_row(t, view.data(), x.data(), n);
        std::vector<int16_t> q(static_cast<size_t>(2 * n));
        std::vector<float> d(static_cast<size_t>(n / 32)), sum(static_cast<size_t>(n / 32));
        cpu::prepare_for(k, t)(x.data(), n, q.data(), d.data(), sum.data());
        return k.dot_row_prepared(t, view.data(), q.data(), d.data(), sum.data(), n);
    }, py::arg("type"), py::arg("row"), py::arg("x"), py::arg("prepared") = true,
       "Dot product of one stored weight row with x: the integer path where the level has one for the "
       "type (prepared), else the float kernel.");

    mod.def("dot_row_x4", [](py::handle type, py::bytes data, py::handle xs_obj) {
        std::string_view view = data;
        FloatArray xs = float_array(xs_obj, "xs", 2, false);
        if (xs.shape(0) != 4) fail(ErrorKind::invalid_arg, "xs must have shape [4, n]");
        const int64_t n = xs.shape(1);
        DType t = check_row(type, view, n);
        cpu::LevelPin pin;
        const cpu::Kernels& k = cpu::kernels();
        if (!cpu::uses_prepared_x(k, t)) fail(ErrorKind::invalid_arg, "no integer path for " + dtype_name(t) + " at this level");
        std::vector<int16_t> q(static_cast<size_t>(8 * n));
        std::vector<float> d(static_cast<size_t>(n / 8)), sum(static_cast<size_t>(n / 8));
        for (int64_t r = 0; r < 4; ++r)
            cpu::prepare_for(k, t)(xs.data() + r * n, n, q.data() + 2 * r * n, d.data() + r * (n / 32), sum.data() + r * (n / 32));
        FloatArray out(4);
        k.dot_row_prepared_x4(t, view.data(), q.data(), d.data(), sum.data(), n, out.mutable_data());
        return out;
    }, py::arg("type"), py::arg("row"), py::arg("xs"), "One weight row against four vectors (small batches).");

    mod.def("dot_rows_packed8", [](py::handle type, py::bytes data, py::handle x_obj) {
        std::string_view view = data;
        FloatArray x = float_array(x_obj, "x", 1, false);
        const int64_t n = static_cast<int64_t>(x.size());
        DType t = type_of(type);
        cpu::LevelPin pin;
        const cpu::Kernels& k = cpu::kernels();
        if (!cpu::packable8(t) || !k.dot_packed8 || !k.dequantize_packed8)
            fail(ErrorKind::invalid_arg, "no eight-row path for " + dtype_name(t) + " at this level");
        if (n <= 0 || n % 32 != 0 || view.size() != 8 * row_bytes(t, n)) fail(ErrorKind::invalid_arg, "expected 8 rows of n values");
        std::vector<uint8_t> group(static_cast<size_t>(n / 32) * cpu::packed8_column_bytes(t));
        cpu::pack_rows8(t, reinterpret_cast<const uint8_t*>(view.data()), row_bytes(t, n), n, group.data());
        std::string unpacked(view.size(), '\0');   // every row read back from the layout
        for (int j = 0; j < 8; ++j)
            cpu::unpack_row8(t, group.data(), n, j, reinterpret_cast<uint8_t*>(unpacked.data()) + j * row_bytes(t, n));
        std::vector<int8_t> q(static_cast<size_t>(4 * n));
        std::vector<float> d(static_cast<size_t>(n / 32)), sum(static_cast<size_t>(n / 32));
        k.prepare_x8(x.data(), n, q.data(), d.data(), sum.data(), 4);
        FloatArray out(8);
        k.dot_packed8(t, group.data(), q.data(), d.data(), sum.data(), n, out.mutable_data());
        FloatArray floats({int64_t{8}, n});
        k.dequantize_packed8(t, group.data(), n, floats.mutable_data(), n);
        return py::make_tuple(out, py::bytes(unpacked), floats);
    }, py::arg("type"), py::arg("rows"), py::arg("x"),
       "Eight stored 4-bit rows against x through the eight-row layout (decode on AVX-512), the rows "
       "read back from that layout as bytes, and as floats (prefill).");

    mod.def("dot_rows_q8_0_strip", [](py::bytes data, py::handle xs_obj, bool int8, bool amx) {
        std::string_view view = data;
        FloatArray xs = float_array(xs_obj, "xs", 2, false);
        cpu::LevelPin pin;
        const cpu::Kernels& k = cpu::kernels();
        if (!k.dot_q8_0_strip || !k.dot_q8_0_strip_int8) fail(ErrorKind::invalid_arg, "no Q8_0 strip kernel at this level");
        if (amx && !k.dot_q8_0_strip_amx) fail(ErrorKind::invalid_arg, "no AMX Q8_0 strip kernel here");
        const int64_t nt = xs.shape(0), n = xs.shape(1);
        const size_t rb = n > 0 && n % 32 == 0 ? row_bytes(DType::q8_0, n) : 0;
        const int n_rows = rb ? static_cast<int>(view.size() / rb) : 0;
        const int max_tokens = amx ? cpu::kAmxTokens : cpu::kPackedTokens;
        if (nt < 1 || nt > max_tokens || n_rows < 1 || n_rows > 16 || view.size() != n_rows * rb)
            fail(ErrorKind::invalid_arg, "expected 1 to 16 Q8_0 rows of n values and xs [1..4 (AMX: 16), n]");
        std::vector<uint8_t> strip(cpu::q8_0_strip_bytes(n));
        cpu::pack_q8_0_strip(reinterpret_cast<const uint8_t*>(view.data()), rb, n_rows, n, strip.data());
        const int64_t nb = n / 32;
        std::vector<int8_t> q(static_cast<size_t>(4 * n * nt));
        std::vector<float> d(static_cast<size_t>(nb * nt)), sum(static_cast<size_t>(nb * nt));
        std::vector<int32_t> s(static_cast<size_t>(2 * nb * nt));
        const int8_t* qs[cpu::kAmxTokens];
        const float* ds[cpu::kAmxTokens];
        const int32_t* ss[cpu::kAmxTokens];
        std::vector<int8_t> a(static_cast<size_t>(n * nt));   // int8: x rounded (the first parts)
        std::vector<float> rounded_sums(static_cast<size_t>(nb));
        for (int64_t t = 0; t < nt; ++t) {
            k.prepare_x8(xs.data() + t * n, n, q.data() + 4 * t * n, d.data() + t * nb, sum.data() + t * nb, 4);
            if (int8) {
                cpu::first_part(q.data() + 4 * t * n, d.data() + t * nb, n, a.data() + t * n, rounded_sums.data(),
                                s.data() + 2 * t * nb);
            } else {
                cpu::q8_0_part_sums(q.data() + 4 * t * n, n, s.data() + 2 * t * nb);
            }
            qs[t] = int8 ? a.data() + t * n : q.data() + 4 * t * n;
            ds[t] = d.data() + t * nb;
            ss[t] = s.data() + 2 * t * nb;
        }
        std::vector<float> o(static_cast<size_t>(16 * nt));
        if (amx && int8)
            k.dot_q8_0_strip_int8_amx(strip.data(), a.data(), n, ds, ss, static_cast<int>(nt), n, o.data());
        else if (amx)
            k.dot_q8_0_strip_amx(strip.data(), q.data(), 4 * n, ds, ss, static_cast<int>(nt), n, o.data());
        else
            (int8 ? k.dot_q8_0_strip_int8 : k.dot_q8_0_strip)(strip.data(), qs, ds, ss, static_cast<int>(nt), n, o.data());
        FloatArray out({nt, static_cast<int64_t>(n_rows)});
        for (int64_t t = 0; t < nt; ++t)
            for (int r = 0; r < n_rows; ++r) out.mutable_data()[t * n_rows + r] = o[static_cast<size_t>(16 * t + r)];
        return out;
    }, py::arg("rows"), py::arg("xs"), py::arg("int8") = false, py::arg("amx") = false,
       "Up to 16 stored Q8_0 rows against 1-4 vectors (AMX: 1-16) through the strip layout (decode on AVX-512, "
       "exact or int8 decode's): [tokens, rows].");

    mod.def("dot_rows_tile16", [](py::handle type, py::bytes data, py::handle xs_obj, bool packed) {
        std::string_view view = data;
        FloatArray xs = float_array(xs_obj, "xs", 2, false);
        DType t = type_of(type);
        cpu::LevelPin pin;
        const cpu::Kernels& k = cpu::kernels();
        constexpr int NT = cpu::kTile16Tokens;
        const bool kquant = !packed && cpu::repackable16(t) && k.repack16_rows;
        if (!(cpu::packable8(t) || kquant) || !k.dot_tile16)
            fail(ErrorKind::invalid_arg, "no int8 prefill path for " + dtype_name(t) + " at this level");
        if (xs.shape(0) != NT) fail(ErrorKind::invalid_arg, "xs must have shape [8, n]");
        const int64_t n = xs.shape(1), block = dtype_info(t).block_size;
        const int64_t rb = n > 0 && n % block == 0 ? static_cast<int64_t>(row_bytes(t, n)) : 0;
        const int64_t n_rows = rb ? static_cast<int64_t>(view.size()) / rb : 0;
        const bool rows_ok = rb && static_cast<int64_t>(view.size()) == n_rows * rb &&
                             (kquant ? n_rows >= 1 && n_rows <= 16 : n_rows == 8 || n_rows == 16);
        if (!rows_ok) fail(ErrorKind::invalid_arg, kquant ? "expected 1 to 16 rows of n values" : "expected 8 or 16 rows of n values");
        const size_t group_bytes = static_cast<size_t>(n / 32) * cpu::packed8_column_bytes(t);
        std::vector<uint8_t> groups(2 * group_bytes), tile(static_cast<size_t>(n / 32) * cpu::tile16_column_bytes(t));
        const uint8_t* rows = reinterpret_cast<const uint8_t*>(view.data());
        if (kquant) {
            k.repack16_rows(t, rows, static_cast<size_t>(rb), static_cast<int>(n_rows), 0, n, tile.data());
        } else {
            for (int64_t g = 0; g < n_rows / 8; ++g) cpu::pack_rows8(t, rows + g * 8 * rb, rb, n, groups.data() + g * group_bytes);
            k.repack16(t, groups.data(), n_rows == 16 ? groups.data() + group_bytes : nullptr, n, tile.data());
        }
        std::vector<int8_t> q(static_cast<size_t>(4 * n * NT));
        std::vector<int8_t> a(static_cast<size_t>(n * NT));
        std::vector<float> d(static_cast<size_t>(n / 32 * NT)), sum(d.size()), rounded(d.size());
        const int8_t* qp[NT];
        const float *dp[NT], *sp[NT];
        for (int j = 0; j < NT; ++j) {
            k.prepare_x8(xs.data() + j * n, n, q.data() + 4 * j * n, d.data() + j * (n / 32), sum.data() + j * (n / 32), 1);
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
    }, py::arg("type"), py::arg("rows"), py::arg("xs"), py::arg("packed") = false,
       "8 or 16 stored 4-bit rows (1 to 16 q5_* / K-quant rows) against 8 vectors through the int8 prefill kernel -> [8, rows]; "
       "packed: repacked from eight-row groups (the types pack_rows8 takes), not from the rows.");

    mod.def("dot_rows_q8_0_int8", [](py::bytes data, py::handle xs_obj, int rows_per_call, int tokens_per_call) {
        std::string_view view = data;
        FloatArray xs = float_array(xs_obj, "xs", 2, false);
        cpu::LevelPin pin;
        const cpu::Kernels& k = cpu::kernels();
        if (!k.dot_q8_0_int8 || !k.prepare_x8) fail(ErrorKind::invalid_arg, "no int8 q8_0 kernel at this level");
        if (rows_per_call < 1 || rows_per_call > 4 || tokens_per_call < 1 || tokens_per_call > cpu::kPackedTokens)
            fail(ErrorKind::invalid_arg, "rows_per_call must be in [1, 4] and tokens_per_call in [1, 4]");
        const int64_t n_tokens = xs.shape(0), n = xs.shape(1);
        const int64_t rb = n > 0 && n % 32 == 0 ? static_cast<int64_t>(row_bytes(DType::q8_0, n)) : 0;
        const int64_t n_rows = rb ? static_cast<int64_t>(view.size()) / rb : 0;
        if (!rb || n_rows < 1 || static_cast<int64_t>(view.size()) != n_rows * rb)
            fail(ErrorKind::invalid_arg, "expected whole q8_0 rows of n values (n a multiple of 32)");
        const int64_t nb = n / 32;
        std::vector<int8_t> q(static_cast<size_t>(4 * n)), a(static_cast<size_t>(n * n_tokens));
        std::vector<float> d(static_cast<size_t>(nb * n_tokens)), sum(static_cast<size_t>(nb)), rounded(static_cast<size_t>(nb));
        for (int64_t j = 0; j < n_tokens; ++j) {
            k.prepare_x8(xs.data() + j * n, n, q.data(), d.data() + j * nb, sum.data(), 1);
            cpu::first_part(q.data(), d.data() + j * nb, n, a.data() + j * n, rounded.data());
        }
        const auto* rows = reinterpret_cast<const uint8_t*>(view.data());
        FloatArray result({n_tokens, n_rows});
        for (int64_t r0 = 0; r0 < n_rows; r0 += rows_per_call) {
            const int nr = static_cast<int>(std::min<int64_t>(rows_per_call, n_rows - r0));
            const void* rp[4];
            for (int r = 0; r < nr; ++r) rp[r] = rows + (r0 + r) * rb;
            for (int64_t t0 = 0; t0 < n_tokens; t0 += tokens_per_call) {
                const int nt = static_cast<int>(std::min<int64_t>(tokens_per_call, n_tokens - t0));
                const int8_t* ap[cpu::kPackedTokens];
                const float* dp[cpu::kPackedTokens];
                for (int t = 0; t < nt; ++t) {
                    ap[t] = a.data() + (t0 + t) * n;
                    dp[t] = d.data() + (t0 + t) * nb;
                }
                float out[4 * cpu::kPackedTokens];
                k.dot_q8_0_int8(rp, nr, ap, dp, nt, n, out);
                for (int r = 0; r < nr; ++r)
                    for (int t = 0; t < nt; ++t) result.mutable_data()[(t0 + t) * n_rows + r0 + r] = out[r * nt + t];
            }
        }
        return result;
    }, py::arg("rows"), py::arg("xs"), py::arg("rows_per_call") = 4, py::arg("tokens_per_call") = 4,
       "q8_0 rows against vectors rounded to int8 through int8_decode's kernel, in calls of the given tile -> [tokens, rows].");

    mod.def("attention", [](py::handle q_obj, py::handle k_obj, py::handle v_obj, int n_heads, int n_kv_heads,
                            const std::string& k_kind, const std::string& v_kind, int64_t window, int64_t ring,
                            int n_threads, const std::string& device) {
        FloatArray q = float_array(q_obj, "q", 2, true), k = float_array(k_obj, "k", 2, true), v = float_array(v_obj, "v", 2, true);
        const int64_t T = q.shape(0), N = k.shape(0);
        if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 || T <= 0 || T > N ||
            q.shape(1) % n_heads != 0 || v.shape(0) != N)
            fail(ErrorKind::invalid_arg, "attention: q [T, heads*hd], k and v [N >= T, kv_heads*hd] expected");
        const int64_t hd = q.shape(1) / n_heads;
        if (k.shape(1) != n_kv_heads * hd || v.shape(1) != n_kv_heads * hd)
            fail(ErrorKind::invalid_arg, "attention: k and v must have kv_heads * head_dim columns");
        KVCacheConfig cfg;
        cfg.k_type = kv_type_from_name(k_kind);
        cfg.v_type = kv_type_from_name(v_kind);
        cfg.validate(hd, 1);
        if (ring < 0 || ring > N) fail(ErrorKind::invalid_arg, "attention: ring must be in [0, N]");
        FloatArray out({T, static_cast<int64_t>(q.shape(1))});
        {
            py::gil_scoped_release release;
            OpRunner run(device, n_threads);
            Backend* be = run.be.get();
            auto store = [&](DType type, int64_t rows) {
                KVStore st;
                if (rows == 0) return st;
                st.type = type;
                st.capacity = rows;
                st.row_bytes = row_bytes(type, hd);
                st.data = run.bytes(st.row_bytes * static_cast<size_t>(rows * n_kv_heads));
                return st;
            };
            KVLayerView kv{store(cfg.k_type, N), store(cfg.v_type, N), store(DType::f16, ring), store(DType::f16, ring), ring, 0};
            const float* qd = run.put(q.data(), q.size());
            const float* kd = run.put(k.data(), k.size());
            const float* vd = run.put(v.data(), v.size());
            float* od = run.floats(out.size());
            PassScope pass(*be);
            const AttentionShape shape{n_heads, n_kv_heads, static_cast<int>(hd), 1.0f / std::sqrt(static_cast<float>(hd))};
            // the first N - T rows as an earlier call, then the last T with their queries
            if (N > T) {
                AttentionSegment past{0, N - T, 0, window, kv};
                be->kv_store(kd, vd, &past, 1, shape);
                kv.ring_valid_from = std::max<int64_t>(0, N - T - ring);
            }
            AttentionSegment seg{0, T, N - T, window, kv};
            const size_t skip = static_cast<size_t>((N - T) * n_kv_heads * hd);
            be->kv_store(kd + skip, vd + skip, &seg, 1, shape);
            be->attention(od, qd, &seg, 1, shape);
            be->download(out.mutable_data(), od, out.size());
        }
        return out;
    }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("k_kind") = "fp32",
       py::arg("v_kind") = "fp32", py::arg("window") = 0, py::arg("ring") = 0, py::arg("n_threads") = 1,
       py::arg("device") = "cpu",
       "A backend's (the CPU's by default) causal attention of the last T of N positions, K and V stored in the given kinds "
       "(the newest `ring` positions in fp16), as the kernels run it inside a model.");

    mod.def("backend_matmul", [](const std::string& device, py::handle type, py::bytes data, int64_t rows,
                                 py::handle x_obj, const std::string& mode, py::object bias_obj, bool int8) {
        FloatArray x = float_array(x_obj, "x", 2, false);
        const int64_t T = x.shape(0), cols = x.shape(1);
        std::string_view view = data;
        DType t = type_of(type);
        if (rows <= 0 || T <= 0 || cols % dtype_info(t).block_size != 0 || view.size() != row_bytes(t, cols) * static_cast<size_t>(rows))
            fail(ErrorKind::invalid_arg, "backend_matmul: rows x cols of the type expected");
        std::vector<float> bias;
        if (!bias_obj.is_none()) {
            FloatArray b = float_array(bias_obj, "bias", 1, false);
            if (static_cast<int64_t>(b.size()) != rows) fail(ErrorKind::invalid_arg, "backend_matmul: bias must have `rows` values");
            bias.assign(b.data(), b.data() + b.size());
        }
        const RowsMode m = rows_mode_of(mode);
        FloatArray out({T, rows});
        py::gil_scoped_release release;
        OpRunner run(device, 1, int8);
        const Weight w = run.be->upload_weight(t, rows, cols, reinterpret_cast<const uint8_t*>(view.data()),
                                               bias.empty() ? nullptr : bias.data(), WeightUse::matmul);
        const float* xd = run.put(x.data(), x.size());
        float* od = run.floats(out.size());
        PassScope pass(*run.be);
        run.be->set_rows_mode(m);
        run.be->matmul(od, xd, w, T);
        run.be->download(out.mutable_data(), od, out.size());
        return out;
    }, py::arg("device"), py::arg("type"), py::arg("rows"), py::arg("n_rows"), py::arg("x"), py::arg("mode") = "fast",
       py::arg("bias") = py::none(), py::arg("int8") = false,
       "x [T, cols] times stored rows (n_rows of `type`) on a backend, in a rows mode (int8: int8 prefill and decode).");

    mod.def("backend_get_rows", [](const std::string& device, py::handle type, py::bytes data, int64_t rows, int64_t cols,
                                   const std::vector<int32_t>& ids) {
        std::string_view view = data;
        DType t = type_of(type);
        if (rows <= 0 || cols % dtype_info(t).block_size != 0 || view.size() != row_bytes(t, cols) * static_cast<size_t>(rows))
            fail(ErrorKind::invalid_arg, "backend_get_rows: rows x cols of the type expected");
        for (int32_t id : ids)
            if (id < 0 || id >= rows) fail(ErrorKind::invalid_arg, "backend_get_rows: id out of range");
        const int64_t T = static_cast<int64_t>(ids.size());
        FloatArray out({T, cols});
        py::gil_scoped_release release;
        OpRunner run(device, 1);
        const Weight w = run.be->upload_weight(t, rows, cols, reinterpret_cast<const uint8_t*>(view.data()), nullptr, WeightUse::rows);
        float* od = run.floats(out.size());
        PassScope pass(*run.be);
        run.be->get_rows(od, w, ids.data(), T);
        run.be->download(out.mutable_data(), od, out.size());
        return out;
    }, py::arg("device"), py::arg("type"), py::arg("rows"), py::arg("n_rows"), py::arg("n_cols"), py::arg("ids"),
       "Embedding rows looked up on a backend.");

    mod.def("backend_op", [](const std::string& device, const std::string& op, py::handle x_obj, py::object y_obj,
                             py::object weight_obj, py::object bias_obj, float value) {
        FloatArray x = float_array(x_obj, "x", 2, false);
        const int64_t T = x.shape(0), n = x.shape(1);
        auto optional = [&](py::object o, const char* what, int64_t size, int ndim) {
            std::vector<float> v;
            if (o.is_none()) return v;
            FloatArray a = float_array(o, what, ndim, false);
            if (static_cast<int64_t>(a.size()) != size) fail(ErrorKind::invalid_arg, std::string("backend_op: wrong size of ") + what);
            v.assign(a.data(), a.data() + a.size());
            return v;
        };
        const std::vector<float> y = optional(y_obj, "y", T * n, 2), weight = optional(weight_obj, "weight", n, 1),
                                 bias = optional(bias_obj, "bias", n, 1);
        const bool binary = op == "add" || op == "swiglu" || op == "geglu", norm = op == "rms_norm" || op == "layer_norm";
        if (!binary && !norm && op != "gelu" && op != "scale" && op != "gelu_erf")
            fail(ErrorKind::invalid_arg, "backend_op: unknown op '" + op + "'");
        if ((binary && y.empty()) || (norm && weight.empty())) fail(ErrorKind::invalid_arg, "backend_op: '" + op + "' needs more inputs");
        FloatArray out({T, n});
        py::gil_scoped_release release;
        OpRunner run(device, 1);
        Backend& be = *run.be;
        float* xd = run.put(x.data(), x.size());
        float* yd = y.empty() ? nullptr : run.put(y.data(), y.size());
        const float* wd = weight.empty() ? nullptr : be.upload_vector(weight.data(), weight.size());
        const float* bd = bias.empty() ? nullptr : be.upload_vector(bias.data(), bias.size());
        float* od = run.floats(out.size());
        PassScope pass(be);
        const int64_t N = T * n;
        if (op == "add") be.add(xd, yd, N);
        else if (op == "swiglu") be.swiglu(xd, yd, N);
        else if (op == "geglu") be.geglu(xd, yd, N);
        else if (op == "gelu") be.gelu(xd, N);
        else if (op == "gelu_erf") be.gelu_erf(xd, N);
        else if (op == "scale") be.scale(xd, value, N);
        else if (op == "rms_norm") be.rms_norm(od, xd, wd, T, n, value);
        else be.layer_norm(od, xd, wd, bd, T, n, value);
        be.download(out.mutable_data(), norm ? od : xd, out.size());
        return out;
    }, py::arg("device"), py::arg("op"), py::arg("x"), py::arg("y") = py::none(), py::arg("weight") = py::none(),
       py::arg("bias") = py::none(), py::arg("value") = 0.0f,
       "One element-wise or norm op on a backend: add / swiglu / geglu (x, y), gelu, gelu_erf, scale (value), "
       "rms_norm / layer_norm (weight, bias, eps = value) of x [T, n].");

    mod.def("backend_rope", [](const std::string& device, py::handle x_obj, int n_heads, const std::vector<int32_t>& pos,
                               float theta, const std::string& style, py::object factors_obj) {
        FloatArray x = float_array(x_obj, "x", 2, false);
        const int64_t T = x.shape(0);
        if (n_heads <= 0 || x.shape(1) % n_heads != 0 || static_cast<int64_t>(pos.size()) != T || (x.shape(1) / n_heads) % 2 != 0)
            fail(ErrorKind::invalid_arg, "backend_rope: x [T, n_heads * even head_dim] and T positions expected");
        const int hd = static_cast<int>(x.shape(1) / n_heads);
        std::vector<float> factors;
        if (!factors_obj.is_none()) {
            FloatArray f = float_array(factors_obj, "freq_factors", 1, false);
            if (static_cast<int>(f.size()) != hd / 2) fail(ErrorKind::invalid_arg, "backend_rope: head_dim / 2 factors expected");
            factors.assign(f.data(), f.data() + f.size());
        }
        if (style != "adjacent" && style != "halves") fail(ErrorKind::invalid_arg, "backend_rope: style adjacent or halves");
        FloatArray out({T, static_cast<int64_t>(x.shape(1))});
        py::gil_scoped_release release;
        OpRunner run(device, 1);
        float* xd = run.put(x.data(), x.size());
        PassScope pass(*run.be);
        run.be->rope(xd, T, n_heads, hd, pos.data(), theta, style == "adjacent" ? RopeStyle::adjacent : RopeStyle::halves,
                     factors.empty() ? nullptr : factors.data());
        run.be->download(out.mutable_data(), xd, out.size());
        return out;
    }, py::arg("device"), py::arg("x"), py::arg("n_heads"), py::arg("pos"), py::arg("theta"), py::arg("style"),
       py::arg("freq_factors") = py::none(), "RoPE in place on a backend.");

    mod.def("backend_lora", [](const std::string& device, py::handle x_obj, py::handle a_obj, py::handle bt_obj, float scale,
                               py::handle out_obj, bool half) {
        FloatArray x = float_array(x_obj, "x", 2, false), a = float_array(a_obj, "a", 2, false),
                   bt = float_array(bt_obj, "bt", 2, false), out0 = float_array(out_obj, "out", 2, false);
        const int64_t n = x.shape(0), r = a.shape(0);
        if (a.shape(1) != x.shape(1) || bt.shape(0) != r || out0.shape(0) != n || out0.shape(1) != bt.shape(1))
            fail(ErrorKind::invalid_arg, "backend_lora: x [n, in], a [r, in], bt [r, out], out [n, out] expected");
        FloatArray out({n, static_cast<int64_t>(bt.shape(1))});
        py::gil_scoped_release release;
        OpRunner run(device, 1);
        const DType type = half ? DType::f16 : DType::f32;
        std::vector<uint8_t> a_bytes(row_bytes(type, a.size())), bt_bytes(row_bytes(type, bt.size()));
        quantize_row(type, a.data(), a_bytes.data(), static_cast<int64_t>(a.size()));
        quantize_row(type, bt.data(), bt_bytes.data(), static_cast<int64_t>(bt.size()));
        const Weight aw = run.be->upload_weight(type, r, a.shape(1), a_bytes.data(), nullptr, WeightUse::rows);
        const Weight bw = run.be->upload_weight(type, r, bt.shape(1), bt_bytes.data(), nullptr, WeightUse::rows);
        const float* xd = run.put(x.data(), x.size());
        float* od = run.put(out0.data(), out0.size());
        PassScope pass(*run.be);
        const LoraItem item{od, xd, &aw, &bw, scale, n};
        run.be->lora_add(&item, 1);
        run.be->download(out.mutable_data(), od, out.size());
        return out;
    }, py::arg("device"), py::arg("x"), py::arg("a"), py::arg("bt"), py::arg("scale"), py::arg("out"), py::arg("half") = false,
       "out + scale (x A^T) BT on a backend, A and BT stored as f32 or (half) rounded to f16.");

    mod.def("pool_raise", [](py::handle n_threads, py::handle thrower) {
        ThreadPool pool(static_cast<int>(to_int(n_threads, "n_threads", 1, 64)));
        const int t_bad = static_cast<int>(to_int(thrower, "thrower", 0, 63));
        py::gil_scoped_release release;
        pool.run([&](int t) {
            if (t == t_bad) fail(ErrorKind::invalid_arg, "thread " + std::to_string(t) + " of the pool failed");
        });
    }, py::arg("n_threads"), py::arg("thrower"), "A pool region in which one thread throws: the error reaches the caller.");
    mod.def("pool_recovers", [](py::handle n_threads) {
        ThreadPool pool(static_cast<int>(to_int(n_threads, "n_threads", 1, 64)));
        py::gil_scoped_release release;
        try {
            pool.parallel_for(1000, [&](int64_t i0, int64_t, int) {
                if (i0 > 0) fail(ErrorKind::invalid_arg, "a chunk failed");
            });
        } catch (const Error&) {
        }
        std::atomic<int64_t> sum{0};
        pool.parallel_for(1000, [&](int64_t i0, int64_t i1, int) {
            for (int64_t i = i0; i < i1; ++i) sum += i;
        });
        return sum.load();
    }, py::arg("n_threads"), "After a region that threw, the same pool sums 0..999 correctly.");

    py::class_<LowRankAdd, ForwardExtension, std::shared_ptr<LowRankAdd>>(mod, "LowRankAdd")
        .def(py::init([](Model& m, py::handle layer, py::handle projection, py::handle a_obj, py::handle b_obj,
                         py::handle scale, py::handle slot) {
                 FloatArray a = float_array(a_obj, "a", 2, true), b = float_array(b_obj, "b", 2, true);
                 if (b.shape(1) != a.shape(0)) fail(ErrorKind::invalid_arg, "a [r, in] and b [out, r] must share r");
                 return std::make_shared<LowRankAdd>(m, to_int(layer, "layer", 0, m.hparams().n_layer - 1),
                                                     projection_of(projection), a, b, to_float(scale, "scale"),
                                                     to_int(slot, "slot", -1, 1 << 20));
             }),
             py::arg("model"), py::arg("layer"), py::arg("projection"), py::arg("a"), py::arg("b"), py::arg("scale") = 1.0,
             py::arg("slot") = -1, "out += scale * b @ (a @ x) after `projection` of `layer` (sequences of adapter `slot`).");

    py::class_<AddAfterLayer, ForwardExtension, std::shared_ptr<AddAfterLayer>>(mod, "AddAfterLayer")
        .def(py::init([](Model& m, py::handle layer, py::handle v_obj) {
                 FloatArray v = float_array(v_obj, "v", 1, true);
                 if (v.shape(0) != m.hparams().n_embd) fail(ErrorKind::invalid_arg, "v must have n_embd values");
                 return std::make_shared<AddAfterLayer>(to_int(layer, "layer", 0, m.hparams().n_layer - 1), v);
             }),
             py::arg("model"), py::arg("layer"), py::arg("v"), "x[t] += v after decoder layer `layer`.");
}
