"""Request and response bodies of the prediction API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

Number = StrictFloat | StrictInt  # JSON numbers only: "1.5" as a string is an error, not a guess
# A raw table value: a number, a string (a category), a boolean, or null (missing). Whether it fits
# its column is the model's to say (serving.model), naming the column.
Value = StrictFloat | StrictInt | StrictBool | StrictStr | None


class PredictRequest(BaseModel):
    """Rows to score: positional `instances` or named `records` (exactly one of them)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"instances": [[17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871,
                                1.095, 0.9053, 8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003, 0.006193,
                                25.38, 17.33, 184.6, 2019.0, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601, 0.1189]]},
                {"records": [{"mean radius": 17.99, "mean texture": 10.38, "...": "one key per feature"}]},
            ]
        },
    )

    instances: list[list[Number]] | None = Field(default=None, description="rows of feature values in the model's order")
    records: list[dict[str, Value]] | None = Field(
        default=None, description="rows as {column: value}; a table model takes strings, booleans and null (missing)")

    @model_validator(mode="after")
    def _one_of(self) -> PredictRequest:
        if (self.instances is None) == (self.records is None):
            raise ValueError("give exactly one of instances or records")
        return self


class PredictResponse(BaseModel):
    model_name: str | None
    model_version: str | None
    predictions: list[Any] = Field(description="class labels, or values for regression")
    probabilities: list[list[float]] | None = Field(default=None, description="per row, one probability per class")
    classes: list[Any] | None = Field(default=None, description="the class of each probability column")


class LoadedVersion(BaseModel):
    version: str
    role: str = Field(description="champion (answers /predict), challenger (shadow), or 'pinned <v>'")
    run_id: str | None


class ModelInfo(BaseModel):
    uri: str
    name: str | None
    version: str | None
    alias: str | None
    run_id: str | None
    task: str
    feature_names: list[str]
    class_labels: list[Any] | None
    input_shape: list[int | None]
    columns: list[dict[str, Any]] | None = Field(
        default=None, description="a table model's raw columns: name, kind, missing rate in training, vocabulary size")
    loaded_at: float
    details: dict[str, Any] = Field(description="registry tags: study, trial number, params, test metrics")
    loaded: list[LoadedVersion] = Field(default_factory=list, description="every version this server holds, by role")



class ReloadResponse(BaseModel):
    previous_version: str | None
    version: str | None
    reloaded: bool
