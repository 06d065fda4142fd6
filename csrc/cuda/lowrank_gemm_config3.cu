// One tile shape of the one-GEMM kernel (lowrank_gemm_config.cuh), in a file of its own to compile in parallel.
#define LORA_KERNELS_LOWRANK_CONFIG 3
#include "lowrank_gemm_config.cuh"
