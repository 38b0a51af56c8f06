"""A private Slurm cluster on this machine, for tests: munged, slurmctld and two slurmd (nodes `node1` and
`node2`) on loopback, with every file (config, keys, state, spool, logs) under one temporary directory.

Debian's `slurm-wlm` and `munge` are installed with apt when `sbatch` is missing (root only). Every daemon
runs in the foreground as a child of this process, so it is stopped by its own process id; processes the
daemons started (slurmstepd, job steps) carry a marker in their environment and are stopped by process id
too. Nothing is ever killed by name.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MARKER = "DTRAIN_SLURM_CLUSTER"  # in the environment of every process of a cluster: its root directory
NODES = ("node1", "node2")
CPUS_PER_NODE = 2
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
}


class SlurmUnavailable(Exception):
    """Slurm cannot be installed or started here; the message says why."""


def install_slurm() -> None:
    """apt-get install slurm-wlm munge, when sbatch (or a daemon) is missing."""
    needed = ("sbatch", "srun", "scontrol", "slurmctld", "slurmd", "munged")
    missing = [tool for tool in needed if shutil.which(tool, path=_sbin_path()) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"{', '.join(missing)} not installed and not root: cannot apt-get install slurm-wlm munge"
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and no apt-get here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise SlurmUnavailable(
                f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-600:]}"
            )


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """Two nodes on loopback. `env` is the environment for client commands (sbatch, squeue, ...)."""

    def __init__(self, cred_expire: int = 5):
        self.root = Path(tempfile.mkdtemp(prefix="dtrain-slurm-"))
        self.root.chmod(0o755)  # munged (user munge) must reach its directory below
        self.conf = self.root / "slurm.conf"
        self.cred_expire = cred_expire
        self.daemons: dict[str, subprocess.Popen] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        base["PATH"] = _sbin_path()
        self.env = {**base, "SLURM_CONF": str(self.conf), MARKER: str(self.root)}

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60) -> SlurmCluster:
        stop_stale_clusters()
        (self.root / "owner.pid").write_text(str(os.getpid()))
        try:
            self._start_munged()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for node in NODES:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-f", str(self.conf), "-N", node])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        mdir = self.root / "munge"
        mdir.mkdir()
        mdir.chmod(0o755)  # munged: the socket directory must be searchable by all
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self.munge_socket = mdir / "munge.socket"
        cmd = [
            "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={self.munge_socket}",
            f"--pid-file={mdir / 'munged.pid'}",
            f"--log-file={mdir / 'munged.log'}",
            f"--seed-file={mdir / 'munged.seed'}",
        ]
        self._spawn("munged", cmd, user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        deadline = time.time() + 20
        while not self.munge_socket.exists():
            if self.daemons["munged"].poll() is not None or time.time() > deadline:
                raise SlurmUnavailable(f"munged did not start: {self._log_tail('munged')}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (r / d).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={CPUS_PER_NODE} "
            "RealMemory=8000 State=UNKNOWN"
            for n in NODES
        )
        self.conf.write_text(
            f"""# a private 2-node cluster on loopback for dtrain's tests
ClusterName=dtraintest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=900
InactiveLimit=0
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""
        )

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / f"{name}.out", "w")  # noqa: SIM115 (closed with the process)
        self.daemons[name] = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the tests reaches them through stop(), not twice
            **kw,
        )
        log.close()

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited ({proc.returncode}): {self._log_tail(name)}")
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            if sorted(states.split()) == sorted([*NODES, *["idle"] * len(NODES)]):
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"nodes not idle after {timeout} s (sinfo: {states!r}): {self.logs()}")

    def stop(self) -> list[int]:
        """Cancel every job, stop the daemons by their process ids, then any process still carrying this
        cluster's marker (job steps a daemon left behind). Returns the ids that had to be killed that way."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--user", "root", check=False)
            deadline = time.time() + 30  # KillWait is 10 s: TERM, then KILL
            while time.time() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd-node1", "slurmd-node2", "slurmctld", "munged"):
            proc = self.daemons.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.daemons.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        leftovers = kill_marked(str(self.root))
        if os.environ.get("DTRAIN_KEEP_SLURM_DIR"):
            print(f"slurm cluster files kept in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        return leftovers

    # ------------------------------------------------------------------ clients
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(
        self, script: str | Path, *options: str, env: dict | None = None, cwd: Path | None = None
    ) -> str:
        """Submit; returns the job id. `env`: extra variables for the job (sbatch exports the whole environment)."""
        full = {**self.env, **(env or {})}
        full.update({k: self.env[k] for k in ("SLURM_CONF", MARKER)})  # this cluster, whatever `env` says
        full["PATH"] = os.pathsep.join([full.get("PATH", ""), "/usr/sbin", "/sbin"])
        proc = subprocess.run(
            ["sbatch", "--parsable", *options, str(script)],
            env=full,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        fields = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_id: str, timeout: float = 300, poll: float = 0.5) -> dict[str, str]:
        """Wait for the job to end for good (a requeued job passes through PENDING and RUNNING again)."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not done after {timeout} s: {info}\n{self.logs()}")

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120) -> dict[str, str]:
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} never reached {states}: {info}")

    def _log_tail(self, name: str, chars: int = 1500) -> str:
        path = self.root / f"{name}.out"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def logs(self, chars: int = 2000) -> str:
        """The daemons' log tails, for assertion messages."""
        parts = []
        for path in sorted([*(self.root / "log").glob("*.log"), *self.root.glob("*.out")]):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def marked_processes(root: str | None = None) -> dict[int, str]:
    """pid -> cluster root, for live processes carrying a cluster marker (of `root`, or of any cluster)."""
    found, mine = {}, _ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        value = _environ(int(entry.name)).get(MARKER.encode())
        if value is not None and (root is None or value.decode() == root):
            found[int(entry.name)] = value.decode()
    return found


def kill_marked(root: str) -> list[int]:
    """SIGKILL, by process id, every live process carrying `root`'s marker."""
    killed = []
    for _ in range(3):  # a dying parent may have forked once more
        pids = marked_processes(root)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if not pids:
            break
        time.sleep(0.5)
    return killed


def stop_stale_clusters() -> None:
    """Processes of an earlier test cluster whose owner (the test process that started it) is gone: a run
    killed before its teardown. Stopped by process id, their directory removed."""
    for root in set(marked_processes().values()):
        try:
            owner = int((Path(root) / "owner.pid").read_text())
            os.kill(owner, 0)
            continue  # its owner is alive: another test session's cluster
        except (OSError, ValueError):
            pass
        kill_marked(root)
        shutil.rmtree(root, ignore_errors=True)
