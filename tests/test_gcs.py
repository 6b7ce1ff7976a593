"""Every command with gs:// paths, end to end, against a local GCS emulator reached by TF's own gs:// client
(tests/gcs_emulator.py): make_tfrecords from a gs:// archive to gs://, train with a gs:// workdir, resume
from it, export there, evaluate and predict from gs://; and the one-line errors for a missing bucket,
no permission and no credentials."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.gcs_emulator import GcsEmulator

pytestmark = pytest.mark.slow  # a GCS emulator and whole runs through it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "gs://test-bucket"


@pytest.fixture(scope="module")
def gcs():
  emulator = GcsEmulator(bucket="test-bucket")
  yield emulator
  emulator.stop()


def _run(gcs, *args, env=None, check=True, unset=()):
  env = {k: v for k, v in {**os.environ, **gcs.env(), **(env or {})}.items() if k not in unset}
  result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
  if check and result.returncode:
    pytest.fail(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
  return result


def _gcs_text(gcs, path: str) -> str:
  """Read through google-cloud-storage (STORAGE_EMULATOR_HOST), not through TF, as a cross-check."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  os.environ["STORAGE_EMULATOR_HOST"] = gcs.env()["STORAGE_EMULATOR_HOST"]
  client = storage.Client(project="test", credentials=_anonymous())
  bucket, _, name = path[len("gs://"):].partition("/")
  return client.bucket(bucket).blob(name).download_as_text()


def _gcs_exists(gcs, path: str) -> bool:
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  os.environ["STORAGE_EMULATOR_HOST"] = gcs.env()["STORAGE_EMULATOR_HOST"]
  bucket, _, name = path[len("gs://"):].partition("/")
  return storage.Client(project="test", credentials=_anonymous()).bucket(bucket).blob(name).exists()


def _anonymous():
  from google.auth import credentials  # pylint: disable=g-import-not-at-top
  return credentials.AnonymousCredentials()


def _upload(gcs, local: str, path: str) -> None:
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  os.environ["STORAGE_EMULATOR_HOST"] = gcs.env()["STORAGE_EMULATOR_HOST"]
  client = storage.Client(project="test", credentials=_anonymous())
  bucket, _, name = path[len("gs://"):].partition("/")
  client.bucket(bucket).blob(name).upload_from_filename(local)


def test_make_train_resume_export_evaluate_predict_on_gcs(gcs, tmp_path):
  source, data, workdir = f"{BUCKET}/src/cifar10-sample.tar.gz", f"{BUCKET}/data", f"{BUCKET}/run"
  _upload(gcs, os.path.join(ROOT, "data", "cifar10-sample.tar.gz"), source)
  _run(gcs, "tools.make_tfrecords", f"--source={source}", f"--output_dir={data}", "--val_size=100",
       "--num_shards=2")
  manifest = json.loads(_gcs_text(gcs, f"{data}/manifest.json"))
  assert manifest["splits"]["train"]["num_examples"] == 400
  assert "verify: OK" in _run(gcs, "tools.make_tfrecords", f"--output_dir={data}", "--verify").stdout

  # The final evaluation only (its figures go to gs:// too), without test-time views.
  train = ["trainer.main", "--config=configs/deep.py:smoke", f"--workdir={workdir}", f"--config.data_dir={data}",
           "--config.eval_every_epochs=0", "--config.tta=none"]
  _run(gcs, *train, "--config.num_epochs=1")  # 4 steps, a checkpoint and an export
  # The resume to step 8 holds the workdir's lease (GCS preconditions): a second start is refused naming it;
  # killed with SIGKILL, it blocks nobody: a restart takes the lease over and finishes.
  holder = subprocess.Popen([sys.executable, "-m", *train], cwd=ROOT, env={**os.environ, **gcs.env()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  while holder.poll() is None and not _gcs_exists(gcs, f"{workdir}/lease.json"):
    time.sleep(0.2)
  holder.send_signal(signal.SIGSTOP)
  second = _run(gcs, *train, check=False)
  holder.kill()
  holder.wait()
  assert second.returncode == 1 and second.stderr.strip().splitlines()[-1].startswith(
      f"trainer: error: workdir {workdir} is in use by another run: pid {holder.pid} on ")
  restarted = _run(gcs, *train)
  assert "took over the lease on" in restarted.stderr
  run = json.loads(_gcs_text(gcs, f"{workdir}/run.json"))
  assert (run["status"], run["start_step"], run["end_step"]) == ("finished", 4, 8)
  assert not _gcs_exists(gcs, f"{workdir}/lease.json")

  evaluated = _run(gcs, "tools.evaluate", f"--model={workdir}/export", f"--data_dir={data}", "--split=validation")
  accuracy = run["metrics"]["validation"]["accuracy"]
  assert f"{accuracy:.4f}" in evaluated.stdout, (evaluated.stdout, accuracy)

  image, local = f"{BUCKET}/images/cat.png", str(tmp_path / "cat.png")
  pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  tf.io.write_file(local, tf.io.encode_png(pixels))
  _upload(gcs, local, image)
  predicted = _run(gcs, "tools.predict", f"--model={workdir}/export", image).stdout.strip().split("\t")
  assert predicted[0] == image and float(predicted[2]) > 0


SYNTHETIC = ("tools.make_tfrecords", "--source=synthetic", "--synthetic_train_size=100", "--synthetic_test_size=10",
             "--val_size=0")


@pytest.mark.parametrize("command,credentials,expected", [
    (SYNTHETIC + ("--output_dir=gs://no-such-bucket/data",), True, "bucket gs://no-such-bucket does not exist"),
    (("trainer.main", "--config=configs/deep.py:smoke", "--workdir=gs://no-such-bucket/run",
      "--config.data_dir=gs://no-such-bucket/data"), True, "bucket gs://no-such-bucket does not exist"),
    (("trainer.main", "--config=configs/deep.py:smoke", "--workdir=gs://no-access-bucket/run",
      "--config.data_dir=gs://no-access-bucket/data"), True, "no permission to use bucket gs://no-access-bucket"),
    (("tools.evaluate", "--model=gs://no-access-bucket/export", "--data_dir=gs://test-bucket/data"), True,
     "no permission to use bucket gs://no-access-bucket"),
    (SYNTHETIC + ("--output_dir=gs://test-bucket/data2",), False, "no Google Cloud credentials were accepted"),
    (("tools.predict", "--model=gs://test-bucket/run/export", "gs://test-bucket/images/cat.png"), False,
     "no Google Cloud credentials were accepted"),
], ids=["missing-bucket-make_tfrecords", "missing-bucket-trainer", "no-permission-trainer",
        "no-permission-evaluate", "no-credentials-make_tfrecords", "no-credentials-predict"])
def test_storage_refusal_is_one_line(gcs, tmp_path, command, credentials, expected):
  """GCS's refusals (the proxy answers 403 for its no-access bucket and 401 without a token, as GCS does)
  end each command with one line naming the bucket and the cause, without a traceback."""
  no_credentials = {"HOME": str(tmp_path)}  # no gcloud application-default credentials either
  result = _run(gcs, *command, check=False, env=None if credentials else no_credentials,
                unset=() if credentials else ("GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_APPLICATION_CREDENTIALS"))
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert expected in last and "Traceback" not in result.stderr, result.stderr[-2000:]
