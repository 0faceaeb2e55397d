"""Token-mode selected attention with the forced blocks split off (``selected_forced="dense"``):
the index split (forced rows + free slots = the selection) and the merged kernels against the
reference, under the interpreter on the CPU and at real sizes on the GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from fsa_testing import DEVICE as DEV
from fsa_testing import assert_close, run_selected, run_selected_reference
from fsa_testing import packed_qkv as make_inputs

from fsa_train.kernels.ops.selected_attention import forced
from fsa_train.kernels.ops.selected_attention import triton as sa
from fsa_train.kernels.ops.selected_attention.sampling import random_selection
from fsa_train.kernels.settings import default_settings
from fsa_train.kernels.varlen import document_positions, token_block_rows

DENSE = replace(default_settings(), selected_forced="dense")
LENGTHS = [37, 70, 1, 53, 16, 130]  # odd lengths, a 1-token document, one exactly a block


def selected_sets(idx: torch.Tensor, own: torch.Tensor) -> list[list[set[int]]]:
    """Per (KV head, token) the set of blocks the kernels would read (>= 0, <= own block)."""
    return [[{int(b) for b in idx[hh, t] if 0 <= b <= own[t]} for t in range(idx.shape[1])]
            for hh in range(idx.shape[0])]


@pytest.mark.parametrize("init,local", [(1, 2), (2, 1), (1, 1), (0, 2), (3, 3)])
def test_forced_rows_and_free_slots_partition_the_selection(init, local):
    block, topk, h = 16, 8, 2
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    idx = random_selection(cu, h, topk, block, torch.Generator().manual_seed(3), (init, local))
    rows = forced.forced_rows(cu, total, block, h, init, local)
    free = forced.free_selection(idx, cu, block, init, local)
    assert free.shape == (h, total, topk - init - local) and free.dtype == torch.int32
    own = document_positions(cu, total) // block
    token_rows = token_block_rows(cu, total, block)
    want = selected_sets(idx, own)
    for hh in range(h):
        for t in range(total):
            row = [int(b) for b in rows[hh, token_rows[t]] if b >= 0]
            rest = [int(b) for b in free[hh, t] if b >= 0]
            assert row == sorted(row) and rest == sorted(rest)
            assert len(set(row)) == len(row) and not set(row) & set(rest), (t, row, rest)
            assert set(row) | set(rest) == want[hh][t], (t, row, rest, want[hh][t])


@pytest.mark.parametrize("G,init,local,topk", [(3, 1, 2, 5), (2, 1, 2, 3), (4, 2, 1, 6)])
def test_forced_split_matches_reference_fp32(G, init, local, topk):
    """topk = init + local leaves no free slot (the block-sparse kernels alone)."""
    h = 2 if G <= 4 else 1
    block = 16
    q, k, v, do, cu = make_inputs(LENGTHS, h, G, 16, torch.float32, seed=G)
    idx = random_selection(cu, h, topk, block, torch.Generator(device=DEV).manual_seed(G),
                           (init, local))
    ours = run_selected(q, k, v, do, idx, cu, block, forced_blocks=(init, local), settings=DENSE)
    want = run_selected_reference(q, k, v, do, idx, cu, block)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, want, strict=True):
        assert_close(a, b, 2e-5, f"G={G} forced=({init}, {local}) T={topk} {name}")


def test_forced_split_is_off_by_default_and_needs_the_promise():
    """The default settings keep the token kernels for every slot, and without the caller's
    ``forced_blocks`` the split never runs (it would add blocks a selection may lack)."""
    assert default_settings().selected_forced == "sparse"
    q, k, v, do, cu = make_inputs([40], 1, 2, 16, torch.float32, seed=0)
    idx = torch.full((1, 40, 3), -1, dtype=torch.int32)
    idx[..., 0] = 0  # only block 0: no token holds its local blocks
    plain = run_selected(q, k, v, do, idx, cu, 16, settings=DENSE)
    assert_close(plain[0], run_selected_reference(q, k, v, do, idx, cu, 16)[0], 2e-5, "o")
    with pytest.raises(ValueError, match=r"forced_blocks must be \(init, local\)"):
        sa.selected_attention(q, k, v, idx, cu, 16, forced_blocks=(1,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_gpu_forced_split_real_sizes(dtype, G):
    """The split at a training shape (d = 128, B = 64, T = 16, forced (1, 2)) against the fp32
    reference, and against the token kernels over all slots."""
    lengths, h, d, block, topk = [8192, 3001, 5191], 2 if G > 4 else 4, 128, 64, 16
    q, k, v, do, cu = make_inputs(lengths, h, G, d, dtype, seed=G)
    idx = random_selection(cu, h, topk, block, torch.Generator(device=DEV).manual_seed(G))
    ours = run_selected(q, k, v, do, idx, cu, block, forced_blocks=(1, 2), settings=DENSE)
    tokens = run_selected(q, k, v, do, idx, cu, block)
    want = run_selected_reference(q, k, v, do, idx, cu, block, dtype=torch.float32)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), ours, want, tokens, strict=True):
        assert a.dtype == dtype
        assert_close(a, b, 1e-2, f"G={G} {dtype} {name} vs reference")
        assert_close(a, c, 1e-2, f"G={G} {dtype} {name} vs token kernels")
