# resonance::native: the row kernels of backend::native (and of backend::tbb's default inner backend),
# one translation unit per instruction set, picked at run time (src/native/). The only compiled part of
# the library: a small static library that needs no flag from its user. Without xsimd it holds the
# scalar reference alone.
include_guard(GLOBAL)

add_library(resonance_native STATIC "${PROJECT_SOURCE_DIR}/src/native/native.cpp")
add_library(resonance::native ALIAS resonance_native)
set_target_properties(resonance_native PROPERTIES EXPORT_NAME native POSITION_INDEPENDENT_CODE ON)
target_link_libraries(resonance_native PUBLIC resonance)
# The project's warnings and sanitizers (resonance_dev_flags, never exported), as compile options only.
target_compile_options(resonance_native PRIVATE $<TARGET_PROPERTY:resonance_dev_flags,INTERFACE_COMPILE_OPTIONS>)
target_compile_definitions(resonance_native INTERFACE RESONANCE_HAS_NATIVE=1)

resonance_find_component(simd)
if(resonance_simd_FOUND)
  # xsimd's headers only, as a private property: a link to resonance::simd would be exported with the
  # library (even behind BUILD_INTERFACE in the build tree's export).
  target_include_directories(resonance_native SYSTEM PRIVATE $<TARGET_PROPERTY:xsimd,INTERFACE_INCLUDE_DIRECTORIES>)
  target_compile_definitions(resonance_native PRIVATE RESONANCE_NATIVE_XSIMD=1)
  # The wider instruction sets, each in its own translation unit with its own flags (GCC and Clang on
  # x86-64; elsewhere the baseline architecture xsimd compiles without flags, e.g. NEON on AArch64).
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang" AND CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
    set(_native_dir "${PROJECT_SOURCE_DIR}/src/native")
    target_sources(resonance_native PRIVATE "${_native_dir}/isa_avx2.cpp" "${_native_dir}/isa_avx512bw.cpp")
    set_source_files_properties("${_native_dir}/isa_avx2.cpp" PROPERTIES COMPILE_OPTIONS "-mavx2")
    set_source_files_properties("${_native_dir}/isa_avx512bw.cpp"
                                PROPERTIES COMPILE_OPTIONS "-mavx512f;-mavx512cd;-mavx512dq;-mavx512bw")
    target_compile_definitions(resonance_native PRIVATE RESONANCE_NATIVE_AVX2=1 RESONANCE_NATIVE_AVX512BW=1)
  endif()
else()
  message(STATUS "resonance: xsimd not found; resonance::native holds the scalar row kernels only")
endif()
