"""Training order: per-epoch seeded permutation, disjoint ranks, exact mid-epoch resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from fsa_train.data.datamodule import TextDataModule
from fsa_train.data.prepare import prepare_dataset
from fsa_train.data.sampling import ResumableWindowSampler, ShardedOrderSampler


def batches(sampler: ResumableWindowSampler) -> list[list[int]]:
    """The sampler's output grouped like a DataLoader with drop_last=True."""
    flat = list(sampler)
    assert len(flat) % sampler.batch_size == 0
    return [flat[i : i + sampler.batch_size] for i in range(0, len(flat), sampler.batch_size)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_visits_each_window_at_most_once_across_ranks(world):
    n, b = 103, 4
    samplers = [ResumableWindowSampler(n, b, seed=5, rank=r, world_size=world)
                for r in range(world)]
    per_rank = [batches(s) for s in samplers]
    nb = n // (b * world)
    assert all(len(p) == nb == s.batches_per_epoch for p, s in zip(per_rank, samplers, strict=True))
    assert all(len(s) == nb * b for s in samplers)  # what the DataLoader's len() is built on
    seen = [w for p in per_rank for batch in p for w in batch]
    assert len(seen) == len(set(seen)) == nb * b * world  # disjoint ranks, no repeats
    assert n - len(seen) < b * world and all(0 <= w < n for w in seen)
    # Global batch k is the k-th batch of every rank together.
    for k in range(nb):
        assert len({w for p in per_rank for w in p[k]}) == b * world


def test_order_is_seeded_and_reshuffled_per_epoch():
    a, b = ResumableWindowSampler(50, 5, seed=1), ResumableWindowSampler(50, 5, seed=1)
    assert list(a) == list(b)
    assert list(a) != list(ResumableWindowSampler(50, 5, seed=2))
    epoch0 = list(a)
    a.set_epoch(7)  # the trainer's epoch counter does not steer the order...
    assert list(a) == epoch0
    a.advance(a.batches_per_epoch)  # ...consumption does: the next data epoch
    assert a.data_epoch == 1
    assert list(a) != epoch0 and sorted(list(a)) == sorted(epoch0) == list(range(50))


@pytest.mark.parametrize("world", [1, 2])
def test_restore_mid_epoch_reproduces_the_uninterrupted_order(world):
    n, b, k = 90, 3, 4

    def fresh():
        return [ResumableWindowSampler(n, b, seed=9, rank=r, world_size=world)
                for r in range(world)]

    def run(samplers, epochs):
        """Per rank, the batches of ``epochs`` consecutive passes, consuming each."""
        out = [[] for _ in samplers]
        for _ in range(epochs):
            for r, s in enumerate(samplers):
                got = batches(s)
                s.advance(len(got))
                out[r] += got
        return out

    uninterrupted = run(fresh(), 3)
    per_epoch = n // (b * world)
    assert len(uninterrupted[0]) == 3 * per_epoch

    # Interrupted run: into epoch 1 by k batches, state saved (the same on every rank).
    samplers = fresh()
    for s in samplers:
        s.advance(per_epoch + k)
    states = [s.state_dict() for s in samplers]
    assert all(st == states[0] for st in states)
    assert states[0]["epoch"] == 1 and states[0]["position"] == (per_epoch + k) * b * world

    resumed = fresh()
    for s in resumed:
        s.load_state_dict(states[0])
        s.set_epoch(5)  # whatever the trainer's epoch counter says
    got = run(resumed, 2)  # the rest of epoch 1, then epoch 2
    for r in range(world):
        assert got[r] == uninterrupted[r][per_epoch + k :]


def test_resume_with_other_data_or_batch_warns():
    state = ResumableWindowSampler(60, 3, seed=1).state_dict() | {"position": 12}
    other = ResumableWindowSampler(61, 3, seed=1)
    with pytest.warns(UserWarning, match="cannot be resumed exactly"):
        other.load_state_dict(state)
    assert other.consumed == 4
    wider = ResumableWindowSampler(60, 2, seed=1, rank=1, world_size=2)
    with pytest.warns(UserWarning, match=r"and 4 \(batch_size x world_size\)"):
        wider.load_state_dict(state)
    assert wider.consumed == 3
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        ResumableWindowSampler(60, 2, rank=2, world_size=2)


def test_val_order_is_split_across_ranks():
    shards = [list(ShardedOrderSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    assert shards[1] == [1, 4, 7, 10] and len(ShardedOrderSampler(11, rank=2, world_size=3)) == 3


def test_lightning_keeps_our_samplers():
    """Lightning's default ``use_distributed_sampler=True`` leaves DistributedSamplers alone."""
    assert isinstance(ResumableWindowSampler(10, 2), DistributedSampler)
    assert isinstance(ShardedOrderSampler(10), DistributedSampler)


# ---- the same through the data module and real DataLoaders ------------------------------------


@pytest.fixture
def dataset_dir(kjv_texts, small_tokenizer, tmp_path):
    docs = [t[:1500] for t in kjv_texts[:20]]
    return prepare_dataset(docs, small_tokenizer, tmp_path / "ds", val_documents=2)


def data_module(dataset_dir, **kw) -> TextDataModule:
    dm = TextDataModule(dataset=str(dataset_dir), vocab_size=400, seq_len=32, batch_size=3, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_data_module_state_restores_batches(dataset_dir, world, num_workers):
    k = 5
    ref = data_module(dataset_dir)
    loaders = [ref.train_loader(r, world) for r in range(world)]
    # Two passes: epochs 0 and 1 (each full pass advances the loader's position).
    want = [[b["input_ids"] for _ in range(2) for b in loader] for loader in loaders]
    per_epoch = len(loaders[0])
    assert len(want[0]) == 2 * per_epoch and per_epoch > k  # len() is the full epoch
    assert not torch.equal(want[0][0], want[0][per_epoch])

    states = []
    for r in range(world):
        dm = data_module(dataset_dir, num_workers=num_workers)
        loader = dm.train_loader(r, world)
        it = iter(loader)  # workers prefetch ahead; only batches handed out count
        for _ in range(k):
            next(it)
        states.append(dm.state_dict())
        del it
    assert all(s == states[0] for s in states) and states[0]["position"] == k * 3 * world

    for r in range(world):
        dm = data_module(dataset_dir, num_workers=num_workers)
        dm.load_state_dict(states[0])  # before the loader exists, as in a checkpoint restore
        loader = dm.train_loader(r, world)
        assert loader.state_dict() == states[0]
        got = [b["input_ids"] for _ in range(2) for b in loader]  # rest of epoch 0, epoch 1
        assert len(got) == len(want[r]) - k
        assert all(torch.equal(x, y) for x, y in zip(got, want[r][k:], strict=True))
