"""The images' recipe, checked without building it (tests/integration/test_images.py runs them):
safe build tools, a serving image without training packages, the volume contract."""

from __future__ import annotations

import importlib.metadata
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT
from tests.unit.test_compose import stack

TRAINING = {"tensorflow", "tensorflow-cpu", "keras", "optuna", "scikit-learn", "scipy", "pandas", "pyarrow", "mlflow",
            "keras-tuner", "plotly", "dask"}


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_constraints_pin_the_build_tools_at_or_above_their_safe_floor():
    pins = _pins()
    floors = [Requirement(line.split("#")[0]) for line in (ROOT / "scripts" / "safe-versions.txt").read_text().splitlines()
              if line.split("#")[0].strip()]
    assert {canonicalize_name(f.name) for f in floors} >= {"pip", "setuptools", "wheel"}
    for floor in floors:
        pinned = pins.get(canonicalize_name(floor.name))
        assert pinned is not None, f"constraints.txt does not pin {floor.name}"
        assert floor.specifier.contains(pinned), f"constraints.txt pins {floor.name}=={pinned}, unsafe: needs {floor.specifier}"


def _closure(requirement: str) -> set[str]:
    """Every distribution `pip install requirement` brings (from the installed metadata)."""
    seen, todo = set(), [Requirement(requirement)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for raw in importlib.metadata.distribution(req.name).requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(sub)
    return seen


def test_constraints_pin_every_dependency_at_the_installed_version():
    pins = _pins()
    every = _closure("keras-optuna-workbench[train,serve,batch,tf]") - {"keras-optuna-workbench"}
    for name in every:
        installed = Version(importlib.metadata.version(name))
        assert pins.get(name) == installed, f"{name}: installed {installed}, pinned {pins.get(name)}"
    assert len(every) > 100


def test_the_serving_image_installs_no_training_package():
    serve = _closure("keras-optuna-workbench[serve]")
    assert not serve & TRAINING, sorted(serve & TRAINING)
    assert {"fastapi", "mlflow-skinny", "numpy", "prometheus-client"} <= serve
    assert {"tensorflow-cpu", "keras"} <= _closure("keras-optuna-workbench[serve,tf]")


def test_each_target_installs_its_extras_and_keeps_state_in_data():
    text = (ROOT / "Dockerfile").read_text()
    stages = stack.read_dockerfile()
    installs = dict(re.findall(r"FROM \S+ AS (deps-[\w-]+)\nRUN [^\n]*\"\.\[([\w,]+)\]\"", text))
    assert installs == {"deps-serving": "serve", "deps-serving-tf": "serve,tf", "deps-workbench": "train,serve,batch"}
    for target in ("serving", "serving-tf", "workbench"):
        assert stages[target].env["WORKBENCH_HOME"] == "/data", target
        assert stages[target].user == "workbench", target
    assert stages["serving-tf"].entrypoint == stages["serving"].entrypoint == ["python", "-m", "serving"]


def test_an_installed_copy_holds_every_subpackage():
    """The images install the project (not editable): a subpackage left out of the wheel would be
    missing only there."""
    import tomllib

    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    on_disk = {str(p.parent.relative_to(ROOT)).replace("/", ".") for root in ("studies", "search_spaces", "models", "serving")
               for p in (ROOT / root).rglob("__init__.py")}
    assert set(find_packages(str(ROOT), include=include)) == on_disk
