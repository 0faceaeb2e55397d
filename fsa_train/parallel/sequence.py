"""Sequence parallelism (DeepSpeed-Ulysses): one packed sequence spread over P ranks.

Each rank of a sequence-parallel group holds ``N / P`` consecutive tokens of the same packed
sequence for everything that works per token (embedding, norms, MLP, projections, loss). Only
the attention core needs the whole sequence: DeepSpeed's ``DistributedAttention`` exchanges the
projections all-to-all so that each rank gets all N tokens for ``h / P`` KV heads (and their G
query heads), runs the single-GPU core there, and exchanges the output back. Every NSA branch
stays exact, because compression, selection (summed over one KV head's query heads) and the
three branches are independent per KV head; the core on a rank uses its slice of the
compression weights. ``P`` must divide ``n_kv_head``.

Every rank needs ``cu_seqlens`` and the positions of the whole sequence (they are small), and
its tokens' slice of the inputs and targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fsa_train.config import ConfigError


def valid_degrees(n_kv_head: int) -> list[int]:
    """Sequence-parallel degrees a model with ``n_kv_head`` KV heads can use."""
    return [p for p in range(1, n_kv_head + 1) if n_kv_head % p == 0]


def check_degree(degree: int, n_kv_head: int) -> None:
    """One-line ConfigError unless ``degree`` divides ``n_kv_head``."""
    if not isinstance(degree, int) or degree < 1 or n_kv_head % degree:
        raise ConfigError(f"sequence-parallel degree {degree!r} must divide "
                          f"model.config.n_kv_head={n_kv_head}: use one of "
                          f"{valid_degrees(n_kv_head)}")


@dataclass(frozen=True)
class SequenceShard:
    """This rank's place in a sequence-parallel group of ``size`` ranks: it holds tokens
    ``[rank·N/size, (rank+1)·N/size)`` of every packed sequence of N tokens, and KV heads
    ``[rank·h/size, (rank+1)·h/size)`` inside the attention core."""

    group: dist.ProcessGroup
    size: int
    rank: int

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> SequenceShard:
        return cls(group, dist.get_world_size(group), dist.get_rank(group))

    def token_slice(self, total: int) -> slice:
        """The tokens of a packed sequence of ``total`` tokens that this rank holds."""
        if total % self.size:
            raise ValueError(f"a packed sequence of {total} tokens does not split into "
                             f"{self.size} equal sequence-parallel shards")
        n = total // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def head_slice(self, heads: int) -> slice:
        """The heads (of ``heads``) this rank's attention core computes."""
        n = heads // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def attention(self, core):
        """DeepSpeed's all-to-all attention around ``core(q, k, v) -> o`` on ``[N, 1, heads/P,
        d]`` tensors; called with this rank's ``[N/P, 1, heads, d]`` ones."""
        import deepspeed
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention

        if not deepspeed.comm.is_initialized():  # a run without the DeepSpeed strategy
            deepspeed.init_distributed(dist_backend=dist.get_backend(self.group),
                                       auto_mpi_discovery=False)
        return DistributedAttention(core, self.group, scatter_idx=2, gather_idx=0)


def degree_of(module) -> int:
    """The sequence-parallel degree a LightningModule was configured with (1: none, or a module
    without the ``sequence_parallel`` hyperparameter)."""
    try:
        hparams = module.hparams
    except (AttributeError, RuntimeError):
        return 1
    return int(hparams.get("sequence_parallel", 1) or 1)


def full_total(local_tokens: int, shard: SequenceShard | None) -> int:
    """Tokens of the whole packed sequence of which a rank holds ``local_tokens``."""
    return local_tokens if shard is None else local_tokens * shard.size


def gather_tokens(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """The whole sequence's ``x`` from every rank's slice (no gradient; for checks and
    evaluation)."""
    parts = [torch.empty_like(x) for _ in range(shard.size)]
    dist.all_gather(parts, x.contiguous(), group=shard.group)
    return torch.cat(parts)


def shard_batch(batch: dict, shard: SequenceShard) -> dict:
    """This rank's part of a packed batch: its slice of ``input_ids`` and ``targets``; the
    whole sequence's ``cu_seqlens`` and ``max_seqlen`` (the attention core needs them)."""
    mine = shard.token_slice(batch["input_ids"].numel())
    return {**batch, "input_ids": batch["input_ids"][mine], "targets": batch["targets"][mine]}


def shard_loss(loss_sum: torch.Tensor, count: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """This rank's share of the batch's mean loss: its summed loss over the group's token count.
    The shares add up over the group to the mean, and so do their gradients (summed over the
    group by the gradient reduction); the value is not the mean (all-reduce it to log)."""
    total = count.detach().clone()
    dist.all_reduce(total, group=shard.group)
    return loss_sum / total.clamp(min=1)
