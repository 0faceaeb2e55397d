"""Benchmark scripts run end to end in their CPU smoke mode and write their tables."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_nsa_core_benchmark_smoke(tmp_path):
    command = [sys.executable, "benchmarks/bench_nsa.py", "--device", "cpu", "--tokens", "256",
               "--groups", "2", "--head_dim", "32", "--kv_heads", "1", "--tiny_nsa",
               "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "nsa_core.json").read_text())["rows"]
    methods = {row["method"] for row in rows}
    expected = {"nsa core", "nsa core, per layer (shared varlen)", "branch: selected_attention",
                "dense: ours (window_attention None)"}
    assert expected <= methods
    assert all(row["fwd_ms"] > 0 for row in rows)
    assert "| nsa core |" in (tmp_path / "nsa_core.md").read_text()


TINY_PARITY_MODEL = """\
model:
  config:
    n_layer: 1
    n_head: 2
    n_kv_head: 1
    d_model: 32
    loss_chunk: 64
    attention: nsa
    nsa: {cmp_kernel: 8, cmp_stride: 4, sel_block: 16, sel_topk: 3, init_blocks: 1,
          local_blocks: 2, window: 16}
  learning_rate: 3.0e-3
"""


def test_loss_parity_end_to_end_through_the_device_command(small_corpus, tmp_path):
    """The parity experiment end to end on the CPU, driven by `loss_parity_device.sh advance`
    (the one command of every device call): two real `fsa-train fit` runs on one dataset, then
    position loss, passkey and selection overlap on their exports, then the report in $OUT;
    a second call trains nothing again."""
    python = Path(sys.executable)
    env = dict(os.environ, WANDB_MODE="disabled")
    tok, data, runs, out = (tmp_path / name for name in ("tok", "data", "runs", "out"))
    for words in (["train-tokenizer", str(small_corpus), "--output", str(tok), "--vocab_size",
                   "320"],
                  ["prepare-data", str(small_corpus), "--tokenizer", f"{tok}.model", "--output",
                   str(data), "--val_documents", "2"]):
        subprocess.run([str(python), "-m", "fsa_train.cli", *words], cwd=ROOT, check=True,
                       capture_output=True, env=dict(env, PYTHONPATH=str(ROOT)))
    model = tmp_path / "tiny.yaml"
    model.write_text(TINY_PARITY_MODEL)
    env.update(PY=str(python), OUT=str(out), DATA=str(data), RUNS=str(runs),
               MODEL_CONFIG=str(model), VOCAB="320", PRECISION="32-true", VAL_BATCHES="1",
               SEQ_LEN="64", BATCH="2", STEPS="4", VAL_EVERY="2", PASSKEY_LENGTHS="256",
               BUDGET="400")

    def device_step(*words: str) -> str:
        result = subprocess.run(["bash", "benchmarks/loss_parity_device.sh", *words],
                                cwd=ROOT, capture_output=True, text=True, timeout=500, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout

    printed = device_step("advance")
    assert "run dense 0 rc=0" in printed and "run nsa 0 rc=0" in printed
    assert "finish rc=0" in printed
    report = (out / "loss_parity.md").read_text()
    assert "| dense-s0 |" in report and "NSA − dense" in report
    assert "Block selections of nsa-s0" in report
    for mode in ("dense", "nsa"):
        assert f"attention: {mode}" in (runs / f"{mode}-s0" / "run.yaml").read_text()
    summary = json.loads((out / "loss_parity.json").read_text())
    dense, nsa = summary["runs"]["dense-s0"], summary["runs"]["nsa-s0"]
    assert [v["step"] for v in dense["val"]] == [2, 4] == [v["step"] for v in nsa["val"]]
    assert dense["tokens"] == nsa["tokens"] == 4 * 2 * 64
    assert dense["position_loss"]["buckets"] and nsa["passkey"]["cells"]
    assert nsa["selection_overlap"]["layers"] and dense["selection_overlap"] is None
    pair = summary["pairs"][0]
    assert pair["nsa_minus_dense"] == nsa["final_val_loss"] - dense["final_val_loss"]
    # each job's device and versions, and the parameter counts from the saved configs
    assert [job["torch"] for job in dense["jobs"]] == [torch.__version__]
    assert nsa["setup"]["parameters"] > dense["setup"]["parameters"] > 0
    assert dense["setup"]["seq_len"] == 64 and nsa["setup"]["attention"] == "nsa"
    assert 0 < dense["steady_time_s"] <= dense["train_time_s"]
    assert (out / "runs_jsonl.tgz").stat().st_size > 0
    # a finished run is not trained again
    for mode in ("dense", "nsa"):
        assert "finished, skipped" in device_step("run", mode, "0")


def test_loss_parity_summary_interpolates_time_to_reach_and_drops_repeated_steps(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import loss_parity
    finally:
        sys.path.pop(0)
    for mode, losses, seconds in (("dense", [3.0, 2.5, 2.0], 10.0), ("nsa", [2.9, 2.3, 1.9], 5.0)):
        rows = [{"step": 100 * (i + 1), "train_time_s": seconds * (i + 1),
                 "tokens_seen": 1000 * (i + 1), "val/loss": loss} for i, loss in enumerate(losses)]
        rows.insert(2, dict(rows[1]))  # step 200 again, as after a resume
        (tmp_path / f"{mode}-s0").mkdir()
        (tmp_path / f"{mode}-s0" / "val.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows))
    summary = loss_parity.summarize(tmp_path)
    assert [row["step"] for row in summary["runs"]["nsa-s0"]["val"]] == [100, 200, 300]
    pair = summary["pairs"][0]
    # NSA crosses dense's final 2.0 between 2.3 at 10 s and 1.9 at 15 s: at 13.75 s
    assert abs(pair["nsa_time_to_dense_final_s"] - 13.75) < 1e-9
    assert abs(pair["speedup_to_dense_final"] - 30.0 / 13.75) < 1e-9
    assert abs(pair["nsa_minus_dense"] + 0.1) < 1e-9
    assert summary["modes"]["dense"] == {"seeds": 1, "mean": 2.0, "spread": 0.0}


def test_loss_parity_one_off_time_is_the_excess_of_slow_steps():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import loss_parity
    finally:
        sys.path.pop(0)
    # steps of 1 s, except step 1 (autotuning: 31 s) and step 6 (after a resume: 5 s)
    durations = [31.0, 1.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0]
    times, clock = [], 0.0
    for step, seconds in enumerate(durations, start=1):
        clock += seconds
        times.append({"step": step, "train_time_s": clock})
    one_off = loss_parity.one_off_seconds(times)
    assert one_off[1] == one_off[5] == 30.0
    assert one_off[6] == one_off[8] == 34.0
    assert loss_parity._one_off_at(one_off, 7) == 34.0 and loss_parity._one_off_at(one_off, 0) == 0


def test_bench_selected_coherent_selection_repeats_each_span_start():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_selected
    finally:
        sys.path.pop(0)
    idx = torch.arange(2 * 20 * 2, dtype=torch.int32).view(2, 20, 2)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    out = bench_selected.coherent_selection(idx, cu, 4, 8)
    # spans of 4 start at 0 and 4 in the first document, at 7, 11, 15, 19 in the second
    starts = [0] * 4 + [4] * 3 + [7] * 4 + [11] * 4 + [15] * 4 + [19]
    assert torch.equal(out, idx[:, starts])
    with pytest.raises(SystemExit, match="must divide the block"):
        bench_selected.coherent_selection(idx, cu, 3, 8)


@pytest.mark.parametrize("script,result", [
    ("sweep_topk", "topk_sweep_2026-12-02"),
    ("sweep_partials", "partials_sweep_2026-12-02"),
])
def test_sweep_tables_are_rendered_from_their_committed_json(script, result):
    """The committed Markdown tables of the GPU sweeps are what the scripts make of the committed
    JSON (no hand-edited figures)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        module = __import__(script)
    finally:
        sys.path.pop(0)
    results = ROOT / "benchmarks" / "results"
    data = json.loads((results / f"{result}.json").read_text())
    assert module.markdown(data) == (results / f"{result}.md").read_text()
