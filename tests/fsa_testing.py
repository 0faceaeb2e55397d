"""Helpers shared by the test modules: the device, packed batches and one closeness check.

Importable as ``fsa_testing`` from any test module (pytest puts ``tests/`` on ``sys.path``
because ``tests/conftest.py`` lives there). GPU-only tests use the ``gpu`` marker
(``@pytest.mark.gpu``), which ``tests/conftest.py`` skips on machines without CUDA.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def cu_seqlens(
    lengths: Sequence[int], dtype: torch.dtype = torch.int32, device: str | torch.device = DEVICE
) -> torch.Tensor:
    """Document boundaries ``[0, l0, l0 + l1, ...]`` of a packed batch of these lengths."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=dtype, device=device)


def packed_qkv(
    lengths: Sequence[int], h: int, G: int, d: int, dtype: torch.dtype, seed: int,
    device: str | torch.device = DEVICE, q_scale: float = 1.0,
) -> tuple[torch.Tensor, ...]:
    """A packed batch ``q [total, h·G, d]`` (times ``q_scale``), ``k, v [total, h, d]``, an output
    gradient ``do`` like q, and ``cu_seqlens``: standard normal, from a CPU generator (the same
    values on every device)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    q = (torch.randn(total, h * G, d, generator=g) * q_scale).to(device=device, dtype=dtype)
    k = torch.randn(total, h, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(total, h, d, generator=g).to(device=device, dtype=dtype)
    do = torch.randn(total, h * G, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do, cu_seqlens(lengths, device=device)


def rel_error(got: torch.Tensor, want: torch.Tensor, rms_floor: bool = False) -> float:
    """Relative L2 error ``|got - want| / |want|`` in fp64. ``rms_floor``: the reference norm is
    floored at an RMS of 1 (for references that may be exactly zero)."""
    got, want = got.detach().double(), want.detach().double()
    floor = math.sqrt(max(1, want.numel())) if rms_floor else 1e-30
    return float((got - want).norm() / want.norm().clamp_min(floor))


def assert_close(
    got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "", rms_floor: bool = False
) -> None:
    """``got`` is finite and within relative L2 error ``tol`` of ``want`` (one-line message)."""
    assert torch.isfinite(got).all(), f"{what}: not finite"
    err = rel_error(got, want, rms_floor)
    assert err <= tol, f"{what}: rel err {err:.2e} > {tol:.0e}"


def compressed_batch(
    lengths: Sequence[int], H: int, h: int, d: int, kernel: int, stride: int,
    dtype: torch.dtype, seed: int, device: str | torch.device = DEVICE, q_scale: float = 1.0,
) -> tuple[torch.Tensor, ...]:
    """A packed batch for compressed attention: ``q [total, H, d]`` (times ``q_scale``),
    compressed keys and values ``[total_c, h, d]``, an output gradient like q, ``cu_seqlens``
    and ``cu_seqlens_c`` (compression window ``kernel``, ``stride``); standard normal from a CPU
    generator."""
    from fsa_train.kernels import reference

    g = torch.Generator(device="cpu").manual_seed(seed)
    cu = cu_seqlens(lengths, device=device)
    cuc = reference.compressed_lengths(cu, kernel, stride)
    total, total_c = sum(lengths), int(cuc[-1])

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return (rnd(total, H, d, scale=q_scale), rnd(total_c, h, d), rnd(total_c, h, d),
            rnd(total, H, d), cu, cuc)


def assert_same_lse(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """fp32 LSEs of one shape, ``-inf`` in the same places, finite ones within ``tol``."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = torch.isfinite(want)
    assert (got[finite].double() - want[finite].double()).abs().max() <= tol


COMPRESSED_GPU_PACKED = [1, 100, 4096, 777, 2048, 31, 1000]
"""The packed batch of the compressed-attention GPU tests: tiny, long and mid documents."""


def check_compressed_kernel(kernel: str, dtype: torch.dtype, G: int, d: int,
                            max_seqlen: int | None, lse_tol: float) -> None:
    """``compressed_attention`` with ``compressed_kernel=kernel`` on the GPU against the fp32
    reference: output, dq/dk/dv (relative error <= 1e-2) and the LSE (within ``lse_tol``), on
    :data:`COMPRESSED_GPU_PACKED` with l = 32, s = 16."""
    from dataclasses import replace

    from fsa_train.kernels import reference
    from fsa_train.kernels.ops.compressed_attention import triton as ca
    from fsa_train.kernels.settings import default_settings

    h = 4 if G <= 4 else 2
    q, k, v, do, cu, cuc = compressed_batch(COMPRESSED_GPU_PACKED, G * h, h, d, 32, 16, dtype,
                                            G + d, "cuda", 4.0)
    settings = replace(default_settings(), compressed_kernel=kernel)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, lse = ca.compressed_attention(q, k, v, cu, cuc, 32, 16, None, max_seqlen,
                                     settings=settings)
    grads = torch.autograd.grad(o, (q, k, v), do)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    o_ref, lse_ref = reference.compressed_attention(qr, kr, vr, cu, cuc, 32, 16)
    grads_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do.float())
    assert o.dtype == dtype and rel_error(o, o_ref, rms_floor=True) <= 1e-2
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert rel_error(a, b, rms_floor=True) <= 1e-2, name
    assert_same_lse(lse, lse_ref, lse_tol)


def run_selected(q, k, v, do, idx, cu, block, **options):
    """The Triton selected attention's ``(o, dq, dk, dv)`` on fresh leaves (``options``: the op's
    keywords, e.g. ``partials``, ``forced_blocks``, ``settings``)."""
    from fsa_train.kernels.ops.selected_attention import triton as selected

    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = selected.selected_attention(q, k, v, idx, cu, block, **options)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def run_selected_reference(q, k, v, do, idx, cu, block, dtype=torch.float64):
    """The reference selected attention's ``(o, dq, dk, dv)``, computed in ``dtype``."""
    from fsa_train.kernels import reference

    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o = reference.selected_attention(q, k, v, idx, cu, block)
    o.backward(do.to(dtype))
    return o.detach(), q.grad, k.grad, v.grad


ROOT = Path(__file__).resolve().parents[1]


def gpu_fit(root: Path, corpus: Path, *extra: str, steps: int = 6) -> list[dict]:
    """``fsa-train fit`` of the demo's NSA GPT cut to 2 layers and 256-token windows, in a
    process of its own (DeepSpeed's process group must not outlive the run); each step's
    metrics."""
    root.mkdir(parents=True)
    overlay = root / "overlay.yaml"
    overlay.write_text(
        f"""
trainer:
  accelerator: gpu
  devices: 1
  precision: bf16-mixed
  max_steps: {steps}
  val_check_interval: null
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  logger: false
  callbacks:
    - class_path: fsa_train.callbacks.MetricsFile
      init_args: {{path: {root / "metrics.jsonl"}}}
""",
        encoding="utf-8",
    )
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    # later runs reuse the first one's autotuning from the tuning cache (FSA_TUNING_CACHE)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=os.pathsep.join(paths))
    env.pop("MASTER_PORT", None)
    command = [sys.executable, "-m", "fsa_train.cli", "fit", "--config", "configs/demo.yaml",
               "--config", str(overlay), *extra, "--model.config.n_layer", "2",
               "--model.warmup_steps", "2", "--model.sample_tokens", "4",
               "--data.corpus", str(corpus), "--data.cache_dir", str(root.parent / "cache"),
               "--data.vocab_size", "320", "--data.seq_len", "256", "--data.batch_size", "2",
               "--data.val_documents", "2"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
