#!/usr/bin/env bash
# The embedded pretrain recipe (configs/pretrain.toml): materialise the offline assets, prepare the shards unless they
# exist, then train; training resumes from the newest checkpoint in its run folder, so running this again is safe.
# Extra arguments are config overrides for both stages, e.g. `bash pipelines/pretrain.sh --steps 20`.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python pipelines/assets.py --data-dir data
exec .venv/bin/lacuna pretrain "$@"
