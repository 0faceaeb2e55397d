"""Deterministic, resumable, rank-sharded window order for training (and a sharded order for val).

The training order is one stream of batches. Data epoch ``e`` visits the windows in a permutation
seeded by ``(seed, e)``, cut into *global* batches of ``batch_size * world_size`` windows; rank
``r`` takes the ``r``-th ``batch_size`` slice of every global batch, so ranks are disjoint and step
in lockstep. The fewer than one global batch of windows left at the end of a permutation are
skipped that epoch (a different set each epoch).

Position in the stream = the number of batches *consumed*: the sampler's owner calls
:meth:`ResumableWindowSampler.advance` once per batch handed to the training loop
(:class:`~fsa_train.data.datamodule.ResumableDataLoader` does it as it yields). Iterating yields
the rest of the current data epoch from that position. So the order depends only on the seed, the
window count, the global batch size and how many batches were consumed: a run restored from
``state_dict()`` continues with exactly the batches an uninterrupted run would have seen, whatever
the trainer's own epoch counter says (Lightning, for example, moves to a new epoch when a run that
stopped at ``max_steps`` in mid-epoch is resumed). ``set_epoch`` is therefore only recorded.

Both samplers subclass ``DistributedSampler`` so that Lightning's default
``use_distributed_sampler=True`` keeps them as they are instead of wrapping them in a second,
conflicting sharding; ``use_distributed_sampler: false`` works the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import DistributedSampler

STATE_VERSION = 1


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of one data epoch (numpy's PCG64, seeded by ``(seed, epoch)``)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")


class ResumableWindowSampler(DistributedSampler):
    """This rank's training windows from the consumed position to the end of that data epoch.

    Yields window indices; a DataLoader with ``batch_size`` and ``drop_last=True`` groups them
    into this rank's batches. ``len()`` is always a full epoch (what Lightning expects, even when
    a resumed epoch yields fewer batches).
    """

    def __init__(
        self, n_windows: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(range(n_windows), num_replicas=world_size, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.n_windows = n_windows
        self.batch_size = batch_size
        self.global_batch = batch_size * world_size
        self.consumed = 0  # batches handed to the training loop since the start, all epochs

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank (= global batches) in one data epoch."""
        return self.n_windows // self.global_batch

    @property
    def data_epoch(self) -> int:
        """The data epoch that the next batch comes from."""
        return self.consumed // max(1, self.batches_per_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Record the trainer's epoch; the order follows the consumed count, not this value."""
        self.epoch = epoch

    def advance(self, batches: int = 1) -> None:
        """Record that ``batches`` more batches reached the training loop."""
        self.consumed += batches

    def __iter__(self) -> Iterator[int]:
        nb = self.batches_per_epoch
        if nb == 0:
            return iter(())
        epoch, start = divmod(self.consumed, nb)
        order = epoch_permutation(self.n_windows, self.seed, epoch)[: nb * self.global_batch]
        mine = order.reshape(nb, self.num_replicas, self.batch_size)[start:, self.rank]
        return iter(mine.ravel().tolist())

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.data_epoch,
            "position": self.consumed * self.global_batch,  # windows consumed, all ranks
            "n_windows": self.n_windows,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the ``position`` windows that ``state`` had consumed.

        Exact when the windows, seed and global batch size match; otherwise the run goes on from
        the same point in the stream (rounded down to a whole batch), with a warning that the
        order is not the uninterrupted one.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown data sampler state version {state.get('version')!r}")
        same = (state["n_windows"], state["seed"], state["global_batch"]) == (
            self.n_windows, self.seed, self.global_batch)
        if not same:
            warnings.warn(
                f"the data order cannot be resumed exactly: the checkpoint had "
                f"{state['n_windows']} windows, seed {state['seed']} and {state['global_batch']} "
                f"windows per global batch; now {self.n_windows}, {self.seed} and "
                f"{self.global_batch} (batch_size x world_size)",
                stacklevel=2,
            )
        self.consumed = int(state["position"]) // self.global_batch


class ShardedOrderSampler(DistributedSampler):
    """Every index in order, rank ``r`` taking ``r, r + world_size, ...`` (no padding)."""

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1) -> None:
        _check_rank(rank, world_size)
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=False)
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))
