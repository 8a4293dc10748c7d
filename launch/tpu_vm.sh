#!/usr/bin/env bash
# Runs the trainer on every host of a Cloud TPU VM pod slice (one JAX process per host).
#
#   bash launch/tpu_vm.sh TPU_NAME ZONE [PROJECT] -- --config=configs/lm_tiny.py --workdir=gs://BUCKET/runs/NAME
#
# Arguments after `--` go to `python -m pretrain.train`. The workdir must be visible to every
# host (a GCS bucket or a shared filesystem). Each host joins the job with
# --distributed=tpu: JAX reads the worker id, the worker count and the coordinator (worker 0)
# from the TPU metadata server, so no address is passed.
#
# MODULE=pretrain.sweep runs `python -m pretrain.sweep ARGS` instead (no --distributed): the
# launch script of `python -m pretrain.sweep --executor=tpu` gives each TPU VM one shard.
#
# Placeholders: TPU_NAME, ZONE, PROJECT (default: gcloud's configured project), REPO_URL and
# REPO_DIR below (where the code is cloned on each host).
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: bash launch/tpu_vm.sh TPU_NAME ZONE [PROJECT] -- TRAIN_ARGS..." >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT_FLAG=()
if [ $# -gt 0 ] && [ "$1" != "--" ]; then PROJECT_FLAG=(--project="$1"); shift; fi
[ "${1:-}" = "--" ] && shift

REPO_URL=${REPO_URL:-https://example.com/YOUR/pretrain.git}   # EDIT: where the hosts get the code
REPO_DIR=${REPO_DIR:-pretrain}                                 # EDIT: checkout folder on each host

# Quote the training arguments once, for the remote shell.
TRAIN_ARGS=$(printf ' %q' "$@")
MODULE=${MODULE:-pretrain.train}
DISTRIBUTED=''
if [ "$MODULE" = pretrain.train ]; then DISTRIBUTED=' --distributed=tpu'; fi

# The same command runs on every worker: fetch the code (first time), install it with the TPU
# build of JAX, and train. All workers must start; a missing one makes the others stop after
# --distributed_init_timeout_s with a message naming the coordinator.
REMOTE="set -euo pipefail
if [ ! -d $REPO_DIR ]; then git clone $REPO_URL $REPO_DIR; fi
cd $REPO_DIR
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet -e . 'jax[tpu]'
fi
exec .venv/bin/python -m $MODULE$DISTRIBUTED$TRAIN_ARGS"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
  --worker=all --command="$REMOTE"
