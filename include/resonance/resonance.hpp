#pragma once

// Umbrella header: the core, every policy without an optional dependency, and the serial backend.
// Optional pieces are included on their own: <resonance/affinity/linear.hpp> (Eigen), and the
// simd / tbb / kokkos / cuda backends.

#include "affinity/affinity.hpp"
#include "affinity/precomputed.hpp"
#include "backend/backend.hpp"
#include "backend/serial.hpp"
#include "balance/stats.hpp"
#include "capacity/capacity.hpp"
#include "capacity/dropless.hpp"
#include "capacity/factor.hpp"
#include "core/concepts.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "core/topk.hpp"
#include "core/view.hpp"
#include "dist/placement.hpp"
#include "loss/aux.hpp"
#include "plan/build.hpp"
#include "plan/dispatch.hpp"
#include "plan/export.hpp"
#include "plan/plan.hpp"
#include "router.hpp"
#include "routing/routing.hpp"
#include "routing/token_choice.hpp"
#include "score/score.hpp"
#include "version.hpp"
