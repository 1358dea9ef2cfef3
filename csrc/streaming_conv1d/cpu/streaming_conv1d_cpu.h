// Scheduling constants shared by the CPU kernels of accel::streaming_conv1d and its stack.
#pragma once

#include <cstdint>

namespace accel::streaming_conv1d {

constexpr int64_t kTasksPerThread = 4;         // tasks per thread, at least, where channels allow
constexpr int64_t kMinParallelWork = 1 << 15;  // multiply-adds and state samples of a call run in parallel from here

}  // namespace accel::streaming_conv1d
