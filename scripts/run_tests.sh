#!/usr/bin/env bash
# The test run behind `make test`: PostgreSQL tests when a server answers on
# 127.0.0.1:5432, the slow tests too when CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true
if [ -z "${CYCLEML_TEST_POSTGRES_URL:-}" ] && python - <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(s.connect_ex(("127.0.0.1", 5432)))
PY
then
  export CYCLEML_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:5432/test"
fi
echo "PostgreSQL tests: ${CYCLEML_TEST_POSTGRES_URL:-skipped (no server on 127.0.0.1:5432)}"
markers="not slow"
if [ "${CI:-}" = "true" ]; then markers=""; fi
exec pytest ${markers:+-m "$markers"} --timeout=900 "$@"
