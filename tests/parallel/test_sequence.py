"""Sequence parallelism on CPU processes (gloo): P ranks holding 1/P of a packed sequence each
compute exactly what one process computes on the whole of it, outputs, loss and every parameter
gradient, through DeepSpeed's all-to-all attention: P = 2 for dense, sliding-window and NSA
attention (NSA also with ``activation_checkpointing: sparse_branches``), P = 4 for dense and NSA
(four KV heads, one per rank)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fsa_train.config import ConfigError, GPTConfig, NSAConfig
from fsa_train.parallel.sequence import check_degree, valid_degrees

pytest.importorskip("deepspeed")

NSA = NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=4, init_blocks=1,
                local_blocks=2, window=8)
# Per degree: document lengths of one 128-token packed sequence (odd lengths; documents
# straddle the shard boundaries, at 64 for P = 2 and 32, 64, 96 for P = 4, where the second
# document touches all four shards and the last two lie inside one) and the heads (P divides
# the KV heads; P = 4 with G = 2 query heads per KV head).
LAYOUTS = {
    2: {"lengths": (37, 50, 41), "n_head": 4, "n_kv_head": 2},
    4: {"lengths": (23, 77, 17, 11), "n_head": 8, "n_kv_head": 4, "head_dim": 8},
}
D_MODEL = 32


def _config(kind: str, world: int) -> GPTConfig:
    """``kind``: dense, window, nsa, or nsa_sparse_branches (NSA with its sparse branches
    recomputed in backward: the checkpoint runs inside the all-to-all attention)."""
    attention = "nsa" if kind.startswith("nsa") else "dense"
    heads = {k: v for k, v in LAYOUTS[world].items() if k != "lengths"}
    checkpointing = "sparse_branches" if kind == "nsa_sparse_branches" else False
    return GPTConfig(vocab_size=64, n_layer=2, d_model=D_MODEL, attention=attention, nsa=NSA,
                     loss_chunk=32, window=12 if kind == "window" else None,
                     activation_checkpointing=checkpointing, **heads)


def _worker(rank: int, world: int, port: int, kinds: tuple[str, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # P processes share CI's two cores: more threads only contend
    import deepspeed
    import torch.distributed as dist

    from fsa_train.parallel.sequence import SequenceShard

    deepspeed.init_distributed(dist_backend="gloo")
    shard = SequenceShard.of(dist.new_group(list(range(world))))
    for kind in kinds:
        _check(kind, shard)
    dist.destroy_process_group()


def _check(kind: str, shard) -> None:
    """Outputs and gradients (against an arbitrary weighting of the hidden states), then the
    loss and its gradients, of this rank's shard against the whole sequence in one process."""
    import torch.distributed as dist

    from fsa_train.model import GPT
    from fsa_train.parallel.sequence import shard_batch, shard_loss

    torch.manual_seed(0)
    model = GPT(_config(kind, shard.size)).double()
    generator = torch.Generator().manual_seed(1)
    lengths = LAYOUTS[shard.size]["lengths"]
    total = sum(lengths)
    ids = torch.randint(0, 64, (total,), generator=generator)
    weight = torch.randn(total, D_MODEL, generator=generator, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    full = model(ids, cu)
    (full * weight).sum().backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert len(want) == len(list(model.parameters())) - 1  # all but the unused output head
    model.zero_grad()

    mine = shard.token_slice(total)
    local = model(ids[mine], cu, shard=shard)
    (local * weight[mine]).sum().backward()
    torch.testing.assert_close(local, full[mine].detach(), rtol=0, atol=1e-10, msg=kind)
    for name, p in model.named_parameters():
        if name not in want:
            assert p.grad is None, (kind, name)
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad, group=shard.group)
        torch.testing.assert_close(grad, want[name], rtol=0, atol=1e-9, msg=f"{kind}: {name}")
    # the loss: every rank's share of the mean over the whole sequence's targets
    targets = torch.randint(0, 64, (total,), generator=generator)
    targets[cu[1:].long() - 1] = -100
    model.zero_grad()
    want_loss = model.loss(model(ids, cu), targets)
    want_loss.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    part = shard_batch({"input_ids": ids, "targets": targets, "cu_seqlens": cu}, shard)
    share = shard_loss(*model.loss_terms(model(part["input_ids"], cu, shard=shard),
                                         part["targets"]), shard)
    share.backward()
    mean = share.detach().clone()
    dist.all_reduce(mean, group=shard.group)
    torch.testing.assert_close(mean, want_loss.detach(), rtol=0, atol=1e-6, msg=kind)
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=shard.group)
        torch.testing.assert_close(grad, want[name], rtol=0, atol=1e-9, msg=f"{kind}: {name}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process():
    """P = 2: dense, sliding-window and NSA attention (and NSA with its sparse branches
    recomputed), one launch (most of a launch's time is the processes' imports; a failure names
    the kind)."""
    mp.spawn(_worker, args=(2, _free_port(), ("dense", "window", "nsa", "nsa_sparse_branches")),
             nprocs=2, join=True)


def test_four_ranks_equal_one_process():
    """P = 4: dense and NSA, one launch of four processes on CI's two cores."""
    mp.spawn(_worker, args=(4, _free_port(), ("dense", "nsa")), nprocs=4, join=True)


def test_degree_must_divide_the_kv_heads():
    check_degree(2, 4)
    assert valid_degrees(6) == [1, 2, 3, 6]
    with pytest.raises(ConfigError, match=r"must divide model.config.n_kv_head=4: use one of "
                                          r"\[1, 2, 4\]") as error:
        check_degree(3, 4)
    assert "\n" not in str(error.value)
