"""Data pipeline: corpus → sentencepiece tokenizer → token shards → packed windows → batches.

Modules (import them directly; this package imports nothing heavy on its own):

* ``corpus``: corpus specifications (files, directories + glob, JSONL) → raw records → documents;
* ``tokenizer``: train (BPE/unigram, lossless by default) and load sentencepiece models;
* ``shards``: the prepared-dataset format: token shards, document index, ``meta.json``;
* ``prepare``: corpus → dataset directory, tokenized in parallel worker processes;
* ``packing``: fixed-length windows with ``cu_seqlens`` per document, ``check_seq_len``;
* ``sampling``: the seeded, rank-sharded, resumable training order;
* ``datamodule``: ``TextDataModule`` for Lightning;
* ``commands``: the ``fsa-train train-tokenizer`` and ``fsa-train prepare-data`` commands;
* ``progress``: a small progress line.
"""
