"""Multi-key retrieval evaluation: a model that finds the asked key scores 100 %, one that copies
another key scores 0 with "another key" at 100 %, a constant model scores 0; the real tiny model
and the command run end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from fsa_train.cli import main as cli_main
from fsa_train.data.retrieval_mix import question
from fsa_train.evaluate.retrieval import evaluate_retrieval, format_table, natural_filler


class ReadingStub(nn.Module):
    """A "model" that reads its input text: at the end of the sequence it emits, as one-hot
    logits, the key of the name asked in the last question (``wrong=True``: of another name in
    the document). Everything else predicts token 0."""

    def __init__(self, tokenizer, wrong: bool = False) -> None:
        super().__init__()
        self.tokenizer, self.wrong = tokenizer, wrong
        self.head = nn.Identity()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        tok = self.tokenizer
        vocab = tok.vocab_size
        logits = torch.zeros(len(ids), vocab)
        text = tok.decode(ids.tolist())
        asked = re.findall(r"What is the pass key of the (\w+)\?", text)[-1]
        keys = dict(re.findall(r"The pass key of the (\w+) is (\d{5})\.", text))
        name = next(n for n in keys if n != asked) if self.wrong else asked
        asked_question = question(asked)
        prompt = tok.encode(asked_question)
        answer = tok.encode(f"{asked_question} {keys[name]}")[len(prompt):]
        # the input ends with answer[:-1]: the last len(answer) positions predict the answer
        for i, token in enumerate(answer):
            logits[len(ids) - len(answer) + i, token] = 1.0
        return logits


class ConstantModel(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.head = nn.Identity()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, ids, cu_seqlens):
        logits = torch.zeros(len(ids), self.vocab)
        logits[:, 5] = 1.0
        return logits


@pytest.fixture(scope="module")
def filler(tokenizer):
    return natural_filler(tokenizer, n_tokens=4000)


def _run(model, tokenizer, filler, **kw):
    options = {"lengths": [300, 600], "depths": [0.0, 0.5, 0.9], "keys": 4, "trials": 3}
    return evaluate_retrieval(model, tokenizer, filler, device=torch.device("cpu"),
                              **{**options, **kw})


def test_a_model_that_finds_the_asked_key_scores_everything(tokenizer, filler):
    result = _run(ReadingStub(tokenizer), tokenizer, filler)
    assert result["accuracy"] == 1.0
    assert all(c["accuracy"] == 1.0 and c["other_key"] == 0.0 for c in result["cells"])
    assert result["chance"] == 0.25


def test_copying_another_key_and_a_constant_model_score_nothing(tokenizer, filler):
    copier = _run(ReadingStub(tokenizer, wrong=True), tokenizer, filler)
    assert copier["accuracy"] == 0.0
    assert all(c["other_key"] == 1.0 for c in copier["cells"])
    constant = _run(ConstantModel(tokenizer.vocab_size), tokenizer, filler)
    assert constant["accuracy"] == 0.0 and all(c["other_key"] == 0.0 for c in constant["cells"])


def test_depth_sets_the_distance_and_runs_are_deterministic(tiny_model, tokenizer, filler):
    first = _run(tiny_model, tokenizer, filler, seed=3)
    second = _run(tiny_model, tokenizer, filler, seed=3)
    assert first == second
    by_depth = {(c["length"], c["depth"]): c["mean_distance"] for c in first["cells"]}
    for length in (300, 600):
        assert by_depth[(length, 0.0)] > by_depth[(length, 0.5)] > by_depth[(length, 0.9)]
    assert by_depth[(600, 0.0)] > 500
    table = format_table(first)
    assert "| 600 |" in table and "copying a random key" in table


def test_command_on_an_exported_model(exported, tmp_path, capsys):
    out = tmp_path / "retrieval.json"
    pytest.importorskip("matplotlib")
    cli_main(["retrieval", str(exported), "--lengths", "256", "--depths", "0", "0.5",
              "--keys", "2", "--trials", "2", "--out", str(out), "--plot",
              str(tmp_path / "retrieval.png")])
    printed = capsys.readouterr().out
    assert (tmp_path / "retrieval.png").stat().st_size > 0
    assert "Exact match" in printed and "| 256 |" in printed
    result = json.loads(out.read_text())
    assert result["keys"] == 2 and len(result["cells"]) == 2
    with pytest.raises(SystemExit):
        cli_main(["retrieval", str(exported), "--depths", "1.5"])
