// The gpu tests run only where a CUDA device answers: without one (no GPU, no driver: any error) the
// executable says so and exits with 77, which CTest reports as skipped (SKIP_RETURN_CODE).
#define DOCTEST_CONFIG_IMPLEMENT
#include <cstdio>

#include <cuda_runtime.h>
#include <doctest/doctest.h>

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("resonance: no CUDA device (%s): the gpu tests are skipped\n",
                status != cudaSuccess ? cudaGetErrorString(status) : "none found");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
