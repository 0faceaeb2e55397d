"""Loss parity of NSA against dense attention (issue 7): one experiment anyone can rerun.

The same GPT is trained per seed with ``attention: dense``, ``attention: nsa`` (exact token
selection), as mode ``nsa_block`` NSA with ``nsa.selection: block`` and, as mode
``dense_window``, dense attention over a 512-token window only (the ablation that long-context
evaluations must tell apart from dense), by the real trainer
(``fsa-train fit``, one process per run): same seed, so the same initial weights for every shared
parameter (``GPT.init_generator``) and the same token stream (the data seed), the same number of
tokens and the same schedule. Then:

* ``run``: trains the runs that have not finished yet (a finished run is skipped, a cut-off one
  continues with ``--resume auto``; ``--stop_at STEP`` ends a job early, for device calls of
  limited length); each run directory holds its config, ``train.jsonl`` and
  ``val.jsonl`` (``MetricsFile``: losses with tokens and training seconds) and checkpoints.
* ``evaluate``: exports each run's last checkpoint and runs ``fsa-train position-loss`` (loss
  by token position: does NSA keep up late in long documents? with ``--short_context``, the
  key tokens, optionally chosen by one reference run) and ``fsa-train passkey``; with
  ``--retrieval_lengths``, ``fsa-train retrieval`` (multi-key retrieval by distance, for runs
  trained with ``--retrieval_fraction``).
* ``report``: ``loss_parity_<device>_<date>[_<tag>].{json,md,png}`` in ``--results`` (the
  device and last day of the runs' jobs; the plot: validation loss against tokens and against
  training time): final validation loss per mode (mean and spread over seeds), NSA minus dense,
  the training time NSA needs to reach the dense run's final validation loss, the position
  buckets and passkey accuracy when evaluated; NSA block minus NSA token per seed at the last
  step both runs reached. A run that stopped before its config's ``trainer.max_steps`` is
  listed as "stopped at step N of M" and left out of the final-loss aggregates. The committed
  run records sit beside the report as ``loss_parity_<device>_<date>/``.

Typical use (``python -m benchmarks run parity_corpus`` builds the corpus, ``fsa-train
prepare-data`` the dataset; ``bash benchmarks/device.sh loss-parity`` runs the steps on a GPU
machine)::

    python -m benchmarks run loss_parity run --dataset data/parity --out runs/parity --tokens 5e7
    python -m benchmarks run loss_parity evaluate --dataset data/parity --out runs/parity
    python -m benchmarks run loss_parity report --out runs/parity --results benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from benchmarks import REGISTRY, register
from benchmarks.common import Record, device_slug, run_meta, tag_type

MODES = ("dense", "nsa", "nsa_block", "dense_window")
SPARSE_MODES = ("nsa", "nsa_block")
MODE_OPTIONS = {
    "dense": ["--model.config.attention", "dense"],
    "nsa": ["--model.config.attention", "nsa", "--model.config.nsa.selection", "token"],
    "nsa_block": ["--model.config.attention", "nsa", "--model.config.nsa.selection", "block"],
    "dense_window": ["--model.config.attention", "dense"],
}
"""The ``fsa-train fit`` options that make each mode (after the model preset and run config);
``dense_window`` (the window-only ablation long-context evaluations must tell apart from dense)
adds ``--model.config.window`` from ``--ablation_window``."""
REPO = Path(__file__).resolve().parent.parent


def fsa_train(*words: str) -> None:
    """Run one ``fsa-train`` command in a child process (the real CLI, its own CUDA context)."""
    subprocess.run([sys.executable, "-m", "fsa_train.cli", *words], check=True, cwd=REPO)


ENV_PROBE = """
import datetime, json
from benchmarks.common import run_meta
print(json.dumps({
    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    **run_meta("cuda"),
}))
"""


def record_job(where: Path) -> None:
    """Append this job's device and versions to ``jobs.jsonl`` (probed in a child process, so
    this one holds no CUDA context while the run trains)."""
    probe = subprocess.run([sys.executable, "-c", ENV_PROBE], check=True, capture_output=True,
                           text=True, cwd=REPO)
    with (where / "jobs.jsonl").open("a", encoding="utf-8") as jobs:
        jobs.write(probe.stdout.strip() + "\n")


def run_dir(out: Path, mode: str, seed: int) -> Path:
    return out / f"{mode}-s{seed}"


def run_config(args: argparse.Namespace, mode: str, seed: int, steps: int) -> dict:
    """The per-run YAML, merged after ``--model_config`` (which sets the architecture)."""
    where = run_dir(Path(args.out), mode, seed).resolve()
    return {
        "seed_everything": seed,
        "trainer": {
            "accelerator": "auto",
            "devices": 1,
            "precision": args.precision,
            "max_steps": steps,
            "val_check_interval": args.val_every,
            "check_val_every_n_epoch": None,
            "limit_val_batches": args.val_batches,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 10,
            "gradient_clip_val": 1.0,
            "default_root_dir": str(where),
            "logger": False,
            "callbacks": [
                {"class_path": "fsa_train.checkpointing.SafeModelCheckpoint",
                 "init_args": {"dirpath": str(where / "checkpoints"), "save_last": True,
                               "save_top_k": 0, "every_n_train_steps": args.val_every}},
                {"class_path": "fsa_train.callbacks.ThroughputMonitor"},
                {"class_path": "fsa_train.callbacks.MetricsFile",
                 "init_args": {"path": str(where / "train.jsonl"),
                               "val_path": str(where / "val.jsonl")}},
                *([{"class_path": "fsa_train.callbacks.StopAtStep",
                    "init_args": {"step": args.stop_at}}] if args.stop_at else []),
            ],
        },
        "model": {"config": {"attention": "nsa" if mode in SPARSE_MODES else "dense"},
                  "warmup_steps": min(args.warmup, steps // 10)},
        "data": {"dataset": str(Path(args.dataset).resolve()), "vocab_size": args.vocab_size,
                 "seq_len": args.seq_len, "batch_size": args.batch_size, "seed": args.data_seed,
                 "retrieval_fraction": args.retrieval_fraction,
                 "retrieval_keys": args.retrieval_keys},
    }


def mode_options(args: argparse.Namespace, mode: str) -> list[str]:
    """:data:`MODE_OPTIONS` of ``mode``, with the ablation's window."""
    window = ["--model.config.window", str(args.ablation_window)] if mode == "dense_window" else []
    return [*MODE_OPTIONS[mode], *window]


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file, or of its gzipped copy ``path.gz`` (committed results);
    none if neither exists."""
    packed = path.with_name(path.name + ".gz")
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif packed.is_file():
        text = gzip.decompress(packed.read_bytes()).decode("utf-8")
    else:
        return []
    return [json.loads(line) for line in text.splitlines() if line]


def finished(where: Path, steps: int) -> bool:
    """Whether the run in ``where`` has validated at step ``steps`` (or later)."""
    val = read_jsonl(where / "val.jsonl")
    return bool(val) and val[-1]["step"] >= steps


def command_run(args: argparse.Namespace) -> None:
    steps = max(1, int(args.tokens) // (args.seq_len * args.batch_size))
    if steps % args.val_every:
        sys.exit(f"loss_parity: error: --val_every {args.val_every} must divide the {steps} steps "
                 f"that {int(args.tokens)} tokens make at {args.seq_len} x {args.batch_size}")
    if args.stop_at is not None and args.stop_at % args.val_every:
        sys.exit(f"loss_parity: error: --stop_at {args.stop_at} must be a multiple of "
                 f"--val_every {args.val_every} (a checkpoint is written there)")
    for seed in args.seeds:
        for mode in args.modes:
            where = run_dir(Path(args.out), mode, seed)
            if finished(where, steps) or (args.stop_at and finished(where, args.stop_at)):
                print(f"{where}: finished, skipped", flush=True)
                continue
            where.mkdir(parents=True, exist_ok=True)
            config = where / "run.yaml"
            config.write_text(yaml.safe_dump(run_config(args, mode, seed, steps), sort_keys=False),
                              encoding="utf-8")
            print(f"{where}: {steps} steps of {args.seq_len} x {args.batch_size} tokens",
                  flush=True)
            record_job(where)
            fsa_train("fit", "--config", str(Path(args.model_config).resolve()),
                      "--config", str(config.resolve()), *mode_options(args, mode),
                      "--resume", "auto", *args.extra)


def evaluations(args: argparse.Namespace) -> tuple[str, ...]:
    """The result files ``evaluate`` writes into each run directory."""
    return ("position_loss.json", "passkey.json",
            *(("retrieval.json",) if args.retrieval_lengths else ()))


def evaluated(where: Path, names: Sequence[str]) -> bool:
    """Whether a run's evaluations exist and are newer than its last checkpoint (or the run has
    no checkpoint: records copied from a committed result, as evaluated then)."""
    results = [where / name for name in names]
    if not all(path.is_file() for path in results):
        return False
    checkpoint = where / "checkpoints" / "last.ckpt"
    return (not checkpoint.is_file()
            or min(path.stat().st_mtime for path in results) > checkpoint.stat().st_mtime)


KEY_TOKENS = "key_tokens.npz"
"""The reference run's key-token mask (``position-loss --key_tokens_out``): small enough to
commit with the run records, so that runs of later device sessions are scored on the same
tokens after the reference's checkpoint is gone."""


def key_reference(args: argparse.Namespace, where: Path) -> list[str]:
    """position-loss's key-token options for the run in ``where``: the reference run itself
    writes its key tokens (``--key_tokens_out``); the others read them (``--key_tokens``), or
    take the reference's export (``--reference``) while its file is missing; with neither, each
    model chooses its own key tokens."""
    if not (args.short_context and args.key_reference):
        return []
    seed = where.name.rsplit("-s", 1)[1]
    run = where.parent / f"{args.key_reference}-s{seed}"
    if run == where:
        return ["--key_tokens_out", str(where / KEY_TOKENS)]
    if (run / KEY_TOKENS).is_file():
        return ["--key_tokens", str(run / KEY_TOKENS)]
    if (run / "model.pt").is_file():
        return ["--reference", str(run / "model.pt")]
    print(f"{where}: neither {run / KEY_TOKENS} nor {run / 'model.pt'}, key tokens chosen by "
          "the model itself", flush=True)
    return []


def command_evaluate(args: argparse.Namespace) -> None:
    names = evaluations(args)
    runs = sorted(p for p in Path(args.out).iterdir() if read_jsonl(p / "val.jsonl"))
    if args.key_reference:  # the reference is exported first
        runs.sort(key=lambda p: not p.name.startswith(f"{args.key_reference}-s"))
    for where in runs:
        if evaluated(where, names):
            print(f"{where}: evaluated, kept", flush=True)
            continue
        if not (where / "checkpoints" / "last.ckpt").is_file():
            sys.exit(f"loss_parity: error: {where} has neither a checkpoints/last.ckpt to "
                     "evaluate nor its evaluations")
        exported = where / "model.pt"
        fsa_train("export", str(where / "checkpoints" / "last.ckpt"), str(exported),
                  "--overwrite")
        fsa_train("position-loss", str(exported), str(Path(args.dataset).resolve()),
                  "--seq_len", str(args.seq_len),
                  *(["--batches", str(args.batches)] if args.batches else []),
                  *(["--short_context", str(args.short_context)] if args.short_context else []),
                  *key_reference(args, where),
                  "--out", str(where / "position_loss.json"))
        fsa_train("passkey", str(exported), "--lengths", *map(str, args.passkey_lengths),
                  "--trials", str(args.passkey_trials), "--out", str(where / "passkey.json"))
        if args.retrieval_lengths:
            fsa_train("retrieval", str(exported), "--lengths", *map(str, args.retrieval_lengths),
                      "--keys", str(args.retrieval_keys), "--trials", str(args.retrieval_trials),
                      "--out", str(where / "retrieval.json"))
        if where.name.startswith("nsa-") and args.overlap_batches:
            # how much neighbouring queries' selections overlap: the selected kernel's design
            subprocess.run([sys.executable, "-m", "benchmarks", "run", "selection_overlap",
                            str(exported), str(Path(args.dataset).resolve()), "--seq_len",
                            str(args.seq_len), "--batches", str(args.overlap_batches),
                            "--out", str(where / "selection_overlap.json")],
                           check=True, cwd=REPO)


def time_to_reach(val: list[dict], target: float) -> float | None:
    """Training seconds at which the validation loss first reaches ``target`` (linear in time
    between validations); None if it never does."""
    prev = None
    for row in val:
        if row["val/loss"] <= target:
            if prev is None:
                return row["train_time_s"]
            frac = (prev["val/loss"] - target) / (prev["val/loss"] - row["val/loss"])
            return prev["train_time_s"] + frac * (row["train_time_s"] - prev["train_time_s"])
        prev = row
    return None


def one_off_seconds(train: list[dict], slow: float = 3.0) -> dict[int, float]:
    """Cumulative one-off time by step: the excess over the median step of every step that took
    more than ``slow`` medians (compilation and autotuning on the first steps, and again after a
    resume). Subtracting it gives the steady-state training time."""
    times = {row["step"]: row["train_time_s"] for row in train}
    if not times:
        return {}
    steps = sorted(times)
    durations = [(s, times[s] - (times[p] if p is not None else 0.0))
                 for p, s in zip([None, *steps[:-1]], steps, strict=True)]
    median = statistics.median(d for _, d in durations)
    total, cumulative = 0.0, {}
    for step, d in durations:
        if d > slow * median:
            total += d - median
        cumulative[step] = total
    return cumulative


def _one_off_at(cumulative: dict[int, float], step: int) -> float:
    earlier = [s for s in cumulative if s <= step]
    return cumulative[max(earlier)] if earlier else 0.0


def saved_config(where: Path) -> dict | None:
    """The full config a run's job saved (``config.yaml``), or None when there is none."""
    path = where / "config.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def max_steps(where: Path) -> int | None:
    """The steps a run was set to train (``trainer.max_steps`` of its saved config); None when
    its config is not there (then its last validation is taken as its end)."""
    config = saved_config(where)
    return (config.get("trainer") or {}).get("max_steps") if config else None


def model_setup(where: Path) -> dict | None:
    """Architecture, data and parameter counts of a run, from the config its job saved."""
    config = saved_config(where)
    if config is None:
        return None
    import torch

    from fsa_train.config import GPTConfig, NSAConfig
    from fsa_train.model import GPT

    # a run of an older version may name fields this one no longer has: leave them out
    fields, dropped = _known_fields(GPTConfig, config["model"]["config"])
    nsa, dropped_nsa = _known_fields(NSAConfig, fields.get("nsa") or {})
    fields["nsa"] = NSAConfig(**nsa)
    fields["vocab_size"] = config["data"]["vocab_size"]
    with torch.device("meta"):
        model = GPT(GPTConfig(**fields))
    data = config["data"]
    return {
        "n_layer": fields["n_layer"], "d_model": fields["d_model"], "n_head": fields["n_head"],
        "n_kv_head": fields["n_kv_head"], "head_dim": fields["head_dim"],
        "attention": fields["attention"], "nsa": vars(fields["nsa"]),
        "parameters": model.num_parameters(exclude_embeddings=False),
        "non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
        "seq_len": data["seq_len"], "batch_size": data["batch_size"],
        "precision": config["trainer"]["precision"],
        "unknown_fields": dropped + [f"nsa.{name}" for name in dropped_nsa],
    }


def _known_fields(cls, values: dict) -> tuple[dict, list[str]]:
    """The entries of ``values`` that are fields of the dataclass ``cls``, and the other names."""
    names = {f.name for f in dataclasses.fields(cls)}
    return ({k: v for k, v in values.items() if k in names},
            sorted(k for k in values if k not in names))


def summarize(out: Path) -> dict:
    """Everything the report shows, from the run directories."""
    runs = {}
    for where in sorted(p for p in out.iterdir() if read_jsonl(p / "val.jsonl")):
        mode, seed = where.name.rsplit("-s", 1)
        # a job killed after a validation but before its checkpoint repeats those steps on
        # resume: keep the last record of each step
        val = sorted({row["step"]: row for row in read_jsonl(where / "val.jsonl")}.values(),
                     key=lambda row: row["step"])
        train = read_jsonl(where / "train.jsonl")
        rates = [r["throughput/tokens_per_s"] for r in train if "throughput/tokens_per_s" in r]
        one_off = one_off_seconds(train)
        for row in val:
            row["steady_time_s"] = row["train_time_s"] - _one_off_at(one_off, row["step"])
        steps = max_steps(where)
        runs[where.name] = {
            "mode": mode, "seed": int(seed), "val": val,
            "max_steps": steps, "finished": steps is None or finished(where, steps),
            "final_val_loss": val[-1]["val/loss"], "tokens": val[-1]["tokens_seen"],
            "train_time_s": val[-1]["train_time_s"],
            "steady_time_s": val[-1]["steady_time_s"],
            "setup": model_setup(where), "jobs": read_jsonl(where / "jobs.jsonl"),
            "tokens_per_s": statistics.median(rates) if rates else None,
            "position_loss": _maybe_json(where / "position_loss.json"),
            "passkey": _maybe_json(where / "passkey.json"),
            "retrieval": _maybe_json(where / "retrieval.json"),
            "selection_overlap": _maybe_json(where / "selection_overlap.json"),
        }
    final = {name: r for name, r in runs.items() if r["finished"]}
    modes = {}
    for mode in MODES:
        finals = [r["final_val_loss"] for r in final.values() if r["mode"] == mode]
        if finals:
            modes[mode] = {"seeds": len(finals), "mean": statistics.fmean(finals),
                           "spread": max(finals) - min(finals)}
    pairs = []
    for seed, sparse in ((s, m) for s in sorted({r["seed"] for r in runs.values()})
                         for m in SPARSE_MODES):
        dense, nsa = final.get(f"dense-s{seed}"), final.get(f"{sparse}-s{seed}")
        if dense and nsa:
            reach = time_to_reach(nsa["val"], dense["final_val_loss"])
            steady = [dict(row, train_time_s=row["steady_time_s"]) for row in nsa["val"]]
            steady_reach = time_to_reach(steady, dense["final_val_loss"])
            pairs.append({
                "seed": seed, "mode": sparse,
                "nsa_minus_dense": nsa["final_val_loss"] - dense["final_val_loss"],
                "dense_time_s": dense["train_time_s"], "nsa_time_to_dense_final_s": reach,
                "speedup_to_dense_final": dense["train_time_s"] / reach if reach else None,
                "dense_steady_time_s": dense["steady_time_s"],
                "nsa_steady_time_to_dense_final_s": steady_reach,
                "steady_speedup_to_dense_final":
                    dense["steady_time_s"] / steady_reach if steady_reach else None,
                "dense_tokens_per_s": dense["tokens_per_s"],
                "nsa_tokens_per_s": nsa["tokens_per_s"],
            })
    return {"runs": runs, "modes": modes, "pairs": pairs,
            "block_vs_token": block_vs_token(runs)}


def block_vs_token(runs: dict[str, dict]) -> list[dict]:
    """NSA block minus NSA token validation loss per seed, at the last step both runs reached
    (a stopped run is compared where it stopped, not with the other's final loss); and, where
    that step differs between seeds, also at the last step every seed's pair reached, so the
    seeds can be compared at one step."""
    pairs = {r["seed"]: (runs[f"nsa_block-s{r['seed']}"], r) for r in runs.values()
             if r["mode"] == "nsa" and f"nsa_block-s{r['seed']}" in runs}
    common = {seed: _common_steps(block, token) for seed, (block, token) in pairs.items()}
    common = {seed: steps for seed, steps in common.items() if steps}
    if not common:
        return []
    shared = min(steps[-1] for steps in common.values())
    rows = []
    for seed, steps in sorted(common.items()):
        block, token = (_loss_by_step(run) for run in pairs[seed])
        for step in sorted({steps[-1], shared} & set(steps)):
            rows.append({"seed": seed, "at_step": step, "block_val_loss": block[step],
                         "token_val_loss": token[step],
                         "block_minus_token": block[step] - token[step]})
    return rows


def _loss_by_step(run: dict) -> dict[int, float]:
    return {row["step"]: row["val/loss"] for row in run["val"]}


def _common_steps(a: dict, b: dict) -> list[int]:
    """The validation steps two runs share, in order."""
    return sorted(_loss_by_step(a).keys() & _loss_by_step(b).keys())


def _maybe_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _setup_lines(summary: dict) -> list[str]:
    """Where and what: devices and versions of the jobs, the model and the data shape."""
    lines = []
    jobs = [job for r in summary["runs"].values() for job in r.get("jobs") or []]
    if jobs:
        envs = sorted({f"{j['device']}, torch {j['torch']}, Triton {j['triton']}, "
                       f"Python {j['python']}" for j in jobs})
        dates = sorted(j["started"][:10] for j in jobs)
        span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} – {dates[-1]}"
        lines += [f"Measured {span} on {'; '.join(envs)}.", ""]
    setups = {n: r["setup"] for n, r in summary["runs"].items() if r.get("setup")}
    if setups:
        first = next(iter(setups.values()))
        lines.append(f"Model: {first['n_layer']} layers, d_model {first['d_model']}, "
                     f"{first['n_head']} query / {first['n_kv_head']} KV heads of "
                     f"{first['head_dim']}; {first['seq_len']} tokens x {first['batch_size']} "
                     f"per step, {first['precision']}.")
        for name, setup in setups.items():
            attention = setup["attention"]
            if attention == "nsa":
                attention += f" ({setup['nsa'].get('selection', 'token')} selection)"
            lines.append(f"- {name}: {attention}, {setup['parameters'] / 1e6:.1f}M "
                         f"parameters ({setup['non_embedding_parameters'] / 1e6:.1f}M without "
                         f"the embedding)")
        lines.append("")
    return lines


def markdown(summary: dict, title: str) -> str:
    lines = [f"# {title}", "", *_setup_lines(summary),
             "| run | tokens | final val loss | train time s | steady time s | tokens/s |",
             "|---|---|---|---|---|---|"]
    for name, r in summary["runs"].items():
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "–"
        loss = f"{r['final_val_loss']:.4f}" + ("" if r.get("finished", True) else
                                              f" ({stopped_at(r)})")
        lines.append(f"| {name} | {r['tokens']:,} | {loss} | "
                     f"{r['train_time_s']:.1f} | {r['steady_time_s']:.1f} | {rate} |")
    lines += ["", "Steady time: training time less the one-off excess of steps slower than 3× "
              "the median (compilation, autotuning)."]
    lines += ["", "| mode | seeds | mean final val loss | spread (max − min) |",
              "|---|---|---|---|"]
    for mode, m in summary["modes"].items():
        lines.append(f"| {mode} | {m['seeds']} | {m['mean']:.4f} | {m['spread']:.4f} |")
    stopped = [f"{name} ({stopped_at(r)})" for name, r in summary["runs"].items()
               if not r.get("finished", True)]
    if stopped:
        lines += ["", f"Left out of the means, the NSA − dense pairs and the times to reach "
                  f"dense's loss, as unfinished: {', '.join(stopped)}."]
    by_mode = any(p.get("mode", "nsa") != "nsa" for p in summary["pairs"])  # older: NSA only
    lines += ["", ("| mode " if by_mode else "") + "| seed | NSA − dense (nats) | dense time s | "
              "NSA time to dense's final loss s | speed-up | same, steady times |",
              ("|---" if by_mode else "") + "|---|---|---|---|---|---|"]
    for p in summary["pairs"]:
        reach = (f"{p['nsa_time_to_dense_final_s']:.1f}"
                 if p["nsa_time_to_dense_final_s"] is not None else "not reached")
        speed = f"{p['speedup_to_dense_final']:.2f}×" if p["speedup_to_dense_final"] else "–"
        steady = (f"{p['nsa_steady_time_to_dense_final_s']:.1f} of "
                  f"{p['dense_steady_time_s']:.1f} s: {p['steady_speedup_to_dense_final']:.2f}×"
                  if p["steady_speedup_to_dense_final"] else "–")
        mode = f"| {p.get('mode', 'nsa')} " if by_mode else ""
        lines.append(f"{mode}| {p['seed']} | {p['nsa_minus_dense']:+.4f} | "
                     f"{p['dense_time_s']:.1f} | {reach} | {speed} | {steady} |")
    lines += _block_vs_token_lines(summary.get("block_vs_token") or [])
    buckets = {n: r["position_loss"]["buckets"] for n, r in summary["runs"].items()
               if r["position_loss"]}
    if buckets:
        names = list(buckets)
        lines += ["", "Validation loss by token position:", "",
                  "| positions | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for i, b in enumerate(next(iter(buckets.values()))):
            span = f"{b['start']}–{b['end'] - 1}" if b["end"] is not None else f"{b['start']}+"
            cells = [_fmt(buckets[n][i]["loss"]) for n in names]
            lines.append(f"| {span} | " + " | ".join(cells) + " |")
        counts = {n: summary["runs"][n]["position_loss"]["tokens"] for n in names}
        lines.append("| tokens | " + " | ".join(f"{counts[n]:,}" for n in names) + " |")
        if len(set(counts.values())) > 1:
            lines += ["", "The runs were evaluated on different numbers of validation tokens "
                      "(the last row): compare their buckets only where the counts agree."]
    keys = {n: passkey_by_length(r["passkey"]) for n, r in summary["runs"].items()
            if r["passkey"]}
    if keys:
        names = list(keys)
        lines += ["", "Passkey retrieval by prompt length: exact match / per-token accuracy / "
                  "mean log-likelihood of the key (nats; a continuous signal before a model "
                  "retrieves at all):", "",
                  "| length | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for length in sorted({n for by in keys.values() for n in by}):
            cells = []
            for name in names:
                cell = keys[name].get(length)
                cells.append("–" if cell is None else
                             f"{cell['accuracy']:.2f} / {cell['token_accuracy']:.2f} / "
                             f"{cell['key_logprob']:.1f}")
            lines.append(f"| {length} | " + " | ".join(cells) + " |")
    lines += _retrieval_lines(summary)
    overlaps = {n: r["selection_overlap"] for n, r in summary["runs"].items()
                if r.get("selection_overlap")}
    for name, result in overlaps.items():
        lines += ["", f"Block selections of {name} (`selection_overlap.py`, mean over layers "
                  f"and KV heads, top-{result['topk']}): distinct blocks per tile of M queries "
                  "/ query-major work over sparse work; adjacent-token Jaccard "
                  f"{next(iter(result['overall'].values()))['adjacent_jaccard']:.2f}.", "",
                  "| M | " + " | ".join(result["overall"]) + " |",
                  "|---" * (len(result["overall"]) + 1) + "|",
                  "| union / inflation | " + " | ".join(
                      f"{v['union']:.1f} / {v['inflation']:.2f}"
                      for v in result["overall"].values()) + " |"]
    return "\n".join(lines) + "\n"


def stopped_at(run: dict) -> str:
    """How far an unfinished run got: "stopped at step N of M"."""
    return f"stopped at step {run['val'][-1]['step']} of {run['max_steps']}"


def _block_vs_token_lines(rows: list[dict]) -> list[str]:
    """The block − token table, with the step of each comparison (older reports: final losses,
    no step)."""
    if not rows:
        return []
    if "at_step" not in rows[0]:
        return ["", "| seed | NSA block − NSA token (nats) |", "|---|---|",
                *(f"| {row['seed']} | {row['block_minus_token']:+.4f} |" for row in rows)]
    return ["", "NSA block against NSA token at the last validation step both runs of a seed "
            "reached (and at the last one all seeds reached, where that is earlier):", "",
            "| seed | at step | NSA block val loss | NSA token val loss | "
            "NSA block − NSA token (nats) |", "|---|---|---|---|---|",
            *(f"| {row['seed']} | {row['at_step']} | {row['block_val_loss']:.4f} | "
              f"{row['token_val_loss']:.4f} | {row['block_minus_token']:+.4f} |"
              for row in rows)]


def _retrieval_lines(summary: dict) -> list[str]:
    """Key-token loss and multi-key retrieval of the runs that have them (older reports: none)."""
    lines = []
    keyed = {n: r["position_loss"]["key_tokens"] for n, r in summary["runs"].items()
             if r.get("position_loss") and r["position_loss"].get("key_tokens")}
    if keyed:
        first = next(iter(keyed.values()))
        lines += ["", f"Key tokens (`position-loss --short_context {first['short_context']}`): "
                  f"tokens past position {first['short_context']} whose loss drops by more than "
                  f"{first['threshold']:g} nats with the full context; chosen by the run itself, "
                  "by a reference run, or by the reference run's key-token file (`file`, "
                  "from an earlier evaluation):", "",
                  "| run | chosen by | key tokens | of | loss, full context | loss, short |",
                  "|---|---|---|---|---|---|"]
        for name, k in keyed.items():
            lines.append(f"| {name} | {k['chosen_by']} | {k['tokens']:,} | {k['candidates']:,} "
                         f"| {_fmt(k['loss'])} | {_fmt(k['short_loss'])} |")
    found = {n: r["retrieval"] for n, r in summary["runs"].items() if r.get("retrieval")}
    if found:
        first = next(iter(found.values()))
        names = list(found)
        lines += ["", f"Multi-key retrieval (`fsa-train retrieval`, {first['keys']} keys, "
                  f"{first['trials']} trials per cell; copying a random key scores "
                  f"{first['chance']:.2f}): exact match by length and depth of the asked key "
                  "(mean distance in tokens):", "",
                  "| length | depth | " + " | ".join(names) + " |",
                  "|---|---" * 1 + "|---" * len(names) + "|"]
        cells = {n: {(c["length"], c["depth"]): c for c in found[n]["cells"]} for n in names}
        for length, depth in ((c["length"], c["depth"]) for c in first["cells"]):
            row = [cells[n].get((length, depth)) for n in names]
            distance = next(c["mean_distance"] for c in row if c)
            lines.append(f"| {length} | {depth:g} ({distance:.0f}) | " + " | ".join(
                "–" if c is None else f"{c['accuracy']:.2f}" for c in row) + " |")
    return lines


def passkey_by_length(result: dict) -> dict[int, dict[str, float]]:
    """Mean exact match, per-token accuracy and key log-likelihood per prompt length (over the
    depths and trials of ``fsa-train passkey``)."""
    by_length: dict[int, list[dict]] = {}
    for cell in result["cells"]:
        by_length.setdefault(cell["length"], []).append(cell)
    return {length: {"accuracy": statistics.fmean(c["accuracy"] for c in cells),
                     "token_accuracy": statistics.fmean(c["token_accuracy"] for c in cells),
                     "key_logprob": statistics.fmean(c["mean_key_logprob"] for c in cells)}
            for length, cells in by_length.items()}


def _fmt(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.4f}"


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in summary["runs"].items():
        style = {"nsa": "-", "nsa_block": ":", "dense_window": "-."}.get(r["mode"], "--")
        tokens = [v["tokens_seen"] / 1e6 for v in r["val"]]
        times = [v["train_time_s"] / 60 for v in r["val"]]
        loss = [v["val/loss"] for v in r["val"]]
        by_tokens.plot(tokens, loss, style, label=name)
        by_time.plot(times, loss, style, label=name)
    by_tokens.set(xlabel="tokens (M)", ylabel="validation loss", title="by tokens")
    by_time.set(xlabel="training time (min)", title="by training time")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report_meta(summary: dict) -> dict:
    """Device and date of the report's name: the runs' jobs (their device, the day the last one
    started), or this machine when no job was recorded."""
    jobs = [job for r in summary["runs"].values() for job in r.get("jobs") or []]
    if not jobs:
        return run_meta("cpu")
    last = max(jobs, key=lambda job: job["started"])
    return {"device": last["device"], "date": last["started"][:10],
            "device_slug": last.get("device_slug") or device_slug(last["device"])}


def command_report(args: argparse.Namespace) -> None:
    summary = summarize(Path(args.out))
    if not summary["runs"]:
        sys.exit(f"loss_parity: error: no run with a val.jsonl under {args.out}")
    record = Record("loss_parity", report_meta(summary), args.results or args.out, args.tag)
    record.write_json(summary)
    text = markdown(summary, args.title)
    record.write_text(text)
    plotted = plot(summary, record.path(".png"))
    print(text + (f"\nplot: {record.path('.png')}" if plotted else "\n(no matplotlib)"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the dense and NSA runs")
    run.add_argument("--dataset", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--model_config", default=str(REPO / "configs/model/gpt-150m-nsa.yaml"))
    run.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    run.add_argument("--seeds", type=int, nargs="+", default=[0])
    run.add_argument("--tokens", type=float, default=5e7, help="training tokens per run")
    run.add_argument("--seq_len", type=int, default=8192)
    run.add_argument("--batch_size", type=int, default=4)
    run.add_argument("--vocab_size", type=int, default=32000)
    run.add_argument("--val_every", type=int, default=100, help="steps between validations")
    run.add_argument("--val_batches", type=int, default=20)
    run.add_argument("--warmup", type=int, default=200)
    run.add_argument("--data_seed", type=int, default=1234, help="the same stream for all runs")
    run.add_argument("--precision", default="bf16-mixed")
    run.add_argument("--retrieval_fraction", type=float, default=0.0,
                     help="data.retrieval_fraction: synthetic retrieval documents in training")
    run.add_argument("--retrieval_keys", type=int, default=4)
    run.add_argument("--ablation_window", type=int, default=512,
                     help="model.config.window of the dense_window mode")
    run.add_argument("--stop_at", type=int, default=None,
                     help="end this job at this step (a multiple of --val_every); rerun to go on")
    run.add_argument("extra", nargs="*", help="more fsa-train fit options (after --)")
    ev = sub.add_parser("evaluate", help="position loss and passkey of every run")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--out", required=True)
    ev.add_argument("--seq_len", type=int, default=8192)
    ev.add_argument("--batches", type=int, default=None,
                    help="position-loss sequences (default: the whole validation split)")
    ev.add_argument("--passkey_lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ev.add_argument("--passkey_trials", type=int, default=3)
    ev.add_argument("--retrieval_lengths", type=int, nargs="*", default=[],
                    help="fsa-train retrieval at these lengths (none: skipped)")
    ev.add_argument("--retrieval_keys", type=int, default=4)
    ev.add_argument("--retrieval_trials", type=int, default=5)
    ev.add_argument("--short_context", type=int, default=None,
                    help="position-loss --short_context: the key tokens (none: skipped)")
    ev.add_argument("--key_reference", choices=MODES, default=None,
                    help="the mode whose run (same seed) chooses every run's key tokens")
    ev.add_argument("--overlap_batches", type=int, default=8,
                    help="validation windows for selection_overlap.py on NSA runs (0: skip)")
    rep = sub.add_parser("report", help="JSON, Markdown and PNG of the runs")
    rep.add_argument("--out", required=True)
    rep.add_argument("--results", default=None, help="where to write (default: --out)")
    rep.add_argument("--tag", type=tag_type, default=None,
                     help="suffix of the report's file names (several reports of one day)")
    rep.add_argument("--title", default="Loss parity: NSA vs dense attention")


@register("loss_parity", summary="loss parity of NSA against dense attention: run, evaluate, "
          "report", arguments=add_arguments, gpu=False, record=False)
def main(args: argparse.Namespace) -> None:
    {"run": command_run, "evaluate": command_evaluate, "report": command_report}[args.command](
        args)


if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["loss_parity"].run()
