"""fedlora: federated LoRA fine-tuning, framework-free core.

Nothing in this package imports Flower or Hydra: it works on plain dicts of
settings and ``dict[str, numpy.ndarray]`` adapter states.
"""

__version__ = "0.1.0"
