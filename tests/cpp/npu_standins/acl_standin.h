// Stand-in (see README.md): CANN's stream type and kernel-launch macro.
#pragma once
#include <cstdint>
using aclrtStream = void*;
#define ACLRT_LAUNCH_KERNEL(kernel) aclrtlaunch_##kernel
