"""The benchmark runner (``python -m benchmarks``): its registry, the result files' names, the
committed tables rendered from their committed JSON, and the benchmarks' CPU smoke modes."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import benchmarks  # noqa: E402
from benchmarks import common  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
GPU_BENCHMARKS = ["block_selection", "compressed", "fused_ops", "memory", "nsa", "profile_nsa",
                  "selected", "throughput", "window"]


def runner(*words: str, env: dict | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "benchmarks", *words], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env or ENV)


# ------------------------------------------------------------------------- runner and registry


def test_list_names_every_benchmark_module():
    result = runner("list")
    assert result.returncode == 0, result.stderr[-2000:]
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == benchmarks.module_names() == sorted(benchmarks.load_all())
    assert {"block_selection", "selected", "compressed", "window", "nsa", "throughput",
            "kernel_resources", "loss_parity", "selection_overlap", "profile_nsa",
            "trainer_check", "parity_corpus", "memory", "memory_model", "fused_ops"} == set(listed)
    for name, bench in benchmarks.load_all().items():
        assert bench.name == name and bench.summary and bench.main.__module__ == \
            f"benchmarks.{name}"


def test_every_benchmark_parses_its_flags():
    for name, bench in benchmarks.load_all().items():
        parser = bench.parser()
        assert parser.prog == f"python -m benchmarks run {name}"
        assert ("--tag" in parser.format_help()) == bench.record, name
    args = benchmarks.get("selected").parser().parse_args(
        ["--tokens", "16384", "--groups", "4", "--configs", "64:16", "--sweep-partials",
         "--tag", "x1"])
    assert args.tokens == [16384] and args.sweep_partials and args.tag == "x1"
    with pytest.raises(SystemExit):
        benchmarks.get("nsa").parser().parse_args(["--tag", "Not A Tag"])


def test_unknown_benchmark_and_usage():
    result = runner("run", "nope")
    assert result.returncode == 2 and "no benchmark 'nope'" in result.stderr
    assert runner().returncode == 2
    help_ = runner("run", "window", "--help")
    assert help_.returncode == 0 and "--atomic-groups" in help_.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
@pytest.mark.parametrize("name", GPU_BENCHMARKS)
def test_gpu_benchmarks_stop_with_one_line_without_cuda(name, tmp_path):
    result = runner("run", name, "--out", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"{name}: error: needs a CUDA GPU " \
        "(torch.cuda.is_available() is False)"
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------- the writer


def test_record_names_follow_the_rule(tmp_path, monkeypatch):
    meta = {"device": "NVIDIA H200", "date": "2026-12-02 02:29 UTC"}
    record = common.Record("nsa", meta, tmp_path, "half_partials")
    assert record.stem == "nsa_h200_2026-12-02_half_partials"
    record.write({"meta": meta}, "# table\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "nsa_h200_2026-12-02_half_partials.json", "nsa_h200_2026-12-02_half_partials.md"]
    assert common.Record("kernel_resources", {"date": "2026-12-02"}, tmp_path,
                         device="sm90").stem == "kernel_resources_sm90_2026-12-02"
    with pytest.raises(ValueError, match="not a result name"):
        common.record_name("nsa", "h200", "2026-12-02", "Bad Tag")
    assert common.device_slug("NVIDIA H200") == "h200"
    assert common.device_slug("NVIDIA H200 (132 SMs)") == "h200"
    assert common.device_slug("NVIDIA H200", 2) == "h200x2"
    assert common.device_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert common.device_slug("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert common.run_meta("cpu")["device_slug"] == "cpu"
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert benchmarks.get("window").parser().parse_args([]).out == str(tmp_path / "out")
    monkeypatch.delenv("OUT")
    assert benchmarks.get("window").parser().parse_args([]).out == str(RESULTS)


def result_files() -> list[str]:
    return sorted(p.name for p in RESULTS.iterdir() if p.name != "README.md")


def test_committed_results_follow_the_naming_rule():
    """One name per run: ``<benchmark>_<device>_<date>[_<tag>]``, with a registered benchmark
    (or the GPU test logs), a date that is the run's own (its JSON's ``date``)."""
    known = set(benchmarks.module_names()) | {"gpu_tests"}
    for name in result_files():
        path = RESULTS / name
        stem = name if path.is_dir() else name.split(".", 1)[0]
        match = common.NAME.match(stem)
        assert match, name
        assert match["benchmark"] in known, name
        if path.is_dir():
            assert match["benchmark"] == "loss_parity", name
        elif name.endswith(".log"):
            assert match["benchmark"] in ("gpu_tests", "selected"), name
        elif name.endswith(".json"):
            data = json.loads(path.read_text())
            meta = data.get("meta") or data.get("environment") or data
            if "date" in meta:
                assert meta["date"][:10] == match["date"], name


def test_results_index_lists_every_file_once():
    index = (RESULTS / "README.md").read_text()
    listed = re.findall(r"^\| `([^`]+)` \|", index, flags=re.M)
    expanded = []
    for entry in listed:
        group = re.match(r"^(.*)\.\{([a-z,]+)\}$", entry)
        expanded += [f"{group[1]}.{ext}" for ext in group[2].split(",")] if group else [
            entry.rstrip("/")]
    assert sorted(expanded) == result_files()
    for line in index.splitlines():
        if line.startswith("| `"):
            cited = line.split(" | ")[5]
            assert cited.strip() not in ("", "—"), line


# -------------------------------------------------------- committed tables from committed JSON

RENDERED = [
    ("block_selection", "markdown", "block_selection_h200_2026-12-02"),
    ("block_selection", "markdown", "block_selection_h200_2026-12-02_pair"),
    ("compressed", "markdown", "compressed_h200_2026-11-22"),
    ("compressed", "topk_markdown", "compressed_h200_2026-12-02_topk_sweep"),
    ("selected", "partials_markdown", "selected_h200_2026-12-02_partials_sweep"),
    ("selected", "markdown", "selected_h200_2026-11-22"),
    ("selected", "markdown", "selected_h200_2026-11-22_modes"),
    ("selected", "markdown", "selected_h200_2026-12-02"),
    ("window", "markdown", "window_h200_2026-11-22"),
    ("window", "markdown", "window_h200_2026-11-22_split_bwd"),
    ("window", "markdown", "window_h200_2026-12-02"),
    ("window", "markdown", "window_h200_2026-12-03"),
    ("nsa", "markdown", "nsa_h200_2026-12-02"),
    ("nsa", "markdown", "nsa_h200_2026-12-02_32k"),
    ("nsa", "markdown", "nsa_h200_2026-12-02_64k_g16"),
    ("nsa", "markdown", "nsa_h200_2026-12-02_half_partials"),
    ("nsa", "markdown", "nsa_h200_2026-12-02_per_layer"),
    ("nsa", "markdown", "nsa_h200_2026-12-02_sort"),
    ("nsa", "markdown", "nsa_h200_2026-12-02_block_selection"),
    ("throughput", "markdown", "throughput_h200_2026-12-02"),
    ("throughput", "markdown", "throughput_h200_2026-12-02_block_selection"),
    ("throughput", "markdown", "throughput_h200_2026-12-02_pair"),
    ("throughput", "markdown", "throughput_h200_2026-12-02_block_selection_350m"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_cudnn_window"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_cudnn_window_long"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_cudnn_window_copies"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_gated_projection"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_fused_auto"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_fused_liger"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_compile"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_one_seq"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_one_seq_compile"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_compile_fused_auto"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_compile_fused_auto_32k"),
    ("throughput", "markdown", "throughput_h200_2026-12-03_compile_fused_auto_64k"),
    ("fused_ops", "markdown", "fused_ops_h200_2026-12-03"),
    ("compressed", "markdown", "compressed_h200_2026-12-03"),
    ("memory", "markdown", "memory_h200_2026-12-03"),
    ("loss_parity", "markdown", "loss_parity_h200_2026-12-01"),
    ("loss_parity", "markdown", "loss_parity_h200_2026-12-02"),
    ("loss_parity", "markdown", "loss_parity_h200_2026-12-02_block_selection"),
    ("loss_parity", "markdown", "loss_parity_h200_2026-12-02_block_selection_32k"),
    ("loss_parity", "markdown", "loss_parity_h200_2026-12-03_seed1"),
    ("loss_parity", "markdown", "loss_parity_h200_2026-12-04_8k_two_seeds"),
    ("throughput", "markdown", "throughput_h200_2026-12-04_first_step_cold"),
    ("throughput", "markdown", "throughput_h200_2026-12-04_first_step_cached"),
    ("throughput", "markdown", "throughput_h200_2026-12-04_first_step_350m_cold"),
    ("throughput", "markdown", "throughput_h200_2026-12-04_first_step_350m_cached"),
    ("throughput", "markdown", "throughput_h200_2026-12-04_one_seq_cuda_graph_16k"),
    ("loss_parity", "markdown", "loss_parity_h200_2026-12-04_block_s0_rerun"),
    ("loss_parity", "markdown", "loss_parity_h200_2026-12-04_8k_two_seeds_current"),
    ("selected", "markdown", "selected_h200_2026-12-04_forced_split"),
    ("memory", "markdown", "memory_cpu_2026-12-04_sparse_branches_interpreter"),
    ("trainer_check", "markdown", "trainer_check_h200x2_2026-11-22"),
]
"""The committed tables the current code writes (older runs' tables have older layouts)."""


@pytest.mark.parametrize("benchmark,function,result", RENDERED)
def test_committed_tables_are_rendered_from_their_committed_json(benchmark, function, result):
    """The committed Markdown tables are what the benchmarks make of the committed JSON (no
    hand-edited figures)."""
    module = __import__(f"benchmarks.{benchmark}", fromlist=[function])
    data = json.loads((RESULTS / f"{result}.json").read_text())
    if benchmark == "selected" and function == "markdown":
        table = module.markdown(data["meta"], data["results"])
    elif benchmark == "loss_parity":
        table = module.markdown(data, "Loss parity: NSA vs dense attention")
    else:
        table = getattr(module, function)(data)
    assert table == (RESULTS / f"{result}.md").read_text()


# ------------------------------------------------------------------------- CPU smoke modes


def test_nsa_core_benchmark_smoke(tmp_path):
    result = runner("run", "nsa", "--device", "cpu", "--tokens", "256", "--groups", "2",
                    "--head_dim", "32", "--kv_heads", "1", "--tiny_nsa", "--out", str(tmp_path),
                    "--tag", "smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    (json_file,) = tmp_path.glob("*.json")
    assert common.NAME.match(json_file.stem)["device"] == "cpu"
    assert json_file.stem.startswith("nsa_cpu_") and json_file.stem.endswith("_smoke")
    rows = json.loads(json_file.read_text())["rows"]
    methods = {row["method"] for row in rows}
    expected = {"nsa core", "nsa core, per layer (shared varlen)", "branch: selected_attention",
                "dense: ours (window_attention None)"}
    assert expected <= methods
    assert all(row["fwd_ms"] > 0 for row in rows)
    assert "| nsa core |" in json_file.with_suffix(".md").read_text()


def test_fused_ops_benchmark_smoke(tmp_path):
    """On the CPU our rows run, against themselves; liger's and the compiled rows are listed
    as not run, with the reason, instead of stopping the run."""
    result = runner("run", "fused_ops", "--device", "cpu", "--tokens", "64", "--d_model", "32",
                    "--vocab", "128", "--out", str(tmp_path), "--tag", "smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    (json_file,) = tmp_path.glob("fused_ops_cpu_*_smoke.json")
    report = json.loads(json_file.read_text())
    rows = {(row["op"], row["method"]): row for row in report["rows"]}
    assert set(rows) == {(op, method) for op in ("rmsnorm", "swiglu", "loss")
                         for method in ("ours", "liger", "compiled")}
    for op in ("rmsnorm", "swiglu", "loss"):
        assert rows[op, "ours"]["status"] == "ok" and rows[op, "ours"]["fwd_bwd_ms"] > 0
        assert rows[op, "ours"]["speedup"] == 1.0
        assert rows[op, "liger"]["status"] == "skipped: liger-kernel runs on CUDA only"
        assert rows[op, "compiled"]["status"].startswith("skipped: the torch.compile rows")
    assert report["settings"]["ffn_hidden"] == 128 and "liger" in report["meta"]
    table = json_file.with_suffix(".md").read_text()
    assert "| loss | 64 | ours (chunked CE) |" in table
    assert "- swiglu 64 liger SiLU-mul in our Linears: skipped: liger-kernel runs on CUDA only" \
        in table


def test_fused_ops_ratios_are_against_ours_and_skip_rows_that_did_not_run():
    from benchmarks.fused_ops import with_ratios

    rows = with_ratios([
        {"op": "loss", "method": "ours", "tokens": 8, "status": "ok", "fwd_bwd_ms": 4.0,
         "peak_mib": 100.0},
        {"op": "loss", "method": "liger", "tokens": 8, "status": "ok", "fwd_bwd_ms": 2.0,
         "peak_mib": 50.0},
        {"op": "loss", "method": "compiled", "tokens": 8, "status": "OOM"},
        {"op": "loss", "method": "liger", "tokens": 16, "status": "ok", "fwd_bwd_ms": 1.0,
         "peak_mib": 5.0},
    ])
    assert [(r["speedup"], r["peak_ratio"]) for r in rows] == [
        (1.0, 1.0), (2.0, 0.5), (None, None), (None, None)]


def test_memory_counts_each_saved_storage_once_and_leaves_parameters_out():
    from benchmarks.memory import BLOCK_INPUT, saved_bytes

    linear = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(16, 8, requires_grad=True)
    hidden = linear(x)  # mm saves x (the block input) and the weight (a parameter)
    out = hidden * hidden  # mul saves hidden once, though it is both operands
    by_node = saved_bytes(out, x, list(linear.parameters()))
    assert by_node == {BLOCK_INPUT: 16 * 8 * 4, "MulBackward0": 16 * 4 * 4}


def test_memory_walk_finds_what_autograd_saves():
    """The graph walk against an independent count: every tensor autograd packs for the
    backward of a block's norm and SwiGLU under autocast (saved-tensor hooks), each storage
    once. (Python wrappers of autograd nodes are made on access: a walk that remembers them by
    id() alone lost a third of these, as a freed wrapper's id came back for another node.)"""
    import argparse

    from benchmarks import memory

    parser = argparse.ArgumentParser()
    memory.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--d_model", "96", "--head_dim", "32"])
    block = memory.build_block(args, "dense", torch.device("cpu"))
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    x = torch.randn(200, 96, requires_grad=True)
    with memory.PackedStorages() as storages, torch.autocast("cpu", dtype=torch.bfloat16):
        out = x
        for _ in range(4):
            out = out + block.mlp(block.mlp_norm(out))
    packed = {ptr: n for ptr, n in storages.pointers.items() if ptr not in params}
    assert len(packed) > 20
    found = memory.saved_bytes(out, x, list(block.parameters()), storages)
    assert sum(found.values()) == sum(packed.values())
    assert found["block input"] == 200 * 96 * 4


def test_memory_benchmark_smoke(tmp_path):
    result = runner("run", "memory", "--device", "cpu", "--context", "128", "--d_model", "128",
                    "--head_dim", "32", "--modes", "dense", "nsa", "--checkpointing", "none",
                    "attention", "block", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (json_file,) = tmp_path.glob("memory_cpu_*.json")
    rows = {(row["mode"], row["checkpointing"]): row
            for row in json.loads(json_file.read_text())["rows"]}
    saved = {key: row["saved_per_token"] for key, row in rows.items()}
    # the block input (fp32, d_model 128) is kept by both; NSA keeps more than dense
    for key, row in rows.items():
        assert row["saved_by_node"]["block input"] == 128 * 128 * 4, key
    assert saved["nsa", "none"] > saved["dense", "none"] > 0
    # checkpointing: the attention keeps less than nothing recomputed and more than the whole
    # block; with its attention recomputed, an NSA block keeps what a dense one keeps
    for mode in ("dense", "nsa"):
        assert saved[mode, "none"] > saved[mode, "attention"] > saved[mode, "block"], mode
        assert saved[mode, "block"] < 128 * 4 + 16  # its input, the positions and cu_seqlens
    assert saved["nsa", "attention"] == saved["dense", "attention"]
    table = json_file.with_suffix(".md").read_text()
    assert "| block input |" in table and "| nsa, attention ckpt |" in table


def test_memory_walk_tells_weight_copies_from_activations_of_the_same_shape():
    """Autocast's bf16 copy of a square weight is a weight cast; the bf16 activation of the same
    shape that the matmul also keeps (tokens = d_model) is not."""
    from benchmarks.memory import WEIGHT_CASTS, saved_bytes

    linear = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(64, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(torch.sigmoid(x).to(torch.bfloat16))
    by_node = saved_bytes(out, x, list(linear.parameters()))
    assert by_node[WEIGHT_CASTS] == 64 * 64 * 2
    assert sum(by_node.values()) - by_node[WEIGHT_CASTS] >= 64 * 64 * 2  # the activation


def test_nsa_layouts():
    from benchmarks.nsa import shape_layouts

    assert shape_layouts(16384, ["one", "packed"]) == [None, 4096]
    assert shape_layouts(16384, ["one"]) == [None]
    assert shape_layouts(4096, ["one", "packed"]) == [None]


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
    """The parity experiment end to end on the CPU, driven by `device.sh loss-parity advance`
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
               SEQ_LEN="128", BATCH="2", STEPS="4", VAL_EVERY="2", PASSKEY_LENGTHS="256",
               BUDGET="400", MODES="dense nsa", RETRIEVAL="0.5",
               RETRIEVAL_KEYS="1", RETRIEVAL_LENGTHS="160", SHORT_CONTEXT="16",
               KEY_REFERENCE="dense")

    def device_step(*words: str) -> str:
        result = subprocess.run(["bash", "benchmarks/device.sh", "loss-parity", *words],
                                cwd=ROOT, capture_output=True, text=True, timeout=500, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout

    printed = device_step("advance")
    assert "run dense 0 rc=0" in printed and "run nsa 0 rc=0" in printed
    assert "finish rc=0" in printed
    (report_file,) = out.glob("loss_parity_*.md")
    assert common.NAME.match(report_file.stem)["device"] == "cpu"
    report = report_file.read_text()
    assert "| dense-s0 |" in report and "NSA − dense" in report
    assert "Block selections of nsa-s0" in report
    assert "Multi-key retrieval" in report and "Key tokens" in report
    assert "retrieval_fraction: 0.5" in (runs / "nsa-s0" / "run.yaml").read_text()
    for mode in ("dense", "nsa"):
        assert f"attention: {mode}" in (runs / f"{mode}-s0" / "run.yaml").read_text()
    summary = json.loads(report_file.with_suffix(".json").read_text())
    dense, nsa = summary["runs"]["dense-s0"], summary["runs"]["nsa-s0"]
    assert [v["step"] for v in dense["val"]] == [2, 4] == [v["step"] for v in nsa["val"]]
    assert dense["tokens"] == nsa["tokens"] == 4 * 2 * 128
    assert dense["position_loss"]["buckets"] and nsa["passkey"]["cells"]
    assert nsa["retrieval"]["keys"] == 1 and nsa["retrieval"]["cells"]
    # the reference run (dense) is evaluated first and writes its key tokens; the others read
    # them, and the file travels with the run records
    assert nsa["position_loss"]["key_tokens"]["chosen_by"] == "file"
    assert dense["position_loss"]["key_tokens"]["chosen_by"] == "itself"
    assert nsa["position_loss"]["key_tokens"]["tokens"] <= nsa["position_loss"]["tokens"]
    assert (runs / "dense-s0" / "key_tokens.npz").is_file()
    assert nsa["selection_overlap"]["layers"] and dense["selection_overlap"] is None
    pair = summary["pairs"][0]
    assert pair["nsa_minus_dense"] == nsa["final_val_loss"] - dense["final_val_loss"]
    # each job's device and versions, and the parameter counts from the saved configs
    assert [job["torch"] for job in dense["jobs"]] == [torch.__version__]
    assert nsa["setup"]["parameters"] > dense["setup"]["parameters"] > 0
    assert dense["setup"]["seq_len"] == 128 and nsa["setup"]["attention"] == "nsa"
    assert 0 < dense["steady_time_s"] <= dense["train_time_s"]
    assert (out / "runs_jsonl.tgz").stat().st_size > 0
    with tarfile.open(out / "runs_jsonl.tgz") as records:
        assert any(name.endswith("dense-s0/key_tokens.npz") for name in records.getnames())
    # a finished run is not trained again
    for mode in ("dense", "nsa"):
        assert "finished, skipped" in device_step("run", mode, "0")


def test_device_script_lists_its_subcommands():
    result = subprocess.run(["bash", "benchmarks/device.sh"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    for command in ("wheels", "split-wheels", "join-wheels", "gpu-tests", "bench NAME",
                    "loss-parity", "trainer-check"):
        assert f"device.sh {command}" in result.stdout, command


def test_loss_parity_summary_interpolates_time_to_reach_and_drops_repeated_steps(tmp_path):
    from benchmarks import loss_parity

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
    # the report's name: this machine when no job was recorded, else the jobs' device and day
    assert loss_parity.report_meta(summary)["device_slug"] == "cpu"
    summary["runs"]["nsa-s0"]["jobs"] = [
        {"started": "2026-12-01T23:50:00+00:00", "device": "NVIDIA H200"},
        {"started": "2026-12-02T00:10:00+00:00", "device": "NVIDIA H200"}]
    meta = loss_parity.report_meta(summary)
    assert common.Record("loss_parity", meta, tmp_path).stem == "loss_parity_h200_2026-12-02"


def test_loss_parity_one_off_time_is_the_excess_of_slow_steps():
    from benchmarks import loss_parity

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


def test_selected_coherent_selection_repeats_each_span_start():
    from benchmarks import selected

    idx = torch.arange(2 * 20 * 2, dtype=torch.int32).view(2, 20, 2)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    out = selected.coherent_selection(idx, cu, 4, 8)
    # spans of 4 start at 0 and 4 in the first document, at 7, 11, 15, 19 in the second
    starts = [0] * 4 + [4] * 3 + [7] * 4 + [11] * 4 + [15] * 4 + [19]
    assert torch.equal(out, idx[:, starts])
    with pytest.raises(SystemExit, match="must divide the block"):
        selected.coherent_selection(idx, cu, 3, 8)


def test_selected_tune_passes_launch_configs_as_settings():
    from benchmarks import selected

    assert selected.launch_config((64, 4, 2, 1)) == {"BLOCK_M": 64, "num_warps": 4,
                                                     "num_stages": 2, "PREFETCH": True}
    fwd = selected.tune_settings("fwd", (128, 8, 3))
    bwd = selected.tune_settings("bwd", (64, 8, 2))
    assert fwd.selected_fwd_config["BLOCK_M"] == 128 and fwd.selected_bwd_config is None
    assert bwd.selected_bwd_config["num_warps"] == 8 and bwd.selected_fwd_config is None


def test_gpu_tests_write_their_log_to_out(tmp_path):
    """`device.sh gpu-tests` runs `pytest -m gpu` over the given paths and keeps the log in
    $OUT/gpu_tests.log (here no test is marked gpu, and there is no nvidia-smi)."""
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable, WORKERS="1")
    subprocess.run(["bash", "benchmarks/device.sh", "gpu-tests", "tests/test_flops.py"],
                   cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    log = (tmp_path / "gpu_tests.log").read_text()
    assert re.search(r"deselected|no tests ran", log), log[-1000:]


def test_the_kernel_entry_points_the_benchmarks_call():
    """What the GPU benchmarks call, checked on the CPU: the Triton entry points take
    ``settings=``, and the settings the benchmarks vary are fields of KernelSettings."""
    import dataclasses
    import importlib
    import inspect

    from fsa_train.kernels.settings import default_settings

    for op in ("compressed_attention", "select_blocks", "selected_attention",
               "window_attention"):
        module = importlib.import_module(f"fsa_train.kernels.ops.{op}.triton")
        assert "settings" in inspect.signature(getattr(module, op)).parameters, op
    assert "fwd_mode" not in inspect.signature(importlib.import_module(
        "fsa_train.kernels.ops.selected_attention.triton").selected_attention).parameters
    base = default_settings()
    for changes in ({"topk_merge": "sort", "topk_tile_blocks": 32}, {"topk_configs": "tuned"},
                    {"window_bwd": "split"}, {"window_bwd": "atomic"}):
        assert dataclasses.asdict(dataclasses.replace(base, **changes)).items() >= \
            changes.items()
    from benchmarks import compressed, window

    assert isinstance(compressed.tuner_choices(), dict)
    assert isinstance(window.tuner_choices(), dict)


def write_parity_run(where: Path, losses: list[float], every: int = 100,
                     max_steps: int | None = None) -> None:
    """A run directory of ``loss_parity``: a validation every ``every`` steps (5 s apart) with
    these losses and, given ``max_steps``, the committed 8K config set to train that long."""
    where.mkdir()
    rows = [{"step": every * (i + 1), "train_time_s": 5.0 * (i + 1),
             "tokens_seen": 1000 * (i + 1), "val/loss": loss} for i, loss in enumerate(losses)]
    (where / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if max_steps is not None:
        import yaml

        config = yaml.safe_load((RESULTS / "loss_parity_h200_2026-12-01/nsa-s0/config.yaml")
                                .read_text())
        config["trainer"]["max_steps"] = max_steps
        (where / "config.yaml").write_text(yaml.safe_dump(config))


def test_loss_parity_block_mode_is_a_third_run_compared_with_dense(tmp_path):
    """``nsa_block`` (NSA with ``nsa.selection: block``) trains with the mode's options and is
    paired with dense per seed; the report then names the mode of every pair."""
    from benchmarks import loss_parity

    assert loss_parity.MODE_OPTIONS["nsa_block"][-2:] == ["--model.config.nsa.selection", "block"]
    for mode, final in (("dense", 2.0), ("nsa", 1.9), ("nsa_block", 1.95)):
        write_parity_run(tmp_path / f"{mode}-s0", [3.0, final])
    summary = loss_parity.summarize(tmp_path)
    pairs = {p["mode"]: p for p in summary["pairs"]}
    assert set(pairs) == {"nsa", "nsa_block"}
    assert abs(pairs["nsa_block"]["nsa_minus_dense"] + 0.05) < 1e-9
    assert summary["modes"]["nsa_block"]["mean"] == 1.95
    table = loss_parity.markdown(summary, "t")
    assert "| mode | seed | NSA − dense (nats)" in table and "| nsa_block | 0 | -0.0500 |" in table
    assert summary["block_vs_token"] == [
        {"seed": 0, "at_step": 200, "block_val_loss": 1.95, "token_val_loss": 1.9,
         "block_minus_token": pytest.approx(0.05)}]
    assert "| 0 | 200 | 1.9500 | 1.9000 | +0.0500 |" in table


def test_loss_parity_stopped_runs_are_labelled_and_compared_where_they_stopped(tmp_path):
    """A run whose last validation is short of its config's max_steps is listed as stopped,
    stays out of the mode means and the NSA − dense pairs, and is compared with NSA token at
    the step it reached; the finished seed is compared at that step too."""
    from benchmarks import loss_parity

    for name, losses in (("dense-s0", [3.5, 3.2]), ("nsa-s0", [3.4, 3.0]),
                         ("nsa_block-s0", [3.52, 3.1]), ("dense-s1", [3.55]),
                         ("nsa-s1", [3.45, 3.05]), ("nsa_block-s1", [3.6])):
        write_parity_run(tmp_path / name, losses, every=800, max_steps=1600)
    summary = loss_parity.summarize(tmp_path)
    runs = summary["runs"]
    assert [n for n, r in runs.items() if not r["finished"]] == ["dense-s1", "nsa_block-s1"]
    assert runs["nsa_block-s1"]["max_steps"] == 1600
    assert summary["modes"]["nsa_block"] == {"seeds": 1, "mean": 3.1, "spread": 0.0}
    assert summary["modes"]["dense"]["seeds"] == 1
    assert summary["modes"]["nsa"] == {"seeds": 2, "mean": pytest.approx(3.025),
                                       "spread": pytest.approx(0.05)}
    assert {(p["seed"], p["mode"]) for p in summary["pairs"]} == {(0, "nsa"), (0, "nsa_block")}
    compared = [(r["seed"], r["at_step"], round(r["block_minus_token"], 6))
                for r in summary["block_vs_token"]]
    assert compared == [(0, 800, 0.12), (0, 1600, 0.1), (1, 800, 0.15)]
    table = loss_parity.markdown(summary, "t")
    assert "| nsa_block-s1 | 1,000 | 3.6000 (stopped at step 800 of 1600) |" in table
    assert "unfinished: dense-s1 (stopped at step 800 of 1600), nsa_block-s1 (stopped" in table
    assert "| 1 | 800 | 3.6000 | 3.4500 | +0.1500 |" in table
    # a run without a saved config is taken as finished at its last validation
    assert loss_parity.max_steps(tmp_path / "missing") is None


def test_loss_parity_window_ablation_is_dense_with_a_window():
    import argparse

    from benchmarks import loss_parity

    parser = argparse.ArgumentParser()
    loss_parity.add_arguments(parser)
    args = parser.parse_args(["run", "--dataset", "d", "--out", "o", "--ablation_window", "256",
                              "--retrieval_fraction", "0.02"])
    options = loss_parity.mode_options(args, "dense_window")
    assert options == ["--model.config.attention", "dense", "--model.config.window", "256"]
    config = loss_parity.run_config(args, "dense_window", 0, 100)
    assert config["model"]["config"]["attention"] == "dense"
    assert config["data"]["retrieval_fraction"] == 0.02
    assert "--model.config.window" not in loss_parity.mode_options(args, "dense")


def test_loss_parity_copied_runs_join_the_report_without_evaluating_again(tmp_path):
    """A committed run (records and evaluations, no checkpoint) is kept by ``evaluate``; a run
    with neither is a one-line error; a config naming a field this version dropped still gives
    the run's setup; position tables over different token counts say so."""
    import argparse
    import shutil

    from benchmarks import loss_parity

    committed = ROOT / "benchmarks/results/loss_parity_h200_2026-12-02/dense-s0"
    shutil.copytree(committed, tmp_path / "dense-s0")
    parser = argparse.ArgumentParser()
    loss_parity.add_arguments(parser)
    args = parser.parse_args(["evaluate", "--out", str(tmp_path), "--dataset", "unused"])
    loss_parity.command_evaluate(args)  # nothing to do: no fsa-train command runs
    assert loss_parity.evaluated(tmp_path / "dense-s0", loss_parity.evaluations(args))
    setup = loss_parity.model_setup(tmp_path / "dense-s0")
    assert setup["unknown_fields"] == ["selected_kernel"] and setup["d_model"] == 1024
    other = tmp_path / "nsa-s0"
    other.mkdir()
    shutil.copy(committed / "val.jsonl", other / "val.jsonl")
    with pytest.raises(SystemExit, match="nsa-s0 has neither a checkpoints/last.ckpt"):
        loss_parity.command_evaluate(args)
    fewer = json.loads((committed / "position_loss.json").read_text())
    fewer["tokens"] = 1000
    (other / "position_loss.json").write_text(json.dumps(fewer))
    table = loss_parity.markdown(loss_parity.summarize(tmp_path), "t")
    assert "| tokens | 1,933,266 | 1,000 |" in table and "different numbers" in table


def test_loss_parity_key_tokens_come_from_the_reference_runs_file(tmp_path, capsys):
    """The reference run writes its key tokens; the others read that file (a committed run of
    an earlier session has no checkpoint), fall back to its export, or choose their own."""
    import argparse

    from benchmarks import loss_parity

    parser = argparse.ArgumentParser()
    loss_parity.add_arguments(parser)
    args = parser.parse_args(["evaluate", "--out", str(tmp_path), "--dataset", "unused",
                              "--short_context", "512", "--key_reference", "dense"])
    dense, nsa = tmp_path / "dense-s1", tmp_path / "nsa-s1"
    dense.mkdir()
    assert loss_parity.key_reference(args, dense) == ["--key_tokens_out",
                                                      str(dense / "key_tokens.npz")]
    assert loss_parity.key_reference(args, nsa) == []
    assert "key tokens chosen by the model itself" in capsys.readouterr().out
    (dense / "model.pt").write_bytes(b"")
    assert loss_parity.key_reference(args, nsa) == ["--reference", str(dense / "model.pt")]
    (dense / "key_tokens.npz").write_bytes(b"")
    assert loss_parity.key_reference(args, nsa) == ["--key_tokens", str(dense / "key_tokens.npz")]
    assert loss_parity.key_reference(args, tmp_path / "nsa-s0") == []  # no dense-s0
    no_keys = parser.parse_args(["evaluate", "--out", str(tmp_path), "--dataset", "unused"])
    assert loss_parity.key_reference(no_keys, nsa) == []


def test_device_script_splits_big_wheels_and_joins_them(tmp_path):
    """Wheels over one call's carry travel as parts (`split-wheels`) and are put back together
    on the device (`join-wheels`) bit for bit; a missing piece is one line, not a broken wheel."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "device.sh", repo / "benchmarks" / "device.sh")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    big = os.urandom(5 * 2**20 + 123)
    (wheels / "big-1.0-py3-none-any.whl").write_bytes(big)
    (wheels / "small-1.0-py3-none-any.whl").write_bytes(os.urandom(1000))
    env = dict(os.environ, WHEEL_PART_MIB="2", PY=sys.executable)

    def device(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "benchmarks/device.sh", *words], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)

    assert device("split-wheels", str(wheels)).returncode == 0
    parts = sorted(repo.glob(".wheel-parts-*"))
    assert len(parts) == 3
    assert all(sum(f.stat().st_size for f in part.iterdir()) <= 2 * 2**20 for part in parts)
    assert "/.wheel-parts-*/" in (repo / ".git" / "info" / "exclude").read_text()
    joined = Path("/tmp/joined-wheels")
    shutil.rmtree(joined, ignore_errors=True)
    assert device("join-wheels").returncode == 0
    assert (joined / "big-1.0-py3-none-any.whl").read_bytes() == big
    shutil.rmtree(joined)
    next(repo.glob(".wheel-parts-*/big-1.0-py3-none-any.whl.piece.01")).unlink()
    result = device("join-wheels")
    assert result.returncode == 1 and "do not match its sha256" in result.stderr
    assert not (joined / "big-1.0-py3-none-any.whl").exists()
