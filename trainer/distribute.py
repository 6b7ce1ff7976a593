"""Devices and the tf.distribute strategy, chosen by the config."""

import functools

from absl import logging
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context  # the coordination service's barrier: no public API

from pipeline import cpus
from trainer import cluster as cluster_lib
from trainer import gpus as gpus_lib
from trainer import rendezvous


def configure_devices(logical_cpus: int) -> None:
  """Splits the CPU into `logical_cpus` devices so MirroredStrategy has that many replicas without GPUs.

  Must run before TensorFlow initialises its devices; a later call with the same count is a no-op.
  """
  if logical_cpus <= 0:
    return
  cpu = tf.config.list_physical_devices("CPU")[0]
  wanted = [tf.config.LogicalDeviceConfiguration()] * logical_cpus
  try:
    tf.config.set_logical_device_configuration(cpu, wanted)
  except RuntimeError as e:  # already initialised: fine if it already has the devices asked for
    if len(tf.config.list_logical_devices("CPU")) != logical_cpus:
      raise ValueError(f"logical_cpus={logical_cpus}: TensorFlow's devices were initialised already with "
                       f"{len(tf.config.list_logical_devices('CPU'))} CPU devices") from e


def share_gpus(gpus) -> None:
  """GPU memory taken as needed, not all of it at start, so that several processes on one GPU (two
  workers in a test, an evaluation beside training) can run. Before TensorFlow initialises its devices."""
  for gpu in gpus:
    try:
      tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # initialised already: it keeps the setting it started with
      pass


def make_strategy(config) -> tf.distribute.Strategy:
  """`config.strategy` over `config.cluster` (trainer/cluster.py): on a cluster of several tasks (TF_CONFIG,
  a SLURM step) MultiWorkerMirroredStrategy, unless `one_device` was asked for; on one node, mirrored (all
  local GPUs, or the logical CPUs), multi_worker (one worker) or one_device.

  One strategy per kind per process: a second MirroredStrategy over the same devices would reuse the
  process-wide collective instance keys and clash with the first, and MultiWorkerMirroredStrategy may be
  made only once.
  """
  found = cluster_lib.resolve(config.cluster, config.cluster_port)
  if found.workers > 1 and config.strategy == "one_device":
    raise cluster_lib.ClusterError(f"strategy=one_device cannot train on the {found.workers} tasks of {found.kind}; "
                                   "give --config.strategy=mirrored (or multi_worker), or --config.cluster=local")
  kind = "multi_worker" if found.workers > 1 else config.strategy
  _check_gpus_and_meet(found, bool(config.allow_cpu), config.cluster_wait_secs)
  return _strategy(kind, config.logical_cpus, found)


@functools.cache
def _check_gpus_and_meet(cluster: cluster_lib.Cluster, allow_cpu: bool, wait_secs: float) -> None:
  """This task's checks before its strategy exists (its port free, the GPUs it was given seen), then, on a
  cluster, the meeting with the other tasks (trainer/rendezvous.py): any task's refusal stops every task,
  in one line, within `wait_secs`. Once per process: afterwards this process's own server holds the port."""
  expected, seen = gpus_lib.given(), gpus_lib.seen()
  logging.info("GPUs: %s%s", gpus_lib.describe(seen),
               f" (given by {expected.variable}={expected.value})" if expected else "")
  short = gpus_lib.mismatch(expected, len(seen))
  problem = gpus_lib.GpuError(short) if short and not allow_cpu else None
  if short and allow_cpu:
    logging.warning("allow_cpu=True: training on %s although %s=%s", gpus_lib.describe(seen) if seen else "the CPU",
                    expected.variable, expected.value)
  if cluster.workers > 1:
    if not isinstance(wait_secs, (int, float)) or isinstance(wait_secs, bool) or wait_secs <= 0:
      raise cluster_lib.ClusterError(f"cluster_wait_secs={wait_secs!r} must be a number of seconds > 0")
    try:
      cluster_lib.check_port_free(cluster)
    except cluster_lib.ClusterError as e:
      if cluster.address == cluster.spec[0][1][0]:
        raise  # the chief meets the others on that port: they find it gone and stop at their deadline
      problem = problem or e
    rendezvous.meet(cluster, problem=str(problem) if problem else None,
                    facts={"gpus": gpus_lib.identity(expected, len(seen))}, wait_secs=wait_secs)
  if problem:
    raise problem


@functools.cache
def _strategy(kind: str, logical_cpus: int, cluster: cluster_lib.Cluster) -> tf.distribute.Strategy:
  configure_devices(logical_cpus)
  # Physical, not logical, devices: listing logical ones starts TensorFlow's runtime, after which
  # MultiWorkerMirroredStrategy can no longer configure its collectives.
  gpus = tf.config.list_physical_devices("GPU")
  share_gpus(gpus)
  if kind == "mirrored":
    if gpus and not logical_cpus:
      return tf.distribute.MirroredStrategy()  # every local GPU, NCCL all-reduce
    if gpus:  # asked for logical CPUs: they, even beside a GPU (2 replicas on a 1-GPU machine)
      logging.warning("logical_cpus=%d: training on %d logical CPU devices, not on the %d GPU(s)", logical_cpus,
                      logical_cpus, len(gpus))
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(max(logical_cpus, 1))])
  if kind == "multi_worker":
    implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL if gpus
                      else tf.distribute.experimental.CommunicationImplementation.RING)
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=cluster.resolver(len(gpus)),
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation))
  if kind == "one_device":
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
  raise ValueError(f"strategy={kind!r} is not one of: mirrored, multi_worker, one_device")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Only the chief writes summaries, exports and config dumps."""
  resolver = strategy.cluster_resolver
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                  "chief" not in resolver.cluster_spec().as_dict())


def _sums_over_replicas(strategy: tf.distribute.Strategy, values) -> np.ndarray:
  """Each of `values` summed over every replica of every worker process (a collective under
  MultiWorkerMirroredStrategy: every worker must call it at the same point). On one machine, where one
  Python process decides for all its replicas, the values themselves."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return np.asarray(values, np.float64)
  per_replica = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(values, tf.float64))
  return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()


def from_chief(strategy: tf.distribute.Strategy, array: np.ndarray) -> np.ndarray:
  """The chief's float32 `array` on every worker, bit for bit (a collective, like `any_worker`): for values
  each worker computes for itself from the same data, which machines of a cluster may give in different
  last bits (a float64 matmul split by the thread count, LAPACK per CPU), where every worker must start
  from the same (the lookahead and EMA averages start from them, and only the chief's are checkpointed)."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return array
  if np.dtype(array.dtype).itemsize > 4:  # the chief's replicas' float64 sum of it must be exact
    raise ValueError(f"from_chief takes float32 or narrower, not {array.dtype}")
  chief = worker_index(strategy)[0] == 0
  values = np.ravel(array).astype(np.float64) if chief else np.zeros(array.size)  # not x * 0: inf * 0 is nan
  summed = _sums_over_replicas(strategy, np.append(values, float(chief)))
  return (summed[:-1] / summed[-1]).astype(array.dtype).reshape(array.shape)  # / the chief's replicas: exact


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
  """True on every worker if `flag` is true on any: a decision all workers then take together."""
  return bool(_sums_over_replicas(strategy, [1.0 if flag else 0.0])[0] > 0)


def same_on_every_worker(strategy: tf.distribute.Strategy, value: int) -> bool:
  """Whether every worker holds the same integer `value`; the same answer on every worker."""
  total, squares, count = _sums_over_replicas(strategy, [float(value), float(value) ** 2, 1.0])
  return count * squares == total * total  # Cauchy-Schwarz: equality iff all values are equal


def refuse_together(strategy: tf.distribute.Strategy, error: BaseException) -> BaseException:
  """`error`, for every worker to raise after a vote (`any_worker`, `gather_texts`...) decided that all refuse:
  first waits, up to REFUSE_SECS, until every worker is here. A worker that raised and exited as soon as the
  vote returned could cut a peer's share of it in flight (TensorFlow sends a RecvBuf answer after the
  sender's op returned), and that peer then said "lost contact" instead of the agreed refusal. The wait's own
  errors are ignored: the refusal is decided."""
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and context.context().coordination_service:
    global _refusals
    _refusals += 1  # every worker votes, and refuses, in the same order: the same barrier name on all
    try:
      context.context().wait_at_barrier(f"trainer-refusal-{_refusals}", int(REFUSE_SECS * 1000))
    except (tf.errors.OpError, RuntimeError, ValueError):
      pass
  return error


REFUSE_SECS = 30
_refusals = 0


def worker_index(strategy: tf.distribute.Strategy) -> tuple[int, int]:
  """(this worker's index, the number of workers): the chief is 0, then the workers in TF_CONFIG's order."""
  resolver = strategy.cluster_resolver
  cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
  if not cluster:
    return 0, 1
  chiefs = len(cluster.get("chief", []))
  index = resolver.task_id if resolver.task_type == "chief" else chiefs + resolver.task_id
  return index, chiefs + len(cluster.get("worker", []))


def gather_texts(strategy: tf.distribute.Strategy, text: str) -> list[str]:
  """`text` of every worker process, in `worker_index` order, on every worker (a collective, like
  `any_worker`): each worker's bytes in its own row of a matrix summed over the replicas."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return [text]
  index, workers = worker_index(strategy)
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = _sums_over_replicas(strategy, list(np.eye(workers)[index] * (len(data) + 1)))  # +1: a row per replica
  rows = np.zeros([workers, int(lengths.max())])
  rows[index, 0] = 1.0  # counts this worker's replicas, to divide the sums by
  rows[index, 1:len(data) + 1] = data
  summed = _sums_over_replicas(strategy, list(rows.ravel())).reshape(rows.shape)
  texts = []
  for row, length in zip(summed, lengths):
    replicas = row[0]
    texts.append(bytes(np.rint(row[1:int(length / replicas)] / replicas).astype(np.uint8)).decode())
  return texts


def worker_id(strategy: tf.distribute.Strategy) -> str:
  resolver = strategy.cluster_resolver
  if resolver is None or resolver.task_type is None:
    return "0"
  return f"{resolver.task_type}{resolver.task_id}"


def describe(strategy: tf.distribute.Strategy) -> dict:
  """What a run ran on, for the log line and run.json."""
  return {
      "strategy": type(strategy).__name__,
      "replicas": strategy.num_replicas_in_sync,
      "workers": strategy.num_replicas_in_sync // len(strategy.extended.worker_devices),  # input pipelines
      "devices": list(strategy.extended.worker_devices),
      "gpus": [d.name for d in tf.config.list_logical_devices("GPU")],
      "cluster": _cluster_of(strategy),
  }


def _cluster_of(strategy: tf.distribute.Strategy) -> dict | None:
  resolver = strategy.cluster_resolver
  if resolver is None or not resolver.cluster_spec().as_dict():
    return None
  return {"spec": resolver.cluster_spec().as_dict(), "task": {"type": resolver.task_type, "index": resolver.task_id}}


def log_devices(strategy: tf.distribute.Strategy) -> None:
  """The strategy's devices, and the input pipeline's threads (pipeline/cpus.py) beside them."""
  info, usable = describe(strategy), cpus.usable()
  logging.info("%s with %d replica(s) on %s; input threads: %d (%s)", info["strategy"], info["replicas"],
               ", ".join(info["devices"]), usable.count, usable.why)
