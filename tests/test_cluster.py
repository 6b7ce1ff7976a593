"""trainer/cluster.py: the cluster from TF_CONFIG (as Kubernetes and Vertex AI write it), a SLURM step, or
none; and each half-set environment as one line from the trainer."""

import json
import os
import socket
import subprocess
import sys

import pytest

from configs import deep
from trainer import cluster
from trainer import distribute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What Vertex AI sets for a custom job of two pools of one replica each, on the chief (the first pool).
VERTEX = {"cluster": {"chief": ["cmle-training-workerpool0-ab-0:2222"],
                      "worker": ["cmle-training-workerpool1-ab-0:2222"]},
          "environment": "cloud", "task": {"type": "chief", "index": 0, "trial": ""},
          "job": {"worker_pool_specs": [{"machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": 1}]}}
SLURM = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "5",
         "SLURM_STEP_NODELIST": "gpu[07-08],cpu1", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURMD_NODENAME": "gpu08",
         "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0"}
# What `scontrol show node -o` says of two of them (cpu1 is not in the answer: its name is its address).
SCONTROL = ("NodeName=gpu07 Arch=x86_64 CoresPerSocket=16 Gres=gpu:2 NodeAddr=10.1.0.7 NodeHostName=gpu07 OS=Linux "
            "6.1 #1 SMP\nNodeName=gpu08 Arch=x86_64 Gres=gpu:2 NodeAddr=10.1.0.8 NodeHostName=gpu08-eth\n")


@pytest.fixture
def site(monkeypatch):
  """SLURM's node addresses as SCONTROL says, and a resolver that knows every name but `*.invalid`."""
  monkeypatch.setattr(cluster, "_show_nodes", lambda nodes, environ: (SCONTROL, "NodeAddr=..."))
  real = socket.getaddrinfo

  def getaddrinfo(host, *args, **kwargs):
    if str(host).endswith(".invalid"):
      return real(host, *args, **kwargs)  # RFC 6761: never resolves
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.9.9", 0))]
  monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


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


def test_a_slurm_step_makes_every_task_a_worker_at_its_nodes_address_and_port(site):
  """Without reserved ports: cluster_port + 8 x ((16 x 1234 + 0) mod 509) + the local index; a node at its
  NodeAddr, or at its name where scontrol says none."""
  found = cluster.resolve("auto", 8888, SLURM)
  assert (found.kind, found.task_type, found.task_id) == ("slurm", "worker", 3)
  assert dict(found.spec) == {"worker": ("10.1.0.7:12104", "10.1.0.7:12105", "10.1.0.8:12104", "10.1.0.8:12105",
                                         "cpu1:12104")}
  assert found.address == "10.1.0.8:12105"
  assert found.ports_from == "cluster_port=8888 with SLURM_JOB_ID=1234, SLURM_STEP_ID=0"


@pytest.mark.parametrize("reserved,ports", [("20001-20003", (20001, 20002)), ("20001,20005", (20001, 20005)),
                                            ("20001,20005-20006", (20001, 20005))])
def test_a_step_with_reserved_ports_takes_them_by_local_index(site, reserved, ports):
  found = cluster.resolve("auto", 8888, dict(SLURM, SLURM_STEP_RESV_PORTS=reserved))
  assert [a.rsplit(":", 1)[1] for a in dict(found.spec)["worker"]] == [str(p) for p in (*ports, *ports, ports[0])]
  assert found.ports_from == f"SLURM_STEP_RESV_PORTS={reserved}"


def test_derived_ports_differ_between_jobs_and_steps_and_move_with_cluster_port():
  ports = {(job, step): cluster.step_ports({"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step)}, 8888, 2)[0]
           for job in range(1000, 1031) for step in range(16)}  # jobs fewer than 31 ids apart never meet
  assert len({p for pair in ports.values() for p in pair}) == 2 * len(ports)
  assert min(min(pair) for pair in ports.values()) >= 8888 and max(max(pair) for pair in ports.values()) <= 12959
  assert cluster.step_ports({"SLURM_JOB_ID": "1000"}, 8888, 1)[0] == ports[1000, 0][:1]  # no SLURM_STEP_ID: 0
  assert cluster.step_ports({"SLURM_JOB_ID": "1000"}, 20000, 1)[0] == [ports[1000, 0][0] - 8888 + 20000]


def test_slurm_node_aliases_and_scontrol_give_addresses():
  """SLURM_NODE_ALIASES as SLURM sets it for cloud nodes (brackets since 20.11, for IPv6; none before)."""
  assert cluster.node_aliases("ec0:[10.0.0.2]:ec0-host,ec1:[fe80::1]:ec1") == {"ec0": "10.0.0.2", "ec1": "fe80::1"}
  assert cluster.node_aliases("ec0:10.0.0.2:ec0-host") == {"ec0": "10.0.0.2"}
  assert cluster.node_aliases("(null)") == {} and cluster.node_aliases("") == {}
  assert cluster.scontrol_addresses(SCONTROL) == {"gpu07": "10.1.0.7", "gpu08": "10.1.0.8"}


def test_aliases_come_before_scontrol_and_ipv6_is_bracketed(site):
  environ = dict(SLURM, SLURM_NODE_ALIASES="gpu08:[fd00::8]:gpu08")
  assert dict(cluster.resolve("auto", 8888, environ).spec)["worker"][2:4] == ("[fd00::8]:12104", "[fd00::8]:12105")


def test_an_unresolvable_node_is_one_line_naming_it_and_what_was_tried(monkeypatch):
  monkeypatch.setattr(cluster, "_show_nodes", lambda nodes, environ: ("", "not installed"))
  environ = dict(SLURM, SLURM_STEP_NODELIST="gpu07.invalid,gpu08.invalid,cpu1.invalid", SLURMD_NODENAME="")
  with pytest.raises(cluster.ClusterError) as e:
    cluster.resolve("auto", 8888, environ)
  message = str(e.value)
  assert message.startswith("SLURM node gpu07.invalid: its address 'gpu07.invalid' does not resolve (") and \
      "tried SLURM_NODE_ALIASES (not set), scontrol show node (not installed), then the name" in message, message
  assert "\n" not in message


def test_tf_config_as_kubernetes_and_vertex_ai_write_it():
  found = cluster.resolve("auto", 8888, {"TF_CONFIG": json.dumps(VERTEX), **SLURM})  # TF_CONFIG comes first
  assert (found.kind, found.task_type, found.task_id, found.workers) == ("tf_config", "chief", 0, 2)
  plain = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}
  assert cluster.resolve("auto", 8888, {"TF_CONFIG": json.dumps(plain)}).address == "b:1"
  single = {"cluster": {"chief": ["a:1"]}, "task": {"type": "chief", "index": 0}, "environment": "cloud"}
  assert cluster.resolve("auto", 8888, {"TF_CONFIG": json.dumps(single)}).kind == "local"  # Vertex, one replica


def test_the_strategy_gets_this_task_s_gpus_and_no_stray_tf_config(site):
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
    ("auto", dict(SLURM, SLURM_STEP_RESV_PORTS="20001"),
     "SLURM_STEP_RESV_PORTS=20001 holds 1 port(s) for the 2 tasks of a node: start the step with srun --resv-ports=2"),
    ("auto", dict(SLURM, SLURM_STEP_RESV_PORTS="20001-x"), "SLURM_STEP_RESV_PORTS does not parse: bad port range"),
    ("slurm", {k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}, "SLURM_JOB_ID is not set"),
    ("slurm", dict(SLURM, SLURM_STEP_ID="batch"), "SLURM_JOB_ID='1234' and SLURM_STEP_ID='batch' must be numbers"),
    ("auto", {"TF_CONFIG": "{not json"}, "TF_CONFIG is not {\"cluster\": {...}, \"task\""),
    ("auto", {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}})},
     "TF_CONFIG's task worker 2 is not in its cluster (worker: 2)"),
    ("auto", {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a", "b:1"]}, "task": {"type": "worker", "index": 0}})},
     "TF_CONFIG's cluster holds 'a': give every task as host:port"),
    ("tf_config", {}, "TF_CONFIG is not set"),
    ("kubernetes", {}, "cluster='kubernetes' is not one of: auto, tf_config, slurm, local"),
])
def test_a_half_set_environment_is_named(site, kind, environ, expected):
  with pytest.raises(cluster.ClusterError) as e:
    cluster.resolve(kind, 8888, environ)
  assert expected in str(e.value), str(e.value)


def test_a_derived_range_past_65535_is_refused():
  with pytest.raises(cluster.ClusterError, match=r"cluster_port=62000: a SLURM step without reserved ports listens "
                                                 r"on ports 62000 to 66071, which must lie in 1-65535"):
    cluster.step_ports({"SLURM_JOB_ID": "1"}, 62000, 2)


def _trainer(env_extra, *args):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TF_CONFIG"))}
  return subprocess.run([sys.executable, "-m", "trainer.main", "--config=configs/deep.py:smoke", "--workdir=/tmp/x",
                         "--config.data_dir=/nonexistent", *args], cwd=ROOT, env=dict(env, **env_extra),
                        capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_trainer_says_each_in_one_line_without_a_hang(monkeypatch, tmp_path, trainer_refused):
  """The first case as the command (a process of its own); the others as its body (trainer.main.run) in this
  process, each within its environment."""
  with socket.socket() as taken:
    taken.bind(("", 0))
    taken.listen()
    port = taken.getsockname()[1]
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{port}", "127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}
    cases = [({"TF_CONFIG": json.dumps(tf_config)},
              f"port {port} of this task (127.0.0.1:{port}, from TF_CONFIG) is in use by another process"),
             ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, "SLURM_NTASKS=2 but SLURM_STEP_NUM_TASKS is not set"),
             (dict(SLURM, SLURM_NODE_ALIASES="gpu07:[gpu07.invalid]:h,gpu08:[gpu08.invalid]:h,cpu1:[cpu1.invalid]:h"),
              "SLURM node gpu07: its address 'gpu07.invalid' does not resolve"),  # no wait for a peer that never comes
             ({"TF_CONFIG": json.dumps(dict(tf_config, task={"type": "worker", "index": 2}))},
              "TF_CONFIG's task worker 2 is not in its cluster (worker: 2)")]
    result = _trainer(cases[0][0])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"trainer: error: {cases[0][1]}"), result.stderr[-500:]

  def past_the_cluster_checks(*_):
    raise AssertionError("the trainer went past the cluster's checks, towards the meeting and the strategy")

  monkeypatch.setattr(distribute, "_check_gpus_and_meet", past_the_cluster_checks)  # none here: no hang
  for env, expected in cases[1:]:
    with monkeypatch.context() as patch:
      for name in list(os.environ):
        if name.startswith(("SLURM_", "TF_CONFIG")):
          patch.delenv(name)
      for name, value in env.items():
        patch.setenv(name, value)
      config = deep.get_config("smoke")
      config.update(data_dir="/nonexistent")
      assert trainer_refused(config, str(tmp_path / "run")).startswith(f"trainer: error: {expected}")


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
