"""compressed_attention on FlexAttention (``compressed_kernel="flex"``) against the reference.

CPU: the forward (FlexAttention has no backward there) on packed batches with documents shorter
than one compression window and empty ones; the settings switch. GPU (marker ``gpu``): compiled
FlexAttention forward and backward at real sizes, bf16/fp16, G 1-16.
"""

from __future__ import annotations

import pytest
import torch
from fsa_testing import assert_same_lse, check_compressed_kernel, compressed_batch, rel_error

from fsa_train.kernels import reference
from fsa_train.kernels.ops.compressed_attention import flex
from fsa_train.kernels.settings import KernelSettings

pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.mark.parametrize("H,h,kernel,stride", [(2, 2, 8, 4), (4, 1, 16, 8), (16, 2, 32, 16)])
def test_cpu_forward_matches_reference(H, h, kernel, stride):
    lengths = [37, 1, 100, 7, 64, 0, 50]
    q, k, v, _, cu, cuc = compressed_batch(lengths, H, h, 16, kernel, stride, torch.float64, seed=H)
    with torch.no_grad():
        o, lse = flex.compressed_attention(q, k, v, cu, cuc, kernel, stride)
        o_ref, lse_ref = reference.compressed_attention(q, k, v, cu, cuc, kernel, stride)
    assert rel_error(o, o_ref, rms_floor=True) < 1e-10
    assert torch.equal(o[torch.isneginf(lse_ref).T], torch.zeros_like(o[torch.isneginf(lse_ref).T]))
    assert_same_lse(lse, lse_ref.float(), 1e-5)


def test_cpu_backward_is_a_one_line_error():
    q, k, v, _, cu, cuc = compressed_batch([40], 2, 2, 16, 8, 4, torch.float32, seed=0)
    q.requires_grad_()
    with pytest.raises(ValueError, match="no backward on the CPU"):
        flex.compressed_attention(q, k, v, cu, cuc, 8, 4)


def test_settings_name_the_kernel():
    assert KernelSettings.from_env({"FSA_COMPRESSED_KERNEL": "flex"}).compressed_kernel == "flex"
    with pytest.raises(ValueError, match="FSA_COMPRESSED_KERNEL"):
        KernelSettings(compressed_kernel="fa4")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,G,d", [(torch.bfloat16, 1, 128), (torch.bfloat16, 4, 128),
                                       (torch.bfloat16, 16, 128), (torch.float16, 4, 64)])
def test_gpu_flex_matches_reference(dtype, G, d):
    check_compressed_kernel("flex", dtype, G, d, None, lse_tol=0.5)


def test_block_mask_is_built_once_per_batch():
    """The layers of one step share the batch's boundaries: one mask; a new batch (or an
    in-place change) builds another, and the results stay right."""
    q, k, v, _, cu, cuc = compressed_batch([40, 30], 2, 2, 16, 8, 4, torch.float64, seed=1)
    first = flex._block_mask(cu, cuc, 70, k.shape[0], 8, 4)
    assert flex._block_mask(cu, cuc, 70, k.shape[0], 8, 4) is first
    other = cu.clone()
    assert flex._block_mask(other, cuc, 70, k.shape[0], 8, 4) is not first
    q2, k2, v2, _, cu2, cuc2 = compressed_batch([10, 60], 2, 2, 16, 8, 4, torch.float64, seed=2)
    cu.copy_(cu2)
    cuc.copy_(cuc2)  # same tensors, new boundaries: must not reuse the old mask
    with torch.no_grad():
        o, _ = flex.compressed_attention(q2, k2, v2, cu, cuc, 8, 4)
        o_ref, _ = reference.compressed_attention(q2, k2, v2, cu2, cuc2, 8, 4)
    assert rel_error(o, o_ref, rms_floor=True) < 1e-10
