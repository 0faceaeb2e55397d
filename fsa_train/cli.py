"""The ``fsa-train`` command: ``fit`` / ``validate`` through LightningCLI from YAML configs."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from fsa_train.data.datamodule import TextDataModule
from fsa_train.lit_module import LitGPT


class FSATrainCLI(LightningCLI):
    """LightningCLI with the tokenizer's vocabulary size wired into the model config."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fsa-train`` console script."""
    FSATrainCLI(
        LitGPT,
        TextDataModule,
        save_config_kwargs={"overwrite": True},
        args=argv if argv is not None else sys.argv[1:],
    )


if __name__ == "__main__":
    main()
