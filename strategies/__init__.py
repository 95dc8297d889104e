"""Flower server strategies for federated LoRA (thin: the math is in ``fedlora``)."""
