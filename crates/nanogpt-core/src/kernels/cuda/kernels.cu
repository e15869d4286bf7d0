// Every CUDA kernel of the engine, as one translation unit: one PTX module for the `cuda` build, one
// object for the CPU build of the crate `cuda-on-cpu`.
#include "common.cuh"
#include "encoder.cu"
#include "layernorm.cu"
#include "gelu.cu"
#include "bias.cu"
#include "attention.cu"
#include "classifier.cu"
#include "adamw.cu"
#include "decode.cu"
