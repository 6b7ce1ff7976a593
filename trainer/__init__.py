"""The custom training loop under tf.distribute, checkpoints, summaries and export."""

import os

# As in tools/__init__.py: keep TensorFlow's C++ INFO/WARNING lines out of the training log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
