// Reports the CUDA runtime compiled into _C and how many devices it sees. Lets the Python
// dispatch table decide whether the CUDA backend applies on this machine.
#include <cuda_runtime.h>

#include "cuda_info.h"

namespace detailflow::cuda {

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

}  // namespace detailflow::cuda
