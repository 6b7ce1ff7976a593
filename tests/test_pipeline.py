"""pipeline/: ops eagerly and inside Dataset.map, dataset shapes and ranges, sharding, determinism, resume."""

import io
import re
import struct
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import default
from pipeline import augment
from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from pipeline import ops
from trainer import faults

SEED = tf.constant([1, 2], tf.int64)
AUGMENT = default.get_config().augment


def _batch(n=8, seed=0):
  return tf.constant(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_random_crop_is_a_window_of_the_reflect_padded_image():
  images = _batch()
  out = ops.random_crop(images, SEED, 4).numpy()
  padded = np.pad(images.numpy(), [(0, 0), (4, 4), (4, 4), (0, 0)], mode="reflect")
  for i in range(len(out)):
    windows = [padded[i, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    assert any(np.array_equal(out[i], w) for w in windows)
  assert out.dtype == np.uint8


def test_random_flip_flips_some_and_keeps_the_rest():
  images = _batch(64)
  out = ops.random_flip(images, SEED).numpy()
  flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images.numpy())]
  kept = [np.array_equal(o, i) for o, i in zip(out, images.numpy())]
  assert all(f or k for f, k in zip(flipped, kept))
  assert 10 < sum(flipped) < 54


@pytest.mark.parametrize("op", [lambda x, s: ops.random_crop(x, s, 4), ops.random_flip,
                                lambda x, s: ops.random_affine(x, s, 15.0, 0.1, 0.1),
                                lambda x, s: ops.cutout(x, s, 8)])
def test_ops_are_seeded_and_same_in_dataset_map_single_and_batch(op):
  images = _batch()
  eager = op(images, SEED).numpy()
  np.testing.assert_array_equal(eager, op(images, SEED).numpy())
  assert not np.array_equal(eager, op(images, SEED + 1).numpy())
  mapped = next(iter(tf.data.Dataset.from_tensors(images).map(lambda x: op(x, SEED)))).numpy()
  np.testing.assert_array_equal(eager, mapped)
  single = op(images[0], SEED).numpy()
  assert single.shape == (32, 32, 3)
  np.testing.assert_array_equal(single, next(iter(tf.data.Dataset.from_tensors(images[0]).map(
      lambda x: op(x, SEED)))).numpy())


def test_normalize():
  out = ops.normalize(tf.fill([2, 32, 32, 3], tf.constant(255, tf.uint8)), (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
  np.testing.assert_allclose(out[0, 0, 0].numpy(), [2.0, 1.0, 0.5])
  assert out.dtype == tf.float32


def test_denormalize_inverts_normalize_and_clips():
  pixels = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)), tf.uint8)
  mean, std = (0.5, 0.4, 0.3), (0.25, 0.5, 1.0)
  back = ops.denormalize(ops.normalize(pixels, mean, std), mean, std)
  np.testing.assert_allclose(back.numpy(), pixels.numpy() / 255.0, atol=1e-6)
  assert ops.denormalize(tf.fill([1, 2, 2, 3], 9.0), mean, std).numpy().max() == 1.0


def _config(**input_overrides):
  config = default.get_config()
  config.deterministic = True
  config.input.update(input_overrides)
  return config


def _train(data_dir, config, start_step=0, ctx=None, batches=8):
  manifest = manifest_lib.load(data_dir)
  mean, std = manifest_lib.normalization(manifest)
  ds = input_pipeline.build_train_dataset(config, data_dir, steps_per_epoch=4, global_batch_size=32, mean=mean,
                                          std=std, input_context=ctx, start_step=start_step)
  return [(b["images"].numpy(), b["labels"].numpy()) for b in ds.take(batches)]


@pytest.mark.parametrize("cache", [True, False])
def test_train_batches_shapes_dtypes_ranges(synthetic_dir, cache):
  batches = _train(synthetic_dir, _config(cache_in_memory=cache), batches=2)
  x, y = batches[0]
  assert x.shape == (32, 32, 32, 3) and x.dtype == np.float32
  assert y.shape == (32,) and y.dtype == np.int64 and y.min() >= 0 and y.max() < 10
  assert -3 < x.mean() < 3 and 0.3 < x.std() < 3 and np.isfinite(x).all()


@pytest.mark.parametrize("cache", [True, False])
def test_same_seed_same_batches_other_seed_other_batches(synthetic_dir, cache):
  config = _config(cache_in_memory=cache)
  first = _train(synthetic_dir, config, batches=50)
  again = _train(synthetic_dir, config, batches=50)
  assert len(first) == 50
  for (x1, y1), (x2, y2) in zip(first, again):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
  config.seed = 1
  other = _train(synthetic_dir, config)
  assert not np.array_equal(first[0][0], other[0][0])


@pytest.mark.parametrize("cache", [True, False])
def test_resume_sees_the_same_batches(synthetic_dir, cache):
  """Starting at batch 5 (epoch 1, batch 1) gives what an uninterrupted pipeline gives from batch 5 on."""
  config = _config(cache_in_memory=cache)
  full = _train(synthetic_dir, config, batches=10)
  resumed = _train(synthetic_dir, config, start_step=5, batches=5)
  for (x1, y1), (x2, y2) in zip(full[5:], resumed):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.slow
def test_epochs_differ_and_cover_the_split(synthetic_dir):
  """Each epoch of the in-memory pipeline is a fresh permutation without repeats."""
  config = _config()
  config.augment.crop_padding, config.augment.flip = 0, "none"
  batches = _train(synthetic_dir, config, batches=8)
  epoch0 = np.concatenate([x for x, _ in batches[:4]]).reshape(128, -1)
  epoch1 = np.concatenate([x for x, _ in batches[4:]]).reshape(128, -1)
  assert len(np.unique(epoch0, axis=0)) == 128
  assert not np.array_equal(epoch0, epoch1)


def _ids(files_ctx):
  from pipeline import records  # pylint: disable=g-import-not-at-top
  return [i.decode() for s in files_ctx.batch(1000)
          for i in records.parse_batch(s)[records.ID].numpy()]


@pytest.mark.parametrize("split", ["train", "validation"])  # 4 files: by file; 1 file: by record
def test_two_input_contexts_read_disjoint_complete_halves(synthetic_dir, split):
  manifest = manifest_lib.load(synthetic_dir)
  files = manifest_lib.split_files(synthetic_dir, manifest, split)
  everything = _ids(input_pipeline.shard_records(files, None))
  halves = [_ids(input_pipeline.shard_records(files, tf.distribute.InputContext(2, i, 2))) for i in range(2)]
  assert not set(halves[0]) & set(halves[1])
  assert sorted(halves[0] + halves[1]) == sorted(everything)
  assert len(everything) == manifest["splits"][split]["num_examples"]
  assert abs(len(halves[0]) - len(halves[1])) <= len(everything) // 4


def test_png_and_raw_shards_give_the_same_pixels(synthetic_dir, png_dir):
  manifest = manifest_lib.load(synthetic_dir)
  mean, std = manifest_lib.normalization(manifest)
  read = lambda d: np.concatenate([b["images"].numpy() for b in input_pipeline.build_eval_dataset(
      d, "test", batch_size=64)])
  np.testing.assert_array_equal(read(synthetic_dir), read(png_dir))


def test_missing_data_dir_names_it(tmp_path):
  with pytest.raises(manifest_lib.ManifestError, match=f"{tmp_path}/nothing/manifest.json: not found"):
    manifest_lib.load(str(tmp_path / "nothing"))


def test_affine_with_no_motion_is_the_identity_and_moves_otherwise():
  images = _batch()
  np.testing.assert_array_equal(ops.random_affine(images, SEED, 0.0, 0.0, 0.0).numpy(), images.numpy())
  moved = ops.random_affine(images, SEED, 15.0, 0.1, 0.1).numpy()
  assert all(not np.array_equal(m, i) for m, i in zip(moved, images.numpy()))


def test_alternating_flip_flips_each_image_every_other_epoch():
  keys = tf.range(1000, dtype=tf.int64) * 7919
  even = ops.alternating_flip_mask(keys, tf.constant(0), SEED).numpy()
  odd = ops.alternating_flip_mask(keys, tf.constant(1), SEED).numpy()
  np.testing.assert_array_equal(even, ~odd)
  np.testing.assert_array_equal(even, ops.alternating_flip_mask(keys, tf.constant(2), SEED).numpy())
  assert 400 < even.sum() < 600


def _mix_inputs():
  images = tf.cast(_batch(16), tf.float32)
  labels = tf.one_hot(tf.range(16) % 10, 10)
  return images, labels


PAIRS = np.arange(16) ^ 1  # mixup's and cutmix's partners: neighbours in pairs (0, 1), (2, 3)...


def test_mixup_blends_images_and_labels_alike():
  images, labels = _mix_inputs()
  mixed, soft = ops.mixup(images, labels, SEED, 0.4)
  np.testing.assert_allclose(soft.numpy().sum(1), 1.0, rtol=1e-6)
  lam = soft.numpy()[np.arange(16), np.arange(16) % 10]  # own class weight (partners differ in class)
  expected = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images.numpy()[PAIRS]
  np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-5, atol=1e-3)
  again = next(iter(tf.data.Dataset.from_tensors((images, labels)).map(lambda x, y: ops.mixup(x, y, SEED, 0.4))))
  np.testing.assert_array_equal(again[0].numpy(), mixed.numpy())


def test_cutmix_label_weight_is_the_pasted_area():
  images, labels = _mix_inputs()
  mixed, soft = ops.cutmix(images, labels, SEED, 1.0)
  pasted = np.all(mixed.numpy() != images.numpy(), axis=-1).mean(axis=(1, 2))  # random pixels: differ if pasted
  partner = soft.numpy()[np.arange(16), PAIRS % 10]
  np.testing.assert_allclose(partner, pasted, atol=0.01)
  np.testing.assert_allclose(soft.numpy().sum(1), 1.0, rtol=1e-6)


def test_cutout_blanks_a_square():
  images = _batch() + 1  # no zero pixels to start with (uint8 wraps 255 -> 0 only for 255)
  images = tf.maximum(images, 1)
  out = ops.cutout(images, SEED, 8).numpy()
  blanked = (out == 0).all(-1).sum(axis=(1, 2))
  assert (blanked > 0).all() and (blanked <= 64).all()


@pytest.mark.parametrize("size", [12, 32, 40])
def test_cutout_inside_blanks_a_whole_square_in_the_image(size):
  """airbench96's placement: every square fits, so each image loses exactly size^2 pixels (all of them when
  the square is the image or larger), its corner drawn at every place it fits and nowhere else."""
  images = tf.maximum(_batch(n=256), 1)
  out = ops.cutout(images, SEED, size, inside=True).numpy()
  blanked = (out == 0).all(-1)
  assert (blanked.sum(axis=(1, 2)) == min(size, 32) ** 2).all()
  if size < 32:  # 256 draws of 21 places each way: each place is missed with probability ~4e-6
    for corners in (blanked.any(2).argmax(1), blanked.any(1).argmax(1)):
      assert set(corners) == set(range(32 - size + 1))


def test_cutout_mean_fill_is_zero_once_normalised():
  """cutout_fill=mean blanks after normalisation (airbench96): the square is 0, the normalisation's mean,
  where black would be -mean/std; the square is where the black one would be."""
  images = {"images": tf.maximum(_batch(n=16), 1), "labels": tf.zeros([16], tf.int64), "seed": SEED,
            "run_seed": SEED, "epoch": tf.constant(0, tf.int64), "keys": tf.range(16, dtype=tf.int64),
            "positions": tf.range(16), "global_batch_size": tf.constant(16)}
  config = _config().augment
  config.update(crop_padding=0, flip="none", cutout_size=8, cutout_inside=True)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  black = augment.train_preprocess(images, config, mean, std)["images"].numpy()
  config.cutout_fill = "mean"
  filled = augment.train_preprocess(images, config, mean, std)["images"].numpy()
  square = (filled == 0).all(-1)
  assert (square.sum(axis=(1, 2)) == 64).all()
  np.testing.assert_allclose(black[square], np.broadcast_to(-np.array(mean) / std, (16 * 64, 3)), rtol=1e-6)
  np.testing.assert_array_equal(black[~square], filled[~square])


def test_jitter_scales_each_image_about_the_mean_then_shifts_it_alike_on_every_channel():
  images = tf.constant(np.random.default_rng(0).normal(size=(64, 32, 32, 3)), tf.float32)
  out = ops.jitter(images, SEED, brightness=0.2, contrast=0.3).numpy()
  x = images.numpy().reshape(64, -1)
  y = out.reshape(64, -1)
  factors = np.array([np.polyfit(x[i], y[i], 1) for i in range(64)])  # y = a x + d, one (a, d) per image
  for (a, d), xi, yi in zip(factors, x, y):  # ... for all its pixels and channels
    np.testing.assert_allclose(yi, a * xi + d, atol=1e-5)
    assert 0.7 - 1e-6 <= a <= 1.3 + 1e-6 and abs(d) <= 0.2 + 1e-6
  assert factors[:, 0].std() > 0.1 and factors[:, 1].std() > 0.05  # uniform on +-0.3, +-0.2: std 0.17, 0.12
  np.testing.assert_array_equal(out, ops.jitter(images, SEED, 0.2, 0.3).numpy())
  assert not np.array_equal(out, ops.jitter(images, SEED + 1, 0.2, 0.3).numpy())


def test_the_seven_seeds_of_a_batch_begin_with_the_six_it_had_before_jitter():
  """train_preprocess splits a batch's seed 7 ways since colour jitter came; a run started before then split
  it 6 ways and must resume on the same translations, flips, cutouts and mixes."""
  for seed in ([1, 2], [123456789, -5], [0, 0]):
    seed = tf.constant(seed, tf.int64)
    np.testing.assert_array_equal(tf.random.experimental.stateless_split(seed, 7)[:6],
                                  tf.random.experimental.stateless_split(seed, 6))


def test_device_augmentation_equals_host_augmentation(synthetic_dir):
  """The batch carries its seed, so augmenting in the train step gives what tf.data would have given."""
  config = _config()
  config.augment.update(flip="alternating", rotation_degrees=10.0, cutout_size=6, mixup_alpha=0.3, brightness=0.2,
                        contrast=0.2)
  manifest = manifest_lib.load(synthetic_dir)
  mean, std = manifest_lib.normalization(manifest)
  build = lambda c: input_pipeline.build_train_dataset(c, synthetic_dir, steps_per_epoch=4, global_batch_size=32,
                                                       mean=mean, std=std).take(6)
  host = list(build(config))
  config.input.augment_on = "device"
  device = [augment.train_preprocess(b, config.augment, mean, std) for b in build(config)]
  assert device[0]["labels"].shape == (32, 10)  # mixup makes soft labels
  for h, d in zip(host, device):
    np.testing.assert_array_equal(h["images"].numpy(), d["images"].numpy())
    np.testing.assert_array_equal(h["labels"].numpy(), d["labels"].numpy())


@pytest.mark.parametrize("workers", [1, 2])
def test_data_service_serves_each_batch_once(synthetic_dir, workers):
  """One service worker serves exactly the local batches; two share them, each batch made by one of them
  (in the order they come)."""
  dispatcher, servers = _data_service(workers)
  try:
    config = _config()
    local = _train(synthetic_dir, config, batches=48)  # room for one service worker running ahead
    config.input.data_service = dispatcher.target
    served = _train(synthetic_dir, config, batches=16)
    if workers == 1:
      for (x1, y1), (x2, y2) in zip(local, served):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    index = {x.tobytes(): i for i, (x, _) in enumerate(local)}
    positions = [index.get(x.tobytes()) for x, _ in served]
    assert None not in positions and len(set(positions)) == 16, positions  # all local batches, none twice
  finally:
    for server in servers:
      server.stop()
    dispatcher.stop()


def test_two_runs_of_one_seed_on_one_dispatcher_each_get_every_batch(synthetic_dir):
  """The job was named by the seed alone: a learning-rate sweep's runs shared one job and split its batches."""
  dispatcher, servers = _data_service(1)
  try:
    config = _config(data_service=dispatcher.target)
    manifest = manifest_lib.load(synthetic_dir)
    mean, std = manifest_lib.normalization(manifest)
    runs = [iter(input_pipeline.build_train_dataset(config, synthetic_dir, steps_per_epoch=4, global_batch_size=32,
                                                     mean=mean, std=std, run_id=run_id)) for run_id in ("a", "b")]
    seen = [[], []]
    for _ in range(8):  # in turns, as two trainers would
      for i, run in enumerate(runs):
        seen[i].append(next(run)["images"].numpy().tobytes())
    assert seen[0] == seen[1] and len(set(seen[0])) == 8
  finally:
    for server in servers:
      server.stop()
    dispatcher.stop()


def test_data_service_without_a_worker_list_is_one_line(synthetic_dir):
  dispatcher = tf.data.experimental.service.DispatchServer(tf.data.experimental.service.DispatcherConfig(port=0))
  worker = tf.data.experimental.service.WorkerServer(tf.data.experimental.service.WorkerConfig(
      dispatcher_address=dispatcher.target.split("://")[1], worker_address="localhost:%port%"))
  try:
    config = _config(data_service=dispatcher.target)
    with pytest.raises(faults.TrainingError, match=re.escape(
        "input.data_service: the tf.data service dispatcher must list its workers")):
      with faults.data_errors_as_training_errors():
        _train(synthetic_dir, config, batches=1)
  finally:
    worker.stop()
    dispatcher.stop()


@pytest.mark.parametrize("key,value,message", [("flip", "sideways", "is not one of"),
                                               ("cutout_fill", "grey", "is not one of"),
                                               ("cutout_inside", None, "must be true or false"),
                                               ("brightness", -0.1, "must be >= 0"),
                                               ("contrast", 1.0, "must be < 1"),
                                               ("contrast", float("nan"), "must be >= 0 and finite"),
                                               ("rotation_degrees", float("inf"), "must be >= 0 and finite")])
def test_bad_augment_value_is_named(key, value, message):
  config = _config()
  config.augment[key] = value
  with pytest.raises(ValueError, match=re.escape(f"augment.{key}={value!r} {message}")):
    augment.check(config.augment)


def test_cutmix_and_alternating_flip_inside_dataset_map():
  images, labels = _mix_inputs()
  eager = ops.cutmix(images, labels, SEED, 1.0)
  mapped = next(iter(tf.data.Dataset.from_tensors((images, labels)).map(lambda x, y: ops.cutmix(x, y, SEED, 1.0))))
  for a, b in zip(eager, mapped):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  keys = tf.range(64, dtype=tf.int64)
  mask = ops.alternating_flip_mask(keys, tf.constant(3), SEED)
  in_map = next(iter(tf.data.Dataset.from_tensors(keys).map(
      lambda k: ops.alternating_flip_mask(k, tf.constant(3), SEED))))
  np.testing.assert_array_equal(mask.numpy(), in_map.numpy())


def test_replica_batches_do_not_depend_on_how_replicas_are_spread_over_workers(synthetic_dir):
  """1 pipeline feeding 2 replicas yields, alternately, exactly what 2 pipelines of 1 replica each yield."""
  config = _config()
  one = _train(synthetic_dir, config, ctx=tf.distribute.InputContext(1, 0, 2), batches=6)
  halves = [_train(synthetic_dir, config, ctx=tf.distribute.InputContext(2, i, 2), batches=3) for i in range(2)]
  assert one[0][0].shape[0] == 16
  for step in range(3):
    for replica in range(2):
      np.testing.assert_array_equal(one[2 * step + replica][0], halves[replica][step][0])
      np.testing.assert_array_equal(one[2 * step + replica][1], halves[replica][step][1])


def test_alternating_flip_mirrors_every_image_from_one_epoch_to_the_next(synthetic_dir):
  config = _config(augment_on="device")
  config.augment.update(crop_padding=0, flip="alternating")
  manifest = manifest_lib.load(synthetic_dir)
  mean, std = manifest_lib.normalization(manifest)
  ds = input_pipeline.build_train_dataset(config, synthetic_dir, steps_per_epoch=4, global_batch_size=128,
                                          mean=mean, std=std)
  flipped = {}  # key -> {epoch: was the image mirrored}
  for raw in ds.take(8):
    out = augment.train_preprocess(raw, config.augment, mean, std)["images"].numpy()
    plain = ops.normalize(raw["images"], mean, std).numpy()
    for key, o, p in zip(raw["keys"].numpy(), out, plain):
      assert np.array_equal(o, p) or np.array_equal(o, p[:, ::-1])
      flipped.setdefault(key, {})[int(raw["epoch"])] = not np.array_equal(o, p)
  both = [v for v in flipped.values() if len(v) == 2]
  assert len(both) > 100
  assert all(v[0] != v[1] for v in both)
  assert 0.3 < np.mean([v[0] for v in both]) < 0.7


def _synthetic(tmp_path_factory, num_shards):
  from tools import make_tfrecords  # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp(f"synthetic_{num_shards}_shards"))
  make_tfrecords.make("synthetic", out, num_shards=num_shards, val_size=200, synthetic_sizes=(800, 200))
  return out


@pytest.mark.parametrize("num_shards,pipelines", [(1, 2), (2, 3), (3, 2)])  # fewer files than pipelines, or
def test_streaming_pipelines_read_every_record_once_per_epoch(tmp_path_factory, num_shards, pipelines):  # uneven
  data_dir = _synthetic(tmp_path_factory, num_shards)
  config = _config(cache_in_memory=False, augment_on="device", shuffle_buffer=64)
  assert len(manifest_lib.split_files(data_dir, manifest_lib.load(data_dir), "train")) == num_shards
  manifest = manifest_lib.load(data_dir)
  keys = {}  # epoch -> keys seen over both pipelines
  for i in range(pipelines):
    ds = input_pipeline.build_train_dataset(config, data_dir, steps_per_epoch=10, global_batch_size=60, mean=None,
                                            std=None, input_context=tf.distribute.InputContext(pipelines, i, pipelines))
    for batch in ds.take(20):  # two epochs of 10 steps
      keys.setdefault(int(batch["epoch"]), []).extend(batch["keys"].numpy().tolist())
  everything = input_pipeline.decode_records(next(iter(tf.data.TFRecordDataset(
      manifest_lib.split_files(data_dir, manifest, "train")).batch(10000))))["keys"].numpy()
  assert len(everything) == 600
  for epoch in (0, 1):
    assert sorted(keys[epoch]) == sorted(everything.tolist()), epoch


def test_prefix_batches_do_not_depend_on_how_replicas_are_spread_over_workers(tmp_path_factory):
  """The BatchNorm-statistics input: each replica's batch is the same on any layout, and no pipeline
  runs short when files split unevenly (3 files over 2 pipelines, the whole split asked for)."""
  data_dir = _synthetic(tmp_path_factory, 3)
  build = lambda ctx: [b["labels"].numpy() for b in input_pipeline.build_prefix_dataset(
      data_dir, "train", images=600, global_batch_size=60, mean=None, std=None, input_context=ctx)]
  one = build(tf.distribute.InputContext(1, 0, 2))
  halves = [build(tf.distribute.InputContext(2, i, 2)) for i in range(2)]
  assert len(one) == 20 and [len(h) for h in halves] == [10, 10]
  for step in range(10):
    for replica in range(2):
      np.testing.assert_array_equal(one[2 * step + replica], halves[replica][step])
  assert all(len(b) == 30 for b in one)


def _data_service(workers):
  """A tf.data service dispatcher listing `workers` workers on 127.0.0.1 (static sharding needs the list)."""
  from tools import chaos_resume  # pylint: disable=g-import-not-at-top
  ports = chaos_resume.free_ports(workers)
  addresses = [f"localhost:{p}" for p in ports]
  dispatcher = tf.data.experimental.service.DispatchServer(
      tf.data.experimental.service.DispatcherConfig(port=0, worker_addresses=addresses))
  servers = [tf.data.experimental.service.WorkerServer(tf.data.experimental.service.WorkerConfig(
      dispatcher_address=dispatcher.target.split("://")[1], worker_address=a, port=p))
      for a, p in zip(addresses, ports)]
  return dispatcher, servers


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
  """A PNG's signature and IHDR (8-bit grey): all a header reader needs, no pixels."""
  return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


def _grey_png(width: int, height: int) -> bytes:
  """A complete 8-bit grey PNG of zeros, compressed row by row: 16000 x 16000 pixels in ~250 KB."""
  packer, row = zlib.compressobj(9), b"\0" * (width + 1)  # a row: its filter type (0, none), its pixels
  rows = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
  return _png_header(width, height) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def _pillow(image_format: str, height: int, width: int, **options) -> bytes:
  """Noise of that size encoded by Pillow (TensorFlow encodes PNG and JPEG only)."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(_batch(1)[0])).resize((width, height)).save(buffer, image_format, **options)
  return buffer.getvalue()


def test_declared_image_size_is_the_decoded_size_eagerly_and_in_dataset_map():
  height, width = 300, 517  # two bytes each: the byte order counts
  image = tf.image.resize(_batch(1), [height, width], method="nearest")[0]
  bmp = _pillow("BMP", height, width)
  samples = {
      "png": tf.io.encode_png(image).numpy(), "jpeg": tf.io.encode_jpeg(image).numpy(),
      "progressive jpeg": _pillow("JPEG", height, width, progressive=True),
      "bmp": bmp, "top-down bmp": bmp[:22] + struct.pack("<i", -height) + bmp[26:],
      "lossy webp": _pillow("WEBP", height, width), "lossless webp": _pillow("WEBP", height, width, lossless=True),
      "extended webp": _pillow("WEBP", height, width, exif=b"Exif\0\0MM"),  # with metadata: VP8X
  }
  assert [samples[k][12:16] for k in ("lossy webp", "lossless webp", "extended webp")] == [b"VP8 ", b"VP8L", b"VP8X"]
  mapped = tf.data.Dataset.from_tensor_slices(list(samples.values())).map(ops.declared_image_size)
  for (name, encoded), in_map in zip(samples.items(), mapped):
    assert tf.io.decode_image(encoded, expand_animations=False).shape[:2] == (height, width), name
    assert ops.declared_image_size(encoded).numpy().tolist() == [height, width], name
    assert in_map.numpy().tolist() == [height, width], name


def test_a_png_bomb_is_refused_from_its_header_eagerly_and_in_dataset_map():
  """249 KB that decode_image would inflate to 16000 x 16000 pixels (768 MB as RGB) are never decoded."""
  bomb = _grey_png(16000, 16000)
  assert len(bomb) < 300_000
  assert tf.io.decode_image(_grey_png(300, 200)).shape == (200, 300, 1)  # the same writer makes real PNGs
  idat = bomb[41:41 + struct.unpack(">I", bomb[33:37])[0]]  # after the signature, IHDR and IDAT's own header
  inflater, rows = zlib.decompressobj(), 0
  while idat:  # in pieces: the whole would take 256 MB here
    rows += len(inflater.decompress(idat, 1 << 24))
    idat = inflater.unconsumed_tail
  rows += len(inflater.flush())
  assert inflater.eof and rows == 16000 * (16000 + 1)  # every row is there: the decoder would make them all
  assert ops.declared_image_size(bomb).numpy().tolist() == [16000, 16000]
  limit = f"more than the limit of {ops.MAX_IMAGE_PIXELS:,} pixels"
  with pytest.raises(tf.errors.InvalidArgumentError, match=limit):
    ops.check_pixel_limit(bomb)
  # In a graph the check runs before the decoder: its pixel-less twin fails with the limit, not a PNG error.
  decoded = tf.data.Dataset.from_tensor_slices([_png_header(16000, 16000), bomb]).map(
      lambda b: tf.io.decode_image(ops.check_pixel_limit(b), expand_animations=False))
  with pytest.raises(tf.errors.InvalidArgumentError, match=limit):
    next(iter(decoded))


def test_the_pixel_limit_is_inclusive_and_unread_formats_are_refused():
  png = tf.io.encode_png(tf.zeros([30, 40, 1], tf.uint8)).numpy()
  assert ops.check_pixel_limit(png, max_pixels=1200).numpy() == png
  with pytest.raises(tf.errors.InvalidArgumentError, match="limit of 1,199 pixels"):
    ops.check_pixel_limit(png, max_pixels=1199)
  with pytest.raises(tf.errors.InvalidArgumentError, match="limit of"):  # no int64 overflow to a small number
    ops.check_pixel_limit(_png_header(2**32 - 1, 2**32 - 1))
  gif = _pillow("GIF", 30, 40)
  assert tf.io.decode_image(gif, expand_animations=False).shape == (30, 40, 3)  # refused by choice, below
  for name, data in {"gif": gif, "jpeg xl": b"\xff\x0a" + bytes(30), "text": b"not an image", "empty": b"",
                     "png signature alone": png[:8]}.items():
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a PNG, JPEG, BMP or WebP image"):
      ops.declared_image_size(data)
      pytest.fail(f"{name} accepted")  # (not reached when refused)
