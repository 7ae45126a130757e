"""A dense network as a small program that numpy alone runs: what a server without TensorFlow loads.

`models.export.to_numpy` turns a Keras network made of dense-style layers (the MLP family, with
its saved scaling, batch norm, a table's embeddings and column blocks) into a `NumpyNet`; it is
saved beside the Keras file as one `.npz` (the graph as JSON plus the weights, no pickle) and is
what `serving` runs when it is there. This module imports numpy and nothing else, so a serving
image can leave TensorFlow (and SciPy) out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

Array = np.ndarray
FORMAT = "workbench-numpy-net/1"


def _sigmoid(x: Array) -> Array:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(x.dtype, copy=False)  # no overflow for large |x|


def _erf(x: Array) -> Array:
    """erf in float64 (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): numpy has none of its own."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-z * z))


def _softmax(x: Array) -> Array:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
    "softmax": _softmax,
    "gelu": lambda x: (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype),  # Keras' default: the exact form
}


class NetError(ValueError):
    """A file that is not a numpy network of this format, or a step this module cannot run."""


@dataclass(frozen=True)
class Step:
    """One node of the graph: `op` applied to the outputs of `inputs` (node names)."""

    name: str
    op: str  # affine, dense, activation, columns, concat; `inputs` name earlier steps or "input" (the network's)
    inputs: tuple[str, ...] = ()
    arrays: Mapping[str, Array] = field(default_factory=dict)
    activation: str = "linear"

    def function(self) -> Callable[..., Array]:
        """The step as a function of its inputs' values, with its arrays bound once."""
        a, act = self.arrays, ACTIVATIONS[self.activation]
        if self.op == "affine":  # Normalization, BatchNormalization, Rescaling: x * scale + offset
            scale, offset = a["scale"], a["offset"]
            return lambda x: x * scale + offset
        if self.op == "dense":
            kernel, bias = a["kernel"], a.get("bias")
            if bias is None:
                return lambda x: act(x @ kernel)
            return (lambda x: x @ kernel + bias) if self.activation == "linear" else (lambda x: act(x @ kernel + bias))
        if self.op == "activation":
            return act
        if self.op == "columns":
            indices = a["indices"]
            return lambda x: x[:, indices]
        if self.op == "concat":
            return lambda *xs: np.concatenate(xs, axis=1)
        raise NetError(f"step {self.name!r}: unknown op {self.op!r}")


# Rows per pass: a block's widest activation stays within ~512 KiB (a core's L2 cache here holds
# 2 MiB). One pass over 100k rows of the breast-cancer MLP (64 units: 25 MB of activations) ran 1.8x
# slower than 2k-8k-row blocks (300 vs 166-170 ms per million rows), and with two processes scoring
# side by side 2048-row blocks kept parts 1.3x faster than 8192-row ones.
BLOCK_BYTES = 512 * 1024
MAX_BLOCK_ROWS = 8192


@runtime_checkable
class RowSource(Protocol):
    """Input rows that are not one matrix yet (models.tabular.EncodedRows): written a block at a time."""

    width: int  # inputs per row

    def __len__(self) -> int: ...

    def fill(self, out: Array, start: int) -> None:
        """Write rows start .. start + len(out) into `out` (zero where `clear` left it)."""

    def clear(self, out: Array, start: int) -> None:
        """Zero again what `fill` wrote of those rows beyond what the next `fill` writes over."""


@dataclass(frozen=True)
class NumpyNet:
    """A feed-forward graph over one float32 input [n, width]; steps in topological order."""

    width: int
    steps: tuple[Step, ...]
    output: str
    _chain: bool = field(init=False, repr=False, compare=False, default=False)
    _plan: list[tuple[str, Callable[..., Array], tuple[str, ...]]] = field(init=False, repr=False, compare=False,
                                                                          default_factory=list)
    _block: int = field(init=False, repr=False, compare=False, default=MAX_BLOCK_ROWS)

    def __post_init__(self) -> None:
        known = {"input"}
        for step in self.steps:
            if step.op not in ("affine", "dense", "activation", "columns", "concat"):
                raise NetError(f"step {step.name!r}: unknown op {step.op!r}")
            if step.activation not in ACTIVATIONS:
                raise NetError(f"step {step.name!r}: activation {step.activation!r} has no numpy form")
            unknown = [name for name in step.inputs if name not in known]
            if unknown or not step.inputs:
                raise NetError(f"step {step.name!r}: its inputs {unknown or '(none)'} do not come before it")
            known.add(step.name)
        if self.output not in known:
            raise NetError(f"the output {self.output!r} is not a step")
        # A chain (each step takes the one before: every MLP without a table's embeddings) runs
        # as a list of functions; a graph keeps each step's value by name.
        chain = all(s.inputs == (prev,) for s, prev in zip(self.steps, ["input", *(s.name for s in self.steps[:-1])], strict=True))
        object.__setattr__(self, "_chain", chain and self.output == (self.steps[-1].name if self.steps else "input"))
        object.__setattr__(self, "_plan", [(s.name, s.function(), s.inputs) for s in self.steps])
        widest = max([self.width, *(s.arrays["kernel"].shape[-1] for s in self.steps if "kernel" in s.arrays)])
        object.__setattr__(self, "_block", max(256, min(MAX_BLOCK_ROWS, BLOCK_BYTES // (4 * widest))))

    def __call__(self, x: Array | RowSource) -> Array:
        """The network's outputs for the rows of `x`, a block of rows at a time (every step is row-wise)."""
        if not isinstance(x, np.ndarray) and isinstance(x, RowSource):  # a protocol check costs microseconds: not per request
            return self._filled(x)
        x = np.asarray(x, dtype=np.float32)
        block = self._block
        if len(x) <= block:
            return self._run(x)
        first = self._run(x[:block])
        out = np.empty((len(x), *first.shape[1:]), dtype=first.dtype)
        out[:block] = first
        for start in range(block, len(x), block):
            out[start:start + block] = self._run(x[start:start + block])
        return out

    def _filled(self, rows: RowSource) -> Array:
        """The outputs for rows a source writes into one reused block: the rows never exist as one matrix."""
        if rows.width != self.width:
            raise NetError(f"the rows have {rows.width} inputs, the network takes {self.width}")
        n, block = len(rows), self._block
        buf = np.zeros((max(1, min(n, block)), self.width), dtype=np.float32)
        if n == 0:
            return self._run(buf[:0])
        out: Array | None = None
        for start in range(0, n, block):
            view = buf[:min(block, n - start)]
            rows.fill(view, start)
            y = self._run(view)
            if out is None:
                out = np.empty((n, *y.shape[1:]), dtype=y.dtype)
            out[start:start + len(view)] = y
            rows.clear(view, start)
        assert out is not None
        return out

    def _run(self, x: Array) -> Array:
        if self._chain:
            for _, function, _ in self._plan:
                x = function(x)
            return x
        values: dict[str, Array] = {"input": x}
        for name, function, inputs in self._plan:
            values[name] = function(*(values[i] for i in inputs))
        return values[self.output]

    @property
    def n_outputs(self) -> int:
        return int(self(np.zeros((1, self.width), dtype=np.float32)).shape[1])

    # -- file ---------------------------------------------------------------------------
    def save(self, path: Path) -> Path:
        """One .npz: `graph` (JSON text) and each step's arrays as `<step>/<key>`; no pickled objects."""
        graph = {"format": FORMAT, "width": self.width, "output": self.output,
                 "steps": [{"name": s.name, "op": s.op, "inputs": list(s.inputs), "activation": s.activation,
                            "arrays": sorted(s.arrays)} for s in self.steps]}
        arrays = {f"{s.name}/{key}": value for s in self.steps for key, value in s.arrays.items()}
        with open(path, "wb") as f:
            np.savez(f, graph=np.array(json.dumps(graph)), **arrays)  # type: ignore[arg-type]  # (stubs: **kwds vs allow_pickle)
        return path

    @classmethod
    def load(cls, path: Path) -> NumpyNet:
        try:
            with np.load(path, allow_pickle=False) as data:
                graph = json.loads(str(data["graph"]))
                if graph.get("format") != FORMAT:
                    raise NetError(f"{path}: format {graph.get('format')!r}, this server reads {FORMAT}")
                steps = tuple(Step(s["name"], s["op"], tuple(s["inputs"]), {k: data[f"{s['name']}/{k}"] for k in s["arrays"]},
                                   s["activation"]) for s in graph["steps"])
            net = cls(int(graph["width"]), steps, graph["output"])
            net(np.zeros((1, net.width), dtype=np.float32))  # shapes that do not chain fail here, not on a request
            return net
        except NetError as e:
            raise NetError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise NetError(f"{path}: not a numpy network ({type(e).__name__}: {e})") from None

