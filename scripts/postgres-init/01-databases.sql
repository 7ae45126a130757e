-- Run once by the postgres image on an empty volume: the Optuna database is POSTGRES_DB (optuna);
-- MLflow's backend store gets its own database.
CREATE DATABASE mlflow;
