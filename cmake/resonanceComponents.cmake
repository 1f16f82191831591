# Optional backend components. resonance_find_component(<name>) looks for the dependency of one
# component and, when it is there, defines resonance::<name> (an INTERFACE target linking
# resonance::resonance, the dependency and RESONANCE_HAS_<NAME>=1) and sets resonance_<name>_FOUND.
# Used by the installed resonanceConfig.cmake (for requested components only) and by the build tree.
include_guard(GLOBAL)

set(RESONANCE_KNOWN_COMPONENTS native simd tbb eigen kokkos cuda mpi)

macro(_resonance_component_target name)
  add_library(resonance::${name} INTERFACE IMPORTED)
  string(TOUPPER "${name}" _upper)
  set_target_properties(resonance::${name} PROPERTIES INTERFACE_COMPILE_DEFINITIONS "RESONANCE_HAS_${_upper}=1")
  target_link_libraries(resonance::${name} INTERFACE resonance::resonance ${ARGN})
  set(resonance_${name}_FOUND TRUE)
endmacro()

macro(resonance_find_component name)
  set(resonance_${name}_FOUND FALSE)
  if(TARGET resonance::${name})
    set(resonance_${name}_FOUND TRUE)
  elseif("${name}" STREQUAL "native")
    # Exported with the core (resonanceTargets.cmake); nothing to find. Its absence means an old package.
    set(resonance_native_NOT_FOUND_MESSAGE "resonance::native is missing from this package")
  elseif("${name}" STREQUAL "eigen")
    find_package(Eigen3 3.4 QUIET NO_MODULE)
    if(TARGET Eigen3::Eigen)
      _resonance_component_target(eigen Eigen3::Eigen)
    endif()
  elseif("${name}" STREQUAL "simd")
    find_package(xsimd QUIET)
    if(TARGET xsimd)
      # Debian's xsimd 8.1 links "xtl" without finding it; an empty stand-in satisfies the link line.
      if(NOT TARGET xtl)
        add_library(xtl INTERFACE IMPORTED)
      endif()
      _resonance_component_target(simd xsimd)
    endif()
  elseif("${name}" STREQUAL "tbb")
    find_package(TBB QUIET)
    # backend::tbb's default inner backend is backend::native, whose kernels resonance::native compiles.
    if(TARGET TBB::tbb AND TARGET resonance::native)
      _resonance_component_target(tbb TBB::tbb resonance::native)
    endif()
  elseif("${name}" STREQUAL "kokkos")
    # Kokkos' config forces CMAKE_CXX_EXTENSIONS OFF in the cache, with a warning, unless it is already
    # OFF; resonance needs no extensions, so say OFF first when the project left it unset.
    if(NOT DEFINED CMAKE_CXX_EXTENSIONS)
      set(CMAKE_CXX_EXTENSIONS OFF)
    endif()
    find_package(Kokkos QUIET)
    if(TARGET Kokkos::kokkos)
      # Debian's Trilinos Kokkos exports a non-existent include directory; point it at the real one.
      get_target_property(_kk_inc Kokkos::kokkos INTERFACE_INCLUDE_DIRECTORIES)
      if(_kk_inc AND NOT EXISTS "${_kk_inc}" AND Kokkos_INCLUDE_DIRS)
        list(GET Kokkos_INCLUDE_DIRS 0 _kk_real)
        get_filename_component(_kk_real "${_kk_real}" REALPATH)
        set_property(TARGET Kokkos::kokkos PROPERTY INTERFACE_INCLUDE_DIRECTORIES "${_kk_real}")
      endif()
      _resonance_component_target(kokkos Kokkos::kokkos)
    endif()
  elseif("${name}" STREQUAL "cuda")
    find_package(CUDAToolkit QUIET)
    if(TARGET CUDA::cudart)
      _resonance_component_target(cuda CUDA::cudart)
      # The stages' functors are extended __host__ __device__ lambdas (RESONANCE_LAMBDA); host-only paths
      # pass host lambdas to the host/device per-row kernels. No FMA contraction in device code, as
      # -ffp-contract=off for host code: a fused a*b + c would change the last bit of a score.
      target_compile_options(resonance::cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:--extended-lambda
                                                       --expt-relaxed-constexpr --fmad=false>)
    endif()
  elseif("${name}" STREQUAL "mpi")
    # <resonance/dist/mpi.hpp> uses MPI 3.1's C API only; MPI::MPI_CXX is the C API for a C++ compiler.
    find_package(MPI QUIET COMPONENTS CXX)
    if(TARGET MPI::MPI_CXX)
      _resonance_component_target(mpi MPI::MPI_CXX)
    endif()
  else()
    set(resonance_${name}_NOT_FOUND_MESSAGE
        "unknown component '${name}' (known: ${RESONANCE_KNOWN_COMPONENTS})")
  endif()
endmacro()
