"""Optuna storage: the resilient RDB storage (rdb) and the studies in it (study: create or resume,
budget, seeds, reclaiming trials of dead workers)."""

from studies.storage.rdb import StorageError, open_storage, redact
from studies.storage.study import BUDGET_STATES, load_existing, open_study, reclaim, state_counts

__all__ = ["BUDGET_STATES", "StorageError", "load_existing", "open_storage", "open_study", "reclaim", "redact",
           "state_counts"]
