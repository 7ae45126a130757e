"""The forward pass a served model answers with, and what it costs: one place for both, so a
trial measures the latency that the API will show.

`compile_forward` gives the numpy program of a dense network (models.export) when it matches
Keras on varied rows, else a `tf.function` with a fixed input signature (traced once here).
`Latency` is what serving a model costs a client (measured on the API itself: serving.probe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from models.numpy_net import NumpyNet

Forward = Callable[[np.ndarray], Any]


@dataclass(frozen=True)
class CompiledForward:
    forward: Forward  # float32 [n, width] -> [n, n_outputs]
    n_outputs: int
    kind: str  # "numpy" or "tensorflow"

    @classmethod
    def numpy(cls, net: NumpyNet) -> CompiledForward:
        return cls(net, net.n_outputs, "numpy")


def compile_forward(model: Any, width: int, *, verify: bool = True) -> CompiledForward:
    """The fastest forward pass of a Keras model over `width` float32 inputs that gives Keras'
    answers. `verify=False` skips comparing the numpy program with Keras (an eager call, ~0.1 s
    on a fresh model): for timing a network whose layers it covers, not for serving it."""
    from models.export import export_checked, to_numpy

    net = (export_checked(model) if verify else to_numpy(model)).net
    if net is not None:
        return CompiledForward.numpy(net)

    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, width], tf.float32)], reduce_retracing=True)
    def forward(x):
        return model(x, training=False)

    probe = np.zeros((1, width), dtype=np.float32)
    n_outputs = int(forward(probe).shape[1])  # traces now, not on the first request
    return CompiledForward(forward, n_outputs, "tensorflow")


@dataclass(frozen=True)
class Latency:
    p50_ms: float  # one row
    batch64_ms: float  # 64 rows in one call

    def as_metrics(self) -> dict[str, float]:
        return {"latency_p50_ms": round(self.p50_ms, 4), "latency_batch64_ms": round(self.batch64_ms, 4)}
