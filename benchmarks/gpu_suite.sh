#!/usr/bin/env bash
# GPU benchmarks behind benchmarks/RESULTS.md. Usage: bash benchmarks/gpu_suite.sh STAGE OUTDIR
#   probe : GPU correctness tests, ridge datamodels 5000 x 50000 x 10000, and the ensemble
#           strategy probe (full ResNet-9, bf16, M=8, conv formulations x vmap widths)
#   final : throughput M=8 with the FLOP count, baseline/MIA tests, and the whole demo on the GPU
#   scale : full ResNet-9 recipe on CIFAR-10-shaped data (50,000 points, alpha 0.5) at M = 8, 32, 128
#   peer  : the paper's ResNet-9 recipe on cifar10-mini (DATA_DIR), ours vs the PyTorch loop (channels-last,
#           bf16 autocast, cuDNN autotuning), M = MODELS models each, on the same card (benchmarks/peer_torch.py);
#           TILE=10 repeats the training images 10x: 25,425 images per model, 50 steps an epoch (the paper: 49)
#   levers: the XLA option sets that might shorten the ResNet-9 step (the epoch's scan as one CUDA graph, while-loop
#           double buffering, autotune levels), each compiled in a process of its own, the same MODELS-model bf16
#           chunk on DATA_DIR (benchmarks/compile_options.py --isolate): run and compile time against the default's
#   variants: the formulations of the bf16 ResNet-9 epoch side by side (benchmarks/step_variants.py: the library's,
#           the optimizer on the parameter tree, the ReLU mask from the input, the max-pools' gradient to the first
#           maximum, the strided convolution as it was, autodiff's BatchNorm, the scan unrolled; epochs interleaved),
#           MODELS models on DATA_DIR, then ours vs the PyTorch loop in the steady state only (peer_torch.py
#           --steady-only; TILE=10 for the paper's per-model work; OURS_VARIANT=NAME runs ours as that formulation)
# Each figure's exact command is echoed into OUTDIR/log.txt.
set -u
stage=$1; out=$2; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
run() { echo "+ $*" | tee -a "$out/log.txt"; "$@" 2>&1 | tee -a "$out/log.txt"; }
common=(--dataset cifar-shaped --n-train 50000 --recipe cifar10-resnet9 --model resnet9 --batch 512 --dtype bfloat16)
$py -c "import jax, flax, optax, chex, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$out/log.txt"
case $stage in
probe)
  run timeout 240 $py -m pytest -q -x -p no:cacheprovider tests/test_training.py tests/test_run.py tests/test_unlearning.py tests/test_attribution.py
  run timeout 150 $py benchmarks/datamodels.py --json "$out/gpu_datamodels.json" --synthetic-large
  run timeout 200 $py benchmarks/ensemble_throughput.py --json "$out/gpu_probe_m8.json" "${common[@]}" \
      --epochs 1 --models 8 --loop-models 2 --loop-modes per_epoch --loop-impls xla im2col \
      --conv-impl xla --vmap-width 1 --strategies xla:8 im2col:8 im2col:1 xla:4
  ;;
scale)
  run timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_training.py
  for m in ${MODELS:-8 32 128}; do
    run timeout ${TIMEOUT:-170} $py benchmarks/ensemble_throughput.py --json "$out/gpu_resnet9_m$m.json" "${common[@]}" \
        --epochs ${EPOCHS:-1} --models "$m" --loop-models 4 --loop-modes per_epoch --loop-impls ${LOOP_IMPLS:-xla}
  done
  ;;
final)
  run timeout 150 $py benchmarks/ensemble_throughput.py --json "$out/gpu_resnet9_m8_flops.json" "${common[@]}" \
      --epochs 2 --models 8 --loop-models 4 --loop-modes per_epoch --loop-impls xla
  run timeout 200 $py -m pytest -q -x -p no:cacheprovider tests/test_baselines.py tests/test_mia.py
  run timeout 300 $py -m jaxunlearn.cli demo --out /tmp/gpu-demo --no-progress
  cp /tmp/gpu-demo/results.json "$out/gpu_demo_results.json"; cp /tmp/gpu-demo/pareto.png "$out/gpu_demo_pareto.png"
  ;;
peer)
  m=${MODELS:-32}; tile=${TILE:-1}
  run timeout ${TIMEOUT:-420} $py benchmarks/peer_torch.py --configs "resnet9:$m" --device cuda --tile-train "$tile" \
      --data-dir "${DATA_DIR:?set DATA_DIR to the cifar10 python archive folder}" --skip "torch-vmap@resnet9:$m" \
      --json "$out/gpu_peer_torch_resnet9_m${m}_tile$tile.json"
  ;;
levers)
  run timeout ${TIMEOUT:-420} $py benchmarks/compile_options.py --model resnet9 --dtype bfloat16 --models ${MODELS:-8} \
      --data-dir "${DATA_DIR:?set DATA_DIR to the cifar10 python archive folder}" --programs epoch --isolate \
      --json "$out/gpu_compile_options_resnet9_m${MODELS:-8}.json"
  ;;
variants)
  m=${MODELS:-8}
  run timeout ${TIMEOUT:-200} $py benchmarks/step_variants.py --model resnet9 --dtype bfloat16 --models "$m" --epochs 5 \
      --data-dir "${DATA_DIR:?set DATA_DIR to the cifar10 python archive folder}" \
      --variants ${VARIANTS:-fused_bn tree_optimizer bn_mask_from_input pool_first_max xla autodiff_bn unrolled} --json "$out/gpu_step_variants_resnet9_m$m.json"
  run timeout ${TIMEOUT:-200} $py benchmarks/peer_torch.py --configs "resnet9:$m" --device cuda --steady-only \
      --tile-train ${TILE:-1} --data-dir "$DATA_DIR" --skip "torch-vmap@resnet9:$m" ${OURS_VARIANT:+--ours-variant "$OURS_VARIANT"} \
      --json "$out/gpu_peer_torch_resnet9_m${m}_tile${TILE:-1}_steady.json"
  ;;
esac
