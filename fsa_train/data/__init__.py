"""Data pipeline: text → sentencepiece tokenizer → token files → packed windows → batches.

Modules (import them directly; this package imports nothing heavy on its own):
``corpus`` reads JSONL documents, ``tokenizer`` trains/loads sentencepiece models, ``prepare``
writes per-split token files, ``packing`` cuts them into fixed-length windows with ``cu_seqlens``,
and ``datamodule`` ties it together for Lightning.
"""
