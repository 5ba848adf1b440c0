// tokenmill._core's adapter classes (LoraAdapter, LoraSet) and the safetensors reader their loaders use.
#pragma once

#include "convert.h"

namespace tmbind {
void register_adapters(py::module_& mod);
}
