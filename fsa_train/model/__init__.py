"""The GPT model: embeddings, transformer blocks with dense or NSA attention, chunked loss."""

from fsa_train.model.gpt import GPT

__all__ = ["GPT"]
