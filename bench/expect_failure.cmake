# cmake -DPROGRAM=<exe> -DARG=<one argument> -DEXPECT_STATUS=<n> -DEXPECT_STDERR=<regex> -P expect_failure.cmake
# Passes when PROGRAM ARG exits with status EXPECT_STATUS and its stderr matches EXPECT_STDERR.
execute_process(
  COMMAND "${PROGRAM}" "${ARG}"
  RESULT_VARIABLE status
  OUTPUT_VARIABLE out
  ERROR_VARIABLE err)
if(NOT "${status}" STREQUAL "${EXPECT_STATUS}")
  message(FATAL_ERROR "expected exit status ${EXPECT_STATUS}, got '${status}'\nstdout:\n${out}\nstderr:\n${err}")
endif()
if(NOT err MATCHES "${EXPECT_STDERR}")
  message(FATAL_ERROR "stderr does not match '${EXPECT_STDERR}':\n${err}")
endif()
message(STATUS "exit status ${status}, stderr: ${err}")
