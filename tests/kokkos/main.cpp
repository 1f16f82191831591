// Kokkos is initialised once for the whole run (default settings; KOKKOS_* environment variables
// apply), before doctest runs any test and finalised after the last one. The command line is doctest's
// alone: Kokkos 3.4 would act on some of its arguments (--help).
#define DOCTEST_CONFIG_IMPLEMENT
#include <Kokkos_Core.hpp>
#include <doctest/doctest.h>

int main(int argc, char** argv) {
  const Kokkos::ScopeGuard kokkos;
  doctest::Context context(argc, argv);
  return context.run();
}
