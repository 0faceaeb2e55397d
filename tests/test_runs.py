"""Run directories and resume by identity (issue 17), through the real CLI on CPU.

The runs here use the NEW defaults: the overlay names no path (no default_root_dir, logger
save_dir or checkpoint dirpath), so every output must land in ``runs/<name>-<timestamp>`` of the
working directory. Each CLI call is a process of its own in real use; in this one process the
wandb run a fit started is finished after it (``fit``), as the process exit would.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fsa_train.checkpointing import CheckpointError, find_resume_checkpoint, read_checkpoint_meta
from fsa_train.cli import build_cli, main
from fsa_train.runs import (
    ResumeError,
    check_resumable,
    default_run_name,
    identity_differences,
    latest_run_dir,
    new_run_dir,
)

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
VOCAB = 320
BATCH = 2
SEQ = 128


# ---- helpers ----------------------------------------------------------------------------------


def write_overlay(directory: Path, filename: str = "overlay.yaml", steps: int = 4,
                  every: int = 2) -> Path:
    """A second config file with sizes and step counts only: no path anywhere."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(
        f"""
trainer:
  max_steps: {steps}
  val_check_interval: {steps}
  limit_val_batches: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: fsa_train.checkpointing.SafeModelCheckpoint
      init_args: {{save_last: true, save_top_k: 0, every_n_train_steps: {every}}}
    - class_path: fsa_train.callbacks.MetricsFile
data:
  seq_len: {SEQ}
  batch_size: {BATCH}
  val_documents: 2
""",
        encoding="utf-8",
    )
    return path


def run_args(command: str, overlay: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    return [
        command,
        "--config", str(DEMO),
        "--config", str(overlay),
        "--data.corpus", str(corpus),
        "--data.cache_dir", str(cache),
        "--data.vocab_size", str(VOCAB),
        "--model.config.n_layer", "1",
        "--model.config.d_model", "64",
        "--model.config.attention", "dense",
        "--model.warmup_steps", "1",
        "--model.sample_tokens", "4",
        *extra,
    ]


def finish_wandb() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()


def fit(argv: list[str]):
    """``fsa-train ARGV`` (one process in real use: its wandb run ends with it, and it never
    inherits a run that an earlier test of the session left open)."""
    finish_wandb()
    try:
        return build_cli(argv)
    finally:
        finish_wandb()


def fails(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``fsa-train ARGV``, which must fail."""
    finish_wandb()
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
    finally:
        finish_wandb()
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fsa-train: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def snapshot(directory: Path) -> dict[str, tuple[str, int | str]]:
    """Every entry under ``directory``: name -> (sha256 of its bytes, mtime); folders are
    ("dir", 0), links ("link", target) (wandb links each run's ``debug-core.log`` to the log of
    its service process, outside the run directory)."""
    out = {}
    for path in sorted(Path(directory).rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", 0)
        else:
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def wandb_run_ids(run_dir: Path) -> set[str]:
    """The ids of the wandb runs in ``<run>/wandb``: ``offline-run-<time>-<id>``, with a ``-N``
    suffix when a resumed run starts in the same second as the folder it continues."""
    pattern = re.compile(r"offline-run-\d{8}_\d{6}-([A-Za-z0-9]+)(?:-\d+)?")
    return {pattern.fullmatch(p.name).group(1)
            for p in (run_dir / "wandb").glob("offline-run-*")}


def steps_of(path: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def fake_checkpoint(path: Path, step: int, mtime: float) -> Path:
    torch.save({"global_step": step, "state_dict": {}}, path)
    os.utime(path, (mtime, mtime))
    return path


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    finish_wandb()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer / dataset cache for the whole file (the tokenizer is trained once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(small_corpus, cache_dir, tmp_path_factory):
    """One 4-step run (``last.ckpt`` saved at steps 2 and 4) made with the default run directory
    in a working directory of its own. Tests may only read it, or refuse to touch it."""
    workdir = tmp_path_factory.mktemp("work")
    overlay = write_overlay(workdir / "cfg")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.chdir(workdir)
        cli = fit(run_args("fit", overlay, small_corpus, cache_dir))
    run_dir = Path(cli.trainer.default_root_dir)
    if not run_dir.is_absolute():
        run_dir = workdir / run_dir
    assert cli.trainer.global_step == 4
    return SimpleNamespace(workdir=workdir, overlay=overlay, run_dir=run_dir,
                           checkpoint=run_dir / "checkpoints" / "last.ckpt",
                           wandb_id=str(cli.trainer.logger.version))


# ---- unit tests of fsa_train.runs ---------------------------------------------------------------


def test_default_run_name_joins_config_stems_without_base():
    assert default_run_name(["configs/base.yaml", "configs/model/gpt-150m-nsa.yaml"]) \
        == "gpt-150m-nsa"
    assert default_run_name([DEMO, "/tmp/x/overlay.yaml"]) == "demo+overlay"
    assert default_run_name(["configs/base.yaml", "a.yaml", "b.yml"]) == "a+b"
    assert default_run_name([]) == "run"
    assert default_run_name(["configs/base.yaml"]) == "run"
    assert default_run_name(["my exp/ü 1.yaml"]) == "__1"


def test_new_run_dir_never_reuses_an_existing_directory(tmp_path):
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    made = []
    for _ in range(4):
        path = new_run_dir("demo", tmp_path, now)
        assert not path.exists() and path.parent == tmp_path
        path.mkdir()
        made.append(path.name)
    assert made == ["demo-20260102-030405", "demo-20260102-030405-2",
                    "demo-20260102-030405-3", "demo-20260102-030405-4"]
    # A file (not a directory) of that name is taken too.
    (tmp_path / "x-20260102-030405").write_text("")
    assert new_run_dir("x", tmp_path, now).name == "x-20260102-030405-2"
    assert new_run_dir("demo", tmp_path / "missing", now) == \
        tmp_path / "missing" / "demo-20260102-030405"


def _run(root: Path, name: str, checkpoint: bool = True) -> Path:
    path = root / name
    (path / "checkpoints").mkdir(parents=True)
    if checkpoint:
        (path / "checkpoints" / "last.ckpt").write_bytes(b"")
    return path


def test_latest_run_dir_is_the_newest_run_of_that_name_with_a_checkpoint(tmp_path):
    assert latest_run_dir("demo", tmp_path / "nowhere") is None
    assert latest_run_dir("demo", tmp_path) is None
    _run(tmp_path, "demo-20260101-000000")
    second = _run(tmp_path, "demo-20260102-000000")
    assert latest_run_dir("demo", tmp_path) == second
    again = _run(tmp_path, "demo-20260102-000000-2")  # same second, started later
    _run(tmp_path, "demo-20260103-000000", checkpoint=False)  # started, never checkpointed
    _run(tmp_path, "other-20260104-000000")  # another experiment
    _run(tmp_path, "demo+overlay-20260105-000000")  # another name sharing the prefix
    _run(tmp_path, "xdemo-20260106-000000")
    (tmp_path / "demo-20260107-000000").write_text("a file, not a run")
    assert latest_run_dir("demo", tmp_path) == again
    assert latest_run_dir("other", tmp_path) == tmp_path / "other-20260104-000000"
    assert latest_run_dir("demo+overlay", tmp_path) == tmp_path / "demo+overlay-20260105-000000"
    # The directory's mtime does not decide: touching an old run does not make it the latest.
    old = tmp_path / "demo-20260101-000000"
    os.utime(old, (4e9, 4e9))
    assert latest_run_dir("demo", tmp_path) == again


def test_latest_run_dir_orders_same_second_suffixes_numerically(tmp_path):
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    for _ in range(10):
        _run(tmp_path, new_run_dir("demo", tmp_path, now).name)
    assert latest_run_dir("demo", tmp_path).name == "demo-20260102-030405-10"


def test_identity_differences_name_each_differing_key():
    sha_a, sha_b = "a" * 64, "b" * 64
    recorded = {"model.config.d_model": 64, "model.config.n_layer": 2,
                "data.tokenizer": sha_a, "data.dataset": "kjv-1234", "model.config.old": 1}
    same = {"model.config.d_model": 64, "model.config.n_layer": 2,
            "data.tokenizer": sha_a, "data.dataset": "kjv-1234", "model.config.new": 3}
    assert identity_differences(recorded, same) == []  # keys one side lacks are not compared
    assert identity_differences(recorded, {**same, "model.config.d_model": 128}) == \
        ["checkpoint has model.config.d_model=64, config has 128"]
    both = identity_differences(recorded, {**same, "model.config.n_layer": 4,
                                           "data.tokenizer": sha_b})
    assert both == ["checkpoint has model.config.n_layer=2, config has 4",
                    f"checkpoint has data.tokenizer={sha_a[:12]}…, config has {sha_b[:12]}…"]
    untrained = identity_differences(recorded, {**same, "data.tokenizer": None,
                                                "data.dataset": None})
    assert len(untrained) == 1 and "data.tokenizer" in untrained[0] \
        and "config has none yet" in untrained[0]
    assert identity_differences(recorded, {**same, "data.dataset": "kjv-7"}) == \
        ["checkpoint has data.dataset=kjv-1234, config has kjv-7"]
    with pytest.raises(ResumeError, match=r"^cannot resume from x.ckpt: it belongs to another "
                       r"run: checkpoint has model.config.d_model=64, config has 128$"):
        check_resumable("x.ckpt", recorded, {**same, "model.config.d_model": 128})
    check_resumable("x.ckpt", recorded, same)
    check_resumable("old.ckpt", {}, same)  # written before checkpoints recorded their run


def test_find_resume_checkpoint_takes_the_highest_step_not_the_newest_file(tmp_path):
    assert find_resume_checkpoint(tmp_path / "missing") is None
    assert find_resume_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path / "last.ckpt", 300, 1_000_000)
    fake_checkpoint(tmp_path / "step-0000200.ckpt", 200, 2_000_000)
    fake_checkpoint(tmp_path / "last-v1.ckpt", 1, 3_000_000)  # newest, and the fewest steps
    fake_checkpoint(tmp_path / "last-v2.ckpt.partial", 999, 4_000_000)  # an interrupted save
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    # Of equal steps, the newest wins.
    fake_checkpoint(tmp_path / "step-0000300.ckpt", 300, 500_000)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    os.utime(tmp_path / "step-0000300.ckpt", (5_000_000, 5_000_000))
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step-0000300.ckpt"
    # An unreadable checkpoint is an error, never silently skipped.
    (tmp_path / "last-v3.ckpt").write_bytes(b"half a checkpoint")
    with pytest.raises(CheckpointError, match="last-v3.ckpt"):
        find_resume_checkpoint(tmp_path)


# ---- end to end -------------------------------------------------------------------------------


def test_two_experiments_keep_separate_outputs_and_resume_auto_continues_the_first(
        small_corpus, cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first_overlay = write_overlay(tmp_path / "cfg", "overlay.yaml", steps=4, every=2)
    second_overlay = write_overlay(tmp_path / "cfg", "other.yaml", steps=2, every=2)
    first = fit(run_args("fit", first_overlay, small_corpus, cache_dir))
    second = fit(run_args("fit", second_overlay, small_corpus, cache_dir))

    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and runs[0].startswith("demo+other-") \
        and runs[1].startswith("demo+overlay-"), runs
    first_dir, second_dir = tmp_path / "runs" / runs[1], tmp_path / "runs" / runs[0]
    assert Path(first.trainer.default_root_dir).resolve() == first_dir
    assert Path(second.trainer.default_root_dir).resolve() == second_dir
    first_id, second_id = str(first.trainer.logger.version), str(second.trainer.logger.version)
    assert first_id != second_id
    for run_dir, steps, run_id in ((first_dir, 4, first_id), (second_dir, 2, second_id)):
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
        meta = read_checkpoint_meta(run_dir / "checkpoints" / "last.ckpt")
        assert meta["global_step"] == steps
        assert meta["run"]["wandb_run_id"] == run_id
        assert Path(meta["run"]["run_dir"]).resolve() == run_dir
        config = (run_dir / "config.yaml").read_text()  # the resolved config names its run
        assert f"default_root_dir: runs/{run_dir.name}\n" in config
        assert f"dirpath: runs/{run_dir.name}/checkpoints\n" in config
        assert f"save_dir: runs/{run_dir.name}\n" in config
        assert steps_of(run_dir / "metrics.jsonl") == list(range(1, steps + 1))
        assert steps_of(run_dir / "val.jsonl") == [steps]
        assert wandb_run_ids(run_dir) == {run_id}
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "checkpoints").exists()
    second_files = snapshot(second_dir)

    capsys.readouterr()
    resumed = fit(run_args("fit", first_overlay, small_corpus, cache_dir,
                           "--resume", "auto", "--trainer.max_steps", "6"))
    out = capsys.readouterr().out
    assert "resuming from" in out and "last.ckpt (step 4)" in out
    assert Path(resumed.trainer.default_root_dir).resolve() == first_dir
    assert resumed.trainer.global_step == 6
    assert resumed.model.tokens_seen == 6 * BATCH * SEQ
    assert str(resumed.trainer.logger.version) == first_id
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs  # no new run dir
    meta = read_checkpoint_meta(first_dir / "checkpoints" / "last.ckpt")
    assert meta["global_step"] == 6 and meta["run"]["wandb_run_id"] == first_id
    assert steps_of(first_dir / "metrics.jsonl") == list(range(1, 7))
    assert wandb_run_ids(first_dir) == {first_id}
    assert snapshot(second_dir) == second_files  # the other experiment is untouched


def test_resume_auto_prefers_a_higher_step_last_ckpt_over_a_newer_last_v1(
        trained, small_corpus, cache_dir, tmp_path, monkeypatch, capsys):
    """A fresh run started in the same run directory writes a 2-step ``last-v1.ckpt`` next to the
    4-step ``last.ckpt``; ``--resume auto`` must continue from step 4 (and its wandb run)."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "copy"
    shutil.copytree(trained.run_dir, run_dir, symlinks=True)
    restart = fit(run_args("fit", trained.overlay, small_corpus, cache_dir,
                           "--run_dir", str(run_dir), "--trainer.max_steps", "2"))
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last-v1.ckpt", "last.ckpt"]
    assert read_checkpoint_meta(checkpoints / "last-v1.ckpt")["global_step"] == 2
    assert (checkpoints / "last-v1.ckpt").stat().st_mtime \
        >= (checkpoints / "last.ckpt").stat().st_mtime
    assert str(restart.trainer.logger.version) != trained.wandb_id

    capsys.readouterr()
    resumed = fit(run_args("fit", trained.overlay, small_corpus, cache_dir,
                           "--run_dir", str(run_dir), "--resume", "auto",
                           "--trainer.max_steps", "6"))
    out = capsys.readouterr().out
    assert f"resuming from {checkpoints / 'last.ckpt'} (step 4)" in out
    assert resumed.trainer.global_step == 6
    assert str(resumed.trainer.logger.version) == trained.wandb_id


MISMATCHES = {
    "model": (["--model.config.d_model", "128"],
              "checkpoint has model.config.d_model=64, config has 128"),
    # Another corpus whose tokenizer is not trained yet, and one whose tokenizer is (the test
    # sets the corpus and cache).
    "tokenizer": ([], "checkpoint has data.tokenizer="),
    "tokenizer-trained": ([], "checkpoint has data.tokenizer="),
    "dataset-seed": (["--data.seed", "7"], "checkpoint has data.dataset="),
    "dataset-val": (["--data.val_documents", "3"], "checkpoint has data.dataset="),
}


@pytest.fixture(scope="module")
def other_corpus(small_corpus, tmp_path_factory) -> Path:
    """A smaller copy of the corpus: another fingerprint, hence another tokenizer."""
    path = tmp_path_factory.mktemp("other") / "kjv_smaller.jsonl"
    path.write_text("".join(small_corpus.read_text().splitlines(keepends=True)[:8]))
    return path


@pytest.fixture(scope="module")
def other_cache(other_corpus, tmp_path_factory) -> Path:
    """A cache in which the smaller corpus's tokenizer and dataset are already prepared."""
    from fsa_train.data.datamodule import TextDataModule

    cache = tmp_path_factory.mktemp("other_cache")
    TextDataModule(corpus=str(other_corpus), cache_dir=str(cache), vocab_size=VOCAB,
                   seq_len=SEQ, batch_size=BATCH, val_documents=2).prepare_data()
    return cache


@pytest.mark.parametrize("how", ["auto", "path"])
@pytest.mark.parametrize("mismatch", list(MISMATCHES))
def test_resume_of_another_run_is_refused_in_one_line_and_touches_nothing(
        trained, small_corpus, other_corpus, cache_dir, request, monkeypatch, capsys, mismatch,
        how):
    monkeypatch.chdir(trained.workdir)
    extra, message = MISMATCHES[mismatch]
    corpus, cache, details = small_corpus, cache_dir, []
    recorded = read_checkpoint_meta(trained.checkpoint)["run"]["identity"]
    if mismatch == "tokenizer":
        corpus, details = other_corpus, ["config has none yet"]
    elif mismatch == "tokenizer-trained":
        corpus, cache = other_corpus, request.getfixturevalue("other_cache")
        details = [f"checkpoint has data.tokenizer={recorded['data.tokenizer'][:12]}…, "
                   "config has ", "; checkpoint has data.dataset="]
    elif mismatch.startswith("dataset"):
        details = [f"checkpoint has data.dataset={recorded['data.dataset']}, config has "]
    resume = "auto" if how == "auto" else str(trained.checkpoint)
    before = snapshot(trained.workdir), snapshot(cache)
    code, err = fails(run_args("fit", trained.overlay, corpus, cache, *extra,
                               "--resume", resume), capsys)
    assert code == 2
    assert_one_line_error(err, f"cannot resume from {trained.checkpoint}: it belongs to another "
                          f"run: {message}", *details)
    assert "model.config" not in err or mismatch == "model"  # only the keys that differ
    # Nothing written: not in the run directory (no wandb run, no config), not in the working
    # directory (no new run directory), not in the cache (no tokenizer trained, no dataset made).
    assert (snapshot(trained.workdir), snapshot(cache)) == before


@pytest.fixture
def broken_files(trained, tmp_path) -> dict[str, Path]:
    data = trained.checkpoint.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    foreign = tmp_path / "weights.ckpt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    return {"truncated": truncated, "text": text, "foreign": foreign}


@pytest.mark.parametrize(
    ("command", "kind"),
    [
        ("resume", "truncated"), ("resume", "text"), ("resume", "foreign"),
        ("validate", "truncated"),
        ("validate", "text"),
        ("validate", "foreign"),
        ("export", "truncated"), ("export", "text"), ("export", "foreign"),
    ],
)
def test_an_unreadable_checkpoint_is_one_line(trained, broken_files, small_corpus, cache_dir,
                                             tmp_path, monkeypatch, capsys, command, kind):
    monkeypatch.chdir(trained.workdir)
    broken = broken_files[kind]
    expected = "not a Lightning checkpoint" if kind == "foreign" else "not a readable checkpoint"
    argv = {
        "resume": lambda: run_args("fit", trained.overlay, small_corpus, cache_dir,
                                   "--resume", str(broken)),
        "validate": lambda: run_args("validate", trained.overlay, small_corpus, cache_dir,
                                     "--ckpt_path", str(broken)),
        "export": lambda: ["export", str(broken), str(tmp_path / "out.pt")],
    }[command]()
    before = snapshot(trained.workdir)
    code, err = fails(argv, capsys)
    assert code == 2
    assert_one_line_error(err, expected, str(broken))
    assert not (tmp_path / "out.pt").exists()
    # The failed start leaves no (empty) run directory behind, and the run is untouched.
    assert snapshot(trained.workdir) == before


def test_generate_on_an_unreadable_export_is_one_line(broken_files, capsys):
    code, err = fails(["generate", str(broken_files["truncated"]), "--prompt", "x"], capsys)
    assert code == 2
    assert_one_line_error(err, "not a readable fsa-train export", "truncated.ckpt")


def test_export_refuses_to_overwrite_without_overwrite(trained, tmp_path, capsys):
    from fsa_train.export import load_exported

    output = tmp_path / "model.pt"
    output.write_bytes(b"an earlier export")
    code, err = fails(["export", str(trained.checkpoint), str(output)], capsys)
    assert code == 2
    assert_one_line_error(err, str(output), "--overwrite")
    assert output.read_bytes() == b"an earlier export"
    main(["export", str(trained.checkpoint), str(output), "--overwrite"])
    model, tokenizer = load_exported(output)
    assert model.cfg.d_model == 64 and tokenizer is not None


def test_wandb_id_survives_fast_dev_run_and_validate(trained, small_corpus, cache_dir, tmp_path,
                                                     monkeypatch, capsys):
    """A smoke test (``fast_dev_run``) in the run directory, then ``validate`` of its checkpoint,
    then ``--resume auto``: all three keep to the training run's wandb id (on a copy of the
    shared run, which ``--resume`` would otherwise extend)."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / trained.run_dir.name
    shutil.copytree(trained.run_dir, run_dir, symlinks=True)
    checkpoints = run_dir / "checkpoints"
    last = snapshot(checkpoints)["last.ckpt"]
    fit(run_args("fit", trained.overlay, small_corpus, cache_dir,
                 "--run_dir", str(run_dir), "--trainer.fast_dev_run", "true"))
    assert snapshot(checkpoints)["last.ckpt"] == last
    assert find_resume_checkpoint(checkpoints) == checkpoints / "last.ckpt"
    assert read_checkpoint_meta(checkpoints / "last.ckpt")["run"]["wandb_run_id"] \
        == trained.wandb_id
    assert wandb_run_ids(run_dir) == {trained.wandb_id}  # the smoke test started no wandb run

    config = snapshot(run_dir)["config.yaml"]
    checked = fit(run_args("validate", trained.overlay, small_corpus, cache_dir,
                           "--ckpt_path", str(checkpoints / "last.ckpt")))
    assert Path(checked.trainer.default_root_dir).resolve() == run_dir
    assert str(checked.trainer.logger.version) == trained.wandb_id
    assert "val/loss" in checked.trainer.callback_metrics
    assert wandb_run_ids(run_dir) == {trained.wandb_id}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # validate logged into it
    assert snapshot(run_dir)["config.yaml"] == config  # the training run's config is kept
    assert (run_dir / "config.validate.yaml").is_file()
    assert snapshot(checkpoints)["last.ckpt"] == last

    capsys.readouterr()
    resumed = fit(run_args("fit", trained.overlay, small_corpus, cache_dir, "--resume", "auto",
                           "--trainer.max_steps", "6"))
    assert f"resuming from {checkpoints / 'last.ckpt'} (step 4)" in capsys.readouterr().out
    assert resumed.trainer.global_step == 6
    assert str(resumed.trainer.logger.version) == trained.wandb_id

    # the resumed run's own config (which says how it was launched: resume auto) validates
    saved = run_dir / "config.yaml"
    assert "resume: auto" in saved.read_text()
    again = fit(["validate", "--config", str(saved),
                 "--ckpt_path", str(checkpoints / "last.ckpt")])
    assert Path(again.trainer.default_root_dir).resolve() == run_dir
    assert "val/loss" in again.trainer.callback_metrics


def test_fast_dev_run_leaves_no_checkpoint_to_resume(small_corpus, cache_dir, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    overlay = write_overlay(tmp_path / "cfg")
    fit(run_args("fit", overlay, small_corpus, cache_dir, "--trainer.fast_dev_run", "true"))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.ckpt")) == []
    assert latest_run_dir("demo+overlay") is None


def _named_run(small_corpus, cache_dir, tmp_path):
    overlay = write_overlay(tmp_path / "cfg", steps=2, every=2)
    cli = fit(run_args("fit", overlay, small_corpus, cache_dir, "--name", "exp2"))
    return cli, Path(cli.trainer.default_root_dir)


def test_name_names_the_run_directory(small_corpus, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, run_dir = _named_run(small_corpus, cache_dir, tmp_path)
    assert run_dir.parent == Path("runs") and run_dir.name.startswith("exp2-")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]
    assert (tmp_path / run_dir / "checkpoints" / "last.ckpt").is_file()
    assert latest_run_dir("exp2", tmp_path / "runs") == tmp_path / run_dir


def test_name_names_the_wandb_run(small_corpus, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli, _ = _named_run(small_corpus, cache_dir, tmp_path)
    assert cli.trainer.logger._wandb_init["name"] == "exp2"  # what wandb.init was given


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    overview, _, lightning_help = out.partition("usage:")
    for command in ("fit", "validate", "prepare-data", "train-tokenizer", "export", "generate",
                    "passkey", "position-loss"):
        assert f"\n  {command} " in overview, command
    assert "{fit,validate}" in lightning_help  # LightningCLI's help follows, without test/predict
    code, err = fails(["test", "--help"], capsys)
    assert code != 0 and "invalid choice" in err


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_resume_with_ckpt_path_or_on_validate_is_refused(trained, command, small_corpus,
                                                         cache_dir, tmp_path, monkeypatch,
                                                         capsys):
    monkeypatch.chdir(tmp_path)
    overlay = write_overlay(tmp_path / "cfg")
    before = snapshot(trained.run_dir)
    extra = ["--resume", "auto", "--ckpt_path", str(trained.checkpoint)] if command == "fit" \
        else ["--resume", "auto"]
    code, err = fails(run_args(command, overlay, small_corpus, cache_dir, *extra), capsys)
    assert code == 2
    assert_one_line_error(err, "--resume and --ckpt_path" if command == "fit"
                          else "--resume is for fit")
    assert not (tmp_path / "runs").exists()
    assert snapshot(trained.run_dir) == before


def test_ranks_of_one_launch_share_a_run_directory(tmp_path):
    """SLURM / torchrun start every rank themselves: all compute the same directory from the
    launch's id; ranks that Lightning starts inherit the first process's directory."""
    from fsa_train.runs import inherited_run_dir, launcher_run_id, shared_run_dir

    assert launcher_run_id({}) is None and shared_run_dir("demo", tmp_path, {}) is None
    assert launcher_run_id({"TORCHELASTIC_RUN_ID": "none"}) is None
    slurm = {"SLURM_JOB_ID": "4242"}
    assert shared_run_dir("demo", tmp_path, slurm) == tmp_path / "demo-job4242"
    assert launcher_run_id({"FSA_TRAIN_RUN_ID": "a/b", **slurm}) == "a_b"
    assert inherited_run_dir({"LOCAL_RANK": "1", "FSA_TRAIN_RUN_DIR": "/r"}) == "/r"
    assert inherited_run_dir({"LOCAL_RANK": "0", "FSA_TRAIN_RUN_DIR": "/r"}) is None
    assert inherited_run_dir({"FSA_TRAIN_RUN_DIR": "/r"}) is None
    # a later job of the same experiment resumes the launcher-named run when it is the newest
    job = tmp_path / "demo-job4242" / "checkpoints"
    job.mkdir(parents=True)
    (job / "last.ckpt").write_bytes(b"x")
    stamped = tmp_path / "demo-20200101-000000" / "checkpoints"
    stamped.mkdir(parents=True)
    (stamped / "last.ckpt").write_bytes(b"x")
    assert latest_run_dir("demo", tmp_path) == tmp_path / "demo-job4242"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only machine's error")
def test_triton_backend_without_a_gpu_is_one_line_before_work(small_corpus, cache_dir, tmp_path,
                                                              monkeypatch, capsys):
    """``kernel_backend: triton`` on a machine without CUDA (and not the interpreter the CPU
    tests use) stops before training with one line, and leaves no run directory behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    overlay = write_overlay(tmp_path / "cfg")
    code, err = fails(run_args("fit", overlay, small_corpus, cache_dir,
                               "--model.config.attention", "nsa",
                               "--model.config.kernel_backend", "triton"), capsys)
    assert code == 2
    assert_one_line_error(err, "model.config.kernel_backend='triton' needs a CUDA GPU")
    assert not list(tmp_path.glob("runs/*"))  # the run directory made for it is gone
