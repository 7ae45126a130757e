"""A train step and an epoch shared by every network of one structure: traced once per process, not
per model.

Keras traces a new train step for each model it fits. For the small networks a study searches that
trace is most of a short trial: 0.17-0.21 s of a 3-epoch breast-cancer trial's 0.38-0.41 s, whose
three epochs of training took 0.007 s each (benchmarks/trial_cost.py). Here the functions depend on
the structure alone (the layers' kinds and wiring, the loss, the optimizer's kind), and everything a
trial varies is an input: the weights (so their shapes are free), the learning rate, the L2 factors,
the dropout rates (0 where a layer has none), the scaling constants (a table's robust or standard
scaling alike). A study's trials of the same depth, activation, batch norm and optimizer then share
one trace, whatever their widths and rates. (Plain SGD, momentum and Nesterov run as one function,
with the momentum and the Nesterov flag as inputs, cost each epoch of such a churn MLP 1.3-1.8 ms
(11-15%) for a trace or two saved in a study: they keep their own.)

Two functions per structure. `Epochs` runs a whole epoch in one call (`_traced_epoch`: a loop over
the batches of a permutation of the train split, the weights, batch norm statistics, optimizer slots
and step count carried as tensors and handed back): models.training.fit takes it unless a callback
watches batches. `step` runs one batch with the variables passed by handle (`_traced`), for fits
whose callbacks watch batches (KerasTuner's). A function is instantiated once per process as long as
TensorFlow's kernel cache is kept (models.runtime.fresh_keras; Keras's clear_session and
set_random_seed clear it).

Both compute what Keras's `fit` computes for these layers: the forward pass in training mode with
Keras's own ops (batch norm on the batch's moments, moving statistics updated with the layer's
momentum; Keras's stateless dropout, seeded by the fit's seed and the optimizer's step), the compiled
loss through Keras's loss class (sum over the batch size, class weights as sample weights, the loss
weight) plus each kernel's L2 penalty, gradients of that total, and the optimizer's update: Keras's
formulas on tensors in the epoch, the fused kernels models.updates uses for Keras's own step in the
step (so a model trains the same every way, `tests/unit/test_shared_step.py`). A network with
anything else (another layer, optimizer setting, loss, a learning-rate schedule, a trainable flag
turned off) gets no plan, and models.training.fit runs Keras's `fit`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from models import trace_cache
from models.layers import columns

LOSSES = {"binary_crossentropy": "BinaryCrossentropy", "sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
          "mse": "MeanSquaredError", "mean_squared_error": "MeanSquaredError"}
_ACTIVATIONS = ("linear", "relu", "gelu", "tanh", "sigmoid", "softmax", "elu", "selu", "silu", "swish", "softplus")


class Unsupported(Exception):
    """This network needs Keras's own train step (the message says why)."""


@dataclass(frozen=True)
class Plan:
    """One network's inputs to the shared step of its structure (`key`)."""

    key: tuple[Any, ...]
    train: list[Any]  # handles of the trainable variables, in model.trainable_variables order
    state: list[Any]  # handles of batch norm's moving statistics
    slots: list[Any]  # handles of the optimizer's slot variables; zeros when `fresh_slots`
    counters: list[Any]  # handles of the optimizer's step count and learning rate
    consts: list[Any]  # float32 tensors: scaling, L2 factors, dropout rates, optimizer settings, weights
    fresh_slots: bool = False  # the optimizer is not built: its slots start at zero, held by `Epochs`


def plan(model: keras.Model, class_weight: dict[int, float] | None = None) -> Plan:
    """The plan of a compiled, built model, or Unsupported with the first reason it has none. With
    the optimizer built (models.training.prebuild) the slots are its variables; not built, they are
    zeros, the values Keras would create them with, for `Epochs` to carry from epoch to epoch (the
    per-batch `step` takes variables only)."""
    import tensorflow as tf

    if tf.distribute.has_strategy():
        raise Unsupported("a distribution strategy is active")
    if len(model.inputs) != 1 or len(model.outputs) != 1 or len(model.inputs[0].shape) != 2:
        raise Unsupported("the network does not take one [rows, features] input to one output")
    if adds_own_losses(model):
        raise Unsupported("the network adds losses of its own")
    trainable = {id(v): i for i, v in enumerate(model.trainable_variables)}
    consts: list[Any] = []
    state: list[Any] = []

    def const(value: Any) -> int:
        consts.append(tf.constant(np.asarray(value, dtype=np.float32)))
        return len(consts) - 1

    def var(variable: Any) -> int:
        if id(variable) not in trainable:
            raise Unsupported(f"variable {variable.path} is not trainable")
        return trainable[id(variable)]

    ops: list[tuple[Any, ...]] = []
    where: dict[str, int] = {}  # layer name -> index of the op whose output it stands for
    layers: list[Any] = []  # the layer of each op
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            where[layer.name] = -1
            continue
        if len(layer._inbound_nodes) != 1:
            raise Unsupported(f"layer {layer.name!r} is called more than once")
        inputs = tuple(where[t._keras_history.operation.name] for t in layer._inbound_nodes[0].input_tensors)
        before = ops[inputs[0]] if inputs[0] >= 0 else None
        if (kind == "Dropout" and layer.noise_shape is None and before is not None and before[0] == "activation"
                and len(layers[inputs[0]]._outbound_nodes) == 1):
            # The dropout right after an activation (its only consumer) is part of that op, at rate 0
            # when there is none: a rate of 0 (no Dropout layer) does not split structures.
            consts[before[3]] = tf.constant(np.float32(layer.rate))
            where[layer.name] = inputs[0]
            continue
        op = _op(layer, kind, inputs, const, var, state)
        where[layer.name] = len(ops)
        ops.append(op)
        layers.append(layer)
    out = int(model.outputs[0].shape[-1])
    loss_key, loss_weight = _loss(model)
    optimizer_key, slots, settings = _optimizer(model.optimizer, model.trainable_variables)
    weights = np.ones(1, dtype=np.float32)
    if class_weight:
        weights = np.ones(max(class_weight) + 1, dtype=np.float32)
        for label, w in class_weight.items():
            weights[int(label)] = w
    consts += [tf.constant(settings), tf.constant(np.float32(loss_weight)), tf.constant(weights)]
    key = (tuple(ops), out, loss_key, optimizer_key, bool(class_weight), tuple(len(v.shape) for v in model.trainable_variables),
           len(state), len(slots), tuple(len(c.shape) for c in consts))
    optimizer = model.optimizer
    return Plan(key, [_handle(v) for v in model.trainable_variables], state, slots,
                [_handle(optimizer.iterations), _handle(optimizer._learning_rate)], consts, fresh_slots=not optimizer.built)


def adds_own_losses(model: keras.Model) -> bool:
    """Whether a layer of the network adds losses itself (`add_loss`, activity regularizers)."""
    return any(layer._losses for layer in model._flatten_layers())


def _handle(variable: Any) -> Any:
    return getattr(variable, "value", variable).handle


def _activation(fn: Any, where: str) -> str:
    for name in _ACTIVATIONS:
        if keras.activations.get(name) is fn:
            return name
    raise Unsupported(f"{where}: activation {getattr(fn, '__name__', fn)!r}")


def _op(layer: Any, kind: str, inputs: tuple[int, ...], const: Callable[[Any], int], var: Callable[[Any], int],
        state: list[Any]) -> tuple[Any, ...]:
    """One layer as a hashable step of the structure: its kind, inputs, static settings, and the
    indices of its variables and constants."""
    name = f"layer {layer.name!r}"
    if getattr(layer, "dtype_policy", None) is not None and layer.dtype_policy.name != "float32":
        raise Unsupported(f"{name}: dtype policy {layer.dtype_policy.name}")
    if getattr(layer, "activity_regularizer", None) is not None:
        raise Unsupported(f"{name}: activity regularizer")
    if kind == "Dense":
        if (layer.bias_regularizer is not None or layer.kernel_constraint is not None or layer.bias_constraint is not None
                or getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None)):
            raise Unsupported(f"{name}: a regularizer, constraint, LoRA or quantization Dense does not have")
        reg = layer.kernel_regularizer
        if reg is not None and type(reg) is not keras.regularizers.L2:
            raise Unsupported(f"{name}: kernel regularizer {type(reg).__name__}")
        l2 = const(reg.l2) if reg is not None else -1
        bias = var(layer.bias) if layer.bias is not None else -1
        return ("dense", inputs, _activation(layer.activation, name), var(layer.kernel), bias, l2)
    if kind == "Activation":  # (kind, inputs, activation, the dropout rate after it)
        return ("activation", inputs, _activation(layer.activation, name), const(0.0))
    if kind == "Dropout":
        if layer.noise_shape is not None:
            raise Unsupported(f"{name}: dropout with a noise shape")
        return ("dropout", inputs, const(layer.rate))
    if kind == "BatchNormalization":
        if (layer.axis not in (-1, 1) or layer.renorm or layer.synchronized or layer.gamma_regularizer is not None
                or layer.beta_regularizer is not None or layer.gamma_constraint is not None or layer.beta_constraint is not None):
            raise Unsupported(f"{name}: batch norm with settings the shared step does not have")
        if not layer.trainable:
            raise Unsupported(f"{name}: frozen batch norm")
        gamma = var(layer.gamma) if layer.scale else -1
        beta = var(layer.beta) if layer.center else -1
        state += [_handle(layer.moving_mean), _handle(layer.moving_variance)]
        return ("batch_norm", inputs, gamma, beta, len(state) - 2, const(layer.momentum), float(layer.epsilon))
    if kind == "Normalization":
        if layer.invert or layer.mean is None:
            raise Unsupported(f"{name}: inverted or unadapted normalization")
        return ("normalization", inputs, const(keras.ops.convert_to_numpy(layer.mean)),
                const(keras.ops.convert_to_numpy(layer.variance)))
    if kind == "Rescaling":
        return ("rescaling", inputs, const(layer.scale), const(layer.offset))
    if kind == "Columns":  # models.layers.Columns
        return ("columns", inputs, tuple(layer.indices))
    if kind == "TableView":  # models.layers.TableView: robust or standard scaling alike (constants)
        blocks = tuple((start, width) for start, width, _ in layer.blocks)
        return ("table", inputs, const(layer.shift), const(layer.variance), tuple(layer.dense), blocks,
                tuple(var(kernel) for kernel in layer.kernels))
    if kind == "Concatenate" and layer.axis in (-1, 1):
        return ("concatenate", inputs)
    raise Unsupported(f"{name} ({kind})")


def _loss(model: keras.Model) -> tuple[str, float]:
    loss = model.loss
    if not isinstance(loss, str) or loss not in LOSSES:
        raise Unsupported(f"loss {loss!r}")
    weights = (model.get_compile_config() or {}).get("loss_weights")
    if isinstance(weights, (list, tuple)):
        weights = weights[0] if len(weights) == 1 else None
    return LOSSES[loss], float(weights) if weights is not None else 1.0


def _optimizer(optimizer: Any, variables: list[Any]) -> tuple[tuple[Any, ...], list[Any], np.ndarray]:
    """The optimizer's kind for the key, its slot handles (zeros of each variable's shape when it
    is not built), and its settings [beta_1, beta_2, epsilon, 1 - beta_1, 1 - beta_2] (Adam) or
    [momentum] (SGD)."""
    import tensorflow as tf

    if optimizer is None:
        raise Unsupported("no optimizer")
    if (optimizer.clipnorm or optimizer.clipvalue or optimizer.global_clipnorm or optimizer.weight_decay
            or optimizer.use_ema or optimizer.gradient_accumulation_steps or optimizer.loss_scale_factor):
        raise Unsupported("optimizer with clipping, weight decay, EMA, accumulation or loss scaling")
    if not isinstance(optimizer._learning_rate, keras.Variable):
        raise Unsupported("a learning-rate schedule")
    kind = type(optimizer)
    if optimizer.built:
        index = [optimizer._get_variable_index(v) for v in variables]

        def slot(kind: str) -> list[Any]:
            return [_handle(getattr(optimizer, kind)[i]) for i in index]
    else:
        def slot(kind: str) -> list[Any]:
            return [tf.zeros(v.shape, tf.float32) for v in variables]
    if kind is keras.optimizers.Adam and not optimizer.amsgrad:
        slots = slot("_momentums") + slot("_velocities")
        settings = [optimizer.beta_1, optimizer.beta_2, optimizer.epsilon, 1 - optimizer.beta_1, 1 - optimizer.beta_2]
        return ("adam",), slots, np.asarray(settings, dtype=np.float32)
    if kind is keras.optimizers.SGD:
        if optimizer.momentum == 0:
            return ("sgd",), [], np.zeros(1, dtype=np.float32)
        slots = slot("momentums")
        return ("momentum", bool(optimizer.nesterov)), slots, np.asarray([optimizer.momentum], dtype=np.float32)
    raise Unsupported(f"optimizer {kind.__name__}")


def step(plan: Plan, seed: int, x_spec: Any, y_spec: Any) -> Callable[[Any, Any], Any]:
    """`run(x, y) -> loss`: one train step of the plan's network on a batch (the loss as Keras's
    loss tracker sees it: the compiled loss plus the penalties), with the shared trace. A structure
    met for the first time is traced at the first batch, in the first epoch as Keras's step is."""
    import tensorflow as tf

    if plan.fresh_slots:
        raise ValueError("the per-batch step updates the optimizer's slot variables: build the optimizer first")
    fixed = (plan.train, plan.state, plan.slots, plan.counters, plan.consts, tf.constant(seed, tf.int64))
    concrete: list[Any] = []

    def run(x: Any, y: Any) -> Any:
        if not concrete:
            concrete.append(_traced(plan.key, x_spec, y_spec))
        with small_graph_executor():
            return concrete[0](*fixed, x, y)

    return run


@functools.cache
def _executor() -> str:
    """TensorFlow's single-threaded executor where every op runs on the CPU, else its default ("")."""
    import tensorflow as tf

    return "" if tf.config.list_logical_devices("GPU") else "SINGLE_THREADED_EXECUTOR"


def small_graph_executor() -> contextlib.AbstractContextManager[None]:
    """The executor the shared functions are traced and run with: TensorFlow's single-threaded one,
    made for graphs of many small ops (tf.data runs its functions with it), which runs each op on the
    calling thread instead of scheduling it on the inter-op pool. A steady epoch of the
    breast-cancer MLP took 2.2-3.0 ms with it against 3.0-4.0 ms, and a structure's first call
    (its function instantiated) 0.11-0.30 s against 0.13-0.32 s. It runs no v1 control flow, so
    the epoch's loop stays a functional While op, and no graph split across devices: with a GPU
    the default executor runs them."""
    import tensorflow as tf

    executor = _executor()
    return tf.experimental.function_executor_type(executor) if executor else contextlib.nullcontext()


def traces() -> int:
    """How many structures' steps and epochs this process has traced (not loaded: `loads`)."""
    return _traced.cache_info().currsize + _EPOCHS["traced"]


def loads() -> int:
    """How many structures' epochs this process has loaded from the trace cache (models.trace_cache)."""
    return _EPOCHS["loaded"]


_EPOCHS = {"traced": 0, "loaded": 0}


@functools.cache
def _traced(key: tuple[Any, ...], x_spec: Any, y_spec: Any) -> Any:
    """The concrete train step of one structure (traced on first use, kept for the process)."""
    import tensorflow as tf

    ops, out, loss_name, optimizer_key, weighted, ranks, n_state, n_slots, const_ranks = key
    resource = tf.TensorSpec([], tf.resource)
    loss_of = _loss_of(key)

    def train_step(train: list[Any], state: list[Any], slots: list[Any], counters: list[Any], consts: list[Any],
                   seed: Any, x: Any, y: Any) -> Any:
        iterations, learning_rate = counters
        count = tf.raw_ops.ReadVariableOp(resource=iterations, dtype=tf.int64)
        values = [tf.ensure_shape(tf.raw_ops.ReadVariableOp(resource=h, dtype=tf.float32), [None] * rank)
                  for h, rank in zip(train, ranks, strict=True)]
        moving = [tf.raw_ops.ReadVariableOp(resource=h, dtype=tf.float32) for h in state]
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss, moving = loss_of(values, moving, consts, tf.stack([seed, count]), x, y)
        grads = tape.gradient(loss, values)
        for handle, value in zip(state, moving, strict=True):
            tf.raw_ops.AssignVariableOp(resource=handle, value=value)
        lr = tf.raw_ops.ReadVariableOp(resource=learning_rate, dtype=tf.float32)
        _apply(optimizer_key, grads, train, slots, consts[-3], lr, tf.cast(count + 1, tf.float32))
        tf.raw_ops.AssignAddVariableOp(resource=iterations, value=tf.constant(1, tf.int64))
        return loss

    signature = ([resource] * len(ranks), [resource] * n_state, [resource] * n_slots, [resource, resource],
                 [tf.TensorSpec([None] * rank, tf.float32) for rank in const_ranks], tf.TensorSpec([], tf.int64),
                 x_spec, y_spec)
    with small_graph_executor():
        return tf.function(train_step, autograph=False).get_concrete_function(*signature)


@functools.cache
def _traced_epoch(key: tuple[Any, ...], x_spec: Any, y_spec: Any) -> Any:
    """The concrete epoch of one structure: every batch of a permutation of the train split in one
    call, the weights, batch norm statistics, optimizer slots and step count in as tensors of any
    shape and out updated. No variables inside, and no Python between batches. Loaded from the
    trace cache when a process on this machine traced it before (models.trace_cache), else traced
    and written there."""
    parts = ("epoch", key, x_spec, y_spec)
    loaded = trace_cache.load(parts)
    if loaded is not None:
        _EPOCHS["loaded"] += 1
        return loaded
    concrete = _trace_epoch(key, x_spec, y_spec)
    _EPOCHS["traced"] += 1
    trace_cache.store(parts, concrete)
    return concrete


def _trace_epoch(key: tuple[Any, ...], x_spec: Any, y_spec: Any) -> Any:
    import tensorflow as tf

    ops, out, loss_name, optimizer_key, weighted, ranks, n_state, n_slots, const_ranks = key
    loss_of = _loss_of(key)
    slot_ranks = ranks * (n_slots // len(ranks)) if ranks else ()

    def epoch(values: list[Any], state: list[Any], slots: list[Any], count: Any, lr: Any, consts: list[Any],
              seed: Any, x: Any, y: Any, perm: Any, batch_size: Any) -> tuple[Any, ...]:
        n = tf.shape(perm)[0]
        steps = (n + batch_size - 1) // batch_size

        def body(b: Any, count: Any, values: list[Any], state: list[Any], slots: list[Any], losses: Any) -> tuple[Any, ...]:
            start = b * batch_size
            rows = perm[start:tf.minimum(start + batch_size, n)]
            with tf.GradientTape() as tape:
                tape.watch(values)
                loss, state = loss_of(values, state, consts, tf.stack([seed, count]), tf.gather(x, rows), tf.gather(y, rows))
            grads = tape.gradient(loss, values)
            values, slots = _updated(optimizer_key, grads, values, slots, consts[-3], lr, tf.cast(count + 1, tf.float32))
            return b + 1, count + 1, values, state, slots, losses.write(b, loss)

        losses = tf.TensorArray(tf.float32, steps, element_shape=[])
        _, count, values, state, slots, losses = tf.while_loop(
            lambda b, *_: b < steps, body, (tf.constant(0), count, values, state, slots, losses))
        return values, state, slots, count, losses.stack()

    signature = ([tf.TensorSpec([None] * r, tf.float32) for r in ranks], [tf.TensorSpec([None], tf.float32)] * n_state,
                 [tf.TensorSpec([None] * r, tf.float32) for r in slot_ranks], tf.TensorSpec([], tf.int64),
                 tf.TensorSpec([], tf.float32), [tf.TensorSpec([None] * rank, tf.float32) for rank in const_ranks],
                 tf.TensorSpec([], tf.int64), x_spec, y_spec, tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32))
    with small_graph_executor():  # also keeps the loop a While op: that executor runs no Switch/Merge
        return tf.function(epoch, autograph=False).get_concrete_function(*signature)


def _loss_of(key: tuple[Any, ...]) -> Callable[..., tuple[Any, list[Any]]]:
    """`loss_of(values, moving, consts, seed, x, y) -> (loss, moving')`: the forward pass of the
    structure in training mode and the loss Keras's step minimizes (the compiled loss, class weights
    as sample weights, the loss weight, plus the L2 penalties), batch norm's moving statistics
    updated with the batch's moments (values in, values out)."""
    import tensorflow as tf

    ops, out, loss_name, optimizer_key, weighted, ranks, n_state, n_slots, const_ranks = key
    loss_object = getattr(keras.losses, loss_name)()

    def loss_of(values: list[Any], moving: list[Any], consts: list[Any], seed: Any, x: Any, y: Any) -> tuple[Any, list[Any]]:
        moving = list(moving)
        outputs: dict[int, Any] = {-1: x}
        penalty = tf.constant(0.0)
        for i, op in enumerate(ops):
            kind, inputs = op[0], op[1]
            h = outputs[inputs[0]]
            if kind == "dense":
                _, _, activation, kernel, bias, l2 = op
                h = keras.ops.matmul(h, values[kernel])
                if bias >= 0:
                    h = keras.ops.add(h, values[bias])
                if _feeds_head(ops, i):  # the loss aligns the target by the output's static width
                    h = tf.ensure_shape(h, [None, out])
                h = keras.activations.get(activation)(h)
                if l2 >= 0:
                    penalty += consts[l2] * tf.reduce_sum(tf.square(values[kernel]))
            elif kind == "activation":
                h = _dropout(keras.activations.get(op[2])(h), consts[op[3]], seed, i)
            elif kind == "dropout":
                h = _dropout(h, consts[op[2]], seed, i)
            elif kind == "batch_norm":
                _, _, gamma, beta, at, momentum, epsilon = op
                mean, variance = keras.ops.moments(h, axes=[0])
                m = consts[momentum]
                moving[at] = moving[at] * m + mean * (1.0 - m)
                moving[at + 1] = moving[at + 1] * m + variance * (1.0 - m)
                h = keras.ops.batch_normalization(
                    h, mean, variance, axis=-1, offset=values[beta] if beta >= 0 else None,
                    scale=values[gamma] if gamma >= 0 else None, epsilon=epsilon)
            elif kind == "normalization":
                h = _normalized(h, consts[op[2]], consts[op[3]])
            elif kind == "rescaling":
                h = h * consts[op[2]] + consts[op[3]]
                if _feeds_head(ops, i):
                    h = tf.ensure_shape(h, [None, out])
            elif kind == "columns":
                h = columns(h, list(op[2]), take=tf.gather)
            elif kind == "table":
                _, _, shift, variance, dense, blocks, kernels = op
                h = _normalized(h, consts[shift], consts[variance])
                if blocks:
                    parts = [columns(h, list(dense), take=tf.gather)] if dense else []
                    parts += [keras.ops.matmul(h[:, start:start + width], values[kernel])
                              for (start, width), kernel in zip(blocks, kernels, strict=True)]
                    h = tf.concat(parts, axis=-1) if len(parts) > 1 else parts[0]
            elif kind == "concatenate":
                h = tf.concat([outputs[j] for j in inputs], axis=-1)
            outputs[i] = h
        loss_weight, class_weights = consts[-2], consts[-1]
        weights = tf.gather(class_weights, tf.cast(tf.reshape(y, [-1]), tf.int32)) if weighted else None
        return loss_weight * loss_object(y, outputs[len(ops) - 1], sample_weight=weights) + penalty, moving

    return loss_of


def _normalized(h: Any, mean: Any, variance: Any) -> Any:
    """Keras's Normalization: (h - mean) / max(sqrt(variance), epsilon)."""
    import tensorflow as tf

    return (h - mean) / tf.maximum(tf.sqrt(variance), keras.config.epsilon())


def _dropout(h: Any, rate: Any, seed: Any, i: int) -> Any:
    """Keras's dropout (TensorFlow's stateless dropout) at a rate given as an input, the identity at 0."""
    import tensorflow as tf

    drop = tf.nn.experimental.stateless_dropout(
        h, rate=tf.minimum(rate, 0.999), seed=tf.random.experimental.stateless_fold_in(seed, i))
    return tf.where(rate > 0, drop, h)


def _feeds_head(ops: tuple[tuple[Any, ...], ...], i: int) -> bool:
    """Whether only element-wise steps (activation, rescaling) follow op i: its width is the
    output's."""
    return all(op[0] in ("activation", "rescaling") for op in ops[i + 1:])


def _apply(optimizer_key: tuple[Any, ...], grads: list[Any], train: list[Any], slots: list[Any], settings: Any,
           lr: Any, step: Any) -> None:
    """The optimizer's update of each variable with TensorFlow's fused kernels (models.updates)."""
    import tensorflow as tf

    n = len(train)
    if optimizer_key[0] == "adam":
        beta_1, beta_2, epsilon = settings[0], settings[1], settings[2]
        beta_1_power, beta_2_power = tf.pow(beta_1, step), tf.pow(beta_2, step)
    for i, (grad, handle) in enumerate(zip(grads, train, strict=True)):
        if grad is None:
            continue
        if optimizer_key[0] == "adam":
            tf.raw_ops.ResourceApplyAdam(var=handle, m=slots[i], v=slots[n + i], beta1_power=beta_1_power,
                                         beta2_power=beta_2_power, lr=lr, beta1=beta_1, beta2=beta_2, epsilon=epsilon,
                                         grad=grad)
        elif optimizer_key[0] == "sgd":
            tf.raw_ops.ResourceApplyGradientDescent(var=handle, alpha=lr, delta=grad)
        else:
            tf.raw_ops.ResourceApplyKerasMomentum(var=handle, accum=slots[i], lr=lr, grad=grad, momentum=settings[0],
                                                  use_nesterov=optimizer_key[1])


def _updated(optimizer_key: tuple[Any, ...], grads: list[Any], values: list[Any], slots: list[Any], settings: Any,
             lr: Any, step: Any) -> tuple[list[Any], list[Any]]:
    """The optimizer's update as values in, values out: Keras's formulas (Adam's bias-corrected step
    size and moments, with 1 - beta as Keras computes it in double precision; SGD; momentum and
    Nesterov's look-ahead)."""
    import tensorflow as tf

    n = len(values)
    values, slots = list(values), list(slots)
    if optimizer_key[0] == "adam":
        beta_1, beta_2, epsilon, one_minus_beta_1, one_minus_beta_2 = (settings[i] for i in range(5))
        alpha = lr * tf.sqrt(1.0 - tf.pow(beta_2, step)) / (1.0 - tf.pow(beta_1, step))
    for i, grad in enumerate(grads):
        if grad is None:
            continue
        if optimizer_key[0] == "adam":
            m = slots[i] + (grad - slots[i]) * one_minus_beta_1
            v = slots[n + i] + (tf.square(grad) - slots[n + i]) * one_minus_beta_2
            slots[i], slots[n + i] = m, v
            values[i] = values[i] - (m * alpha) / (tf.sqrt(v) + epsilon)
        elif optimizer_key[0] == "sgd":
            values[i] = values[i] - grad * lr
        else:
            accum = slots[i] * settings[0] - grad * lr
            slots[i] = accum
            values[i] = values[i] + (accum * settings[0] - grad * lr if optimizer_key[1] else accum)
    return values, slots


class Epochs:
    """Whole epochs of one network through its structure's epoch function (`_traced_epoch`): each
    call reads the network's variables, runs every batch of the given permutation of the train
    split, and writes the variables back, so between epochs the model holds its weights as after
    Keras's epoch (for validation, checkpoints and callbacks). `__call__(permutation)` returns
    each batch's loss, as Keras's step returns it. A structure met for the first time is traced at
    its first epoch. When the optimizer is not built (`Plan.fresh_slots`), its slots start at zero
    and stay here between epochs: creating them as variables cost a trial ~10-18 ms, and nothing
    after the fit reads them."""

    def __init__(self, plan: Plan, seed: int, x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
        import tensorflow as tf

        self.plan = plan
        self._seed = tf.constant(seed, tf.int64)
        self._x, self._y = tf.constant(x), tf.constant(y)
        self._batch_size = tf.constant(batch_size, tf.int32)
        self._specs = tuple(tf.TensorSpec([None, *t.shape[1:]], t.dtype) for t in (self._x, self._y))
        self._epoch: Any = None
        self._slots: list[Any] | None = list(plan.slots) if plan.fresh_slots else None

    def __call__(self, permutation: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        if self._epoch is None:
            self._epoch = _traced_epoch(self.plan.key, *self._specs)
        plan = self.plan
        read = tf.raw_ops.ReadVariableOp
        values, state = ([read(resource=h, dtype=tf.float32) for h in handles] for handles in (plan.train, plan.state))
        slots = self._slots if self._slots is not None else [read(resource=h, dtype=tf.float32) for h in plan.slots]
        iterations, learning_rate = plan.counters
        with small_graph_executor():
            values, state, slots, count, losses = self._epoch(
                values, state, slots, read(resource=iterations, dtype=tf.int64), read(resource=learning_rate, dtype=tf.float32),
                plan.consts, self._seed, self._x, self._y, tf.constant(permutation, tf.int32), self._batch_size)
        slot_handles = plan.slots
        if self._slots is not None:  # kept here, not written to variables
            self._slots, slots, slot_handles = list(slots), [], []
        for handle, value in zip([*plan.train, *plan.state, *slot_handles, iterations], [*values, *state, *slots, count],
                                 strict=True):
            tf.raw_ops.AssignVariableOp(resource=handle, value=value)
        return losses.numpy()
