"""The training-throughput benchmark: the SDPA path equals the dense model; a tiny CPU run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import throughput

    return throughput


def written(directory: Path, suffix: str) -> Path:
    """The one ``throughput_cpu_<date>`` file with ``suffix`` the run wrote."""
    (path,) = directory.glob(f"throughput_cpu_*{suffix}")
    return path


TINY = ["--device", "cpu", "--n_layer", "1", "--d_model", "64", "--head_dim", "16",
        "--vocab", "256", "--steps", "2", "--warmup", "1"]


def test_sdpa_path_matches_the_dense_model(bench):
    args = bench.parse_args([*TINY, "--contexts", "96"])
    cfg = bench.model_config(args, "dense", False)
    cpu = torch.device("cpu")
    dense, sdpa = bench.build_model(cfg, "dense", cpu), bench.build_model(cfg, "sdpa", cpu)
    ids = torch.randint(0, cfg.vocab_size, (96,), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 96], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids, cu), dense(ids, cu), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="takes 1 equal-length"):
        sdpa(ids, torch.tensor([0, 40, 96], dtype=torch.int32))


def test_sdpa_path_batches_equal_length_sequences(bench):
    """With several sequences per step the SDPA path runs them as its batch dimension and
    equals the dense model on the same packed documents."""
    args = bench.parse_args([*TINY, "--contexts", "48"])
    cfg = bench.model_config(args, "dense", False)
    cpu = torch.device("cpu")
    dense, sdpa = bench.build_model(cfg, "dense", cpu), bench.build_model(cfg, "sdpa", cpu, 3)
    ids = torch.randint(0, cfg.vocab_size, (144,), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 48, 96, 144], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids, cu), dense(ids, cu), rtol=1e-4, atol=1e-5)


def test_tokens_per_step_packs_whole_sequences(bench, tmp_path):
    report = bench.main([*TINY, "--contexts", "128", "512", "--tokens_per_step", "384",
                         "--modes", "dense", "sdpa", "--out", str(tmp_path)])
    assert [(r["context"], r["sequences"]) for r in report["rows"]] == [
        (128, 3), (128, 3), (512, 1), (512, 1)]
    assert "384 tokens per step" in written(tmp_path, ".md").read_text()


def test_tiny_cpu_run_writes_json_and_markdown(bench, tmp_path, capsys):
    report = bench.main([*TINY, "--contexts", "256", "512", "--out", str(tmp_path)])
    saved = json.loads(written(tmp_path, ".json").read_text())
    rows = [(r["mode"], r["context"], r["status"]) for r in saved["rows"]]
    assert rows == [(m, c, "ok") for c in (256, 512) for m in ("dense", "sdpa", "nsa", "nsa_block")]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in saved["rows"])
    assert saved["model"]["n_head"] == 4 and saved["model"]["n_kv_head"] == 1
    assert saved["environment"]["torch"] == torch.__version__
    table = written(tmp_path, ".md").read_text()
    assert "| nsa | 512 |" in table and "NSA / dense" in table
    has_png = bool(list(tmp_path.glob("throughput_cpu_*.png")))
    assert has_png or "no plot" in capsys.readouterr().out
    assert report["rows"] == saved["rows"]


def test_fused_ops_flag_sets_the_config_and_is_recorded(bench, tmp_path):
    assert bench.model_config(bench.parse_args(TINY), "dense", False).fused_ops == "torch"
    args = bench.parse_args([*TINY, "--fused_ops", "auto"])
    assert bench.model_config(args, "nsa", False).fused_ops == "auto"
    report = bench.main([*TINY, "--contexts", "64", "--modes", "dense", "--fused_ops", "auto",
                         "--out", str(tmp_path)])
    assert report["model"]["fused_ops"] == "auto" and report["args"]["fused_ops"] == "auto"
    assert "Fused ops (`fused_ops`): auto." in written(tmp_path, ".md").read_text()


def test_out_of_memory_retries_with_checkpointing(bench, monkeypatch):
    """A real OOM needs a GPU; here the first timing attempt raises one."""
    real = bench.time_training
    calls = []

    def oom_without_checkpointing(args, mode, context, checkpointing, device):
        calls.append(checkpointing)
        if not checkpointing:
            raise torch.OutOfMemoryError("simulated")
        return real(args, mode, context, checkpointing, device)

    monkeypatch.setattr(bench, "time_training", oom_without_checkpointing)
    args = bench.parse_args([*TINY, "--contexts", "128"])
    row = bench.run_row(args, "dense", 128, torch.device("cpu"), None)
    assert calls == [False, True] and row["status"] == "ok" and row["activation_checkpointing"]
    args = bench.parse_args([*TINY, "--activation_checkpointing", "off"])
    row = bench.run_row(args, "nsa", 128, torch.device("cpu"), None)
    assert row["status"] == "OOM"


@pytest.mark.parametrize("mode", ["dense", "nsa"])
def test_block_stack_is_the_models_forward(bench, mode):
    """What ``--cuda_graph`` captures (the blocks over a fixed batch layout) computes the model's
    hidden states: positions and NSA's compressed indices are those ``GPT.forward`` builds."""
    args = bench.parse_args([*TINY, "--contexts", "128", "--kernel_backend", "reference"])
    cfg = bench.model_config(args, mode, False)
    model = bench.build_model(cfg, mode, torch.device("cpu"))
    ids = torch.randint(0, cfg.vocab_size, (256,), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 128, 256], dtype=torch.int32)
    stack = bench.BlockStack(model, cu, 128)
    with torch.no_grad():
        torch.testing.assert_close(model.norm(stack(model.embed(ids))), model(ids, cu, 128),
                                   rtol=0, atol=0)


def test_cuda_graph_needs_cuda(bench, tmp_path):
    with pytest.raises(ValueError, match=r"--cuda_graph needs --device cuda") as info:
        bench.main([*TINY, "--contexts", "64", "--cuda_graph", "--out", str(tmp_path)])
    assert "\n" not in str(info.value)
    assert bench.parse_args([*TINY, "--cuda_graph"]).cuda_graph == "blocks"  # the flag alone


@pytest.mark.parametrize("flags,message", [
    (["--cuda_graph", "step", "--fused_ops", "auto"], "use --fused_ops torch"),
    (["--cuda_graph", "step", "--compile"], "does not combine with --compile"),
    (["--cuda_graph", "--activation_checkpointing", "on"], "use --activation_checkpointing off"),
])
def test_cuda_graph_flag_conflicts_are_one_line(bench, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message) as info:
        bench.main([*TINY, "--contexts", "64", *flags, "--out", str(tmp_path)])
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dense", "nsa"])
def test_gpu_whole_step_graph_trains_like_eager(bench, mode):
    """``--cuda_graph step``: the captured step (three eager warm-up steps, then replays) moves
    the weights as the same eager steps do, also after a new batch is copied into the graph's
    static inputs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    args = bench.parse_args(["--n_layer", "2", "--d_model", "256", "--head_dim", "64",
                             "--vocab", "512", "--contexts", "2048", "--fused_ops", "torch"])
    cfg = bench.model_config(args, mode, False)
    cuda = torch.device("cuda")
    eager, graphed = bench.build_model(cfg, mode, cuda), bench.build_model(cfg, mode, cuda)
    graphed.load_state_dict(eager.state_dict())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True, capturable=True)
                  for m in (eager, graphed)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    cu = torch.tensor([0, 700, 2048], dtype=torch.int32, device=cuda)
    tokens = torch.randint(0, cfg.vocab_size, (2049,), device=cuda,
                           generator=torch.Generator(cuda).manual_seed(0))
    ids, targets = tokens[:-1].clone(), tokens[1:].clone()

    def update(model, optimizer):
        with autocast:
            loss = model.loss(model(ids, cu, 1348), targets)
        loss.backward()
        optimizer.step()

    replay = bench.graph_step(lambda: update(graphed, optimizers[1]), optimizers[1])

    def eager_step():
        optimizers[0].zero_grad(set_to_none=True)
        update(eager, optimizers[0])

    for _ in range(3):  # graph_step's warm-up steps
        eager_step()
    for batch in range(3):
        if batch == 2:  # a new batch into the static inputs
            ids.copy_(torch.roll(ids, 5))
            targets.copy_(torch.roll(targets, 5))
        eager_step()
        replay()
    torch.cuda.synchronize()
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=2e-2, atol=2e-3, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dense", "nsa"])
def test_gpu_cuda_graph_step_matches_eager(bench, mode):
    """Blocks replayed from CUDA graphs give the eager loss and gradients, step after step
    (the graphs' static buffers are refilled each replay)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    args = bench.parse_args(["--n_layer", "2", "--d_model", "256", "--head_dim", "64",
                             "--vocab", "512", "--contexts", "2048"])
    cfg = bench.model_config(args, mode, False)
    cuda = torch.device("cuda")
    eager, graphed = bench.build_model(cfg, mode, cuda), bench.build_model(cfg, mode, cuda)
    graphed.load_state_dict(eager.state_dict())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    cu = torch.tensor([0, 700, 2048], dtype=torch.int32, device=cuda)
    loss_of = bench.graph_blocks(graphed, torch.zeros(2048, dtype=torch.long, device=cuda), cu,
                                 1348, autocast)
    for seed in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (2049,), device=cuda,
                               generator=torch.Generator(cuda).manual_seed(seed))
        ids, targets = tokens[:-1], tokens[1:]
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
        with autocast:
            expected = eager.loss(eager(ids, cu, 1348), targets)
            got = loss_of(ids, targets)
        expected.backward()
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
        for (name, p), q in zip(eager.named_parameters(), graphed.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=2e-2, atol=2e-3, msg=name)


def test_sub_layer_checkpointing_rows(bench, tmp_path):
    """``--activation_checkpointing attention`` runs the model with that sub-layer recomputed
    and names it in the row and the table."""
    report = bench.main([*TINY, "--contexts", "64", "--modes", "nsa", "--kernel_backend",
                         "reference", "--activation_checkpointing", "attention",
                         "--out", str(tmp_path)])
    (row,) = report["rows"]
    assert row["status"] == "ok" and row["activation_checkpointing"] == "attention"
    assert "| attention |" in written(tmp_path, ".md").read_text()
