"""The trainer under a real SLURM (munged, slurmctld, slurmd on 127.0.0.1; tests/slurm_cluster.py), through
the repository's own batch script as submitted (its CPUs and GPUs per task), on a node whose name does not
resolve: preempted with SIGTERM and requeued, then one task SIGKILLed and the job requeued, resumed on
fewer nodes, and two jobs at once on the one node; each time the final checkpoint against an uninterrupted run
of 2 workers, itself against one process of 2 replicas."""

import glob
import json
import os
import shutil
import signal
import sys
import time

import pytest

from tests import slurm_cluster
from tests import trainer_overrides
from tools import chaos_resume
from trainer import main as trainer_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "deploy", "slurm", "train.sbatch")
SMOKE = "configs/deep.py:smoke"
EXACT = dict(trainer_overrides.EXACT, **trainer_overrides.LEAN, checkpoint_every_steps=1, steps_per_loop=1,
             log_every_steps=1, eval_steps=1)
TIMEOUT = 300  # seconds a job may take, requeues included

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
  if slurm_cluster.missing() and not os.environ.get("CI"):  # CI installs it (.ci/run): there a missing SLURM fails
    pytest.skip(f"no SLURM here: {slurm_cluster.missing()}")
  assert not slurm_cluster.missing(), slurm_cluster.missing()
  cluster = slurm_cluster.LocalSlurm(str(tmp_path_factory.mktemp("slurm"))).start()
  yield cluster
  cluster.stop()


@pytest.fixture(scope="module")
def reference(synthetic_dir, tmp_path_factory):
  """deep.py:smoke on 2 workers (TF_CONFIG on loopback), uninterrupted, a checkpoint at every step."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  overrides = dict(EXACT, data_dir=synthetic_dir, export=False, keep_checkpoints=10)
  chaos_resume.run_until(trainer_main.command(SMOKE, workdir, overrides), workers=2)
  return workdir


def _overrides(**extra) -> list[str]:
  # The script asks for a GPU per task; SLURM's (fake) GPUs are not TensorFlow's.
  return [f"--config.{k}={v}" for k, v in dict(EXACT, allow_cpu=True, **extra).items()]


def _submit(slurm, workdir: str, data_dir: str, *sbatch_args: str, tasks: int = 2, environ=None,
            **overrides) -> str:
  """The batch script with its own resources, on the one node (`environ`: more of the job's variables)."""
  env = dict(slurm.env, WORKDIR=workdir, DATA_DIR=data_dir, CONFIG=SMOKE, PYTHON=sys.executable,
             TF_CPP_MIN_LOG_LEVEL="2", **(environ or {}))
  env.pop("TF_CONFIG", None)
  output = os.path.join(os.path.dirname(workdir), "job-%j.out")
  options = ["--nodes=1", f"--ntasks={tasks}", f"--ntasks-per-node={tasks}", f"--output={output}",
             "--time=00:10:00", *sbatch_args]
  return slurm.submit(SCRIPT, options, _overrides(**overrides), env=env, cwd=ROOT)


def _output(workdir: str, job_id: str) -> str:
  path = os.path.join(os.path.dirname(workdir), f"job-{job_id}.out")
  return open(path).read() if os.path.exists(path) else ""


def _wait(slurm, job_id: str, workdir: str, until, what: str) -> dict:
  """Polls job `job_id` until `until(job, its output)`."""
  deadline = time.monotonic() + TIMEOUT
  while time.monotonic() < deadline:
    job = slurm.job(job_id)
    if until(job, _output(workdir, job_id)):
      return job
    if _done(job, None) and job.get("Restarts", "0") == "0" and "requeue" not in what:
      break  # ended without what was awaited: no use waiting
    time.sleep(0.5)
  raise AssertionError(f"job {job_id}: no {what} in {TIMEOUT} s; state {slurm.job(job_id).get('JobState')}:\n"
                       f"{_output(workdir, job_id)[-4000:]}\n{slurm.log('slurmctld')[-2000:]}")


def _done(job, _):
  return job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def _at_step(step: int):
  return lambda job, out: job["JobState"] == "RUNNING" and f"] step {step}/" in out


def _trainer_pids(workdir: str) -> dict[int, int]:
  """{SLURM_PROCID: pid} of the trainer processes of `workdir`."""
  found = {}
  for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
    try:
      args = open(cmdline, "rb").read().split(b"\0")
      environ = dict(item.split(b"=", 1) for item in open(cmdline[:-7] + "environ", "rb").read().split(b"\0")
                     if b"=" in item)
    except OSError:
      continue
    if b"trainer.main" in args and f"--workdir={workdir}".encode() in args:
      found[int(environ[b"SLURM_PROCID"])] = int(cmdline.split("/")[2])
  return found


def _final_difference(workdir: str, reference: str) -> float:
  return chaos_resume.max_difference(os.path.join(workdir, "checkpoints", "ckpt-8"),
                                     os.path.join(reference, "checkpoints", "ckpt-8"))


def _workers(workdir: str) -> list[str]:
  """The workers' host:port the run trained with (run.json)."""
  with open(os.path.join(workdir, "run.json")) as f:
    return json.load(f)["distribution"]["cluster"]["spec"]["worker"]


def test_two_workers_train_like_one_process_with_two_replicas(reference, synthetic_dir, tmp_path):
  """The reference (2 worker processes under TF_CONFIG on loopback) against one process of 2 replicas from
  the start: equal up to the all-reduce's float summation order."""
  one = str(tmp_path / "one_process")
  chaos_resume.run_until(trainer_main.command(SMOKE, one, dict(EXACT, data_dir=synthetic_dir, export=False,
                                                               logical_cpus=2)))
  assert _final_difference(one, reference) <= 1e-5
  assert os.path.exists(os.path.join(reference, "run.json"))  # the chief's


def test_a_job_preempted_then_losing_a_task_is_requeued_each_time_and_resumes_bit_for_bit(slurm, reference,
                                                                                         synthetic_dir, tmp_path):
  """Preempted with SIGTERM at step 3, the job requeues itself; in its second start the non-chief task is
  SIGKILLed once it has resumed (a lost node), the job fails and `scontrol requeue` starts it a third time. Each
  start resumes from the last checkpoint, and the run ends bit for bit as the uninterrupted one."""
  workdir = str(tmp_path / "run")
  job_id = _submit(slurm, workdir, synthetic_dir)
  _wait(slurm, job_id, workdir, _at_step(3), "step 3")
  slurm.run("scancel", "--signal=TERM", job_id)  # what --signal=TERM@120 sends before the time limit
  # The output file holds every start's lines (appended): what the second start wrote follows its header.
  second = lambda out: out.split(f"job {job_id}, start 2: 2 task(s)", 1)[1] if "start 2: 2 task(s)" in out else ""
  _wait(slurm, job_id, workdir, lambda job, out: job["Restarts"] == "1" and "resumed from" in second(out),
        "the requeued start's resume")
  out = _output(workdir, job_id)
  assert "stopped by SIGTERM at step" in out and "requeueing job" in out, out[-3000:]
  os.kill(_trainer_pids(workdir)[1], signal.SIGKILL)  # the non-chief task, right after its resume: a lost node
  job = _wait(slurm, job_id, workdir, _done, "end")
  assert job["JobState"] == "FAILED" and job["Restarts"] == "1", _output(workdir, job_id)[-3000:]
  slurm.run("scontrol", "requeue", job_id)
  job = _wait(slurm, job_id, workdir, lambda job, out: _done(job, out) and job["Restarts"] == "2", "requeued end")
  out = _output(workdir, job_id)
  assert job["JobState"] == "COMPLETED", out[-3000:] + slurm.log("slurmctld")[-2000:]
  starts = out.split(f"job {job_id}, start ")[1:]  # task 0 left by itself (lost contact) or was ended by srun
  assert len(starts) == 3 and all("resumed from" in start for start in starts[1:]), out[-3000:]
  assert _final_difference(workdir, reference) == 0
  assert os.path.exists(os.path.join(workdir, "export", "saved_model.pb"))
  first, last = (int(p) for p in slurm_cluster.RESERVED_PORTS.split("-"))
  assert all(first <= int(w.rsplit(":", 1)[1]) <= last for w in _workers(workdir))  # the step's reserved ports


def test_a_run_of_two_nodes_resumes_on_one(slurm, reference, synthetic_dir, tmp_path):
  """After a preemption only one node is left: the 2-worker run, as its checkpoint of step 3 left it,
  resumed by 1 task with 2 replicas (logical CPUs here, GPUs there) at the same global batch, the
  in-memory input giving each replica the same images. Equal to the 2-worker run up to the all-reduce's
  float summation order."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  chaos_resume.rewind(workdir, 3)
  one = _submit(slurm, workdir, synthetic_dir, tasks=1, logical_cpus=2, export=False)
  job = _wait(slurm, one, workdir, _done, "end")
  out = _output(workdir, one)
  assert job["JobState"] == "COMPLETED" and "resumed from" in out and "with 2 replica(s)" in out, out[-3000:]
  assert _final_difference(workdir, reference) <= 1e-5


def test_two_jobs_at_once_on_one_node_train_as_a_job_alone(slurm, reference, synthetic_dir, tmp_path):
  """Two 2-task jobs on the one node at once, as at a site that reserves no ports (`--resv-ports=0`): each
  derives its ports from its job id, reaches node-a at its NodeAddr, and trains bit for bit as the run
  alone. The batch script, as submitted, asks for CPUs (and a GPU) per task; the trainer logs the
  threads it feeds them with."""
  runs = [str(tmp_path / f"run{i}") for i in range(2)]
  jobs = [_submit(slurm, workdir, synthetic_dir, environ={"SLURM_RESV_PORTS": "0"}, export=False) for workdir in runs]
  ended = []
  for job_id, workdir in zip(jobs, runs):
    job = _wait(slurm, job_id, workdir, _done, "end")
    out = _output(workdir, job_id)
    assert job["JobState"] == "COMPLETED", out[-3000:]
    assert (job["NumCPUs"], job["CPUs/Task"], job["TresPerTask"]) == ("16", "8", "gres:gpu:1")
    threads = min(len(os.sched_getaffinity(0)), 8)  # slurmd binds no CPUs here (TaskPlugin=task/none)
    assert f"input threads: {threads} ({len(os.sched_getaffinity(0))} in this process's affinity mask; " \
           "SLURM_CPUS_PER_TASK=8)" in out, out[-3000:]
    assert _final_difference(workdir, reference) == 0
    ended.append(job)
  assert ended[1]["StartTime"] < ended[0]["EndTime"]  # side by side, not one after the other
  first, second = _workers(runs[0]), _workers(runs[1])
  assert all(w.startswith("127.0.0.1:") for w in first + second), (first, second)  # node-a's NodeAddr
  assert not set(first) & set(second), (first, second)
