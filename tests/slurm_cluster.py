"""A real one-node Slurm cluster on this machine, for the tests marked `slurm` (tests/test_slurm.py).

`SlurmCluster(root).start()` installs the Debian packages `slurm-wlm munge` when `slurmctld` is not on
PATH (apt-get, non-interactive), writes a munge key and a slurm.conf of its own under `root` (one node
named after `hostname -s` with this machine's CPUs, no cgroups, no accounting, state and spool
directories under `root`, JobRequeue=1), starts munged, slurmctld and slurmd in the foreground as
children of this process (so their pids are known exactly; no systemd is needed) and waits until
`sinfo` shows the node idle. `stop()` cancels what is still queued, ends the job steps the cluster's
slurmd started, then the three daemons, by their pids, and checks nothing of theirs is left.

Client commands (`sbatch`, `squeue`, `scontrol`, ...) reach this cluster through `cluster.env`
(SLURM_CONF points at the config); a job inherits it, so `srun` and `scontrol` inside the job do too.

Anything that stops the cluster from coming up raises `SlurmUnavailable` with the apt or daemon
error and the daemons' logs; the fixture turns it into a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

APT_PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmUnavailable(RuntimeError):
    """Slurm could not be installed or started here; the message says why."""


def ensure_installed(timeout: float = 900) -> None:
    """`slurmctld`, `slurmd`, `munged` on PATH, installing `slurm-wlm munge` with apt-get if they are not."""
    if all(_which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"slurmctld is not installed and installing {' '.join(APT_PACKAGES)} needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurmctld is not installed and there is no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:  # a stale package index: update once and try again
        update = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=timeout)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(install)}` failed ({proc.returncode}):\n"
                                   f"{(update.stderr + proc.stdout + proc.stderr)[-3000:]}")
    missing = [d for d in DAEMONS if not _which(d)]
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(APT_PACKAGES)}, yet {', '.join(missing)} not found")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_resources() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) as `slurmd -C` reports them, memory 5% under so the node never drains."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=60).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    cpus = int(fields.get("CPUs", os.cpu_count() or 1))
    memory = int(fields.get("RealMemory", 1024))
    return cpus, max(1, int(memory * 0.95))


class SlurmCluster:
    """One controller and one compute node (this machine) under `root`."""

    def __init__(self, root: Path, partition: str = "minitron"):
        self.root = Path(root)
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        self.env["SLURM_CONF"] = str(self.conf)
        self.env["PATH"] = f"{self.env.get('PATH', '')}:/usr/sbin:/sbin"
        self.startup_s: float | None = None
        self.shutdown_s: float | None = None

    # --- configuration ---------------------------------------------------------------------------

    def write_config(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o711)  # munged: clients need to reach its socket
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        cpus, memory = node_resources()
        r = self.root
        lines = [
            "ClusterName=minitron-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=15",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # no systemd or cgroups here: track processes through /proc, bind no tasks
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=300",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        # slurmd reads cgroup.conf beside slurm.conf when it has one; none of its plugins are in use.
        (self.root / "cgroup.conf").write_text("CgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n")

    # --- daemons ---------------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> "SlurmCluster":
        t0 = time.monotonic()
        ensure_installed()
        self.write_config()
        try:
            self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={self.root / 'munge' / 'munge.key'}",
                                   f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                                   f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                                   f"--log-file={self.logs / 'munged.log'}"])
            self._wait(lambda: self.munge_socket.exists(), 20, "munged to create its socket")
            # -i: ignore any state from an earlier run (there is none: the state directory is new)
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._client("sinfo", "-h").returncode == 0, timeout, "slurmctld to answer sinfo")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
            self._wait(lambda: self.node_state() == "idle", timeout, f"node {self.node} to be idle in sinfo")
        except SlurmUnavailable:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.logs / f"{name}.stdout", "w")
        # A session of its own: a Ctrl-C at the terminal reaches pytest, not the daemons.
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, cwd=self.root)
        out.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{', '.join(dead)} exited ({self.procs[dead[0]].returncode}) while waiting "
                                       f"for {what}\n{self.logs_text()}")
            if ready():
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs_text()}")

    def logs_text(self, tail: int = 2000) -> str:
        parts = []
        for f in sorted(self.logs.glob("*")):
            text = f.read_text(errors="replace")
            if text.strip():
                parts.append(f"--- {f.name} (last {tail} chars) ---\n{text[-tail:]}")
        return "\n".join(parts)

    def _client(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout)

    def node_state(self) -> str:
        proc = self._client("sinfo", "-h", "-N", "-n", self.node, "-o", "%t")
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def run(self, *cmd: str, timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A client command (`sbatch ...`) against this cluster."""
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=kwargs.pop("env", self.env),
                              timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job_state(self, job_id: str) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, ...) as the controller has it, or ''."""
        out = self._client("scontrol", "show", "job", "-o", job_id).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get("JobState", "")

    FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
             "PREEMPTED")

    def wait_job(self, job_id: str, timeout: float = 600) -> str:
        """The job's final state, polled every half second (`sbatch --wait` polls at up to 32 s intervals,
        which adds tens of seconds to a short job)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in self.FINAL:
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {self.job_state(job_id)} after {timeout:.0f} s")

    def job_field(self, job_id: str, key: str) -> str:
        out = self._client("scontrol", "show", "job", "-o", job_id).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get(key, "")

    # --- shutdown --------------------------------------------------------------------------------

    def _leftovers(self) -> list[int]:
        """Pids of processes outside `self.procs` that this cluster started: slurmstepd and the job's
        tasks daemonize away from slurmd, but carry its SLURM_CONF (or the job's) in their environment."""
        mine = f"SLURM_CONF={self.conf}".encode()
        ours = {p.pid for p in self.procs.values()} | {os.getpid()}
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in ours:
                continue
            try:
                environ = (entry / "environ").read_bytes()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if mine in environ.split(b"\0") and (b"slurmstepd" in cmdline or b"SLURM_JOB_ID=" in environ):
                pids.append(int(entry.name))
        return pids

    def stop(self, timeout: float = 30) -> None:
        t0 = time.monotonic()
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._client("scancel", "--full", f"--partition={self.partition}", "--user=root")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not self._client("squeue", "-h", "-t", "RUNNING,COMPLETING,PENDING,CONFIGURING").stdout.strip():
                    break
                time.sleep(0.5)
        # slurmd first (it ends its steps), then the controller, then munge
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        leftovers = self._leftovers()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.killed_leftovers = leftovers
        self.shutdown_s = time.monotonic() - t0

    def running(self) -> list[int]:
        """Pids of this cluster's processes still alive (empty after `stop`)."""
        return [p.pid for p in self.procs.values() if p.poll() is None] + self._leftovers()
