"""Multi-key retrieval by distance: does the model find the one key it is asked for?

The documents are those the training mixture makes (:mod:`fsa_train.data.retrieval_mix`): ``keys``
sentences "The pass key of the otter is 48213." in natural text (the bundled KJV corpus unless
``--filler`` names another JSONL corpus), ending with a question about one of them. The asked
sentence sits at a chosen depth of the text, so each cell of the table is one distance from key
to question. Scored like the passkey test (greedy exact match from one teacher-forced forward).

Beside exact match the table reports how often the model answered with *another* key of the
document (greedy decoding would emit it exactly; one more forward per other key): a model that
copies some key without finding the right one scores about ``(keys - 1) / keys`` there and
``1 / keys`` in exact match, which is the chance level to read the accuracy against (guessing
five digits blind is near 0).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fsa_train.data.retrieval_mix import (
    RetrievalDocument,
    RetrievalTokenizer,
    build_document,
    question,
)
from fsa_train.evaluate.passkey import score_continuation
from fsa_train.evaluate.runtime import (
    add_grid_arguments,
    add_model_arguments,
    evaluate_grid,
    load_model,
    parse_grid_arguments,
    trial_rng,
    write_result,
)

FILLER_TOKENS = 1 << 18
"""Natural-text tokens read for the filler (cycled when a document needs more)."""


def natural_filler(tokenizer: RetrievalTokenizer, path: str | Path | None = None,
                   n_tokens: int = FILLER_TOKENS) -> list[int]:
    """Tokens of a JSONL corpus (default: the bundled KJV), documents joined, up to
    ``n_tokens``."""
    from fsa_train.data.corpus import demo_corpus_path, read_jsonl_documents

    tokens: list[int] = []
    for text in read_jsonl_documents(path or demo_corpus_path()):
        tokens += tokenizer.encode(text)
        if len(tokens) >= n_tokens:
            break
    if not tokens:
        raise ValueError(f"{path}: no text to use as filler")
    return tokens[:n_tokens]


def other_answers(tokenizer: RetrievalTokenizer, doc: RetrievalDocument) -> list[list[int]]:
    """The answer tokens the question would have if it asked each other key of ``doc``."""
    asked = question(doc.needles[doc.asked][1])
    prompt = tokenizer.encode(asked)
    return [tokenizer.encode(f"{asked} {key}")[len(prompt):]
            for i, (_, _, key) in enumerate(doc.needles) if i != doc.asked]


def evaluate_retrieval(
    model: torch.nn.Module,
    tokenizer: RetrievalTokenizer,
    filler: Sequence[int],
    lengths: Sequence[int],
    depths: Sequence[float],
    keys: int = 4,
    trials: int = 10,
    seed: int = 0,
    device: torch.device | None = None,
    precision_name: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Score ``trials`` documents per (length, depth of the asked key); returns the cells."""
    device = device or next(model.parameters()).device

    def score_trial(length: int, depth: float, trial: int) -> dict:
        rng = trial_rng("retrieval", seed, length, depth, trial)
        offset = rng.randrange(len(filler))
        text = [*filler[offset:], *filler[:offset]]
        doc = build_document(tokenizer, text, length, keys, rng, asked_depth=depth)
        start, n = doc.answer
        prompt = doc.ids[:start]
        score = score_continuation(model, prompt, doc.ids[start:start + n], device,
                                   precision_name)
        other = not score["exact_match"] and any(
            score_continuation(model, prompt, answer, device, precision_name)["exact_match"]
            for answer in other_answers(tokenizer, doc))
        return {"distance": doc.distance, "other_key": other, **score}

    cells, overall = evaluate_grid(
        "retrieval", lengths, depths, trials, score_trial,
        {"mean_distance": "distance", "accuracy": "exact_match", "other_key": "other_key",
         "mean_key_logprob": "key_logprob"}, progress)
    return {"lengths": list(lengths), "depths": list(depths), "keys": keys, "trials": trials,
            "seed": seed, "chance": 1.0 / keys, "accuracy": overall, "cells": cells}


def format_table(result: dict) -> str:
    """Exact match by length (rows) and depth of the asked key (columns; distance to the question
    shrinks as depth grows), then the rate of answering another key of the document."""
    cell = {(c["length"], c["depth"]): c for c in result["cells"]}
    depths = result["depths"]
    head = "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " |"
    rule = "|---|" + "---|" * len(depths)
    lines = ["Exact match (mean distance from key to question, tokens):", "", head, rule]
    for length in result["lengths"]:
        lines.append(f"| {length} | " + " | ".join(
            f"{cell[(length, d)]['accuracy']:.2f} ({cell[(length, d)]['mean_distance']:.0f})"
            for d in depths) + " |")
    lines += ["", "Answered another key of the document:", "", head, rule]
    for length in result["lengths"]:
        lines.append(f"| {length} | " + " | ".join(
            f"{cell[(length, d)]['other_key']:.2f}" for d in depths) + " |")
    lines.append(f"\noverall exact match {result['accuracy']:.3f}; copying a random key of the "
                 f"document would score {result['chance']:.2f} ({result['keys']} keys, "
                 f"{result['trials']} trials per cell, seed {result['seed']})")
    return "\n".join(lines)


def retrieval_main(argv: list[str]) -> None:
    """``fsa-train retrieval EXPORTED --lengths 8192 16384 32768 --keys 4 --trials 10``."""
    parser = argparse.ArgumentParser(prog="fsa-train retrieval",
                                     description="Multi-key retrieval by distance on an exported "
                                                 "model.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)
    add_model_arguments(parser)
    add_grid_arguments(parser, [8192, 16384, 32768], [0.0, 0.25, 0.5, 0.75, 0.95], 10)
    parser.add_argument("--keys", type=int, default=4, help="key sentences per document")
    parser.add_argument("--filler", default=None,
                        help="JSONL corpus for the natural text (default: the bundled KJV)")
    parser.add_argument("--plot", default=None, help="a PNG heatmap of the exact match here")
    args = parse_grid_arguments(parser, argv)
    device, model, tokenizer = load_model(args)
    filler = natural_filler(tokenizer, args.filler)
    result = evaluate_retrieval(model, tokenizer, filler, args.lengths, args.depths, args.keys,
                                args.trials, args.seed, device, args.precision,
                                progress=lambda line: print(line, file=sys.stderr, flush=True))
    result["exported"] = str(args.exported)
    print(format_table(result))
    write_result(result, args.out)
    if args.plot:
        from fsa_train.plotting import plot_grid

        print(f"plot: {plot_grid(result, args.plot, f'retrieval, {args.keys} keys')}")
