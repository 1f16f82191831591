# What the vcpkg overlay port (ports/resonance/portfile.cmake) does, without vcpkg: configure the source
# tree with the port's options, install it, then build and run the consumer against that prefix.
# Usage: cmake -DSOURCE=<repo> -DWORK=<dir> -DGENERATOR=<gen> -P port_install.cmake
foreach(var SOURCE WORK GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "port_install.cmake: -D${var}=... is required")
  endif()
endforeach()

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "port_install.cmake: '${ARGN}' failed (${rc})")
  endif()
endfunction()

file(REMOVE_RECURSE "${WORK}")
run("${CMAKE_COMMAND}" -S "${SOURCE}" -B "${WORK}/build" -G "${GENERATOR}" -DCMAKE_BUILD_TYPE=Release
    -DRESONANCE_BUILD_TESTS=OFF -DRESONANCE_BUILD_EXAMPLES=OFF -DRESONANCE_BUILD_TOOLS=OFF
    -DRESONANCE_BUILD_BENCHMARKS=OFF -DRESONANCE_INSTALL=ON)
run("${CMAKE_COMMAND}" --build "${WORK}/build")  # resonance::native's static library
run("${CMAKE_COMMAND}" --install "${WORK}/build" --prefix "${WORK}/prefix")
if(NOT EXISTS "${WORK}/prefix/share/cmake/resonance/resonanceConfig.cmake")
  message(FATAL_ERROR "port_install.cmake: the config is not at share/cmake/resonance, where the port expects it")
endif()
run("${CMAKE_COMMAND}" -S "${SOURCE}/tests/package/consumer" -B "${WORK}/consumer" -G "${GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${WORK}/prefix")
run("${CMAKE_COMMAND}" --build "${WORK}/consumer")
run("${WORK}/consumer/consumer")
