#!/bin/bash
# One ensemble trained by a SLURM job array: every array task is one worker on the shared run folder
# (chunk c goes to worker c mod N), each using every GPU of its node; the assemble step runs once all
# workers are done (a dependent job). Killed or pre-empted tasks are re-run with the same command and
# resume from their finished chunks. Results are bit-identical to one process.
#
#   sbatch --array=0-7 experiments/slurm/train_array.sh            # 8 workers
#   (the script submits the assemble job itself, after the array)
#
#SBATCH --job-name=jaxunlearn-train
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

OUT=${OUT:-runs/cifar10-datamodels}          # a folder every node sees (shared file system)
ARGS=${ARGS:---dataset cifar10 --models 10000 --alpha 0.5 --seed 0}
JAXUNLEARN=${JAXUNLEARN:-.venv/bin/jaxunlearn}

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "submit with: sbatch --array=0-N train_array.sh" >&2
  exit 2
fi

if [ "${SLURM_ARRAY_TASK_ID}" = "${SLURM_ARRAY_TASK_MIN:-0}" ]; then
  # the assemble step, once every task has finished (afterany: it also reports missing chunks)
  sbatch --dependency=afterany:${SLURM_ARRAY_JOB_ID} --job-name=jaxunlearn-assemble --gres=gpu:0 \
    --wrap "${JAXUNLEARN} train ${ARGS} --out ${OUT} --assemble --no-progress"
fi

exec ${JAXUNLEARN} train ${ARGS} --out "${OUT}" --worker "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}" \
  --no-progress
