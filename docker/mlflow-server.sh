#!/bin/sh
# MLflow tracking server and model registry on PostgreSQL: the compose file's `mlflow`
# service, and the tests' (tests/tuning/test_cluster.py runs this very script).
#
# Everything comes from the environment, nothing is baked into the image. The database
# password reaches libpq as PGPASSWORD, so it is neither in the image nor on a command line
# that `ps` shows. Extra arguments go to `mlflow server` (e.g. --workers 1).
#
#   POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, POSTGRES_DB   where the database is
#   POSTGRES_PASSWORD (or PGPASSWORD)                          its password (required)
#   MLFLOW_HOST, MLFLOW_PORT                                   bind address (0.0.0.0:5000)
#   MLFLOW_ARTIFACTS_DESTINATION                               artifact store (/mlartifacts)
#   MLFLOW_AUTH=1                                              basic auth (MLflow's basic-auth
#       app): needs MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD and
#       MLFLOW_FLASK_SERVER_SECRET_KEY; clients set MLFLOW_TRACKING_USERNAME/_PASSWORD.
set -eu

: "${POSTGRES_HOST:=postgres}" "${POSTGRES_PORT:=5432}" "${POSTGRES_USER:=mlflow}" "${POSTGRES_DB:=mlflow}"
PGPASSWORD="${PGPASSWORD:-${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD to the database password}}"
export PGPASSWORD
db_uri="postgresql+psycopg2://${POSTGRES_USER}@${POSTGRES_HOST}:${POSTGRES_PORT}/${POSTGRES_DB}"

set -- --backend-store-uri "$db_uri" \
    --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-/mlartifacts}" --serve-artifacts \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" "$@"

if [ "${MLFLOW_AUTH:-0}" = 1 ]; then
    : "${MLFLOW_AUTH_ADMIN_USERNAME:?MLFLOW_AUTH=1 needs MLFLOW_AUTH_ADMIN_USERNAME}"
    : "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH=1 needs MLFLOW_AUTH_ADMIN_PASSWORD}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_AUTH=1 needs MLFLOW_FLASK_SERVER_SECRET_KEY}"
    # Users and permissions live in the same database (own tables, own migration table).
    auth_ini="${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/mlflow-basic-auth.ini}"
    if [ ! -f "$auth_ini" ]; then
        printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = %s\n' \
            "$db_uri" "$MLFLOW_AUTH_ADMIN_USERNAME" > "$auth_ini"
    fi
    export MLFLOW_AUTH_CONFIG_PATH="$auth_ini"
    set -- "$@" --app-name basic-auth
fi

exec mlflow server "$@"
