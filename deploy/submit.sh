#!/usr/bin/env bash
# Submit a moalign run to a Ray cluster as a Ray job.
#   RAY_ADDRESS=http://head:8265 deploy/submit.sh configs/default.yaml rollout.prompts_per_step=16
# The working dir travels to the cluster (it must stay under 100 MB: venvs, runs and caches are excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: deploy/submit.sh CONFIG [key=value ...]}
shift
exec ray job submit --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "runs", ".git", "**/__pycache__"]}' \
  -- python orchestrator.py --config "$config" "$@"
