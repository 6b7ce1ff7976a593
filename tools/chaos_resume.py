r"""Kills a training run at random steps and checks that every resume continues exactly.

  python -m tools.chaos_resume --config=configs/deep.py:smoke --kills=10

First trains the config once without interruption, keeping a checkpoint at every step (the reference).
Then trains it again in another workdir, stopping the process at `--kills` random steps, each time with
SIGTERM (graceful: the trainer checkpoints and exits) or SIGKILL (hard: the run resumes from its last
checkpoint), and restarting it. Each resume is checked by comparing the next checkpoint the resumed
process writes with the reference checkpoint of the same step (every variable, to --atol). The run is
`deterministic`; without --config.data_dir a small synthetic dataset is written first.
Last line: `resumed identically: N/K`.
"""

import os
import random
import signal
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from trainer import main as trainer_main
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags():
  """Command-line flags; defined only when run as a program, so modules import side by side."""
  config_flags.DEFINE_config_file("config", None, "A training config, e.g. configs/deep.py:smoke.")
  flags.DEFINE_integer("kills", 10, "Times to stop the run at a random step.")
  flags.DEFINE_integer("seed", 0, "Seed of the kill steps and signals (not of training).")
  flags.DEFINE_float("atol", 1e-6, "Largest difference allowed between resumed and reference variables.")
  flags.DEFINE_string("workdir", None, "Where the runs go; a temporary directory if unset.")
  flags.mark_flags_as_required(["config"])


def run_until(command: list[str], stop_at_step: int | None = None, sig: int = signal.SIGTERM) -> str:
  """Runs the trainer; if `stop_at_step`, sends `sig` once it logs that step. Returns its log."""
  proc = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  log, sent = [], False
  for line in proc.stderr:
    log.append(line)
    if stop_at_step is not None and not sent and f"] step {stop_at_step}/" in line:
      proc.send_signal(sig)
      sent = True
  proc.wait(timeout=600)
  text = "".join(log)
  expected = (0,) if stop_at_step is None or sig == signal.SIGTERM else (-signal.SIGKILL,)
  if proc.returncode not in expected:
    raise RuntimeError(f"trainer exited {proc.returncode}:\n{text[-3000:]}")
  return text


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  config_arg, user_overrides = trainer_main.config_arguments(sys.argv[1:])
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="chaos_resume_")
  overrides = {"deterministic": True, "export": False, "checkpoint_every_steps": 1, "log_every_steps": 1,
               "steps_per_loop": 1}
  for key, value in user_overrides.items():  # the user's own, where they do not clash with the above
    overrides.setdefault(key, value)
  if not config.data_dir:
    from tools import make_tfrecords  # pylint: disable=g-import-not-at-top
    overrides["data_dir"] = os.path.join(root, "data")
    make_tfrecords.make("synthetic", overrides["data_dir"], num_shards=4, val_size=200,
                        synthetic_sizes=(2000, 200))
  total = config.num_epochs * (config.steps_per_epoch or 0)
  if not total:
    raise app.UsageError("give the config a steps_per_epoch (the smoke variants have one)")
  total = max(total, FLAGS.kills + 2)
  overrides["steps_per_epoch"] = total // config.num_epochs + (total % config.num_epochs > 0)
  total = config.num_epochs * overrides["steps_per_epoch"]
  reference, chaos = os.path.join(root, "reference"), os.path.join(root, "chaos")
  print(f"reference run: {total} steps, a checkpoint at every step, in {reference}", flush=True)
  run_until(trainer_main.command(config_arg, reference, dict(overrides, keep_checkpoints=total + 1)))

  rng = random.Random(FLAGS.seed)
  kill_steps = sorted(rng.sample(range(1, total), FLAGS.kills))
  identical, pending = 0, []  # kills whose resume no newer checkpoint has checked yet
  for step in kill_steps + [None]:
    resumed_from = latest_step(chaos)
    sig = rng.choice([signal.SIGTERM, signal.SIGKILL]) if step else signal.SIGTERM
    run_until(trainer_main.command(config_arg, chaos, overrides), step, sig)
    at = latest_step(chaos)
    if pending and at > resumed_from:  # this process resumed and wrote a checkpoint of its own
      diff = max_difference(os.path.join(chaos, "checkpoints", f"ckpt-{at}"),
                            os.path.join(reference, "checkpoints", f"ckpt-{at}"))
      ok = diff <= FLAGS.atol
      identical += len(pending) if ok else 0
      print(f"  resumed from step {resumed_from}, checkpoint at step {at} vs reference: max |diff| {diff:.3g} "
            f"-> {'identical' if ok else 'DIFFERENT'} (checks kill {', '.join(map(str, pending))})", flush=True)
      pending = []
    if step:
      pending.append(kill_steps.index(step) + 1)
      print(f"kill {kill_steps.index(step) + 1}: {signal.Signals(sig).name} on seeing step {step}; "
            f"latest checkpoint: step {at}", flush=True)
  print(f"resumed identically: {identical}/{FLAGS.kills}")
  sys.exit(0 if identical == FLAGS.kills else 1)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=trainer_main.flags_parser("chaos_resume"))
