"""A comparison of studies (studies.compare) as one finished MLflow run."""

from __future__ import annotations

import re
from typing import Any

from studies.tracking.client import experiment_id, metrics_of, mlflow_client, retry_step
from studies.tracking.names import PARENT_ROLE


def log_comparison(tracking_uri: str, experiment: str, *, title: str, html_page: str, studies: list[str],
                   rows: list[dict[str, Any]], artifact_location: str | None) -> str:
    """One finished run in `experiment` holding a comparison of studies: the page
    (reports/compare.html), its table (reports/compare.json), each study's best value and time
    to the common best as metrics. Returns the run id."""
    client = mlflow_client(tracking_uri, check=True)
    exp = retry_step(lambda: experiment_id(client, experiment, artifact_location), f"opening MLflow experiment {experiment!r}")
    tags = {PARENT_ROLE: "comparison", "workbench.studies": ",".join(studies), "mlflow.note.content": title}
    run = retry_step(lambda: client.create_run(exp, run_name="compare " + " vs ".join(studies), tags=tags), "creating the comparison run")
    run_id = run.info.run_id
    values: dict[str, float] = {}
    for row in rows:
        key = re.sub(r"[^\w\-. /]", "_", row["study"])  # the characters MLflow allows in a metric name
        values[f"best.{key}"] = row["best"]
        if row.get("seconds_to_common_best") is not None:
            values[f"seconds_to_common_best.{key}"] = row["seconds_to_common_best"]

    def write() -> None:
        client.log_text(run_id, html_page, "reports/compare.html")
        # MLflow annotates a dict, but log_dict writes any JSON value; the table is a list of rows
        client.log_dict(run_id, rows, "reports/compare.json")  # type: ignore[arg-type]
        client.log_batch(run_id, metrics=metrics_of(values, step=0))
        client.set_terminated(run_id, status="FINISHED")

    retry_step(write, "logging the comparison")
    return run_id
