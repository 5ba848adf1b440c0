// tokenmill._core's memory layers (memory-augmented models), built from arrays the Python loader reads.
#pragma once

#include "convert.h"

namespace tmbind {
void register_memory(py::module_& mod);
}
