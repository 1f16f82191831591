#pragma once

// The backend axis (see execution.hpp for the model and the primitives).

#include "execution.hpp"
