# The README's code block must be examples/quickstart.cpp verbatim, so the documented snippet is the
# one CI compiles. Usage: cmake -DSOURCE=<repo> -P readme_snippet.cmake
file(READ "${SOURCE}/README.md" readme)
file(READ "${SOURCE}/examples/quickstart.cpp" quickstart)
string(FIND "${readme}" "```cpp\n${quickstart}```" at)
if(at EQUAL -1)
  message(FATAL_ERROR "README.md does not contain examples/quickstart.cpp verbatim in a ```cpp block")
endif()
