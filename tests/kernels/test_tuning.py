"""The one kernel tuner: autotuning per size class, fixed and rule-chosen configurations, and
the record of the choices."""

import importlib
import pkgutil

import pytest
import torch
from fsa_testing import DEVICE

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

import fsa_train.kernels.ops as ops_package  # noqa: E402
from fsa_train.kernels.tuning import (  # noqa: E402
    KernelTuner,
    autotune_choices,
    choices_markdown,
    size_class,
    tuners,
)


@triton.jit
def _scale_kernel(X, Y, total, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    tl.store(Y + offs, tl.load(X + offs, mask=ok) * factor, mask=ok)


def _kernel_modules():
    for info in pkgutil.iter_modules(ops_package.__path__):
        yield info.name, importlib.import_module(f"fsa_train.kernels.ops.{info.name}.triton")


def test_size_class_is_the_next_power_of_two():
    assert [size_class(n) for n in (0, 1, 2, 3, 16, 17, 65536, 65537)] == \
        [1, 1, 2, 4, 16, 32, 65536, 131072]


def test_each_size_class_gets_its_own_tuner_and_the_kernel_runs():
    tuned = KernelTuner("test.scale_buckets", _scale_kernel, [triton.Config({"BLOCK": 32})], [])
    for total in (100, 70, 5000):
        x = torch.randn(total, device=DEVICE)
        y = torch.empty_like(x)
        grid = lambda meta, n=total: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        tuned.autotuner(total)[grid](x, y, total, 2.0)
        torch.testing.assert_close(y, 2 * x)
        y.zero_()
        tuned.run(grid, (x, y, total, 2.0), dtype=x.dtype)  # the interpreter's or the tuned one
        torch.testing.assert_close(y, 2 * x)
    assert sorted(bucket for bucket, _ in tuned.tuners) == [128, 8192]  # 100 and 70 share one
    assert tuned.autotuner(90) is tuned.tuners[128, True]
    assert tuned.autotuner(90, autotune=False) is not tuned.tuners[128, True]
    with pytest.raises(ValueError, match="no argument"):
        KernelTuner("test.scale_bad", _scale_kernel, [triton.Config({"BLOCK": 32})], [],
                    size_arg="n")
    with pytest.raises(ValueError, match="exists already"):
        KernelTuner("test.scale_buckets", _scale_kernel, [triton.Config({"BLOCK": 32})], [])


def test_a_rule_chooses_one_of_its_configs_and_is_recorded(monkeypatch):
    configs = [{"BLOCK": 32, "num_warps": 4}, {"BLOCK": 64, "num_warps": 4}]
    tuned = KernelTuner("test.scale_rule", _scale_kernel, configs, size_arg=None,
                        rule=lambda meta: configs[meta["wide"]])
    assert tuned.choose({"wide": 1}) == configs[1]
    entry = autotune_choices()["test.scale_rule"]
    assert entry == [{"key": ["rule", "wide=1"], "config": str(triton.Config(
        {"BLOCK": 64}, num_warps=4))}]
    bad = KernelTuner("test.scale_rule_bad", _scale_kernel, configs, size_arg=None,
                      rule=lambda meta: {"BLOCK": 16})
    with pytest.raises(ValueError, match="not one of its configs"):
        bad.choose({})


def test_choices_are_reported_per_size_class(monkeypatch):
    select = tuners()["select_blocks.select"]
    monkeypatch.setattr(select, "tuners", {})
    monkeypatch.setattr(select, "ruled", {})
    assert "select_blocks.select" not in autotune_choices()
    config = triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=2)
    tuner = select.autotuner(60000)
    monkeypatch.setattr(tuner, "cache", {(128, 2, "torch.bfloat16"): config})
    choices = autotune_choices()
    assert choices["select_blocks.select"] == [
        {"key": ["total <= 65536", "128", "2", "torch.bfloat16"], "config": str(config)}]
    lines = choices_markdown(choices)
    assert lines[1] == "## Autotuner choices"
    assert ("- `select_blocks.select` key (total <= 65536, 128, 2, torch.bfloat16): "
            + str(config)) in lines
    assert choices_markdown({}) == []


def test_every_kernel_launch_configuration_goes_through_a_kernel_tuner():
    """No op module keeps a plain ``triton.autotune`` (one mechanism), and the attention and
    selection kernels are bucketed on their token count."""
    for name, module in _kernel_modules():
        assert not [v for v in vars(module).values() if isinstance(v, Autotuner)], name
        owned = [v for v in vars(module).values() if isinstance(v, KernelTuner)]
        if name in ("compressed_attention", "window_attention", "select_blocks"):
            assert owned and all(t.size_arg == "total" and t.rule is None for t in owned), name
        assert all(t.name.startswith(f"{name}.") for t in owned), name
