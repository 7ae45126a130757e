"""Model builders: every family and task builds, carries its scaling, and trains a step."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models import FAMILIES, load_dataset
from models.training import NonFiniteLossError, evaluate, fit


@pytest.mark.parametrize(
    ("family", "dataset", "params"),
    [
        ("mlp", "breast_cancer", {"n_layers": 2, "units": [8, 4], "dropout": [0.1, 0.0], "batch_norm": True}),
        ("mlp", "wine", {"n_layers": 1, "units": 8, "optimizer": "sgd", "momentum": 0.9, "nesterov": True}),
        ("mlp", "diabetes", {"units": [8], "l2": 1e-4, "optimizer": "rmsprop"}),
        ("cnn", "digits", {"n_conv": 2, "filters": [4, 8], "kernel_size": [3, 5], "dense_units": 16, "optimizer": "adamw"}),
    ],
)
def test_families_build_and_train(family, dataset, params):
    data = load_dataset(name=dataset, seed=0)
    keras.utils.set_random_seed(0)
    model = FAMILIES[family].build(params, data.spec)
    traced, step = [], model.train_step
    model.train_step = lambda batch: (traced.append(1), step(batch))[1]  # runs once per trace of the step
    registered = custom_gradients()
    result = fit(model, data, epochs=2, batch_size=64)
    assert result.epochs_run == 2 and "val_loss" in result.history
    # Nothing of the traced step stays in TensorFlow's global gradient registry (what kept every
    # trained model's train step alive, a process's whole life).
    assert custom_gradients() == registered
    # MLPs with Adam or SGD take the train step shared by their structure (models.shared_step), the
    # rest Keras's, traced once: the optimizer's variables existed before the first trace.
    shared = family == "mlp" and params.get("optimizer") != "rmsprop"
    assert result.extras["train_step"].startswith("shared" if shared else "keras")
    assert len(traced) == (0 if shared else 1)
    again = evaluate(model, data.x_val, data.y_val)  # the restored best epoch's weights score as they did then
    assert result.best_validation() == pytest.approx(again, rel=1e-6)
    metrics = evaluate(model, data.x_test, data.y_test)
    assert np.isfinite(metrics["loss"])
    # The scaling is a layer of the model: raw features go in, the saved statistics apply.
    scaling = model.get_layer("scaling")
    np.testing.assert_allclose(np.asarray(scaling.mean).ravel(), data.spec.feature_mean, rtol=1e-5)


def custom_gradients() -> set[str]:
    from tensorflow.python.framework import ops

    return {name for name in ops._gradient_registry.list() if name.startswith("CustomGradient")}


@pytest.mark.parametrize(
    ("make", "kernel"),
    [
        (lambda: keras.optimizers.Adam(learning_rate=0.05), "ResourceApplyAdam"),
        (lambda: keras.optimizers.SGD(learning_rate=0.05), "ResourceApplyGradientDescent"),
        (lambda: keras.optimizers.SGD(learning_rate=0.05, momentum=0.9), "ResourceApplyKerasMomentum"),
        (lambda: keras.optimizers.SGD(learning_rate=0.05, momentum=0.8, nesterov=True), "ResourceApplyKerasMomentum"),
        (lambda: keras.optimizers.RMSprop(learning_rate=0.05, momentum=0.5), None),  # Keras's own update_step
    ],
)
def test_direct_updates_change_the_variables_as_the_keras_optimizer_does(make, kernel):
    """The fused kernels compute Keras's formulas: five steps of the same gradients, traced as in
    a train step, leave the variables and the optimizer's slots where Keras's own step leaves them."""
    import tensorflow as tf

    from models.updates import direct_updates

    rng = np.random.default_rng(0)
    start = [rng.normal(size=(3, 2)).astype("float32"), rng.normal(size=(2,)).astype("float32")]
    grads = [[rng.normal(size=w.shape).astype("float32") for w in start] for _ in range(5)]
    ends, graphs = [], []
    for direct in (False, True):
        variables = [keras.Variable(w) for w in start]
        optimizer = make()
        optimizer.build(variables)
        if direct:
            direct_updates(optimizer)
        step = tf.function(_applying(optimizer, variables))
        for g in grads:
            step([tf.constant(x) for x in g])
        graph = step.get_concrete_function([tf.constant(x) for x in grads[0]]).graph
        graphs.append({op.type for op in graph.get_operations()})
        ends.append([v.numpy() for v in variables] + [v.numpy() for v in optimizer.variables])
    for keras_value, direct_value in zip(*ends, strict=True):  # Adam's kernel takes 1 - beta_2 in float32:
        np.testing.assert_allclose(direct_value, keras_value, rtol=1e-5, atol=1e-5)  # ~1e-6 after 5 steps
    if kernel is not None:
        assert kernel in graphs[1] and kernel not in graphs[0]
    assert not any(op.startswith("ResourceApply") for op in graphs[0])


def _applying(optimizer, variables):
    return lambda grads: optimizer.apply(grads, variables)  # the variables captured, as a train step's are


def test_regression_outputs_are_in_target_units():
    data = load_dataset(name="diabetes", seed=0)
    model = FAMILIES["mlp"].build({"units": [4]}, data.spec)
    prediction = model(data.x_test[:50]).numpy().ravel()
    # Untrained, outputs sit near the training target mean rather than near 0.
    assert abs(prediction.mean() - data.spec.target_mean) < 3 * data.spec.target_std


def test_report_can_stop_training_and_divergence_is_an_error():
    data = load_dataset(name="breast_cancer", seed=0)
    model = FAMILIES["mlp"].build({"units": [4]}, data.spec)
    restored = []
    model.set_weights = lambda weights: restored.append(weights)  # a pruned model is discarded: not restored
    result = fit(model, data, epochs=5, batch_size=64, report=lambda epoch, logs: epoch >= 1)
    assert result.stopped_by == "report" and result.epochs_run == 2 and restored == []
    fit(model, data, epochs=1, batch_size=64, report=lambda epoch, logs: False)
    assert len(restored) == 1
    model = FAMILIES["mlp"].build({"units": [64], "optimizer": "sgd", "learning_rate": 1e12}, data.spec)
    with pytest.raises(NonFiniteLossError, match="loss became"):
        fit(model, data, epochs=5, batch_size=32)


@pytest.mark.parametrize(
    ("dataset", "params"),
    [
        ("breast_cancer", {"units": [8], "l2": 1e-3}),  # binary: loss + L2 penalty, accuracy, auc
        ("wine", {"units": [8], "batch_norm": True, "dropout": [0.3]}),  # multiclass, inference-mode layers
        ("diabetes", {"units": [8], "l2": 1e-4}),  # regression: mse, mae, rmse in target units
    ],
)
def test_eager_evaluation_matches_keras_evaluate(dataset, params):
    """evaluate() and the per-epoch val_* logs are what Keras's own evaluate/validation give,
    without tracing a test function."""
    data = load_dataset(name=dataset, seed=0)
    keras.utils.set_random_seed(0)
    model = FAMILIES["mlp"].build(params, data.spec)
    result = fit(model, data, epochs=2, batch_size=64)
    ours = evaluate(model, data.x_val, data.y_val, chunk=50)  # chunks must not change the result
    theirs = model.evaluate(data.x_val, data.y_val, batch_size=64, verbose=0, return_dict=True)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    # The history holds the eager validation of each epoch; after fit the best epoch's weights are back.
    assert set(result.history) >= {f"val_{k}" for k in theirs}
    assert min(result.history["val_loss"]) == pytest.approx(ours["loss"], rel=1e-5)


def test_models_compiled_alike_share_their_numpy_scored_metrics():
    """Every trial of a study compiles the same metrics; scored in numpy, their Keras objects are
    never updated, so one copy (whose AUCs made variables) serves every model."""
    from models.training import _scorers

    data = load_dataset(name="breast_cancer", seed=0)
    models = [FAMILIES["mlp"].build({"units": [units]}, data.spec) for units in (4, 5)]
    for model in models:
        evaluate(model, data.x_val, data.y_val)
    first, second = (_scorers(model)[2] for model in models)
    assert {m.name for m, _ in first} == {"accuracy", "auc", "pr_auc"} and all(twin is not None for _, twin in first)
    assert all(a is b for (a, _), (b, _) in zip(first, second, strict=True))


def test_sgd_trains_a_regression_in_target_units_without_diverging():
    """The head rescales to target units (diabetes: std ~77), which scales gradients by the std; the
    loss is weighted back to standardised units, so plain SGD trains (it gave inf at epoch 1)."""
    data = load_dataset(name="diabetes", seed=0)
    keras.utils.set_random_seed(0)
    params = {"units": [49], "activation": "tanh", "optimizer": "sgd", "learning_rate": 4e-4, "l2": 1.4e-5}
    result = fit(FAMILIES["mlp"].build(params, data.spec), data, epochs=3, batch_size=64)
    assert np.isfinite(result.history["loss"]).all() and result.history["val_mae"][-1] < 100


def test_balanced_class_weight_gives_each_class_the_same_total_weight():
    from models.training import balanced_class_weight

    y = np.array([0, 0, 0, 1])
    weights = balanced_class_weight(y)
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})
    assert sum(weights[int(c)] for c in y[y == 0]) == pytest.approx(sum(weights[int(c)] for c in y[y == 1]))
    data = load_dataset(name="breast_cancer", seed=0)
    trained = []
    for class_weight in (None, {0: 3.0, 1: 0.5}):
        keras.utils.set_random_seed(0)
        model = FAMILIES["mlp"].build({"units": [8]}, data.spec)
        result = fit(model, data, epochs=1, batch_size=64, class_weight=class_weight)
        trained.append(result.history["loss"][0])
        assert {"val_auc", "val_pr_auc"} <= set(result.history)  # ranking metrics on every epoch
    assert trained[0] != pytest.approx(trained[1], rel=1e-3)  # the weights reach the training loss


def test_numpy_metrics_give_keras_metric_values():
    """models.scores against the Keras objects it mirrors: AUCs with predictions on the
    thresholds, at 0 and 1, and NaN (a diverged model: a value, no error); accuracies and errors."""
    from models.scores import numpy_metric

    rng = np.random.default_rng(0)
    for case in range(12):
        n = int(rng.integers(5, 400))
        y = rng.integers(0, 2, n).astype(np.float32)
        p = rng.random((n, 1)).astype(np.float32)
        if case % 3 == 0:
            p = np.round(p * 199) / 199  # exactly on Keras's thresholds
        p[:4, 0] = [0.0, 1.0, 0.5, 1.0]
        for metric in (keras.metrics.AUC(), keras.metrics.AUC(curve="PR"), keras.metrics.BinaryAccuracy(),
                       keras.metrics.MeanAbsoluteError(), keras.metrics.RootMeanSquaredError()):
            metric.update_state(y[:, None], p)
            assert numpy_metric(metric)(y, p) == pytest.approx(float(metric.result()), abs=1e-6), (case, metric.name)
    labels, probs = rng.integers(0, 3, 50), rng.random((50, 3)).astype(np.float32)
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    accuracy.update_state(labels, probs)
    assert numpy_metric(accuracy)(labels, probs) == pytest.approx(float(accuracy.result()))
    assert np.isfinite(numpy_metric(keras.metrics.AUC())(np.array([0, 1, 1]), np.array([[np.nan], [0.2], [0.9]])))
    assert numpy_metric(keras.metrics.AUC(multi_label=True)) is None and numpy_metric(keras.metrics.Precision()) is None


def test_numpy_losses_and_penalties_give_keras_values():
    """models.scores' loss twins per row (saturated predictions included: Keras clips in float32)
    and its regularizer twins, against Keras on the same arrays."""
    from models.scores import numpy_loss, numpy_penalty

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300).astype(np.float32)
    p = rng.random((300, 1)).astype(np.float32)
    p[:4, 0] = [0.0, 1.0, 1.0, 0.0]
    y[:4] = [1, 0, 1, 0]
    labels, probs = rng.integers(0, 3, 300), rng.dirichlet([1, 1, 1], 300).astype(np.float32)
    probs[:2] = [[1, 0, 0], [0, 0, 1]]
    labels[:2] = [1, 0]
    target, pred = rng.normal(size=(300, 1)).astype(np.float32) * 50, rng.normal(size=(300, 1)).astype(np.float32) * 50
    for name, args in (("binary_crossentropy", (y[:, None], p)), ("sparse_categorical_crossentropy", (labels, probs)),
                       ("mean_squared_error", (target, pred))):
        fn = keras.losses.get(name)
        np.testing.assert_allclose(numpy_loss(fn)(*args), keras.ops.convert_to_numpy(fn(*args)), rtol=2e-6, err_msg=name)
    assert numpy_loss(keras.losses.get("huber")) is None
    w = rng.normal(size=(30, 8)).astype(np.float32)
    for reg in (keras.regularizers.L2(1e-3), keras.regularizers.L1(2e-4), keras.regularizers.L1L2(1e-4, 3e-3)):
        assert numpy_penalty(reg)(w) == pytest.approx(float(reg(w)), rel=1e-6), reg
    assert numpy_penalty(keras.regularizers.OrthogonalRegularizer()) is None


def test_evaluate_runs_the_numpy_program_only_where_it_agrees_with_keras(monkeypatch):
    """Validation runs the network's numpy program (4.4 vs 12.1 ms a call); a program that does
    not give Keras' answers is caught on its first use and Keras answers from then on."""
    import models.export as export
    import models.training as training

    data = load_dataset(name="breast_cancer", seed=0)
    keras.utils.set_random_seed(0)
    model = FAMILIES["mlp"].build({"units": [8], "batch_norm": True}, data.spec)
    theirs = model.evaluate(data.x_val, data.y_val, batch_size=64, verbose=0, return_dict=True)
    assert evaluate(model, data.x_val, data.y_val)["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert training._NUMPY_AGREES[model] is True

    real = export.to_numpy

    class Off:  # a program that misreads the network: every answer halved
        def __init__(self, network):
            self.net = self
            self.width = real(network).net.width
            self._network = network

        def __call__(self, rows):
            return real(self._network).net(rows) * 0.5

    monkeypatch.setattr(export, "to_numpy", Off)
    other = FAMILIES["mlp"].build({"units": [8]}, data.spec)
    theirs = other.evaluate(data.x_val, data.y_val, batch_size=64, verbose=0, return_dict=True)
    assert evaluate(other, data.x_val, data.y_val)["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert training._NUMPY_AGREES[other] is False
