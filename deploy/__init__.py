"""Deployment: the local launcher (``python -m deploy.launch``), certificates and
compose overlays."""
