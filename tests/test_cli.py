"""End to end through the real CLI on CPU: config parsing, a short training run, its outputs."""

import json
import math
from pathlib import Path

import pytest
import torch

from fsa_train.cli import build_cli, main

VOCAB = 320


def tiny_run_args(corpus: Path, root: Path, attention: str, steps: int,
                  stop_at: int | None = None) -> list[str]:
    """The demo config, overlaid by a second YAML file and command-line overrides; with
    ``stop_at``, the run checkpoints and stops at that step (as a preempted job would)."""
    every = stop_at or steps
    stop = (
        f"    - class_path: fsa_train.callbacks.StopAtStep\n      init_args: {{step: {stop_at}}}\n"
        if stop_at else ""
    )
    root.mkdir(parents=True, exist_ok=True)
    overlay = root / "overlay.yaml"
    overlay.write_text(
        f"""
trainer:
  max_steps: {steps}
  val_check_interval: {steps}
  limit_val_batches: 2
  default_root_dir: {root}
  logger:
    class_path: fsa_train.loggers.AutoWandbLogger
    init_args: {{save_dir: {root}, name: test}}
  callbacks:
    - class_path: fsa_train.checkpointing.SafeModelCheckpoint
      init_args: {{dirpath: {root / "checkpoints"}, save_last: true, save_top_k: 0,
                   every_n_train_steps: {every}}}
{stop}    - class_path: fsa_train.callbacks.ThroughputMonitor
    - class_path: fsa_train.callbacks.MetricsFile
      init_args: {{path: {root / "metrics.jsonl"}, val_path: {root / "val.jsonl"}}}
    - class_path: fsa_train.callbacks.TrainingSummary
data:
  corpus: {corpus}
  cache_dir: {root / "cache"}
  seq_len: 128
  batch_size: 4
  val_documents: 2
""",
        encoding="utf-8",
    )
    return [
        "fit",
        "--config", "configs/demo.yaml",
        "--config", str(overlay),
        "--data.vocab_size", str(VOCAB),
        "--model.config.n_layer", "2",
        "--model.config.d_model", "64",
        "--model.config.attention", attention,
        "--model.warmup_steps", "5",
        "--model.sample_tokens", "8",
    ]


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_short_training_run_learns_and_reports(small_corpus, tmp_path, attention, capsys,
                                                monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = build_cli(tiny_run_args(small_corpus, tmp_path, attention, steps=40))
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 40
    # A uniform guess costs ln(V); forty steps must learn at least the unigram statistics.
    assert float(metrics["val/loss"]) < math.log(VOCAB) - 1.0
    assert float(metrics["throughput/tokens_per_s"]) > 0
    assert float(metrics["train/grad_norm"]) > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert records[-1]["train/tokens_seen"] == 40 * 4 * 128
    times = [r["train_time_s"] for r in records]
    assert times[0] > 0 and all(b > a for a, b in zip(times, times[1:], strict=False))
    val = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [40]  # the sanity check is not recorded
    assert val[0]["val/loss"] == pytest.approx(float(metrics["val/loss"]))
    assert val[0]["tokens_seen"] == 40 * 4 * 128 and val[0]["train_time_s"] == times[-1]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    printed = capsys.readouterr().out
    assert "validation loss:" in printed and "sample:" in printed and "last.ckpt" in printed


def test_print_config_resolves_links(capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", "configs/demo.yaml", "--data.vocab_size", "512",
                   "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "attention: nsa" in printed and "vocab_size: 512" in printed


@pytest.mark.parametrize(("override", "message"), [
    (["--data.seq_len", "100"], "data.seq_len=100 must be a multiple of model.config.nsa"),
    (["--data.batch_size", "0"], "data.batch_size must be an integer >= 1"),
])
def test_print_config_runs_the_checks_before_work(override, message, capsys, monkeypatch):
    """``--print_config`` refuses what ``fit`` would refuse before any work (one line)."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/demo.yaml", *override, "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_out_of_gpu_memory_is_one_line_with_what_to_lower(capsys, monkeypatch):
    """A run that runs out of GPU memory ends with exit status 3 and one line naming the
    settings that lower memory (the traceback only with FSA_TRAIN_TRACEBACK=1)."""
    import fsa_train.cli as cli

    def out_of_memory(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(cli, "build_cli", out_of_memory)
    monkeypatch.delenv("FSA_TRAIN_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/demo.yaml"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Tried to allocate 2.00 GiB" in err[0], err
    for advice in ("data.batch_size", "sparse_branches", "activation_checkpointing", "zero3"):
        assert advice in err[0], advice
    monkeypatch.setenv("FSA_TRAIN_TRACEBACK", "1")
    with pytest.raises(torch.OutOfMemoryError):
        main(["fit", "--config", "configs/demo.yaml"])


def test_print_config_warns_of_a_topk_that_covers_every_block(capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", "configs/demo.yaml", "--data.seq_len", "128",
                   "--print_config"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert "warning: model.config.nsa.sel_topk" in captured.err and "seq_len: 128" in captured.out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.config.n_kv_hed", "2"], "n_kv_hed"),
        (["--model.config.nsa.sel_topk", "2"], "model.config.nsa.sel_topk=2"),
        (["--model.config.n_kv_head", "3"], "model.config.n_head=4"),
        (["--data.corpus", "/nonexistent/corpus.jsonl"], "/nonexistent/corpus.jsonl"),
    ],
)
def test_bad_config_values_are_rejected_in_one_line(override, message, capsys, monkeypatch,
                                                      tmp_path):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/demo.yaml", "--data.cache_dir", str(tmp_path), *override])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_resume_auto_continues_from_the_newest_complete_checkpoint(small_corpus, tmp_path,
                                                                   monkeypatch):
    """20 steps in one go equal a run stopped at step 10 and continued with `--resume auto`."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("WANDB_MODE", "offline")
    straight = build_cli(tiny_run_args(small_corpus, tmp_path / "straight", "nsa", steps=20))
    first = build_cli(tiny_run_args(small_corpus, tmp_path / "split", "nsa", steps=20, stop_at=10))
    assert first.trainer.global_step == 10
    import wandb

    wandb.finish()  # one process: without it Lightning would reuse the open run whatever the id
    resumed = build_cli(
        tiny_run_args(small_corpus, tmp_path / "split", "nsa", steps=20) + ["--resume", "auto"]
    )
    assert resumed.trainer.global_step == 20
    assert resumed.model.tokens_seen == straight.model.tokens_seen == 20 * 4 * 128
    assert resumed.trainer.logger.version == first.trainer.logger.version  # same wandb run
    assert straight.trainer.logger.version != first.trainer.logger.version
    expected = straight.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    """A save killed midway leaves a `.partial` entry that resuming ignores."""
    import lightning as L

    from fsa_train.checkpointing import SafeModelCheckpoint, find_resume_checkpoint

    class Interrupted(Exception):
        pass

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)))
    checkpoint = SafeModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0,
                                     every_n_train_steps=2)
    trainer = L.Trainer(max_steps=4, callbacks=[checkpoint], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), data)
    good = find_resume_checkpoint(tmp_path)
    assert good is not None and good.name == "last.ckpt"
    good_bytes = good.read_bytes()

    def killed_save(filepath, weights_only=False):
        Path(filepath).write_bytes(b"half a checkpoint")
        raise Interrupted

    trainer.save_checkpoint = killed_save
    with pytest.raises(Interrupted):
        checkpoint._save_checkpoint(trainer, str(tmp_path / "last.ckpt"))
    assert (tmp_path / "last.ckpt.partial").exists()
    assert find_resume_checkpoint(tmp_path) == good
    assert good.read_bytes() == good_bytes
    restored = torch.load(good, weights_only=False)
    assert restored["global_step"] == 4


def test_export_generate_and_validate_a_checkpoint(small_corpus, tmp_path, monkeypatch,
                                                         capsys):
    from fsa_train.export import load_exported

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = build_cli(tiny_run_args(small_corpus, tmp_path, "nsa", steps=4))
    exported = tmp_path / "model.pt"
    main(["export", str(tmp_path / "checkpoints" / "last.ckpt"), str(exported)])
    model, tokenizer = load_exported(exported)
    trained = cli.model.model.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name].float(), rtol=0, atol=0, msg=name)
    assert tokenizer is not None and tokenizer.vocab_size == VOCAB
    capsys.readouterr()
    main(["generate", str(exported), "--prompt", "And God said", "--tokens", "5"])
    assert capsys.readouterr().out.startswith("And God said")
    checked = build_cli(["validate", *tiny_run_args(small_corpus, tmp_path, "nsa", steps=4)[1:],
                         "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")])
    assert math.isfinite(float(checked.trainer.callback_metrics["val/loss"]))


def test_presets_lists_every_shipped_config_with_its_summary(capsys):
    main(["presets"])
    printed = capsys.readouterr().out.splitlines()
    shipped = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))
    assert len(printed) == len(shipped) and len(shipped) >= 10
    for line, path in zip(printed, shipped, strict=True):
        name, _, summary = line.partition("  ")
        assert path.as_posix().endswith(name.strip()) and summary.strip(), line
    assert any("ZeRO stage 3" in line for line in printed)


def test_limit_val_batches_one_means_one_batch(small_corpus, tmp_path, monkeypatch):
    """Lightning types the key Union[float, int], so the parser turns `1` into 1.0 (100 %)."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = tiny_run_args(small_corpus, tmp_path, "dense", steps=2)
    cli = build_cli([*args, "--trainer.limit_val_batches", "1"])
    assert cli.trainer.limit_val_batches == 1 and cli.trainer.num_val_batches == [1]


@pytest.mark.parametrize("command", ["export", "generate", "passkey", "position-loss",
                                     "prepare-data", "train-tokenizer", "plot"])
def test_tool_commands_refuse_abbreviated_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "a", "b", "--ov"])  # a prefix of no option, or of --overwrite / --out
    assert exit_info.value.code == 2
    unrecognized = [line for line in capsys.readouterr().err.splitlines()
                    if "unrecognized arguments:" in line]
    assert unrecognized and unrecognized[0].endswith(" --ov")
