# Every pattern of the tsan tests' selection (tests/tsan/CMakeLists.txt) must still name a test case: a
# renamed test would otherwise drop out of the TSan run without a word.
# Usage: cmake -DEXE=<resonance_tsan_tests> -DSPEC=<patterns joined by ','> -P check_cases.cmake
string(REPLACE "," ";" patterns "${SPEC}")
set(missing "")
foreach(pattern IN LISTS patterns)
  execute_process(COMMAND "${EXE}" --count "--test-case=${pattern}" OUTPUT_VARIABLE out RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0 OR NOT out MATCHES "passing the current filters: [1-9]")
    string(APPEND missing "\n  ${pattern}")
  endif()
endforeach()
if(missing)
  message(FATAL_ERROR "tsan test patterns that match no test case:${missing}")
endif()
