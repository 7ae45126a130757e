"""Tracking in MLflow: the study's parent run and a child run per trial (tracker), the runs dead
workers left (reconcile), comparison runs, and the saved-model format of a trial's model."""

from studies.tracking.client import TrackingError
from studies.tracking.comparison_run import log_comparison
from studies.tracking.model_format import save_model
from studies.tracking.names import PARENT_ROLE, RUN_ID_ATTR, STUDY_TAG
from studies.tracking.protocol import TrialTracker
from studies.tracking.reconcile import close_stale_run, reconcile
from studies.tracking.tracker import Tracker, flatten_params

__all__ = ["PARENT_ROLE", "RUN_ID_ATTR", "STUDY_TAG", "Tracker", "TrackingError", "TrialTracker", "close_stale_run",
           "flatten_params", "log_comparison", "reconcile", "save_model"]
