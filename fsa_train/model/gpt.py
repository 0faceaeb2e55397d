"""A GPT over packed documents: RMSNorm, RoPE, SwiGLU, grouped-query dense or NSA attention.

Inputs are flat token ids ``[total]`` with document boundaries ``cu_seqlens``; positions restart at
every document and no attention crosses a boundary.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fsa_train.config import CHECKPOINTED_SUBLAYERS, GPTConfig
from fsa_train.kernels.nsa import NSAVarlen, nsa_varlen
from fsa_train.kernels.varlen import document_positions
from fsa_train.model.attention import Attention
from fsa_train.model.fused import (
    IGNORE_INDEX,
    LMHead,
    RMSNorm,
    check_mode,
    silu_mul,
    to_autocast_dtype,
    use_liger,
)
from fsa_train.parallel.sequence import SequenceShard, full_total


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) · w3 x)``; the activation on liger's kernel where ``fused_ops`` says
    (:func:`fsa_train.model.fused.silu_mul`)."""

    def __init__(self, d_model: int, hidden: int, fused_ops: str = "torch") -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.fused_ops = fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu_mul(self.w1(x), self.w3(x), self.fused_ops))


class Block(nn.Module):
    """Pre-norm transformer block.

    ``cfg.activation_checkpointing`` ``"attention"`` or ``"mlp"``: that sub-layer (its norm
    onward to its output, before the residual add) is recomputed in backward, so the block keeps
    its input instead of the sub-layer's activations. Whole-block checkpointing (``true``) is
    :class:`GPT`'s, around the block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.fused_ops)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.fused_ops)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden, cfg.fused_ops)
        mode = cfg.activation_checkpointing
        self.recompute = mode if mode in CHECKPOINTED_SUBLAYERS else None
        """The sub-layer recomputed in backward: ``"attention"``, ``"mlp"`` or None."""

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, positions: torch.Tensor,
        varlen: NSAVarlen | None = None, max_seqlen: int | None = None,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        recompute = self.recompute if torch.is_grad_enabled() else None
        if recompute == "attention":
            x = x + checkpoint(self._attention, x, cu_seqlens, positions, varlen, max_seqlen,
                               shard, use_reentrant=False)
        else:
            x = x + self._attention(x, cu_seqlens, positions, varlen, max_seqlen, shard)
        if recompute == "mlp":
            return x + checkpoint(self._mlp, x, use_reentrant=False)
        return x + self._mlp(x)

    def _attention(self, x: torch.Tensor, cu_seqlens: torch.Tensor, positions: torch.Tensor,
                   varlen: NSAVarlen | None, max_seqlen: int | None,
                   shard: SequenceShard | None) -> torch.Tensor:
        normed = to_autocast_dtype(self.attn_norm(x))
        return self.attn(normed, cu_seqlens, positions, varlen, max_seqlen, shard)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(to_autocast_dtype(self.mlp_norm(x)))


class GPT(nn.Module):
    """Decoder-only language model on the packed layout."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        check_mode(cfg.fused_ops)  # a missing liger-kernel is one line, before any tensor
        self.cfg = cfg
        # One draw of the global RNG before any module exists (module construction consumes a
        # different amount for dense and NSA): every parameter is then initialised from its own
        # generator seeded by this and its name (init_generator). Drawn on the CPU, so that a
        # model built under a device context (``with torch.device("meta")``) works too.
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.fused_ops)
        self.head = LMHead(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def init_generator(self, name: str, device: torch.device) -> torch.Generator:
        """The generator that initialises parameter ``name``: seeded by the model's init seed and
        the name alone, so a parameter's initial value does not depend on which other parameters
        exist. Dense and NSA models built after the same ``seed_everything`` therefore start with
        identical shared weights (the loss-parity experiment relies on it)."""
        generator = torch.Generator(device=device)
        generator.manual_seed((self.init_seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        return generator

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/√(2·n_layer)."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and not module.weight.is_meta:
                residual = name.endswith(("attn.o_proj", "mlp.w2"))
                module.weight.normal_(
                    0.0, residual_std if residual else std,
                    generator=self.init_generator(f"{name}.weight", module.weight.device),
                )
        for index, block in enumerate(self.blocks):
            block.attn.reset_compression(
                lambda param, device, i=index: self.init_generator(f"blocks.{i}.attn.{param}",
                                                                   device)
            )

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        """Parameter count (tied weights counted once)."""
        count = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            count -= self.embed.weight.numel()
        return count

    def batch_layout(self, cu_seqlens: torch.Tensor,
                     total: int) -> tuple[torch.Tensor, NSAVarlen | None]:
        """Each token's position in its document and, for NSA, the compressed-token indices:
        they depend on the batch only, so every layer shares them."""
        positions = document_positions(cu_seqlens, total)
        varlen = (nsa_varlen(cu_seqlens, total, self.cfg.nsa, positions)
                  if self.cfg.attention == "nsa" else None)
        return positions, varlen

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int | None = None,
                shard: SequenceShard | None = None) -> torch.Tensor:
        """Final hidden states ``[total, D]`` (after the last norm) for tokens ``[total]``.

        ``max_seqlen``: the longest document of the batch as a host integer, when known (the
        packed batches carry it; library attention kernels size their grid with it).
        ``shard``: sequence parallelism (:mod:`fsa_train.parallel.sequence`): ``input_ids``
        are this rank's slice of the packed sequence that ``cu_seqlens`` describes; the hidden
        states returned are that slice's."""
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be packed 1-D [total], got {tuple(input_ids.shape)}")
        positions, varlen = self.batch_layout(cu_seqlens, full_total(input_ids.shape[0], shard))
        x = self.embed(input_ids)
        # whole blocks; a checkpointed sub-layer ("attention", "mlp") is the block's own
        recompute = self.cfg.activation_checkpointing is True and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, cu_seqlens, positions, varlen, max_seqlen, shard,
                               use_reentrant=False)
            else:
                x = block(x, cu_seqlens, positions, varlen, max_seqlen, shard)
        return self.norm(x)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over targets != -100, computed in chunks of ``loss_chunk`` tokens.

        Each chunk's logits are recomputed in backward instead of stored, so memory holds one
        chunk of ``[loss_chunk, vocab]`` logits rather than all of them. With liger's fused
        linear cross-entropy (``fused_ops``) liger chunks instead and ``loss_chunk`` is unused.
        """
        total_loss, count = self.loss_terms(hidden, targets)
        return total_loss / count.clamp(min=1)

    def loss_terms(self, hidden: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed cross-entropy over targets != -100 and their count (what a mean over
        several shards of one batch needs: :func:`fsa_train.parallel.sequence.shard_loss`)."""
        count = (targets != IGNORE_INDEX).sum()
        if hidden.shape[0] and use_liger(self.cfg.fused_ops, hidden, "linear_cross_entropy"):
            return self.head(hidden, targets), count
        total_loss = hidden.new_zeros((), dtype=torch.float32)
        for h_chunk, t_chunk in zip(
            hidden.split(self.cfg.loss_chunk), targets.split(self.cfg.loss_chunk), strict=True
        ):
            if torch.is_grad_enabled() and h_chunk.requires_grad:
                total_loss = total_loss + checkpoint(
                    self._chunk_loss_sum, h_chunk, t_chunk, use_reentrant=False
                )
            else:
                total_loss = total_loss + self._chunk_loss_sum(h_chunk, t_chunk)
        return total_loss, count

    def _chunk_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")

    @torch.no_grad()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int | None = 50,
        stop_token: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """Sample a continuation of ``prompt`` (recomputes the whole sequence each step)."""
        device = self.embed.weight.device
        tokens = list(prompt)
        for _ in range(max_new_tokens):
            ids = torch.tensor(tokens, device=device)
            cu_seqlens = torch.tensor([0, len(tokens)], device=device, dtype=torch.int32)
            logits = self.head(self(ids, cu_seqlens)[-1]).float()
            if temperature <= 0:
                next_token = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k is not None:
                    cutoff = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < cutoff, float("-inf"))
                probs = torch.softmax(logits, dim=-1).cpu()
                next_token = int(torch.multinomial(probs, 1, generator=generator))
            tokens.append(next_token)
            if stop_token is not None and next_token == stop_token:
                break
        return tokens[len(prompt):]
