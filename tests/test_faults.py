"""Faults: non-finite loss, full disks, damaged data, bad flags and configs: each gets one clear line (a stopped
run's exact resume: test_resume.py)."""

import os
import re
import shutil
import signal
import subprocess
import sys

from absl import flags
import pytest
import tensorflow as tf

from configs import deep
from pipeline import fileio
from pipeline import manifest as manifest_lib
from pipeline import records
from tools import chaos_resume
from trainer import faults
from trainer import main as trainer_main
from trainer import train
from trainer import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = "configs/deep.py:smoke"


def _smoke(data_dir, **overrides):
  config = deep.get_config("smoke")
  config.data_dir = data_dir
  config.update_from_flattened_dict(overrides)  # "model.name" as --config.model.name
  return config


def _trainer(*args):
  return subprocess.run([sys.executable, "-m", "trainer.main", f"--config={SMOKE}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _one_line_error(result, expected: str, code: int = 1):
  assert result.returncode == code, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == expected
  assert "Traceback" not in result.stderr


def test_unknown_config_key_lists_close_matches(tmp_path):
  _one_line_error(_trainer(f"--workdir={tmp_path}", "--config.global_batch=64"),
                  "trainer: error: unknown config key 'global_batch'; close matches: global_batch_size", 2)


def test_unknown_config_variant_is_one_line(tmp_path):
  _one_line_error(_trainer(f"--workdir={tmp_path}", "--config=configs/deep.py:bogus"),
                  "trainer: error: flag --config=configs/deep.py:bogus: unknown config variant 'bogus'; known: sgd, "
                  "airbench94, fast, 64px, smoke", 2)


def test_wrong_value_type(tmp_path):
  _one_line_error(_trainer(f"--workdir={tmp_path}", "--config.global_batch_size=abc"),
                  "trainer: error: flag --config.global_batch_size=abc: invalid literal for int() with base 10: "
                  "'abc'", 2)


def _copy(data_dir, tmp_path):
  target = str(tmp_path / "data")
  shutil.copytree(data_dir, target)
  return target


def test_changed_shard_is_named_before_training(synthetic_dir, tmp_path):
  data = _copy(synthetic_dir, tmp_path)
  shard = os.path.join(data, "train-00002-of-00004.tfrecord")
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 100)
  with pytest.raises(manifest_lib.ManifestError, match=f"{shard}: contents differ from manifest.json"):
    train.train_and_evaluate(_smoke(data), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_manifest_disagreeing_with_shards(synthetic_dir, tmp_path, trainer_refused):
  data = _copy(synthetic_dir, tmp_path)
  os.remove(os.path.join(data, "test-00000-of-00001.tfrecord"))
  assert trainer_refused(_smoke(data), str(tmp_path / "run")) == (
      f"trainer: error: {data}/test-00000-of-00001.tfrecord: listed in manifest.json but missing")


def _files(directory: str) -> dict[str, tuple[bytes, float]]:
  """Every file below `directory`: contents and modification time."""
  found = {}
  for parent, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(parent, name)
      with open(path, "rb") as f:
        found[path] = (f.read(), os.path.getmtime(path))
  return found


@pytest.fixture(scope="module")
def finished_run(synthetic_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train.train_and_evaluate(_smoke(synthetic_dir, num_epochs=1, export=False), workdir)
  return workdir


def test_resume_with_another_batch_size_is_one_line_and_changes_nothing(synthetic_dir, finished_run, tmp_path,
                                                                         trainer_refused):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  before = _files(workdir)
  assert trainer_refused(_smoke(synthetic_dir, global_batch_size=64), workdir) == (
      f"trainer: error: workdir {workdir} holds a run with global_batch_size=32; this command has "
      "global_batch_size=64: resume with the same value, or give a new workdir")
  assert _files(workdir) == before


def test_resume_with_another_model_is_refused(synthetic_dir, finished_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  before = _files(workdir)
  config = _smoke(synthetic_dir, num_epochs=2)
  config.model.widths = (16, 16)
  with pytest.raises(train.TrainingError, match=re.escape(
      f"workdir {workdir} holds a run with model.widths=[8, 16]; this command has model.widths=[16, 16]")):
    train.train_and_evaluate(config, workdir)
  assert _files(workdir) == before


def test_resume_with_another_config_file_lists_every_difference_the_model_first(synthetic_dir, finished_run,
                                                                                 tmp_path):
  """A deep.py workdir resumed with configs/simple_cnn.py was refused naming augment.crop_padding alone."""
  from configs import simple_cnn  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  before = _files(workdir)
  config = simple_cnn.get_config("smoke")
  config.update(data_dir=synthetic_dir, num_epochs=2, export=False)
  with pytest.raises(train.TrainingError) as refused:
    train.train_and_evaluate(config, workdir)
  message = str(refused.value)
  assert "\n" not in message
  listed = re.findall(r"([\w.]+)=", message.split("; this command has ")[1])
  assert listed[0] == "model.name" and all(k.startswith("model.") for k in listed[:2]), message
  expected = workdir_lib.differences(
      {k: v for k, v in workdir_lib.flat_config(fileio.read_json(os.path.join(workdir, "config.json")))
       if k not in workdir_lib.RESUME_MAY_CHANGE}, workdir_lib.comparable(config, workdir_lib.RESUME_MAY_CHANGE))
  assert listed == expected and len(expected) > 2 and "augment.crop_padding" in expected
  assert message.endswith("resume with the same values, or give a new workdir")
  assert _files(workdir) == before


def test_a_key_added_since_the_run_started_compares_as_what_the_run_did(synthetic_dir, finished_run, tmp_path):
  """A config.json written before augment.cutout_inside and augment.cutout_fill existed meant a cutout
  centred anywhere and black (before model.last_group_convs, every group at group_convs): resuming it with
  either changed would change the batches or the model, and was let through (a key only one side has did
  not count)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  path = os.path.join(workdir, "config.json")
  old = fileio.read_json(path)
  for added in workdir_lib.ADDED_SINCE:
    section, name = added.split(".")
    del old[section][name]
  fileio.write_json(path, old)
  before = _files(workdir)
  for key, value in (("augment.cutout_inside", True), ("augment.cutout_fill", "mean"), ("augment.brightness", 0.1),
                     ("augment.contrast", 0.1), ("model.last_group_convs", 3)):
    config = _smoke(synthetic_dir, num_epochs=2, **{key: value})
    with pytest.raises(train.TrainingError, match=re.escape(
        f"workdir {workdir} holds a run with {key}={workdir_lib.ADDED_SINCE[key]!r}; "
        f"this command has {key}={value!r}")):
      train.train_and_evaluate(config, workdir)
    assert _files(workdir) == before
  # what the run did: it resumes
  assert train.train_and_evaluate(_smoke(synthetic_dir, num_epochs=2), workdir)["validation"]["count"] > 0


def test_a_run_that_never_checkpointed_may_be_retried_with_other_values(synthetic_dir, finished_run, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  shutil.copy(os.path.join(finished_run, "config.json"), workdir)  # what a run killed before its first save leaves
  shutil.copy(os.path.join(finished_run, "run.json"), workdir)
  metrics = train.train_and_evaluate(_smoke(synthetic_dir, num_epochs=1, steps_per_epoch=2, global_batch_size=64,
                                            export=False), str(workdir))
  assert metrics["validation"]["count"] == 200


def test_checkpoint_of_another_model_is_one_line(synthetic_dir, finished_run, tmp_path):
  """Without config.json to compare with, the restore itself says the checkpoint does not fit."""
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  os.remove(os.path.join(workdir, "config.json"))
  config = _smoke(synthetic_dir, num_epochs=2)
  config.model.widths = (16, 16)
  with pytest.raises(train.TrainingError, match=re.escape(
      f"checkpoint {workdir}/checkpoints/ckpt-4 does not fit this config's model and optimizer (")) as raised:
    train.train_and_evaluate(config, workdir)
  assert "\n" not in str(raised.value) and len(str(raised.value)) < 400


def test_foreign_workdir_is_refused(synthetic_dir, tmp_path):
  (tmp_path / "thesis.tex").write_text("precious")
  with pytest.raises(train.TrainingError, match="is not empty and is not a run of this trainer"):
    train.train_and_evaluate(_smoke(synthetic_dir), str(tmp_path))
  assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_a_folder_with_someone_elses_config_json_is_refused(synthetic_dir, tmp_path):
  """A model folder of another library (its own config.json and weights) is not a run of this trainer."""
  (tmp_path / "config.json").write_text('{"model_type": "bert"}')
  (tmp_path / "weights.bin").write_bytes(b"precious")
  with pytest.raises(train.TrainingError, match="is not empty and is not a run of this trainer"):
    train.train_and_evaluate(_smoke(synthetic_dir), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == '{"model_type": "bert"}'


def test_sigterm_during_start_up_stops_before_the_first_step(synthetic_dir, tmp_path):
  workdir = str(tmp_path / "run")
  command = trainer_main.command(SMOKE, workdir, {"data_dir": synthetic_dir, "export": False})
  segment = chaos_resume.Segment(command, on_line="MirroredStrategy with", sig=signal.SIGTERM)
  assert segment.wait() == [0], segment.log(0)[-3000:]
  assert "stopped by SIGTERM before the first step. Run the same command to resume." in segment.log(0)
  assert fileio.read_json(os.path.join(workdir, "run.json"))["status"] == "stopped by SIGTERM"
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.parametrize("key,value,message", [
    ("global_batch_size", 0, "global_batch_size=0 must be an integer >= 1"),
    ("global_batch_size", -32, "global_batch_size=-32 must be an integer >= 1"),
    ("eval_batch_size", 0, "eval_batch_size=0 must be an integer >= 1"),
    ("num_epochs", 0, "num_epochs=0 must be an integer >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints=0 must be an integer >= 1"),
    ("steps_per_epoch", -3, "steps_per_epoch=-3 must be an integer >= 0"),
    ("tta", "sideways", "tta='sideways' is not one of: none, flip, flip_translate, flip_translate4"),
    ("stop_exit_code", 256, "stop_exit_code=256 must be an exit code, 0 to 255"),  # 256 would exit 0
    # These five were refused only once the step was built: after the workdir's lease and the dataset (and in
    # the benchmark tools, after their first lines of output).
    ("model.name", "vit", "model.name='vit' is not one of: airbench, mlp, plain_cnn, resnet"),
    ("optimizer.name", "lion", "optimizer.name='lion' is not one of: sgd, muon, adam, rmsprop"),
    ("optimizer.schedule", "step", "optimizer.schedule='step' is not one of: cosine, constant, triangular, piecewise"),
    ("input.normalization", "zscore", "input.normalization='zscore' is not one of: dataset, centered, unit"),
    ("augment.flip", "sideways", "augment.flip='sideways' is not one of: none, random, alternating"),
    ("input.augment_on", "gpu", "input.augment_on='gpu' is not one of: host, device"),
])
def test_out_of_range_config_values_are_refused_before_anything_runs(synthetic_dir, tmp_path, key, value, message):
  """Before: 0 divided by zero, a negative batch was "larger than the train split", num_epochs=0 exported an
  untrained model, a bad tta failed after the whole training."""
  with pytest.raises(train.TrainingError, match=f"^{re.escape(message)}$"):
    train.train_and_evaluate(_smoke(synthetic_dir, **{key: value}), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_an_empty_workdir_flag_and_a_missing_config_file_are_one_line(synthetic_dir, trainer_refused):
  values = flags.FlagValues()  # the command's flags, parsed in this process
  trainer_main.define_flags(values)
  values(["trainer", f"--config={os.path.join(ROOT, SMOKE)}", "--workdir="])
  values.config.data_dir = synthetic_dir
  assert trainer_refused(values.config, values.workdir) == (
      "trainer: error: --workdir is empty: give the directory the run's checkpoints, summaries and export go to")
  # With an override the file is read while the flags are parsed: that was 3 tracebacks (3cf2a86).
  for overrides in ([], [f"--config.data_dir={synthetic_dir}"]):
    _one_line_error(subprocess.run([sys.executable, "-m", "trainer.main", "--config=configs/nope.py",
                                    "--workdir=/tmp/x", *overrides], cwd=ROOT, capture_output=True, text=True,
                                   timeout=300),
                    "trainer: error: --config=configs/nope.py: [Errno 2] No such file or directory: "
                    "'configs/nope.py'", 2)


def test_a_config_file_that_is_not_python_is_one_line(tmp_path):
  (tmp_path / "bad.py").write_text("def get_config(:\n")
  _one_line_error(_trainer(f"--config={tmp_path}/bad.py", f"--workdir={tmp_path}/run", "--config.seed=1"),
                  f"trainer: error: --config={tmp_path}/bad.py: not a Python config file (invalid syntax, line 1)", 2)


def test_unwritable_workdir(synthetic_dir, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(train.TrainingError, match="is a file, not a directory"):
    train.train_and_evaluate(_smoke(synthetic_dir), str(blocker))


def test_workdir_another_worker_creates_meanwhile_is_accepted(tmp_path, monkeypatch):
  """Workers of a multi-worker run check the shared workdir at once: one may find it missing and see it
  exist a moment later, made by another (a start-up failure seen in CI)."""
  workdir = str(tmp_path / "run")
  real_isdir = tf.io.gfile.isdir

  def isdir(path):
    if path == workdir and not os.path.exists(workdir):
      os.makedirs(workdir)  # another worker, right after this one looked
      return False
    return real_isdir(path)

  monkeypatch.setattr(tf.io.gfile, "isdir", isdir)
  workdir_lib.check(workdir)
  assert os.path.isdir(workdir)


def test_non_finite_loss_keeps_the_last_good_checkpoint(synthetic_dir, finished_run, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)  # 1 epoch: 4 steps
  config = _smoke(synthetic_dir, num_epochs=2, export=False, steps_per_loop=4, log_every_steps=4)
  config.optimizer.learning_rate = 1e30  # a resume may not change it: let it, to blow up a run with a checkpoint
  monkeypatch.setattr(workdir_lib, "RESUME_MAY_CHANGE", workdir_lib.RESUME_MAY_CHANGE + ("optimizer.learning_rate",))
  # Step 5 computes a finite loss from the good weights and applies the huge update; step 6's loss is the
  # first non-finite one, and the loop stops right there rather than at its end (step 8).
  with pytest.raises(train.TrainingError, match=r"loss is (nan|inf) at step 6; stopped without saving\. "
                     r"The last good checkpoint is .*ckpt-4"):
    train.train_and_evaluate(config, workdir)
  assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith("ckpt-4")


def test_a_failed_run_says_so_in_run_json_and_keeps_its_summaries(synthetic_dir, tmp_path):
  """run.json records the failure and its message; the writer is closed, so events buffered for a long
  flush interval are on disk (input/images_per_sec, written at the start)."""
  workdir = str(tmp_path / "run")
  config = _smoke(synthetic_dir, export=False, summary_flush_secs=3600.0)
  config.optimizer.learning_rate = 1e30
  config.input.probe_batches = 2
  with pytest.raises(train.TrainingError, match="loss is (nan|inf) at step"):
    train.train_and_evaluate(config, workdir)
  run = fileio.read_json(os.path.join(workdir, "run.json"))
  assert run["status"] == "failed"
  assert re.match(r"loss is (nan|inf) at step \d+; stopped without saving", run["error"]), run["error"]
  from tools import report  # pylint: disable=g-import-not-at-top
  assert report.read_scalars(os.path.join(workdir, "summaries"))["input/images_per_sec"][0][0] == 0


def test_bad_data_fails_the_run_in_run_json(synthetic_dir, tmp_path):
  data = _copy(synthetic_dir, tmp_path)
  _replace_train_shards(data, [_good(i) for i in range(40)] + [BAD_RECORDS["label"][0]])
  with pytest.raises(train.TrainingError):
    train.train_and_evaluate(_smoke(data), str(tmp_path / "run"))
  run = fileio.read_json(str(tmp_path / "run" / "run.json"))
  assert (run["status"], run["error"]) == ("failed", BAD_RECORDS["label"][1])


def test_config_arguments_are_parsed_as_absl_parses_them():
  """Tools pass their --config and --config.KEY flags on to the trainer: with a space or an `=`."""
  argv = ["--config", SMOKE, "--config.seed", "3", "--kills=2", "--config.profile_steps=(2, 4)",
          "--workdir", "/tmp/x"]
  assert trainer_main.config_arguments(argv) == (SMOKE, {"seed": 3, "profile_steps": (2, 4)})
  assert trainer_main.config_arguments([f"--config={SMOKE}"]) == (SMOKE, {})
  assert trainer_main.config_arguments(["--kills=3", "--config.seed=2"], SMOKE) == (SMOKE, {"seed": 2})


PEER_LOST = ("The following tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\n"
             "The tasks have crashed. Check the task logs for an earlier error to debug further.")


GCS_DOWN = ("Error executing an HTTP request: libcurl code 6 meaning 'Couldn't resolve host name' when reading "
            "gs://bucket/data/train-00000")
SERVICE_DOWN = ("Failed to get dispatcher version from dispatcher running at localhost:5050: failed to connect to "
                "all addresses")
MODEL_BUG = ("Matrix size-incompatible: In[0]: [32,10], In[1]: [16,10]\n\t [[{{node airbench/head/MatMul}}]] "
             "[Op:__inference_loop_1234]")
BAD_LABEL = ("assertion failed: [record train_7: label 12 is outside 0..9]\n"
             "\t [[{{node MultiDeviceIteratorGetNextFromShard}}]]")


@pytest.mark.parametrize("kind,message,expected", [
    ("UnavailableError", PEER_LOST, "lost contact with /job:worker/replica:0/task:1; restart every worker with "
     "the same command to resume from the last checkpoint"),
    ("UnavailableError", GCS_DOWN, f"UnavailableError: {GCS_DOWN}"),
    ("UnavailableError", SERVICE_DOWN, f"UnavailableError: {SERVICE_DOWN}"),
    ("InvalidArgumentError", MODEL_BUG, "InvalidArgumentError in op airbench/head/MatMul: Matrix "
     "size-incompatible: In[0]: [32,10], In[1]: [16,10]"),
    ("InvalidArgumentError", BAD_LABEL, "bad training data: record train_7: label 12 is outside 0..9"),
])
def test_only_data_and_peer_errors_get_their_one_line(kind, message, expected):
  """A model bug, an unreachable bucket or tf.data service are not "bad training data" or "lost contact
  with another worker": they keep their type and name the op."""
  error = getattr(tf.errors, kind)(None, None, message)
  if expected.startswith(("bad", "lost")):
    with pytest.raises(train.TrainingError, match=f"^{re.escape(expected)}$"):
      with faults.data_errors_as_training_errors():
        raise error
  else:
    with pytest.raises(type(error)):
      with faults.data_errors_as_training_errors():
        raise error
    assert faults.describe(error) == expected


def test_make_tfrecords_killed_half_way_then_rerun(tmp_path):
  from tools import make_tfrecords  # pylint: disable=g-import-not-at-top
  out = tmp_path / "out"
  out.mkdir()
  (out / ".tmp-deadbeef-train-00000-of-00002.tfrecord").write_bytes(b"partial")
  manifest = make_tfrecords.make("synthetic", str(out), num_shards=2, val_size=20, synthetic_sizes=(100, 20))
  assert not [p for p in os.listdir(out) if p.startswith(".tmp")]
  assert manifest_lib.load(str(out)) == manifest


def _replace_train_shards(data_dir, records_list):
  """Rewrites the train split as one shard of `records_list` (serialized), with a matching manifest, as
  another tool might have written it."""
  manifest = fileio.read_json(os.path.join(data_dir, "manifest.json"))
  for entry in [e for e in manifest["shards"] if e["split"] == "train"]:
    os.remove(os.path.join(data_dir, entry["file"]))
  name = manifest_lib.shard_name("train", 0, 1)
  with tf.io.TFRecordWriter(os.path.join(data_dir, name)) as writer:
    for r in records_list:
      writer.write(r)
  manifest["shards"] = [e for e in manifest["shards"] if e["split"] != "train"] + [{
      "file": name, "split": "train", "num_records": len(records_list), "class_counts": [0] * 10,
      "sha256": fileio.sha256_file(os.path.join(data_dir, name))}]
  manifest["splits"]["train"]["num_examples"] = len(records_list)
  fileio.write_json(os.path.join(data_dir, "manifest.json"), manifest)


def _good(i):
  return records.serialize_example(bytes(3072), "raw", i % 10, f"train_{i:05d}")


def _example(**features):
  feature = {}
  for key, value in features.items():
    if isinstance(value, bytes):
      feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    else:
      feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


BAD_RECORDS = {
    "label": (records.serialize_example(bytes(3072), "raw", 12, "train_bad"),
              "bad training data: record train_bad: label 12 is outside 0..9"),
    "raw_size": (records.serialize_example(bytes(3000), "raw", 1, "train_bad"),
                 "bad training data: record train_bad: raw image is 3000 bytes, expected 3072 (32x32x3 uint8)"),
    "png_shape": (records.serialize_example(tf.io.encode_png(tf.zeros([64, 64, 3], tf.uint8)).numpy(), "png", 1,
                                            "train_bad"),
                  "bad training data: record train_bad: image declares 64x64, expected 32x32"),
    "schema": (_example(**{records.ENCODED: bytes(3072), records.FORMAT: b"raw", records.ID: b"train_bad"}),
               "bad training data: Feature: image/channels (data type: int64) is required but could not be "
               "found."),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_is_named(synthetic_dir, tmp_path, kind):
  data = _copy(synthetic_dir, tmp_path)
  bad, message = BAD_RECORDS[kind]
  _replace_train_shards(data, [_good(i) for i in range(40)] + [bad])
  with pytest.raises(train.TrainingError) as error:
    train.train_and_evaluate(_smoke(data), str(tmp_path / "run"))
  assert str(error.value) == message


def test_flipped_byte_is_caught_by_checksum_then_by_crc(synthetic_dir, tmp_path):
  data = _copy(synthetic_dir, tmp_path)
  shard = os.path.join(data, "train-00001-of-00004.tfrecord")
  blob = bytearray(open(shard, "rb").read())
  blob[5000] ^= 0x01
  open(shard, "wb").write(bytes(blob))
  with pytest.raises(manifest_lib.ManifestError, match=f"{shard}: contents differ from manifest.json"):
    train.train_and_evaluate(_smoke(data), str(tmp_path / "run"))
  config = _smoke(data)
  config.input.verify_checksums = False
  with pytest.raises(train.TrainingError, match=r"^bad training data: .*corrupted record"):
    train.train_and_evaluate(config, str(tmp_path / "run2"))


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MiB filesystem (tmpfs): room for a deep.py:smoke run's checkpoints and events, not its export."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                           text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here (needs root, as CI has): {mounted.stderr.strip()}")
  yield str(disk)
  subprocess.run(["umount", "--lazy", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_same_command_resumes_with_room(synthetic_dir, small_disk, tmp_path):
  """ENOSPC in the export was two tracebacks and left temporaries holding the space."""
  workdir = os.path.join(small_disk, "run")
  lean = ["--config.eval_every_epochs=0", "--config.summary_worst_images=0"]  # no evaluation work between epochs
  full = _trainer(f"--workdir={workdir}", f"--config.data_dir={synthetic_dir}", *lean)
  assert full.returncode == 1, full.stderr[-2000:]
  assert "Traceback" not in full.stderr
  last = full.stderr.strip().splitlines()[-1]
  assert re.fullmatch(
      rf"trainer: error: no space left on device for {re.escape(workdir)}/(export|serving/8)/\S+ \(the SavedModel"
      r"[^)]*\): it needs about [\d.]+ [KM]B, [\d.]+ [KM]B free there; the newest checkpoint, "
      rf"{re.escape(workdir)}/checkpoints/ckpt-8, is intact: make room .*, then run the same command to resume",
      last), last
  leftovers = [os.path.join(p, n) for p, dirs, files in os.walk(workdir) for n in dirs + files
               if n.startswith(".tmp-") or "_temp" in n]
  assert not leftovers and workdir_lib.latest_checkpoint(workdir).endswith("ckpt-8")
  roomy = str(tmp_path / "roomy")
  os.makedirs(roomy)
  shutil.copytree(os.path.join(workdir, "checkpoints"), os.path.join(roomy, "checkpoints"))
  resumed = _trainer(f"--workdir={roomy}", f"--config.data_dir={synthetic_dir}", *lean)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stderr and os.path.exists(os.path.join(roomy, "serving", "8", "saved_model.pb"))
  assert fileio.read_json(os.path.join(roomy, "run.json"))["start_step"] == 8
