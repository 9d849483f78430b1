// Umbrella header of the public C++ API.
#pragma once

#include "qsparseprop/formats.hpp"
#include "qsparseprop/primitives.hpp"
#include "qsparseprop/quantization.hpp"
#include "qsparseprop/runtime.hpp"
#include "qsparseprop/tuning.hpp"
