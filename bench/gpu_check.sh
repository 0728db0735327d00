#!/usr/bin/env bash
# kdpipe's CUDA paths in one short run on one NVIDIA GPU (H100/H200), failing loudly on any CUDA-only error.
#
#   bash bench/gpu_check.sh [--dry-run] [--tarball PATH] [--steps LIST] [--budget S] [--per-class N] [--work DIR]
#   bash bench/gpu_check.sh --prepare      # here, on the machine without a GPU: what the GPU machine needs carried
#
# Steps (in this order; docs/gpu-check.md says what each covers and how to call it through the device tool):
#   env       nvidia-smi, python/torch/CUDA/cuDNN/NCCL/Triton versions, a bf16 matmul; kdpipe importable
#   data      CIFAR-10 unpacked from the carried tarball into data/external/, cut to --per-class images per class
#   pipeline  (1) kdpipe run --no-dvc on configs/cifar10.yaml, short budget: bf16 autocast + channels_last + fused SGD
#   accuracy  (5) the teacher's and the student's test accuracy (data/reports/metrics.json of that run)
#   ddp       (3) torchrun --nproc_per_node 1 -m kdpipe train-teacher / distill (+ the host DataLoader route), and an
#                 NCCL probe: process group, all_reduce, DDP + SyncBatchNorm around kdpipe's ResNet-18, bf16 steps
#   compile   (2) kdpipe train-teacher and distill with speed.compile=true (torch.compile / Inductor / Triton)
#   speed     (4) python bench/speed.py --preset configs/cifar10.yaml: stage images/s against their floors (table)
# Exit: 0 every selected step passed; 1 a step failed (non-zero exit, timeout, a CUDA/NCCL/compile error in its log,
# or the teacher at chance); 2 setup error (no GPU, no tarball, a package missing); 3 a step skipped for time.
# --dry-run prints every command and runs none (no GPU, data or files needed). Nothing here needs the network.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DRY=0
PREPARE=0
TARBALL=${GPU_CHECK_TARBALL:-data/carry/cifar10-train.tar.gz}
STEPS=${GPU_CHECK_STEPS:-pipeline,accuracy,ddp,compile,speed}
BUDGET=${GPU_CHECK_BUDGET_S:-510}          # seconds for the whole script; each step also has its own cap
PER_CLASS=${GPU_CHECK_PER_CLASS:-1000}     # CIFAR-10 images per class for the pipeline runs (0: all 5,000)
TEACHER_EPOCHS=${GPU_CHECK_TEACHER_EPOCHS:-10}  # the pipeline's teacher (3 epochs of ResNet-34 on 8,000 images: 0.13, undertrained)
MIN_TEACHER_ACC=${GPU_CHECK_MIN_TEACHER_ACC:-0.15}  # chance is 0.10: a teacher at chance means broken numerics
WORK=${GPU_CHECK_WORK:-}
OUTDIR=${GPU_CHECK_OUT:-${OUT:-}}          # the device tool's $OUT: logs and metrics come back from there
SHARED=${GPU_CHECK_SHARED:-$ROOT/../shared}
WHL=.whl                                   # wheels of the Python packages the GPU machine lacks (--prepare)
CARRY_DIR=data/carry                       # where --prepare puts the tarball (git-ignored by --prepare)
# packages the GPU machine's python lacks that kdpipe imports on these paths; --prepare downloads them as wheels
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions)

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --prepare) PREPARE=1 ;;
    --tarball) TARBALL=${2:?--tarball PATH}; shift ;;
    --tarball=*) TARBALL=${1#*=} ;;
    --steps) STEPS=${2:?--steps LIST}; shift ;;
    --steps=*) STEPS=${1#*=} ;;
    --budget) BUDGET=${2:?--budget SECONDS}; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --per-class) PER_CLASS=${2:?--per-class N}; shift ;;
    --per-class=*) PER_CLASS=${1#*=} ;;
    --work) WORK=${2:?--work DIR}; shift ;;
    --work=*) WORK=${1#*=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for s in ${STEPS//,/ }; do
  case $s in pipeline|accuracy|ddp|compile|speed) ;; *) echo "gpu_check: unknown step '$s' in --steps" >&2; exit 2 ;; esac
done
[[ $BUDGET =~ ^[0-9]+$ && $PER_CLASS =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget and --per-class take integers" >&2; exit 2; }

# The python that holds torch: the project's venv where there is one (it does not travel to the GPU machine),
# else python3 (the device image's, with torch, torchvision, triton, onnx, onnxruntime, numpy, pillow, sklearn).
if [[ -n ${GPU_CHECK_PYTHON:-} ]]; then PY=$GPU_CHECK_PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi

# ---------------------------------------------------------------- --prepare (the machine without a GPU)

if ((PREPARE)); then
  src=$SHARED/datasets/cifar10-train.tar.gz
  if [[ ! -f $TARBALL ]]; then
    [[ -f $src ]] || { echo "gpu_check --prepare: no $src (set GPU_CHECK_SHARED to the shared/ folder)" >&2; exit 2; }
    mkdir -p "$(dirname "$TARBALL")"
    cp "$src" "$TARBALL"
  fi
  echo "tarball: $TARBALL ($(du -h "$TARBALL" | cut -f1))"
  # keep the copied tarball out of git (the project's .gitignore does not cover data/carry/)
  if [[ $TARBALL == $CARRY_DIR/* && -d .git ]] && ! grep -qsxF "/$CARRY_DIR/" .gitignore .git/info/exclude; then
    mkdir -p .git/info
    echo "/$CARRY_DIR/" >>.git/info/exclude
    echo "added /$CARRY_DIR/ to .git/info/exclude"
  fi
  pins=()
  for p in "${WHEELS[@]}"; do
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")
    pins+=("$p==$v")
  done
  rm -f "$WHL"/*.whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "${pins[@]}"
  echo "wheels ($WHL, $(du -sh "$WHL" | cut -f1)): ${pins[*]}"
  echo "now, through the device tool: run(command=\"bash bench/gpu_check.sh\", carry=[\"${TARBALL%/*}\", \"$WHL\"], timeout_s=570)"
  exit 0
fi

# ---------------------------------------------------------------- plumbing

if ((DRY)); then
  W=${WORK:-/tmp/kdpipe-gpu-check.DRYRUN}
else
  if [[ -n $WORK ]]; then
    mkdir -p "$WORK"
    [[ -z $(ls -A "$WORK") ]] || { echo "gpu_check: --work $WORK is not empty" >&2; exit 2; }
    W=$(cd "$WORK" && pwd)
  else
    W=$(mktemp -d /tmp/kdpipe-gpu-check.XXXXXX)
  fi
  mkdir -p "$W/logs" "$W/bin" "$W/helpers"
  LOG=$W/gpu_check.log
  [[ -n $OUTDIR ]] && mkdir -p "$OUTDIR" && LOG=$OUTDIR/gpu_check.log
  exec > >(tee -a "$LOG") 2>&1
  TEE_PID=$!
fi

CONFIG=$ROOT/configs/cifar10.yaml
SITE=$W/site                                 # the carried wheels, installed here (--target)
DATA_ROOT=$ROOT/data/external/cifar10         # what the tarball unpacks to
PIPE_ROOT=$DATA_ROOT                          # what the pipeline runs read (a subset of symlinks, see step data)
((PER_CLASS > 0)) && PIPE_ROOT=$W/cifar10-subset
DEADLINE=$BUDGET

export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}   # kdpipe from this checkout (no install needed)
export PATH=$W/bin:$PATH                     # kdpipe / torchrun wrappers on that python
export KDPIPE_DIST_TIMEOUT=120               # a hung collective fails in 2 min, not 30
export TORCH_SHOW_CPP_STACKTRACES=1
export TQDM_MININTERVAL=10                   # progress bars: a line every 10 s, not a flood in the log

# Lines that fail a step even when its exit code is 0 (a CUDA-only error must not be swallowed; a compile that
# hit the recompile limit silently falls back to eager).
ERR_RE='CUDA error|CUDA out of memory|CUBLAS_STATUS_[A-Z_]+|CUDNN_STATUS_[A-Z_]+|cuDNN error|NCCL error|ncclUnhandledCudaError|ncclSystemError|ncclInternalError|device-side assert|illegal memory access|misaligned address|Traceback \(most recent call last\)|BackendCompilerFailed|InductorError|hit config\.(recompile_limit|cache_size_limit)|Triton Error'

declare -A STATUS=() SECS=()
ORDER=()
NSTEP=0
STEP_END=0
STEP_LOG=/dev/null

say() { printf '%s\n' "$*"; }

# x CMD...: print the command; unless --dry-run, run it within the step's time left, its output also in the step log
x() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  ((DRY)) && return 0
  local left=$((STEP_END - SECONDS))
  ((left > 5)) || { say "!! no time left in this step for: $1"; return 124; }
  timeout -k 15 "$left" "$@" 2>&1 | tee -a "$STEP_LOG"
}

go() { printf '+ cd %q\n' "$1"; ((DRY)) || cd "$1"; }

selected() { [[ ,$STEPS, == *,$1,* ]]; }

# step NAME CAP_S DESCRIPTION FUNCTION [NEEDS...]: a header with the elapsed seconds, then FUNCTION in a subshell
# under set -euo pipefail, bounded by CAP_S and the script's budget; its log is grepped for ERR_RE.
step() {
  local name=$1 cap=$2 desc=$3 fn=$4 dep rc t0 bad
  shift 4
  NSTEP=$((NSTEP + 1))
  ORDER+=("$name")
  printf '\n== [%4ds] step %d %s: %s ==\n' "$SECONDS" "$NSTEP" "$name" "$desc"
  if [[ $name != env && $name != data ]] && ! selected "$name"; then
    STATUS[$name]="not selected"; SECS[$name]=0; say "(not selected: --steps $STEPS)"; return 0
  fi
  if ((!DRY)); then
    for dep in "$@"; do
      if [[ ${STATUS[$dep]:-} != PASS ]]; then
        STATUS[$name]="SKIPPED (needs $dep)"; SECS[$name]=0; say "skipped: step $dep did not pass"; return 0
      fi
    done
  fi
  STEP_END=$((SECONDS + cap))
  ((STEP_END <= DEADLINE)) || STEP_END=$DEADLINE
  if ((!DRY && STEP_END - SECONDS < 20)); then
    STATUS[$name]="SKIPPED (time budget)"; SECS[$name]=0; say "skipped: under 20 s of the ${BUDGET} s budget left"; return 0
  fi
  STEP_LOG=$W/logs/$name.log
  t0=$SECONDS
  set +e
  (set -euo pipefail; "$fn")
  rc=$?
  set -e
  SECS[$name]=$((SECONDS - t0))
  if ((DRY)); then STATUS[$name]="dry-run"; return 0; fi
  if ((rc == 0)); then
    bad=$(grep -nE "$ERR_RE" "$STEP_LOG" 2>/dev/null | head -n 8 || true)
    if [[ -n $bad ]]; then
      say "!! step $name exited 0 but its log holds errors:"; say "$bad"
      STATUS[$name]="FAIL (error in log)"
    else
      STATUS[$name]=PASS
    fi
  elif ((rc == 124 || rc == 137)); then
    STATUS[$name]="FAIL (timeout after ${SECS[$name]} s)"
  else
    STATUS[$name]="FAIL (exit $rc)"
  fi
  say "== step $name: ${STATUS[$name]} (${SECS[$name]} s) =="
}

# --set items shared by every kdpipe run: the GPU (no silent CPU fallback), no MLflow (the GPU machine has none),
# the CUDA speed defaults spelled out (bf16 autocast, channels_last, fused SGD/Adam, cuDNN autotuning)
COMMON=(--set device=cuda --set tracking.enabled=false --set "data.root=$PIPE_ROOT"
        --set speed.amp=bf16 --set speed.channels_last=true --set speed.fused=true --set speed.cudnn_benchmark=true)

# ---------------------------------------------------------------- helpers (written into the work folder)

write_helpers() {
  if ((DRY)); then say "+ (write $W/bin/kdpipe, $W/bin/torchrun on $PY, and the python helpers under $W/helpers)"; return; fi
  printf '#!/bin/sh\nexec %q -m kdpipe "$@"\n' "$PY" >"$W/bin/kdpipe"
  printf '#!/bin/sh\nexec %q -m torch.distributed.run "$@"\n' "$PY" >"$W/bin/torchrun"
  chmod +x "$W/bin/kdpipe" "$W/bin/torchrun"
  if ! command -v git >/dev/null; then  # bench/_info.py asks git for the commit; the GPU machine may have none
    printf '#!/bin/sh\nexit 128\n' >"$W/bin/git"; chmod +x "$W/bin/git"
  fi
  cat >"$W/helpers/env_probe.py" <<'EOF'
import os, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
if not torch.cuda.is_available():
    sys.exit("FAIL: torch sees no CUDA device")
p = torch.cuda.get_device_properties(0)
print(f"GPU {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
      f"{p.multi_processor_count} SMs, {torch.cuda.device_count()} device(s)")
print("bf16 supported:", torch.cuda.is_bf16_supported())
import torch.distributed as dist
print("NCCL", ".".join(map(str, torch.cuda.nccl.version())), "| NCCL backend available:", dist.is_nccl_available())
import triton
print("triton", triton.__version__)
import numpy, onnx, onnxruntime, onnxscript, PIL, pydantic, sklearn, torchvision, tqdm, yaml, matplotlib  # noqa: F401
print("numpy", numpy.__version__, "| torchvision", torchvision.__version__, "| pydantic", pydantic.VERSION,
      "| onnx", onnx.__version__, "| onnxruntime", onnxruntime.__version__, "| onnxscript", onnxscript.__version__)
import kdpipe, kdpipe.cli  # noqa: E401,F401
here = os.path.dirname(os.path.abspath(kdpipe.__file__))
print("kdpipe from", here)
if here != os.path.join(os.environ["GPU_CHECK_ROOT"], "kdpipe"):
    sys.exit(f"FAIL: kdpipe imported from {here}, not from this checkout")
a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
s = (a @ a).float().sum()
torch.cuda.synchronize()
if not torch.isfinite(s):
    sys.exit("FAIL: a bf16 matmul gave a non-finite sum")
print("bf16 matmul on the GPU: ok")
EOF
  cat >"$W/helpers/make_subset.py" <<'EOF'
"""An ImageFolder of the first N images of each class (sorted names), as symlinks (like bench/speed.py's subset)."""
import os, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
classes = sorted(c for c in os.listdir(os.path.join(src, "train")) if os.path.isdir(os.path.join(src, "train", c)))
if len(classes) != 10:
    sys.exit(f"FAIL: {src}/train holds {len(classes)} class folders, not CIFAR-10's 10")
total = 0
for c in classes:
    os.makedirs(os.path.join(dst, "train", c), exist_ok=True)
    for f in sorted(os.listdir(os.path.join(src, "train", c)))[:n]:
        os.symlink(os.path.abspath(os.path.join(src, "train", c, f)), os.path.join(dst, "train", c, f))
        total += 1
print(f"{total} images of {len(classes)} classes -> {dst}")
EOF
  cat >"$W/helpers/report.py" <<'EOF'
"""Step accuracy: the teacher's and the student's test accuracy from the pipeline run (evaluate + export metrics)."""
import json, math, shutil, sys
from pathlib import Path
work, min_teacher, out = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
rep_path, exp_path = work / "data/reports/metrics.json", work / "data/export/metrics.json"
rep, exp = json.loads(rep_path.read_text()), json.loads(exp_path.read_text())
arch = {k: json.loads((work / f"data/{k}/spec.json").read_text())["arch"] for k in ("teacher", "student", "baseline")
        if (work / f"data/{k}/spec.json").exists()}
print(f"test split: n={rep['n_test']} real CIFAR-10 images (JPEG), carved from the training tarball")
bad = []
for k in ("teacher", "student", "baseline"):
    if k not in rep:
        continue
    acc = rep[k]["accuracy"]
    print(f"  {k:<9} {arch.get(k, ''):<16} test accuracy {acc:.4f}" + (f"  ({rep[k]['route']})" if "route" in rep[k] else ""))
    if not (isinstance(acc, float) and math.isfinite(acc) and 0.0 <= acc <= 1.0):
        bad.append(f"{k} accuracy {acc!r} is not a number in [0, 1]")
print(f"  teacher-student agreement {rep['agreement']:.4f}, student/teacher {rep['student_over_teacher']:.4f}")
print(f"  ONNX student (CPU onnxruntime): accuracy {exp['onnx_accuracy']:.4f}, max|diff| vs PyTorch {exp['max_abs_diff']:.1e}")
if rep["teacher"]["accuracy"] < min_teacher:
    bad.append(f"teacher accuracy {rep['teacher']['accuracy']:.4f} < {min_teacher} (chance is 0.10): broken numerics?")
if out:
    shutil.copyfile(rep_path, Path(out) / "pipeline-reports-metrics.json")
    shutil.copyfile(exp_path, Path(out) / "pipeline-export-metrics.json")
if bad:
    sys.exit("FAIL: " + "; ".join(bad))
EOF
  cat >"$W/helpers/nccl_probe.py" <<'EOF'
"""Under torchrun: NCCL process group, all_reduce, then DDP + SyncBatchNorm (kdpipe.dist.convert_sync_bn) around
kdpipe's ResNet-18 with its speed knobs (bf16 autocast, channels_last, fused SGD). kdpipe's own stages skip the
process group when WORLD_SIZE is 1 (kdpipe/dist.py: init is a no-op), so this is what touches NCCL on one GPU."""
import torch, torch.distributed as dist, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from kdpipe import accel, dist as kd
from kdpipe.config import SpeedCfg
from kdpipe.models import build_model
dev = torch.device("cuda", kd.local_rank())
torch.cuda.set_device(dev)
dist.init_process_group("nccl", timeout=kd.timeout())
w = dist.get_world_size()
t = torch.full((1024,), float(dist.get_rank() + 1), device=dev)
dist.all_reduce(t)
torch.cuda.synchronize()
assert torch.all(t == w * (w + 1) / 2), f"all_reduce gave {t[:4].tolist()}"
acc = accel.Accel(SpeedCfg(amp="bf16", channels_last=True), dev)
spec = {"arch": "resnet18_cifar", "num_classes": 10, "classes": [str(i) for i in range(10)], "in_channels": 3,
        "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
model = build_model(spec).to(dev, memory_format=acc.memory_format())
kd.convert_sync_bn(model, dev)
assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()), "no SyncBatchNorm after convert_sync_bn"
net = DDP(model, device_ids=[dev.index])
opt = acc.sgd(net.parameters(), 0.05, 0.9, 5e-4)
g = torch.Generator(device=dev).manual_seed(0)
for i in range(5):
    x = acc.inputs(torch.rand(128, 3, 32, 32, device=dev, generator=g))
    y = torch.randint(10, (128,), device=dev, generator=g)
    with acc.autocast():
        loss = F.cross_entropy(net(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
torch.cuda.synchronize()
assert torch.isfinite(loss), f"loss {loss.item()}"
dist.barrier()
dist.destroy_process_group()
print(f"NCCL probe: world {w}, all_reduce ok, DDP + SyncBatchNorm + bf16 + fused SGD: 5 steps, last loss {loss.item():.3f}")
EOF
}

# ---------------------------------------------------------------- the steps

step_env() {
  x nvidia-smi
  if ((DRY)) || ! "$PY" -c 'import pydantic, sys; sys.exit(int(pydantic.VERSION.split(".")[0]) < 2)' 2>/dev/null; then
    say "(no pydantic 2 in this python: install the wheels carried in $WHL/, made by --prepare)"
    ((DRY)) || compgen -G "$WHL/*.whl" >/dev/null || { say "FAIL: no wheels in $WHL/: run bench/gpu_check.sh --prepare and carry $WHL"; return 2; }
    x "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl
  fi
  x env GPU_CHECK_ROOT="$ROOT" "$PY" "$W/helpers/env_probe.py"
}

step_data() {
  local tb=$TARBALL
  if [[ -d $DATA_ROOT/train && $(ls "$DATA_ROOT/train" | wc -l) -eq 10 ]] && ((!DRY)); then
    say "$DATA_ROOT/train already holds 10 classes: not unpacked again"
  else
    if [[ ! -f $tb && -f $SHARED/datasets/cifar10-train.tar.gz ]]; then tb=$SHARED/datasets/cifar10-train.tar.gz; fi
    ((DRY)) || [[ -f $tb ]] || { say "FAIL: no CIFAR-10 tarball at $TARBALL: run bench/gpu_check.sh --prepare and carry ${TARBALL%/*}"; return 2; }
    x mkdir -p data/external
    x tar xzf "$tb" -C data/external/
  fi
  if ((PER_CLASS > 0)); then
    x "$PY" "$W/helpers/make_subset.py" "$DATA_ROOT" "$PIPE_ROOT" "$PER_CLASS"
  fi
}

# (1) the whole DAG in one process, the CUDA defaults spelled out, at a short budget
PIPE_SETS=(--set speed.compile=false --set teacher.epochs=$TEACHER_EPOCHS --set baseline.epochs=1
           --set synthesize.rounds=10 --set synthesize.warmup_rounds=2 --set distill.epochs=3 --set export.int8=false)
step_pipeline() {
  x mkdir -p "$W/pipeline"
  go "$W/pipeline"
  x kdpipe run --no-dvc --config "$CONFIG" "${COMMON[@]}" "${PIPE_SETS[@]}"
}

# (5) the accuracies of that run
step_accuracy() {
  x "$PY" "$W/helpers/report.py" "$W/pipeline" "$MIN_TEACHER_ACC" "$OUTDIR"
}

# a step's own copy of the pipeline's inputs (prepared split, teacher, synthetic set), so each run starts alike
copy_inputs() {
  x mkdir -p "$1/data"
  x cp -r "$W/pipeline/data/prepared" "$W/pipeline/data/teacher" "$W/pipeline/data/synthetic" "$1/data/"
  go "$1"
}

# (3) the documented torchrun launch, one process (README "Multi-GPU and speed"), then the NCCL probe
step_ddp() {
  copy_inputs "$W/ddp"
  # distill first: it then learns from the pipeline's teacher, which made the synthetic set (train-teacher replaces it)
  x torchrun --nproc_per_node 1 -m kdpipe distill --config "$CONFIG" "${COMMON[@]}" --set distill.epochs=1
  x torchrun --nproc_per_node 1 -m kdpipe train-teacher --config "$CONFIG" "${COMMON[@]}" \
    --set teacher.epochs=1 --set speed.data_on_device=false --set speed.workers=2
  x torchrun --nproc_per_node 1 "$W/helpers/nccl_probe.py"
}

# (2) torch.compile of the training forward: the teacher (ResNet-34) and the student under distill (ResNet-18)
step_compile() {
  copy_inputs "$W/compile"
  x env TORCH_LOGS=recompiles kdpipe distill --config "$CONFIG" "${COMMON[@]}" --set speed.compile=true --set distill.epochs=1
  x env TORCH_LOGS=recompiles kdpipe train-teacher --config "$CONFIG" "${COMMON[@]}" --set speed.compile=true --set teacher.epochs=1
}

# (4) stage images/s against their floors (bench/speed.py prints the table; its JSON goes to bench/results/)
step_speed() {
  go "$ROOT"
  x "$PY" bench/speed.py --preset configs/cifar10.yaml --seconds 2 --max-images 4096 --amp bf16 --channels-last true \
    --set device=cuda --workdir "$W/speed"
  local res=bench/results/speed-cifar10-cuda-bf16-cl.json
  if ((!DRY)) && [[ -n $OUTDIR && -f $res ]]; then cp "$res" "$OUTDIR/"; fi
}

# ---------------------------------------------------------------- run

finish() {
  local rc=0 n s
  printf '\n== [%4ds] summary (work folder %s) ==\n' "$SECONDS" "$W"
  for n in "${ORDER[@]}"; do
    s=${STATUS[$n]:-not run}
    printf '  %-9s %-34s %4s s\n' "$n" "$s" "${SECS[$n]:-0}"
    case $s in FAIL*) rc=1 ;; SKIPPED*) ((rc == 1)) || rc=3 ;; esac
  done
  if [[ ${STATUS[env]:-} == FAIL* || ${STATUS[data]:-} == FAIL* ]]; then rc=2; fi
  ((DRY)) && rc=0
  case $rc in
    0) say "gpu_check: $( ((DRY)) && echo 'dry run, nothing was run' || echo 'every selected step passed')" ;;
    1) say "gpu_check: FAILED (see the step logs above; $W/logs/)" ;;
    2) say "gpu_check: FAILED in setup (env/data): no GPU, a missing package or no tarball" ;;
    3) say "gpu_check: INCOMPLETE: steps skipped for the ${BUDGET} s budget (raise --budget or pick --steps)" ;;
  esac
  if ((!DRY)) && [[ -n $OUTDIR ]]; then
    for n in "${ORDER[@]}"; do printf '%s\t%s\t%s\n' "$n" "${STATUS[$n]:-not run}" "${SECS[$n]:-0}"; done \
      >"$OUTDIR/gpu_check-summary.tsv"
  fi
  return "$rc"
}

printf '== gpu_check: %s, budget %s s, python %s, work %s ==\n' "$(date -u +%FT%TZ)" "$BUDGET" "$PY" "$W"
((DRY)) && say "(dry run: the commands are printed, none is run)"
write_helpers
step env 60 "nvidia-smi, versions, a bf16 matmul" step_env
step data 120 "CIFAR-10 from $TARBALL into data/external/ ($PER_CLASS per class for the pipeline)" step_data env
if [[ ${STATUS[env]:-} == FAIL* || ${STATUS[data]:-} == FAIL* ]]; then
  set +e; finish; rc=$?
else
  step pipeline 240 "kdpipe run, bf16 autocast + channels_last + fused SGD (speed.amp=bf16)" step_pipeline env data
  step accuracy 30 "teacher and student test accuracy (evaluate's data/reports/metrics.json)" step_accuracy pipeline
  step ddp 150 "torchrun --nproc_per_node 1 (train-teacher, distill) + NCCL/DDP/SyncBatchNorm probe" step_ddp pipeline
  step compile 240 "speed.compile=true: train-teacher and distill" step_compile pipeline
  step speed 180 "bench/speed.py on configs/cifar10.yaml: stage images/s vs floor" step_speed env data
  set +e; finish; rc=$?
fi
if ((!DRY)); then exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null; fi
exit "$rc"
