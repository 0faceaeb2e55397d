"""``fsa-train train-tokenizer`` and ``fsa-train prepare-data``: corpus → tokenizer / shards.

Both take the same corpus specification: any mix of text files, directories (``--glob``) and
``.jsonl``/``.jsonl.gz`` files (``--text_field``). A user error (missing path, bad JSONL line,
existing output, ...) ends the command with one ``fsa-train: error: ...`` line on stderr and exit
status 2 (``FSA_TRAIN_TRACEBACK=1`` shows the traceback instead).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Literal

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from fsa_train.data.corpus import CorpusStats, iter_documents, resolve_sources
from fsa_train.data.prepare import default_workers, prepare
from fsa_train.data.shards import DEFAULT_SHARD_TOKENS
from fsa_train.data.tokenizer import load_tokenizer, train_tokenizer


def _corpus_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=str,
                        help="text files, directories and .jsonl/.jsonl.gz files (any mix)")
    parser.add_argument("--glob", type=str, default="**/*",
                        help="files to read under each directory, e.g. '**/*.py'")
    parser.add_argument("--exclude", type=list[str], default=[],
                        help="skip files under a directory whose relative path matches one of "
                             "these patterns, e.g. '[site-packages/*, test/*]'")
    parser.add_argument("--text_field", type=str, default="text",
                        help="JSON field holding each JSONL record's text")
    parser.add_argument("--skip_invalid_lines", action="store_true",
                        help="skip and count JSONL lines that are not JSON or lack the field "
                             "(default: stop with file:line)")


def tokenizer_parser() -> ArgumentParser:
    parser = ArgumentParser(allow_abbrev=False,
        prog="fsa-train train-tokenizer",
        description="Train a sentencepiece tokenizer (lossless by default) on a corpus; writes "
                    "OUTPUT.model and OUTPUT.vocab.",
    )
    _corpus_arguments(parser)
    parser.add_argument("--output", type=str, required=True,
                        help="output prefix: writes OUTPUT.model and OUTPUT.vocab")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--model_type", type=Literal["bpe", "unigram"], default="bpe")
    parser.add_argument("--sample_size", type=int, default=2_000_000,
                        help="lines sampled from the corpus for training (seeded reservoir)")
    parser.add_argument("--special_tokens", type=list[str], default=[],
                        help="extra control tokens after pad/unk/bos/eos (ids 4, 5, ...)")
    parser.add_argument("--byte_fallback", action=ActionYesNo, default=True,
                        help="unknown characters become UTF-8 byte pieces (lossless)")
    parser.add_argument("--keep_whitespace", action=ActionYesNo, default=True,
                        help="keep runs of spaces and leading/trailing whitespace (lossless)")
    parser.add_argument("--normalization", type=str, default="identity",
                        help="sentencepiece normalization rule; 'identity' is lossless")
    parser.add_argument("--split_digits", action=ActionYesNo, default=True)
    parser.add_argument("--threads", type=int, default=default_workers())
    parser.add_argument("--seed", type=int, default=1234)
    return parser


def prepare_parser() -> ArgumentParser:
    parser = ArgumentParser(allow_abbrev=False,
        prog="fsa-train prepare-data",
        description="Tokenize a corpus into a dataset directory of token shards, a document "
                    "index and meta.json, split into train/val by document.",
    )
    _corpus_arguments(parser)
    parser.add_argument("--tokenizer", type=str, required=True, help="sentencepiece .model file")
    parser.add_argument("--output", type=str, required=True, help="dataset directory to create")
    parser.add_argument("--val_documents", type=int | float, default=0.005,
                        help="validation documents: a count (int) or a fraction (float)")
    parser.add_argument("--seed", type=int, default=1234, help="seeds the train/val split")
    parser.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help="maximum tokens per shard file")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="tokenizer processes (<= 1: in this process)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _run(main: Callable[[Namespace], None], parser: ArgumentParser, argv: list[str]) -> None:
    """Parse ``argv`` and run ``main``; user errors become one line and exit status 2."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except (OSError, ValueError) as error:
        if os.environ.get("FSA_TRAIN_TRACEBACK") == "1":
            raise
        print(f"fsa-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("fsa-train: interrupted; no output was published", file=sys.stderr)
        raise SystemExit(130) from None


def _train_tokenizer(args: Namespace) -> None:
    sources = resolve_sources(args.inputs, args.glob, args.exclude)
    stats = CorpusStats()
    texts = iter_documents(sources, args.text_field, skip_invalid_lines=args.skip_invalid_lines,
                           stats=stats)
    model = train_tokenizer(
        texts, args.output, args.vocab_size, args.model_type,
        input_sentence_size=args.sample_size, num_threads=max(1, args.threads), seed=args.seed,
        byte_fallback=args.byte_fallback, normalization=args.normalization,
        keep_whitespace=args.keep_whitespace, split_digits=args.split_digits,
        special_tokens=args.special_tokens, progress=True,
    )
    print(f"read {len(sources)} file(s): {stats.describe()}")
    tokenizer = load_tokenizer(model)
    print(f"wrote {model} and {model.with_suffix('.vocab')} "
          f"({tokenizer.vocab_size} pieces, sha256 {tokenizer.checksum[:12]})")


def _prepare_data(args: Namespace) -> None:
    tokenizer = load_tokenizer(args.tokenizer)
    sources = resolve_sources(args.inputs, args.glob, args.exclude)
    report = prepare(
        sources, tokenizer, args.output, args.val_documents, args.seed,
        text_field=args.text_field, shard_tokens=args.shard_tokens, num_workers=args.workers,
        skip_invalid_lines=args.skip_invalid_lines, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(report.summary())


def train_tokenizer_main(argv: list[str]) -> None:
    """``fsa-train train-tokenizer INPUT... --output PREFIX [--vocab_size 32000] ...``"""
    _run(_train_tokenizer, tokenizer_parser(), argv)


def prepare_data_main(argv: list[str]) -> None:
    """``fsa-train prepare-data INPUT... --tokenizer T.model --output DIR [...]``"""
    _run(_prepare_data, prepare_parser(), argv)
