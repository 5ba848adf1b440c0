// TM_HD marks a function the GPU kernels (cuda/, hip/) call as well as the host code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TM_HD __host__ __device__
#else
#define TM_HD
#endif
