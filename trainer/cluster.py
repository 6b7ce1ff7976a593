"""Where a run's workers come from: TF_CONFIG (Kubernetes, Vertex AI, by hand), a SLURM job step, or this
node alone (`config.cluster`). The result is the cluster spec and this process's task in it, checked,
which trainer/distribute.py turns into a strategy.

SLURM: every task of the step (`srun`) is a worker, task 0 the chief. Shared nodes are the norm, so a task's
port is one SLURM reserved for the step (SLURM_STEP_RESV_PORTS: `srun --resv-ports`, or every step where the
site sets MpiParams=ports; the same on each node, a node's k-th task takes the k-th) or else one derived from
the job and step ids (`step_ports`): two jobs on one node, or a Jupyter server there, do not meet on one port.
Tasks are reached at their node's address as SLURM knows it (`node_addresses`), for a node's name need not
resolve. The GPUs a task may use are those SLURM left in CUDA_VISIBLE_DEVICES (no `nvidia-smi`).
"""

import dataclasses
import errno
import json
import os
import re
import socket
import subprocess

import tensorflow as tf

KINDS = ("auto", "tf_config", "slurm", "local")
SLURM_STEP = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
              "SLURM_STEP_TASKS_PER_NODE", "SLURM_JOB_ID")
# A step without reserved ports listens on cluster_port + SLOT_PORTS * slot + local task index, where
# slot = (STEPS_PER_JOB * SLURM_JOB_ID + SLURM_STEP_ID) mod SLOTS: ports cluster_port to cluster_port + 4071.
# SLOTS is a prime, so the steps of jobs fewer than 31 ids apart (step ids below STEPS_PER_JOB) never share a
# slot, and other pairs do about once in 509: the second is then refused in one line at its start.
SLOT_PORTS = 8  # ports of one step on one node, one per task (8 GPUs, a task each); more spill into the next slot
STEPS_PER_JOB = 16  # steps (sruns) of one job that take slots of their own
SLOTS = 509  # slots in the range; a prime
SCONTROL_SECS = 30  # seconds `scontrol show node` may take (milliseconds when slurmctld is up)


class ClusterError(ValueError):
  """The environment describes no usable cluster; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """A cluster spec and this process's task in it ("local": no cluster, this node alone)."""
  kind: str  # tf_config | slurm | local
  spec: tuple[tuple[str, tuple[str, ...]], ...] = ()  # ((job, (host:port, ...)), ...): hashable
  task_type: str | None = None
  task_id: int | None = None
  ports_from: str = ""  # where the ports came from, for a refusal: TF_CONFIG, or how the SLURM step's were found

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
  return Cluster("tf_config", spec, task_type, task_id, "TF_CONFIG")


def from_slurm(environ, port: int) -> Cluster:
  """The cluster of the SLURM job step this process is a task of: every task a worker, in task order, at
  its node's address (`node_addresses`) and its port (`step_ports`; `port` is config.cluster_port)."""
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
  ports, ports_from = step_ports(environ, port, max(per_node))
  layout = [(host, i) for host, count in zip(hosts, per_node) for i in range(count)]
  node = environ.get("SLURMD_NODENAME")
  if layout[rank][1] != local or (node and layout[rank][0] != node):
    raise ClusterError(f"task {rank} runs as local task {local} on {node or 'this node'}, not where a block layout "
                       f"puts it ({layout[rank][1]} on {layout[rank][0]}): start the step with srun "
                       "--distribution=block")
  where = node_addresses(hosts, environ)
  addresses = [f"{_host(where[host])}:{ports[i]}" for host, i in layout]
  return Cluster("slurm", (("worker", tuple(addresses)),), "worker", rank, ports_from)


def step_ports(environ, base: int, per_node: int) -> tuple[list[int], str]:
  """The ports of a node's `per_node` tasks (the k-th task's is the k-th) and where they came from: the
  step's reserved ports (SLURM_STEP_RESV_PORTS, e.g. `12000-12003` or `12000,12005`), else SLOT_PORTS
  consecutive ports from `base` (config.cluster_port) at the step's slot (see SLOTS), so that two steps on
  one node differ. `base` moves the whole derived range, e.g. into the ports a firewall opens."""
  reserved = environ.get("SLURM_STEP_RESV_PORTS", "").strip()
  if reserved:
    try:
      ports = expand_ports(reserved)
    except ValueError as e:
      raise ClusterError(f"SLURM_STEP_RESV_PORTS does not parse: {e}") from None
    if len(ports) < per_node:
      raise ClusterError(f"SLURM_STEP_RESV_PORTS={reserved} holds {len(ports)} port(s) for the {per_node} tasks of a "
                         f"node: start the step with srun --resv-ports={per_node} (or --resv-ports=0, for ports "
                         "derived from the job id)")
    return ports[:per_node], f"SLURM_STEP_RESV_PORTS={reserved}"
  job, step = environ["SLURM_JOB_ID"].strip(), environ.get("SLURM_STEP_ID", "").strip() or "0"
  if not job.isdigit() or not step.isdigit():
    raise ClusterError(f"SLURM_JOB_ID={job!r} and SLURM_STEP_ID={step!r} must be numbers: the ports of a step "
                       "without reserved ports (srun --resv-ports) derive from them")
  span = SLOT_PORTS * SLOTS
  if not (0 < base and base + span <= 65536):
    raise ClusterError(f"cluster_port={base}: a SLURM step without reserved ports listens on ports {base} to "
                       f"{base + span - 1}, which must lie in 1-65535")
  slot = (STEPS_PER_JOB * int(job) + int(step)) % SLOTS
  ports = [base + (SLOT_PORTS * slot + i) % span for i in range(per_node)]
  return ports, f"cluster_port={base} with SLURM_JOB_ID={int(job)}, SLURM_STEP_ID={int(step)}"


def expand_ports(text: str) -> list[int]:
  """SLURM's port list, `12000-12002,12005` -> [12000, 12001, 12002, 12005]."""
  ports = []
  for part in text.split(","):
    match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
    if not match or not 0 < int(match.group(1)) <= int(match.group(2) or match.group(1)) < 65536:
      raise ValueError(f"bad port range {part!r} in {text!r}")
    ports += range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1)
  return ports


def node_addresses(nodes: list[str], environ) -> dict[str, str]:
  """{node: the address the other tasks reach it at} for SLURM's node names `nodes`. A node's name is not
  always an address (NodeName apart from NodeAddr; cloud nodes get theirs at boot), so: its entry in
  SLURM_NODE_ALIASES (SLURM sets it for cloud nodes), else its NodeAddr from one `scontrol show node` for all
  of them (where slurmctld itself reaches the node's slurmd; it defaults to the name), else the name. Every
  address must resolve: else one line naming the node and what was tried, not peers that wait for ever."""
  wanted = list(dict.fromkeys(nodes))
  aliases = node_aliases(environ.get("SLURM_NODE_ALIASES", ""))
  found = {node: aliases[node] for node in wanted if node in aliases}
  rest = [node for node in wanted if node not in found]
  scontrol = "not needed"
  if rest:
    text, scontrol = _show_nodes(rest, environ)
    found.update({node: address for node, address in scontrol_addresses(text).items() if node in rest})
  for node in wanted:
    address = found.setdefault(node, node)
    try:
      socket.getaddrinfo(address, None)
    except (OSError, UnicodeError) as e:
      alias = "its entry" if node in aliases else "no entry" if aliases else "not set"
      raise ClusterError(f"SLURM node {node}: its address {address!r} does not resolve "
                         f"({getattr(e, 'strerror', None) or e}); tried SLURM_NODE_ALIASES ({alias}), scontrol show "
                         f"node ({scontrol}), then the name: give the node a resolvable NodeAddr in slurm.conf, or "
                         f"make {address} resolve on every node (DNS, /etc/hosts)") from None
  return found


def node_aliases(text: str) -> dict[str, str]:
  """SLURM_NODE_ALIASES, `name:[addr]:host,...` (addresses in brackets since 20.11, for IPv6) -> {name: addr};
  `(null)` or empty -> {}."""
  pairs = re.findall(r"([^:,\s]+):(\[[^\]]*\]|[^:,\[]*):[^,]*", text)
  return {name: address.strip("[]") for name, address in pairs if address.strip("[]")}


def scontrol_addresses(text: str) -> dict[str, str]:
  """{NodeName: NodeAddr} from `scontrol show node -o` (one line per node)."""
  found = {}
  for line in text.splitlines():
    name, address = re.search(r"\bNodeName=(\S+)", line), re.search(r"\bNodeAddr=(\S+)", line)
    if name and address:
      found[name.group(1)] = address.group(1)
  return found


def _show_nodes(nodes: list[str], environ) -> tuple[str, str]:
  """`scontrol show node -o` of `nodes` (one call: a node it does not know is left out) and, for a
  refusal, what it said."""
  try:
    result = subprocess.run(["scontrol", "show", "node", "-o", ",".join(nodes)], capture_output=True, text=True,
                            timeout=SCONTROL_SECS, env=None if environ is os.environ else dict(environ), check=False)
  except FileNotFoundError:
    return "", "not installed"
  except subprocess.TimeoutExpired:
    return "", f"no answer in {SCONTROL_SECS} s"
  found = scontrol_addresses(result.stdout)
  said = [f"NodeAddr={found[node]}" if node in found else f"{node} unknown" for node in nodes]
  return result.stdout, ", ".join(said[:3]) + (", ..." if len(said) > 3 else "")


def _host(address: str) -> str:
  """An address as gRPC's host:port takes it: IPv6 in brackets."""
  return f"[{address}]" if ":" in address else address


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


def check_port_free(cluster: Cluster) -> None:
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
      raise ClusterError(f"port {port} of this task ({cluster.address}, from {cluster.ports_from}) {why}: "
                         "stop that process, or give the tasks other ports") from None
