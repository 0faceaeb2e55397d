"""On one GPU: the sequence-parallel preset with P = 1 trains like a plain run (issue 21).

``model.sequence_parallel: 1`` is the plain path in the code (``LitGPT.setup`` forms no group,
batches are not sharded, the attention core runs without the all-to-all); what
``configs/strategy/ulysses.yaml`` adds is DeepSpeed ZeRO-2 with bf16. A tiny NSA GPT trains a
few steps through the real ``fsa-train fit`` twice on one GPU, with ``--config
configs/strategy/ulysses.yaml --model.sequence_parallel 1`` and without it (Lightning's
automatic strategy, bf16-mixed), and the losses must agree to bf16 rounding: DeepSpeed keeps
the weights in bf16 and updates an fp32 master copy, the plain run keeps fp32 weights under
autocast. Run with ``pytest -m gpu tests/parallel``.
"""

from __future__ import annotations

import pytest
from fsa_testing import gpu_fit

pytestmark = pytest.mark.gpu

STEPS = 6


def test_ulysses_preset_with_one_rank_trains_like_a_plain_run(small_corpus, tmp_path):
    pytest.importorskip("deepspeed")
    plain = gpu_fit(tmp_path / "plain", small_corpus, steps=STEPS)
    preset = gpu_fit(tmp_path / "ulysses", small_corpus, "--config",
                  "configs/strategy/ulysses.yaml", "--model.sequence_parallel", "1", steps=STEPS)
    assert [r["step"] for r in plain] == [r["step"] for r in preset] == list(range(1, STEPS + 1))
    for a, b in zip(plain, preset, strict=True):
        assert a["train/tokens_seen"] == b["train/tokens_seen"]
    losses = [(a["train/loss"], b["train/loss"]) for a, b in zip(plain, preset, strict=True)]
    print("plain / ulysses P=1 losses:", losses)
    # bf16 weights against fp32 ones: the first step's loss differs by rounding only, and the
    # runs stay together (a wrong gradient scale or data order would not)
    assert abs(losses[0][0] - losses[0][1]) < 0.01, losses
    assert all(abs(a - b) < 0.05 for a, b in losses), losses
