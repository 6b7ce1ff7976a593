"""Test-time views: the logits the final evaluation and the export average over (as airbench94)."""

import tensorflow as tf

VIEWS = ("none", "flip", "flip_translate")


def logits(model, images: tf.Tensor, views: str, with_plain: bool = False):
  """Float32 logits of normalised images, averaged over `views` (and with `with_plain`, the image's own
  logits too, from the same call: (averaged, plain)):

  none: the image; flip: the mean over it and its mirror; flip_translate: that, weighted 1/2, plus the
  same for the image shifted one pixel up-left and one pixel down-right (reflected), 1/4 each.

  The views go through the model as one batch: one call to trace (in the final evaluation and each of
  the export's signatures), not one per view.
  """
  if views not in VIEWS:
    raise ValueError(f"tta={views!r} is not one of: {', '.join(VIEWS)}")
  shown, weights = [images], [1.0]
  if views == "flip_translate":
    shown, weights = [images, _shift(images, -1), _shift(images, 1)], [0.5, 0.25, 0.25]
  if views != "none":
    shown, weights = shown + [tf.reverse(x, axis=[2]) for x in shown], [w / 2 for w in weights] * 2
  out = tf.cast(model(tf.concat(shown, 0) if len(shown) > 1 else images, training=False), tf.float32)
  out = tf.reshape(out, [len(shown), -1, out.shape[-1]])
  averaged = tf.tensordot(tf.constant(weights, tf.float32), out, axes=1)
  return (averaged, out[0]) if with_plain else averaged


def _shift(images: tf.Tensor, step: int) -> tf.Tensor:
  """The images moved one pixel down-right (step -1: rows 1, 0, 1, ..., H-2, columns alike) or up-left (step
  1: rows 1, ..., H-1, H-2), reflected at the border: the crops of a 1-pixel reflect-padding at (0, 0) and
  (2, 2). By slices, as tf.pad's REFLECT fails on an empty batch (what a replica gets at the end of a split
  whose batches do not divide among the replicas)."""
  if step < 0:
    images = tf.concat([images[:, 1:2], images[:, :-1]], 1)
    return tf.concat([images[:, :, 1:2], images[:, :, :-1]], 2)
  images = tf.concat([images[:, 1:], images[:, -2:-1]], 1)
  return tf.concat([images[:, :, 1:], images[:, :, -2:-1]], 2)
