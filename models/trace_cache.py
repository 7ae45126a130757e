"""The shared epoch functions (models.shared_step) kept on disk, so that a structure traced once on
a machine is loaded, not traced again, by the next study, a resumed one, or another worker.

Tracing a structure's epoch builds its graph op by op in Python: 0.3-1.0 s on these machines, the
largest fixed cost of a short study (in a 24-trial breast-cancer study, 10 trials traced a
structure and took 0.75-0.94 s against 0.21 s for the others; benchmarks/trial_cost.py). Its
FunctionDefs (the epoch and its loop's body and condition) are what TensorFlow runs; loading them
into the runtime takes a few milliseconds, and the function then runs the same kernels on the same
executor (the same results to the last bit, `tests/unit/test_shared_step.py`).

A file is named by a fingerprint of everything the trace depends on: the structure's key, the
input specs, the TensorFlow and Keras versions, and the source of the modules the trace runs
(models/shared_step.py, models/layers.py). Anything else changed makes a new name; an old file is
never read again. A file that does not load is removed and the structure traced again. Files are
written whole (a temporary file renamed), so workers sharing the folder never read half of one.
The folder is bounded: each load marks a file used (its mtime), and each write removes the least
recently used files beyond `max_bytes` (and temporary files a killed writer left behind), so the
files of older versions and code go as they age. Off until `configure` names a folder
(studies.engines.session: `<WORKBENCH_HOME>/cache/traces`, TRACE_CACHE=0 turns it off,
TRACE_CACHE_MB bounds it).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

_FOLDER: list[Path | None] = [None]
DEFAULT_MAX_BYTES = 256 * 2**20  # ~1,500 structures of an MLP (120-220 KB a file)
_MAX_BYTES = [DEFAULT_MAX_BYTES]
_SOURCES = ("shared_step.py", "layers.py")
STALE_TMP_SECONDS = 3600  # a temporary file this old belongs to no writer still running


def configure(folder: Path | None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Keep traces in `folder` (made when first written), at most about `max_bytes` of them;
    None: no cache."""
    _FOLDER[0] = folder
    _MAX_BYTES[0] = max_bytes


def folder() -> Path | None:
    return _FOLDER[0]


@functools.cache
def _code_version() -> str:
    import keras
    import tensorflow as tf

    digest = hashlib.sha256(f"{tf.__version__}|{keras.__version__}".encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def fingerprint(parts: tuple[Any, ...]) -> str:
    """The file name of a trace of `parts` (kind, structure key, input specs) with this code."""
    return hashlib.sha256(f"{_code_version()}|{parts!r}".encode()).hexdigest()[:32]


class Loaded:
    """A function loaded from the cache, called as the traced concrete function is: its inputs as
    the same nested lists of tensors, its outputs in the same structure."""

    def __init__(self, name: str, outputs: Any) -> None:
        import tensorflow as tf

        self.name = name.encode()
        self._structure = outputs
        self._n = len(tf.nest.flatten(outputs))

    def __call__(self, *args: Any) -> Any:
        import tensorflow as tf
        from tensorflow.python.eager import context

        flat = context.context().call_function(self.name, tf.nest.flatten(args), self._n)
        return tf.nest.pack_sequence_as(self._structure, list(flat))


def load(parts: tuple[Any, ...]) -> Loaded | None:
    """The cached function of `parts`, registered with TensorFlow's runtime; None if there is none
    (or no cache, or a file that does not load, which is removed)."""
    base = folder()
    if base is None:
        return None
    path = base / f"{fingerprint(parts)}.json"
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        loaded = _register(json.loads(text))
    except Exception:  # a damaged or foreign file: trace again, and write it anew
        path.unlink(missing_ok=True)
        return None
    with contextlib.suppress(OSError):  # used now: the last to go when the folder is pruned
        os.utime(path)
    return loaded


def _register(entry: dict[str, Any]) -> Loaded:
    from tensorflow.core.framework import function_pb2
    from tensorflow.python.eager import context

    ctx = context.context()
    for text in entry["functions"]:  # the ones it calls first, the entry point last
        fdef = function_pb2.FunctionDef.FromString(base64.b64decode(text))
        if not ctx.has_function(fdef.signature.name):
            ctx.add_function_def(fdef)
    return Loaded(entry["name"], entry["outputs"])


def store(parts: tuple[Any, ...], concrete: Any) -> None:
    """Write the traced concrete function of `parts` to the cache (best effort: a function that
    captures tensors, or a folder that cannot be written, is left out)."""
    base = folder()
    if base is None or concrete.captured_inputs:
        return
    import tensorflow as tf

    tmp = None
    try:
        outputs = json.loads(json.dumps(tf.nest.map_structure(lambda _: 0, concrete.structured_outputs)))  # tuples as lists
        if len(tf.nest.flatten(outputs)) != len(concrete.outputs):
            return
        key = fingerprint(parts)
        functions = [*concrete.graph.as_graph_def().library.function, concrete.function_def]
        renamed = _renamed(functions, f"_wb{key[:16]}")
        entry = {"parts": repr(parts), "name": renamed[-1].signature.name, "outputs": outputs,
                 "functions": [base64.b64encode(f.SerializeToString()).decode() for f in renamed]}
        base.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=base, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, base / f"{key}.json")
        tmp = None
        prune(base, _MAX_BYTES[0], keep=f"{key}.json")
    except Exception:  # the trial goes on with the function it traced
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def prune(base: Path, max_bytes: int, *, keep: str | None = None) -> list[str]:
    """Remove the least recently used trace files of `base` until the rest fit in `max_bytes`
    (never `keep`, the file just written), and temporary files older than STALE_TMP_SECONDS.
    Another process may remove the same file first, or be loading it: a load that finds it gone
    traces the structure again. Returns the names removed."""
    files, removed = [], []
    now = time.time()
    for entry in os.scandir(base):
        try:
            stat = entry.stat()
        except OSError:
            continue
        if entry.name.endswith(".tmp"):
            if now - stat.st_mtime > STALE_TMP_SECONDS:
                removed.append(entry.name)
        elif entry.name.endswith(".json"):
            files.append((stat.st_mtime, entry.name, stat.st_size))
    total = sum(size for _, _, size in files)
    for _, name, size in sorted(files):  # oldest use first
        if total <= max_bytes:
            break
        if name != keep:
            removed.append(name)
            total -= size
    for name in removed:
        (base / name).unlink(missing_ok=True)
    return removed


def _renamed(functions: list[Any], suffix: str) -> list[Any]:
    """Copies of the FunctionDefs with names of their own (a process names its traced functions
    by a counter: `while_body_14468` in one process may be another function in the next), and
    each call of one another (a While's body and cond) renamed alike."""
    from tensorflow.core.framework import function_pb2

    names = {f.signature.name: f.signature.name + suffix for f in functions}
    out = []
    for function in functions:
        copy = function_pb2.FunctionDef()
        copy.CopyFrom(function)
        copy.signature.name = names[copy.signature.name]
        for node in copy.node_def:
            for value in node.attr.values():
                _rename_calls(value, names)
        out.append(copy)
    return out


def _rename_calls(value: Any, names: dict[str, str]) -> None:
    if value.HasField("func") and value.func.name in names:
        value.func.name = names[value.func.name]
    if value.HasField("list"):
        for func in value.list.func:
            if func.name in names:
                func.name = names[func.name]

