"""Test-time views: the logits the final evaluation and the export average over (as airbench94)."""

import tensorflow as tf

VIEWS = ("none", "flip", "flip_translate")


def logits(model, images: tf.Tensor, views: str) -> tf.Tensor:
  """Float32 logits of normalised images, averaged over `views`:

  none: the image; flip: the mean over it and its mirror; flip_translate: that, weighted 1/2, plus the
  same for the image shifted one pixel up-left and one pixel down-right (reflected), 1/4 each.
  """
  run = lambda x: tf.cast(model(x, training=False), tf.float32)
  mirror = lambda x: 0.5 * (run(x) + run(tf.reverse(x, axis=[2])))
  if views == "none":
    return run(images)
  if views == "flip":
    return mirror(images)
  if views == "flip_translate":
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
    height, width = images.shape[1], images.shape[2]
    return (0.5 * mirror(images) + 0.25 * mirror(padded[:, :height, :width]) +
            0.25 * mirror(padded[:, 2:height + 2, 2:width + 2]))
  raise ValueError(f"tta={views!r} is not one of: {', '.join(VIEWS)}")
