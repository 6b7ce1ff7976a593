"""Before the strategy: the tasks of a cluster meet at the chief's address, with a deadline.

MultiWorkerMirroredStrategy waits for every task with no useful limit (one worker of two, started alone,
was still waiting after 900 s), and a task that refuses before its strategy exists (its port in use, its
GPUs unseen) tells nobody. So each task first says hello to the chief over a plain TCP connection on the
chief's own port, with what it found wrong, if anything, and its GPUs; the chief answers everyone at once:
go, or the one line that every task then stops with (a task that refused, one that never came by
`cluster_wait_secs`, two tasks given the same GPU). Only then does each build its strategy, and the chief's
TensorFlow server takes the port the meeting used.
"""

import hashlib
import json
import socket
import time

from trainer import cluster as cluster_lib
from trainer import gpus as gpus_lib

_RETRY_SECS = 0.25  # between a task's tries to reach a chief that is not listening yet
_GRACE_SECS = 10.0  # for a message the other side is about to send


def meet(cluster: cluster_lib.Cluster, *, problem: str | None, facts: dict, wait_secs: float) -> list[dict]:
  """Meets the other tasks of `cluster` (see the module docstring). `problem`: why this task refuses to
  start, or None; `facts`: what the chief checks across tasks (`gpus`: gpus.identity). Returns every task's
  facts, chief first, in task order, when every task came without a problem; else raises ClusterError with
  the line every task stops with."""
  tasks = [f"{job} {i} ({address})" for job, addresses in cluster.spec for i, address in enumerate(addresses)]
  addresses = [address for _, a in cluster.spec for address in a]
  # Which cluster a hello is for: two jobs' tasks meeting at one address (a port two jobs were given) must
  # not count each other.
  key = hashlib.sha256(json.dumps(cluster.spec).encode()).hexdigest()[:16]
  me = addresses.index(cluster.address)
  if me == 0:
    return _as_chief(addresses[0], tasks, key, {"problem": problem, **facts}, wait_secs)
  return _as_task(addresses[0], tasks, key, me, {"problem": problem, **facts}, wait_secs)


def _listen(address: str, name: str, backlog: int) -> socket.socket:
  """The chief's listener on its port, IPv6 and IPv4 alike where the host has both."""
  port = int(address.rsplit(":", 1)[1])
  dual = socket.has_dualstack_ipv6()
  try:
    return socket.create_server(("", port), family=socket.AF_INET6 if dual else socket.AF_INET,
                                dualstack_ipv6=dual, backlog=backlog)
  except OSError as e:
    raise cluster_lib.ClusterError(f"{name}: port {port} cannot be listened on ({e.strerror}): stop the process "
                                   "that holds it, or give the tasks other ports") from None


def _as_chief(address: str, tasks: list[str], key: str, mine: dict, wait_secs: float) -> list[dict]:
  listener = _listen(address, tasks[0], len(tasks))
  heard, connections = {0: mine}, {}
  deadline = time.monotonic() + wait_secs
  try:
    while len(heard) < len(tasks) and time.monotonic() < deadline:
      listener.settimeout(max(deadline - time.monotonic(), 0.01))
      try:
        connection, _ = listener.accept()
      except socket.timeout:
        break
      hello = _Lines(connection).next(min(deadline, time.monotonic() + _GRACE_SECS))
      if not (isinstance(hello, dict) and hello.get("cluster") == key and hello.get("task") in range(1, len(tasks))):
        connection.close()  # not one of this cluster's tasks (another job's, a port scanner)
        continue
      if hello["task"] in connections:  # a task restarted meanwhile: its first connection is dead
        connections.pop(hello["task"]).close()
      heard[hello["task"]] = hello["facts"]
      connections[hello["task"]] = connection
      _send(connection, {"wait": deadline - time.monotonic()})  # it waits for the answer as long as the chief
    answer = _verdict(tasks, heard, wait_secs)
    for connection in connections.values():
      _send(connection, answer)
    for connection in connections.values():  # the task closes first: its side keeps TIME_WAIT, not the port
      connection.settimeout(_GRACE_SECS)
      try:
        connection.recv(1)
      except OSError:
        pass
  finally:
    for connection in connections.values():
      connection.close()
    listener.close()
  return _result(answer, mine)


def _verdict(tasks: list[str], heard: dict, wait_secs: float) -> dict:
  """The chief's answer: every task's facts, or the first reason to stop."""
  for index in sorted(heard):
    if heard[index].get("problem"):
      return {"error": f"{tasks[index]} refused to start: {heard[index]['problem']}"}
  missing = [tasks[i] for i in range(len(tasks)) if i not in heard]
  if missing:
    return {"error": f"{', '.join(missing)} never came within cluster_wait_secs={wait_secs:g}: start every task "
                     f"of the cluster, and check that each can reach {tasks[0]}"}
  facts = [heard[i] for i in range(len(tasks))]
  clash = gpus_lib.shared([f["gpus"] for f in facts], tasks) if all("gpus" in f for f in facts) else None
  return {"error": clash} if clash else {"facts": facts}


def _as_task(chief: str, tasks: list[str], key: str, me: int, mine: dict, wait_secs: float) -> list[dict]:
  """Reaches the chief by `wait_secs` from now, then waits for its answer as long as the chief waits (its
  acknowledgement says how long): a task started long before the chief does not give up early."""
  host, port = chief.rsplit(":", 1)
  host = host.strip("[]")  # an IPv6 address as SLURM's NodeAddr gives it, bracketed in host:port
  deadline = time.monotonic() + wait_secs
  while True:
    try:
      connection = socket.create_connection((host, int(port)), timeout=max(deadline - time.monotonic(), 0.01))
      break
    except OSError as e:
      if time.monotonic() >= deadline:
        raise cluster_lib.ClusterError(f"{tasks[0]} never answered {tasks[me]} within cluster_wait_secs="
                                       f"{wait_secs:g} ({e.strerror or e}): start every task of the cluster, and "
                                       "check that this one can reach it") from None
      time.sleep(_RETRY_SECS)
  with connection:
    _send(connection, {"cluster": key, "task": me, "facts": mine})
    lines = _Lines(connection)
    ack = lines.next(time.monotonic() + _GRACE_SECS)
    answer = None
    if isinstance(ack, dict) and isinstance(ack.get("wait"), (int, float)):
      answer = lines.next(time.monotonic() + max(ack["wait"], 0) + _GRACE_SECS)
  if not isinstance(answer, dict) or not ({"facts", "error"} & set(answer)):
    raise cluster_lib.ClusterError(f"{tasks[0]} answered {tasks[me]}, but not as this trainer's chief of this "
                                   "cluster: another process holds that port, the chief runs another version of "
                                   "the trainer, or it stopped while the tasks met")
  return _result(answer, mine)


def _result(answer: dict, mine: dict) -> list[dict]:
  if "error" in answer:
    if mine.get("problem"):  # this task's own refusal is the line it stops with
      raise cluster_lib.ClusterError(mine["problem"])
    raise cluster_lib.ClusterError(answer["error"])
  return answer["facts"]


def _send(connection: socket.socket, message: dict) -> None:
  try:
    connection.sendall(json.dumps(message).encode() + b"\n")
  except OSError:
    pass  # a task that went away meanwhile finds out on its own


class _Lines:
  """JSON messages, one a line, from a connection: two may come in one read (the chief's acknowledgement
  and its answer, sent at once when the last task arrives)."""

  def __init__(self, connection: socket.socket):
    self._connection, self._buffer = connection, b""

  def next(self, deadline: float):
    """The next message by `deadline` (time.monotonic()), or None."""
    try:
      while b"\n" not in self._buffer and len(self._buffer) < 1 << 16:
        self._connection.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = self._connection.recv(4096)
        if not chunk:
          break
        self._buffer += chunk
      line, _, self._buffer = self._buffer.partition(b"\n")
      return json.loads(line)
    except (OSError, ValueError):
      return None
