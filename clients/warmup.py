"""A simulation worker's warm-up, run as each Ray worker process starts.

Ray runs :func:`warm` in every worker of the run (its runtime environment's
``worker_process_setup_hook``, set by ``experiments.run``), so the ClientApp's
imports, the model's build and the data's read and partition happen while the
server starts and evaluates round 0, instead of in the first client's training of
round 1. The caches it fills are the ones the first message would fill
(:func:`fedlora.build.build_cached`, :func:`fedlora.data.client_examples`), with
the settings every message carries, so the results do not change.
"""

from __future__ import annotations

import json
import logging
import os

#: the experiment settings (JSON, as the train messages carry them) to warm the
#: model and data for; unset: the imports only
SETTINGS_ENV = "FEDLORA_WARM_SETTINGS"
log = logging.getLogger("fedlora")


def warm() -> None:
    """Import the ClientApp; with :data:`SETTINGS_ENV` set, also build its model
    and read, partition and tokenise the data as the first message would. A
    failure is left to that message to report (with the ClientApp's own error
    handling); the worker starts regardless."""
    from clients.client_app import node_model
    from fedlora.console import hush_libraries
    from fedlora.data import client_examples
    from fedlora.settings import Settings

    text = os.environ.get(SETTINGS_ENV)
    if not text:
        return
    try:
        cfg = Settings.from_dict(json.loads(text))
        hush_libraries(bool(cfg.verbose))  # as the first message would
        cfg, _, tokenizer, _ = node_model(cfg)
        client_examples(cfg, tokenizer, 0, int(cfg.federation.num_clients))
    except Exception as exc:  # noqa: BLE001 - the first message reports it
        log.debug("worker warm-up skipped: %s", exc)
