"""Names the tracking layout uses in MLflow and in Optuna (no MLflow import): the selector and
the notebook read runs by them."""

# Optuna state -> MLflow run status.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
PARENT_ROLE = "workbench.role"
STUDY_TAG = "optuna.study_name"
RUN_ID_ATTR = "mlflow_run_id"
