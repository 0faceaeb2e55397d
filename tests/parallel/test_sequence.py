"""Sequence parallelism on CPU processes (gloo): two ranks holding half a packed sequence each
compute exactly what one process computes on the whole of it, outputs and gradients, for dense,
sliding-window and NSA attention, through DeepSpeed's all-to-all attention."""

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
LENGTHS = [37, 50, 41]  # 128 tokens; documents straddle the two ranks' halves


def _config(kind: str) -> GPTConfig:
    attention = "nsa" if kind == "nsa" else "dense"
    return GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                     attention=attention, nsa=NSA, loss_chunk=32,
                     window=12 if kind == "window" else None)


def _worker(rank: int, world: int, port: int, kind: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed
    import torch.distributed as dist

    from fsa_train.model import GPT
    from fsa_train.parallel.sequence import SequenceShard, shard_batch, shard_loss

    deepspeed.init_distributed(dist_backend="gloo")
    shard = SequenceShard.of(dist.new_group(list(range(world))))
    torch.manual_seed(0)
    model = GPT(_config(kind)).double()
    generator = torch.Generator().manual_seed(1)
    total = sum(LENGTHS)
    ids = torch.randint(0, 64, (total,), generator=generator)
    weight = torch.randn(total, 32, generator=generator, dtype=torch.float64)
    cu = torch.tensor([0, 37, 87, 128], dtype=torch.int32)

    full = model(ids, cu)
    (full * weight).sum().backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert len(want) == len(list(model.parameters())) - 1  # all but the unused output head
    model.zero_grad()

    mine = shard.token_slice(total)
    local = model(ids[mine], cu, shard=shard)
    (local * weight[mine]).sum().backward()
    torch.testing.assert_close(local, full[mine].detach(), rtol=0, atol=1e-10)
    for name, p in model.named_parameters():
        if name not in want:
            assert p.grad is None, name
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad, group=shard.group)
        torch.testing.assert_close(grad, want[name], rtol=0, atol=1e-9, msg=name)
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
    torch.testing.assert_close(mean, want_loss.detach(), rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=shard.group)
        torch.testing.assert_close(grad, want[name], rtol=0, atol=1e-9, msg=name)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["dense", "window", "nsa"])
def test_two_ranks_equal_one_process(kind):
    mp.spawn(_worker, args=(2, _free_port(), kind), nprocs=2, join=True)


def test_degree_must_divide_the_kv_heads():
    check_degree(2, 4)
    assert valid_degrees(6) == [1, 2, 3, 6]
    with pytest.raises(ConfigError, match=r"must divide model.config.n_kv_head=4: use one of "
                                          r"\[1, 2, 4\]") as error:
        check_degree(3, 4)
    assert "\n" not in str(error.value)
