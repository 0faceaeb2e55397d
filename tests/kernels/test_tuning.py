"""The one kernel tuner: autotuning per size class, fixed and rule-chosen configurations, the
record of the choices, and the on-disk store of autotune choices."""

import importlib
import json
import multiprocessing
import pkgutil
import types
import warnings

import pytest
import torch
from fsa_testing import DEVICE

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

import fsa_train.kernels.ops as ops_package  # noqa: E402
from fsa_train.kernels import tuning, tuning_cache  # noqa: E402
from fsa_train.kernels.settings import tuning_cache_dir  # noqa: E402
from fsa_train.kernels.tuning import (  # noqa: E402
    KernelTuner,
    autotune_choices,
    choices_markdown,
    size_class,
    tuners,
)
from fsa_train.kernels.tuning_cache import CachedChoices, kernel_fingerprint, tuner_file  # noqa: E402


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


# ------------------------------------------------------------------ the on-disk tuning cache

_CONFIGS = [triton.Config({"BLOCK": 32}, num_warps=4),
            triton.Config({"BLOCK": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK": 64}, num_warps=4, num_stages=4)]  # [1]'s kwargs
_KEY = (128, 2, "torch.bfloat16")


@triton.jit
def _other_kernel(X, Y, total, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < total) + factor, mask=offs < total)


@pytest.fixture
def tuning_dir(tmp_path, monkeypatch):
    """``FSA_TUNING_CACHE`` pointed at a fresh directory (re-read by ``tuning_cache_dir``)."""
    directory = tmp_path / "tuning"
    monkeypatch.setenv("FSA_TUNING_CACHE", str(directory))
    tuning_cache_dir.cache_clear()
    yield directory
    tuning_cache_dir.cache_clear()


def _choices(directory, name="test.store", configs=_CONFIGS, **context):
    """A store as a fresh process would make it (a fixed GPU and versions: no CUDA needed)."""
    context = {"size_class": 65536, "kernel": _scale_kernel, "device": "NVIDIA H200 (sm_90)",
               "version": "triton 3.6.0, torch 2.11.0", **context}
    return CachedChoices(directory, name, configs, **context)


def _fresh_tuner(name, configs, **kwargs) -> KernelTuner:
    """A KernelTuner as a new process would build it (the registry forgets the last one)."""
    tuning._TUNERS.pop(name, None)
    return KernelTuner(name, _scale_kernel, configs, [], **kwargs)


def test_a_stored_choice_is_found_by_a_new_process_as_the_identical_config(tmp_path):
    first = _choices(tmp_path)
    assert _KEY not in first
    with pytest.raises(KeyError):
        first[_KEY]
    first[_KEY] = _CONFIGS[1]
    assert first[_KEY] is _CONFIGS[1] and first.loaded == set()

    copies = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages)
              for c in _CONFIGS]
    second = _choices(tmp_path, configs=copies)
    assert _KEY in second
    assert second[_KEY] is copies[1]  # the object of its own list, not a rebuilt one
    assert second.loaded == {_KEY} and dict(second) == {_KEY: copies[1]}
    assert _choices(tmp_path)[_KEY] is _CONFIGS[1]  # __getitem__ alone loads too

    entries = json.loads(tuner_file(tmp_path, "test.store").read_text())
    (entry,) = entries.values()
    assert entry["choice"] == {"kwargs": {"BLOCK": 64}, "num_warps": 8, "num_stages": 2,
                               "num_ctas": 1, "maxnreg": None}
    assert entry["size_class"] == 65536 and entry["key"] == str(_KEY)
    assert entry["gpu"] == "NVIDIA H200 (sm_90)" and entry["versions"].startswith("triton 3.6")
    assert entry["config"] == str(_CONFIGS[1]) and entry["time"]


@pytest.mark.parametrize("change", [
    {"size_class": 16384}, {"autotune": False}, {"device": "NVIDIA A100 (sm_80)"},
    {"version": "triton 3.5.0, torch 2.11.0"}, {"kernel": _other_kernel},
    {"reset_to_zero": ["Y"]}, {"configs": _CONFIGS[:2]}, {"name": "test.store_other"},
])
def test_a_choice_is_not_reused_when_anything_it_depends_on_differs(tmp_path, change):
    _choices(tmp_path)[_KEY] = _CONFIGS[0]
    other = _choices(tmp_path, **change)
    assert _KEY not in other
    with pytest.raises(KeyError):
        other[_KEY]
    assert (128, 2, "torch.float16") not in _choices(tmp_path)  # another tuning key
    assert _KEY in _choices(tmp_path)


def test_a_stored_choice_that_is_none_of_the_configs_is_a_miss(tmp_path):
    _choices(tmp_path)[_KEY] = _CONFIGS[2]
    path = tuner_file(tmp_path, "test.store")
    entries = json.loads(path.read_text())
    for entry in entries.values():
        entry["choice"]["kwargs"]["BLOCK"] = 16
    path.write_text(json.dumps(entries))
    assert _KEY not in _choices(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", b"\xff\xfe{"])
def test_a_corrupt_file_is_one_warning_and_a_miss_and_the_next_write_repairs_it(tmp_path,
                                                                               content):
    path = tuner_file(tmp_path, "test.store")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    choices = _choices(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _KEY not in choices
        assert (1, "torch.float16") not in choices
        choices[_KEY] = _CONFIGS[2]  # reads the corrupt file again, to merge
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    assert path.exists()
    assert list(json.loads(path.read_text()).values())[0]["choice"]["num_stages"] == 4
    assert _choices(tmp_path)[_KEY] is _CONFIGS[2]


def test_interleaved_writers_keep_each_others_entries(tmp_path):
    keys = [(64, 1, "torch.bfloat16"), (128, 4, "torch.float16")]
    rank0, rank1 = _choices(tmp_path), _choices(tmp_path)
    assert keys[0] not in rank0 and keys[1] not in rank1  # both read the file before writing
    rank0[keys[0]] = _CONFIGS[0]
    rank1[keys[1]] = _CONFIGS[1]
    later = _choices(tmp_path)
    assert later[keys[0]] is _CONFIGS[0] and later[keys[1]] is _CONFIGS[1]
    rank0[keys[1]] = _CONFIGS[2]  # the same entry again: the last writer's
    assert _choices(tmp_path)[keys[1]] is _CONFIGS[2]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []


def _write_many(directory, rank):
    choices = _choices(directory)
    for i in range(20):
        choices[(rank, i)] = _CONFIGS[(rank + i) % len(_CONFIGS)]


def test_concurrent_processes_lose_no_entry(tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_many, args=(tmp_path, rank)) for rank in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0] * 4
    assert len(json.loads(tuner_file(tmp_path, "test.store").read_text())) == 80
    reader = _choices(tmp_path)
    assert all(reader[(r, i)] is _CONFIGS[(r + i) % 3] for r in range(4) for i in range(20))


def test_the_cache_directory_comes_from_fsa_tuning_cache(monkeypatch, tmp_path):
    for value in ("0", "off", "OFF", ""):
        monkeypatch.setenv("FSA_TUNING_CACHE", value)
        tuning_cache_dir.cache_clear()
        assert tuning_cache_dir() is None, value
    monkeypatch.setenv("FSA_TUNING_CACHE", str(tmp_path))
    tuning_cache_dir.cache_clear()
    assert tuning_cache_dir() == tmp_path
    monkeypatch.delenv("FSA_TUNING_CACHE")
    assert tuning_cache_dir() == tmp_path  # read once per process
    tuning_cache_dir.cache_clear()
    assert tuning_cache_dir().parts[-3:] == (".cache", "fsa-train", "tuning")
    tuning_cache_dir.cache_clear()


def test_only_autotuning_tuners_get_the_store_and_fsa_tuning_cache_0_turns_it_off(
        tuning_dir, monkeypatch):
    tuned = _fresh_tuner("test.store_hook", _CONFIGS)
    autotuner = tuned.autotuner(5000)
    assert isinstance(autotuner.cache, CachedChoices) and autotuner.cache_results is False
    assert autotuner.cache.path == tuning_dir / "test.store_hook.json"
    assert autotuner.cache.size_class == 8192 and autotuner.cache.configs == autotuner.configs
    assert type(tuned.autotuner(5000, autotune=False).cache) is dict  # one config: never tuned
    monkeypatch.setenv("FSA_TUNING_CACHE", "0")
    tuning_cache_dir.cache_clear()
    off = _fresh_tuner("test.store_hook", _CONFIGS).autotuner(5000)
    assert type(off.cache) is dict and off.cache_results is False
    assert not tuning_dir.exists()
    # Triton's own autotune disk cache (TRITON_CACHE_AUTOTUNING=1) ignores size classes: off
    autotuner = types.SimpleNamespace(cache_results=True, configs=_CONFIGS, cache={})
    tuning_cache.attach(autotuner, None, "test.store_hook", size_class=1, autotune=True,
                        kernel=_scale_kernel, reset_to_zero=None)
    assert autotuner.cache_results is False and type(autotuner.cache) is dict


def test_a_new_kernel_tuner_finds_the_last_ones_choice_and_reports_it(tuning_dir):
    first = _fresh_tuner("test.store_reuse", _CONFIGS).autotuner(60000)
    key = (2, "torch.bfloat16")
    assert key not in first.cache
    first.cache[key] = first.configs[2]  # what Autotuner.run stores after timing
    second = _fresh_tuner("test.store_reuse", _CONFIGS)
    autotuner = second.autotuner(40000)  # the same class
    assert key in autotuner.cache and autotuner.cache[key] is autotuner.configs[2]
    assert autotune_choices()["test.store_reuse"] == [
        {"key": ["total <= 65536", "2", "torch.bfloat16"], "config": str(_CONFIGS[2])}]
    assert key not in second.autotuner(70000).cache  # another class


def test_the_kernel_fingerprint_follows_the_source():
    assert kernel_fingerprint(_scale_kernel) == kernel_fingerprint(_scale_kernel)
    assert kernel_fingerprint(_scale_kernel) != kernel_fingerprint(_other_kernel)


@pytest.mark.gpu
def test_a_second_process_reuses_the_tuning_and_another_size_class_tunes(tuning_dir):
    configs = [triton.Config({"BLOCK": block}, num_warps=warps)
               for block, warps in ((64, 2), (128, 4), (256, 4), (512, 8))]
    name = "test.store_gpu"

    def launch(tuner, total):
        x = torch.randn(total, device="cuda")
        y = torch.empty_like(x)
        autotuner = tuner.autotuner(total)
        timed = []
        bench = autotuner._bench

        def counting(*args, **kwargs):
            timed.append(kwargs["config"])
            return bench(*args, **kwargs)

        autotuner._bench = counting
        tuner.run(lambda meta: (triton.cdiv(total, meta["BLOCK"]),), (x, y, total, 2.0),
                  dtype=x.dtype)
        torch.testing.assert_close(y, 2 * x)
        return autotuner, timed

    first, timed = launch(_fresh_tuner(name, configs), 3000)
    assert len(timed) == len(configs) and first.cache.loaded == set()
    assert tuner_file(tuning_dir, name).exists()
    second_tuner = _fresh_tuner(name, configs)
    second, timed = launch(second_tuner, 4000)  # the same class, 4096
    assert timed == []
    assert second.cache.loaded == set(second.cache) != set()
    assert str(second.best_config) == str(first.best_config)
    assert any(second.best_config is c for c in second.configs)
    third, timed = launch(second_tuner, 5000)  # class 8192: tunes afresh
    assert len(timed) == len(configs) and third.cache.loaded == set()
