"""Shared-memory arenas: how a loader worker hands micro-batches to the training process without copies.

Through a plain DataLoader, every batch a worker yields is copied into a fresh shared-memory segment,
whose pages fault in the worker and again in the training process, and is then copied once more
into the step. With an arena, each worker owns a ring of bytes in shared memory allocated once by the
training process: the worker writes a micro-batch straight from the shard maps into the ring and
sends only where it lies; the training process views it in place and frees it once the step holds
its own copy (on CUDA: once the copy to the GPU has finished). Frees come in the order of writes, so
two counters are all the bookkeeping: bytes written (the worker's) and bytes freed (the trainer's).

A micro-batch that does not fit in the free part of the ring takes the ordinary DataLoader path, so
a consumer that holds micro-batches without freeing them only makes the loader slower, never wrong.
"""

import numpy as np
import torch

ALIGN = 64  # every region starts on a cache line


class Arena:
    """One worker's ring: `data` (shared bytes) and `counters` = [bytes written, bytes freed] since the start."""

    def __init__(self, nbytes: int):
        self.size = nbytes
        self.data = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        self.counters = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.pinned = False

    def idle(self) -> bool:
        """Everything written has been freed."""
        written, freed = self.counters.tolist()
        return written == freed

    def pin(self) -> None:
        """Register the ring as page-locked host memory, so copies to the GPU read it directly (CUDA only)."""
        if not self.pinned:
            result = torch.cuda.cudart().cudaHostRegister(self.data.data_ptr(), self.size, 0)
            self.pinned = int(result) == 0

    def __del__(self):
        if self.pinned:  # views still held elsewhere stay valid, as ordinary memory
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())

    # ---- in the worker

    def reserve(self, nbytes: int):
        """(offset, end) of a free region of nbytes, or None when the ring has no room now."""
        written, freed = self.counters.tolist()
        start = -(-written // ALIGN) * ALIGN
        if start % self.size + nbytes > self.size:  # would wrap: skip the ring's tail
            start = (start // self.size + 1) * self.size
        end = start + nbytes
        if nbytes > self.size or end - freed > self.size:
            return None
        return start % self.size, end

    def commit(self, end: int) -> None:
        self.counters[0] = end

    def array(self, offset: int, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.data.numpy()[offset:offset + n].view(dtype).reshape(shape)

    # ---- in the training process

    def tensor(self, offset: int, shape, dtype) -> torch.Tensor:
        return torch.from_numpy(self.array(offset, shape, dtype))

    def free(self, end: int) -> None:
        self.counters[1] = end
