"""Model and NSA configuration dataclasses, validated on construction.

Every violation raises ``ConfigError`` with one line that names the field, so a bad YAML value is
reported before any tensor is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CHECKPOINTED_SUBLAYERS = ("attention", "mlp")
"""The string values of ``GPTConfig.activation_checkpointing`` that name the sub-layer of each
block recomputed in backward."""

SPARSE_BRANCHES = "sparse_branches"
"""``GPTConfig.activation_checkpointing`` for NSA's compressed and selected branches alone."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class NSAConfig:
    """Native Sparse Attention parameters (see docs: nsa.md).

    Attributes:
        cmp_kernel: compression window length ``l``.
        cmp_stride: compression stride ``s``; divides ``cmp_kernel`` and ``sel_block``.
        sel_block: selection block size ``B``.
        sel_topk: blocks selected per query, forced blocks included.
        init_blocks: leading blocks always selected.
        local_blocks: most recent blocks always selected (the query's own block included).
        window: sliding-window length ``W`` (query t sees keys t-W+1 .. t).
        selected_partials: precision of the selected-branch kernels' per-block partial outputs
            and dQ: ``"fp32"`` (default) or ``"half"`` (the activations' bf16/fp16: 1.3× faster
            branch on an H200, slightly larger rounding error; kernels only, the reference is
            exact).
        selection: selection granularity: ``"token"`` (exact NSA: one selection per token and
            KV head) or ``"block"`` (the B queries of each selection block share one selection;
            block-sparse kernels without partials; an experiment until its loss parity says
            otherwise, see docs/nsa.md).
    """

    cmp_kernel: int = 32
    cmp_stride: int = 16
    sel_block: int = 64
    sel_topk: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window: int = 512
    selected_partials: Literal["fp32", "half"] = "fp32"
    selection: Literal["token", "block"] = "token"

    def __post_init__(self) -> None:
        _require(
            self.selection in ("token", "block"),
            f"model.config.nsa.selection must be 'token' or 'block', got {self.selection!r}",
        )
        _require(
            self.selected_partials in ("fp32", "half"),
            f"model.config.nsa.selected_partials must be 'fp32' or 'half', got "
            f"{self.selected_partials!r}",
        )
        for name in ("cmp_kernel", "cmp_stride", "sel_block", "sel_topk", "window"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"model.config.nsa.{name} must be a positive integer, got {value!r}",
            )
        _require(
            isinstance(self.init_blocks, int) and self.init_blocks >= 0,
            f"model.config.nsa.init_blocks must be an integer >= 0, got {self.init_blocks!r}",
        )
        _require(
            isinstance(self.local_blocks, int) and self.local_blocks >= 1,
            f"model.config.nsa.local_blocks must be an integer >= 1 (a query must see its own "
            f"block), "
            f"got {self.local_blocks!r}",
        )
        _require(
            self.cmp_kernel % self.cmp_stride == 0,
            f"model.config.nsa.cmp_stride={self.cmp_stride} must divide "
            f"model.config.nsa.cmp_kernel={self.cmp_kernel}",
        )
        _require(
            self.sel_block % self.cmp_stride == 0,
            f"model.config.nsa.cmp_stride={self.cmp_stride} must divide "
            f"model.config.nsa.sel_block={self.sel_block}",
        )
        _require(
            self.sel_topk >= self.init_blocks + self.local_blocks,
            f"model.config.nsa.sel_topk={self.sel_topk} must be >= init_blocks + local_blocks "
            f"= {self.init_blocks + self.local_blocks}",
        )


@dataclass
class GPTConfig:
    """GPT architecture: RMSNorm, RoPE, SwiGLU, grouped-query attention, dense or NSA attention.

    Attributes:
        vocab_size: tokenizer vocabulary size (checked against the tokenizer at start-up).
        n_layer: number of transformer blocks.
        n_head: query heads ``H``.
        n_kv_head: key/value heads ``h``; ``H / h`` (the group size) must be an integer.
        d_model: residual width; ``head_dim = d_model / n_head`` unless ``head_dim`` is given.
        head_dim: per-head width ``d`` (defaults to ``d_model // n_head``).
        ffn_hidden: SwiGLU hidden width (defaults to about 8/3 · d_model, rounded up to 64).
        attention: ``"dense"`` (causal within each document) or ``"nsa"``.
        window: dense attention only: each query sees the last ``window`` keys of its document
            (a sliding-window model, e.g. the ablation long-context evaluations must tell apart
            from full attention); None = all of them. NSA's window is ``nsa.window``.
        nsa: NSA parameters, used when ``attention == "nsa"``.
        rope_base: RoPE frequency base.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: share the input embedding with the output head.
        init_std: standard deviation of the weight initialisation.
        loss_chunk: tokens per chunk of the chunked cross-entropy (bounds logits memory).
        kernel_backend: ``"auto"`` (Triton on CUDA, reference otherwise), ``"reference"`` or
            ``"triton"``.
        activation_checkpointing: recompute activations in backward instead of storing them:
            ``true`` each whole block (it keeps only its input; about a third more compute),
            ``"attention"`` each block's attention sub-layer (its norm to the output
            projection; the MLP's activations are kept), ``"mlp"`` each block's MLP sub-layer
            (its norm to ``w2``), ``"sparse_branches"`` (NSA only) the compressed and selected
            branches with the block selection between them and the gated output projection,
            so that the step keeps neither branch's output, log-sum-exp nor the selection
            (the cheap part of a block's recomputation: the window branch, the projections and
            the MLP keep theirs), ``false`` nothing.
        fused_ops: who computes RMSNorm, SwiGLU's activation and the head + cross-entropy:
            ``"torch"`` (default: ``nn.RMSNorm``, ``silu(a) * b``, our chunked checkpointed
            cross-entropy), ``"liger"`` (liger-kernel's fused Triton ops; needs CUDA and
            ``pip install 'fsa-train[liger]'``) or ``"auto"`` (per op, the faster on the GPU:
            liger's loss and SiLU-mul, torch's RMSNorm; torch off CUDA or without liger).
            Parameters and state-dict keys are the same in every mode
            (:mod:`fsa_train.model.fused`). Not ``"auto"`` by default: which kernels a run used
            would then depend on whether a package happens to be installed, and the GPU
            benchmark (``benchmarks/fused_ops.py``) has the last word.
    """

    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 4
    d_model: int = 768
    head_dim: int | None = None
    ffn_hidden: int | None = None
    attention: Literal["dense", "nsa"] = "nsa"
    window: int | None = None
    nsa: NSAConfig = field(default_factory=NSAConfig)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    loss_chunk: int = 4096
    kernel_backend: Literal["auto", "reference", "triton"] = "auto"
    activation_checkpointing: bool | Literal["attention", "mlp", "sparse_branches"] = False
    fused_ops: Literal["auto", "liger", "torch"] = "torch"

    def __post_init__(self) -> None:
        if isinstance(self.nsa, dict):
            self.nsa = NSAConfig(**self.nsa)
        if self.window is not None:
            _require(
                isinstance(self.window, int) and self.window > 0,
                f"model.config.window must be a positive integer or null, got {self.window!r}",
            )
            _require(
                self.attention == "dense",
                "model.config.window applies to dense attention; NSA's sliding window is "
                "model.config.nsa.window",
            )
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "loss_chunk"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"model.config.{name} must be a positive integer, got {value!r}",
            )
        _require(
            self.n_head % self.n_kv_head == 0,
            f"model.config.n_head={self.n_head} must be a multiple of "
            f"model.config.n_kv_head={self.n_kv_head} "
            f"(the group size n_head / n_kv_head must be an integer)",
        )
        _require(
            1 <= self.n_head // self.n_kv_head <= 16,
            f"model.config.n_head / model.config.n_kv_head = {self.n_head // self.n_kv_head} must "
            f"be in 1..16",
        )
        if self.head_dim is None:
            _require(
                self.d_model % self.n_head == 0,
                f"model.config.d_model={self.d_model} must be a multiple of "
                f"model.config.n_head={self.n_head} "
                f"(or set model.config.head_dim)",
            )
            self.head_dim = self.d_model // self.n_head
        _require(
            isinstance(self.head_dim, int) and self.head_dim > 0 and self.head_dim % 2 == 0,
            f"model.config.head_dim must be a positive even integer (RoPE rotates pairs), "
            f"got {self.head_dim!r}",
        )
        if self.ffn_hidden is None:
            self.ffn_hidden = -(-int(8 * self.d_model / 3) // 64) * 64
        _require(
            isinstance(self.ffn_hidden, int) and self.ffn_hidden > 0,
            f"model.config.ffn_hidden must be a positive integer, got {self.ffn_hidden!r}",
        )
        _require(
            self.attention in ("dense", "nsa"),
            f"model.config.attention must be 'dense' or 'nsa', got {self.attention!r}",
        )
        _require(
            self.kernel_backend in ("auto", "reference", "triton"),
            f"model.config.kernel_backend must be 'auto', 'reference' or 'triton', "
            f"got {self.kernel_backend!r}",
        )
        _require(
            isinstance(self.activation_checkpointing, bool)
            or self.activation_checkpointing in (*CHECKPOINTED_SUBLAYERS, SPARSE_BRANCHES),
            f"model.config.activation_checkpointing must be false, true, 'attention', 'mlp' or "
            f"'sparse_branches', got {self.activation_checkpointing!r}",
        )
        _require(
            self.activation_checkpointing != SPARSE_BRANCHES or self.attention == "nsa",
            "model.config.activation_checkpointing='sparse_branches' recomputes NSA's branches; "
            "model.config.attention is 'dense' (use 'attention' or 'mlp')",
        )
        _require(
            self.fused_ops in ("auto", "liger", "torch"),
            f"model.config.fused_ops must be 'auto', 'liger' or 'torch', got {self.fused_ops!r}",
        )
        _require(self.rope_base > 0, f"model.config.rope_base must be > 0, got {self.rope_base!r}")
        _require(self.norm_eps > 0, f"model.config.norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G)."""
        return self.n_head // self.n_kv_head
