"""The one cache of onnxcam: what is built or read once per process and shared by every Explainer and CAM object.

Building an explainable model (analysis, gradient graph, onnxruntime session) costs seconds; a CAM class made in a
loop, or a second Explainer on the same file, finds what the first one built here. Everything lives in one
object, `CACHE`, with one lock; each table is bounded and least-recently-used entries go first:

    table      key                                                                      value
    sessions   (model digest, layers, score, input shape without batch, guided, device,  the built explainable model
                seeds per sample, by class, session config)                              and its session
    analyses   (model digest, layers as given, score, output, input_shape given)         the resolved names and input
               (model digest, "layers at", score, input shape without batch)             contract; the automatic
                                                                                         layers at that size
    digests    (real path, size, mtime in ns) of a model file                            (model digest, the stat keys
                                                                                         of its external data files)
    models     (real path, size, mtime in ns) of a model file                            its LoadedModel (skeleton;
                                                                                         weights until a build)
    derived    (model digest, score, device, layers, guided, input_shape, config)        an Explainer made on another
                                                                                         one's model (CAM classes
                                                                                         that need other layers)

"session config" is runtime.SESSION_CONFIG's items at build time: a session built with other onnxruntime options
is another entry. A model digest is a content hash (graph/load.py model_digest), so an edited file is a new key.

    import onnxcam
    onnxcam.cache.configure(max_sessions=2)   # hold at most two built models (each holds its weights in onnxruntime)
    onnxcam.cache.clear()                      # drop everything built; Explainers already made keep their own
    onnxcam.cache.info()                       # {"sessions": 1, "analyses": 2, ...}

Dropping an entry frees its session once no Explainer still uses it (an Explainer keeps the session it last ran).
The same lock also guards the sessions whose first CUDA run is profiled to find CPU fallbacks (runtime.py): that
is bookkeeping, not cached work, and clear() leaves it alone.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from .errors import InputError

log = logging.getLogger(__name__)

TABLES = ("sessions", "analyses", "digests", "derived", "models")
DEFAULT_SIZES = {"sessions": 8, "analyses": 256, "digests": 256, "derived": 32, "models": 4}


class _Pending:
    """A value being built by one thread, waited for by the others."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class Cache:
    """Bounded LRU tables of built and read things, safe to share between threads (see the module docstring)."""

    def __init__(self, **sizes: int) -> None:
        # Re-entrant: dropping an evicted session runs its finalizer (runtime._forget), which takes this lock.
        self._lock = threading.RLock()
        self._tables: dict[str, OrderedDict] = {name: OrderedDict() for name in TABLES}
        self._sizes = dict(DEFAULT_SIZES)
        self._pending: dict[tuple, _Pending] = {}
        self._watched: set[int] = set()
        self.configure(**sizes)

    # ---- the user's handles ----------------------------------------------------------------------------------
    def configure(self, *, max_sessions: int | None = None, max_analyses: int | None = None,
                  max_digests: int | None = None, max_derived: int | None = None,
                  max_models: int | None = None) -> None:
        """Set how many entries each table holds (0: cache nothing); shrinking evicts the oldest at once."""
        given = {"sessions": max_sessions, "analyses": max_analyses, "digests": max_digests, "derived": max_derived,
                 "models": max_models}
        for name, size in given.items():
            if size is None:
                continue
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InputError(f"max_{name} must be an int >= 0, not {size!r}")
            with self._lock:
                self._sizes[name] = size
                self._evict(name)

    def clear(self, table: str | None = None) -> None:
        """Drop every entry (or one table's): later Explainers build again. Explainers already made are unchanged."""
        if table is not None and table not in TABLES:
            raise InputError(f"no cache table {table!r}; the tables are {', '.join(TABLES)}")
        with self._lock:
            for name in [table] if table else TABLES:
                self._tables[name].clear()

    def info(self) -> dict[str, int]:
        """{table: number of entries held}, and {max_<table>: its size}."""
        with self._lock:
            return {**{name: len(t) for name, t in self._tables.items()},
                    **{f"max_{name}": size for name, size in self._sizes.items()}}

    def entries(self, table: str) -> list:
        """The values a table holds now, oldest first (e.g. the Compiled models of "sessions", for inspection)."""
        with self._lock:
            return list(self._tables[table].values())

    # ---- for onnxcam's modules -------------------------------------------------------------------------------
    def get(self, table: str, key: Hashable) -> Any:
        """The entry, or None (a hit becomes the most recently used)."""
        with self._lock:
            return self._hit(table, key)

    def put(self, table: str, key: Hashable, value: Any) -> None:
        with self._lock:
            self._store(table, key, value)

    def get_or_build(self, table: str, key: Hashable, build: Callable[[], Any]) -> Any:
        """The entry for key, built by build() when missing. Of several threads asking for the same missing key at
        once, one builds and the others wait for its value (or its exception)."""
        with self._lock:
            hit = self._hit(table, key)
            if hit is not None:
                return hit
            pending = self._pending.get((table, key))
            owner = pending is None
            if owner:
                pending = self._pending[(table, key)] = _Pending()
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return pending.value
        try:
            pending.value = build()
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            with self._lock:
                del self._pending[(table, key)]
                if pending.error is None:
                    self._store(table, key, pending.value)
            pending.done.set()
        return pending.value

    # ---- sessions whose first run is profiled (runtime.py) ---------------------------------------------------
    def watch(self, session_id: int) -> None:
        with self._lock:
            self._watched.add(session_id)

    def take_watched(self, session_id: int) -> bool:
        """True once for a watched session (of two threads finishing its first run, one reads the profile)."""
        with self._lock:
            if session_id in self._watched:
                self._watched.remove(session_id)
                return True
            return False

    # ---- internals (lock held) -------------------------------------------------------------------------------
    def _hit(self, table: str, key: Hashable) -> Any:
        t = self._tables[table]
        hit = t.get(key)
        if hit is not None:
            t.move_to_end(key)
        return hit

    def _store(self, table: str, key: Hashable, value: Any) -> None:
        t = self._tables[table]
        t[key] = value
        t.move_to_end(key)
        self._evict(table)

    def _evict(self, table: str) -> None:
        t = self._tables[table]
        while len(t) > self._sizes[table]:
            key, _ = t.popitem(last=False)
            log.debug("cache %s: evicted %r", table, key)


CACHE = Cache()


def configure(*, max_sessions: int | None = None, max_analyses: int | None = None, max_digests: int | None = None,
              max_derived: int | None = None, max_models: int | None = None) -> None:
    """Size onnxcam's cache (see the module docstring): e.g. configure(max_sessions=2)."""
    CACHE.configure(max_sessions=max_sessions, max_analyses=max_analyses, max_digests=max_digests,
                    max_derived=max_derived, max_models=max_models)


def clear(table: str | None = None) -> None:
    """Drop everything onnxcam cached (or one table: "sessions", "analyses", "digests", "derived", "models")."""
    CACHE.clear(table)


def info() -> dict[str, int]:
    """How many entries each table of onnxcam's cache holds, and its size."""
    return CACHE.info()
