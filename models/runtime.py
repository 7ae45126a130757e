"""Importing TensorFlow and Keras once per process, with their start-up lines kept off the
terminal and the thread pools fixed before the first model is built.

TensorFlow 2.21 writes its start-up lines (`All log messages before absl::InitializeLog()`,
`oneDNN custom operations are on`) from C++ straight to file descriptor 2, whatever
TF_CPP_MIN_LOG_LEVEL says: a quiet import points that descriptor at /dev/null meanwhile.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Output to file descriptor 2 (C++ logging included) is dropped inside the block; Python
    errors raised in it still reach the terminal, after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow(threads: int | None = None, *, quiet: bool = True) -> None:
    """Import TensorFlow and Keras (~4 s) and fix TensorFlow's thread pools (None: its default).
    The pools can only be set before TensorFlow's runtime starts (its first operation)."""
    first = "tensorflow" not in sys.modules
    if first:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3" if quiet else "0")
    with stderr_silenced() if quiet and first else contextlib.nullcontext():
        import keras  # noqa: F401
        import tensorflow as tf

        if threads:
            with contextlib.suppress(RuntimeError):  # the runtime already runs: this process used TensorFlow before
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.constant(0)  # the first operation starts the runtime, which logs too


def freeze_heap() -> None:
    """Leave every object alive now (the libraries, a loaded model) out of the collector's full
    collections, once per process. With TensorFlow loaded a full collection walks ~400k objects
    and pauses the process 0.17-0.33 s: on a Dask worker one landed inside a part in about one
    job in three of benchmarks/batch.py's rounds; a 45 s digits study ran ten inside its trials
    (1.4 s), four (0.6 s) with this and models.updates.direct_updates. Call it after the
    heavy imports, before the work that repeats."""
    if not gc.get_freeze_count():
        gc.freeze()


def fresh_keras(seed: int) -> None:
    """Before a new model: what `keras.backend.clear_session(free_memory=False)` and
    `keras.utils.set_random_seed(seed)` do (Keras's global state and layer names reset; Python's,
    numpy's, Keras's and TensorFlow's global seeds set), except clearing TensorFlow's kernel cache,
    which both do. That cache holds the functions the process has instantiated: cleared before
    each trial, every trial instantiated its structure's shared epoch function again (~0.15 s of
    a breast-cancer MLP's first epoch, whose steady epochs take ~5 ms; models.shared_step). The
    kernel cache has no seeds to reset for the workbench's models: Keras's random ops are
    stateless, seeded from Keras's own generator, and the train pipelines shuffle with explicit
    seeds (models.training.batches)."""
    import keras
    from tensorflow.python import pywrap_tfe

    clear = pywrap_tfe.TFE_ContextClearCaches
    pywrap_tfe.TFE_ContextClearCaches = _keep_caches
    try:
        keras.backend.clear_session(free_memory=False)
        keras.utils.set_random_seed(seed)
    finally:
        pywrap_tfe.TFE_ContextClearCaches = clear


def _keep_caches(handle: object) -> None:
    """TensorFlow's cache clearing, skipped (fresh_keras)."""
