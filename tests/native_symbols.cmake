# cmake -DNM=<nm> -DOBJECTS=<a;b;...> -P native_symbols.cmake
# The per-instruction-set objects of resonance::native (src/native/isa_*.cpp, built with -mavx2 or
# -mavx512*) may define only their own table's functions: an out-of-line copy of a shared inline
# function (scalar_rows, exp_portable, the standard library) compiled for a wider instruction set could
# be the copy the linker keeps for baseline callers, and fault on a CPU without that instruction set.
foreach(_object IN LISTS OBJECTS)
  get_filename_component(_name "${_object}" NAME)
  if(NOT _name MATCHES "^isa_([a-z0-9]+)\\.cpp\\.o(bj)?$")
    continue()
  endif()
  set(_isa "${CMAKE_MATCH_1}")
  execute_process(COMMAND "${NM}" -C --defined-only "${_object}" OUTPUT_VARIABLE _symbols RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "${NM} failed on ${_object}")
  endif()
  string(REPLACE "\n" ";" _lines "${_symbols}")
  set(_checked 0)
  foreach(_line IN LISTS _lines)
    # Text, weak and data symbols; local ones (lower case but w/v) cannot be picked by another object.
    if(NOT _line MATCHES "^[0-9a-f]+ ([TWVRDB]) (.*)$")
      continue()
    endif()
    set(_symbol "${CMAKE_MATCH_2}")
    if(_symbol MATCHES "^DW\\.ref\\.__gxx_personality_v0$")
      continue()  # the unwinder's personality reference: data, the same in every object
    endif()
    if(_symbol MATCHES "^__odr_asan\\.")
      continue()  # AddressSanitizer's one-byte marker of a global defined here: no code to link against
    endif()
    math(EXPR _checked "${_checked} + 1")
    if(NOT _symbol MATCHES "xsimd::${_isa}[>,]" AND NOT _symbol MATCHES "native_impl::${_isa}_kernels")
      message(FATAL_ERROR "${_name} defines '${_symbol}', which is not ${_isa}'s own: a baseline caller could "
                          "link to this ${_isa} copy")
    endif()
  endforeach()
  if(_checked EQUAL 0)
    message(FATAL_ERROR "${_name}: no symbol found; the check would pass vacuously")
  endif()
  message(STATUS "${_name}: ${_checked} symbols, all ${_isa}'s own")
  set(_seen TRUE)
endforeach()
if(NOT _seen)
  message(FATAL_ERROR "no isa_*.cpp object among: ${OBJECTS}")
endif()
