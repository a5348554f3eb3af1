"""Which samples each rank trains on at each step: a pure function of (seed, step).

The global batch of step k is a slice of a per-epoch permutation seeded by (seed, epoch);
rank r takes the r-th contiguous part of it. Because nothing is stateful, a resumed run
sees exactly the batches it would have seen, and W workers with global batch B see the
same samples as one worker with batch B.
"""
from __future__ import annotations

import torch

from lzn import seeds
from lzn.errors import UserError


class BatchStream:
    def __init__(self, num_samples: int, global_batch: int, *, seed: int, rank: int = 0, world: int = 1):
        if global_batch < 1 or global_batch > num_samples:
            raise UserError(
                f"global batch size must lie in [1, {num_samples}] (the dataset size), got {global_batch}"
            )
        if global_batch % world:
            raise UserError(f"global batch size {global_batch} is not divisible by {world} workers")
        self.n, self.batch, self.seed = num_samples, global_batch, seed
        self.rank, self.world = rank, world
        self.steps_per_epoch = num_samples // global_batch  # the tail of each epoch is dropped

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seeds.epoch_permutation(self.seed, epoch))
        return torch.randperm(self.n, generator=g)

    def global_indices(self, step: int) -> torch.Tensor:
        """Dataset indices (global_batch,) of step `step` (0-based)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[pos * self.batch : (pos + 1) * self.batch]

    def local_indices(self, step: int) -> torch.Tensor:
        """This rank's part (global_batch / world,) of step `step`."""
        part = self.batch // self.world
        return self.global_indices(step)[self.rank * part : (self.rank + 1) * part]


class StepRandom:
    """Randomness of one training step, drawn for the global batch and sliced per rank.

    Latent noise, RF times and RF noise come from here rather than the global RNG, so a
    sample gets the same noise whether 1 or W workers train, and a resumed run draws
    exactly what it would have drawn. They are drawn on `device` by a generator there,
    seeded by seeds.step_noise(seed, step): no host draw, no copy. On the CPU (device None
    or "cpu") that is the stream every CPU result so far was trained with; a CUDA
    generator (Philox, counter-based) draws a different stream, equally the same for any
    number of workers, so a CUDA run and a CPU run of one config differ in their noise.
    """

    def __init__(self, seed: int, step: int, *, rank: int = 0, world: int = 1, device=None):
        self.device = torch.device("cpu" if device is None else device)
        self.generator = torch.Generator(device=self.device).manual_seed(seeds.step_noise(seed, step))
        self.rank, self.world = rank, world

    def _slice(self, full: torch.Tensor, local: int) -> torch.Tensor:
        if self.world == 1:
            return full
        # A copy, so the other ranks' rows (world - 1 times this rank's) are freed at once.
        return full[self.rank * local : (self.rank + 1) * local].clone()

    def normal(self, local: int, *shape: int) -> torch.Tensor:
        """(local, *shape) standard normal: this rank's rows of a (world * local, *shape) draw."""
        full = torch.randn(self.world * local, *shape, generator=self.generator, device=self.device)
        return self._slice(full, local)

    def uniform(self, local: int, *shape: int) -> torch.Tensor:
        """(local, *shape) uniform in [0, 1): this rank's rows of a (world * local, *shape) draw."""
        full = torch.rand(self.world * local, *shape, generator=self.generator, device=self.device)
        return self._slice(full, local)
