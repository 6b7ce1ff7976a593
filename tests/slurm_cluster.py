"""A real SLURM on 127.0.0.1 for the tests: munged, slurmctld and slurmd from Debian's packages (slurm-wlm,
munge; `.ci/run` installs them), each configured in a temporary directory with free ports, so nothing of
the machine's own /etc/slurm is used or changed. Needs root (slurmd starts the jobs' processes).

The node is modelled as sites run theirs, not as loopback would have it: its NodeName (`node-a`) is no
resolvable host name (NodeAddr=127.0.0.1; slurmd starts as it with -N), it declares more CPUs than the
machine has (SlurmdParameters=config_overrides) and 4 GPUs whose device files are links to /dev/null
(SLURM then sets each task's CUDA_VISIBLE_DEVICES; TensorFlow sees none), and steps get reserved ports
(MpiParams=ports), so that the repository's batch script runs as submitted. MessageTimeout is above
KillWait, as BUILD.md advises sites: slurmd answers a step's kill (srun --kill-on-bad-exit) only once its
tasks are gone, up to KillWait, and slurmctld resends an unanswered kill 60 s later, which then cancelled
the requeued job's step of the same id (JobId.0)."""

import os
import shutil
import signal
import socket
import subprocess
import time

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def missing() -> str | None:
  """Why no SLURM can be started here, or None."""
  absent = [b for b in BINARIES if not shutil.which(b)]
  if absent:
    return f"{', '.join(absent)} not installed (apt-get install slurm-wlm munge)"
  if os.geteuid() != 0:
    return "slurmd needs root"
  return None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


NODE = "node-a"  # the node's name, which no resolver knows
CPUS = 32  # declared: two jobs of the batch script's 2 x 8 CPUs at once (the machine has fewer)
GPUS = 4  # declared: two jobs of 2 tasks x 1 GPU at once
RESERVED_PORTS = "20000-20999"  # MpiParams=ports: what SLURM reserves steps' ports from


class LocalSlurm:
  """One node (this machine, 127.0.0.1, named NODE) with CPUS CPUs and GPUS fake GPUs, in one partition."""

  def __init__(self, root: str):
    self.root = root
    self.env = dict(os.environ, SLURM_CONF=os.path.join(root, "slurm.conf"))
    self._pids = []

  def start(self, timeout: float = 60) -> "LocalSlurm":
    for name in ("state", "spool"):
      os.makedirs(os.path.join(self.root, name), exist_ok=True)
    key = os.path.join(self.root, "munge.key")
    with open(key, "wb") as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    socket_path = os.path.join(self.root, "munge.socket")
    host = socket.gethostname().split(".")[0]
    r = self.root
    for i in range(GPUS):  # gres.conf wants character devices; CUDA never opens these
      if not os.path.lexists(f"{r}/gpu{i}"):
        os.symlink("/dev/null", f"{r}/gpu{i}")
    with open(f"{r}/gres.conf", "w") as f:  # found beside slurm.conf
      f.write(f"AutoDetect=off\nNodeName={NODE} Name=gpu File={r}/gpu[0-{GPUS - 1}]\n")
    with open(self.env["SLURM_CONF"], "w") as f:
      f.write(f"""ClusterName=loopback
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path},cred_expire=10
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=10
MessageTimeout=30
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
GresTypes=gpu
MpiParams=ports={RESERVED_PORTS}
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={CPUS} Gres=gpu:{GPUS} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    subprocess.run(["munged", f"--key-file={key}", f"--socket={socket_path}", f"--pid-file={r}/munged.pid",
                    f"--log-file={r}/munged.log", f"--seed-file={r}/munged.seed", "--force"], check=True,
                   env=self.env, timeout=30)
    subprocess.run(["slurmctld"], check=True, env=self.env, timeout=30)
    subprocess.run(["slurmd", "-N", NODE], check=True, env=self.env, timeout=30)  # not this host's name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
      if state.stdout.strip() == "idle":
        return self
      time.sleep(0.5)
    raise RuntimeError(f"the SLURM node did not come up in {timeout:.0f} s: {self.log('slurmd')[-2000:]}")

  def log(self, daemon: str) -> str:
    path = os.path.join(self.root, f"{daemon}.log")
    return open(path).read() if os.path.exists(path) else ""

  def run(self, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=kwargs.pop("env", self.env), capture_output=True, text=True, timeout=60,
                          check=True, **kwargs)

  def submit(self, script: str, options=(), args=(), env: dict | None = None, cwd: str | None = None) -> str:
    """sbatch with `options`, then `script` with its `args`; returns the job id."""
    out = self.run("sbatch", "--parsable", *options, script, *args, env=env or self.env, cwd=cwd).stdout
    return out.strip().split(";")[0]

  def job(self, job_id: str) -> dict:
    """`scontrol show job`'s fields (JobState, Restarts, ExitCode...)."""
    text = self.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)

  def stop(self, timeout: float = 30) -> None:
    """Stops the daemons and waits until they are gone, so that a next cluster starts on a clean machine."""
    pids = []
    for name in ("slurmd", "slurmctld", "munged"):
      pid_file = os.path.join(self.root, f"{name}.pid")
      try:
        pid = int(open(pid_file).read().strip())
        os.kill(pid, signal.SIGTERM)
        pids.append(pid)
      except (OSError, ValueError):
        pass
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
      pids = [pid for pid in pids if os.path.exists(f"/proc/{pid}") and
              "zombie" not in open(f"/proc/{pid}/status").read()]
      time.sleep(0.2)
    for pid in pids:
      os.kill(pid, signal.SIGKILL)
