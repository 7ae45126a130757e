"""The optimizer's step outside a distribution strategy: each variable updated at once, with
TensorFlow's fused kernel where it computes what the Keras optimizer computes.

Keras's TensorFlow optimizers build their update from elementwise ops, per variable: Adam's is
38 operations (its step count, bias corrections and moments recomputed for every variable). Traced,
those ops were 382 of the 884 in a small MLP's train step (2 Dense layers with batch norm: 10
variables), and graph ops cost Python time to create: the step's first epoch took 0.39 s, 0.25 s
with Adam's update as one `ResourceApplyAdam` a variable. The kernels compute Keras's formulas
(TensorFlow's training_ops: Adam's bias-corrected step size, moments and `m * alpha / (sqrt(v) +
epsilon)`; SGD's `accum = accum * momentum - grad * lr`, Nesterov's look-ahead), so a model trains
the same. Adam's differs by rounding alone: its kernel takes 1 - beta_2 in float32 (0.99998713e-3,
not 1e-3), which moves a step by ~6e-6 of itself (`tests/unit/test_models.py`).

Outside a strategy, the step also skips Keras's one-replica all-reduce of the gradients (a sum
over one replica). Traced, that all-reduce is a `tf.custom_gradient`, which registers its gradient
function in TensorFlow's global gradient registry and never removes it: the registration held the
gradients, so every model a process trained kept its traced train step (a graph of ~330 operations
per small MLP; in a 45 s digits study the heap grew by ~2.5k objects a trial). Under a strategy,
and for the other optimizers' variables, Keras's own step runs.
"""

from __future__ import annotations

from typing import Any

import keras


def direct_updates(optimizer: keras.optimizers.Optimizer) -> None:
    """Make this optimizer instance update its variables directly (the class and its saved
    config are unchanged: a saved model reloads with Keras's own optimizer). Idempotent."""
    original = getattr(optimizer, "_backend_update_step", None)
    if original is None or getattr(original, "direct", False):
        return
    fused = _fused_kernel(optimizer)

    def update_step(grads: list[Any], variables: list[Any], learning_rate: Any) -> None:
        import tensorflow as tf

        if tf.distribute.has_strategy():
            original(grads, variables, learning_rate)
            return
        variables = [getattr(v, "value", v) for v in variables]  # Keras variables to tf.Variables
        apply = fused(learning_rate) if fused is not None else None
        for grad, variable in zip(grads, variables, strict=True):
            if apply is None or isinstance(grad, tf.IndexedSlices) or variable.dtype != tf.float32:
                optimizer.update_step(grad, variable, learning_rate)
            else:
                apply(grad, variable, optimizer._get_variable_index(variable))

    update_step.direct = True  # type: ignore[attr-defined]
    optimizer._backend_update_step = update_step


def _fused_kernel(optimizer: keras.optimizers.Optimizer) -> Any:
    """For an exact Adam or SGD (not a subclass, which may change the formula; not AMSGrad): a
    function of the step's learning rate that returns the per-variable fused update; else None."""
    import tensorflow as tf

    kind = type(optimizer)
    if kind is keras.optimizers.Adam and not optimizer.amsgrad:
        def adam(learning_rate: Any) -> Any:
            f32 = tf.float32
            step = tf.cast(optimizer.iterations + 1, f32)
            beta_1, beta_2 = tf.constant(optimizer.beta_1, f32), tf.constant(optimizer.beta_2, f32)
            lr, epsilon = tf.cast(learning_rate, f32), tf.constant(optimizer.epsilon, f32)
            beta_1_power, beta_2_power = tf.pow(beta_1, step), tf.pow(beta_2, step)

            def apply(grad: Any, variable: Any, index: int) -> None:
                tf.raw_ops.ResourceApplyAdam(
                    var=variable.handle, m=optimizer._momentums[index].value.handle,
                    v=optimizer._velocities[index].value.handle, beta1_power=beta_1_power,
                    beta2_power=beta_2_power, lr=lr, beta1=beta_1, beta2=beta_2, epsilon=epsilon, grad=grad)
            return apply
        return adam
    if kind is keras.optimizers.SGD:
        def sgd(learning_rate: Any) -> Any:
            lr = tf.cast(learning_rate, tf.float32)
            if optimizer.momentum == 0:
                return lambda grad, variable, index: tf.raw_ops.ResourceApplyGradientDescent(
                    var=variable.handle, alpha=lr, delta=grad)
            momentum = tf.constant(optimizer.momentum, tf.float32)
            return lambda grad, variable, index: tf.raw_ops.ResourceApplyKerasMomentum(
                var=variable.handle, accum=optimizer.momentums[index].value.handle, lr=lr, grad=grad,
                momentum=momentum, use_nesterov=bool(optimizer.nesterov))
        return sgd
    return None
