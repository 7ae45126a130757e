"""What every `python -m studies.*` command shares: the common flags, quiet libraries, and the
mapping from the project's errors to exit codes (models.errors.ExitCode). Not a command itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping

from models.errors import ConfigError, ExitCode, WorkbenchError
from studies.config import LoadedConfig, load_config
from studies.engines.workers import Interrupted


def study_flags(*, one_study: bool = True) -> argparse.ArgumentParser:
    """The parent parser of the study commands: --storage and --verbose; for a command on one
    study also CONFIG, --study-name and --set."""
    p = argparse.ArgumentParser(add_help=False)
    if one_study:
        p.add_argument("config", help="study config YAML, e.g. configs/breast_cancer.yaml")
        p.add_argument("--study-name", metavar="NAME", help="study name (study.name; default: the config file's name)")
        p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", dest="overrides",
                       help="override any config key, e.g. --set training.epochs=5 (repeatable)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage URL; default $OPTUNA_STORAGE, then study.storage, then SQLite in .workbench/")
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' own logging (TensorFlow, MLflow, Optuna warnings)")
    return p


def overrides(args: argparse.Namespace, sugar: Mapping[str, object] | None = None) -> list[str]:
    """`--set` assignments, then the flags that are shorthands for a key (`--study-name`, and
    the command's own in `sugar`, key path -> value), those left unset (None) skipped."""
    keys = {"study.name": getattr(args, "study_name", None), **(sugar or {})}
    return [*args.overrides, *(f"{k}={v}" for k, v in keys.items() if v is not None)]


def run_command(body: Callable[[], int]) -> int:
    """Run a command's body: a user mistake exits 2, a runtime failure 1, each as its message
    without a traceback; Ctrl-C before any work was recorded exits 130 (SIGTERM 143)."""
    try:
        return int(body())
    except ConfigError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C, or (Interrupted) a SIGTERM while the study was being opened
        print("interrupted", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else ExitCode.INTERRUPTED


def run_with_config(args: argparse.Namespace, body: Callable[[LoadedConfig], int], *,
                    sugar: Mapping[str, object] | None = None) -> int:
    """Load the study config named by `args` (with its overrides) and run `body(loaded)` under `run_command`."""
    quiet_libraries(verbose=getattr(args, "verbose", False))
    return run_command(lambda: body(load_config(args.config, overrides(args, sugar))))


def quiet_libraries(*, verbose: bool = False) -> None:
    """A normal run shows the workbench's own lines only: no TensorFlow start-up lines, no MLflow
    INFO lines or download bars, no Optuna INFO or ExperimentalWarning. `--verbose` keeps them."""
    if verbose:
        os.environ["WORKBENCH_VERBOSE"] = "1"  # read by Settings here and in worker processes
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow's first import
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "tensorflow", "absl", "keras_tuner", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"(tensorflow|keras|google\.protobuf|mlflow)(\..*)?")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its own handler logs at INFO otherwise
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
