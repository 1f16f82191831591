# resonance_enable_cuda(<var>): enables the CUDA language where a CUDA compiler is found (CUDA stays
# optional), with the CUDA20 dialect shim CMake 3.25 needs for nvcc (shared/research/env.md §4); <var>
# says whether it did. A macro: enable_language must run at the calling directory's scope. The project's
# own CUDA targets are built for RESONANCE_CUDA_ARCHITECTURES (default 80;90; never "native", which
# fails where no GPU is).
include_guard(GLOBAL)
include(CheckLanguage)
set(RESONANCE_CUDA_ARCHITECTURES "80;90" CACHE STRING "CUDA architectures of the project's own CUDA targets")

macro(resonance_enable_cuda result)
  set(${result} OFF)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    if(CMAKE_VERSION VERSION_LESS 3.26 AND NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
      set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
      set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
      list(APPEND CMAKE_CUDA_COMPILE_FEATURES cuda_std_20)
      set(CMAKE_CUDA20_COMPILE_FEATURES cuda_std_20)
    endif()
    set(${result} ON)
  endif()
endmacro()

# C++20 CUDA, the project's architectures.
function(resonance_cuda_target target)
  set_target_properties(${target} PROPERTIES CUDA_STANDARD 20 CUDA_STANDARD_REQUIRED ON CUDA_EXTENSIONS OFF
                                             CUDA_ARCHITECTURES "${RESONANCE_CUDA_ARCHITECTURES}")
endfunction()
