# doctest_discover_tests splits a test name at ';' into two CTest entries that each run no test case
# and still pass, so such a name silently disables its test. Fail when one appears.
# Usage: cmake -DSOURCE=<repo> -P test_names.cmake
file(GLOB sources "${SOURCE}/tests/*.cpp" "${SOURCE}/tests/kokkos/*.cpp")
set(bad "")
foreach(f IN LISTS sources)
  file(STRINGS "${f}" lines REGEX "TEST_CASE(_TEMPLATE)?\\(\"[^\"]*;")
  foreach(l IN LISTS lines)
    string(APPEND bad "\n  ${f}: ${l}")
  endforeach()
endforeach()
if(bad)
  message(FATAL_ERROR "test names containing ';' (CTest would not run them):${bad}")
endif()
