"""Where a run's workers come from: TF_CONFIG (Kubernetes, Vertex AI, by hand), a SLURM job step, or this
node alone (`config.cluster`). The result is the cluster spec and this process's task in it, checked,
which trainer/distribute.py turns into a strategy.

SLURM: every task of the step (`srun`) is a worker, task 0 the chief; each listens on `config.cluster_port`
plus its local task index on its node. Nothing here calls `nvidia-smi` or `scontrol`: SLURM's own
variables say where the tasks are, and the GPUs a task may use are those SLURM left in CUDA_VISIBLE_DEVICES.
"""

import dataclasses
import errno
import json
import os
import re
import socket

import tensorflow as tf

KINDS = ("auto", "tf_config", "slurm", "local")
SLURM_STEP = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
              "SLURM_STEP_TASKS_PER_NODE")


class ClusterError(ValueError):
  """The environment describes no usable cluster; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """A cluster spec and this process's task in it ("local": no cluster, this node alone)."""
  kind: str  # tf_config | slurm | local
  spec: tuple[tuple[str, tuple[str, ...]], ...] = ()  # ((job, (host:port, ...)), ...): hashable
  task_type: str | None = None
  task_id: int | None = None

  @property
  def workers(self) -> int:
    return sum(len(addresses) for _, addresses in self.spec) or 1

  @property
  def address(self) -> str | None:
    """This task's host:port."""
    return dict(self.spec)[self.task_type][self.task_id] if self.spec else None

  def resolver(self, gpus: int) -> tf.distribute.cluster_resolver.ClusterResolver:
    """For MultiWorkerMirroredStrategy, with this task's `gpus` (which it then trains on: without them it
    would count none and train on the CPU); an empty spec for "local", so that no TF_CONFIG in the
    environment is read behind `config.cluster`'s back."""
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({job: list(addresses) for job, addresses in self.spec}), task_type=self.task_type,
        task_id=self.task_id, num_accelerators={"GPU": gpus} if gpus else None, rpc_layer="grpc")


def resolve(kind: str, port: int, environ=None) -> Cluster:
  """The cluster `kind` (KINDS) names in `environ` (os.environ). `auto`: TF_CONFIG when it is set, else
  the SLURM step this process is a task of, else this node alone."""
  environ = os.environ if environ is None else environ
  if kind not in KINDS:
    raise ClusterError(f"cluster={kind!r} is not one of: {', '.join(KINDS)}")
  if kind == "auto":
    kind = ("tf_config" if environ.get("TF_CONFIG", "").strip() else
            "slurm" if "SLURM_STEP_NUM_TASKS" in environ or "SLURM_PROCID" in environ else "local")
    if kind == "slurm" and "SLURM_STEP_NUM_TASKS" not in environ:  # a batch script, outside any srun step
      tasks = environ.get("SLURM_NTASKS", "1")
      if tasks.isdigit() and int(tasks) > 1:
        raise ClusterError(f"SLURM_NTASKS={tasks} but SLURM_STEP_NUM_TASKS is not set: this process runs in the "
                           "batch script, outside a job step; start the trainer with `srun python -m trainer.main "
                           "...` (one task per worker), or give --config.cluster=local to train on this node alone")
      kind = "local"
  if kind == "tf_config":
    return from_tf_config(environ.get("TF_CONFIG", ""))
  if kind == "slurm":
    return from_slurm(environ, port)
  return Cluster("local")


def from_tf_config(text: str) -> Cluster:
  """The cluster TF_CONFIG describes, as Kubernetes operators, Vertex AI (`chief` + `worker` pools, with
  `environment` and `job` fields, which are ignored) or a person write it."""
  if not text.strip():
    raise ClusterError("TF_CONFIG is not set: set it, or give --config.cluster=auto to train without it")
  try:
    tf_config = json.loads(text)
    cluster, task = tf_config["cluster"], tf_config["task"]
    task_type, task_id = task["type"], int(task.get("index", 0))
  except (ValueError, KeyError, TypeError) as e:
    raise ClusterError(f"TF_CONFIG is not {{\"cluster\": {{...}}, \"task\": {{\"type\": ..., \"index\": ...}}}} "
                       f"({type(e).__name__}: {e})") from None
  if not isinstance(cluster, dict) or not all(isinstance(v, list) and v for v in cluster.values()):
    raise ClusterError(f"TF_CONFIG's cluster must map each job to a list of host:port, not {cluster!r}")
  jobs = {job: addresses for job, addresses in cluster.items() if job in ("chief", "worker")}
  if task_type not in jobs or not 0 <= task_id < len(jobs[task_type]):
    raise ClusterError(f"TF_CONFIG's task {task_type} {task_id} is not in its cluster "
                       f"({', '.join(f'{job}: {len(a)}' for job, a in jobs.items()) or 'no chief or worker job'})")
  for address in (a for addresses in jobs.values() for a in addresses):
    match = re.fullmatch(r"[^\s:]+:(\d+)", str(address))
    if not match or not 0 < int(match.group(1)) < 65536:
      raise ClusterError(f"TF_CONFIG's cluster holds {address!r}: give every task as host:port (port 1-65535)")
  spec = tuple((job, tuple(jobs[job])) for job in ("chief", "worker") if job in jobs)
  if sum(len(a) for _, a in spec) == 1:
    return Cluster("local")  # one task (Vertex AI's single-replica jobs): no cluster to form
  return Cluster("tf_config", spec, task_type, task_id)


def from_slurm(environ, port: int) -> Cluster:
  """The cluster of the SLURM job step this process is a task of: every task a worker, in task order."""
  for name in SLURM_STEP:
    if not environ.get(name, "").strip():
      raise ClusterError(f"{name} is not set: the trainer is not a task of a SLURM job step; start it with "
                         "srun, or give --config.cluster=auto (or local) outside SLURM")
  try:
    rank, local, tasks = (int(environ[n]) for n in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS"))
    hosts = expand_hostlist(environ["SLURM_STEP_NODELIST"])
    per_node = expand_tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])
  except ValueError as e:
    raise ClusterError(f"SLURM's step variables do not parse: {e}") from None
  if len(per_node) != len(hosts) or sum(per_node) != tasks or not 0 <= rank < tasks:
    raise ClusterError(f"SLURM_STEP_NODELIST={environ['SLURM_STEP_NODELIST']} and SLURM_STEP_TASKS_PER_NODE="
                       f"{environ['SLURM_STEP_TASKS_PER_NODE']} do not make SLURM_STEP_NUM_TASKS={tasks} tasks "
                       f"with SLURM_PROCID={rank} among them")
  if tasks == 1:
    return Cluster("local")
  if not (0 < port and port + max(per_node) <= 65536):
    raise ClusterError(f"cluster_port={port}: the tasks of a node listen on it and the {max(per_node) - 1} ports "
                       "after it, which must lie in 1-65535")
  addresses = [f"{host}:{port + i}" for host, count in zip(hosts, per_node) for i in range(count)]
  layout = [(host, i) for host, count in zip(hosts, per_node) for i in range(count)]
  node = environ.get("SLURMD_NODENAME")
  if layout[rank][1] != local or (node and layout[rank][0] != node):
    raise ClusterError(f"task {rank} runs as local task {local} on {node or 'this node'}, not where a block layout "
                       f"puts it ({layout[rank][1]} on {layout[rank][0]}): start the step with srun "
                       "--distribution=block")
  return Cluster("slurm", (("worker", tuple(addresses)),), "worker", rank)


def expand_hostlist(text: str) -> list[str]:
  """SLURM's compressed host list, e.g. `gpu[01-03,7],login-a[1-2]x` -> gpu01, gpu02, gpu03, gpu7, ...
  (the zero padding of a range's start is kept)."""
  hosts = []
  for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", text):
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
      hosts.append(item)
      continue
    head, tail = item[:match.start()], item[match.end():]
    for part in match.group(1).split(","):
      first, _, last = part.partition("-")
      if not first.isdigit() or (last and not last.isdigit()):
        raise ValueError(f"bad range {part!r} in host list {text!r}")
      hosts += expand_hostlist(",".join(f"{head}{n:0{len(first)}d}{tail}"
                                        for n in range(int(first), int(last or first) + 1)))
  if not hosts:
    raise ValueError(f"empty host list {text!r}")
  return hosts


def expand_tasks_per_node(text: str) -> list[int]:
  """SLURM's `2(x3),1` -> [2, 2, 2, 1]."""
  counts = []
  for item in text.split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
    if not match:
      raise ValueError(f"bad tasks per node {text!r}")
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  return counts


def check_port_free(cluster: Cluster, source: str) -> None:
  """Refuses in one line when this task's port is taken (a stale trainer, another job): TensorFlow's server
  would fail with a traceback, or the peers wait for a task that never listens."""
  if cluster.address is None:
    return
  port = int(cluster.address.rsplit(":", 1)[1])
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      why = "is in use by another process" if e.errno == errno.EADDRINUSE else f"cannot be listened on ({e.strerror})"
      raise ClusterError(f"port {port} of this task ({cluster.address}, from {source}) {why}: stop that process, or "
                         "give the tasks other ports") from None
