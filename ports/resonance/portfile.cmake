# Overlay port: vcpkg install resonance[eigen,tbb] --overlay-ports=<repo>/ports
# Headers plus one small static library (resonance::native: per-instruction-set row kernels picked at
# run time); features only add dependencies, which resonance's CMake package finds per component.
# For testing an unreleased checkout, set RESONANCE_SOURCE_DIR in the environment to the repository.
if(DEFINED ENV{RESONANCE_SOURCE_DIR})
  set(SOURCE_PATH "$ENV{RESONANCE_SOURCE_DIR}")
else()
  vcpkg_from_github(
    OUT_SOURCE_PATH SOURCE_PATH
    REPO resonance-moe/resonance
    REF "v${VERSION}"
    SHA512 0
    HEAD_REF main)
endif()

set(VCPKG_BUILD_TYPE release)

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS -DRESONANCE_BUILD_TESTS=OFF -DRESONANCE_BUILD_EXAMPLES=OFF -DRESONANCE_BUILD_TOOLS=OFF
          -DRESONANCE_BUILD_BENCHMARKS=OFF -DRESONANCE_INSTALL=ON)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup(CONFIG_PATH share/cmake/resonance)
file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/bin")

vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
