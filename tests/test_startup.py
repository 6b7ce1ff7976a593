"""Start-up as a cluster's first day meets it: GPUs given but not seen, a task that never comes, a task that
refuses before its strategy exists, two tasks given one GPU."""

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import trainer_overrides
from tools import chaos_resume
from trainer import cluster as cluster_lib
from trainer import cpu
from trainer import gpus
from trainer import lease as lease_lib
from trainer import main as trainer_main
from trainer import precision
from trainer import rendezvous

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/deep.py:smoke"


@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, ("CUDA_VISIBLE_DEVICES", ("0", "1"))),
    ({"CUDA_VISIBLE_DEVICES": "GPU-8f6c,GPU-1a2b"}, ("CUDA_VISIBLE_DEVICES", ("GPU-8f6c", "GPU-1a2b"))),
    ({"CUDA_VISIBLE_DEVICES": "", "SLURM_JOB_GPUS": "0,1"}, None),  # hidden on purpose (as these tests do)
    ({"CUDA_VISIBLE_DEVICES": "-1", "SLURM_JOB_GPUS": "0"}, None),
    ({"SLURM_STEP_GPUS": "2,3", "SLURM_JOB_GPUS": "0,1,2,3"}, ("SLURM_STEP_GPUS", ("2", "3"))),
    ({"SLURM_GPUS_ON_NODE": "4"}, ("SLURM_GPUS_ON_NODE", ("0", "1", "2", "3"))),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"NVIDIA_VISIBLE_DEVICES": "all"}, None),  # the CUDA images' default, also on machines without a GPU
    ({"NVIDIA_VISIBLE_DEVICES": "void"}, None),
    ({"NVIDIA_VISIBLE_DEVICES": "1"}, ("NVIDIA_VISIBLE_DEVICES", ("1",))),
])
def test_the_gpus_the_environment_gives(environ, expected):
  found = gpus.given(environ)
  assert (found and (found.variable, found.ids)) == expected


def test_fewer_gpus_seen_than_given_is_one_line_naming_the_variable():
  given = gpus.given({"SLURM_STEP_GPUS": "0,1"})
  assert gpus.mismatch(given, 2) is None and gpus.mismatch(None, 0) is None
  line = gpus.mismatch(given, 1)
  assert line.startswith("SLURM_STEP_GPUS=0,1 gives this process 2 GPU(s), but TensorFlow sees 1: ")
  assert line.endswith("give --config.allow_cpu=True to train on the 1 GPU(s) it sees anyway") and "\n" not in line


def test_two_tasks_of_one_host_given_one_gpu_are_named():
  names = ["worker 0 (a:1)", "worker 1 (a:2)", "worker 2 (b:1)"]
  apart = [{"host": "a", "gpus": ["0"]}, {"host": "a", "gpus": ["1"]}, {"host": "b", "gpus": ["0"]}]
  assert gpus.shared(apart, names) is None
  together = [{"host": "a", "gpus": ["0", "1"]}, {"host": "a", "gpus": ["1"]}, {"host": "b", "gpus": ["0"]}]
  assert gpus.shared(together, names).startswith("worker 0 (a:1) and worker 1 (a:2) on a were both given GPU 1: ")


def _run(*args, env=None, timeout=120):
  return subprocess.run([sys.executable, "-m", "trainer.main", f"--config={SMOKE}", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gpus_given_and_not_seen_refuse_unless_the_cpu_is_allowed(synthetic_dir, tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1")
  refused = _run(f"--workdir={workdir}", f"--config.data_dir={synthetic_dir}", env=env)
  assert refused.returncode == 1 and "Traceback" not in refused.stderr
  assert refused.stderr.strip().splitlines()[-1].startswith(
      "trainer: error: CUDA_VISIBLE_DEVICES=0,1 gives this process 2 GPU(s), but TensorFlow sees none: ")
  assert not os.path.exists(workdir)
  allowed = _run(f"--workdir={workdir}", f"--config.data_dir={synthetic_dir}", "--config.allow_cpu=True",
                 "--config.num_epochs=1", "--config.export=False",
                 *(f"--config.{k}={v}" for k, v in trainer_overrides.LEAN.items()), env=env)
  assert allowed.returncode == 0, allowed.stderr[-2000:]
  assert "allow_cpu=True: training on the CPU although CUDA_VISIBLE_DEVICES=0,1" in allowed.stderr


def _cluster(addresses: list[str], index: int) -> cluster_lib.Cluster:
  return cluster_lib.Cluster("tf_config", (("worker", tuple(addresses)),), "worker", index)


def test_the_chief_names_a_task_that_never_came():
  addresses = [f"127.0.0.1:{p}" for p in chaos_resume.free_ports(2)]
  start = time.monotonic()
  with pytest.raises(cluster_lib.ClusterError, match=r"^worker 1 \(127\.0\.0\.1:\d+\) never came within "
                                                      r"cluster_wait_secs=1: start every task"):
    rendezvous.meet(_cluster(addresses, 0), problem=None, facts={}, wait_secs=1)
  assert time.monotonic() - start < 5


def test_a_task_whose_chief_never_came_stops_at_the_deadline():
  addresses = [f"127.0.0.1:{p}" for p in chaos_resume.free_ports(2)]
  with pytest.raises(cluster_lib.ClusterError, match=r"^worker 0 \(127\.0\.0\.1:\d+\) never answered worker 1 "):
    rendezvous.meet(_cluster(addresses, 1), problem=None, facts={}, wait_secs=1)


def test_a_listener_that_is_not_the_chief_is_named():
  with socket.socket() as squatter:
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    addresses = [f"127.0.0.1:{squatter.getsockname()[1]}", f"127.0.0.1:{chaos_resume.free_ports(1)[0]}"]
    with pytest.raises(cluster_lib.ClusterError, match="not as this trainer's chief"):
      rendezvous.meet(_cluster(addresses, 1), problem=None, facts={}, wait_secs=1)


@pytest.mark.parametrize("round_", range(3))
def test_two_tasks_meet_and_each_learns_every_task_s_facts(round_):
  """The chief's acknowledgement and its answer, sent at once, came in one read: the task took the pair for
  no answer and left, and the chief, having said go, waited in the strategy for it forever (CI, 2026-12-05)."""
  import threading  # pylint: disable=import-outside-toplevel
  del round_
  addresses = [f"127.0.0.1:{p}" for p in chaos_resume.free_ports(2)]
  results = {}

  def meet(index):
    results[index] = rendezvous.meet(_cluster(addresses, index), problem=None, facts={"n": index}, wait_secs=20)

  threads = [threading.Thread(target=meet, args=(i,)) for i in (1, 0)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(40)
  assert results == {i: [{"problem": None, "n": 0}, {"problem": None, "n": 1}] for i in (0, 1)}


@pytest.mark.slow
def test_one_of_two_workers_started_alone_exits_within_the_deadline(synthetic_dir, tmp_path):
  """Under TF_CONFIG nothing bounded the wait: one worker of two, started alone, still waited after 900 s."""
  env = chaos_resume.cluster_environments(2)[0]
  start = time.monotonic()
  alone = _run(f"--workdir={tmp_path / 'run'}", f"--config.data_dir={synthetic_dir}",
               "--config.cluster_wait_secs=5", env=env)
  assert alone.returncode == 1 and "Traceback" not in alone.stderr, alone.stderr[-2000:]
  assert alone.stderr.strip().splitlines()[-1].startswith(
      "trainer: error: worker 1 (127.0.0.1:") and "never came within cluster_wait_secs=5" in alone.stderr
  assert time.monotonic() - start < 60


@pytest.mark.slow
def test_a_worker_refusing_at_start_stops_the_other_within_the_deadline(synthetic_dir, tmp_path):
  """Worker 1's port is taken: it refuses before its strategy exists, and the chief stops too, naming it."""
  envs = chaos_resume.cluster_environments(2)
  port = int(json_address(envs[1]).rsplit(":", 1)[1])
  command = trainer_main.command(SMOKE, str(tmp_path / "run"), {"data_dir": synthetic_dir, "cluster_wait_secs": 30})
  with socket.socket() as squatter:
    squatter.bind(("", port))
    squatter.listen(1)
    start = time.monotonic()
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for env in envs]
    errors = [p.communicate(timeout=120)[1] for p in procs]
  assert [p.returncode for p in procs] == [1, 1], errors
  assert all("Traceback" not in e for e in errors)
  assert errors[1].strip().splitlines()[-1].startswith(f"trainer: error: port {port} of this task")
  assert errors[0].strip().splitlines()[-1].startswith(f"trainer: error: worker 1 (127.0.0.1:{port}) refused to "
                                                       f"start: port {port} of this task")
  assert time.monotonic() - start < 30
  assert not os.path.exists(tmp_path / "run")


def json_address(env: dict) -> str:
  import json  # pylint: disable=import-outside-toplevel
  tf_config = json.loads(env["TF_CONFIG"])
  return tf_config["cluster"]["worker"][tf_config["task"]["index"]]


@pytest.mark.slow
def test_one_run_per_workdir_and_a_killed_holder_is_taken_over(synthetic_dir, tmp_path):
  """Two starts on one workdir both ran to the end, writing the same checkpoint names (a81954f). The run
  then stopped by SIGTERM and killed with SIGKILL ends bit for bit as the first, which ran as a run alone
  does: its every epoch the same images (the trainer's count and id digest), and the precision the run
  chose at its start kept."""
  overrides = {"data_dir": synthetic_dir, "deterministic": True, "num_epochs": 2, "export": False,
               "steps_per_loop": 1, "log_every_steps": 1,
               **trainer_overrides.LEAN}
  shared = str(tmp_path / "shared")
  first = chaos_resume.Segment(trainer_main.command(SMOKE, shared, overrides))
  lease = os.path.join(shared, "lease.json")
  while not os.path.exists(lease) and first.procs[0].poll() is None:
    time.sleep(0.1)
  with lease_lib._Local(lease)._locked():  # the lease's own lock and wait: the SIGSTOP cannot land inside it
    first.procs[0].send_signal(signal.SIGSTOP)  # it holds the lease while the second starts, however fast this is
  try:
    second = _run(*trainer_main.command(SMOKE, shared, overrides)[4:])
  finally:
    first.procs[0].send_signal(signal.SIGCONT)
  assert first.wait() == [0], first.log(0)[-2000:]
  assert second.returncode == 1 and "Traceback" not in second.stderr
  assert second.stderr.strip().splitlines()[-1].startswith(
      f"trainer: error: workdir {shared} is in use by another run: pid {first.procs[0].pid} on ")
  assert not os.path.exists(lease)  # let go at the end

  killed = str(tmp_path / "killed")
  command = trainer_main.command(SMOKE, killed, overrides)
  stopped, = chaos_resume.run_until(command, stop_at_step=3, sig=signal.SIGTERM)
  policy, why = precision.choose(precision.detect(on_cpu=True))  # deep.py: mixed_precision="auto"
  assert f"training in {policy} (auto: {why})" in stopped
  stopped_at = chaos_resume.latest_step(killed)
  assert 3 <= stopped_at < 7  # the SIGKILL below comes at the next step, before the last (8)
  assert f"stopped by SIGTERM at step {stopped_at}; checkpoint" in stopped
  assert "Run the same command to resume." in stopped
  assert not os.path.exists(os.path.join(killed, "lease.json"))
  dead, = chaos_resume.run_until(command, stop_at_step=stopped_at + 1, sig=signal.SIGKILL)
  assert f"resumed from {killed}/checkpoints/ckpt-{stopped_at} at step {stopped_at}" in dead
  assert f"training in {policy} (auto: as the run started (its config.json))" in dead
  assert os.path.exists(os.path.join(killed, "lease.json"))  # left by the dead holder
  restarted, = chaos_resume.run_until(command)
  assert "took over the lease on" in restarted and "is gone" in restarted
  assert chaos_resume.latest_step(killed) == 8
  audits = chaos_resume.epoch_audits([first.log(0)])
  assert sorted(audits) == [1, 2] and all(images == 128 for (images, _), in audits.values())
  assert chaos_resume.epoch_audits([stopped, dead, restarted]) == audits
  assert chaos_resume.max_difference(os.path.join(shared, "checkpoints", "ckpt-8"),
                                     os.path.join(killed, "checkpoints", "ckpt-8")) == 0


@pytest.mark.slow
def test_a_task_started_long_before_the_chief_waits_as_long_as_the_chief():
  """A task's wait for the answer ended at its own start + cluster_wait_secs + 10 s, while the chief, started
  later, still waited for a third task: it left, and the others would then wait in the strategy forever."""
  import threading  # pylint: disable=import-outside-toplevel
  addresses = [f"127.0.0.1:{p}" for p in chaos_resume.free_ports(3)]
  results = {}

  def meet(index, wait_secs, delay):
    time.sleep(delay)
    try:
      results[index] = rendezvous.meet(_cluster(addresses, index), problem=None, facts={"n": index},
                                       wait_secs=wait_secs)
    except cluster_lib.ClusterError as e:
      results[index] = e

  threads = [threading.Thread(target=meet, args=args) for args in ((1, 1, 0), (0, 30, 0.5), (2, 5, 12))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(60)
  assert all(results[i] == [{"problem": None, "n": n} for n in range(3)] for i in range(3)), results


def test_the_trainer_refuses_a_bad_flag_before_importing_tensorflow():
  """`import trainer` (which picks the host allocator) and the trainer's flag parsing import no TensorFlow,
  so a mistyped key is refused before TensorFlow's seconds-long import (main.py)."""
  code = "import sys, trainer.main; print('tensorflow' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.stdout.split() == ["False"], result.stdout + result.stderr[-2000:]


@pytest.mark.parametrize("setting", [None, "0", "1"])
def test_the_allocator_choice_knows_when_tensorflow_runs_onednn(setting):
  """trainer/cpu.py's rule, read without TensorFlow, against TensorFlow's own answer on this CPU."""
  env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
  if setting is not None:
    env["TF_ENABLE_ONEDNN_OPTS"] = setting
  code = ("from trainer import cpu; ours = cpu.onednn_enabled(); "  # the rule, before TensorFlow's import
          "from tensorflow.python.util import _pywrap_util_port as port; print(ours, port.IsMklEnabled())")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
  ours, tensorflows = result.stdout.split()[-2:]
  assert ours == tensorflows, result.stdout + result.stderr[-2000:]


def _beside_another_tools_folder(tmp_path) -> str:
  """A folder holding a top-level `tools` folder of modules without __init__.py, as tf2onnx (of the
  [convert] extra) installs one: run from there, an editable install's `tools` is a namespace package of
  that folder (its __file__ None), whose own tools/__init__.py never runs; our modules still load."""
  (tmp_path / "tools").mkdir()
  (tmp_path / "tools" / "graphtool.py").write_text("")
  return str(tmp_path)


@pytest.mark.parametrize("where", ["repository", "elsewhere"])
def test_a_tool_runs_the_oneDNN_choice_of_the_trainer(where, tmp_path):
  """`python -m tools.X` imports `trainer` before the tool imports TensorFlow, which reads
  TF_ENABLE_ONEDNN_OPTS at its import: a tool times and runs the kernels the trainer would, also where
  tools/__init__.py does not run (`_beside_another_tools_folder`)."""
  env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_CPU_ALLOCATOR_USE_BFC")}
  cwd = ROOT if where == "repository" else _beside_another_tools_folder(tmp_path)
  code = ("import tools.benchmark_step, tools; from tensorflow.python.util import _pywrap_util_port as port; "
          "print(tools.__file__ is None, port.IsMklEnabled())")
  result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
  expected = cpu.onednn_pays() or bool(set(cpu.ONEDNN_FLAGS) & cpu.flags())  # the trainer's choice
  assert result.stdout.split()[-2:] == [str(where == "elsewhere"), str(expected)], result.stdout + result.stderr[-2000:]


def test_make_tfrecords_runs_beside_another_tools_folder(tmp_path):
  """The shards and manifest of `python -m tools.make_tfrecords`, run where tools/__init__.py does not run
  (it failed at the manifest, after writing every shard, reading `tools.__version__`)."""
  out = tmp_path / "out"
  result = subprocess.run([sys.executable, "-m", "tools.make_tfrecords", "--source=synthetic", f"--output_dir={out}",
                           "--synthetic_train_size=40", "--synthetic_test_size=10", "--val_size=10", "--num_shards=2"],
                          cwd=_beside_another_tools_folder(tmp_path), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(out / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["tool_version"] == importlib.metadata.version("cifar10-tf-pipeline")


_ALLOCATIONS = r"""
import resource
import tensorflow as tf
import trainer  # what every entry point imports before its first op

big = tf.function(lambda x: x * 2.0)  # a new 256 MB output per call, freed before the next
x = tf.ones([64, 1024, 1024])
big(x).numpy()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  big(x).numpy()
try:  # only allocators that pool memory keep statistics
  pooled = tf.config.experimental.get_memory_info("CPU:0")["peak"] > 0
except ValueError:
  pooled = False
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start, pooled)
"""


@pytest.mark.parametrize("environ,pooled", [
    ({}, True),  # with oneDNN its own allocator; without, the BFC allocator `trainer` picks
    ({"TF_ENABLE_ONEDNN_OPTS": "0"}, True),  # as on a CPU without oneDNN's instructions
    ({"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPU_ALLOCATOR_USE_BFC": "false"}, False),  # the user's choice holds
])
def test_large_tensors_reuse_host_memory_unless_the_user_says_otherwise(environ, pooled):
  """Without oneDNN, TensorFlow's CPU allocator hands each large tensor to malloc, which maps it afresh and
  unmaps it when freed: deep.py's float32 step on a Zen 3 page-faulted its activations in again every step,
  ~10% of its time. Importing `trainer` picks TensorFlow's BFC allocator there, which keeps freed memory."""
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPU_ALLOCATOR_USE_BFC", "TF_ENABLE_ONEDNN_OPTS")}
  result = subprocess.run([sys.executable, "-c", _ALLOCATIONS], cwd=ROOT, env={**env, **environ},
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  faults, reported = result.stdout.split()[-2:]
  assert reported == str(pooled), result.stdout
  if pooled:  # fewer faults than one output's 4 KiB pages (the malloc allocator faulted in every page)
    assert int(faults) < 256 * 2 ** 20 // 4096, faults
