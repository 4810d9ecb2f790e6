// What the CUDA runtime linked into _C reports (only built when DETAILFLOW_HAS_CUDA).
#pragma once

namespace detailflow::cuda {
int runtime_version();  // cudaRuntimeGetVersion, e.g. 13000
int device_count();     // 0 when no driver / no GPU (never throws)
}  // namespace detailflow::cuda
