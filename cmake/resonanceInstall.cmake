include(CMakePackageConfigHelpers)

set(RESONANCE_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/resonance"
    CACHE STRING "Where the CMake package files are installed")

install(TARGETS resonance resonance_native EXPORT resonanceTargets FILE_SET HEADERS FILE_SET optional_headers
        ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}")
install(EXPORT resonanceTargets NAMESPACE resonance:: DESTINATION "${RESONANCE_INSTALL_CMAKEDIR}")

configure_package_config_file(cmake/resonanceConfig.cmake.in "${PROJECT_BINARY_DIR}/resonanceConfig.cmake"
                              INSTALL_DESTINATION "${RESONANCE_INSTALL_CMAKEDIR}")
write_basic_package_version_file("${PROJECT_BINARY_DIR}/resonanceConfigVersion.cmake"
                                 COMPATIBILITY SameMajorVersion)
install(FILES "${PROJECT_BINARY_DIR}/resonanceConfig.cmake" "${PROJECT_BINARY_DIR}/resonanceConfigVersion.cmake"
              cmake/resonanceComponents.cmake DESTINATION "${RESONANCE_INSTALL_CMAKEDIR}")
install(FILES LICENSE DESTINATION "${CMAKE_INSTALL_DATADIR}/doc/resonance")

# The build tree is a package too: -Dresonance_DIR=<build dir>.
export(EXPORT resonanceTargets NAMESPACE resonance:: FILE "${PROJECT_BINARY_DIR}/resonanceTargets.cmake")
configure_file(cmake/resonanceComponents.cmake "${PROJECT_BINARY_DIR}/resonanceComponents.cmake" COPYONLY)
