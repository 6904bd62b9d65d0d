// The shared-memory channels of shm.cpp, for ops that move a message in the middle of their
// work (a TKNP layer's scatter/gather around its attention, ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sgl_kernel {

// Sends `src`'s bytes on the channel at byte `channel` of `segment`; returns once they are in the ring.
void shm_send(const at::Tensor& segment, int64_t channel, int64_t slot_bytes, int64_t num_slots, const at::Tensor& src,
              int64_t peer_pid, int64_t spin);

// Receives the channel's next message into `dst` (its size is the message's); returns the
// nanoseconds spent waiting for its first chunk.
int64_t shm_recv(const at::Tensor& segment, int64_t channel, int64_t slot_bytes, int64_t num_slots, at::Tensor& dst,
                 int64_t peer_pid, int64_t spin);

}  // namespace sgl_kernel
