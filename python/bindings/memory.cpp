#include "memory.h"

#include <pybind11/stl.h>

#include "core/error.h"
#include "model/memory.h"

namespace tmbind {

using namespace tmill;

namespace {
HostMatrix host_matrix(py::handle obj, const std::string& what) {
    auto a = float_array(obj, what, 2, true);
    HostMatrix m;
    m.rows = a.shape(0);
    m.cols = a.shape(1);
    m.data.assign(a.data(), a.data() + m.rows * m.cols);
    return m;
}

std::vector<HostMatrix> chain(py::handle obj, const std::string& what) {
    if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj)) bad_arg(what + " must be a list of matrices");
    std::vector<HostMatrix> out;
    for (py::handle m : obj) out.push_back(host_matrix(m, what));
    return out;
}

MemoryQuant quant_of(py::handle obj) {
    const std::string n = to_str(obj, "quant");
    if (n == "f32") return MemoryQuant::f32;
    if (n == "int8") return MemoryQuant::int8;
    if (n == "int4") return MemoryQuant::int4;
    bad_arg("unknown memory storage '" + n + "' (f32, int8, int4)");
}
}  // namespace

void register_memory(py::module_& mod) {
    py::class_<MemoryLayers, ForwardExtension, std::shared_ptr<MemoryLayers>> cls(mod, "MemoryLayers",
        "A model's memory layers (memory cross-attention over routed chapters); join with Model.add_extension.");
    cls.def(py::init([](const std::shared_ptr<Model>& model, py::handle n_heads, py::handle n_kv_heads, py::handle head_dim,
                        py::handle n_slots, py::handle n_chapters, py::handle n_shared, py::handle top_k,
                        py::handle routed_scale, py::handle norm_eps, py::handle strategy, py::handle window) {
             MemoryOptions o;
             o.n_heads = static_cast<int>(to_int(n_heads, "n_heads", 1, 1 << 16));
             o.n_kv_heads = static_cast<int>(to_int(n_kv_heads, "n_kv_heads", 1, 1 << 16));
             o.head_dim = static_cast<int>(to_int(head_dim, "head_dim", 1, 1 << 16));
             o.n_slots = to_int(n_slots, "n_slots", 1, int64_t(1) << 24);
             o.n_chapters = to_int(n_chapters, "n_chapters", 0, int64_t(1) << 20);
             o.n_shared = to_int(n_shared, "n_shared", 0, int64_t(1) << 20);
             o.top_k = to_int(top_k, "top_k", 0, int64_t(1) << 20);
             o.routed_scale = static_cast<float>(to_float(routed_scale, "routed_scale"));
             o.norm_eps = static_cast<float>(to_float(norm_eps, "norm_eps"));
             o.strategy = routing_from_name(to_str(strategy, "strategy"));
             o.window = to_int(window, "window", 1, int64_t(1) << 30);
             return std::make_shared<MemoryLayers>(model, o);
         }), py::arg("model").none(false), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("n_slots"),
         py::arg("n_chapters"), py::arg("n_shared"), py::arg("top_k"), py::arg("routed_scale"), py::arg("norm_eps"),
         py::arg("strategy"), py::arg("window"))
        .def("add_layer", [](MemoryLayers& self, py::handle layer, py::handle norm, py::handle q, py::handle o, py::handle k,
                             py::handle v, py::handle router, py::handle router_bias) {
            const int64_t l = to_int(layer, "layer", 0, 1 << 20);
            auto n = float_array(norm, "norm", 1, true);
            std::vector<float> norm_v(n.data(), n.data() + n.shape(0));
            HostMatrix r;
            std::vector<float> bias;
            if (!router.is_none()) {
                r = host_matrix(router, "router");
                auto b = float_array(router_bias, "router_bias", 1, true);
                bias.assign(b.data(), b.data() + b.shape(0));
            }
            auto qc = chain(q, "q"), oc = chain(o, "o");
            HostMatrix km = host_matrix(k, "k"), vm = host_matrix(v, "v");
            py::gil_scoped_release release;
            self.add_layer(l, std::move(norm_v), std::move(qc), std::move(oc), km, vm, std::move(r), std::move(bias));
        }, py::arg("layer"), py::arg("norm"), py::arg("q"), py::arg("o"), py::arg("k"), py::arg("v"),
           py::arg("router") = py::none(), py::arg("router_bias") = py::none(),
           "The memory layer after decoder layer `layer`: norm [E]; q, o: [W] or [down, up]; the bank's keys and "
           "values k, v [N, n_kv_heads * head_dim]; router [C, E] and router_bias [C] with chapters.")
        .def("set_routing", [](MemoryLayers& self, py::handle strategy, py::handle top_k, py::handle window) {
            self.set_routing(routing_from_name(to_str(strategy, "strategy")), to_int(top_k, "top_k", 0, int64_t(1) << 20),
                             to_int(window, "window_size", 1, int64_t(1) << 30));
        }, py::arg("strategy"), py::arg("top_k"), py::arg("window"))
        .def("set_quant", [](MemoryLayers& self, py::handle q) {
            const MemoryQuant mq = quant_of(q);
            py::gil_scoped_release release;
            self.set_quant(mq);
        }, py::arg("quant"), "How the keys and values are stored and read: 'f32', 'int8' or 'int4' (a scale per row).")
        .def_property_readonly("layers", &MemoryLayers::layers)
        .def_property_readonly("table_bytes", &MemoryLayers::table_bytes)
        .def_property_readonly("strategy", [](const MemoryLayers& self) { return std::string(routing_name(self.options().strategy)); })
        .def_property_readonly("top_k", [](const MemoryLayers& self) { return self.options().top_k; })
        .def_property_readonly("window", [](const MemoryLayers& self) { return self.options().window; })
        .def("last_route", [](const MemoryLayers& self, const KVCache& cache, py::handle layer) {
            return self.last_route(cache, to_int(layer, "layer", 0, 1 << 20));
        }, py::arg("cache"), py::arg("layer"), "[(chapter, weight)] the cache's newest position was routed to at `layer`.");
    reject_other_inits(cls, "MemoryLayers");
    reject_other_calls(cls, "add_layer", "MemoryLayers.add_layer");
    reject_other_calls(cls, "set_routing", "MemoryLayers.set_routing");
    reject_other_calls(cls, "set_quant", "MemoryLayers.set_quant");
    reject_other_calls(cls, "last_route", "MemoryLayers.last_route");
}

}  // namespace tmbind
