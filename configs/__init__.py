"""Training configs: `default.py` holds every field; the others override only what differs."""
