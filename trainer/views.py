"""Test-time views: the logits the final evaluation and the export average over (as airbench94)."""

import tensorflow as tf

# (rows, columns) each view is shifted by, and its weight, before the mirror images are added
SHIFTS = {"none": [((0, 0), 1.0)], "flip": [((0, 0), 1.0)],
          "flip_translate": [((0, 0), 0.5), ((-1, -1), 0.25), ((1, 1), 0.25)],
          "flip_translate4": [((0, 0), 0.2), ((-1, 0), 0.2), ((1, 0), 0.2), ((0, -1), 0.2), ((0, 1), 0.2)]}
VIEWS = tuple(SHIFTS)


def logits(model, images: tf.Tensor, views: str, with_plain: bool = False):
  """Float32 logits of normalised images, averaged over `views` (and with `with_plain`, the image's own
  logits too, from the same call: (averaged, plain)):

  none: the image; flip: the mean over it and its mirror; flip_translate (airbench94's 6 views): that,
  weighted 1/2, plus the same for the image shifted one pixel up-left and one pixel down-right (reflected),
  1/4 each; flip_translate4 (10 views): the image and its 4 shifts by one pixel up, down, left and right,
  1/5 each, each with its mirror. More views cost the evaluation and the export that many times the
  compute of one image; training is not changed.

  The views go through the model as one batch: one call to trace (in the final evaluation and each of
  the export's signatures), not one per view.
  """
  if views not in VIEWS:
    raise ValueError(f"tta={views!r} is not one of: {', '.join(VIEWS)}")
  shown = [_shift(_shift(images, 1, rows), 2, columns) for (rows, columns), _ in SHIFTS[views]]
  weights = [weight for _, weight in SHIFTS[views]]
  if views != "none":
    shown, weights = shown + [tf.reverse(x, axis=[2]) for x in shown], [w / 2 for w in weights] * 2
  out = tf.cast(model(tf.concat(shown, 0) if len(shown) > 1 else images, training=False), tf.float32)
  out = tf.reshape(out, [len(shown), -1, out.shape[-1]])
  averaged = tf.tensordot(tf.constant(weights, tf.float32), out, axes=1)
  return (averaged, out[0]) if with_plain else averaged


def _shift(images: tf.Tensor, axis: int, step: int) -> tf.Tensor:
  """The images moved one pixel along `axis` (1: rows, 2: columns) towards higher indices (step -1: rows
  1, 0, 1, ..., H-2) or lower ones (step 1: rows 1, ..., H-1, H-2), reflected at the border: the crops of a
  1-pixel reflect-padding at offset 0 and 2; step 0: as they are. By slices, as tf.pad's REFLECT fails on
  an empty batch (what a replica gets at the end of a split whose batches do not divide among the
  replicas)."""
  take = lambda start, stop: images[:, start:stop] if axis == 1 else images[:, :, start:stop]
  if step < 0:
    return tf.concat([take(1, 2), take(None, -1)], axis)
  if step > 0:
    return tf.concat([take(1, None), take(-2, -1)], axis)
  return images
