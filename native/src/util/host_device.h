// Functions that nvcc compiles for both the CPU and the GPU, so that the two paths share one definition.
#pragma once

#ifdef __CUDACC__
#define QLORA_HOST_DEVICE __host__ __device__
#else
#define QLORA_HOST_DEVICE
#endif
