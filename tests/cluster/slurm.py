"""A throw-away single-node SLURM cluster (munged + slurmctld + slurmd) that a test starts and stops itself.

Features
- `unavailable()` says why a cluster cannot run here (not root, packages missing, another cluster owns
  /etc/slurm/slurm.conf) so the test can skip with that reason; `tests/cluster/install-slurm.sh` installs
  the Debian packages (Slurm 22.05 on bookworm).
- `Cluster(base).start()` writes munge key, slurm.conf and gres.conf under `base`, starts the three daemons as
  root without systemd and waits until the node is idle; `stop()` cancels the cluster's jobs, then stops
  exactly the daemons it started, by the PIDs in their pid files, and removes only the /etc links it made.
- Fake GPUs: `gres` "gpu" backed by character devices (mknod c 1 3, i.e. /dev/null) so that jobs asking for
  `--gpus=1` are schedulable on a CPU-only machine (the job itself then trains on the CPU).
- `python tests/cluster/slurm.py up|down|status [BASE]` for poking at the cluster by hand.

Pitfalls this file works around (each one cost an afternoon):
1. munged: its socket directory must be 0755 (clients get "Socket is inaccessible" otherwise) and the key 0600.
2. The Snakemake job-step plugin strips SLURM_* (SLURM_CONF included) before its inner `srun`, which then
   cannot find the config ("fetch_config: DNS SRV lookup failed"): the config must also be at the
   compiled-in default path /etc/slurm/slurm.conf (a symlink to ours).
3. Slurm 22.05 drops GPUs without a device file ("Removing file-less GPU ... from final GRES list", node
   INVAL): every fake GPU gets `File=` pointing to a character device.
4. There is no accounting database (no slurmdbd), so `sacct` knows nothing: Snakemake must query job states
   with `squeue` (`slurm-status-command: squeue`), which needs finished jobs to stay visible in squeue for
   a while: MinJobAge=3600.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYS_CONF = Path("/etc/slurm/slurm.conf")
SYS_GRES = SYS_CONF.with_name("gres.conf")
DAEMONS = ("munged", "slurmctld", "slurmd")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel", "srun", "scontrol")
PORTS = (6817, 6818)  # slurmctld, slurmd


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "a SLURM test cluster needs root (it runs slurmd as root and links /etc/slurm/slurm.conf)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} not on PATH): run tests/cluster/install-slurm.sh as root"
    owner = _foreign_conf()
    if owner:
        return owner
    busy = [p for p in PORTS if _port_busy(p)]
    if busy:
        return f"port(s) {busy} already in use: another slurmctld/slurmd is running on this machine"
    return None


def _foreign_conf() -> str | None:
    """A /etc/slurm/slurm.conf that is not a link into a live test cluster of ours is someone else's."""
    if not SYS_CONF.exists() and not SYS_CONF.is_symlink():
        return None
    if SYS_CONF.is_symlink() and (not SYS_CONF.exists() or _stale(SYS_CONF)):
        return None  # left by a killed test run (dangling, or its cluster's daemons are gone): safe to replace
    if SYS_CONF.is_symlink():
        return f"{SYS_CONF} links to {os.readlink(SYS_CONF)}: another SLURM test cluster is running"
    return f"{SYS_CONF} exists and is not ours (a real SLURM installation?): not touching it"


def _stale(link: Path) -> bool:
    """A link into a test cluster of ours (/tmp/sparsescale-slurm-*) whose daemons are gone (both ports free):
    left by a test run that was killed before its teardown, with the directory still there."""
    return (link.is_symlink() and Path(os.readlink(link)).parent.name.startswith("sparsescale-slurm-")
            and not any(_port_busy(p) for p in PORTS))


def _port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class Cluster:
    """One node named after this host, partition `debug`, `fake_gpus` GPUs, all CPUs, memory minus 2 GiB."""

    def __init__(self, base: str | os.PathLike | None = None, fake_gpus: int = 2):
        # munged wants every directory above its socket searchable by all (pytest's tmp dirs are 0700), so
        # by default the cluster lives in a fresh /tmp/sparsescale-slurm-* that stop() removes again
        self.owns_base = base is None
        self.base = Path(base or tempfile.mkdtemp(prefix="sparsescale-slurm-", dir="/tmp")).resolve()
        if self.owns_base:
            os.chmod(self.base, 0o755)
        self.fake_gpus = fake_gpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.base / "slurm.conf"
        self.gres = self.base / "gres.conf"
        self.munge_socket = self.base / "munge" / "munge.socket.2"
        self.started: dict[str, int] = {}  # daemon -> pid, only those this object started

    # -- paths and environment ------------------------------------------------------------------------

    def pidfile(self, daemon: str) -> Path:
        return self.base / "run" / f"{daemon}.pid"

    def logfile(self, daemon: str) -> Path:
        return self.base / "log" / f"{daemon}.log"

    @property
    def env(self) -> dict:
        """os.environ plus SLURM_CONF, for client commands and for Snakemake."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    # -- configuration ------------------------------------------------------------------------------

    def write_config(self) -> None:
        for d in ("munge", "state", "spool", "log", "run", "dev"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base / "munge", 0o755)  # pitfall 1: clients must reach the socket
        key = self.base / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))  # what `mungekey --create` does
        os.chmod(key, 0o600)  # pitfall 1: munged refuses a readable key

        cpus = os.cpu_count() or 1
        mem_mb = max(1024, _mem_total_mb() - 2048)
        gres_node = ""
        gres_lines = []
        if self.fake_gpus > 0:
            for i in range(self.fake_gpus):  # pitfall 3: a device file per GPU
                dev = self.base / "dev" / f"fakegpu{i}"
                if not dev.exists():
                    os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # character device 1:3, like /dev/null
            gres_node = f" Gres=gpu:{self.fake_gpus}"
            gres_lines.append(f"NodeName={self.host} Name=gpu File={self.base}/dev/fakegpu[0-{self.fake_gpus - 1}]")
        self.gres.write_text("".join(line + "\n" for line in gres_lines))
        b = self.base
        self.conf.write_text(f"""\
# written by tests/cluster/slurm.py: a throw-away single-node cluster
ClusterName=sparsescale-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmctldPort={PORTS[0]}
SlurmdPort={PORTS[1]}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={self.pidfile('slurmctld')}
SlurmdPidFile={self.pidfile('slurmd')}
SlurmctldLogFile={self.logfile('slurmctld')}
SlurmdLogFile={self.logfile('slurmd')}
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no systemd: processes tracked through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# pitfall 4: no slurmdbd, so finished jobs must stay visible to squeue
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb}{gres_node} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def link_system_conf(self) -> None:
        """Pitfall 2: the job step's srun reads the compiled-in default path."""
        SYS_CONF.parent.mkdir(parents=True, exist_ok=True)
        for link, target in ((SYS_CONF, self.conf), (SYS_GRES, self.gres)):
            if link.is_symlink() and (not link.exists() or _stale(link)):
                link.unlink()  # dangling, or its cluster is gone: left by a killed run
            if link.exists() or link.is_symlink():
                if Path(os.path.realpath(link)) != target:
                    raise RuntimeError(f"refusing to replace {link} (-> {os.path.realpath(link)}): not ours")
                continue
            link.symlink_to(target)

    def unlink_system_conf(self) -> None:
        for link, target in ((SYS_CONF, self.conf), (SYS_GRES, self.gres)):
            if link.is_symlink() and Path(os.readlink(link)) == target:
                link.unlink()

    # -- daemons --------------------------------------------------------------------------------------

    def _pid(self, daemon: str) -> int | None:
        try:
            return int(self.pidfile(daemon).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _wait_pid(self, daemon: str, timeout: float = 30.0) -> int:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            pid = self._pid(daemon)
            if pid and alive(pid):
                return pid
            time.sleep(0.1)
        raise RuntimeError(f"{daemon} did not start within {timeout:.0f}s; its log:\n{_tail(self.logfile(daemon))}")

    def start(self, timeout: float = 60.0) -> "Cluster":
        why = unavailable()
        if why:
            raise RuntimeError(why)
        t0 = time.monotonic()
        self.write_config()
        self.link_system_conf()
        try:
            b = self.base
            commands = {
                "munged": ["munged", f"--key-file={b}/munge/munge.key", f"--socket={self.munge_socket}",
                           f"--pid-file={self.pidfile('munged')}", f"--log-file={self.logfile('munged')}",
                           f"--seed-file={b}/munge/munged.seed"],
                "slurmctld": ["slurmctld", "-f", str(self.conf)],
                "slurmd": ["slurmd", "-f", str(self.conf)],
            }
            for daemon in DAEMONS:  # each one daemonizes and writes its pid file
                self.pidfile(daemon).unlink(missing_ok=True)
                proc = subprocess.run(commands[daemon], env=self.env, capture_output=True, text=True, timeout=60)
                if proc.returncode != 0:
                    raise RuntimeError(f"{daemon} failed to start ({proc.returncode}): {proc.stderr.strip()}\n"
                                       f"{_tail(self.logfile(daemon))}")
                self.started[daemon] = self._wait_pid(daemon)
            self.wait_idle(timeout - (time.monotonic() - t0))
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def wait_idle(self, timeout: float) -> None:
        t_end = time.monotonic() + max(timeout, 5.0)
        state = ""
        while time.monotonic() < t_end:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout:.0f}s (state {state!r}):\n"
                           f"{_tail(self.logfile('slurmctld'))}\n{_tail(self.logfile('slurmd'))}")

    def jobs(self) -> list[str]:
        """Ids of the jobs slurmctld still runs or holds (pending, running, completing)."""
        out = self.run("squeue", "-h", "-o", "%i", "-t", "PD,R,CG,CF,S", check=False)
        return out.split()

    def stop(self) -> None:
        """Cancel our jobs, stop the daemons we started (slurmd, slurmctld, munged), remove our /etc links."""
        if self.started.get("slurmctld") and alive(self.started["slurmctld"]):
            ids = self.jobs()
            if ids:
                self.run("scancel", *ids, check=False)
                t_end = time.monotonic() + 30
                while self.jobs() and time.monotonic() < t_end:
                    time.sleep(0.5)
        for daemon in reversed(DAEMONS):
            pid = self.started.pop(daemon, None)
            if pid is None or not alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            t_end = time.monotonic() + 10
            while alive(pid) and time.monotonic() < t_end:
                time.sleep(0.1)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.unlink_system_conf()
        if self.owns_base and not self.started:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _mem_total_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


def _tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: no log)"
    return f"--- {path} (last {min(n, len(lines))} lines)\n" + "\n".join(lines[-n:])


if __name__ == "__main__":  # by hand: python tests/cluster/slurm.py up|down|status [BASE]
    action = sys.argv[1] if len(sys.argv) > 1 else "status"
    cluster = Cluster(sys.argv[2] if len(sys.argv) > 2 else "/tmp/sparsescale-slurm")
    if action == "up":
        cluster.start()
        print(f"up in {cluster.startup_s:.1f}s: " + ", ".join(f"{d}={p}" for d, p in cluster.started.items()))
        print(f"export SLURM_CONF={cluster.conf}")
    elif action == "down":  # by hand the pids come from the pid files (the process that started them is gone)
        cluster.started = {d: p for d in DAEMONS if (p := cluster._pid(d))}
        cluster.stop()
    else:
        for d in DAEMONS:
            pid = cluster._pid(d)
            print(f"{d:10s} {pid} {'alive' if pid and alive(pid) else 'dead'}")
        print(cluster.run("sinfo", check=False) + cluster.run("squeue", check=False))
