"""trainer/cluster.py: the cluster from TF_CONFIG (as Kubernetes and Vertex AI write it), a SLURM step, or
none; and each half-set environment as one line from the trainer."""

import json
import os
import socket
import subprocess
import sys

import pytest

from trainer import cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What Vertex AI sets for a custom job of two pools of one replica each, on the chief (the first pool).
VERTEX = {"cluster": {"chief": ["cmle-training-workerpool0-ab-0:2222"],
                      "worker": ["cmle-training-workerpool1-ab-0:2222"]},
          "environment": "cloud", "task": {"type": "chief", "index": 0, "trial": ""},
          "job": {"worker_pool_specs": [{"machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": 1}]}}
SLURM = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "5",
         "SLURM_STEP_NODELIST": "gpu[07-08],cpu1", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURMD_NODENAME": "gpu08"}


@pytest.mark.parametrize("text,hosts", [
    ("vm", ["vm"]),
    ("gpu[07-09,11]", ["gpu07", "gpu08", "gpu09", "gpu11"]),
    ("a[1-2]b[01-02],c", ["a1b01", "a1b02", "a2b01", "a2b02", "c"]),
    ("node-[8-10].lab", ["node-8.lab", "node-9.lab", "node-10.lab"]),
])
def test_slurm_host_lists_expand_as_scontrol_show_hostnames_does(text, hosts):
  assert cluster.expand_hostlist(text) == hosts


def test_slurm_tasks_per_node_expand():
  assert cluster.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]


def test_a_slurm_step_makes_every_task_a_worker_on_its_nodes_ports():
  found = cluster.resolve("auto", 8888, SLURM)
  assert (found.kind, found.task_type, found.task_id) == ("slurm", "worker", 3)
  assert dict(found.spec) == {"worker": ("gpu07:8888", "gpu07:8889", "gpu08:8888", "gpu08:8889", "cpu1:8888")}
  assert found.address == "gpu08:8889"


def test_tf_config_as_kubernetes_and_vertex_ai_write_it():
  found = cluster.resolve("auto", 8888, {"TF_CONFIG": json.dumps(VERTEX), **SLURM})  # TF_CONFIG comes first
  assert (found.kind, found.task_type, found.task_id, found.workers) == ("tf_config", "chief", 0, 2)
  plain = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}
  assert cluster.resolve("auto", 8888, {"TF_CONFIG": json.dumps(plain)}).address == "b:1"
  single = {"cluster": {"chief": ["a:1"]}, "task": {"type": "chief", "index": 0}, "environment": "cloud"}
  assert cluster.resolve("auto", 8888, {"TF_CONFIG": json.dumps(single)}).kind == "local"  # Vertex, one replica


def test_the_strategy_gets_this_task_s_gpus_and_no_stray_tf_config():
  """Without num_accelerators MultiWorkerMirroredStrategy counted no GPU and trained on the CPU; a "local"
  cluster's resolver is empty, so that the strategy reads no TF_CONFIG of its own."""
  assert cluster.resolve("auto", 8888, SLURM).resolver(4).num_accelerators() == {"GPU": 4}
  assert cluster.Cluster("local").resolver(0).cluster_spec().as_dict() == {}


def test_no_cluster_and_a_one_task_slurm_job_are_this_node_alone():
  assert cluster.resolve("auto", 8888, {}).kind == "local"
  assert cluster.resolve("auto", 8888, {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).kind == "local"  # sbatch, no srun
  assert cluster.resolve("local", 8888, {"TF_CONFIG": json.dumps(VERTEX), **SLURM}).kind == "local"


@pytest.mark.parametrize("kind,environ,expected", [
    ("auto", {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
     "SLURM_NTASKS=2 but SLURM_STEP_NUM_TASKS is not set: this process runs in the batch script"),
    ("slurm", {"SLURM_PROCID": "0"}, "SLURM_LOCALID is not set: the trainer is not a task of a SLURM job step"),
    ("auto", dict(SLURM, SLURM_STEP_NODELIST="gpu[07-08]"), "do not make SLURM_STEP_NUM_TASKS=5 tasks"),
    ("auto", dict(SLURM, SLURM_LOCALID="0"), "start the step with srun --distribution=block"),
    ("auto", dict(SLURM, SLURM_STEP_NODELIST="gpu[x-y]"), "SLURM's step variables do not parse: bad range 'x-y'"),
    ("auto", {"TF_CONFIG": "{not json"}, "TF_CONFIG is not {\"cluster\": {...}, \"task\""),
    ("auto", {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}})},
     "TF_CONFIG's task worker 2 is not in its cluster (worker: 2)"),
    ("auto", {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a", "b:1"]}, "task": {"type": "worker", "index": 0}})},
     "TF_CONFIG's cluster holds 'a': give every task as host:port"),
    ("tf_config", {}, "TF_CONFIG is not set"),
    ("kubernetes", {}, "cluster='kubernetes' is not one of: auto, tf_config, slurm, local"),
])
def test_a_half_set_environment_is_named(kind, environ, expected):
  with pytest.raises(cluster.ClusterError) as e:
    cluster.resolve(kind, 8888, environ)
  assert expected in str(e.value), str(e.value)


def _trainer(env_extra, *args):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TF_CONFIG"))}
  return subprocess.run([sys.executable, "-m", "trainer.main", "--config=configs/deep.py:smoke", "--workdir=/tmp/x",
                         "--config.data_dir=/nonexistent", *args], cwd=ROOT, env=dict(env, **env_extra),
                        capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_trainer_says_each_in_one_line_without_a_hang():
  with socket.socket() as taken:
    taken.bind(("", 0))
    taken.listen()
    port = taken.getsockname()[1]
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{port}", "127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}
    cases = [({"TF_CONFIG": json.dumps(tf_config)},
              f"port {port} of this task (127.0.0.1:{port}, from TF_CONFIG) is in use by another process"),
             ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, "SLURM_NTASKS=2 but SLURM_STEP_NUM_TASKS is not set"),
             ({"TF_CONFIG": json.dumps(dict(tf_config, task={"type": "worker", "index": 2}))},
              "TF_CONFIG's task worker 2 is not in its cluster (worker: 2)")]
    for env, expected in cases:
      result = _trainer(env)
      assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
      assert result.stderr.strip().splitlines()[-1].startswith(f"trainer: error: {expected}"), result.stderr[-500:]


def test_the_kubernetes_job_sets_each_pod_its_tf_config():
  """deploy/kubernetes/job.yaml: what its command exports in each pod of the indexed Job, run by bash as the
  pod would, from JOB_COMPLETION_INDEX alone."""
  import yaml  # pylint: disable=g-import-not-at-top  (ml-collections' dependency)
  service, job = yaml.safe_load_all(open(os.path.join(ROOT, "deploy", "kubernetes", "job.yaml")))
  pod = job["spec"]["template"]["spec"]
  container, = pod["containers"]
  export = container["args"][0].split(" && ")[0]
  workers = job["spec"]["completions"]
  env = {e["name"]: e["value"] for e in container["env"]}
  assert int(env["WORKERS"]) == workers == job["spec"]["parallelism"]
  assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
  port = container["ports"][0]["containerPort"]
  expected = [f"{job['metadata']['name']}-{i}.{pod['subdomain']}:{port}" for i in range(workers)]
  path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"  # `python` as in the image
  for index in range(workers):
    result = subprocess.run(["bash", "-c", f"{export} && echo \"$TF_CONFIG\""], cwd=ROOT, capture_output=True,
                            text=True, timeout=60,
                            env=dict(os.environ, **env, JOB_COMPLETION_INDEX=str(index), PATH=path))
    assert result.returncode == 0, result.stderr
    found = cluster.from_tf_config(result.stdout)
    assert (dict(found.spec), found.task_type, found.task_id) == ({"worker": tuple(expected)}, "worker", index)
  assert "--config.stop_exit_code=75" in container["args"][0]
  assert {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]}} in \
      job["spec"]["podFailurePolicy"]["rules"]


@pytest.mark.parametrize("args,expected", [
    (["--workers=2", "--index=2", "--address=w-{index}.s:2222"], "--index=2 is not a task of --workers=2"),
    (["--workers=2", "--index=0", "--address=w.s:2222"], "--address='w.s:2222': give host:port with {index}"),
])
def test_tf_config_tool_refuses_in_one_line(args, expected):
  result = subprocess.run([sys.executable, "-m", "tools.tf_config", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(f"tf_config: error: {expected}")
