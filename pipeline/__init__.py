"""Input pipeline: the record schema, image ops and tf.data assembly (no Keras, no strategy)."""
