"""Resuming, for every run a user starts: a stop request (SIGTERM) then the same command, random layers, the default (non-deterministic) mode, the resume
rules (an allow-list and the data's identity), damaged checkpoints, the tf.data service."""

import collections
import os
import re
import shutil
import signal

import pytest
import tensorflow as tf

from configs import deep
from configs import vgg_small
from pipeline import fileio
from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from tests import trainer_overrides
from tools import chaos_resume
from tools import make_tfrecords
from trainer import data
from trainer import main as trainer_main
from trainer import precision
from trainer import checks
from trainer import train


SMOKE = "configs/deep.py:smoke"


def _config(module, data_dir, **overrides):
  config = module.get_config("smoke")
  config.data_dir = data_dir
  config.update(overrides)
  return config


def _checkpoint(workdir: str, step: int) -> str:
  return os.path.join(workdir, "checkpoints", f"ckpt-{step}")


@pytest.mark.slow
def test_a_model_with_dropout_resumes_bit_for_bit(synthetic_dir, tmp_path):
  """Keras 3's Dropout draws from a SeedGenerator whose state the checkpoint did not hold: a resumed
  vgg_small drew step 0's masks again and ended 0.05-0.1 away (3cf2a86)."""
  # The default mode (on CPUs as exact as deterministic=True, which in-process would turn on op determinism
  # for the rest of the suite: XLA has no deterministic MaxPool gradient).
  overrides = dict(export=False, checkpoint_every_steps=1, keep_checkpoints=10, eval_steps=1)
  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
  train.train_and_evaluate(_config(vgg_small, synthetic_dir, **overrides), reference)
  shutil.copytree(reference, resumed)
  chaos_resume.rewind(resumed, 3)
  train.train_and_evaluate(_config(vgg_small, synthetic_dir, **overrides), resumed)
  assert fileio.read_json(os.path.join(resumed, "run.json"))["start_step"] == 3
  assert chaos_resume.max_difference(_checkpoint(resumed, 8), _checkpoint(reference, 8)) == 0
  states = [name for name in chaos_resume.checkpoint_values(_checkpoint(resumed, 8)) if name.startswith("random/")]
  assert len(states) == 3  # the smoke variant's 2 block dropouts and its dense dropout


@pytest.mark.parametrize("cache_in_memory", [True, False])
def test_the_train_stream_keeps_its_order_in_the_default_mode(synthetic_dir, monkeypatch, cache_in_memory):
  """The augmentation map ran with deterministic=config.deterministic after the resume's skip(): in the
  default mode 24 of deep.py's first 60 batches came out of order (3cf2a86), so a resume skipped other
  batches than the ones trained before the stop. The dataset's options().deterministic cannot show it (a
  map's own deterministic=False overrides them), so the images of the first 60 batches are compared, in
  order: augmented on the host, in two builds, they are those of the stream without the augmentation map
  (augment_on="device"). Each of the train pipeline's three parallel maps and its interleave, made unordered
  one at a time, failed it in 5 runs of 5."""
  monkeypatch.setattr(input_pipeline, "_CHUNK", 16)  # the decode-once map gets 38 elements to reorder, not 1
  manifest = manifest_lib.load(synthetic_dir)

  def image_keys(augment_on):
    # Batches of 120: with batches of 8 an unordered augmentation map left some builds in order.
    config = _config(deep, synthetic_dir, deterministic=False, global_batch_size=120, steps_per_epoch=0)
    config.input.update(augment_on=augment_on, cache_in_memory=cache_in_memory)
    dataset = data.train_dataset_fn(config, manifest, data.steps_per_epoch_for(config, manifest), start_step=0)(
        tf.distribute.InputContext())
    return [batch["keys"].numpy().tolist() for batch in dataset.take(60)]  # 12 epochs of 5 batches

  in_order = image_keys("device")
  for build in range(2):
    moved = [step for step, (host, raw) in enumerate(zip(image_keys("host"), in_order, strict=True)) if host != raw]
    assert not moved, f"host build {build}: batches {moved} of 60 hold other images than the raw stream's"


def test_every_train_image_once_per_epoch_across_three_resumes(synthetic_dir):
  """deep.py:smoke in the default mode with host augmentation on 2 replicas, stopped 3 times: the batches the
  replicas get, counted by image id, hold every train image exactly once in every epoch."""
  config = _config(deep, synthetic_dir, deterministic=False, global_batch_size=40, steps_per_epoch=0)
  manifest = manifest_lib.load(synthetic_dir)
  per_epoch = data.steps_per_epoch_for(config, manifest)
  assert per_epoch * 40 == manifest_lib.num_examples(manifest, "train")  # 15 steps cover the 600 images
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  seen = collections.defaultdict(collections.Counter)
  stops = [0, 7, 16, 22, 2 * per_epoch]  # resumed at 7 and 22 (mid-epoch) and at 16 (just past an epoch)
  for start, stop in zip(stops, stops[1:]):
    iterator = iter(strategy.distribute_datasets_from_function(
        data.train_dataset_fn(config, manifest, per_epoch, start_step=start)))
    for step in range(start, stop):
      for keys in strategy.experimental_local_results(next(iterator)["keys"]):
        seen[step // per_epoch].update(keys.numpy().tolist())
  all_keys = set(_train_keys(synthetic_dir))
  for epoch in (0, 1):
    assert set(seen[epoch]) == all_keys and set(seen[epoch].values()) == {1}, epoch


def _train_keys(data_dir: str) -> list[int]:
  manifest = manifest_lib.load(data_dir)
  files = manifest_lib.split_files(data_dir, manifest, "train")
  batch = next(iter(tf.data.TFRecordDataset(files).batch(1 << 20).map(input_pipeline.decoder(manifest))))
  return batch["keys"].numpy().tolist()


@pytest.fixture(scope="module")
def mid_epoch_run(synthetic_dir, tmp_path_factory):
  """A finished deep.py:smoke run of one epoch (4 steps) with checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("mid_epoch") / "run")
  train.train_and_evaluate(_config(deep, synthetic_dir, num_epochs=1, export=False, checkpoint_every_steps=2),
                           workdir)
  return workdir


def _files(directory: str) -> dict[str, bytes]:
  return {os.path.relpath(os.path.join(parent, name), directory): open(os.path.join(parent, name), "rb").read()
          for parent, _, names in os.walk(directory) for name in names}


@pytest.mark.parametrize("key,value,before", [
    ("seed", 1, 0),  # not in the old deny-list: resumed silently
    ("augment.crop_padding", 4, 2),
    ("input.shuffle_buffer", 100, 10000),
    ("label_smoothing", 0.0, 0.2),
])
def test_a_resume_may_change_only_what_the_allow_list_names(synthetic_dir, mid_epoch_run, tmp_path, key, value,
                                                            before):
  workdir = str(tmp_path / "run")
  shutil.copytree(mid_epoch_run, workdir)
  files = _files(workdir)
  config = _config(deep, synthetic_dir, num_epochs=2, export=False, checkpoint_every_steps=2)
  config.update_from_flattened_dict({key: value})
  expected = (f"workdir {workdir} holds a run with {key}={before!r}; this command has {key}={value!r}: resume with "
              "the same value, or give a new workdir")
  with pytest.raises(train.TrainingError, match=f"^{re.escape(expected)}$"):
    train.train_and_evaluate(config, workdir)
  assert _files(workdir) == files


def test_a_resume_on_rebuilt_shards_is_refused(synthetic_dir, mid_epoch_run, tmp_path):
  """Shards rebuilt with another --val_size but the same steps per epoch were resumed silently (3cf2a86):
  images that are now validation had been trained on."""
  workdir = str(tmp_path / "run")
  shutil.copytree(mid_epoch_run, workdir)
  files = _files(workdir)
  rebuilt = str(tmp_path / "rebuilt")
  make_tfrecords.make("synthetic", rebuilt, num_shards=4, val_size=190, synthetic_sizes=(800, 200))
  with pytest.raises(train.TrainingError, match=re.escape(
      f"workdir {workdir} holds a run trained on other data than {rebuilt} (images per split {{'test': 200, 'train': "
      "600, 'validation': 200} vs {'test': 200, 'train': 610, 'validation': 190}): resume on the shards it started "
      "with, or give a new workdir")):
    train.train_and_evaluate(_config(deep, rebuilt, num_epochs=2, export=False), workdir)
  assert _files(workdir) == files


def test_a_resume_may_change_the_cadence_and_find_the_same_data_elsewhere(synthetic_dir, mid_epoch_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(mid_epoch_run, workdir)
  copy = str(tmp_path / "copy")
  shutil.copytree(synthetic_dir, copy)
  train.train_and_evaluate(_config(deep, copy, num_epochs=2, export=False, log_every_steps=1, eval_steps=1,
                                   keep_checkpoints=5, tta="none", bn_statistics_images=64), workdir)
  run = fileio.read_json(os.path.join(workdir, "run.json"))
  assert (run["start_step"], run["end_step"], run["data"]) == (4, 8, manifest_lib.identity(manifest_lib.load(copy)))


def test_a_damaged_latest_checkpoint_is_passed_over_with_a_warning(synthetic_dir, mid_epoch_run, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(mid_epoch_run, workdir)
  data_file = _checkpoint(workdir, 4) + ".data-00000-of-00001"
  with open(data_file, "r+b") as f:  # a full disk or a half-finished copy
    f.truncate(os.path.getsize(data_file) // 2)
  caplog.set_level("WARNING")
  train.train_and_evaluate(_config(deep, synthetic_dir, num_epochs=2, export=False), workdir)
  assert f"passed over damaged checkpoint(s) {_checkpoint(workdir, 4)} (" in caplog.text
  assert f"resuming from {_checkpoint(workdir, 2)}" in caplog.text
  run = fileio.read_json(os.path.join(workdir, "run.json"))
  assert (run["status"], run["start_step"], run["end_step"]) == ("finished", 2, 8)


def test_every_checkpoint_damaged_is_one_line_never_a_start_from_step_0(synthetic_dir, mid_epoch_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(mid_epoch_run, workdir)
  for step in (2, 4):
    path = _checkpoint(workdir, step) + ".data-00000-of-00001"
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte: the tensor's CRC no longer matches
    open(path, "wb").write(bytes(blob))
  files = _files(workdir)
  with pytest.raises(train.TrainingError, match=re.escape(
      f"every checkpoint in {workdir}/checkpoints is damaged (newest: {_checkpoint(workdir, 4)}: ")):
    train.train_and_evaluate(_config(deep, synthetic_dir, num_epochs=2, export=False), workdir)
  assert _files(workdir) == files


def test_the_data_service_refuses_a_resume_inside_an_epoch(synthetic_dir, mid_epoch_run, tmp_path):
  """Batches from the tf.data service come in the order its workers make them, so the resume position,
  counted in source order, cannot say which of the epoch's batches were trained."""
  workdir = str(tmp_path / "run")
  shutil.copytree(mid_epoch_run, workdir)
  chaos_resume.rewind(workdir, 2)
  config = _config(deep, synthetic_dir, num_epochs=2, export=False)
  config.input.data_service = "grpc://127.0.0.1:1"
  with pytest.raises(train.TrainingError, match=re.escape(
      f"{_checkpoint(workdir, 2)} is at step 2, inside epoch 1: the tf.data service hands out batches")):
    train.train_and_evaluate(config, workdir)


def test_the_evaluation_batch_fits_the_replicas(synthetic_dir):
  """eval_batch_size=1000 was refused on 3 GPUs ("does not divide by the 3 replicas", 3cf2a86); now it is
  rounded up to a multiple of the replicas."""
  checks.check_config(_config(deep, synthetic_dir, eval_batch_size=1000, global_batch_size=48), replicas=3)
  config = _config(deep, synthetic_dir, eval_batch_size=3, eval_steps=0)  # 2 per replica on 2 replicas
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  batches = list(data.eval_dataset(config, strategy, manifest_lib.load(synthetic_dir), "validation"))
  sizes = [[int(x.shape[0]) for x in strategy.experimental_local_results(b["labels"])] for b in batches]
  assert sizes == [[2, 2]] * 50  # the 200 validation images, each once


def test_a_replica_with_an_empty_last_batch_is_evaluated(synthetic_dir):
  """One batch of 125 images for 2 replicas: replica 1 gets none. TensorFlow 2.21's CPU convolution
  returned that empty batch with its input's 3 channels and the next layer failed (found resuming a run on
  one SLURM node with 2 replicas)."""
  from trainer import evaluation  # pylint: disable=g-import-not-at-top
  from trainer import steps  # pylint: disable=g-import-not-at-top
  config = _config(deep, synthetic_dir, eval_steps=1)
  manifest = manifest_lib.load(synthetic_dir)
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  state = steps.make_state(config, strategy, 4, data.model_shape(manifest))
  metrics, details = evaluation.Evaluator(strategy, state, 10).evaluate(
      data.eval_dataset(config, strategy, manifest, "validation"), views="flip_translate", worst=4)
  assert metrics["count"] == 125 and details["confusion"].sum() == 125


@pytest.mark.slow
@pytest.mark.parametrize("replicas,deterministic", [(2, False)])  # 1 replica, deterministic: test_startup's
def test_sigterm_then_resume_ends_with_the_same_weights(synthetic_dir, tmp_path, replicas, deterministic):  # lease test
  """In the default mode (deterministic=False, host augmentation) on 2 replicas: each epoch trains the same
  images as the uninterrupted run (the trainer's per-epoch image count and id digest)."""
  overrides = {"data_dir": synthetic_dir, "deterministic": deterministic, "export": False, "steps_per_loop": 1,
               "log_every_steps": 1, "logical_cpus": replicas if replicas > 1 else 0,
               **trainer_overrides.LEAN}
  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
  reference_logs = chaos_resume.run_until(trainer_main.command(SMOKE, reference, overrides))
  log, = chaos_resume.run_until(trainer_main.command(SMOKE, resumed, overrides), 3, signal.SIGTERM)
  first = log
  policy, why = precision.choose(precision.detect(on_cpu=True))  # deep.py: mixed_precision="auto"
  assert f"training in {policy} (auto: {why})" in log
  stopped_at = chaos_resume.latest_step(resumed)
  assert 3 <= stopped_at < 8
  assert f"stopped by SIGTERM at step {stopped_at}; checkpoint" in log
  assert "Run the same command to resume." in log
  log, = chaos_resume.run_until(trainer_main.command(SMOKE, resumed, overrides))
  assert f"resumed from {resumed}/checkpoints/ckpt-{stopped_at} at step {stopped_at}" in log
  assert f"training in {policy} (auto: as the run started (its config.json))" in log
  assert chaos_resume.latest_step(resumed) == 8
  audits = chaos_resume.epoch_audits(reference_logs)
  assert sorted(audits) == [1, 2] and all(images == 128 for (images, _), in audits.values())
  assert chaos_resume.epoch_audits([first, log]) == audits
  diff = chaos_resume.max_difference(os.path.join(resumed, "checkpoints", "ckpt-8"),
                                     os.path.join(reference, "checkpoints", "ckpt-8"))
  assert diff <= 1e-6


@pytest.mark.slow
def test_sigterm_in_the_final_evaluation_stops_cleanly_and_resumes(synthetic_dir, tmp_path):
  """A stop request after the last step (here in the final evaluation) exits 0 with the last checkpoint
  as it was and no export; the same command then evaluates and exports, with the same final metrics."""
  workdir = str(tmp_path / "run")
  command = trainer_main.command(SMOKE, workdir, {"data_dir": synthetic_dir, "eval_every_epochs": 0,
                                                  "summary_worst_images": 0})  # only the final evaluation
  segment = chaos_resume.Segment(command, on_line="final evaluation of the weights at step 8", sig=signal.SIGTERM)
  assert segment.wait() == [0], segment.log(0)[-3000:]
  log = segment.log(0)
  assert segment.sent.is_set() and "stopped by SIGTERM after the last step, before the export" in log, log[-3000:]
  run = fileio.read_json(os.path.join(workdir, "run.json"))
  assert run["status"] == "stopped by SIGTERM" and run["end_step"] == 8
  assert not os.path.exists(os.path.join(workdir, "export"))
  stopped_at = re.search(r"final validation: .*", log)  # when the stop came after the first split
  log, = chaos_resume.run_until(command)
  assert f"resumed from {workdir}/checkpoints/ckpt-8 at step 8" in log
  if stopped_at:  # the same weights: the checkpoint was left as it was
    assert re.search(r"final validation: .*", log).group(0) == stopped_at.group(0)
  assert fileio.read_json(os.path.join(workdir, "run.json"))["status"] == "finished"
  assert os.path.exists(os.path.join(workdir, "export", "saved_model.pb"))
