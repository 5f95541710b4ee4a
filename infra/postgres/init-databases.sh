#!/bin/sh
# Runs once, on the first start of an empty data volume (the postgres image's /docker-entrypoint-initdb.d):
# one database and one login role per service, so MLflow, Prefect and the fleet's prediction store
# (langops: prediction log, feedback, issued ids) cannot touch each other's tables.
set -eu

: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD (see infra/.env.example)}"
: "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD (see infra/.env.example)}"
: "${LANGOPS_DB_PASSWORD:?set LANGOPS_DB_PASSWORD (see infra/.env.example)}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v mlflow_password="$MLFLOW_DB_PASSWORD" -v prefect_password="$PREFECT_DB_PASSWORD" \
  -v langops_password="$LANGOPS_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE langops LOGIN PASSWORD :'langops_password';
CREATE DATABASE langops OWNER langops;
SQL
