"""Passkey retrieval: can the model recall a 5-digit key hidden at some depth of a long prompt?

A prompt of a target token length is built from neutral filler sentences with the sentence
"The pass key is 71432. Remember it. 71432 is the pass key." inserted at a chosen depth (0 = at
the start of the filler, 1 = at its end), and ends with "What is the pass key? The pass key is".

The headline metric is greedy exact match, computed without a generation loop: one packed
forward over ``prompt + key[:-1]`` (teacher forcing) gives the argmax at every key position, and
greedy decoding reproduces the key exactly iff every one of those argmaxes is the key's token
(greedy only diverges at the first mismatch). Per-token accuracy and the key's log-likelihood
are reported beside it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from fsa_train.config import ConfigError
from fsa_train.evaluate.runtime import (
    add_grid_arguments,
    add_model_arguments,
    evaluate_grid,
    load_model,
    parse_grid_arguments,
    precision,
    trial_rng,
    write_result,
)

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it."
)
QUESTION = "What is the pass key? The pass key is"


class TextTokenizer(Protocol):
    """What prompt construction needs from a tokenizer (``fsa_train.data.tokenizer.Tokenizer``)."""

    bos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def key_sentence(key: str) -> str:
    """The sentence that hides ``key`` in the filler."""
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def answer_ids(tokenizer: TextTokenizer, key: str) -> list[int]:
    """Tokens of ``key`` as the continuation of :data:`QUESTION` (as the model would emit it)."""
    question = tokenizer.encode(QUESTION)
    full = tokenizer.encode(f"{QUESTION} {key}")
    if full[: len(question)] == question and len(full) > len(question):
        return full[len(question):]
    return tokenizer.encode(key)


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: ``ids`` (BOS, intro, filler with the key sentence, question) and the answer.

    ``key_start``/``key_end`` delimit the key sentence in ``ids``; ``hay_start``/``hay_end`` the
    filler (key sentence included); ``depth`` is where the key sentence actually sits in it.
    """

    ids: list[int]
    answer: list[int]
    key: str
    key_start: int
    key_end: int
    hay_start: int
    hay_end: int

    @property
    def depth(self) -> float:
        movable = (self.hay_end - self.hay_start) - (self.key_end - self.key_start)
        return (self.key_start - self.hay_start) / movable if movable > 0 else 0.0


def build_prompt(
    tokenizer: TextTokenizer, length: int, depth: float, key: str, offset: int = 0
) -> PasskeyPrompt:
    """A prompt of at most ``length`` tokens (and more than ``length`` minus one filler sentence)
    with ``key`` at the sentence boundary nearest to ``depth`` of the filler.

    Sentences are tokenized one by one and concatenated (each starts a new word), so lengths and
    the key's position are exact. ``offset`` rotates which filler sentence comes first.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = [tokenizer.bos_id, *tokenizer.encode(INTRO)]
    needle = tokenizer.encode(key_sentence(key))
    question = tokenizer.encode(QUESTION)
    room = length - len(head) - len(needle) - len(question)
    units = [tokenizer.encode(sentence) for sentence in FILLER]
    if room < 0:
        raise ConfigError(f"passkey length {length} is too short for the prompt "
                          f"({length - room} tokens without filler)")
    filler: list[int] = []
    boundaries = [0]
    index = offset
    while len(filler) + len(units[index % len(units)]) <= room:
        filler += units[index % len(units)]
        boundaries.append(len(filler))
        index += 1
    cut = min(boundaries, key=lambda b: (abs(b - depth * len(filler)), b))
    ids = head + filler[:cut] + needle + filler[cut:] + question
    key_start = len(head) + cut
    return PasskeyPrompt(
        ids=ids,
        answer=answer_ids(tokenizer, key),
        key=key,
        key_start=key_start,
        key_end=key_start + len(needle),
        hay_start=len(head),
        hay_end=len(head) + len(filler) + len(needle),
    )


def greedy_continuation(predicted: Sequence[int], answer: Sequence[int]) -> list[int]:
    """What greedy decoding emits for ``len(answer)`` steps, given the teacher-forced argmaxes
    ``predicted`` (argmax after ``prompt + answer[:i]`` at step i): identical up to and including
    the first mismatch; the steps after it would need their own forward passes and are omitted.
    """
    out: list[int] = []
    for guess, truth in zip(predicted, answer, strict=True):
        out.append(int(guess))
        if guess != truth:
            break
    return out


def exact_match(generated: Sequence[int], answer: Sequence[int]) -> bool:
    """Whether the generated tokens are exactly the answer's."""
    return list(generated) == list(answer)


@torch.no_grad()
def score_continuation(model: torch.nn.Module, prompt: Sequence[int], answer: Sequence[int],
                       device: torch.device, precision_name: str = "auto") -> dict:
    """Greedy exact match, per-token accuracy and log-likelihood of ``answer`` after ``prompt``:
    one teacher-forced forward over ``prompt + answer[:-1]``."""
    sequence = [*prompt, *answer[:-1]]
    ids = torch.tensor(sequence, device=device, dtype=torch.int64)
    cu_seqlens = torch.tensor([0, len(sequence)], device=device, dtype=torch.int32)
    n = len(answer)
    with precision(device, precision_name):
        hidden = model(ids, cu_seqlens)
        logits = model.head(hidden[-n:]).float()
    truth = torch.tensor(list(answer), device=device)
    log_probs = torch.log_softmax(logits, dim=-1)
    predicted = logits.argmax(dim=-1).tolist()
    generated = greedy_continuation(predicted, answer)
    return {
        "exact_match": exact_match(generated, answer),
        "token_accuracy": sum(p == a for p, a in zip(predicted, answer, strict=True)) / n,
        "key_logprob": float(log_probs.gather(1, truth[:, None]).sum()),
        "generated": generated,
    }


def score_prompt(model: torch.nn.Module, prompt: PasskeyPrompt, device: torch.device,
                 precision_name: str = "auto") -> dict:
    """:func:`score_continuation` of a passkey prompt, with its key, length and depth."""
    score = score_continuation(model, prompt.ids, prompt.answer, device, precision_name)
    return {"key": prompt.key, "prompt_tokens": len(prompt.ids), "depth": prompt.depth, **score}


def evaluate_passkey(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int = 5,
    seed: int = 0,
    device: torch.device | None = None,
    precision_name: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Score ``trials`` random keys per (length, depth); returns cells and overall accuracy.
    ``progress`` receives one line per finished cell."""
    device = device or next(model.parameters()).device

    def score_trial(length: int, depth: float, trial: int) -> dict:
        rng = trial_rng("passkey", seed, length, depth, trial)
        key = str(rng.randint(10000, 99999))
        prompt = build_prompt(tokenizer, length, depth, key, rng.randrange(len(FILLER)))
        return score_prompt(model, prompt, device, precision_name)

    cells, overall = evaluate_grid(
        "passkey", lengths, depths, trials, score_trial,
        {"accuracy": "exact_match", "token_accuracy": "token_accuracy",
         "mean_key_logprob": "key_logprob"}, progress)
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed,
            "accuracy": overall, "cells": cells}


def format_table(result: dict) -> str:
    """Exact-match accuracy as a Markdown table: one row per length, one column per depth."""
    accuracy = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}
    depths = result["depths"]
    lines = [
        "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |",
        "|---|" + "---|" * (len(depths) + 1),
    ]
    for length in result["lengths"]:
        row = [accuracy[(length, d)] for d in depths]
        lines.append(f"| {length} | " + " | ".join(f"{a:.2f}" for a in row)
                     + f" | {sum(row) / len(row):.2f} |")
    lines.append(f"\noverall exact match: {result['accuracy']:.3f} "
                 f"({result['trials']} trials per cell, seed {result['seed']})")
    return "\n".join(lines)


def passkey_main(argv: list[str]) -> None:
    """``fsa-train passkey EXPORTED --lengths 4096 8192 --depths 0 0.5 1 --trials 5``."""
    parser = argparse.ArgumentParser(prog="fsa-train passkey",
                                     description="Passkey retrieval on an exported model.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)
    add_model_arguments(parser)
    add_grid_arguments(parser, [4096, 8192, 16384, 32768], [0.0, 0.25, 0.5, 0.75, 1.0], 5)
    args = parse_grid_arguments(parser, argv)
    device, model, tokenizer = load_model(args)
    result = evaluate_passkey(model, tokenizer, args.lengths, args.depths, args.trials,
                              args.seed, device, args.precision,
                              progress=lambda line: print(line, file=sys.stderr, flush=True))
    result["exported"] = str(args.exported)
    print(format_table(result))
    write_result(result, args.out)
