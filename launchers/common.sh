# Shared body of every launcher: parse arguments, check the parallel layout, run `minitron STAGE`
# with srun in the container on all allocated GPUs, forward Slurm's pre-emption signal to the
# tasks (which checkpoint and exit) and requeue the job so a re-run resumes.
#
#   sbatch [--nodes=N] launchers/STAGE.sh [--tp T] [--pp P] [--ep E] [--container IMAGE] [--mounts SRC:DST,...]
#          [--no-container] [--dry-run] [key=value ...]
#
# --no-container (or MINITRON_CONTAINER=none) runs the tasks without pyxis/enroot: srun starts the
# `minitron` of the environment sbatch was called from (activate the venv first; the job inherits its
# PATH). Tasks per node: the node's GPUs (SLURM_GPUS_ON_NODE), else MINITRON_GPUS_PER_NODE, else the
# job's --ntasks-per-node, else 8. On CPU nodes (gloo), --gpus-per-node=0 overrides the #SBATCH GPUs:
#   sbatch --ntasks-per-node=2 --gpus-per-node=0 launchers/STAGE.sh --no-container --tp 2 ...
#
# Requeue (scontrol requeue; the stage resumes from its last checkpoint): on SIGUSR1 or SIGTERM to the
# batch shell, or when every task srun reports as exited exited 75 (stopped at a pre-emption
# checkpoint; srun's own status may be 143 for the ones it terminated), never when the job is being
# cancelled (scancel) or a task failed otherwise. docs/multinode.md has the details.
#
# --dry-run (also outside Slurm) prints the parallel layout and the resolved config, runs nothing.
# Unrecognised arguments are Hydra overrides passed through to the stage. --ep splits the experts of a
# mixture-of-experts model over E ranks taken from the data-parallel ones (tp x pp x ep must divide the GPUs).
#
# Recipe launchers (distill_mn8b.sh, prune_mn8b.sh, distill_llama31_4b.sh, prune_llama31_4b.sh,
# distill_nemotron4.sh) run one stage of a published recipe as its own job: `minitron STAGE
# recipe=NAME` composes nemo_minitron/conf/STAGE.yaml, then the recipe's block for STAGE (nemo_minitron/conf/recipes/NAME.yaml),
# then your overrides, which win. Their #SBATCH nodes and default --tp (MINITRON_TP) fit the recipe's
# models; --dry-run shows the settings. Any stage launcher takes recipe=NAME the same way.

# a line of srun's report of how a task (or a range of tasks) exited
_MINITRON_TASK_END='^srun: error: [^ ]+: tasks? [0-9,-]+: Exited with exit code [0-9]+$'

# Whether the controller is ending this job for a reason other than its time limit: `scancel JOB`
# (CANCELLED, shown as COMPLETING while its processes end, with no reason) sends SIGTERM like a time
# limit or a pre-emption's grace time does, yet must not be undone by a requeue.
_minitron_cancelled() {
  local info
  info=" $(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null) " || return 1
  case $info in
    *" JobState=CANCELLED "*) return 0 ;;
    *" JobState=COMPLETING "*) case $info in *" Reason=TimeLimit "*) return 1 ;; *) return 0 ;; esac ;;
  esac
  return 1
}

minitron_launch() {
  local stage=$1; shift
  local tp=${MINITRON_TP:-1} pp=${MINITRON_PP:-1} ep=${MINITRON_EP:-1} dry_run=0
  local container=${MINITRON_CONTAINER:-nemo-minitron:latest}
  local mounts=${MINITRON_MOUNTS:-}
  local overrides=()
  while [ $# -gt 0 ]; do
    case $1 in
      --tp) tp=$2; shift 2 ;;
      --pp) pp=$2; shift 2 ;;
      --ep) ep=$2; shift 2 ;;
      --container) container=$2; shift 2 ;;
      --mounts) mounts=$2; shift 2 ;;
      --no-container) container=none; shift ;;
      --dry-run) dry_run=1; shift ;;
      --) shift ;;
      -h|--help) sed '/^$/,$d' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; return 0 ;;
      *) overrides+=("$1"); shift ;;
    esac
  done
  local nodes=${SLURM_JOB_NUM_NODES:-${MINITRON_NODES:-1}}
  local gpus=${SLURM_GPUS_ON_NODE:-${MINITRON_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}}
  local world=$((nodes * gpus))
  if [ $((world % (tp * pp))) -ne 0 ]; then
    echo "error: tp=$tp x pp=$pp does not divide $nodes node(s) x $gpus GPU(s) = $world: change --tp/--pp or --nodes" >&2
    return 2
  fi
  local dp=$((world / (tp * pp)))
  local layout=("tp=$tp" "pp=$pp")
  if [ "$ep" != 1 ]; then
    if [ $((world % (tp * pp * ep))) -ne 0 ]; then
      echo "error: tp=$tp x pp=$pp x ep=$ep does not divide $world GPU(s): change --ep (it must divide dp=$dp)" >&2
      return 2
    fi
    layout+=("ep=$ep")
  fi
  echo "[launcher] stage=$stage nodes=$nodes gpus/node=$gpus world=$world ${layout[*]} dp=$dp container=$container"

  if [ "$dry_run" = 1 ]; then
    minitron "$stage" "${layout[@]}" "${overrides[@]}" --cfg job
    return $?
  fi
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: not inside a Slurm allocation: submit with sbatch, or use --dry-run" >&2
    return 2
  fi

  export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  local container_args=()
  if [ "$container" = none ]; then
    if ! command -v minitron >/dev/null; then
      echo "error: --no-container runs the minitron on PATH and there is none: activate its environment before sbatch" >&2
      return 2
    fi
    echo "[launcher] no container: $(command -v minitron)"
  else
    container_args=(--container-image="$container" --container-workdir="$PWD")
    [ -n "$mounts" ] && container_args+=(--container-mounts="$mounts")
  fi

  local preempted=0
  # srun's own report of each task's end ("srun: error: NODE: task 1: Exited with exit code 75") goes
  # through a FIFO to the job's log and, filtered, to a file: with --kill-on-bad-exit srun's status is
  # that of the first task it saw end, or 143 for one it terminated, not necessarily the stage's 75.
  local report
  report=$(mktemp -d "${TMPDIR:-/tmp}/minitron-launch.XXXXXX")
  mkfifo "$report/srun.err" "$report/copy"
  # the readers ignore the pre-emption signals (scancel --full signals every process of the job)
  (trap '' INT TERM USR1 USR2 HUP; exec grep -E "$_MINITRON_TASK_END") <"$report/copy" >"$report/tasks" &
  local grep_pid=$!
  (trap '' INT TERM USR1 USR2 HUP; exec tee "$report/copy") <"$report/srun.err" >&2 &
  local tee_pid=$!
  # sbatch --signal=B:USR1@... signals this shell; the tasks save a checkpoint on SIGUSR1.
  trap 'preempted=1; echo "[launcher] pre-emption signal: checkpointing"; kill -USR1 "$srun_pid" 2>/dev/null' USR1 TERM
  srun --ntasks-per-node="$gpus" --kill-on-bad-exit=1 "${container_args[@]}" \
    minitron "$stage" "${layout[@]}" "${overrides[@]}" 2>"$report/srun.err" &
  local srun_pid=$!
  local status=0
  wait "$srun_pid" || status=$?
  # `wait` returns early when a trapped signal arrives: wait again for the tasks to finish saving.
  while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid" || status=$?; done
  # and for srun's report to be read to its end (it ends when srun and its tasks have closed stderr)
  while kill -0 "$tee_pid" 2>/dev/null || kill -0 "$grep_pid" 2>/dev/null; do wait "$tee_pid" "$grep_pid" || true; done
  # the exit codes srun reports for the tasks that exited (the ones it terminated end by a signal)
  local codes
  codes=$(sed -E 's/.*Exited with exit code ([0-9]+)$/\1/' "$report/tasks" | sort -u | tr '\n' ' ')
  rm -rf "$report"
  # 75: the tasks stopped at a pre-emption checkpoint (a signal from Slurm reached them, not this shell).
  # Every task srun saw exit did so with 75 (a checkpoint is collective: one task's 75 means it is
  # complete) and the others were terminated by srun, whatever srun's own status; without srun's
  # report, its status 75. A task's other code (a real failure) is not requeued.
  local stopped=0
  if [ "$status" != 0 ]; then
    if [ -n "$codes" ]; then [ "$codes" = "75 " ] && stopped=1; else [ "$status" = 75 ] && stopped=1; fi
  fi
  if { [ "$preempted" = 1 ] || [ "$stopped" = 1 ]; } && _minitron_cancelled; then
    echo "[launcher] job $SLURM_JOB_ID was cancelled: not requeueing (the same sbatch command resumes from its last checkpoint)"
    return "$status"
  fi
  if [ "$preempted" = 1 ] || [ "$stopped" = 1 ]; then
    [ "$preempted" = 1 ] || echo "[launcher] the tasks stopped at a pre-emption checkpoint (exit 75; srun's status $status)"
    echo "[launcher] requeueing job $SLURM_JOB_ID; the stage resumes from its last checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$status"
}
