"""Studies: config loading, the runner CLI, the objective, storage and reporting."""
