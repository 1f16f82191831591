#pragma once

// Single source of truth for the version: CMakeLists.txt parses these three lines.
#define RESONANCE_VERSION_MAJOR 0
#define RESONANCE_VERSION_MINOR 1
#define RESONANCE_VERSION_PATCH 0

#define RESONANCE_VERSION (RESONANCE_VERSION_MAJOR * 10000 + RESONANCE_VERSION_MINOR * 100 + RESONANCE_VERSION_PATCH)
