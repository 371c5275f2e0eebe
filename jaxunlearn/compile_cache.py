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

:class:`Program` goes one step further for the ensemble programs of a run: JAX's cache is keyed by
the lowered program, so a warm process still traces and lowers every program to find its entry
(0.5 s of a digits MLP run's 2.7 s). A Program whose ``spec`` names everything the function closes
over is stored as a serialized executable under a key of that spec, the arguments' shapes, dtypes
and shardings, the devices, the JAX configuration, XLA_FLAGS, the versions of JAX, jaxlib, flax,
optax and NumPy, and the bytes of jaxunlearn's own source: a warm process loads it without tracing
anything. A spec that missed something the function depends on would load a stale program, so
only functions whose closure is their spec get one (``make_trainer``'s, via ``Trainer.spec``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
import threading
import time
import warnings

import jax
import numpy as np
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


def _count_loaded(name: str, seconds: float) -> None:
    """A program read from :class:`Program`'s store: a cache hit that JAX's events do not see."""
    with _lock:
        _totals["programs"] += 1
        _totals["cache_hits"] += 1
        _totals["seconds"] += seconds
        _names.append(name)


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


def compile_summary(counter: CompileCounter, name_counts: bool = False) -> dict:
    """What this process compiled since ``counter`` started, and the cache folder (None: off): a run's
    record of its start-up. ``name_counts``: the programs' names as {name: how many} (for jobs that
    build hundreds) instead of a list in order."""
    snap = counter.snapshot()
    if name_counts:
        names: dict = {}
        for n in snap["names"]:
            names[n] = names.get(n, 0) + 1
        snap["names"] = dict(sorted(names.items(), key=lambda kv: -kv[1]))
    return {**snap, "cache_dir": jax.config.jax_compilation_cache_dir}


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


# ----------------------------------------------------------------------------------------------------
# programs stored as executables, keyed by what they are built from

_UNKEYED_CONFIG = ("compilation_cache", "persistent_cache", "log_compiles", "explain_cache_misses", "traceback",
                   "logging", "monitoring")
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _source_files() -> list[str]:
    """The package's modules (an editor's ``.#name.py`` lock links and other dot files left out)."""
    return sorted(os.path.join(folder, f) for folder, _, files in os.walk(_PACKAGE) for f in files
                  if f.endswith(".py") and not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))


def _source_stats() -> tuple:
    out = []
    for path in _source_files():
        try:
            st = os.stat(path)
            out.append((path, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((path, None, None))
    return tuple(out)


def _source_digest_now() -> str:
    """sha256 of every .py file of the jaxunlearn package (their paths and bytes)."""
    h = hashlib.sha256()
    for path in _source_files():
        h.update(os.path.relpath(path, _PACKAGE).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# the package's files as this process imported them (with the rest of the package): programs are
# stored under their digest only while they are unchanged, since a process whose files were edited
# after it imported them runs code that no file holds any more
_IMPORTED = _source_stats()


@functools.cache
def _imported_digest() -> str:
    return _source_digest_now()


def _source_digest() -> str | None:
    """The digest of the package's source as imported; None once any file has changed since (or
    cannot be read)."""
    try:
        return _imported_digest() if _source_stats() == _IMPORTED else None
    except OSError:
        return None


@functools.cache
def _host_cpu() -> str:
    """The host CPU's model and feature flags (hashed): an XLA CPU executable is built for them."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return hashlib.sha256("".join(sorted(set(lines))).encode()).hexdigest()[:16]
    except OSError:
        import platform

        return f"{platform.machine()}-{platform.processor()}"


def _context_key() -> tuple:
    """JAX's tracing context (thread-local settings such as ``jax.default_matmul_precision``): part of
    what a traced program depends on."""
    try:
        from jax._src.config import trace_context
    except ImportError:  # another JAX: the global configuration (in the key) is what there is
        return ()
    return trace_context()


def _environment(source: str) -> dict:
    """What besides a program's own spec and arguments decides the executable it compiles to."""
    import flax
    import jaxlib
    import optax

    backend = jax.devices()[0].client
    config = {k: repr(v) for k, v in sorted(jax.config.values.items())
              if not any(part in k for part in _UNKEYED_CONFIG)}
    context = [repr(v) for v in _context_key() if " at 0x" not in repr(v)]
    return {"versions": [jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__, np.__version__,
                         __version__],
            "source": source, "platform": [backend.platform, backend.platform_version], "host_cpu": _host_cpu(),
            "devices": [[d.id, d.device_kind] for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "config": config, "context": context}


def _leaf_signature(x):
    """What an argument leaf contributes to a program's key: its type (shape, dtype, weak type) and,
    for an array committed to devices, its sharding."""
    committed = isinstance(x, jax.Array) and x.committed
    return str(jax.typeof(x)), (x.sharding if committed else None)


def _compile(lowered, options: dict | None):
    """``lowered`` compiled with ``options`` (XLA debug options), less any this XLA does not know (an
    option of another XLA version is reported as "No such compile option: 'NAME'")."""
    options = dict(options or {})
    while True:
        try:
            return lowered.compile(compiler_options=options) if options else lowered.compile()
        except Exception as e:  # noqa: BLE001 - XLA reports an unknown option as a runtime error
            unknown = [name for name in options if f"No such compile option: '{name}'" in str(e)]
            if not unknown:
                raise
            for name in unknown:
                del options[name]


def _compile_without_jax_cache(lowered, options: dict | None):
    """Compiled by XLA now, never read from JAX's persistent cache: an executable JAX reads from its
    cache serializes without its kernels on CPU (jaxlib 0.10.2: "Function ... not found" when the copy
    runs in another process; tested). JAX's cache is pointed nowhere for this compile and restored
    after (JAX decides whether to use it once, until ``reset_cache``). Compiles in other threads
    meanwhile miss JAX's cache; nothing else goes wrong."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    folder = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    cc.reset_cache()
    try:
        return _compile(lowered, options)
    finally:
        jax.config.update("jax_compilation_cache_dir", folder)
        cc.reset_cache()


def _plain_jax_wanted() -> bool:
    """Settings under which JAX does more than run a compiled program (``jax.disable_jit``, re-running
    op by op to find a NaN): calls then go to the jitted function itself."""
    c = jax.config
    return bool(c.jax_disable_jit or c.jax_debug_nans or c.jax_debug_infs)


class Program:
    """``jax.jit(fn)``, compiled once per argument signature (and JAX tracing context) with
    ``compiler_options`` (those this XLA knows); with a ``spec`` (JSON-able, naming everything ``fn``
    closes over) and the persistent cache on, each executable is also stored in the cache folder
    (``jaxunlearn/programs``) and a later process loads it without tracing or lowering ``fn``.

    Inside a trace (``jax.eval_shape``, another jit), with keyword arguments, or under
    ``jax.disable_jit`` / ``jax_debug_nans`` / ``jax_debug_infs``, it is the plain jitted function
    (without ``compiler_options``); so is ``lower``. ``devices``: those its programs may run on (a
    stored one is loaded onto the devices it was compiled for, found among these; default: the
    default backend's). A stored program that loads but fails to run is removed and compiled again.

    The key holds the spec, the arguments' types and shardings, the devices and host CPU, JAX's
    configuration and tracing context, XLA_FLAGS, the versions of JAX, jaxlib, flax, optax and NumPy,
    and a digest of jaxunlearn's source as imported (nothing is stored or loaded once those files change
    under a running process). What it cannot see is code changed at run time (a patched function):
    such a process should run with the cache off. Entries are pickled executables: load only a folder
    you trust (your own), as with JAX's own cache."""

    def __init__(self, fn, name: str, spec: dict | None = None, compiler_options: dict | None = None,
                 donate_argnums=(), devices=None):
        self.fn, self.name, self.spec, self.options, self.devices = fn, name, spec, compiler_options, devices
        self.donate_argnums = donate_argnums
        self.jitted = self._jit()
        self._compiled: dict = {}

    def _jit(self):
        """A new ``jax.jit`` of a new function object: a new trace, a new lowered program, so none of
        JAX's in-memory caches can hand back an executable it read from its persistent cache."""
        fn = self.fn
        named = functools.wraps(fn)(lambda *args: fn(*args))
        named.__name__ = named.__qualname__ = self.name  # "jit(epoch)" in JAX's logs and CompileCounter's names
        return jax.jit(named, donate_argnums=self.donate_argnums)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        leaves, tree = jax.tree.flatten(args)
        if kwargs or _plain_jax_wanted() or any(isinstance(x, jax.core.Tracer) for x in leaves):
            return self.jitted(*args, **kwargs)
        sig = (tree, tuple(_leaf_signature(x) for x in leaves), _context_key())
        compiled = self._compiled.get(sig)
        if compiled is None:
            compiled, path = self._load(sig)
            if compiled is not None:
                try:  # a stored program that loads but cannot run (built for other devices, damaged)
                    out = compiled(*args)
                except Exception as e:  # noqa: BLE001 - JAX reports it as a runtime error
                    with contextlib.suppress(OSError):
                        os.remove(path)  # compiled (and stored) again, here or by the next process
                    if any(isinstance(x, jax.Array) and x.is_deleted() for x in leaves):
                        raise  # its donated arguments are gone: nothing to run again on
                    warnings.warn(f"jaxunlearn: stored program {os.path.basename(path)} failed to run "
                                  f"({type(e).__name__}: {str(e)[:200]}); compiling it again", stacklevel=2)
                else:
                    self._compiled[sig] = compiled
                    return out
            compiled = self._compiled[sig] = self._compile_and_store(args, path)
        return compiled(*args)

    def _path(self, sig) -> str | None:
        folder = jax.config.jax_compilation_cache_dir
        source = _source_digest() if self.spec is not None and folder else None
        if source is None:
            return None
        tree, leaves, _ = sig
        key = {"name": self.name, "spec": self.spec, "options": self.options, "tree": str(tree),
               "args": [[t, None if s is None else str(s)] for t, s in leaves], "env": _environment(source)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        return os.path.join(folder, "jaxunlearn", "programs", f"{self.name}-{digest[:40]}.pkl")

    def _load(self, sig):
        """(the stored program of ``sig`` or None, the path it is stored under or None)."""
        from jax.experimental import serialize_executable

        path = self._path(sig)
        if path is None or not os.path.isfile(path):
            return None, path
        t = time.perf_counter()
        try:
            with open(path, "rb") as f:
                blob, in_tree, out_tree, device_ids = pickle.load(f)
            by_id = {d.id: d for d in (self.devices or jax.devices())}
            devices = [by_id[i] for i in device_ids]  # the devices it was compiled for, in its order
            compiled = serialize_executable.deserialize_and_load(blob, in_tree, out_tree, backend=devices[0].client,
                                                                 execution_devices=devices)
        except Exception as e:  # noqa: BLE001 - unreadable, or built elsewhere: compiled (and stored) again
            warnings.warn(f"jaxunlearn: stored program {os.path.basename(path)} did not load "
                          f"({type(e).__name__}: {str(e)[:200]}); compiling it again", stacklevel=3)
            return None, path
        _count_loaded(f"{self.name} (stored)", time.perf_counter() - t)
        return compiled, path

    def _compile_and_store(self, args, path: str | None):
        from jax.experimental import serialize_executable

        if path is None:
            return _compile(self.jitted.lower(*args), self.options)
        # a fresh trace, compiled without JAX's persistent cache: see _jit and _compile_without_jax_cache
        compiled = _compile_without_jax_cache(self._jit().lower(*args), self.options)
        try:
            device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
            data = pickle.dumps((*serialize_executable.serialize(compiled), device_ids))
        except Exception:  # noqa: BLE001 - not serializable (host callbacks, a backend without it): not stored
            return compiled
        tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # whole or not at all; two writers of one key write equivalent programs
        except OSError as e:  # a full disk or a quota: the run goes on without storing it
            warnings.warn(f"jaxunlearn: could not store program {self.name} in {os.path.dirname(path)} "
                          f"({e.strerror or e}); it will be compiled again next time", stacklevel=3)
            with contextlib.suppress(OSError):
                os.remove(tmp)
        return compiled
