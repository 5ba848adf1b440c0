// tokenmill._core's LoRA classes: an adapter's weights (built pair by pair from arrays the Python
// loaders read) and the set of slots a model's passes consult; and the core's bounds-checked
// safetensors reader, so adapters in F32, F16 or BF16 load without torch.
#include "adapters.h"

#include <pybind11/stl.h>

#include "core/error.h"
#include "core/quants.h"
#include "io/safetensors.h"
#include "model/lora.h"

namespace tmbind {

using namespace tmill;

namespace {
using FloatArray = py::array_t<float, py::array::c_style>;

Projection projection_of(py::handle name) {
    const std::string n = to_str(name, "projection");
    for (Projection p : {Projection::q, Projection::k, Projection::v, Projection::o, Projection::gate, Projection::up,
                         Projection::down})
        if (n == projection_name(p)) return p;
    bad_arg("unknown projection '" + n + "' (q, k, v, o, gate, up, down)");
}
}  // namespace

void register_safetensors(py::module_& mod) {
    py::class_<SafetensorsFile, std::shared_ptr<SafetensorsFile>> st(mod, "SafetensorsFile",
        "A safetensors file, memory-mapped and bounds-checked.");
    st.def(py::init([](py::handle path) {
             const std::string p = to_str(path, "path");
             py::gil_scoped_release release;
             return std::make_shared<SafetensorsFile>(p);
         }), py::arg("path"))
        .def("metadata", [](const SafetensorsFile& f) { return f.metadata(); })
        .def("tensors", [](const SafetensorsFile& f) {
            py::dict out;
            for (const auto& [name, t] : f.tensors()) out[py::str(name)] = py::make_tuple(t.dtype_name, t.shape);
            return out;
        }, "name -> (dtype as written, shape).")
        .def("read", [](const SafetensorsFile& f, py::handle name_obj) {
            const std::string name = to_str(name_obj, "name");
            const auto it = f.tensors().find(name);
            if (it == f.tensors().end()) fail(ErrorKind::invalid_arg, "no tensor named '" + name + "'");
            const SafetensorInfo& t = it->second;
            if (!t.supported) fail(ErrorKind::unsupported, "tensor '" + name + "' has dtype " + t.dtype_name + " (F32, F16 and BF16 are read)");
            int64_t n = 1;
            for (int64_t d : t.shape) n *= d;
            if (static_cast<size_t>(n) * static_cast<size_t>(dtype_info(t.type).block_bytes) != t.nbytes)
                fail(ErrorKind::format, "tensor '" + name + "': its shape does not match its byte range");
            FloatArray out(t.shape);
            float* dst = out.mutable_data();
            py::gil_scoped_release release;
            dequantize_row(t.type, t.data, dst, n);
            return out;
        }, py::arg("name"), "The tensor as float32 in its own shape.");
    reject_other_inits(st, "SafetensorsFile");
    reject_other_calls(st, "read", "SafetensorsFile.read");
}

void register_adapters(py::module_& mod) {
    register_safetensors(mod);
    py::class_<LoraAdapter, std::shared_ptr<LoraAdapter>> adapter(mod, "LoraAdapter",
        "One LoRA adapter's low-rank pairs for a model (in backend memory; fp16 where exact, else f32).");
    adapter.def(py::init([](const std::shared_ptr<Model>& model) { return std::make_shared<LoraAdapter>(model); }),
                py::arg("model").none(false))
        .def("add", [](LoraAdapter& self, py::handle layer, py::handle proj, py::handle a_obj, py::handle b_obj,
                       py::handle scale) {
            const int64_t l = to_int(layer, "layer", 0, 1 << 20);
            const Projection p = projection_of(proj);
            auto a = float_array(a_obj, "A", 2, true);
            auto b = float_array(b_obj, "B", 2, true);
            const double s = to_float(scale, "scale");
            if (b.shape(1) != a.shape(0))
                bad_arg("LoRA layer " + std::to_string(l) + " " + projection_name(p) + ": A has rank " +
                        std::to_string(a.shape(0)) + " but B has " + std::to_string(b.shape(1)));
            py::gil_scoped_release release;
            self.add(l, p, a.data(), a.shape(0), a.shape(1), b.data(), b.shape(0), static_cast<float>(s));
        }, py::arg("layer"), py::arg("projection"), py::arg("a"), py::arg("b"), py::arg("scale"),
           "out += scale * B (A x) after `projection` of `layer`: A [r, n_in], B [n_out, r] (PEFT's layout).")
        .def("seal", [](LoraAdapter& self) {
            py::gil_scoped_release release;
            self.seal();
        }, "After the last add: lays the pairs out for streaming and hands them to the backend.")
        .def_property_readonly("n_pairs", &LoraAdapter::n_pairs)
        .def_property_readonly("n_params", &LoraAdapter::n_params)
        .def_property_readonly("bytes", &LoraAdapter::bytes, "Bytes of the stored pairs (fp16 where exact, else f32).");
    reject_other_inits(adapter, "LoraAdapter");
    reject_other_calls(adapter, "add", "LoraAdapter.add");

    py::class_<LoraSet, ForwardExtension, std::shared_ptr<LoraSet>> set(mod, "LoraSet",
        "A model's adapter slots: each slot a mix of adapters with scales; join it with Model.add_extension.");
    set.def(py::init<>())
        .def("set_slot", [](LoraSet& self, py::handle slot, py::handle mix_obj) {
            const int32_t s = static_cast<int32_t>(to_int(slot, "slot", 0, 1 << 30));
            LoraSet::Mix mix;
            if (!py::isinstance<py::list>(mix_obj) && !py::isinstance<py::tuple>(mix_obj)) bad_arg("mix must be a list of (LoraAdapter, scale)");
            for (py::handle item : mix_obj) {
                if (!py::isinstance<py::tuple>(item) && !py::isinstance<py::list>(item)) bad_arg("a mix holds (LoraAdapter, scale) pairs");
                auto pair = py::reinterpret_borrow<py::sequence>(item);
                if (pair.size() != 2 || !py::isinstance<LoraAdapter>(pair[0])) bad_arg("a mix holds (LoraAdapter, scale) pairs");
                mix.emplace_back(pair[0].cast<std::shared_ptr<LoraAdapter>>(), static_cast<float>(to_float(pair[1], "scale")));
            }
            py::gil_scoped_release release;
            self.set_slot(s, std::move(mix));
        }, py::arg("slot"), py::arg("mix"), "Slot `slot` applies every (adapter, scale) of `mix`; [] clears it.");
    reject_other_inits(set, "LoraSet");
    reject_other_calls(set, "set_slot", "LoraSet.set_slot");
}

}  // namespace tmbind
