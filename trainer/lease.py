"""One run per workdir: the chief holds a lease on it, `WORKDIR/lease.json`, for as long as it runs.

Two trainers on one workdir (a requeued SLURM job starting while the old allocation finishes, two array
tasks given one workdir, the command run in a second terminal) would both write `ckpt-N` and the export
under the same names: checkpoints whose index and data come from different runs. So the first start
takes the lease and every other start is refused in one line naming the holder, until the holder lets
go (at its end) or stops renewing it for `lease_secs` (killed, its node lost). A holder on this host whose
process is gone is passed over at once.

Taking a lease is a create-if-absent, and renewing it or taking over a stale one a compare-and-swap:
locally under a POSIX lock on `WORKDIR/lease.lock`; on gs:// by google-cloud-storage's generation
preconditions (`if_generation_match`), which GCS checks on the server.
The lease also carries the run id, a per-start name the workers compare at start-up (they must see the
chief's lease: the same workdir) and the tf.data service's job is named by.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import threading
import time
import uuid

from absl import logging

from pipeline import fileio
from trainer.faults import TrainingError

FILENAME = "lease.json"
LOCK = "lease.lock"  # local and shared filesystems only
LOCK_WAIT_SECS = 30  # the lock is held for one small read and write; longer means its holder is stopped
_JOB_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "CLOUD_ML_JOB_ID", "JOB_COMPLETION_INDEX")


def holder(run_id: str, lease_secs: float, clock=time.time) -> dict:
  """What this process writes into the lease: who holds it, since when, renewed when."""
  now = clock()
  return {"run_id": run_id, "host": platform.node(), "pid": os.getpid(), "process_space": _process_space(),
          "job": {k: os.environ[k] for k in _JOB_VARIABLES if k in os.environ},
          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "renewed": now, "lease_secs": lease_secs}


def describe(found: dict) -> str:
  """The holder in a few words: `pid 4242 on node17 (SLURM_JOB_ID=991), since 2026-12-05T06:00:00Z`."""
  job = ", ".join(f"{k}={v}" for k, v in sorted(found.get("job", {}).items()))
  return (f"pid {found.get('pid')} on {found.get('host')}{f' ({job})' if job else ''}, since {found.get('since')}, "
          f"run {found.get('run_id')}")


def stale(found: dict, clock=time.time) -> str | None:
  """Why the lease `found` may be taken over (not renewed for its lease_secs, or its holder on this host
  gone), or None while it holds."""
  age = clock() - float(found.get("renewed", 0))
  if age > float(found.get("lease_secs", 0)):
    return f"not renewed for {age:.0f} s (lease_secs={found.get('lease_secs')})"
  if (found.get("host") == platform.node() and found.get("process_space") and
      found.get("process_space") == _process_space() and not _alive(int(found.get("pid", 0)))):
    return f"its process {found.get('pid')} on this host is gone"
  return None


def _process_space() -> str:
  """This boot of this host and this process namespace: where a pid names the same process. Containers
  that share a host name (host networking) do not share pids, and neither do two boots."""
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
      boot = f.read().strip()
    return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
  except OSError:
    return ""  # no /proc: a pid is never taken as proof that the holder is gone


def _alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's: alive
    return True
  return True


class _Local:
  """The lease file on a local or shared filesystem: each read-check-write under a POSIX lock on a file
  beside it (fcntl.lockf, which NFS honours too), the lease itself written by an atomic rename."""

  def __init__(self, path: str):
    self.path = path
    self.lock = os.path.join(os.path.dirname(path), LOCK)  # kept: removing a lock file races its next user

  @contextlib.contextmanager
  def _locked(self):
    with open(self.lock, "a", encoding="utf-8") as f:
      self._wait_for_lock(f)
      try:
        yield
      finally:
        fcntl.lockf(f, fcntl.LOCK_UN)

  def _wait_for_lock(self, f) -> None:
    """Takes the lock, or refuses after LOCK_WAIT_SECS: a holder stopped (SIGSTOP, `scontrol suspend`) or hung
    on its filesystem while inside it keeps it for as long as it is stopped, and a start must not wait on
    it for ever."""
    deadline = time.monotonic() + LOCK_WAIT_SECS
    pause = 0.01
    while True:
      try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
      except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, as the platform answers a held lock
        if time.monotonic() >= deadline:
          break
      time.sleep(pause)
      pause = min(pause * 2, 0.5)
    found, _ = self.read()
    workdir = os.path.dirname(self.path)
    raise TrainingError(f"workdir {workdir}: its lease lock {self.lock} has been held for over {LOCK_WAIT_SECS:g} s "
                        f"by another process, stopped or hung while taking or renewing the lease (the lease names "
                        f"{describe(found) if found else 'nobody'}); resume or end that process, or give another "
                        "workdir")

  def read(self) -> tuple[dict | None, object]:
    try:
      with open(self.path, encoding="utf-8") as f:
        return json.load(f), None
    except FileNotFoundError:
      return None, None
    except ValueError:  # a torn or foreign file: stale by definition
      return {}, None

  def create(self, content: dict) -> bool:
    """Writes `content` unless a lease is there already; whether it did."""
    with self._locked():
      if os.path.exists(self.path):
        return False
      fileio.atomic_write(self.path, json.dumps(content))
      return True

  def replace(self, content: dict, expected: dict | None, token) -> bool:
    """Writes `content` if the lease still holds `expected`; whether it did."""
    del token
    with self._locked():
      if self.read()[0] != expected:
        return False
      fileio.atomic_write(self.path, json.dumps(content))
      return True

  def remove(self, expected_run: str) -> None:
    with self._locked():
      current, _ = self.read()
      if current and current.get("run_id") == expected_run:
        os.remove(self.path)


class _Gcs:
  """The lease object on gs://, through google-cloud-storage and GCS's generation preconditions."""

  def __init__(self, path: str):
    from google.cloud import storage  # pylint: disable=g-import-not-at-top  (only for gs:// workdirs)
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.auth import exceptions as auth  # pylint: disable=g-import-not-at-top
    self._refused = (exceptions.PreconditionFailed, exceptions.NotFound)
    self.failed = (exceptions.GoogleAPIError, auth.GoogleAuthError)  # 403, 429, 5xx after retries, credentials
    bucket, _, name = path[len("gs://"):].partition("/")
    try:  # the project only matters to bucket calls, which the lease makes none of
      client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "-")
    except Exception as e:  # pylint: disable=broad-except  (google.auth's: no credentials, a bad key file)
      raise TrainingError(f"{path}: google-cloud-storage cannot be used ({type(e).__name__}: {e}); it takes the "
                          "credentials gcloud auth application-default login or GOOGLE_APPLICATION_CREDENTIALS "
                          "gives") from None
    self.blob_of = lambda: client.bucket(bucket).blob(name)
    self.path = path

  def read(self) -> tuple[dict | None, object]:
    blob = self.blob_of()
    try:
      data = blob.download_as_bytes()
    except self._refused:
      return None, None
    try:
      return json.loads(data), blob.generation
    except ValueError:
      return {}, blob.generation

  def create(self, content: dict) -> bool:
    try:
      self.blob_of().upload_from_string(json.dumps(content), if_generation_match=0)
      return True
    except self._refused:
      return False

  def replace(self, content: dict, expected: dict | None, token) -> bool:
    del expected
    try:
      self.blob_of().upload_from_string(json.dumps(content), if_generation_match=token)
      return True
    except self._refused:
      return False

  def remove(self, expected_run: str) -> None:
    current, generation = self.read()
    if current and current.get("run_id") == expected_run:
      try:
        self.blob_of().delete(if_generation_match=generation)
      except self._refused:
        pass


@dataclasses.dataclass
class Lease:
  """A lease held by this process; `renew` keeps it (a thread does, every lease_secs / 4), `release` ends it."""
  store: object
  content: dict
  made: tuple[str, ...] = ()  # what taking it made (the workdir, its lock file), removed again on a refusal
  lost: str | None = None
  _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
  _renewing: threading.Lock = dataclasses.field(default_factory=threading.Lock)
  _thread: threading.Thread | None = None

  @property
  def run_id(self) -> str:
    return self.content["run_id"]

  def renew(self, clock=time.time) -> None:
    """Writes a new renewal time if the lease is still this run's; else records that it was lost."""
    current, token = self.store.read()
    if self._taken(current):
      return
    renewed = dict(self.content, renewed=clock())
    with self._renewing:
      if self.store.replace(renewed, current, token):
        self.content = renewed
      else:  # swapped meanwhile: by whom?
        self._taken(self.store.read()[0])

  def _taken(self, current: dict | None) -> bool:
    """Whether `current` (the lease as read) is no longer this run's; records by whom in `lost`."""
    if current and current.get("run_id") == self.run_id:
      return False
    self.lost = f"{describe(current) if current else 'nobody'} holds it now"
    return True

  def keep(self) -> None:
    """Renews the lease in a daemon thread until `release`."""
    def loop():
      while not self._stop.wait(float(self.content["lease_secs"]) / 4):
        try:
          self.renew()
        except Exception as e:  # pylint: disable=broad-except  (storage out of reach: try again later)
          logging.warning("could not renew the lease %s: %s", self.store.path, e)
        if self.lost:
          logging.error("lost the lease on %s: %s", self.store.path, self.lost)
          return
    self._thread = threading.Thread(target=loop, name="lease", daemon=True)
    self._thread.start()

  def lost_why(self) -> str | None:
    """None while this run holds the lease (read again now, not as the last renewal found it); else the
    one line to stop with, before writing anything more into the workdir."""
    if not self.lost:
      try:
        self._taken(self.store.read()[0])
      except Exception as e:  # pylint: disable=broad-except  (storage out of reach: the writes will say)
        logging.warning("could not read the lease %s: %s", self.store.path, e)
    if not self.lost:
      return None
    return (f"this run no longer holds {self.store.path} ({self.lost}): it stopped renewing it for longer than "
            "lease_secs, and another start took the workdir over; nothing more is written")

  def check(self) -> None:
    """Refuses to write into the workdir once another start has taken the lease over."""
    why = self.lost_why()
    if why:
      raise TrainingError(why)

  def release(self, refused: bool = False) -> None:
    """Lets go of the lease (if it is still this run's). `refused`: the start that took it was refused, and
    the workdir is left as it was, without what taking the lease made."""
    self._stop.set()
    if self._thread:
      self._thread.join(timeout=60)  # a renewal in flight would write the lease again after its removal
    try:
      self.store.remove(self.run_id)
      for path in self.made if refused else ():
        if os.path.isdir(path):
          os.rmdir(path)  # only if empty: anything else in it is not ours
        else:
          os.remove(path)
    except Exception as e:  # pylint: disable=broad-except  (the next start passes over a stale lease)
      logging.warning("could not release the lease %s: %s", self.store.path, e)


def acquire(workdir: str, lease_secs: float, clock=time.time) -> Lease:
  """Takes the lease on `workdir` (made if need be) for a new run id, or refuses in one line naming the
  holder. A stale lease (see `stale`) is taken over, with a warning naming it."""
  if isinstance(lease_secs, bool) or not isinstance(lease_secs, (int, float)) or lease_secs <= 0:
    raise TrainingError(f"lease_secs={lease_secs!r} must be a number of seconds > 0")
  path = os.path.join(workdir, FILENAME)
  made = ()
  if path.startswith("gs://"):
    store = _Gcs(path)
  else:
    store = _Local(path)
    made = tuple(p for p in (workdir, store.lock) if not os.path.exists(p))[::-1]  # the lock before its folder
    os.makedirs(workdir, exist_ok=True)
  content = holder(uuid.uuid4().hex[:12], lease_secs, clock)
  try:
    return _take(store, workdir, content, made, clock)
  except getattr(store, "failed", ()) as e:  # google-cloud-storage's own: one line, as any storage refusal
    raise TrainingError(f"{path}: the workdir's lease cannot be taken ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else e!r})") from None


def _take(store, workdir: str, content: dict, made: tuple[str, ...], clock) -> Lease:
  path = store.path
  for _ in range(3):  # a lost race to take over a stale lease: read again
    if store.create(content):
      return Lease(store, content, made)
    current, token = store.read()
    if current is None:
      continue  # released meanwhile
    why = stale(current, clock) if current else "it does not parse"
    if not why:
      raise TrainingError(f"workdir {workdir} is in use by another run: {describe(current)} (its lease "
                          f"{path}, renewed every {float(current['lease_secs']) / 4:g} s); wait for it to end, or "
                          f"give another workdir")
    if store.replace(content, current, token):
      logging.warning("took over the lease on %s from %s: %s", workdir, describe(current) if current else "?", why)
      return Lease(store, content, made)
  raise TrainingError(f"workdir {workdir}: another start took the lease {path} at the same time; wait for it to "
                      "end, or give another workdir")

