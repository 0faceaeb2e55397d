"""Export a training checkpoint (a Lightning file or a DeepSpeed ZeRO directory) to one
consolidated file holding the model config, fp32 weights and the tokenizer, and load it back
for evaluation or generation without Lightning or DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from fsa_train.checkpointing import CheckpointError, read_checkpoint_meta
from fsa_train.config import GPTConfig, NSAConfig
from fsa_train.model import GPT

EXPORT_FORMAT = 1
MODEL_PREFIX = "model."


def _read_training_checkpoint(path: Path) -> dict:
    """The Lightning checkpoint dict; ZeRO directories are consolidated to fp32 first."""
    if path.is_dir():
        from lightning.pytorch.utilities.deepspeed import (
            convert_zero_checkpoint_to_fp32_state_dict,
        )

        with tempfile.TemporaryDirectory() as scratch:
            single = Path(scratch) / "consolidated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(single))
            return torch.load(single, map_location="cpu", weights_only=False)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def export_checkpoint(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write ``output``: ``{"format", "config", "state_dict", "tokenizer_model", "step"}``.

    Loadable with ``torch.load(..., weights_only=True)``: the config is a plain dict, weights
    are fp32 tensors without the Lightning module prefix, the tokenizer is its model bytes. An
    existing ``output`` is kept unless ``overwrite``; a checkpoint that is not readable is a
    one-line :class:`CheckpointError` before anything is written.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    read_checkpoint_meta(checkpoint)  # a truncated or foreign file fails here, in one line
    state = _read_training_checkpoint(Path(checkpoint))
    hparams = state.get("hyper_parameters") or {}
    config = hparams.get("config")
    if config is None:
        raise ValueError(f"{checkpoint}: no model config in the checkpoint's hyper_parameters")
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    weights = {
        name[len(MODEL_PREFIX):]: tensor.float()
        for name, tensor in state["state_dict"].items()
        if name.startswith(MODEL_PREFIX)
    }
    tokenizer_path = (state.get("fsa_train") or {}).get("tokenizer_path")
    tokenizer_bytes = None
    if tokenizer_path and Path(tokenizer_path).is_file():
        tokenizer_bytes = Path(tokenizer_path).read_bytes()
    payload = {
        "format": EXPORT_FORMAT,
        "config": config,
        "state_dict": weights,
        "tokenizer_model": tokenizer_bytes,
        "step": state.get("global_step"),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, output)
    return output


def load_exported(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from an exported file; tokenizer is None if none was recorded."""
    if not Path(path).is_file():
        raise CheckpointError(f"exported model not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"not a readable fsa-train export: {path} ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not an fsa-train export (format {found!r}); "
                              "`fsa-train export CHECKPOINT OUTPUT` writes one")
    fields = dict(payload["config"])
    fields["nsa"] = NSAConfig(**fields["nsa"])
    if fields.get("fused_ops") == "liger":
        # the fused ops change speed, not the model: an export runs wherever it is loaded
        fields["fused_ops"] = "auto"
    model = GPT(GPTConfig(**fields))
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    tokenizer = None
    if payload.get("tokenizer_model"):
        from fsa_train.data.tokenizer import load_tokenizer

        cache = Path(str(path) + ".tokenizer.model")
        if not cache.is_file() or cache.read_bytes() != payload["tokenizer_model"]:
            cache.write_bytes(payload["tokenizer_model"])
        tokenizer = load_tokenizer(cache)
    return model, tokenizer


def export_main(argv: list[str]) -> None:
    """``fsa-train export CHECKPOINT OUTPUT``."""
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False,
        prog="fsa-train export",
        description="Consolidate a checkpoint (file or ZeRO directory) into one file.",
    )
    parser.add_argument("checkpoint", help="Lightning .ckpt file or DeepSpeed checkpoint dir")
    parser.add_argument("output", help="the consolidated file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    args = parser.parse_args(argv)
    path = export_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {path}")


def generate_main(argv: list[str]) -> None:
    """``fsa-train generate EXPORTED --prompt TEXT``: sample from an exported model."""
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="fsa-train generate",
                                     description="Sample text from an exported model.")
    parser.add_argument("exported", help="file written by `fsa-train export`")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_exported(args.exported, device)
    if tokenizer is None:
        raise ValueError(f"{args.exported}: the export holds no tokenizer; cannot encode a prompt")
    prompt = [tokenizer.bos_id, *tokenizer.encode(args.prompt)]
    generator = torch.Generator().manual_seed(args.seed)
    new = model.generate(prompt, args.tokens, args.temperature, args.top_k,
                         stop_token=tokenizer.eos_id, generator=generator)
    print(tokenizer.decode(prompt[1:] + new))
