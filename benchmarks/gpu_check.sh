#!/usr/bin/env bash
# kdlab on one CUDA GPU: every GPU check in one prepared script, for a machine lent for minutes.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR default: $OUT, else gpu-check/
#     KDLAB_CHECK_DEVICE=cpu KDLAB_CHECK_SMALL=1 bash benchmarks/gpu_check.sh /tmp/x   # rehearsal here
#
# Steps, most important first, each under its own time limit and all under one deadline
# (KDLAB_CHECK_BUDGET seconds, default 540), so that a failing or slow step costs only itself:
#   1. the machine: GPU, driver, torch, CUDA, cuDNN, Python;
#   2. smoke: `kdlab train` of a teacher and two KD students (online teacher filling the lazy
#      cache, then the exact cache) on scikit-learn's digits, device=cuda, bf16 auto (on), then
#      the same teacher again (run-to-run determinism on this GPU) and in fp32 and on the CPU;
#   3. benchmarks/train_speed.py --device cuda in fp32 and in bf16 (WRN-16-2 / WRN-28-4);
#   4. a 1-GPU torchrun (NCCL) of the smoke teacher: same weights as the plain run?;
#   5. benchmarks/method_speed.py (every distillation method against logit KD), fp32 and bf16;
#      benchmarks/translation_speed.py --device cuda, fp32 and bf16, with an online teacher;
#   6. the test suite with CUDA visible (tests were written on CPU machines): what fails.
# Writes log.txt (the suite's failures included), smoke.json and the benchmarks' JSON under OUT_DIR (8 files).
# KDLAB_CHECK_ONLY (words, e.g. "machine method_speed pytest") runs only the steps whose names start with one.
set -u
OUT_DIR=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
DEVICE=${KDLAB_CHECK_DEVICE:-cuda}
SMALL=${KDLAB_CHECK_SMALL:-0}
BUDGET=${KDLAB_CHECK_BUDGET:-540}
START=$SECONDS
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee -a "$OUT_DIR/log.txt") 2>&1

# step NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, time left before the deadline);
# KDLAB_CHECK_ONLY="machine method_speed pytest ..." runs only the steps whose names start with a listed word
ONLY=${KDLAB_CHECK_ONLY:-}
wanted() {
    [ -z "$ONLY" ] && return 0
    local word; for word in $ONLY; do [[ $1 == "$word"* ]] && return 0; done
    return 1
}
step() {
    local name=$1 limit=$2; shift 2
    if ! wanted "$name"; then echo "== $name: not asked for (KDLAB_CHECK_ONLY)"; return; fi
    local left=$((BUDGET - (SECONDS - START) - 5))
    if ((left < 15)); then echo "== $name: skipped (deadline)"; return; fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s, t=$((SECONDS - START))s)"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@"
    echo "== $name: exit $? in $((SECONDS - t0))s"
}

step machine 30 bash -c "nvidia-smi 2>/dev/null | head -15; $PY - <<'EOF'
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'cudnn', torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, p.total_memory / 2**30, 'GiB', p.multi_processor_count, 'SMs', 'capability', p.major, p.minor)
    print('tf32 matmul', torch.backends.cuda.matmul.allow_tf32, 'tf32 cudnn', torch.backends.cudnn.allow_tf32)
EOF"

EPOCHS=$([ "$SMALL" = 1 ] && echo 2 || echo 8)
KD="data.name=digits model.name=mlp-64-64-bn optim.epochs=$EPOCHS optim.batch_size=64 --no-progress"
smoke() {
    set -e
    local runs=$WORK/runs
    $PY -m kdlab train $KD name=teacher out_dir=$runs device=$DEVICE
    local teacher; teacher=$(ls -d "$runs"/teacher-*)
    local student="$KD model.name=mlp-32 loss.alpha=1.0 loss.tau=4.0 teacher.runs=[$teacher] teacher.cache.mode=lazy"
    $PY -m kdlab train $student name=kd-online seed=1 out_dir=$runs device=$DEVICE
    $PY -m kdlab train $student name=kd-cached seed=1 out_dir=$runs/cached device=$DEVICE
    $PY -m kdlab train $KD name=teacher out_dir=$WORK/again device=$DEVICE
    $PY -m kdlab train $KD name=teacher out_dir=$WORK/fp32 device=$DEVICE bf16=false
    $PY -m kdlab train $KD name=teacher out_dir=$WORK/cpu device=cpu
}
step smoke 120 bash -c "$(declare -f smoke); PY=$PY KD='$KD' WORK=$WORK DEVICE=$DEVICE; smoke"

if [ "$SMALL" = 1 ]; then SPEED="--quick --images 512 --workers 2"; else SPEED="--images 50000 --workers 8"; fi
step train_speed_fp32 170 $PY benchmarks/train_speed.py --device "$DEVICE" $SPEED --out "$OUT_DIR/train_speed-$DEVICE.json"
step train_speed_bf16 150 $PY benchmarks/train_speed.py --device "$DEVICE" $SPEED --precision bf16 \
    --out "$OUT_DIR/train_speed-$DEVICE-bf16.json"

step torchrun 60 $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m kdlab train $KD name=teacher \
    out_dir="$WORK/torchrun" device="$DEVICE"

MS="--device $DEVICE --steps 20"; [ "$SMALL" = 1 ] && MS="--device $DEVICE --steps 1 --rounds 1 --batch-size 16"
step method_speed_fp32 60 $PY benchmarks/method_speed.py $MS --out "$OUT_DIR/method_speed-$DEVICE.json"
step method_speed_bf16 60 $PY benchmarks/method_speed.py $MS --bf16 --channels-last \
    --out "$OUT_DIR/method_speed-$DEVICE-bf16-cl.json"

TR="--device $DEVICE --teacher transformer-base"
[ "$SMALL" = 1 ] && TR="--device $DEVICE --models transformer-2-64-4 --steps 1"
step translation_fp32 60 bash -c "$PY benchmarks/translation_speed.py $TR && cp benchmarks/results/translation_speed-$DEVICE.json '$OUT_DIR/'" 2>/dev/null
step translation_bf16 60 bash -c "$PY benchmarks/translation_speed.py $TR --bf16 && cp benchmarks/results/translation_speed-$DEVICE.json '$OUT_DIR/translation_speed-$DEVICE-bf16.json'"

# what the smoke runs left: accuracy, device, precision and a digest of the weights, per run
wanted smoke && $PY - "$WORK" "$OUT_DIR/smoke.json" <<'EOF'
import hashlib, json, sys
from pathlib import Path
rows = {}
for result in sorted(Path(sys.argv[1]).rglob("result.json")):
    run = result.parent
    meta = json.loads((run / "meta.json").read_text())
    res = json.loads(result.read_text())
    rows[str(run.relative_to(sys.argv[1]))] = {
        "test_acc": res["final"].get("test_acc"), "test_nll": res["final"].get("test_nll"),
        "device": meta.get("device"), "bf16": meta.get("bf16"), "world": meta.get("world_size"),
        "model_sha256": hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()[:16]}
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1) + "\n")
for name, row in rows.items():
    print(f"{name:40s} acc {row['test_acc']} nll {row['test_nll']} {row['device']} bf16={row['bf16']} "
          f"world={row['world']} sha {row['model_sha256']}")
EOF

if [ "$SMALL" != 1 ]; then
    # -v: xdist prints each result as it comes, so failures are named even if the deadline cuts the run
    step pytest 300 bash -c "$PY -m pytest -v --maxfail=40 -p no:cacheprovider -n 14 -rf --timeout 120 \
        -p no:benchmark tests > '$WORK/pytest.txt' 2>&1"
    grep -E "FAILED|ERROR|passed|failed" "$WORK/pytest.txt" | tail -60  # (into log.txt: 8 files come back at most)
fi
echo "== done in $((SECONDS - START))s"
