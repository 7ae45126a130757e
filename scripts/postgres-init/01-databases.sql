-- The databases of the stack: `optuna` (Optuna storage), `mlflow` (MLflow backend store) and
-- `workbench` (the application's own tables: rows that batch scoring reads, predictions it writes).
-- Idempotent, so it serves three ways: the postgres image runs it once on an empty volume (where
-- POSTGRES_DB already made `optuna`), scripts/stack.sh runs it against this machine's server on
-- every `up`, and for an existing server (e.g. AWS RDS):
--   psql "host=<host> user=<user> dbname=postgres sslmode=require" -f scripts/postgres-init/01-databases.sql
SELECT 'CREATE DATABASE optuna' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'optuna')\gexec
SELECT 'CREATE DATABASE mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
SELECT 'CREATE DATABASE workbench' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'workbench')\gexec
