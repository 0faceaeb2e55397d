"""The ``fsa-train`` command.

``fit`` / ``validate`` run through LightningCLI from YAML configs; ``prepare-data`` and
``train-tokenizer`` turn a corpus into token shards and a sentencepiece model; ``export`` writes
a checkpoint as one consolidated file and ``generate`` samples text from it.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from lightning.pytorch.cli import LightningCLI

from fsa_train.checkpointing import CheckpointError, find_resume_checkpoint, read_checkpoint_meta
from fsa_train.config import ConfigError, GPTConfig
from fsa_train.data.datamodule import TextDataModule
from fsa_train.data.prepare import DatasetFormatError
from fsa_train.lit_module import LitGPT
from fsa_train.loggers import AutoWandbLogger
from fsa_train.runs import (
    RUN_DIR_ENV,
    check_before_work,
    check_kernel_device,
    check_resumable,
    default_run_name,
    inherited_run_dir,
    latest_run_dir,
    new_run_dir,
    run_identity,
    shared_run_dir,
)


class FSATrainCLI(LightningCLI):
    """LightningCLI with one directory per run (:mod:`fsa_train.runs`), the tokenizer's
    vocabulary size wired into the model config, and ``--resume auto | PATH``: continue from
    this run's complete checkpoint of the highest step, after checking that it belongs to this
    run (model config, tokenizer, dataset)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate`` (the model has no test or predict step)."""
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size")
        parser.add_argument(
            "--run_dir", type=str | None, default=None,
            help="Directory of every output of the run (checkpoints, wandb, config, metrics); "
            "default: trainer.default_root_dir if set, else runs/<name>-<timestamp>.",
        )
        parser.add_argument(
            "--name", type=str | None, default=None,
            help="Run name (wandb run name and run-directory prefix); default: from the config "
            "files, e.g. gpt-150m-nsa.",
        )
        parser.add_argument(
            "--resume", type=str | None, default=None,
            help="(fit) 'auto': continue this run from its complete checkpoint of the highest "
            "step (start fresh if there is none); or a checkpoint path. Refused when the "
            "checkpoint's model config, tokenizer or dataset differ from this run's.",
        )

    def parse_arguments(self, parser, args) -> None:
        """``--print_config`` prints and exits inside the parser, before any hook: the same
        arguments without it are parsed first and given the checks a run makes before work, so
        a config that could not train is refused there too (one line). The words are kept
        (:attr:`command_words`): ``validate`` asks which options came from the command line."""
        words = list(sys.argv[1:] if args is None else args)
        self.command_words = [str(w) for w in words]
        if any(_is_print_config(word) for word in words):
            config = parser.parse_args([w for w in words if not _is_print_config(w)])
            sub = config.get("subcommand")
            if sub is not None:
                for warning in check_config_before_work(config[sub]):
                    print(f"fsa-train: warning: {warning}", file=sys.stderr)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path``'s hyperparameters while parsing: a file that is
        not a readable checkpoint is a one-line :class:`CheckpointError` first."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        path = config.get("ckpt_path") if config is not None else None
        if path:
            read_checkpoint_meta(path)
        super()._parse_ckpt_path()

    # ---- before anything is built: where the run's outputs go ------------------------------

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        resume = config.get("resume")
        if resume is not None and self.subcommand != "fit" and not resume_on_command_line(
                getattr(self, "command_words", [])):
            # from a fit run's saved config.yaml (`validate --config <run>/config.yaml`):
            # how that run was launched, not a request to this command
            config.resume = resume = None
        if resume is not None and self.subcommand != "fit":
            raise ConfigError(f"--resume is for fit; {self.subcommand} takes --ckpt_path")
        if resume is not None and config.get("ckpt_path"):
            raise ConfigError("--resume and --ckpt_path both name the checkpoint to start from: "
                              "give one of them")
        name = config.get("name") or default_run_name(config.get("config") or [])
        run_dir = config.get("run_dir") or config.trainer.get("default_root_dir")
        if not run_dir and self.subcommand == "validate" and config.get("ckpt_path"):
            run_dir = run_dir_of_checkpoint(config.ckpt_path)
        run_dir = run_dir or inherited_run_dir()
        shared = shared_run_dir(name) if not run_dir else None
        if not run_dir and resume == "auto":
            run_dir = (shared if shared is not None and shared.is_dir() else None) \
                or latest_run_dir(name)
        if not run_dir and resume not in (None, "auto"):
            run_dir = run_dir_of_checkpoint(resume)
        run_dir = str(run_dir or shared or new_run_dir(name))
        os.environ[RUN_DIR_ENV] = run_dir  # for the ranks Lightning starts from this process
        self.run_dir, self.run_name = run_dir, name
        self.run_dir_existed = Path(run_dir).exists()
        config.trainer.default_root_dir = run_dir
        for logger in _entries(config.trainer.get("logger")):
            args = logger.get("init_args")
            if args is not None and "save_dir" in args and not args.get("save_dir"):
                args.save_dir = run_dir
            if args is not None and "name" in args and (config.get("name")
                                                         or not args.get("name")):
                args.name = name
        for callback in _entries(config.trainer.get("callbacks")):
            args = callback.get("init_args")
            if args is not None and callback.get("class_path", "").endswith("ModelCheckpoint") \
                    and not args.get("dirpath"):
                args.dirpath = os.path.join(run_dir, "checkpoints")

    # ---- before fit / validate: which checkpoint, and is it this run's ---------------------

    def after_instantiate_classes(self) -> None:
        """Lightning types ``limit_*_batches`` as ``Union[float, int]``, so the parser turns
        ``1`` into ``1.0``, which Lightning reads as 100 %: a whole number counts batches here
        (``1``: one batch; null: all of them)."""
        super().after_instantiate_classes()
        raw = self.config[self.subcommand].trainer
        for key in ("limit_train_batches", "limit_val_batches"):
            value = raw.get(key)
            if isinstance(value, float) and value.is_integer() and value >= 1:
                setattr(self.trainer, key, int(value))

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a start that fails leaves no empty run directory behind."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_if_empty(getattr(self, "run_dir", None),
                            getattr(self, "run_dir_existed", True))
            raise

    def _check_before_work(self) -> None:
        check_kernel_device(self.model.config, self.trainer.strategy.root_device)
        for warning in check_before_work(self.model.config, self.datamodule):
            print(f"fsa-train: warning: {warning}", file=sys.stderr)

    def before_fit(self) -> None:
        self._check_before_work()
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
        meta = read_checkpoint_meta(resume)
        record = meta["run"]
        check_resumable(resume, record.get("identity"),
                        run_identity(self.model.config, self.datamodule))
        print(f"fsa-train: resuming from {resume} (step {meta['global_step']})")
        self.config_init["fit"]["ckpt_path"] = resume
        self._continue_wandb_run(record.get("wandb_run_id"))

    def before_validate(self) -> None:
        self._check_before_work()
        path = self.config_init["validate"].get("ckpt_path")
        if path:
            self._continue_wandb_run(read_checkpoint_meta(path)["run"].get("wandb_run_id"))

    def _continue_wandb_run(self, run_id: str | None) -> None:
        for logger in self.trainer.loggers:
            if run_id and isinstance(logger, AutoWandbLogger) and logger.version is None:
                logger.continue_run(run_id)


def _is_print_config(word: str) -> bool:
    return word == "--print_config" or word.startswith("--print_config=")


def check_config_before_work(config) -> list[str]:
    """:func:`~fsa_train.runs.check_before_work` on a parsed (not instantiated) subcommand
    config: its model config built (and so validated) and its data sizes."""
    model = config.get("model")
    model_config = model.get("config") if model is not None else None
    if model_config is None or config.get("data") is None:
        return []
    as_dict = model_config.as_dict() if hasattr(model_config, "as_dict") else dict(model_config)
    data = config.data
    sizes = SimpleNamespace(seq_len=data.get("seq_len"), batch_size=data.get("batch_size"))
    return check_before_work(GPTConfig(**as_dict), sizes)


def remove_if_empty(run_dir: str | None, existed: bool) -> None:
    """Remove ``run_dir`` (made by this command) when it holds no file, only empty folders."""
    if run_dir is None or existed or not Path(run_dir).is_dir():
        return
    if any(p.is_file() for p in Path(run_dir).rglob("*")):
        return
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)


def _entries(value) -> list:
    """The class entries of a ``trainer.logger`` / ``trainer.callbacks`` value (one or a list;
    booleans and None have none)."""
    if value is None or isinstance(value, bool):
        return []
    items = value if isinstance(value, list) else [value]
    return [item for item in items if hasattr(item, "get")]


def resume_on_command_line(words: list[str]) -> bool:
    """Whether ``--resume`` is among the command's own words (not only in a config file)."""
    return any(w == "--resume" or w.startswith("--resume=") for w in words)


def run_dir_of_checkpoint(path: str | os.PathLike) -> str | None:
    """The run directory a checkpoint lives in (``<run>/checkpoints/x.ckpt``), or None."""
    parent = Path(path).resolve().parent
    return str(parent.parent) if parent.name == "checkpoints" else None


def checkpoint_directory(trainer) -> str | None:
    """Directory of the run's checkpoints (the checkpoint callback's ``dirpath``)."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    return callback.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")


def build_cli(argv: list[str] | None = None) -> FSATrainCLI:
    """Parse ``argv`` (default: the command line) and run the subcommand; returns the CLI.

    ``fit`` saves its resolved config as ``config.yaml`` in the run directory; ``validate`` as
    ``config.validate.yaml`` beside it, so it never overwrites the training run's."""
    words = list(argv if argv is not None else sys.argv[1:])
    sub = next((w for w in words if w in FSATrainCLI.subcommands()), "fit")
    filename = "config.yaml" if sub == "fit" else f"config.{sub}.yaml"
    return FSATrainCLI(LitGPT, TextDataModule, args=argv,
                       save_config_kwargs={"overwrite": True, "config_filename": filename},
                       parser_kwargs={"allow_abbrev": False})


TOOL_COMMANDS = {
    "prepare-data": ("fsa_train.data.commands", "prepare_data_main"),
    "train-tokenizer": ("fsa_train.data.commands", "train_tokenizer_main"),
    "export": ("fsa_train.export", "export_main"),
    "generate": ("fsa_train.export", "generate_main"),
    "passkey": ("fsa_train.evaluate.passkey", "passkey_main"),
    "retrieval": ("fsa_train.evaluate.retrieval", "retrieval_main"),
    "position-loss": ("fsa_train.evaluate.position_loss", "position_loss_main"),
    "presets": ("fsa_train.presets", "presets_main"),
    "plot": ("fsa_train.plotting", "plot_main"),
}
"""Subcommands outside LightningCLI: corpus → tokenizer or token shards; checkpoint → one file;
exported model → text, passkey retrieval, loss by token position."""

TOOL_SUMMARIES = {
    "prepare-data": "tokenize a corpus into a dataset directory of token shards",
    "train-tokenizer": "train a sentencepiece BPE tokenizer on a corpus",
    "export": "consolidate a checkpoint (file or ZeRO directory) into one file",
    "generate": "sample text from an exported model",
    "passkey": "passkey retrieval accuracy of an exported model by length and depth",
    "retrieval": "multi-key retrieval accuracy of an exported model by length and distance",
    "position-loss": "loss by token position of an exported model on a dataset",
    "presets": "list the shipped configs (configs/**/*.yaml) with one line each",
    "plot": "loss, learning rate, tokens/s and MFU of a run directory to a PNG",
}

USER_ERRORS = (ConfigError, CheckpointError, DatasetFormatError, FileNotFoundError,
               FileExistsError)
"""Errors caused by the user's config or files: reported as one line, without a traceback."""


def print_overview() -> None:
    """The command list ``fsa-train --help`` starts with (LightningCLI's help of fit/validate
    follows)."""
    print("fsa-train: long-context GPT pretraining with Native Sparse Attention\n\n"
          "training (LightningCLI; `fsa-train fit --help` for every option):\n"
          "  fit        train from YAML configs (--config ...), --resume auto | PATH\n"
          "  validate   evaluate a checkpoint (--ckpt_path)\n"
          "tools (`fsa-train COMMAND --help`):")
    for name, summary in TOOL_SUMMARIES.items():
        print(f"  {name:<16}{summary}")
    print()


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
        if not words or words[0] in ("-h", "--help"):
            print_overview()
            if not words:
                raise SystemExit(2)
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
            f"data.seq_len, set model.config.activation_checkpointing (sparse_branches, "
            f"attention or mlp recompute part of each block, true all of it), or shard with a "
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
