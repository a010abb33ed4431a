// Emulator stand-in for the CUDA header of this name (see fastlm_emu/runtime.h).
#pragma once
#include "fastlm_emu/wmma.h"
