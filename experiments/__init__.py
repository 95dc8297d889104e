"""Entry points: the Hydra front door, the ServerApp, benchmarks and reports."""
