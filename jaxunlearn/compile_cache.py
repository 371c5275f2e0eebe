"""Start-up: JAX's persistent compilation cache, and a count of what this process compiles.

The CLI switches the cache on by default in a per-user folder (``~/.cache/jaxunlearn/jax``, or
``$XDG_CACHE_HOME/jaxunlearn/jax``); ``JAXUNLEARN_CACHE_DIR`` or ``--compile-cache DIR`` moves it,
``--no-compile-cache`` (or ``JAXUNLEARN_CACHE_DIR=off``) switches it off. Every compiled program
is cached, however small or quick (JAX's defaults skip programs under 1 s). Many processes may
share the folder: JAX writes each entry to a temporary file and renames it into place, so a
reader never sees half an entry, and two writers of one key write the same bytes.

:class:`CompileCounter` counts, from JAX's own monitoring events, how many programs this process
needed (``programs``), how many of them XLA really compiled (``compiled``; the rest came from the
persistent cache, ``cache_hits``) and the seconds spent getting them (``seconds``).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading

import jax
from jax import monitoring

from jaxunlearn import __version__
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import write_json_atomic

ENV = "JAXUNLEARN_CACHE_DIR"
OFF = ("off", "none", "0", "")

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # every program not in memory (hit or miss)
_CACHE_HIT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_totals = {"programs": 0, "cache_hits": 0, "seconds": 0.0}
_names: list[str] = []
_registered = False


def _on_duration(event: str, duration: float, **kw) -> None:
    if event == _BACKEND_COMPILE:
        with _lock:
            _totals["programs"] += 1
            _totals["seconds"] += float(duration)
            _names.append(str(kw.get("fun_name", "?")))


def _on_event(event: str, **kw) -> None:
    if event == _CACHE_HIT:
        with _lock:
            _totals["cache_hits"] += 1


def _register() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    monitoring.register_event_duration_secs_listener(_on_duration)
    monitoring.register_event_listener(_on_event)


class CompileCounter:
    """Counts this process's compiles from its creation on. ``snapshot()`` -> {"programs", "compiled",
    "cache_hits", "seconds", "names"} since then (seconds: compiling plus reading cached programs)."""

    def __init__(self):
        _register()
        with _lock:
            self._start = dict(_totals)
            self._n = len(_names)

    def snapshot(self) -> dict:
        with _lock:
            d = {k: _totals[k] - self._start[k] for k in _totals}
            names = list(_names[self._n:])
        d["compiled"] = d["programs"] - d["cache_hits"]
        d["seconds"] = round(d["seconds"], 3)
        d["names"] = names
        return d


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxunlearn", "jax")


def resolve_cache_dir(flag_dir: str | None = None, disabled: bool = False) -> str | None:
    """The cache folder to use: None when switched off (flag or ``JAXUNLEARN_CACHE_DIR=off``);
    else the flag's folder, the environment's, or the per-user default."""
    if disabled:
        return None
    if flag_dir is not None:
        if flag_dir.strip().lower() in OFF:
            return None
        return os.path.abspath(os.path.expanduser(flag_dir))
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in OFF else os.path.abspath(os.path.expanduser(env))
    return default_cache_dir()


def _install_atomic_writes() -> bool:
    """JAX's file cache (without a size limit) writes an entry in place, so a process reading it at
    that moment could see half of it (JAX then warns and recompiles). Entries are written to a
    private temporary name and renamed into place instead. Uses JAX internals; where they differ
    (another JAX version), JAX's own writer stays and False is returned."""
    try:
        from jax._src import compilation_cache as cc
        from jax._src import lru_cache
    except ImportError:
        return False
    if getattr(cc.get_file_cache, "_jaxunlearn", False):
        return True
    base, suffix = getattr(lru_cache, "LRUCache", None), getattr(lru_cache, "_CACHE_SUFFIX", None)
    if base is None or suffix is None or not hasattr(cc, "get_file_cache"):
        return False

    class AtomicFileCache(base):
        def put(self, key: str, value: bytes) -> None:
            if self.eviction_enabled:  # JAX locks the folder itself then
                return super().put(key, value)
            final = self.path / f"{key}{suffix}"
            if final.exists():
                return
            tmp = self.path / f".tmp-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
            tmp.write_bytes(value)
            os.replace(tmp, final)  # atomic; a concurrent writer of the same key wrote the same bytes

    def get_file_cache(path: str):
        return AtomicFileCache(path, max_size=jax.config.jax_compilation_cache_max_size), path

    get_file_cache._jaxunlearn = True
    cc.get_file_cache = get_file_cache
    return True


def enable_compile_cache(path: str | None) -> str | None:
    """Points JAX's persistent compilation cache at ``path`` (created if needed) and caches every
    program; ``None`` switches it off. Takes effect for later compiles, in this process too (the
    cache is reset when the folder changes). Returns ``path``."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    if path is None:
        if jax.config.jax_compilation_cache_dir is not None:
            jax.config.update("jax_compilation_cache_dir", None)
            cc.reset_cache()
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise JaxUnlearnError(f"compile cache folder {path!r} cannot be created ({e.strerror}); "
                              f"pass --compile-cache DIR, set {ENV}, or --no-compile-cache") from None
    if not os.access(path, os.W_OK):
        raise JaxUnlearnError(f"compile cache folder {path!r} is not writable; pass --compile-cache DIR, "
                              f"set {ENV}, or --no-compile-cache")
    _install_atomic_writes()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        cc.reset_cache()
    return path


def remembered(kind: str, key: dict, compute):
    """``compute()`` (a JSON-able result), remembered in the compilation cache folder under ``kind``
    and a hash of ``key`` (with JAX's and jaxunlearn's versions), so a warm process skips the tracing
    it costs; computed every time when the cache is off. Entries are written whole (renamed into
    place). Meant for estimates (a stale one after a code change only mis-sizes a chunk)."""
    folder = jax.config.jax_compilation_cache_dir
    if not folder:
        return compute()
    versions = {"jax": jax.__version__, "jaxunlearn": __version__}
    digest = hashlib.sha256(json.dumps({**key, **versions}, sort_keys=True).encode()).hexdigest()
    path = os.path.join(folder, "jaxunlearn", f"{kind}-{digest[:32]}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # absent (or unreadable): compute it again
        pass
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, value)
    return value
