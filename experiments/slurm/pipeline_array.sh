#!/bin/bash
# The whole unlearning pipeline as a job array: every task trains its share of every ensemble
# (datamodels, full models, each forget set's oracles) into the shared folder, then one dependent
# job runs `pipeline` on the finished folders (attribution, unlearning, KLoM, plots).
# Forget sets that need trained models (cluster:K:J, memorized:N) get their oracles from a second
# array submitted after the first (the same command), or from the final job.
#
#   CONFIG=experiments/cifar10_paper.json OUT=runs/paper sbatch --array=0-15 experiments/slurm/pipeline_array.sh
#
#SBATCH --job-name=jaxunlearn-pipeline
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

CONFIG=${CONFIG:?set CONFIG to a pipeline .json}
OUT=${OUT:?set OUT to a shared folder}
JAXUNLEARN=${JAXUNLEARN:-.venv/bin/jaxunlearn}

if [ "${SLURM_ARRAY_TASK_ID}" = "${SLURM_ARRAY_TASK_MIN:-0}" ]; then
  sbatch --dependency=afterok:${SLURM_ARRAY_JOB_ID} --job-name=jaxunlearn-pipeline-final \
    --wrap "${JAXUNLEARN} pipeline --config ${CONFIG} --out ${OUT} --no-progress"
fi

exec ${JAXUNLEARN} pipeline --config "${CONFIG}" --out "${OUT}" \
  --worker "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}" --no-progress
