// The library bipkernels and its ops' schemas (bipkernels/schemas.h).
#include "bipkernels/schemas.h"

TORCH_LIBRARY(bipkernels, m) { bipkernels::define_ops(m); }
