"""compressed_attention on cuDNN (``compressed_kernel="cudnn"``) against the reference.

CPU: the row layout itself. Compressed attention must equal causal attention over compressed
positions with each row's ``s`` queries as extra heads, run here by the naive dense op, forward
and backward, on packed batches with documents shorter than one compression window and empty
ones; and the slot maps are a bijection between tokens that see keys and filled slots. GPU
(marker ``gpu``): cuDNN's forward and backward at real sizes, bf16/fp16, G 1-16.
"""

from __future__ import annotations

import pytest
import torch
from fsa_testing import assert_same_lse, check_compressed_kernel, compressed_batch, rel_error

from fsa_train.kernels import reference
from fsa_train.kernels.ops.compressed_attention import cudnn
from fsa_train.kernels.settings import KernelSettings

LENGTHS = [37, 1, 100, 7, 64, 0, 50, 31, 32]
"""Documents shorter than the window (l = 32 below: 1, 7, 31), exactly one window (32), empty."""


def _row_attention(q, k_c, v_c, cu, cuc, kernel, stride):
    """Compressed attention through the row layout, with the naive dense op for cuDNN."""
    maps = cudnn.slot_maps(cu, cuc, q.shape[0], k_c.shape[0], kernel, stride)
    rows = cudnn.to_rows(q, maps)
    o_rows = reference.window_attention(rows, k_c, v_c, cuc)
    return cudnn.from_rows(o_rows, maps, q.shape[1]), maps


@pytest.mark.parametrize("H,h,kernel,stride", [(2, 2, 8, 4), (4, 1, 16, 8), (8, 2, 32, 16)])
def test_row_layout_is_compressed_attention_forward_and_backward(H, h, kernel, stride):
    q, k, v, do, cu, cuc = compressed_batch(LENGTHS, H, h, 16, kernel, stride, torch.float64,
                                            seed=H)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, _ = _row_attention(*leaves, cu, cuc, kernel, stride)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, _ = reference.compressed_attention(*ref_leaves, cu, cuc, kernel, stride)
    grads_ref = torch.autograd.grad(o_ref, ref_leaves, do)
    assert rel_error(o, o_ref, rms_floor=True) < 1e-12
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert rel_error(a, b, rms_floor=True) < 1e-12, name


def test_row_lse_is_the_reference_lse():
    kernel, stride, H = 16, 8, 4
    q, k, v, _, cu, cuc = compressed_batch(LENGTHS, H, 2, 16, kernel, stride, torch.float64,
                                           seed=3)
    maps = cudnn.slot_maps(cu, cuc, q.shape[0], k.shape[0], kernel, stride)
    rows = cudnn.to_rows(q, maps)
    # the LSE of every row head over its causal compressed keys, in cuDNN's [total_c, H·s, 1]
    scores = torch.einsum("rjd,ckd->rjck", rows, k) / 16**0.5
    group = rows.shape[1] // k.shape[1]
    scores = scores[:, torch.arange(rows.shape[1]), :, torch.arange(rows.shape[1]) // group]
    scores = scores.permute(1, 0, 2)  # [rows, heads, keys]
    row_doc = torch.searchsorted(cuc[1:].long(), torch.arange(k.shape[0]), right=True)
    key_doc = row_doc
    visible = (key_doc[None, :] == row_doc[:, None]) & (
        torch.arange(k.shape[0])[None, :] <= torch.arange(k.shape[0])[:, None])
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = cudnn.row_lse(torch.logsumexp(scores, -1, keepdim=True), maps, H)
    _, lse_ref = reference.compressed_attention(q, k, v, cu, cuc, kernel, stride)
    assert_same_lse(lse, lse_ref.float(), 1e-5)


def test_slot_maps_pair_every_seeing_token_with_one_filled_slot():
    kernel, stride = 32, 16
    _, k, _, _, cu, cuc = compressed_batch(LENGTHS, 2, 1, 16, kernel, stride, torch.float32,
                                           seed=0)
    total = sum(LENGTHS)
    maps = cudnn.slot_maps(cu, cuc, total, k.shape[0], kernel, stride)
    filled = maps.slot_valid.reshape(-1)
    tokens = maps.slot_token.reshape(-1)[filled]
    seeing = maps.token_valid.nonzero().flatten()
    assert torch.equal(tokens.sort().values, seeing)  # each seeing token in exactly one slot
    assert torch.equal(maps.slot_token.reshape(-1)[maps.token_slot[seeing]], seeing)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    assert torch.equal(maps.token_valid, positions >= kernel - 1)


def test_settings_and_cpu_inputs_are_one_line_errors():
    assert KernelSettings.from_env({"FSA_COMPRESSED_KERNEL": "cudnn"}).compressed_kernel == \
        "cudnn"
    q, k, v, _, cu, cuc = compressed_batch([40], 2, 2, 16, 8, 4, torch.float32, seed=0,
                                           device="cpu")
    with pytest.raises(ValueError, match="compressed_kernel='cudnn' needs"):
        cudnn.compressed_attention(q, k, v, cu, cuc, 8, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,G,d,max_seqlen",
                         [(torch.bfloat16, 1, 128, 4096), (torch.bfloat16, 4, 128, None),
                          (torch.bfloat16, 16, 128, 4096), (torch.float16, 4, 64, 4096)])
def test_gpu_cudnn_matches_reference(dtype, G, d, max_seqlen):
    probe = torch.empty(1, 1, 64, device="cuda", dtype=torch.bfloat16)
    if cudnn.unsupported(probe, probe):
        pytest.skip("nvidia-cudnn-frontend is not installed")
    check_compressed_kernel("cudnn", dtype, G, d, max_seqlen, lse_tol=0.05)
