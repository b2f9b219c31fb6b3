#!/usr/bin/env bash
# Multi-node training under SLURM: srun starts one torchrun agent per node (`lacuna train`), which rendezvous
# over c10d on the first node and start the ranks; OMP_NUM_THREADS = physical cores / processes per node.
# Submit from the repository root (with .venv set up) and put run_dir on a filesystem every node shares:
#   sbatch --nodes 2 pipelines/slurm.sh @ configs/pretrain.toml --run-dir /shared/runs/pretrain --data /shared/pretrain
# Extra arguments are `lacuna train` config overrides (e.g. --nproc-per-node 8, --parallel.max-restarts 5).
# A crashed rank restarts the whole group (torchrun --max-restarts); a lost node ends the job, which SLURM requeues
# (--requeue); either way every rank resumes from the newest complete checkpoint in run_dir/checkpoints.
#SBATCH --job-name=lacuna
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# GPUs: add e.g. `#SBATCH --gpus-per-node=8`; nproc-per-node "auto" then starts one rank per GPU.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?submit with sbatch from the lacuna repository root}"
export PATH="$PWD/.venv/bin:$PATH"

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE
port=$((20000 + SLURM_JOB_ID % 20000))  # per-job port: two jobs sharing a first node do not collide
run_dir=$(python -c 'import sys; from lacuna.config import load_config; print(load_config(sys.argv[1:]).run_dir)' "$@")
mkdir -p "$run_dir/logs"
echo "lacuna: $SLURM_JOB_NUM_NODES nodes, rendezvous $head_node:$port, run folder $run_dir, logs $run_dir/logs"

# One task per node with all its CPUs; --kill-on-bad-exit stops the other nodes once one gives up.
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 \
    --output="$run_dir/logs/job$SLURM_JOB_ID-node%n-%N.log" \
    lacuna train --parallel.max-restarts 3 "$@" --nnodes "$SLURM_JOB_NUM_NODES" \
    --parallel.rdzv-endpoint "$head_node:$port" --parallel.rdzv-id "$SLURM_JOB_ID"
