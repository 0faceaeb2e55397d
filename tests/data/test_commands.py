"""``fsa-train train-tokenizer`` / ``prepare-data``: end to end; one clear line per bad input."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from fsa_train.cli import main
from fsa_train.data.commands import prepare_data_main, train_tokenizer_main
from fsa_train.data.prepare import load_split
from fsa_train.data.progress import Progress
from fsa_train.data.tokenizer import load_tokenizer


@pytest.fixture
def corpus(tmp_path, kjv_texts, write_jsonl):
    """A source tree (two .py files, a README, an empty file) and a JSONL file."""
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "a.py").write_text(kjv_texts[0][:6000])
    (tree / "pkg" / "b.py").write_text(kjv_texts[1][:6000])
    (tree / "pkg" / "__init__.py").write_text("")
    (tree / "README.md").write_text("not python")
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [t[:3000] for t in kjv_texts[2:8]])
    return tree, jsonl


def one_error_line(capsys) -> str:
    """The error: one line, last on stderr (after any progress lines), no traceback."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("fsa-train: error: ")]
    assert errors == lines[-1:] and not any("Traceback" in line for line in lines), lines
    return errors[0]


def test_train_tokenizer_then_prepare_data(corpus, tmp_path, capsys):
    tree, jsonl = corpus
    prefix = tmp_path / "tok" / "spm"
    main(["train-tokenizer", str(tree), str(jsonl), "--glob", "**/*.py", "--output", str(prefix),
          "--vocab_size", "400", "--special_tokens", "[<|fim|>]", "--threads", "1"])
    out = capsys.readouterr().out
    assert "8 documents" in out and "1 empty skipped" in out and "400 pieces" in out
    tok = load_tokenizer(f"{prefix}.model")
    assert prefix.with_suffix(".vocab").is_file() and tok.piece_to_id("<|fim|>") == 4

    data = tmp_path / "data"
    main(["prepare-data", str(tree), str(jsonl), "--glob", "**/*.py", "--tokenizer",
          f"{prefix}.model", "--output", str(data), "--val_documents", "2", "--workers", "2",
          "--shard_tokens", "2000", "--quiet"])
    out = capsys.readouterr().out
    assert "train: 6 documents" in out and "val: 2 documents" in out
    assert "MB/s" in out and "tokens/s" in out
    meta = json.loads((data / "meta.json").read_text())
    counts = {k: v for k, v in meta["corpus"].items() if k != "text_bytes"}
    assert counts == {"sources": 4, "documents": 8, "empty": 1, "invalid_utf8": 0,
                      "invalid_lines": 0}
    splits = [np.asarray(load_split(data, s, tok).tokens) for s in ("train", "val")]
    stream = np.concatenate(splits)
    assert (stream == tok.eos_id).sum() == 8  # one EOS per document


def test_progress_line():
    stream = io.StringIO()
    bar = Progress("prepare-data", 4_000_000, stream=stream, log_interval=0.0)
    bar.update(1_000_000, documents=1200, tokens=345_678)
    line = stream.getvalue().strip()
    assert line.startswith("prepare-data") and " 25% 1.0/4.0 MB" in line
    assert "1.2k documents" in line and "345.7k tokens" in line and "MB/s" in line and "ETA" in line
    quiet = io.StringIO()
    Progress("x", 10, stream=quiet, enabled=False, log_interval=0.0).update(5)
    assert quiet.getvalue() == ""


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t, j, tok, out: [str(t / "missing"), "--tokenizer", tok, "--output", out],
         "corpus path not found: .*missing"),
        (lambda t, j, tok, out: [str(t), "--glob", "**/*.rs", "--tokenizer", tok, "--output", out],
         r"no files matching '\*\*/\*.rs' under directory"),
        (lambda t, j, tok, out: [str(j), "--text_field", "body", "--tokenizer", tok, "--output",
                                 out], r"docs.jsonl:1: missing field 'body'"),
        (lambda t, j, tok, out: [str(j), "--tokenizer", str(t / "README.md"), "--output", out],
         "not a sentencepiece model"),
        (lambda t, j, tok, out: [str(j), "--tokenizer", tok, "--output", out, "--val_documents",
                                 "6"], "leaves no training documents"),
    ],
)
def test_prepare_data_bad_inputs(corpus, small_tokenizer, tmp_path, capsys, make_args, message):
    tree, jsonl = corpus
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        prepare_data_main(make_args(tree, jsonl, str(small_tokenizer.path), str(out)))
    assert exit_info.value.code == 2
    assert re.search(message, one_error_line(capsys))
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing that looks done


def test_bad_jsonl_lines_skipped_when_asked(tmp_path, small_tokenizer, capsys):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "one"}\nnot json\n{"text": "tw\xffo"}\n{"text": "  "}\n'
                     b'{"text": "three"}\n')
    args = [str(path), "--tokenizer", str(small_tokenizer.path), "--output", str(tmp_path / "d"),
            "--val_documents", "0", "--quiet"]
    with pytest.raises(SystemExit):
        prepare_data_main(args)
    assert "c.jsonl:2: invalid JSON" in one_error_line(capsys)
    prepare_data_main([*args, "--skip_invalid_lines"])
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["corpus"]["invalid_lines"] == 1 and meta["corpus"]["invalid_utf8"] == 1
    assert meta["corpus"]["empty"] == 1 and meta["corpus"]["documents"] == 3


def test_existing_output_is_kept(corpus, small_tokenizer, tmp_path, capsys):
    tree, jsonl = corpus
    out = tmp_path / "out"
    args = [str(jsonl), "--tokenizer", str(small_tokenizer.path), "--output", str(out), "--quiet"]
    prepare_data_main(args)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        prepare_data_main(args)
    assert "dataset directory already exists" in one_error_line(capsys)
    prepare_data_main([*args, "--overwrite"])


def test_train_tokenizer_bad_inputs(corpus, tmp_path, capsys):
    tree, jsonl = corpus
    cases = [
        ([str(tmp_path / "nope.txt")], "corpus path not found"),
        ([str(jsonl), "--vocab_size", "100"], "vocab_size=100 is too small"),
        ([str(jsonl), "--vocab_size", "60000"], "Vocabulary size too high"),
        ([str(jsonl), "--text_field", "body"], "docs.jsonl:1: missing field 'body'"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            train_tokenizer_main([*extra, "--output", str(tmp_path / "t" / "tok")])
        assert exit_info.value.code == 2 and message in one_error_line(capsys)
        assert not list((tmp_path / "t").glob("*.model"))


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_data_main(["corpus"])  # no --tokenizer / --output
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        train_tokenizer_main(["x", "--output", "o", "--model_type", "wordpiece"])
    assert exit_info.value.code == 2
