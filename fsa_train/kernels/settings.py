"""The kernels' experiment switches, in one settings object read once and passed down.

These switches choose between launch strategies that compute the same result (or, for
``window_bwd="atomic"``, the same result up to the order of fp32 additions); settings that change
numerics belong to the model config instead (``model.config.nsa.selected_partials``). Each
field has an ``FSA_*`` environment variable, read once per process by :func:`default_settings`;
benchmarks and tests build their own with :func:`dataclasses.replace` and pass
``settings=`` to an op or to ``nsa_attention``. Nothing in the kernels reads the environment or
a mutable module global at call time. The one variable outside the settings object,
``FSA_TUNING_CACHE`` (where autotune choices are kept on disk), is likewise read once per
process, by :func:`tuning_cache_dir`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

_MERGES = ("bitonic", "sort")
_TOPK_CONFIGS = ("tuned", "safe")
_WINDOW_BWD = ("fused", "split", "atomic")
WINDOW_KERNELS = ("auto", "triton", "cudnn", "flash", "fa4")
COMPRESSED_KERNELS = ("auto", "triton", "flex", "cudnn")
SELECTED_FORCED = ("sparse", "dense")
_CACHE_OFF = ("", "0", "off")
_LAUNCH_KEYS = {"BLOCK_M", "num_warps", "num_stages", "PREFETCH"}
_BLOCK_SPARSE_KEYS = {"SPLIT", "PACK", "num_warps", "num_stages"}


@dataclass(frozen=True)
class KernelSettings:
    """Launch-strategy switches of the Triton kernels (defaults: the measured best on an H200).

    Attributes:
        compressed_autotune: autotune the compressed-attention kernels (``FSA_COMPRESSED_AUTOTUNE``;
            off: the first configuration of each list).
        topk_autotune: autotune the block-selection kernel (``FSA_TOPK_AUTOTUNE``).
        window_autotune: autotune the window/dense kernels (``FSA_WINDOW_AUTOTUNE``).
        topk_merge: how the running top-k absorbs a key tile (``FSA_TOPK_MERGE``): "bitonic"
            (Batcher's merge; same indices as the sort, 5-11 % faster at G <= 4) or "sort".
        topk_tile_blocks: selection blocks per key tile (``FSA_TOPK_TILE_BLOCKS``): a power of two,
            or 0 for the measured default (32 from G = 16 on the GPU, the fewest below).
        topk_configs: fp16/bf16 launch configurations of the selection kernel
            (``FSA_TOPK_CONFIGS``): "tuned" (autotuned) or "safe" (the fixed fp32-validated one).
        window_bwd: backward schedule of the window kernel (``FSA_WINDOW_BWD``): "fused" (dk, dv
            and dq per tile in one kernel), "split" (two kernels) or "atomic" (dq added with fp32
            atomics; not deterministic).
        window_kernel: which GPU kernel runs ``window_attention`` (dense and sliding-window
            attention on packed documents; ``FSA_WINDOW_KERNEL``): "triton" (ours), "cudnn"
            (cuDNN through nvidia-cudnn-frontend, the ``gpu`` extra), "flash" (FlashAttention
            through ``torch.nn.attention.varlen.varlen_attn``), "fa4" (FlashAttention-4, the
            ``fa4`` extra; Hopper or newer), the libraries fp16/bf16 only, or "auto"
            (the kernel measured fastest for the shape class, never one that is missing or
            refuses the inputs).
        compressed_kernel: which kernel runs ``compressed_attention`` (``FSA_COMPRESSED_KERNEL``):
            "triton" (ours), "flex" (FlexAttention with the compressed mask as a ``mask_mod``,
            compiled on CUDA), "cudnn" (cuDNN's causal attention over compressed positions,
            each row's queries as extra heads; fp16/bf16, the ``gpu`` extra) or "auto" (ours
            until a GPU measurement ranks them).
        compressed_dkdv_splits: query-range splits of the compressed attention's dk/dv kernel
            (0: enough to fill the GPU, 1 under the interpreter); tests force other counts.
        selected_fwd_config, selected_bwd_config: launch configuration of the selected kernels
            (keys BLOCK_M, num_warps, num_stages, optional PREFETCH) replacing the measured table;
            None (the default) keeps the table. Set by benchmarks that sweep configurations (no
            environment variable).
        block_sparse_autotune: autotune the block-shared selected kernels
            (``FSA_BLOCK_SPARSE_AUTOTUNE``; off: the first configuration of each list).
        selected_forced: how token-mode selected attention runs the forced blocks (init and
            local) when the caller promises them (``FSA_SELECTED_FORCED``): "sparse" (as any
            other slot, through the per-(token, slot) partials) or "dense" (block-sparse query
            tiles over each query block's forced blocks, merged by LSE with the token kernels
            over the free slots; same result up to rounding).
        block_sparse_config: one launch configuration (keys SPLIT, PACK, num_warps, num_stages;
            optionally KSPLIT, key-block halves of the dK/dV kernel) for all the block-shared
            selected kernels, replacing the autotuner; None (default) autotunes. Set by tests
            and sweeps (no environment variable).
    """

    compressed_autotune: bool = True
    topk_autotune: bool = True
    window_autotune: bool = True
    topk_merge: str = "bitonic"
    topk_tile_blocks: int = 0
    topk_configs: str = "tuned"
    window_bwd: str = "fused"
    window_kernel: str = "auto"
    compressed_kernel: str = "auto"
    compressed_dkdv_splits: int = 0
    selected_fwd_config: dict | None = None
    selected_bwd_config: dict | None = None
    block_sparse_autotune: bool = True
    block_sparse_config: dict | None = None
    selected_forced: str = "sparse"

    def __post_init__(self) -> None:
        if self.topk_merge not in _MERGES:
            raise ValueError(f"FSA_TOPK_MERGE must be 'sort' or 'bitonic', got {self.topk_merge!r}")
        tiles = self.topk_tile_blocks
        if tiles < 0 or tiles & (tiles - 1):
            raise ValueError(f"FSA_TOPK_TILE_BLOCKS must be 0 or a power of two, got {tiles}")
        for variable, value, choices in (
            ("FSA_TOPK_CONFIGS", self.topk_configs, _TOPK_CONFIGS),
            ("FSA_WINDOW_BWD", self.window_bwd, _WINDOW_BWD),
            ("FSA_WINDOW_KERNEL", self.window_kernel, WINDOW_KERNELS),
            ("FSA_COMPRESSED_KERNEL", self.compressed_kernel, COMPRESSED_KERNELS),
            ("FSA_SELECTED_FORCED", self.selected_forced, SELECTED_FORCED),
        ):
            if value not in choices:
                raise ValueError(f"{variable} must be one of {choices}, got {value!r}")
        if self.compressed_dkdv_splits < 0:
            raise ValueError(f"compressed_dkdv_splits must be >= 0, "
                             f"got {self.compressed_dkdv_splits}")
        for name in ("selected_fwd_config", "selected_bwd_config"):
            config = getattr(self, name)
            if config is not None and not {"BLOCK_M", "num_warps", "num_stages"} <= set(config) \
                    <= _LAUNCH_KEYS:
                raise ValueError(f"{name} needs the keys BLOCK_M, num_warps, num_stages "
                                 f"(and optionally PREFETCH), got {sorted(config)}")

        config = self.block_sparse_config
        if config is not None and not _BLOCK_SPARSE_KEYS <= set(config) <= \
                _BLOCK_SPARSE_KEYS | {"KSPLIT"}:
            raise ValueError(f"block_sparse_config needs the keys {sorted(_BLOCK_SPARSE_KEYS)} "
                             f"(and optionally KSPLIT, for dK/dV), got {sorted(config)}")
        # not a field: the settings as a string, the form a custom op's schema takes
        object.__setattr__(self, "token", json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> KernelSettings:
        """The settings named by the ``FSA_*`` variables of ``environ`` (default ``os.environ``)."""
        env = os.environ if environ is None else environ

        def flag(name: str) -> bool:
            return env.get(name, "1") != "0"

        tiles = env.get("FSA_TOPK_TILE_BLOCKS", "0")
        try:
            tile_blocks = int(tiles)
        except ValueError:
            raise ValueError(
                f"FSA_TOPK_TILE_BLOCKS must be 0 or a power of two, got {tiles!r}") from None
        return cls(
            compressed_autotune=flag("FSA_COMPRESSED_AUTOTUNE"),
            topk_autotune=flag("FSA_TOPK_AUTOTUNE"),
            window_autotune=flag("FSA_WINDOW_AUTOTUNE"),
            topk_merge=env.get("FSA_TOPK_MERGE", "bitonic"),
            topk_tile_blocks=tile_blocks,
            topk_configs=env.get("FSA_TOPK_CONFIGS", "tuned"),
            window_bwd=env.get("FSA_WINDOW_BWD", "fused"),
            window_kernel=env.get("FSA_WINDOW_KERNEL", "auto"),
            compressed_kernel=env.get("FSA_COMPRESSED_KERNEL", "auto"),
            block_sparse_autotune=flag("FSA_BLOCK_SPARSE_AUTOTUNE"),
            selected_forced=env.get("FSA_SELECTED_FORCED", "sparse"),
        )


_DEFAULT: dict[str, KernelSettings] = {}
"""The process default, once read (a plain dict, not ``functools.cache``: compiled code then
reads the object instead of tracing its construction)."""


def default_settings() -> KernelSettings:
    """The process's settings from its environment, read on first use and then kept."""
    if "env" not in _DEFAULT:
        _DEFAULT["env"] = KernelSettings.from_env()
    return _DEFAULT["env"]


def resolve_settings(settings: KernelSettings | None) -> KernelSettings:
    """``settings``, or the process default when None."""
    return default_settings() if settings is None else settings


@cache
def settings_from_token(token: str) -> KernelSettings:
    """The settings whose ``token`` (their fields as JSON) this is: inside the custom ops of
    :func:`~fsa_train.kernels.registry.kernel_op`, which take settings as a string."""
    return KernelSettings(**json.loads(token))


@cache
def tuning_cache_dir() -> Path | None:
    """The directory of the on-disk autotune choices (:mod:`fsa_train.kernels.tuning_cache`):
    ``FSA_TUNING_CACHE``, default ``~/.cache/fsa-train/tuning``; ``0``, ``off`` or an empty value
    turn the store off (None). Read on first use and then kept (tests call ``cache_clear()``)."""
    value = os.environ.get("FSA_TUNING_CACHE")
    if value is None:
        return Path.home() / ".cache" / "fsa-train" / "tuning"
    if value.strip().lower() in _CACHE_OFF:
        return None
    return Path(value).expanduser()
