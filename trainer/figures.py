"""Figures of a run as PNG bytes (matplotlib, headless): the trainer's TensorBoard images and tools.report
draw the same pictures from here."""

import io

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf


def png(figure, tight: bool = True) -> bytes:
  """The figure as PNG bytes, cropped to what is drawn when `tight` (which draws it twice); closes it."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight" if tight else None)
  plt.close(figure)
  return buffer.getvalue()


def summary_image(data: bytes) -> tf.Tensor:
  """PNG bytes as the [1, H, W, 3] uint8 batch tf.summary.image takes."""
  return tf.io.decode_png(data, channels=3)[tf.newaxis]


def learning_curves(scalars: dict, steps_per_epoch: float) -> bytes:
  """Train and validation loss and accuracy by epoch, from {tag: [(step, value), ...]}."""
  figure, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, metric in zip(axes, ("loss", "accuracy")):
    for split, style in (("train", "-"), ("validation", "o-")):
      points = scalars.get(f"{split}/{metric}", [])
      if points:
        ax.plot([s / steps_per_epoch for s, _ in points], [v for _, v in points], style, label=split)
    ax.set_xlabel("epoch")
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend()
  return png(figure)


def throughput(scalars: dict, steps_per_epoch: float) -> bytes:
  """train/images_per_sec by epoch."""
  figure, ax = plt.subplots(figsize=(11, 3))
  points = scalars.get("train/images_per_sec", [])
  ax.plot([s / steps_per_epoch for s, _ in points], [v for _, v in points], ".-")
  ax.set_xlabel("epoch")
  ax.set_ylabel("images / s")
  ax.set_title("training throughput (per logging interval)")
  ax.grid(alpha=0.3)
  return png(figure)


def confusion(matrix: np.ndarray, names: list[str]) -> bytes:
  """Counts, true class by row and predicted class by column."""
  figure, ax = plt.subplots(figsize=(7, 6))
  ax.imshow(matrix, cmap="Blues")
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
  ax.set_yticks(range(len(names)), names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for (i, j), count in np.ndenumerate(matrix):
    ax.text(j, i, int(count), ha="center", va="center", fontsize=8,
            color="white" if count > matrix.max() / 2 else "black")
  return png(figure)


def per_class(matrix: np.ndarray, names: list[str]) -> bytes:
  """Each class's accuracy, from a confusion matrix."""
  accuracy = np.diag(matrix) / np.maximum(matrix.sum(1), 1)
  figure, ax = plt.subplots(figsize=(11, 3))
  ax.bar(names, accuracy)
  ax.set_ylim(0, 1)
  ax.set_ylabel("accuracy")
  for i, a in enumerate(accuracy):
    ax.text(i, a + 0.02, f"{a:.3f}", ha="center", fontsize=8)
  return png(figure)


def predictions(images: np.ndarray, labels, predicted, probabilities, names, columns: int = 8) -> bytes:
  """A grid of images ([N, H, W, 3], uint8 or floats in [0, 1]), each titled with its predicted class and
  probability and its true class, green when right and red when wrong. One canvas in one axes: a subplot
  per image drew several times slower (docs/results.md)."""
  images = np.asarray(images)
  images = images / 255.0 if images.dtype == np.uint8 else np.clip(images, 0.0, 1.0)
  rows = max(-(-len(images) // columns), 1)
  height, width = images.shape[1:3] if len(images) else (32, 32)
  cell_h, cell_w, title = height * 3 // 2, width + width // 8, height // 2  # room for a 2-line title
  canvas = np.ones((rows * cell_h, columns * cell_w, 3))
  for k, image in enumerate(images):
    y, x = (k // columns) * cell_h + title, (k % columns) * cell_w
    canvas[y:y + height, x:x + width] = image[..., :3]
  figure = plt.figure(figsize=(columns * 1.6, columns * 1.6 * canvas.shape[0] / canvas.shape[1]))
  ax = figure.add_axes((0, 0, 1, 1))
  ax.imshow(canvas)
  ax.axis("off")
  for k, (label, guess, p) in enumerate(zip(labels, predicted, probabilities)):
    ax.text((k % columns) * cell_w + width / 2, (k // columns) * cell_h + title - 1,
            f"{names[guess]} {p:.2f}\n(true: {names[label]})", fontsize=7, ha="center", va="bottom",
            color="green" if guess == label else "red")
  return png(figure, tight=False)
