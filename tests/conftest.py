"""Shared fixtures. Splits the CPU into 2 logical devices before TensorFlow initialises, so MirroredStrategy
tests get 2 replicas; single-replica runs use the first device only."""

import gc
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite checks the CPU paths (bit-exact resumes, 2 logical CPUs, worker processes on loopback), also on
# a GPU machine: its GPUs are hidden from the tests and the worker processes they start (two workers on
# one GPU cannot form an NCCL ring), whatever a scheduler set. `python -m tools.doctor` checks the GPU.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

gc.disable()  # as trainer/main.py does around its imports: TensorFlow's objects live as long as the process
try:
  from absl import flags  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  # trainer before TensorFlow, as every entry point: it sets TensorFlow's oneDNN and allocator choices.
  from trainer import distribute  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gc.freeze()
finally:
  gc.enable()

REPLICAS = 2
distribute.configure_devices(REPLICAS)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  """A small synthetic dataset written by the project's own make_tfrecords: 600 train, 200 validation,
  200 test images; 4 train shards, raw encoding."""
  from tools import make_tfrecords  # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp("synthetic"))
  make_tfrecords.make("synthetic", out, num_shards=4, val_size=200, synthetic_sizes=(800, 200))
  return out


@pytest.fixture(scope="session")
def png_dir(tmp_path_factory):
  """The same synthetic images, PNG-encoded."""
  from tools import make_tfrecords  # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp("synthetic_png"))
  make_tfrecords.make("synthetic", out, num_shards=4, val_size=200, encoding="png",
                      synthetic_sizes=(800, 200))
  return out


# The longest files first, so that under pytest-xdist (a file per process at a time) no long one starts last;
# the SLURM tests, which mostly wait on the cluster, first of all, so others' work fills their waits.
LONGEST_FIRST = ("test_slurm.py", "test_multiworker.py", "test_trainer.py", "test_tools.py", "test_elastic.py",
                 "test_gcs.py", "test_steps.py", "test_startup.py", "test_resume.py", "test_make_tfrecords.py",
                 "test_faults.py", "test_serving.py", "test_pipeline.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def pytest_configure(config):
  del config
  tf.get_logger().setLevel("ERROR")


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory, synthetic_dir):
  """train(replicas) -> (workdir, metrics, config): deep.py:smoke (bf16) on the synthetic data, trained and
  exported once per replica count in the session, for every test module that reads a finished run."""
  from configs import deep  # pylint: disable=g-import-not-at-top
  from trainer import train  # pylint: disable=g-import-not-at-top
  runs = {}

  def run(replicas: int):
    if replicas not in runs:
      workdir = str(tmp_path_factory.mktemp(f"run{replicas}"))
      config = deep.get_config("smoke")
      config.update(data_dir=synthetic_dir, logical_cpus=replicas if replicas > 1 else 0, profile_steps=(2, 4),
                    mixed_precision="mixed_bfloat16")  # on every CPU: the export must not inherit it
      config.input.probe_batches = 2
      runs[replicas] = workdir, train.train_and_evaluate(config, workdir), config
    return runs[replicas]
  return run


def _exit_code(value) -> int:
  """The exit code of `sys.exit(value)`, as the interpreter makes it."""
  return 0 if value is None else value if isinstance(value, int) else 1


@pytest.fixture
def trainer_refused(capfd):
  """refused(config, workdir) -> the line `python -m trainer.main` ends with when it refuses `config`: the
  command's body after its flags (trainer.main.run) in the test's process, which must raise its refusal
  (exit 1) with one line and no traceback on stderr (the process's, file descriptor 2). The flags, and the
  exit itself, are other tests' (processes)."""
  from trainer import main as trainer_main  # pylint: disable=g-import-not-at-top

  def refused(config, workdir: str) -> str:
    capfd.readouterr()
    try:
      with pytest.raises(trainer_main.Refused) as raised:
        trainer_main.run(config, workdir)
    finally:
      tf.get_logger().setLevel("ERROR")  # run() sets WARNING for the process
    err = capfd.readouterr().err
    assert raised.value.code == 1 and "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]
  return refused


@pytest.fixture
def program(monkeypatch, capfd):
  """run(tool, *args) -> `python -m tools.TOOL ARGS` in this process, as a finished process: the tool's flags
  defined and parsed on a FlagValues of their own (a bad value raises what absl's app.run prints), then its
  main; its exit code as `app.run` makes it and its output (file descriptors 1 and 2). No new interpreter,
  so no ~2.5 s TensorFlow import per case; an exception main does not turn into its one line fails the
  test, as does a traceback printed."""
  def run(tool, *args) -> subprocess.CompletedProcess:
    argv = [tool.__name__.rsplit(".", 1)[-1], *args]
    monkeypatch.setattr(sys, "argv", argv)  # where a config flag finds its `--config.KEY` overrides
    values = flags.FlagValues()
    tool.define_flags(values)
    monkeypatch.setattr(tool, "FLAGS", values)
    argv = values(argv)
    capfd.readouterr()
    level = tf.get_logger().level  # a tool sets its own for the process
    try:
      code = _exit_code(tool.main(argv))  # app.run exits with what main returns
    except SystemExit as e:
      code = _exit_code(e.code)
      if isinstance(e.code, str):  # printed by the interpreter as it exits
        print(e.code, file=sys.stderr, flush=True)
    finally:
      tf.get_logger().setLevel(level)
    out, err = capfd.readouterr()
    assert "Traceback" not in err, err
    return subprocess.CompletedProcess(argv, code, out, err)
  return run
