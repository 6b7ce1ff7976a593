r"""Trains a config and exports a SavedModel.

  python -m trainer.main --config=configs/deep.py --workdir=/tmp/deep --config.data_dir=/tmp/c10
"""

import gc
import os
import re
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Command-line flags; defined only when run as a program (a test may define them on a FlagValues of its
  own)."""
  config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/deep.py or configs/deep.py:smoke.",
                                  flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, summaries and the export go here (local or gs://).",
                      flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def command(config_arg: str, workdir: str, overrides: dict) -> list[str]:
  """The command line that runs this trainer on `--config=config_arg` with `--config.KEY=VALUE` overrides."""
  return ([sys.executable, "-m", "trainer.main", f"--config={config_arg}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


def config_arguments(argv: list[str], default: str | None = None) -> tuple[str, dict]:
  """From a tool's own command line: the `--config` value (`default` when there is none) and its
  `--config.KEY` overrides (typed), to pass on to `command`. Parsed as absl parses them (`--config X`,
  `--config=X`, `--config.seed 3` alike); the tool's other flags are left alone."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default, "", flag_values=values, sys_argv=["tool", *argv])
  values(["tool", *argv], known_only=True)
  return config_flags.get_config_filename(values["config"]), dict(config_flags.get_override_values(values["config"]))


def _config_value(argv: list[str]) -> str:
  """The `--config` value on a command line as given, the last one as absl takes it (the flag itself may
  not have been parsed)."""
  value = ""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def require_paths(names: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Marks the tools' path flags `names` required and not empty: "" would name the current directory."""
  flags.mark_flags_as_required(names, flag_values=flag_values)
  for name in names:
    flags.register_validator(name, lambda path: path is None or bool(path), message="empty: give a path",
                             flag_values=flag_values)


def flags_parser(program: str):
  """An absl `flags_parser` that turns bad flags and bad `--config.KEY` overrides into one line, exit 2."""
  def parse(argv):
    try:
      rest = FLAGS(argv)
      if "config" in FLAGS and FLAGS["config"].present:
        FLAGS.config.keys()  # a file that failed to load is a placeholder that raises OSError on use
      return rest
    except OSError as e:  # the config file cannot be read (while parsing its overrides, or on first use)
      message = f"--config={_config_value(argv)}: {str(e).strip().splitlines()[-1].strip()}"
    except SyntaxError as e:  # the config file is not Python
      message = f"--config={_config_value(argv)}: not a Python config file ({e.msg}, line {e.lineno})"
    except flags.Error as e:
      message = str(e)
      if "Traceback (most recent call last)" in message:  # raised inside a config file's get_config(ARG)
        lines = [line for line in message.splitlines() if line.strip()]
        message = f"{lines[0].split(': Error whilst parsing')[0]}: {re.sub(r'^ValueError: ', '', lines[-1])}"
    except (AttributeError, KeyError) as e:  # what ml_collections raises for an unknown --config.KEY
      text = str(e).encode().decode("unicode_escape").strip("'\" ")
      key = re.match(r"'?([\w.]+)'?", text)
      guesses = re.findall(r'Did you mean "([^"]+)"', text)
      message = f"unknown config key {key.group(1) if key else text!r}"
      message += f"; close matches: {', '.join(guesses)}" if guesses else ""
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)
  return parse


class Refused(SystemExit):
  """A refusal or a failure, its one line printed: exit 1."""


def run(config, workdir: str) -> int:
  """The command after its flags (for main, and for tests in their own process): trains `config` in
  `workdir` and returns the exit code, 0, or `config.stop_exit_code` for a run a stop request checkpointed
  before its end (so that a Kubernetes Job does not count it as complete). A refusal or a failure prints one
  line, `trainer: error: ...`, and raises Refused (a SystemExit)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pipeline import manifest  # pylint: disable=g-import-not-at-top
  from trainer import faults  # pylint: disable=g-import-not-at-top
  from trainer import train  # pylint: disable=g-import-not-at-top
  imported = time.monotonic()  # run.json's timing counts start-up from here
  tf.get_logger().setLevel("WARNING")  # tf.distribute logs every all-reduce it builds at INFO
  try:
    metrics = train.train_and_evaluate(config, workdir, since=imported)
  except (manifest.ManifestError, train.TrainingError, ValueError, tf.errors.OpError) as e:
    print(f"trainer: error: {faults.describe(e)}", file=sys.stderr, flush=True)
    raise Refused(1) from None
  return config.stop_exit_code if "stopped_by" in metrics else 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # TensorFlow only now, after the flags and the config: a mistyped flag or key is refused in ~1 s, not
  # after TensorFlow's ~2.5 s import (and tools import this module for `command` and `flags_parser`). Its
  # import-time objects live as long as the process: the garbage collector skips them while they are made
  # and, frozen, in every full collection after, the interpreter's last at exit included (BUILD.md, Install).
  gc.disable()
  try:
    from trainer import train  # pylint: disable=g-import-not-at-top,unused-import
    gc.freeze()
  finally:
    gc.enable()
  try:
    code = run(FLAGS.config, FLAGS.workdir)
  except Refused:
    # At once: after a lost peer, the interpreter's shutdown met tf.distribute's thread pools half torn
    # down and printed a traceback under the one line (seen with 3 workers). Everything is written by now.
    os._exit(1)  # pylint: disable=protected-access
  sys.exit(code)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=flags_parser("trainer"))
