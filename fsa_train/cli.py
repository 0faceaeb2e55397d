"""The ``fsa-train`` command.

``fit`` / ``validate`` run through LightningCLI from YAML configs; ``prepare-data`` and
``train-tokenizer`` turn a corpus into token shards and a sentencepiece model; ``export`` writes
a checkpoint as one consolidated file and ``generate`` samples text from it.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
from lightning.pytorch.cli import LightningCLI

from fsa_train.checkpointing import find_resume_checkpoint, read_run_info
from fsa_train.config import ConfigError
from fsa_train.data.datamodule import TextDataModule
from fsa_train.data.prepare import DatasetFormatError
from fsa_train.lit_module import LitGPT
from fsa_train.loggers import AutoWandbLogger


class FSATrainCLI(LightningCLI):
    """LightningCLI with the tokenizer's vocabulary size wired into the model config and
    ``--resume auto`` (continue from the newest complete checkpoint, or start fresh)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size")
        parser.add_argument(
            "--resume",
            type=str | None,
            default=None,
            help="'auto': resume from the newest complete checkpoint of the run's checkpoint "
            "directory (start fresh if there is none); or a checkpoint path.",
        )

    def before_fit(self) -> None:
        resume = self.config_init["fit"].get("resume")
        if resume is None:
            return
        if resume == "auto":
            directory = checkpoint_directory(self.trainer)
            found = find_resume_checkpoint(directory) if directory else None
            if found is None:
                print(f"fsa-train: --resume auto: no checkpoint in {directory}; starting fresh")
                return
            resume = str(found)
        print(f"fsa-train: resuming from {resume}")
        self.config_init["fit"]["ckpt_path"] = resume
        run_id = read_run_info(os.path.dirname(os.path.abspath(resume))).get("wandb_run_id")
        for logger in self.trainer.loggers:
            if run_id and isinstance(logger, AutoWandbLogger) and logger.version is None:
                logger.continue_run(run_id)


def checkpoint_directory(trainer) -> str | None:
    """Directory of the run's checkpoints (the checkpoint callback's ``dirpath``)."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    return callback.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")


def build_cli(argv: list[str] | None = None) -> FSATrainCLI:
    """Parse ``argv`` (default: the command line) and run the subcommand; returns the CLI."""
    return FSATrainCLI(LitGPT, TextDataModule, save_config_kwargs={"overwrite": True}, args=argv)


TOOL_COMMANDS = {
    "prepare-data": ("fsa_train.data.commands", "prepare_data_main"),
    "train-tokenizer": ("fsa_train.data.commands", "train_tokenizer_main"),
    "export": ("fsa_train.export", "export_main"),
    "generate": ("fsa_train.export", "generate_main"),
    "passkey": ("fsa_train.evaluate.passkey", "passkey_main"),
    "position-loss": ("fsa_train.evaluate.position_loss", "position_loss_main"),
}
"""Subcommands outside LightningCLI: corpus → tokenizer or token shards; checkpoint → one file;
exported model → text, passkey retrieval, loss by token position."""

USER_ERRORS = (ConfigError, DatasetFormatError, FileNotFoundError, FileExistsError)
"""Errors caused by the user's config or files: reported as one line, without a traceback."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fsa-train`` console script.

    A bad config value or a missing or corrupt data file ends the run with one line on stderr
    (exit status 2); set ``FSA_TRAIN_TRACEBACK=1`` to see the full traceback instead.
    """
    words = list(argv if argv is not None else sys.argv[1:])
    if torch.cuda.is_available():
        # fp32 matrix products (fp32 runs, the LM head under autocast) may use TF32 tensor cores.
        torch.set_float32_matmul_precision("high")
    try:
        if words and words[0] in TOOL_COMMANDS:
            module, function = TOOL_COMMANDS[words[0]]
            getattr(importlib.import_module(module), function)(words[1:])
        else:
            build_cli(argv)
    except torch.OutOfMemoryError as error:
        if os.environ.get("FSA_TRAIN_TRACEBACK") == "1":
            raise
        first_line = str(error).splitlines()[0] if str(error) else "out of memory"
        print(
            f"fsa-train: error: out of GPU memory ({first_line}). Lower data.batch_size or "
            f"data.seq_len, set model.config.activation_checkpointing: true, or shard with a "
            f"ZeRO preset (configs/strategy/zero2.yaml, zero3.yaml)",
            file=sys.stderr,
        )
        raise SystemExit(3) from None
    except USER_ERRORS as error:
        if os.environ.get("FSA_TRAIN_TRACEBACK") == "1":
            raise
        print(f"fsa-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
