"""The custom training loop under tf.distribute, checkpoints, summaries and export."""
