"""The ``fsa-train`` command: ``fit`` / ``validate`` through LightningCLI from YAML configs."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from fsa_train.config import ConfigError
from fsa_train.data.datamodule import TextDataModule
from fsa_train.data.prepare import DatasetFormatError
from fsa_train.lit_module import LitGPT


class FSATrainCLI(LightningCLI):
    """LightningCLI with the tokenizer's vocabulary size wired into the model config."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size")


def build_cli(argv: list[str]) -> FSATrainCLI:
    """Parse ``argv`` (a subcommand and its options) and run it; returns the finished CLI."""
    return FSATrainCLI(LitGPT, TextDataModule, save_config_kwargs={"overwrite": True}, args=argv)


USER_ERRORS = (ConfigError, DatasetFormatError, FileNotFoundError, FileExistsError)
"""Errors caused by the user's config or files: reported as one line, without a traceback."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fsa-train`` console script.

    A bad config value or a missing or corrupt data file ends the run with one line on stderr
    (exit status 2); set ``FSA_TRAIN_TRACEBACK=1`` to see the full traceback instead.
    """
    try:
        build_cli(argv if argv is not None else sys.argv[1:])
    except USER_ERRORS as error:
        if os.environ.get("FSA_TRAIN_TRACEBACK") == "1":
            raise
        print(f"fsa-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
