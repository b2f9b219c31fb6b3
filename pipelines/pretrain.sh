#!/usr/bin/env bash
# The embedded pretrain recipe: materialise offline assets, prepare the shards once, then train.
# Training resumes from the newest checkpoint in its run folder, so running this again is safe.
# Extra arguments are config overrides for both stages, e.g. `bash pipelines/pretrain.sh --steps 20`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
lacuna assets
data=$(python -c "from lacuna.config import load_config; print(load_config(['@', 'configs/pretrain.toml', *'$*'.split()]).data.path)")
[ -f "$data/manifest.json" ] || lacuna prepare pretrain @ configs/pretrain.toml "$@"
lacuna train @ configs/pretrain.toml "$@"
