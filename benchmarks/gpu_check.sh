#!/usr/bin/env bash
# The GPU measurements of issue 15, part 4, prepared so that a lent GPU's few minutes go to
# measuring. On a machine with jax (CUDA), flax, optax, orbax-checkpoint and chex but no
# TensorFlow, no ml_collections and no network (the device tool's H100/H200):
#
#   bash benchmarks/gpu_check.sh prepare      # here: the wheel and the data to carry (31 MiB)
#   # then, through the device tool, from the repository root, carry=["workdirs/gpu_carry"]:
#   bash benchmarks/gpu_check.sh steps        # step throughput, MFU, bf16, input pipeline (~5 min)
#   bash benchmarks/gpu_check.sh runs         # :quick runs in float32 and bfloat16, and f_theta
#                                             # alone, conv vs Winograd (~5 min)
#
# Each part keeps within one 10-minute device call; every command has its own timeout and a
# failure does not stop the rest. Output goes to $OUT (the device tool's folder) or
# workdirs/gpu_out. SMOKE=1 shrinks every size so that the script can be tried on a CPU
# (PY=.venv/bin/python; both parts in about 10 minutes on 2 cores; the figures then mean
# nothing).
set -u
cd "$(dirname "$0")/.."
CARRY=${CARRY:-workdirs/gpu_carry}
OUT=${OUT:-workdirs/gpu_out}
PY=${PY:-python3}
PART=${1:-}
mkdir -p "$OUT"

if [ "$PART" = prepare ]; then
  mkdir -p "$CARRY/fashion-mnist"
  PIP=${PIP:-.venv/bin/pip}
  "$PIP" download --no-deps -q -d "$CARRY" ml_collections==1.1.0 || exit 1
  cp /usr/share/datasets/fashion-mnist/*.gz "$CARRY/fashion-mnist/" || {
    echo "error: install the Debian package dataset-fashion-mnist first"; exit 1; }
  du -sh "$CARRY"
  exit 0
fi
case "$PART" in steps|runs) ;; *)
  echo "usage: bash benchmarks/gpu_check.sh prepare|steps|runs" >&2; exit 2;;
esac

# What the machine lacks, from the carried wheels, outside any environment of its own.
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index --target /tmp/lns_deps "$CARRY"/*.whl
  export PYTHONPATH=/tmp/lns_deps:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} | tee "$OUT/machine_$PART.txt"

# Dense peaks in TFLOP/s, for the MFU column: an H200 and an H100 SXM have the same
# tensor cores, 494.7 TF32 and 989.4 BF16 (NVIDIA's figures without sparsity).
PEAK=${PEAK:-float32=494.7,bfloat16=989.4}
if [ "${SMOKE:-0}" = 1 ]; then
  R20=8; R18=2; R18_SIZE=64; STEPS=1; QUICK=configs/fashion_mnist_r20.py:smoke; PLATFORM=cpu
  MAPPING_MODEL=resnet20
  QUICK_ARGS="--config.data.train_examples=64 --config.data.eval_examples=64"
else
  R20=128; R18=256; R18_SIZE=224; STEPS=20; QUICK=configs/fashion_mnist_r20.py:quick; PLATFORM=gpu
  MAPPING_MODEL=resnet18
  QUICK_ARGS=""
fi
run() {  # run NAME SECONDS CMD...: output to $OUT/NAME.txt, and a line with its status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "[gpu_check] $name: exit $? after $((SECONDS - t0)) s ($OUT/$name.txt)"
}

if [ "$PART" = steps ]; then
  # ResNet-20 (batch 128) and the input pipeline's wait with the in-memory loader.
  run r20_steps 200 "$PY" benchmarks/train_step.py --skip_r18 --fmnist_batch=0 --conv=xla \
      --dtype=float32,bfloat16 --r20_batch=$R20 --steps=$STEPS --peak_tflops=$PEAK \
      --loader=numpy --local_dir="$CARRY/fashion-mnist"
  # ResNet-18 at batch 256, 224x224: the issue's images/s and MFU figures.
  run r18_steps 300 "$PY" benchmarks/train_step.py --fmnist_batch=0 --r20_batch=0 --skip_input \
      --conv=xla --dtype=float32,bfloat16 --r18_batch=$R18 --r18_size=$R18_SIZE \
      --steps=$STEPS --peak_tflops=$PEAK
  run scaling 90 "$PY" benchmarks/scaling.py --platform=$PLATFORM --devices=1 --batch=$R20 --steps=$STEPS --json
  grep -h "^| resnet\|waited" "$OUT/r20_steps.txt" "$OUT/r18_steps.txt"
  grep "^{" "$OUT/scaling.txt" || true
fi

if [ "$PART" = runs ]; then
  # Whether bfloat16 keeps the accuracy of a short run (all three stages, real data).
  for dt in float32 bfloat16; do
    run "quick_$dt" 200 "$PY" train.py --config=$QUICK $QUICK_ARGS --config.data.loader=numpy \
        --config.data.local_dir="$CARRY/fashion-mnist" --config.model.dtype=$dt \
        --workdir="$OUT/quick_$dt"
    tail -6 "$OUT/quick_$dt.txt"
  done
  # The mapping networks alone (ResNet-18's, whose 512-channel layers are most of an LNS
  # step's extra work): XLA's conv against the Winograd variant, which lost on a CPU.
  run mapping 120 "$PY" benchmarks/mapping.py --model=$MAPPING_MODEL --steps=$STEPS
  grep "^| \|LNS layers" "$OUT/mapping.txt" || true
fi
