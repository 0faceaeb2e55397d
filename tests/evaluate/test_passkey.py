"""Passkey prompts, the greedy exact-match rule, and scoring a real tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from fsa_train.evaluate.passkey import (
    FILLER,
    QUESTION,
    answer_ids,
    build_prompt,
    evaluate_passkey,
    exact_match,
    format_table,
    greedy_continuation,
    key_sentence,
    passkey_main,
    score_prompt,
)


@pytest.mark.parametrize("length", [300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_length_and_key_depth(tokenizer, length, depth):
    prompt = build_prompt(tokenizer, length, depth, "71432", offset=2)
    longest = max(len(tokenizer.encode(s)) for s in FILLER)
    assert length - longest < len(prompt.ids) <= length
    assert prompt.ids[0] == tokenizer.bos_id
    assert prompt.ids[prompt.key_start:prompt.key_end] == tokenizer.encode(key_sentence("71432"))
    assert prompt.ids[-len(tokenizer.encode(QUESTION)):] == tokenizer.encode(QUESTION)
    movable = (prompt.hay_end - prompt.hay_start) - (prompt.key_end - prompt.key_start)
    assert abs(prompt.depth - depth) * movable <= longest / 2 + 1e-9
    if depth == 0.0:
        assert prompt.key_start == prompt.hay_start
    if depth == 1.0:
        assert prompt.key_end == prompt.hay_end
    text = tokenizer.decode(prompt.ids[1:])
    assert text.count("71432") == 2 and text.endswith(QUESTION)


def test_answer_tokens_continue_the_question(tokenizer):
    answer = answer_ids(tokenizer, "50913")
    assert tokenizer.decode(tokenizer.encode(QUESTION) + answer) == f"{QUESTION} 50913"


def test_prompt_too_short_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        build_prompt(tokenizer, 10, 0.5, "12345")


def test_greedy_continuation_and_exact_match():
    assert greedy_continuation([5, 6, 7], [5, 6, 7]) == [5, 6, 7]
    assert greedy_continuation([5, 9, 7], [5, 6, 7]) == [5, 9]
    assert greedy_continuation([1, 6, 7], [5, 6, 7]) == [1]
    assert exact_match([5, 6, 7], [5, 6, 7])
    assert not exact_match([5, 9], [5, 6, 7])
    assert not exact_match([5, 6], [5, 6, 7])


def test_score_agrees_with_step_by_step_greedy_decoding(tiny_model, tokenizer):
    prompt = build_prompt(tokenizer, 200, 0.5, "27182")
    score = score_prompt(tiny_model, prompt, torch.device("cpu"))
    n = len(prompt.answer)
    decoded = tiny_model.generate(prompt.ids, n, temperature=0)
    assert decoded[: len(score["generated"])] == score["generated"]
    assert score["exact_match"] == (decoded == prompt.answer)
    assert 0.0 <= score["token_accuracy"] <= 1.0
    assert score["key_logprob"] < 0.0
    assert score["prompt_tokens"] == len(prompt.ids)


def test_evaluation_is_deterministic_and_covers_every_cell(tiny_model, tokenizer):
    run = [evaluate_passkey(tiny_model, tokenizer, [256, 384], [0.0, 1.0], trials=2, seed=s)
           for s in (3, 3, 4)]
    assert run[0] == run[1]
    keys = [[t["key"] for c in r["cells"] for t in c["trials"]] for r in run]
    assert keys[0] != keys[2]
    assert len(set(keys[0])) == len(keys[0])
    assert [(c["length"], c["depth"]) for c in run[0]["cells"]] == [
        (256, 0.0), (256, 1.0), (384, 0.0), (384, 1.0)]
    assert "| 384 |" in format_table(run[0])


def test_cli_writes_results(exported, tmp_path, capsys):
    out = tmp_path / "passkey.json"
    passkey_main([str(exported), "--lengths", "256", "--depths", "0", "0.5", "--trials", "2",
                  "--seed", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["cells"]) == 2 and all(len(c["trials"]) == 2 for c in result["cells"])
    assert "overall exact match" in capsys.readouterr().out


def test_cli_too_short_length_is_one_line(exported, capsys):
    from fsa_train.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["passkey", str(exported), "--lengths", "16", "--trials", "1", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "passkey length 16 is too short" in err[0], err


def test_progress_has_one_line_per_cell(tiny_model, tokenizer):
    lines = []
    evaluate_passkey(tiny_model, tokenizer, [256, 384], [0.0, 0.5, 1.0], trials=1,
                     progress=lines.append)
    assert len(lines) == 6
    assert lines[0].startswith("passkey: cell 1/6 (length 256, depth 0)")
    assert lines[-1].startswith("passkey: cell 6/6 (length 384, depth 1)")
