#!/usr/bin/env bash
# One command per task on a fresh machine with Python 3.11+ and pip:
#   bash launch/quickstart.sh train [--config.train.steps=100 ...]   trains configs/lm_tiny.py
#   bash launch/quickstart.sh test  [pytest args ...]                runs the test suite
# The first call creates .venv and installs the package; later calls reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  # pip's output (setuptools' editable-install banner included) goes to a log, shown on failure.
  echo "quickstart: installing the package and its dependencies into .venv (a few minutes the first time; log: .venv/install.log) ..."
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --upgrade pip &&
         .venv/bin/python -m pip install -e '.[test]'; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "quickstart: installing failed; the log above is in $log" >&2
    exit 1
  fi
  touch "$stamp"
  echo "quickstart: installed."
fi

task=${1:-}
shift || true
case "$task" in
  train)
    exec .venv/bin/python -m pretrain.train --config=configs/lm_tiny.py --workdir=runs/tiny "$@"
    ;;
  test)
    # Two workers, one test file each (its module fixtures stay in one process): the suite is
    # mostly single-threaded compiles, so two run side by side on two cores.
    exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
    ;;
  *)
    echo "usage: bash launch/quickstart.sh {train|test} [args...]" >&2
    exit 2
    ;;
esac
