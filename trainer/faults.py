"""What goes wrong while training, turned into something a person can act on: stop requests
(SIGTERM/SIGINT) become a checkpoint and a clean exit, TensorFlow's data and peer errors become one line."""

import contextlib
import re
import signal
import threading

import tensorflow as tf

from trainer import distribute


class TrainingError(RuntimeError):
  """Training cannot go on (bad config for the hardware, non-finite loss); the message says why."""


# What a peer's loss looks like (the coordination service's heartbeats, an aborted collective), as against
# other UnavailableErrors: a gs:// bucket or a tf.data service that cannot be reached.
PEER_SIGNS = ("unhealthy", "heartbeat", "collective ops is aborted", "coordination service")
NOT_PEER_SIGNS = ("dispatcher", "data service", "http request", "curl", "gs://", "googleapis")
# Where an error of the input pipeline comes from: a tf.data function or the iterator the step reads.
INPUT_SIGNS = ("user-defined function passed to", "IteratorGetNext", "corrupted record")


def as_training_error(error: BaseException) -> BaseException:
  """The one line a person can act on for what TensorFlow raises for a bad record, a lost peer or a
  dispatcher without its worker list; any other error as it is."""
  if not isinstance(error, tf.errors.OpError):
    return error
  message = error.message
  if isinstance(error, tf.errors.UnavailableError) and _lost_peer(message):
    culprits = message.split("unhealthy", 1)[-1]  # the tasks named after "... are unhealthy", if any
    tasks = sorted(set(re.findall(r"/job:\w+/replica:\d+/task:\d+", culprits)))
    return TrainingError(f"lost contact with {', '.join(tasks) or 'another worker'}; restart every worker with "
                         "the same command to resume from the last checkpoint")
  if isinstance(error, tf.errors.NotFoundError) and "is not in the workers list" in message:
    return TrainingError("input.data_service: the tf.data service dispatcher must list its workers "
                         "(DispatcherConfig(worker_addresses=[...])), so that each makes its own share of the "
                         "batches and every batch is made once")
  if isinstance(error, tf.errors.DataLossError) or (isinstance(error, tf.errors.InvalidArgumentError) and
                                                    any(sign in message for sign in INPUT_SIGNS)):
    return TrainingError(f"bad training data: {first_line(message)}")
  return error


def _lost_peer(message: str) -> bool:
  message = message.lower()
  return any(s in message for s in PEER_SIGNS) and not any(s in message for s in NOT_PEER_SIGNS)


def describe(error: BaseException) -> str:
  """What to tell a person about `error`: a TrainingError's (or any other error's) message; for another
  TensorFlow error, one line: its type, the op it came from (when the message names one) and the first
  line of its message."""
  error = as_training_error(error)
  if not isinstance(error, tf.errors.OpError):
    return str(error).strip() or type(error).__name__
  node = re.search(r"\{\{node ([^}]+)\}\}", error.message)
  where = f" in op {node.group(1)}" if node else (f" in op {error.op.name}" if error.op is not None else "")
  return f"{type(error).__name__}{where}: {first_line(error.message)}"


@contextlib.contextmanager
def data_errors_as_training_errors():
  """Raises `as_training_error` of what is raised inside, if that is a TrainingError."""
  try:
    yield
  except tf.errors.OpError as e:
    translated = as_training_error(e)
    if translated is e:
      raise
    raise translated from None


def first_line(message: str) -> str:
  """The informative part of a TensorFlow error message."""
  message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message).strip()
  line = message.splitlines()[0] if message else ""
  match = re.search(r"assertion failed: \[(.*)\]$", line)
  if match:
    return match.group(1)
  line = re.sub(r"^Error in user-defined function passed to .*? transformation with iterator: \S+: ", "", line)
  return line.replace("Name: <unknown>, ", "")


class StopRequest:
  """SIGTERM/SIGINT ask the loop to stop at the next loop boundary: the steps in flight finish, a
  checkpoint is written, and the process exits 0. Restarting the same command resumes exactly there."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signal = signal.Signals(signum).name

  @property
  def cause(self) -> str:
    """What asked this worker to stop: the signal's name, or another worker's request."""
    return self.signal or "another worker's stop request"

  def agreed(self, strategy) -> bool:
    """True on every worker if any worker was asked to stop, so that all workers stop after the same
    step and take the same path after it (a collective: every worker asks at the same loop boundary)."""
    return distribute.any_worker(strategy, self.signal is not None)
