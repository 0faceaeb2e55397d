"""Autotune choices kept on disk, so that a later process (a resumed run, the next job, another
DDP rank) reuses them instead of timing every configuration again.

Each autotuning :class:`~fsa_train.kernels.tuning.KernelTuner` class (one ``triton.autotune``
Autotuner per size class) gets a :class:`CachedChoices` as its Autotuner's ``cache``: the dict
in which Triton keeps one chosen ``triton.Config`` per tuning key. On a miss it looks the key up
on disk; when the Autotuner stores a choice it writes it to disk.

**What this relies on in Triton** (``triton/runtime/autotuner.py``, read in 3.6.0 and 3.9.0):
``Autotuner.__init__`` sets ``self.cache = {}``, and ``Autotuner.run`` touches it only when the
Autotuner has more than one configuration, as ``if key not in self.cache:`` (then it times the
configurations and stores ``self.cache[key] = builtins.min(timings, key=timings.get)``; 3.9 also
stores ``self.cache[key] = pruned_configs[0]`` when pruning leaves one configuration, which our
tuners never do) and then ``config = self.cache[key]``. So a hit needs ``__contains__`` and
``__getitem__`` (through ``__missing__``), and a fresh choice arrives through ``__setitem__``.
Both versions also have Triton's own disk cache (``cache_results``, on with
``TRITON_CACHE_AUTOTUNING=1``; ``check_disk_cache`` fills ``self.cache`` from it). Its key is the
kernel and the tuning key, not our size class, so one size class could take another's choice:
:func:`attach` turns it off (``autotuner.cache_results = False``) for every autotuning tuner.
``autotune_choices`` lists ``cache.items()``: the entries chosen or loaded in this process.

**The key of an entry** is a sha256 over everything that makes a choice valid: the tuner name,
its size class and autotune flag, Triton's tuning key (``str`` of the tuple), the kernel's source
fingerprint (``JITFunction.cache_key``: its source and the globals it uses), the configurations
(``str`` of each), ``reset_to_zero``, the Triton and torch versions, and the GPU's name and
compute capability. A change in any of them is a miss, and the tuner times afresh. A choice is
stored as the configuration's kwargs, ``num_warps``, ``num_stages``, ``num_ctas`` and
``maxnreg``, and loaded as the identical ``triton.Config`` object of the Autotuner's list (a
stored choice that matches none of them is a miss).

**Files**: ``<dir>/<tuner name>.json``, a JSON object mapping the key to the choice plus fields
for people (size class, tuning key, versions, GPU, time). A write reads the file again, sets its
entry and replaces the file atomically (a temporary file in the same directory, then
``os.replace``), under an advisory ``fcntl`` lock on ``<name>.json.lock`` where there is one; so
several processes can write at once: each entry is the last writer's, and no reader ever sees a
partial file. An unreadable or corrupt file is one warning naming it, and reads as empty; it is
never deleted, but the next write replaces it with a valid file holding that write's entry. A
failed write is one warning, and training goes on. Clear the store by deleting the directory
(or one tuner's file).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

try:
    import fcntl
except ImportError:  # not POSIX: atomic replaces, without the lock
    fcntl = None

_CHOICE_FIELDS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_WARNED: set[tuple[Path, str]] = set()
"""The (file, "read" or "write") problems already warned about: one warning each per process."""


def kernel_fingerprint(kernel) -> str:
    """What identifies ``kernel``'s code: the ``cache_key`` of the ``JITFunction`` (under any
    wrappers), else a hash of its source (under the interpreter), else its qualified name."""
    fn = kernel
    for _ in range(8):
        try:
            return str(fn.cache_key)
        except Exception:  # not a JITFunction (the interpreter's, a wrapper)
            pass
        source = getattr(fn, "src", None)
        if isinstance(source, str):
            return hashlib.sha256(source.encode()).hexdigest()
        if inspect.isfunction(fn):
            try:
                return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
            except (OSError, TypeError):
                break
        if not hasattr(fn, "fn"):
            break
        fn = fn.fn
    return f"{getattr(kernel, '__module__', '')}.{getattr(kernel, '__qualname__', repr(kernel))}"


def device_identity() -> str:
    """The current CUDA device's name and compute capability ("cpu" without CUDA)."""
    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def versions() -> str:
    """The Triton and torch versions, which a choice is valid for."""
    return f"triton {triton.__version__}, torch {torch.__version__}"


def describe(config: triton.Config) -> dict:
    """``config`` as JSON data: its kwargs and launch options."""
    choice = {"kwargs": dict(config.kwargs)}
    for field in _CHOICE_FIELDS:
        if hasattr(config, field):
            choice[field] = getattr(config, field)
    return json.loads(json.dumps(choice, default=str))


def tuner_file(directory: Path, name: str) -> Path:
    """The JSON file of the tuner ``name`` under ``directory``."""
    return Path(directory) / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.json"


def _warn(path: Path, kind: str, problem: str) -> None:
    if (path, kind) not in _WARNED:
        _WARNED.add((path, kind))
        warnings.warn(f"tuning cache {path}: {problem}", stacklevel=3)


def read_entries(path: Path) -> dict[str, dict]:
    """The entries of ``path`` (empty if missing; a warning and empty if unreadable/corrupt)."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError too
        _warn(path, "read", f"unreadable, ignored ({error})")
        return {}
    if not isinstance(entries, dict):
        _warn(path, "read", f"not a JSON object of entries, ignored (a {type(entries).__name__})")
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict)}


@contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path``'s lock file, where fcntl is (best effort)."""
    if fcntl is None:
        yield
        return
    try:
        handle = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: atomic replaces still hold
        yield
    finally:
        handle.close()


def write_entry(path: Path, digest: str, entry: dict) -> None:
    """Set ``digest``'s entry in ``path``: merged with the file as it is now, replaced
    atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        entries = read_entries(path)
        entries[digest] = entry
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from other users
                json.dump(entries, out, indent=1, sort_keys=True)
                out.write("\n")
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


class CachedChoices(dict):
    """An Autotuner's ``cache`` (tuning key -> ``triton.Config``) in ``<directory>/<name>.json``.

    Args:
        directory: the store's directory (created on the first write).
        name: the tuner's name (its file).
        configs: the Autotuner's configurations; a loaded choice is one of these objects.
        size_class: the tuner's size class (0: one class for all sizes).
        autotune: the tuner's autotune flag.
        kernel: the kernel, for its source fingerprint (:func:`kernel_fingerprint`).
        reset_to_zero: the Autotuner's ``reset_to_zero``.
        device: the GPU's identity (None: :func:`device_identity`, on the first miss).
        version: the versions string (None: :func:`versions`).
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        configs: Sequence[triton.Config],
        *,
        size_class: int,
        autotune: bool = True,
        kernel=None,
        reset_to_zero: Sequence[str] | None = None,
        device: str | None = None,
        version: str | None = None,
    ) -> None:
        super().__init__()
        self.path = tuner_file(directory, name)
        self.name = name
        self.configs = list(configs)
        self.size_class = int(size_class)
        self.autotune = bool(autotune)
        self.kernel = kernel
        self.reset_to_zero = list(reset_to_zero) if reset_to_zero else None
        self.device = device
        self.version = version
        self.loaded: set = set()
        """The keys whose choice came from disk."""
        self._context: dict | None = None

    def context(self) -> dict[str, object]:
        """Everything besides the tuning key that an entry's validity depends on (once)."""
        if self._context is None:
            self._context = {
                "tuner": self.name,
                "size_class": self.size_class,
                "autotune": self.autotune,
                "kernel": kernel_fingerprint(self.kernel),
                "configs": [str(c) for c in self.configs],
                "reset_to_zero": self.reset_to_zero,
                "versions": self.version if self.version is not None else versions(),
                "gpu": self.device if self.device is not None else device_identity(),
            }
        return self._context

    def digest(self, key) -> str:
        """The entry key of the tuning key ``key``: a sha256 over it and :meth:`context`."""
        text = json.dumps({**self.context(), "key": str(key)}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _load(self, key) -> triton.Config | None:
        entry = read_entries(self.path).get(self.digest(key))
        choice = entry.get("choice") if entry else None
        for config in self.configs:
            if choice is not None and describe(config) == choice:
                return config
        return None

    def __contains__(self, key) -> bool:
        if dict.__contains__(self, key):
            return True
        config = self._load(key)
        if config is None:
            return False
        dict.__setitem__(self, key, config)
        self.loaded.add(key)
        return True

    def __missing__(self, key) -> triton.Config:
        if key in self:
            return dict.__getitem__(self, key)
        raise KeyError(key)

    def __setitem__(self, key, config: triton.Config) -> None:
        dict.__setitem__(self, key, config)
        self.loaded.discard(key)
        context = self.context()
        entry = {
            "choice": describe(config),
            "config": str(config),
            "tuner": self.name,
            "size_class": self.size_class,
            "autotune": self.autotune,
            "key": str(key),
            "versions": context["versions"],
            "gpu": context["gpu"],
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            write_entry(self.path, self.digest(key), entry)
        except OSError as error:
            _warn(self.path, "write", f"not written ({error})")


def attach(autotuner, directory: Path | None, name: str, *, size_class: int, autotune: bool,
           kernel, reset_to_zero: Sequence[str] | None) -> None:
    """Back ``autotuner``'s choices with the store in ``directory`` (None: in memory only), and
    turn off Triton's own autotune disk cache, which ignores our size classes."""
    autotuner.cache_results = False
    if directory is not None:
        autotuner.cache = CachedChoices(directory, name, autotuner.configs, size_class=size_class,
                                        autotune=autotune, kernel=kernel,
                                        reset_to_zero=reset_to_zero)
