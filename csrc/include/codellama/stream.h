// cudaStream_t without including the CUDA runtime, so the op headers stay includable from plain C++.
#pragma once

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
