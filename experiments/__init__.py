"""The Hydra front door (``run.py``, which also launches the simulation), reports,
benchmarks and studies."""
