"""A Keras network as a `NumpyNet` (models.numpy_net), when all of its layers are dense-style.

The walk follows the functional graph, so a table's embedding branches (column blocks, bias-free
Dense, Concatenate; models.layers.TableView as those steps) export as they are. Any other layer
(convolutions, ...) gives None and a reason: that model keeps TensorFlow at serving time.
`export_checked` also compares the program with Keras on varied rows before anyone relies on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.numpy_net import ACTIVATIONS, NumpyNet, Step

# Keras' float32 against numpy's: the same arithmetic in another order, so the bound is 1e-5 plus
# 1e-5 of the largest output (a regression head answers in target units, hundreds for some).
RTOL, ATOL = 1e-5, 1e-5


@dataclass(frozen=True)
class Export:
    net: NumpyNet | None
    reason: str  # why there is no net ("" when there is one)


def _f32(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _activation_name(layer: Any) -> str | None:
    name = getattr(layer.activation, "__name__", None)
    return name if name in ACTIVATIONS else None


def _step(layer: Any, inputs: tuple[str, ...]) -> Step | str:
    """The step of one layer, or why it has none."""
    kind, name = type(layer).__name__, layer.name
    if kind == "Normalization":
        return _normalization(name, inputs, _f32(layer.mean), _f32(layer.variance))
    if kind == "BatchNormalization":
        if layer.axis not in (-1, 1):
            return f"layer {name!r}: batch norm over axis {layer.axis}"
        mean, var = _f32(layer.moving_mean), _f32(layer.moving_variance)
        scale = 1.0 / np.sqrt(var + np.float32(layer.epsilon))
        scale = scale * _f32(layer.gamma) if layer.gamma is not None else scale
        beta = _f32(layer.beta) if layer.beta is not None else np.zeros_like(mean)
        return Step(name, "affine", inputs, {"scale": scale, "offset": beta - mean * scale})
    if kind == "Rescaling":
        return Step(name, "affine", inputs, {"scale": _f32(layer.scale), "offset": _f32(layer.offset)})
    if kind in ("Dense", "Activation"):
        activation = _activation_name(layer)
        if activation is None:
            return f"layer {name!r}: activation {getattr(layer.activation, '__name__', layer.activation)!r} has no numpy form"
        if kind == "Activation":
            return Step(name, "activation", inputs, activation=activation)
        weights = [_f32(w) for w in layer.get_weights()]
        arrays = {"kernel": weights[0], **({"bias": weights[1]} if len(weights) > 1 else {})}
        return Step(name, "dense", inputs, arrays, activation)
    if kind == "Columns":  # models.layers.Columns
        return Step(name, "columns", inputs, {"indices": _indices(layer.indices)})
    if kind == "Concatenate" and layer.axis in (-1, 1):
        return Step(name, "concat", inputs)
    return f"layer {name!r} ({kind}) has no numpy form"


def _normalization(name: str, inputs: tuple[str, ...], mean: np.ndarray, variance: np.ndarray) -> Step:
    """(x - mean) / max(sqrt(variance), 1e-7), Keras's Normalization, as an affine step."""
    scale = 1.0 / np.maximum(np.sqrt(variance), 1e-7)
    return Step(name, "affine", inputs, {"scale": scale.reshape(1, -1), "offset": (-mean * scale).reshape(1, -1)})


def _indices(indices: list[int]) -> np.ndarray:
    return np.asarray(indices, dtype=np.int64)


def _table_steps(layer: Any, inputs: tuple[str, ...]) -> list[Step]:
    """models.layers.TableView as the steps it stands for: the scaling (none when it is the
    identity), and with embeddings the other columns, each block through its kernel, and their
    concatenation. No steps at all for the identity without embeddings."""
    name, steps = layer.name, []
    shift, variance = _f32(layer.shift), _f32(layer.variance)
    if np.any(shift != 0) or np.any(variance != 1):
        steps.append(_normalization(f"{name}/scaling", inputs, shift, variance))
        inputs = (steps[-1].name,)
    if not layer.blocks:
        return steps
    parts = []
    if layer.dense:
        steps.append(Step(f"{name}/dense_columns", "columns", inputs, {"indices": _indices(layer.dense)}))
        parts.append(steps[-1].name)
    for i, ((start, width, _), kernel) in enumerate(zip(layer.blocks, layer.kernels, strict=True)):
        steps.append(Step(f"{name}/block_{i}", "columns", inputs, {"indices": _indices(list(range(start, start + width)))}))
        steps.append(Step(f"{name}/embedding_{i}", "dense", (steps[-1].name,), {"kernel": _f32(kernel)}))
        parts.append(steps[-1].name)
    if len(parts) > 1:
        steps.append(Step(f"{name}/concat", "concat", tuple(parts)))
    return steps


def to_numpy(model: Any) -> Export:
    """The network as numpy steps, or None and the first layer that has no numpy form. Never
    raises for the network's sake: a layer this walk misreads leaves the model to TensorFlow."""
    try:
        return _walk(model)
    except Exception as e:  # a layer configured in a way the walk does not know (it reads Keras' graph)
        return Export(None, f"the export failed ({type(e).__name__}: {e})")


def _walk(model: Any) -> Export:
    if len(model.inputs) != 1 or len(model.outputs) != 1 or len(model.inputs[0].shape) != 2:
        return Export(None, "the network does not take one [rows, features] input to one output")
    names: dict[str, str] = {}  # Keras layer name -> step name whose value it stands for
    steps: list[Step] = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            names[layer.name] = "input"
            continue
        if len(layer._inbound_nodes) != 1:
            return Export(None, f"layer {layer.name!r} is called more than once")
        inputs = tuple(names[t._keras_history.operation.name] for t in layer._inbound_nodes[0].input_tensors)
        if kind == "Dropout":  # inference: the identity
            names[layer.name] = inputs[0]
            continue
        if kind == "TableView":  # models.layers.TableView
            table = _table_steps(layer, inputs)
            names[layer.name] = table[-1].name if table else inputs[0]  # none: the identity
            steps += table
            continue
        step = _step(layer, inputs)
        if isinstance(step, str):
            return Export(None, step)
        names[layer.name] = step.name
        steps.append(step)
    width = int(model.inputs[0].shape[1])
    return Export(NumpyNet(width, tuple(steps), names[model.outputs[0]._keras_history.operation.name]), "")


def export_checked(model: Any, rows: np.ndarray | None = None) -> Export:
    """`to_numpy`, kept only if it gives Keras' answers on `rows` and on varied random rows."""
    export = to_numpy(model)
    if export.net is None:
        return export
    width = export.net.width
    probe = np.random.default_rng(0).normal(size=(64, width)).astype(np.float32) * 3
    if rows is not None:
        probe = np.concatenate([probe, np.asarray(rows, dtype=np.float32).reshape(-1, width)[:256]])
    reference = np.asarray(model(probe, training=False))
    mine = export.net(probe)
    worst = float(np.max(np.abs(mine - reference))) if mine.shape == reference.shape else float("inf")
    if not worst <= ATOL + RTOL * float(np.max(np.abs(reference))):
        return Export(None, f"the numpy program differs from Keras (largest difference {worst:.3g})")
    return export
