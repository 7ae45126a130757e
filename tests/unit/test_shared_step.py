"""The train step shared by networks of one structure: it trains as Keras's own step does, networks
that differ only in widths and rates share one trace, and anything it does not know goes to Keras."""

from __future__ import annotations

import functools
import os

import keras
import numpy as np
import pytest

from models import FAMILIES, load_dataset, shared_step
from models.training import fit, prebuild
from models.updates import direct_updates
from tests.conftest import CHURN


@functools.cache
def dataset(name: str):
    if name == "churn":
        return load_dataset(path=CHURN, target="churn", task="binary", columns={"customer_id": "id"}, seed=0)
    return load_dataset(name=name, seed=0)


def ready(name: str, params: dict, seed: int = 0, optimizer: bool = True) -> keras.Model:
    """A model as models.training.fit trains it: built, its optimizer built (or for whole epochs
    not) and fused, no train metrics."""
    data = dataset(name)
    keras.utils.set_random_seed(seed)
    model = FAMILIES["mlp"].build(params, data.spec)
    model._compile_metrics = None
    prebuild(model, data.x_train[:1], data.y_train[:1], optimizer=optimizer)
    direct_updates(model.optimizer)
    return model


def state(model: keras.Model) -> list[np.ndarray]:
    return [np.asarray(v) for v in model.weights] + [np.asarray(v) for v in model.optimizer.variables]


@pytest.mark.parametrize(
    ("name", "params", "class_weight"),
    [
        ("breast_cancer", {"n_layers": 2, "units": [8, 5], "l2": 1e-3, "activation": "gelu", "learning_rate": 0.02}, None),
        ("wine", {"n_layers": 1, "units": [6], "optimizer": "sgd", "momentum": 0.9, "nesterov": True, "learning_rate": 0.05,
                  "activation": "tanh"}, {0: 0.5, 1: 2.0, 2: 1.0}),
        ("diabetes", {"units": [7], "optimizer": "sgd", "l2": 1e-4, "learning_rate": 0.01}, None),
        # Batch norm with SGD: before it, a Dense's bias has a gradient of zero up to rounding, which
        # Adam would scale to full steps of rounding noise.
        ("churn", {"units": [6], "categorical_encoding": "embedding", "embedding_dim": 2, "numeric_scaling": "robust",
                   "batch_norm": True, "optimizer": "sgd", "momentum": 0.8, "learning_rate": 0.05}, {0: 1.0, 1: 3.0}),
    ],
)
def test_the_shared_step_trains_as_keras_does(name, params, class_weight):
    """Two epochs of up to six batches (the last one smaller) through Keras's train step, through the
    shared step and through the shared epoch (one call each; also with the optimizer not built, its
    slots carried by the epochs), from the same initial weights: the same loss at every step, and
    the same weights, batch norm statistics and optimizer slots after each epoch."""
    import tensorflow as tf

    data = dataset(name)
    theirs, ours, whole = ready(name, params), ready(name, params), ready(name, params)
    fresh = ready(name, params, optimizer=False)
    run = shared_step.step(shared_step.plan(ours, class_weight), 0, tf.TensorSpec([None, data.x_train.shape[1]], tf.float32),
                           tf.TensorSpec([None], tf.as_dtype(data.y_train.dtype)))
    n = min(134, len(data.x_train))
    epoch = shared_step.Epochs(shared_step.plan(whole, class_weight), 0, data.x_train[:n], data.y_train[:n], 24)
    fresh_plan = shared_step.plan(fresh, class_weight)
    assert fresh_plan.fresh_slots and not fresh.optimizer.built and fresh_plan.key == epoch.plan.key
    fresh_epoch = shared_step.Epochs(fresh_plan, 0, data.x_train[:n], data.y_train[:n], 24)
    their_slots = shared_step.plan(theirs, class_weight).slots
    for rtol, atol in ((1e-5, 1e-6), (5e-5, 5e-6)):  # rounding differences grow over the second epoch's steps
        expected = []
        for start in range(0, n, 24):
            x, y = data.x_train[start:start + 24][:n - start], data.y_train[start:start + 24][:n - start]
            expected.append(float(theirs.train_on_batch(x, y, class_weight=class_weight)))
            assert float(run(tf.constant(x), tf.constant(y))) == pytest.approx(expected[-1], rel=rtol)
        np.testing.assert_allclose(epoch(np.arange(n)), expected, rtol=rtol)
        np.testing.assert_allclose(fresh_epoch(np.arange(n)), expected, rtol=rtol)
        for keras_value, shared_value, epoch_value in zip(state(theirs), state(ours), state(whole), strict=True):
            np.testing.assert_allclose(shared_value, keras_value, rtol=rtol, atol=atol)
            np.testing.assert_allclose(epoch_value, keras_value, rtol=rtol, atol=atol)
        for keras_value, fresh_value in zip(theirs.weights, fresh.weights, strict=True):
            np.testing.assert_allclose(np.asarray(fresh_value), np.asarray(keras_value), rtol=rtol, atol=atol)
        assert len(fresh_epoch._slots) == len(their_slots)
        for handle, fresh_value in zip(their_slots, fresh_epoch._slots, strict=True):
            keras_value = tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32)
            np.testing.assert_allclose(np.asarray(fresh_value), np.asarray(keras_value), rtol=rtol, atol=atol)
        assert int(fresh.optimizer.iterations) == int(theirs.optimizer.iterations)
    assert not fresh.optimizer.built  # nothing made its variables


def test_networks_of_one_structure_share_one_trace():
    """Other widths, dropout rates (0 too: no Dropout layer), L2 factor, learning rate and seed:
    the same trace. Another depth, activation, optimizer or batch norm: a trace of its own. The
    dropout masks follow the fit's seed and step."""
    import tensorflow as tf

    base = {"n_layers": 2, "dropout": [0.3, 0.1], "l2": 1e-4, "batch_norm": True}
    a = ready("breast_cancer", {**base, "units": [16, 8], "learning_rate": 1e-3})
    b = ready("breast_cancer", {**base, "units": [40, 3], "dropout": [0.0, 0.2], "l2": 1e-2, "learning_rate": 0.05},
              seed=1)
    others = [ready("breast_cancer", {**base, **change}) for change in
              ({"optimizer": "sgd"}, {"batch_norm": False}, {"n_layers": 1, "units": [16], "dropout": [0.3]},
               {"activation": "tanh"})]
    keys = [shared_step.plan(m).key for m in (a, b, *others)]
    assert keys[0] == keys[1] and len(set(keys)) == 5
    data = dataset("breast_cancer")
    spec = tf.TensorSpec([None, data.x_train.shape[1]], tf.float32), tf.TensorSpec([None], tf.as_dtype(data.y_train.dtype))
    before = shared_step._traced.cache_info()
    for model in (a, b):
        shared_step.step(shared_step.plan(model), 7, *spec)(tf.constant(data.x_train[:32]), tf.constant(data.y_train[:32]))
    after = shared_step._traced.cache_info()
    assert after.currsize - before.currsize <= 1 and after.hits - before.hits >= 1

    def losses(seed: int) -> list[float]:  # learning rate 0: only the dropout masks change the loss
        model = ready("breast_cancer", {**base, "units": [16, 8], "optimizer": "sgd", "learning_rate": 0.0})
        run = shared_step.step(shared_step.plan(model), seed, *spec)
        return [float(run(tf.constant(data.x_train[:64]), tf.constant(data.y_train[:64]))) for _ in range(3)]

    first = losses(3)
    assert first == losses(3) and first != losses(4) and len(set(first)) == 3


def test_a_tables_scaling_and_embedding_size_do_not_split_structures():
    """Robust or standard scaling (constants of models.layers.TableView) and any embedding size:
    one structure. One-hot or embedding: two."""
    base = {"units": [6], "categorical_encoding": "embedding", "embedding_dim": 2, "numeric_scaling": "robust"}
    keys = [shared_step.plan(ready("churn", {**base, **change})).key for change in
            ({}, {"numeric_scaling": "standard"}, {"embedding_dim": 5}, {"categorical_encoding": "one_hot"},
             {"categorical_encoding": "one_hot", "numeric_scaling": "standard"})]
    assert keys[0] == keys[1] == keys[2] and keys[3] == keys[4] and keys[0] != keys[3]


def test_a_fit_says_which_step_it_ran():
    """An MLP takes the shared epoch function, or the shared step when a callback watches batches
    (KerasTuner's does), which then sees each one; a CNN and an optimizer it does not know take Keras's, and fit says why."""
    data = dataset("breast_cancer")

    class EveryBatch(keras.callbacks.Callback):
        seen: list = []

        def on_batch_end(self, batch, logs=None):
            self.seen.append((batch, logs["loss"]))

    def step_of(params: dict, **options) -> str:
        keras.utils.set_random_seed(0)
        model = FAMILIES["mlp"].build({"units": [4], **params}, data.spec)
        return fit(model, data, epochs=1, batch_size=64, **options).extras["train_step"]

    assert step_of({}).startswith("shared")
    assert step_of({"units": [9]}) == "shared"  # the same structure's epoch function, whatever the width
    assert step_of({"optimizer": "rmsprop"}) == "keras (optimizer RMSprop)"
    assert step_of({}, callbacks=[EveryBatch()]).startswith("shared")  # batch by batch, through the shared step
    assert step_of({"units": [5]}, callbacks=[EveryBatch()]) == "shared"
    EveryBatch.seen.clear()
    step_of({"units": [5]}, callbacks=[EveryBatch()])
    batches = -(-len(data.x_train) // 64)
    assert [b for b, _ in EveryBatch.seen] == list(range(batches)) and all(loss > 0 for _, loss in EveryBatch.seen)
    assert step_of({}, shared=False) == "keras (not asked)"
    digits = dataset("digits")
    keras.utils.set_random_seed(0)
    cnn = FAMILIES["cnn"].build({"n_conv": 1, "filters": [2], "dense_units": 4}, digits.spec)
    with pytest.raises(shared_step.Unsupported, match="Reshape"):
        shared_step.plan(cnn)


def test_whole_epochs_make_no_optimizer_variables():
    """Whole epochs carry the optimizer's slots themselves; the per-batch step and Keras's own
    step update its variables, so they have them made first."""
    data = dataset("breast_cancer")

    class EveryBatch(keras.callbacks.Callback):
        def on_batch_end(self, batch, logs=None):
            pass

    def fitted(**options) -> keras.Model:
        keras.utils.set_random_seed(0)
        model = FAMILIES["mlp"].build({"units": [4]}, data.spec)
        fit(model, data, epochs=2, batch_size=64, **options)
        return model

    whole = fitted()
    assert not whole.optimizer.built and int(whole.optimizer.iterations) == 2 * -(-len(data.x_train) // 64)
    assert fitted(callbacks=[EveryBatch()]).optimizer.built and fitted(shared=False).optimizer.built


def test_a_trial_seeds_as_keras_does_and_keeps_the_kernel_cache(monkeypatch):
    """models.runtime.fresh_keras seeds a model's weights as keras.utils.set_random_seed does, and
    resets Keras's names, without clearing TensorFlow's kernel cache (where the shared functions'
    instantiations live), which Keras's own two calls clear."""
    from tensorflow.python import pywrap_tfe

    from models.runtime import fresh_keras

    cleared = []
    clear = pywrap_tfe.TFE_ContextClearCaches
    monkeypatch.setattr(pywrap_tfe, "TFE_ContextClearCaches", lambda handle: (cleared.append(handle), clear(handle)))
    data = dataset("breast_cancer")
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(5)
    assert len(cleared) == 2
    theirs = FAMILIES["mlp"].build({"units": [6]}, data.spec)
    fresh_keras(5)
    ours = FAMILIES["mlp"].build({"units": [6]}, data.spec)
    assert len(cleared) == 2 and pywrap_tfe.TFE_ContextClearCaches is not clear
    for a, b in zip(theirs.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [layer.name for layer in ours.layers] == [layer.name for layer in theirs.layers]


def test_a_structure_checked_once_validates_in_numpy(monkeypatch):
    """Validation's numpy program is checked against Keras for a structure's first model; a later
    model of the structure (other widths) skips the check and still scores as Keras does."""
    import models.export as export
    from models.runtime import fresh_keras
    from models.training import evaluate

    checked = []
    real = export.export_checked
    monkeypatch.setattr(export, "export_checked", lambda *a, **k: (checked.append(1), real(*a, **k))[1])
    data = dataset("wine")
    params = {"n_layers": 3, "activation": "gelu", "batch_norm": True, "optimizer": "sgd", "use_momentum": True,
              "momentum": 0.7, "nesterov": False, "dropout": [0.1, 0.0, 0.2]}
    models = []
    for units in ([7, 5, 4], [12, 3, 9]):
        fresh_keras(0)
        models.append(FAMILIES["mlp"].build({**params, "units": units}, data.spec))
        assert fit(models[-1], data, epochs=2, batch_size=32).extras["train_step"].startswith("shared")
    assert len(checked) == 1
    ours = evaluate(models[1], data.x_val, data.y_val)
    theirs = models[1].evaluate(data.x_val, data.y_val, verbose=0, return_dict=True)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


def test_the_shared_functions_run_on_the_single_threaded_executor(monkeypatch):
    """On a CPU the shared functions are traced and called with TensorFlow's single-threaded
    executor: the epoch's loop stays a functional While op (that executor runs no Switch/Merge),
    and two epochs give the losses and weights TensorFlow's default executor gives them."""
    params = {"n_layers": 2, "units": [9, 4], "batch_norm": True, "dropout": [0.2, 0.0], "activation": "elu"}
    data = dataset("breast_cancer")
    n = min(134, len(data.x_train))

    def two_epochs() -> tuple[list[np.ndarray], list[np.ndarray], shared_step.Epochs]:
        model = ready("breast_cancer", params)
        run = shared_step.Epochs(shared_step.plan(model), 0, data.x_train[:n], data.y_train[:n], 24)
        return [run(np.arange(n)) for _ in range(2)], model.get_weights(), run

    assert shared_step._executor() == "SINGLE_THREADED_EXECUTOR"
    losses, weights, run = two_epochs()
    loops = [op for op in shared_step._trace_epoch(run.plan.key, *run._specs).graph.get_operations()
             if op.type in ("While", "StatelessWhile")]
    assert loops and not any(op.node_def.attr["_lower_using_switch_merge"].b for op in loops)
    monkeypatch.setattr(shared_step, "_executor", lambda: "")  # TensorFlow's default executor, same function
    default_losses, default_weights, _ = two_epochs()
    for ours, theirs in zip([*losses, *weights], [*default_losses, *default_weights], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_a_structure_traced_once_is_loaded_from_the_trace_cache(tmp_path, monkeypatch):
    """With a trace cache (models.trace_cache), a structure traced by one process is loaded by the
    next, not traced again, and trains to the same losses and weights, to the last bit. A file
    that does not load is removed, the structure traced again and the file written anew."""
    import json

    from models import trace_cache

    monkeypatch.setattr(trace_cache, "_FOLDER", [tmp_path])
    params = {"n_layers": 2, "units": [7, 3], "batch_norm": True, "dropout": [0.2, 0.1], "activation": "softplus",
              "optimizer": "sgd", "momentum": 0.5}
    data = dataset("breast_cancer")
    n = 150

    def new_process_fit() -> tuple[list[np.ndarray], shared_step.Epochs]:
        shared_step._traced_epoch.cache_clear()  # what this process traced or loaded is gone, as in a new one
        model = ready("breast_cancer", params, optimizer=False)
        run = shared_step.Epochs(shared_step.plan(model), 0, data.x_train[:n], data.y_train[:n], 32)
        return [run(np.arange(n)) for _ in range(2)] + model.get_weights(), run

    monkeypatch.setattr(trace_cache, "_MAX_BYTES", [1])  # a bound every file exceeds: the one just written stays
    (tmp_path / "older.json").write_text("{}")
    traced = shared_step.traces()
    first, _ = new_process_fit()
    (path,) = tmp_path.glob("*.json")  # older.json pruned when the trace was written
    assert shared_step.traces() == traced + 1 and json.loads(path.read_text())["functions"]
    os.utime(path, (1, 1))
    second, run = new_process_fit()
    assert shared_step.traces() == traced + 1
    assert path.stat().st_mtime > 1  # marked used: the last to go when the folder is pruned
    assert isinstance(shared_step._traced_epoch(run.plan.key, *run._specs), trace_cache.Loaded)
    for ours, theirs in zip(first, second, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    path.write_text('{"functions": ["not a function"], "name": "x", "outputs": []}')
    third, _ = new_process_fit()
    assert shared_step.traces() == traced + 2 and json.loads(path.read_text())["name"] != "x"
    for ours, theirs in zip(first, third, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    shared_step._traced_epoch.cache_clear()
    keras.utils.set_random_seed(0)
    assert fit(FAMILIES["mlp"].build(params, data.spec), data, epochs=1, batch_size=32).extras["train_step"] == "shared, loaded"


def test_the_trace_cache_keeps_its_most_recently_used_files_within_its_bound(tmp_path):
    """Pruning removes the least recently used traces until the rest fit (never the file just
    written), and the temporary files a killed writer left behind, not a writer's current one."""
    from models import trace_cache

    for i, name in enumerate(["a", "b", "c", "d"]):
        (tmp_path / f"{name}.json").write_bytes(b"x" * 100)
        os.utime(tmp_path / f"{name}.json", (1000 + i, 1000 + i))
    os.utime(tmp_path / "a.json", (5000, 5000))  # a, the oldest written, was loaded last
    (tmp_path / "old.tmp").write_bytes(b"x")
    os.utime(tmp_path / "old.tmp", (1, 1))
    (tmp_path / "writing.tmp").write_bytes(b"x")
    assert sorted(trace_cache.prune(tmp_path, 250, keep="b.json")) == ["c.json", "d.json", "old.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "writing.tmp"]
    assert trace_cache.prune(tmp_path, 250) == []
    assert trace_cache.prune(tmp_path, 150) == ["b.json"]
