"""`--config.KEY=VALUE` overrides that the tests' trainer runs share (trainer.main.command takes them)."""

# Bit for bit across replica layouts, processes and restarts. The per-replica batches and seeds are the same
# on every layout (test_pipeline checks that bit for bit); only the all-reduce differs (a ring across
# processes vs a reduction on one device), i.e. float32 summation order. Training amplifies those ~1e-7
# differences: at the smoke config's learning rate of 0.4 they reached ~3e-2 by step 8; at 0.05 with random
# flips they stay ~1e-7, but with alternating flips they still grew to 1.1e-5 at step 4 and 1.5e-3 at step
# 8 (measured 2026-11-22). Hence the gentle rate and random flips.
EXACT = {"deterministic": True, "mixed_precision": "float32", "model.sync_bn": True, "augment.flip": "random",
         "optimizer.learning_rate": 0.05}

# What runs that check training are not about: evaluation between epochs, its figures and test-time views
# (~3 s of a smoke run's start-up and end). The final evaluation still runs.
LEAN = {"eval_every_epochs": 0, "summary_worst_images": 0, "tta": "none"}
