"""Compiled programs that survive a restart whole, as serialized executables.

JAX's persistent compilation cache keys a program by its lowered module, so a restart still
traces the model and lowers it before the lookup: for a large model that is most of a warm start
(the Mosaic GPU kernels' lowering above all; docs/performance.md). A `Program` keeps
each compiled executable on disk under a key of everything that shapes it (our code, JAX's
version, the devices, the flags, the arguments' shapes, dtypes and shardings, the static
arguments), and a restart loads it without tracing anything.

One `Program` wraps one jitted function for one engine: its callers name the bucket (e.g. a step's
token count) that fixes every argument's shape, so the hot path is a dict lookup and the
executable's own C++ dispatch.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib
import logging
import os
import pickle
import tempfile
import threading
import weakref
from pathlib import Path

import jax

log = logging.getLogger(__name__)

_FORMAT = "1"  # bump when what is stored changes
MAX_STORED_BYTES = 4 << 30  # past this, the least recently used stored programs are deleted
# key -> executable: every one a live engine holds, and the most recent ones (engines built one
# after another in a process, tests and notebooks, find them without loading from disk)
_shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_recent: collections.OrderedDict = collections.OrderedDict()
RECENT = 64
_compile_lock = threading.Lock()
_jax_cache_hits = threading.local()  # hits of JAX's persistent cache, counted per thread


def _count_jax_cache_hits(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _jax_cache_hits.n = getattr(_jax_cache_hits, "n", 0) + 1


jax.monitoring.register_event_listener(_count_jax_cache_hits)


@functools.cache
def _code_digest() -> str:
    """Our own source (this package and pallas_kernels): any edit makes every key new."""
    import pallas_kernels

    h = hashlib.sha256()
    for pkg in (Path(__file__).parent, Path(pallas_kernels.__file__).parent):
        for path in sorted(pkg.rglob("*.py")):
            h.update(str(path.relative_to(pkg.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def _platform_digest() -> str:
    import jaxlib
    from jax._src import config

    backend = jax.devices()[0].client
    # JAX's settings that shape a trace (x64, matmul precision, ...), less objects named by address
    settings = [r for r in map(repr, config.trace_context()) if " at 0x" not in r]
    parts = [jax.__version__, jaxlib.__version__, backend.platform, backend.platform_version,
             *sorted({d.device_kind for d in jax.devices()}), str(jax.device_count()),
             os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""), *settings]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _static_repr(value) -> str:
    """A process-independent text of a static argument; an nnx GraphDef's repr leaves out its static
    attributes (the model's config, norm eps, kernel choices), so they are added."""
    text = repr(value)
    attributes = getattr(value, "attributes", None)
    if attributes is not None:
        text += repr(attributes)
    return text


def _leaf_repr(x) -> str:
    aval = getattr(x, "aval", None)
    return repr((tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)),
                 getattr(aval, "weak_type", False), repr(getattr(x, "sharding", None))))


def clear() -> None:
    """Forget the recently used executables (as jax.clear_caches() does JAX's): each XLA:CPU program
    keeps its code mapped in memory while it lives."""
    _recent.clear()


def default_directory() -> Path | None:
    """Next to JAX's persistent cache when that is on and local; one process only (in a
    multi-process run each process's executable is one part of a whole)."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache or "://" in str(cache) or jax.process_count() > 1:
        return None
    return Path(cache) / "mistral_jax_programs"


class Program:
    """fn: a jax.jit-wrapped function; static: its static arguments (keywords); devices: the
    devices its programs run on, in mesh order."""

    def __init__(self, fn, devices, directory: Path | None = None, **static):
        self.fn, self.static, self.devices = fn, static, list(devices)
        self.directory = directory if directory is not None else default_directory()
        self.name = f"{fn.__module__}.{getattr(fn, '__qualname__', fn.__name__)}"
        self._by_bucket: dict = {}
        self.loaded = self.compiled = 0  # executables taken from disk / compiled here

    def __call__(self, bucket, *args):
        exe = self._by_bucket.get(bucket)
        if exe is None:
            exe = self._by_bucket[bucket] = self._get(args)
        return exe(*args)

    def _key(self, args) -> str | None:
        statics = [f"{k}={_static_repr(v)}" for k, v in sorted(self.static.items())]
        if any(" at 0x" in s for s in statics):  # an object's address: not the same across processes
            return None
        from mistral_jax.runtime.sharding import current_mesh

        leaves, tree = jax.tree.flatten(args)
        parts = [_FORMAT, _code_digest(), _platform_digest(), self.name, *statics, repr(tree),
                 *map(_leaf_repr, leaves), repr(current_mesh()), repr([d.id for d in self.devices])]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def _get(self, args):
        key = self._key(args)
        exe = _shared.get(key) if key is not None else None
        if exe is None:
            path = self.directory / f"{key}.bin" if key is not None and self.directory is not None else None
            exe = self._load(path) if path is not None and path.exists() else None
            if exe is None:
                exe, fresh = _compile(self.fn.lower(*args, **self.static), bypass_jax_cache=path is not None)
                self.compiled += 1
                if path is not None and fresh:
                    self._store(path, exe)
            else:
                self.loaded += 1
            if key is not None:
                _shared[key] = exe
        if key is not None:
            _recent[key] = exe
            _recent.move_to_end(key)
            while len(_recent) > RECENT:
                _recent.popitem(last=False)
        return exe

    def _load(self, path: Path):  # a file of the user's own cache: trusted as JAX's cache is
        from jax.experimental.serialize_executable import deserialize_and_load

        _prepare_mosaic_gpu()
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            exe = deserialize_and_load(payload, in_tree, out_tree, execution_devices=self.devices)
            os.utime(path)  # recently used: kept when the directory is pruned
            return exe
        except Exception as e:  # a torn or foreign file: compile instead, and replace it
            log.warning("could not load the stored program %s (%s: %s); compiling it again", path.name,
                        type(e).__name__, e)
            return None

    def _store(self, path: Path, exe) -> None:
        from jax.experimental.serialize_executable import serialize

        try:
            blob = pickle.dumps(serialize(exe))
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:  # readers never see half a file
                f.write(blob)
            os.replace(f.name, path)
            _prune(path.parent, MAX_STORED_BYTES)
        except Exception as e:  # e.g. a read-only cache, or a program JAX cannot serialize
            log.warning("could not store the compiled program %s (%s: %s)", self.name, type(e).__name__, e)


def _prune(directory: Path, max_bytes: int) -> None:
    """Delete the least recently used programs past max_bytes (each code or JAX version, model and
    setting leaves its own; old ones are never loaded again)."""
    files = sorted(directory.glob("*.bin"), key=lambda f: f.stat().st_mtime, reverse=True)
    total = 0
    for f in files:
        total += f.stat().st_size
        if total > max_bytes:
            f.unlink(missing_ok=True)


@functools.cache
def _prepare_mosaic_gpu() -> None:
    """A stored program can hold Mosaic GPU kernels (the FP8 prefill matmul). Their compiled state
    calls into a runtime library that JAX names in environment variables when its Mosaic GPU
    module is imported, which lowering does; a loaded program is not lowered. Without them a
    warm start failed to resolve mosaic_gpu_launch_kernel: each kernel was compiled again (one
    program not loaded at all), most of an FP8 warm-up."""
    if jax.default_backend() != "gpu":
        return
    try:
        importlib.import_module("jax.experimental.mosaic.gpu")  # sets MOSAIC_GPU_RUNTIME_LIB_PATH and the like
    except Exception as e:  # noqa: BLE001  a JAX without Mosaic GPU: nothing stored needs it
        log.debug("Mosaic GPU unavailable: %s", e)


def _compile(lowered, bypass_jax_cache: bool):
    """-> (executable, compiled here). XLA:CPU (JAX 0.10.2) serializes an executable that JAX's
    persistent cache loaded without its kernels (running the reloaded copy failed: "Function
    add_rsqrt_fusion not found"), so what we store must be compiled here: JAX's cache is off for
    this compile, and a hit all the same (another thread turned it back on) stores nothing."""
    if not bypass_jax_cache:
        return lowered.compile(), False
    from jax._src import config
    from jax.experimental.compilation_cache import compilation_cache

    with _compile_lock:
        hits = getattr(_jax_cache_hits, "n", 0)
        compilation_cache.reset_cache()  # JAX decides once per process whether its cache is used
        try:
            with config.enable_compilation_cache(False):
                exe = lowered.compile()
        finally:
            compilation_cache.reset_cache()
    return exe, getattr(_jax_cache_hits, "n", 0) == hits
