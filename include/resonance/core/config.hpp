#pragma once

// Portability macros. Per-row kernels are written once and annotated with RESONANCE_HOST_DEVICE so
// that the same function compiles for the host and, under nvcc (or clang CUDA), for the device.

#if defined(__CUDACC__) || defined(__HIPCC__) || (defined(__clang__) && defined(__CUDA__))
#define RESONANCE_HOST_DEVICE __host__ __device__
#define RESONANCE_DEVICE __device__
#define RESONANCE_FORCEINLINE __forceinline__
#else
#define RESONANCE_HOST_DEVICE
#define RESONANCE_DEVICE
#if defined(__GNUC__) || defined(__clang__)
#define RESONANCE_FORCEINLINE inline __attribute__((always_inline))
#else
#define RESONANCE_FORCEINLINE inline
#endif
#endif

#define RESONANCE_INLINE_FUNCTION RESONANCE_HOST_DEVICE inline

// The functor of a stage: a lambda captured by value that the backend may run on the host or the device
// (as KOKKOS_LAMBDA). Under nvcc it is an extended __host__ __device__ lambda (--extended-lambda, which
// resonance::cuda adds): it cannot be generic, so a group functor names its group type, and it cannot
// sit in a private member function. Without that flag (host-only code compiled by nvcc) it is a plain
// lambda, which a CUDA kernel cannot take.
#if defined(__CUDACC__) && defined(__CUDACC_EXTENDED_LAMBDA__)
#define RESONANCE_LAMBDA [=] __host__ __device__
#else
#define RESONANCE_LAMBDA [=]
#endif

// 1 in the device compilation pass only: keeps host-only code out of kernels.
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define RESONANCE_DEVICE_COMPILE 1
#else
#define RESONANCE_DEVICE_COMPILE 0
#endif

#define RESONANCE_IMPL_PRAGMA(x) _Pragma(#x)
// nvcc's front end re-emits an unroll pragma as `#pragma unroll` for the host compiler, which g++
// warns about: nvcc's host pass gets none.
#if defined(__CUDA_ARCH__) || defined(__clang__)
#define RESONANCE_UNROLL RESONANCE_IMPL_PRAGMA(unroll)
#elif defined(__CUDACC__)
#define RESONANCE_UNROLL
#elif defined(__GNUC__)
#define RESONANCE_UNROLL RESONANCE_IMPL_PRAGMA(GCC unroll 8)
#else
#define RESONANCE_UNROLL
#endif

#include <cstddef>
#include <cstdint>

namespace resonance {

// Signed extent type used for rows, columns, strides and counts throughout the API.
using index = std::ptrdiff_t;

// Token ids, expert ids, slots and offsets stored in plans: 32-bit, as Megatron, vLLM and DeepEP use.
using id_type = std::int32_t;

}  // namespace resonance
