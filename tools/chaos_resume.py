r"""Kills a training run at random steps and checks that every resume continues exactly.

  python -m tools.chaos_resume --kills=10    # configs/deep.py:smoke unless --config says otherwise
  python -m tools.chaos_resume --config=configs/deeper.py:smoke --workers=2 --kills=10

First trains the config once without interruption, keeping a checkpoint at every step (the reference).
Then trains it again in another workdir, stopping it at `--kills` random steps and restarting it with the
same command each time. With `--workers=N` > 1 the run is N trainer processes on 127.0.0.1 under
MultiWorkerMirroredStrategy (TF_CONFIG), and each kill hits one worker, the chief included (kills are
dealt round-robin over the workers in a shuffled order), with SIGTERM (graceful: every worker checkpoints
and exits) or SIGKILL (hard: the others lose contact and exit; the run resumes from its last checkpoint);
once, a SIGKILLed non-chief worker is also "replaced": its scratch directory is deleted before the
restart, as on a new machine. Without --config.data_dir a small synthetic dataset is written first.

Two modes:
  - `--deterministic` (the default here): both runs set `deterministic=True`; each resume is checked by
    comparing the next checkpoint the resumed run writes with the reference checkpoint of the same step,
    every variable (the random layers' states and the epoch's image count included), to --atol (0: bit for
    bit). Last line: `resumed identically: K/K`.
  - `--nodeterministic`: the trainer's default mode (`deterministic=False`, any config); what holds there
    is checked: every epoch trains the same images once each across the kills (the trainer's per-epoch
    count and id digest, trainer/loop.EpochAudit, against the reference's) and the run ends at the same step.
    Last line: `exactly once per epoch: E/E`.
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import collections
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from trainer import main as trainer_main
from trainer import workdir as workdir_lib
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "deep.py") + ":smoke"  # the main config, a run in seconds
TIMEOUT = 600  # seconds one segment (every worker's process) may take


def define_flags():
  """Command-line flags; defined only when run as a program, so modules import side by side."""
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "A training config with a steps_per_epoch (the "
                                  ":smoke variants); configs/deep.py:smoke if unset.")
  flags.DEFINE_integer("kills", 10, "Times to stop the run at a random step.", lower_bound=1)
  flags.DEFINE_integer("workers", 1, "Trainer processes: 1 = one process as configured; N > 1 = N workers "
                       "on 127.0.0.1 under MultiWorkerMirroredStrategy.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Seed of the kill steps, targets and signals (not of training).")
  flags.DEFINE_float("atol", 0.0, "Largest difference allowed between resumed and reference variables.",
                     lower_bound=0.0)
  flags.DEFINE_string("workdir", None, "Where the runs go; a temporary directory if unset.")
  flags.DEFINE_bool("deterministic", True, "True: deterministic runs, checked bit for bit at every resume; "
                    "False: the trainer's default mode, checked for each epoch's images (see the docstring).")


def free_ports(n: int) -> list[int]:
  """n ports free on 127.0.0.1, below the kernel's ephemeral range. A port the kernel handed out (bind to
  port 0) is back in that range once closed, so a worker's own outgoing gRPC connections could take it as
  their source port before the other worker listens on it: a rare start-up failure."""
  with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    ephemeral_low = int(f.read().split()[0])
  ports = []
  for port in random.Random().sample(range(max(ephemeral_low - 12000, 1024), ephemeral_low), 50):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    ports.append(port)
    if len(ports) == n:
      return ports
  raise RuntimeError(f"no {n} free ports below {ephemeral_low}")


def cluster_environments(workers: int, vertex: bool = False) -> list[dict]:
  """The environment of each of `workers` processes forming one MultiWorkerMirroredStrategy cluster on
  127.0.0.1 (TF_CONFIG), worker 0 the chief; with `vertex`, TF_CONFIG as Vertex AI writes it: a `chief`
  task, then `worker` tasks, with its `environment` and `job` fields."""
  addresses = [f"127.0.0.1:{p}" for p in free_ports(workers)]
  if not vertex:
    tasks = [{"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}} for i in range(workers)]
  else:
    job = {"worker_pool_specs": [{"replica_count": 1}, {"replica_count": workers - 1}]}
    tasks = [{"cluster": {"chief": addresses[:1], "worker": addresses[1:]}, "environment": "cloud", "job": job,
              "task": {"type": "chief", "index": 0, "trial": ""} if i == 0 else
                      {"type": "worker", "index": i - 1, "trial": ""}} for i in range(workers)]
  return [dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(task)) for task in tasks]


def worker_commands(command: list[str], workers: int, vertex: bool = False) -> list[tuple[list[str], dict]]:
  """(command, environment) of each process: the trainer command itself for 1; for N > 1, N workers of
  one cluster (`cluster_environments`), told --config.strategy=multi_worker, or with `vertex` the same
  command as for one (a cluster of several tasks is multi-worker by itself)."""
  if workers == 1:
    return [(command, dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))]
  flags = [] if vertex else ["--config.strategy=multi_worker"]
  return [(command + flags, env) for env in cluster_environments(workers, vertex)]


class Segment:
  """One start of the run: every worker process, their logs read as they come, and optionally one
  signal sent to one worker when it logs a given train step (or, with `on_line`, a line holding that)."""

  def __init__(self, command: list[str], workers: int = 1, *, target: int = 0, stop_at_step: int | None = None,
               sig: int = signal.SIGTERM, on_line: str | None = None, vertex: bool = False):
    self.trigger = on_line or (f"] step {stop_at_step}/" if stop_at_step else None)
    self.procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   text=True) for cmd, env in worker_commands(command, workers, vertex)]
    self.logs = [[] for _ in self.procs]
    self.sent = threading.Event()
    self._readers = [threading.Thread(target=self._read, args=(i, self.trigger if i == target else None, sig),
                                      daemon=True)
                     for i in range(len(self.procs))]
    for reader in self._readers:
      reader.start()

  def _read(self, index: int, trigger: str | None, sig: int) -> None:
    for line in self.procs[index].stderr:
      self.logs[index].append(line)
      if trigger and not self.sent.is_set() and trigger in line:
        self.procs[index].send_signal(sig)
        self.sent.set()

  def wait(self, timeout: float = TIMEOUT) -> list[int]:
    """Every process's exit code; kills them all and raises if any is still running after `timeout`."""
    deadline = time.monotonic() + timeout
    for i, p in enumerate(self.procs):
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        for q in self.procs:
          q.kill()
        raise RuntimeError(f"worker {i} still ran after {timeout:.0f} s (hung?):\n{self.log(i)[-3000:]}") from None
    for reader in self._readers:
      reader.join(timeout=10)
    return [p.returncode for p in self.procs]

  def log(self, index: int) -> str:
    return "".join(self.logs[index])


def run_until(command: list[str], stop_at_step: int | None = None, sig: int = signal.SIGTERM, *,
              workers: int = 1, target: int = 0, vertex: bool = False) -> list[str]:
  """Runs one segment (`vertex`: see worker_commands); if `stop_at_step`, sends `sig` to worker `target`
  once it logs that step. Checks
  the exit codes: 0 everywhere, but for SIGKILL -9 for the target and for the others 0 or 1 with the
  lost-contact line. Returns each worker's log."""
  segment = Segment(command, workers, target=target, stop_at_step=stop_at_step, sig=sig, vertex=vertex)
  codes = segment.wait()
  if stop_at_step is not None and not segment.sent.is_set():
    raise RuntimeError(f"worker {target} never logged step {stop_at_step}, so no signal was sent:\n"
                       f"{segment.log(target)[-3000:]}")
  killed = stop_at_step is not None and sig == signal.SIGKILL
  for i, code in enumerate(codes):
    last = (segment.log(i).strip().splitlines() or [""])[-1]
    ok = (code == -signal.SIGKILL if i == target else
          code == 0 or (code == 1 and "lost contact with" in last)) if killed else code == 0
    if not ok:
      raise RuntimeError(f"worker {i} exited {code}:\n{segment.log(i)[-3000:]}")
  return [segment.log(i) for i in range(len(codes))]


def checkpoint_values(path: str) -> dict[str, np.ndarray]:
  """Every variable of a checkpoint (model, optimizer, step) by name."""
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if not name.startswith("save_counter") and "OBJECT_GRAPH" not in name}


def max_difference(a: str, b: str) -> float:
  va, vb = checkpoint_values(a), checkpoint_values(b)
  if va.keys() != vb.keys():
    return float("inf")
  return max(float(np.max(np.abs(va[k].astype(np.float64) - vb[k].astype(np.float64))))
             if va[k].size else 0.0 for k in va)


def latest_step(workdir: str) -> int:
  latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  return int(latest.rsplit("-", 1)[1]) if latest else 0


def rewind(workdir: str, step: int) -> None:
  """The workdir as a kill would have left it right after the checkpoint of `step`: the later checkpoints'
  files gone, the checkpoint state file pointing at `step`."""
  directory = os.path.join(workdir, "checkpoints")
  kept = []
  paths = [index[:-len(".index")] for index in tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index"))]
  for path in sorted(paths, key=workdir_lib.checkpoint_step):
    if workdir_lib.checkpoint_step(path) > step:
      for name in tf.io.gfile.glob(path + ".*"):
        tf.io.gfile.remove(name)
    else:
      kept.append(path)
  tf.compat.v1.train.update_checkpoint_state(directory, kept[-1], all_model_checkpoint_paths=kept)


def plan(kills: int, total_steps: int, workers: int, seed: int) -> list[tuple[int, int, int, bool]]:
  """(step, target worker, signal, replace the target first) per kill, in step order: distinct random
  steps in [1, total_steps - 1) (a loop is left after each, so a late SIGTERM still stops before the end);
  targets dealt round-robin in a shuffled order (each worker, the chief included, gets kills // workers
  or one more); signals alternating in a shuffled order; with several workers, one non-chief worker is
  SIGKILLed and replaced."""
  rng = random.Random(seed)
  steps = sorted(rng.sample(range(1, total_steps - 1), kills))
  targets = [i % workers for i in range(kills)]
  signals = [(signal.SIGTERM, signal.SIGKILL)[i % 2] for i in range(kills)]
  rng.shuffle(targets)
  rng.shuffle(signals)
  others = [i for i in range(kills) if targets[i]]
  hard = [i for i in others if signals[i] == signal.SIGKILL] or others[:1]
  replaced = rng.choice(hard) if hard else None
  if replaced is not None:
    signals[replaced] = signal.SIGKILL
  return [(s, t, g, i == replaced) for i, (s, t, g) in enumerate(zip(steps, targets, signals))]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  config_arg, user_overrides = trainer_main.config_arguments(sys.argv[1:], DEFAULT_CONFIG)
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="chaos_resume_")
  overrides = {"deterministic": FLAGS.deterministic, "export": False, "checkpoint_every_steps": 1,
               "log_every_steps": 1, "steps_per_loop": 1}
  for key, value in user_overrides.items():  # the user's own, where they do not clash with the above
    overrides.setdefault(key, value)
  if not config.data_dir:
    from tools import make_tfrecords  # pylint: disable=g-import-not-at-top
    overrides["data_dir"] = os.path.join(root, "data")
    make_tfrecords.make("synthetic", overrides["data_dir"], num_shards=4, val_size=200,
                        synthetic_sizes=(2000, 200))
  # MultiWorkerMirroredStrategy on CPUs: one replica per worker; one process: its logical CPUs.
  replicas = FLAGS.workers if FLAGS.workers > 1 else max(overrides.get("logical_cpus", config.logical_cpus), 1)
  batch = overrides.get("global_batch_size", config.global_batch_size)
  if batch % replicas:  # e.g. the smoke configs' 32 on 3 workers
    overrides["global_batch_size"] = batch = -(-batch // replicas) * replicas
    print(f"global_batch_size {batch}: a multiple of the {replicas} replicas", flush=True)
  total = config.num_epochs * (config.steps_per_epoch or 0)
  if not total:
    raise app.UsageError("give the config a steps_per_epoch (the smoke variants have one)")
  total = max(total, 3 * FLAGS.kills)  # room: a SIGTERM stops at the next loop boundary, a step or so later
  overrides["steps_per_epoch"] = total // config.num_epochs + (total % config.num_epochs > 0)
  total = config.num_epochs * overrides["steps_per_epoch"]
  kills = plan(FLAGS.kills, total, FLAGS.workers, FLAGS.seed)
  report = run(config_arg, overrides, total, kills, FLAGS.workers, root, FLAGS.atol)
  if FLAGS.deterministic:
    print(f"resumed identically: {report.identical}/{len(kills)}")
    sys.exit(0 if report.identical == len(kills) else 1)
  once = report.epochs_once()
  print(f"final step: {report.final_step} (reference {total})")
  print(f"exactly once per epoch: {once}/{config.num_epochs}")
  sys.exit(0 if once == config.num_epochs and report.final_step == total else 1)


EPOCH_LINE = re.compile(r"epoch (\d+) trained (\d+) images, id digest (\w+)")


def epoch_audits(logs: list[str]) -> dict[int, set[tuple[int, str]]]:
  """{epoch: every (images, digest) the trainer logged for it} over all `logs`: an epoch replayed after a
  hard kill is logged again, and must log the same."""
  audits = collections.defaultdict(set)
  for log in logs:
    for epoch, images, digest in EPOCH_LINE.findall(log):
      audits[int(epoch)].add((int(images), digest))
  return audits


@dataclasses.dataclass
class Report:
  """What `run` saw: resumes checked bit for bit, and every worker's log of both runs."""
  identical: int
  reference_logs: list[str]
  chaos_logs: list[str]
  final_step: int

  def epochs_once(self) -> int:
    """Epochs whose killed-and-resumed audits all equal the reference's (one per epoch), each printed."""
    reference, chaos = epoch_audits(self.reference_logs), epoch_audits(self.chaos_logs)
    once = 0
    for epoch in sorted(reference):
      ok = len(reference[epoch]) == 1 and chaos.get(epoch) == reference[epoch]
      once += ok
      print(f"  epoch {epoch}: reference {sorted(reference[epoch])}, killed run {sorted(chaos.get(epoch, []))} -> "
            f"{'same images' if ok else 'DIFFERENT'}", flush=True)
    return once


def run(config_arg: str, overrides: dict, total: int, kills: list[tuple[int, int, int, bool]], workers: int,
        root: str, atol: float, vertex: bool = False) -> Report:
  """The reference run and the run killed as `plan` says, in `root`; prints each kill and check, and
  returns how many kills resumed identically, with the logs. With `vertex`, the killed run's workers are
  a chief and workers as Vertex AI's TF_CONFIG names them (the reference's stay `worker` tasks)."""
  reference, chaos = os.path.join(root, "reference"), os.path.join(root, "chaos")
  print(f"reference run: {workers} worker(s), {total} steps, a checkpoint at every step, in {reference}",
        flush=True)
  reference_logs = run_until(trainer_main.command(config_arg, reference, dict(overrides, keep_checkpoints=total + 1)),
                             workers=workers)
  print(f"kills: {sum(t == 0 for _, t, _, _ in kills)} aimed at the chief, {sum(t > 0 for _, t, _, _ in kills)} "
        f"at other workers; {sum(g == signal.SIGKILL for _, _, g, _ in kills)} SIGKILL; "
        f"{sum(r for *_, r in kills)} replaced worker(s)", flush=True)
  identical, pending, chaos_logs = 0, [], []  # pending: kills whose resume no newer checkpoint has checked yet
  replace = None  # the worker whose scratch directory goes before the next start
  for number, (step, target, sig, replaced) in enumerate(kills + [(None, 0, signal.SIGTERM, False)], 1):
    if replace is not None:
      task = replace - 1 if vertex else replace  # under `vertex`, process 0 is the chief, not worker 0
      shutil.rmtree(os.path.join(chaos, "tmp", f"checkpoints-worker{task}"), ignore_errors=True)
      print(f"  worker {replace} replaced: its scratch directory deleted before the restart", flush=True)
      replace = None
    resumed_from = latest_step(chaos)
    if step and step <= resumed_from:  # the last stop landed at or after this kill's step: take the next one
      step = resumed_from + 1
      if step >= total:
        raise RuntimeError(f"kill {number}: no step left before the end ({total}); give fewer --kills")
    chaos_logs += run_until(trainer_main.command(config_arg, chaos, overrides), step, sig, workers=workers,
                            target=target, vertex=vertex)
    at = latest_step(chaos)
    if pending and at > resumed_from:  # this start resumed and wrote a checkpoint of its own
      diff = max_difference(os.path.join(chaos, "checkpoints", f"ckpt-{at}"),
                            os.path.join(reference, "checkpoints", f"ckpt-{at}"))
      ok = diff <= atol
      identical += len(pending) if ok else 0
      print(f"  resumed from step {resumed_from}, checkpoint at step {at} vs reference: max |diff| {diff:.3g} "
            f"-> {'identical' if ok else 'DIFFERENT'} (checks kill {', '.join(map(str, pending))})", flush=True)
      pending = []
    if step:
      pending.append(number)
      who = "the chief" if target == 0 else f"worker {target}"
      print(f"kill {number}: {signal.Signals(sig).name} to {who} on seeing step {step}; latest checkpoint: "
            f"step {at}", flush=True)
      replace = target if replaced else None
  return Report(identical, reference_logs, chaos_logs, latest_step(chaos))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=trainer_main.flags_parser("chaos_resume"))
