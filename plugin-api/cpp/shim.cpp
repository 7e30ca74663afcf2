// The shim's shared entry points: freeing the error messages every other function returns.
#include "shim.h"

extern "C" void imgclf_shim_free(char *message) { std::free(message); }
