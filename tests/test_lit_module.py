"""LitGPT: the learning-rate schedule and what a non-finite loss does."""

import lightning as L
import pytest
import torch

from fsa_train.config import GPTConfig
from fsa_train.lit_module import LitGPT, warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    lrs = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.55)


def poisoned_batch_run(on_nonfinite: str):
    config = GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_kv_head=1, d_model=16,
                       attention="dense")
    module = LitGPT(config, warmup_steps=0, on_nonfinite=on_nonfinite)
    with torch.no_grad():
        module.model.head.weight[0, 0] = float("nan")
    batch = {
        "input_ids": torch.randint(0, 32, (24,)),
        "targets": torch.randint(0, 32, (24,)),
        "cu_seqlens": torch.tensor([0, 10, 24], dtype=torch.int32),
    }
    loader = torch.utils.data.DataLoader([batch] * 3, batch_size=None)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return module


def test_nonfinite_loss_stops_with_advice():
    with pytest.raises(FloatingPointError, match="on_nonfinite: skip"):
        poisoned_batch_run("stop")


def test_nonfinite_loss_can_skip_steps():
    module = poisoned_batch_run("skip")
    assert module.skipped_steps == 3
    assert torch.isnan(module.model.head.weight[0, 0])  # never updated, never spread
    assert torch.isfinite(module.model.head.weight[1:]).all()


def fitted_optimizer(accelerator: str) -> torch.optim.Optimizer:
    config = GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_kv_head=1, d_model=16,
                       attention="dense")
    module = LitGPT(config, warmup_steps=0)
    batch = {"input_ids": torch.randint(0, 32, (24,)), "targets": torch.randint(0, 32, (24,)),
             "cu_seqlens": torch.tensor([0, 10, 24], dtype=torch.int32)}
    trainer = L.Trainer(max_steps=1, accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    return trainer.optimizers[0]


def test_adamw_is_fused_only_on_cuda():
    assert not fitted_optimizer("cpu").defaults["fused"]


@pytest.mark.gpu
def test_gpu_adamw_is_fused():
    assert fitted_optimizer("gpu").defaults["fused"]


def test_bad_schedule_values_are_rejected():
    config = GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_kv_head=1, d_model=16)
    with pytest.raises(ValueError, match="model.min_lr_ratio"):
        LitGPT(config, min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="model.on_nonfinite"):
        LitGPT(config, on_nonfinite="ignore")


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_gpu_compiled_fit_trains_like_eager(small_corpus, tmp_path, attention):
    """``model.compile: true`` through the real ``fsa-train fit`` on one GPU: every block
    compiled whole (the NSA and RoPE kernels as custom ops) trains step for step like the eager
    run, to bf16 rounding (Inductor fuses the norms and the MLP differently)."""
    from fsa_testing import gpu_fit

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    options = ("--model.config.attention", attention)
    eager = gpu_fit(tmp_path / "eager", small_corpus, *options)
    compiled = gpu_fit(tmp_path / "compiled", small_corpus, *options, "--model.compile", "true")
    assert [r["step"] for r in eager] == [r["step"] for r in compiled]
    losses = [(a["train/loss"], b["train/loss"]) for a, b in zip(eager, compiled, strict=True)]
    print(f"{attention} eager / compiled losses:", losses)
    assert abs(losses[0][0] - losses[0][1]) < 0.01, losses
    assert all(abs(a - b) < 0.05 for a, b in losses), losses
