"""Training callbacks (``fsa_train.callbacks``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from fsa_train.callbacks import TrainingSummary
from fsa_train.config import GPTConfig
from fsa_train.lit_module import LitGPT


class ByteTokenizer:
    """Bytes as token ids (ids 0 and 1 reserved for BOS and EOS): just enough to sample."""

    bos_id, eos_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return [2 + b for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode(errors="replace")


def test_end_of_training_sample_runs_eagerly_under_model_compile():
    """``model.compile`` compiles each block; the sample printed at the end of training
    feeds the model one more token per step, and each new length compiled anew would cost
    minutes with Inductor on a GPU. The sample runs eagerly: nothing compiles, and it is the
    same text as from the uncompiled model."""
    cfg = GPTConfig(vocab_size=258, n_layer=2, n_head=2, n_kv_head=1, d_model=32)
    torch.manual_seed(0)
    module = LitGPT(cfg, sample_prompt="In the", sample_tokens=6)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=ByteTokenizer()),
                              strategy=object())
    eager = TrainingSummary._sample(trainer, module)
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    for block in module.model.blocks:
        block.compile(fullgraph=True, backend=counter)  # as LitGPT.configure_model does
    assert TrainingSummary._sample(trainer, module) == eager
    assert counter.frame_count == 0
    assert module.training
