"""A private two-node SLURM cluster on loopback, for tests that need a real scheduler.

Debian's slurmctld and two slurmd daemons (nodes ``n1`` and ``n2``, both this host) run from a temporary
directory with their own slurm.conf, state, spool, logs and PID files, on free ports, with
``auth/none`` (no munge; ``cred_expire=5`` because a requeued job waits that long, default 120 s,
before it may start again). ``n1 n2`` go into /etc/hosts while the cluster is up, because the batch
scripts resolve MASTER_ADDR from ``scontrol show hostnames``. Everything is stopped by PID.

``python -m tests.slurm_cluster`` starts one and keeps it up until Enter, for poking at by hand.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("n1", "n2")
HOSTS_FILE = Path("/etc/hosts")
DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun", "scancel")


class Unavailable(RuntimeError):
    """SLURM cannot run here; the message says why (tests skip with it)."""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _consecutive_free_ports(n: int) -> int:
    """slurmd ports are given as a range ``Port=[a-b]``: find ``n`` free consecutive ones."""
    for _ in range(200):
        base = random.randint(30000, 60000 - n)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise Unavailable("no free consecutive ports for slurmd")


class SlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 4):
        self.root = Path(root)
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.pids: dict[str, int] = {}
        self.hosts_line = f"127.0.0.1 {' '.join(NODES)}  # megadeep test cluster {os.getpid()}"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- setup ---------------------------------------------------------------------------------------
    def _check_installed(self) -> None:
        missing = [d for d in DAEMONS if shutil.which(d) is None]
        if missing:
            raise Unavailable(f"SLURM is not installed (missing {', '.join(missing)}); "
                              "scripts/system-deps.sh installs it as root")
        if os.geteuid() != 0:
            raise Unavailable("starting slurmd and editing /etc/hosts needs root")

    def _write_conf(self) -> None:
        ctld_port, = _free_ports(1)
        node_port = _consecutive_free_ports(len(NODES))
        # a job id range of its own, so two test clusters on one machine do not share MASTER_PORTs
        first_job = random.randint(1000, 15000)
        host = socket.gethostname()
        for d in ("state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=megadeeptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/run/slurmctld.pid
SlurmdPidFile={self.root}/run/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=600
FirstJobId={first_job}
JobCompType=jobcomp/filetxt
JobCompLoc={self.root}/log/jobcomp.txt
KillWait=5
NodeName=n[1-{len(NODES)}] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{node_port}-{node_port + len(NODES) - 1}] CPUs={self.cpus_per_node} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _add_hosts(self) -> None:
        text = HOSTS_FILE.read_text()
        if self.hosts_line not in text:
            HOSTS_FILE.write_text(text.rstrip("\n") + "\n" + self.hosts_line + "\n")

    def _remove_hosts(self) -> None:
        # /etc/hosts may be a bind mount: rewrite it in place rather than replacing the file
        lines = HOSTS_FILE.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.rstrip("\n") != self.hosts_line]
        if len(kept) != len(lines):
            HOSTS_FILE.write_text("".join(kept))

    def _start(self, name: str, cmd: list[str], pidfile: Path) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
        for _ in range(100):  # the daemons fork; their PID file appears when they are up
            if pidfile.is_file() and pidfile.read_text().strip():
                self.pids[name] = int(pidfile.read_text())
                return
            time.sleep(0.05)
        raise Unavailable(f"{name} did not write {pidfile}; see {self.root}/log")

    def start(self) -> "SlurmCluster":
        self._check_installed()
        self._write_conf()
        self._add_hosts()
        try:
            run = self.root / "run"
            self._start("slurmctld", ["slurmctld", "-f", str(self.conf), "-i"], run / "slurmctld.pid")
            for n in NODES:
                self._start(f"slurmd-{n}", ["slurmd", "-f", str(self.conf), "-N", n], run / f"slurmd-{n}.pid")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_idle(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.2)
        raise Unavailable(f"nodes did not become idle in {timeout:.0f} s: {out!r}; see {self.root}/log")

    # -- teardown ------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job (slurmd then ends their steps), then stop the daemons by PID."""
        if "slurmctld" in self.pids and _alive(self.pids["slurmctld"]):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", "--full", *jobs, check=False)
                deadline = time.time() + 20
                while time.time() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                    time.sleep(0.2)
        for name, pid in reversed(list(self.pids.items())):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.time() + 15
        for name, pid in list(self.pids.items()):
            while time.time() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        self._remove_hosts()

    # -- use -----------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float, until=lambda job: job["JobState"] in FINAL) -> dict[str, str]:
        deadline = time.time() + timeout
        job = self.job(job_id)
        while not until(job):
            if time.time() > deadline:
                raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout:.0f} s: {job}")
            time.sleep(0.5)
            job = self.job(job_id)
        return job


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose; the daemons are not our children, so this is rare
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="slurm-") as tmp:
        cluster = SlurmCluster(Path(tmp)).start()
        print(f"export SLURM_CONF={cluster.conf}   # pids {cluster.pids}")
        try:
            input("cluster up; Enter stops it\n")
        finally:
            cluster.stop()
