"""Why a DP run ends on the majority class: what its final model does to the dev set.

For each finished run (a folder with ``config.yaml`` and ``checkpoints/``), loads the
last checkpoint's global adapter and head, embeds the dev phrases (the head's input),
and splits each phrase's logit margin ``z_1 - z_0`` into

- a **shared** part, the same for every phrase: ``w . mean(h) + b``
  (``w``, ``b``: the head's row and bias differences), and
- a **varying** part, the only one that can tell the phrases apart:
  ``w . (h - mean(h))``, with its spread and its gap between the two classes.

It also reports how alike the embeddings are (mean pairwise cosine). When the
embeddings all point the same way, the varying part is tiny, and whatever the noise
did to the shared part decides the class of every phrase. ``--base`` zeroes every
LoRA ``B`` (Fed-SB: ``R``) first (the pretrained encoder, with the run's head), to
compare against.

    HF_HUB_OFFLINE=1 python -m experiments.dp_features RUN_DIR [RUN_DIR ...] \
        [--base] [--out results/dp_features.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def mean_pairwise_cosine(h: np.ndarray) -> float:
    """Mean cosine over all pairs ``i != j`` of rows of ``h``, in O(n d)."""
    u = h / np.linalg.norm(h, axis=1, keepdims=True)
    n = len(u)
    s = u.sum(0)
    return float((s @ s - n) / (n * (n - 1)))


def margin_split(
    h: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray
) -> dict[str, float]:
    """Split the two-class margin over embeddings ``h`` into shared and varying."""
    w = weight[1] - weight[0]
    b = float(bias[1] - bias[0])
    margin = h @ w + b
    varying = (h - h.mean(0)) @ w
    return {
        "accuracy": float(((margin > 0) == (y == 1)).mean()),
        "predicted_positive": float((margin > 0).mean()),
        "shared_margin": float(h.mean(0) @ w + b),
        "varying_std": float(varying.std()),
        "varying_class_gap": float(varying[y == 1].mean() - varying[y == 0].mean()),
        "embedding_mean_cosine": mean_pairwise_cosine(h),
        "head_norm": float(np.linalg.norm(w)),
    }


def embed(run_dir: Path, data: Path, base: bool) -> dict[str, Any]:
    """Dev embeddings, labels and head of ``run_dir``'s last checkpoint."""
    from omegaconf import OmegaConf

    from fedlora.adapters import set_frozen_state, set_state
    from fedlora.build import build
    from fedlora.checkpoint import load_latest
    from fedlora.data import server_examples
    from fedlora.settings import Settings, with_
    from fedlora.train import batches

    plain = OmegaConf.to_container(
        OmegaConf.load(run_dir / "config.yaml"), resolve=True
    )
    cfg = with_(Settings.from_dict(plain), "data.path", str(data))  # type: ignore[arg-type]
    checkpoint = load_latest(run_dir)
    if checkpoint is None:
        raise SystemExit(f"{run_dir}: no checkpoint under checkpoints/")
    state = dict(checkpoint.arrays["global"])
    if base:  # B (LoRA, FFA) or R (Fed-SB) = 0: the adapters add nothing
        state = {
            k: np.zeros_like(v) if "lora_B" in k or "lora_R" in k else v
            for k, v in state.items()
        }
    model, tokenizer = build(cfg)
    frozen = checkpoint.arrays.get("strategy.frozen")
    if frozen:  # Fed-SB's B and A, as the server sent them
        set_frozen_state(model, frozen)
    set_state(model, state)
    model.eval()
    examples = server_examples(cfg, tokenizer)  # the server's own evaluation set
    head = model.base_model.model.classifier  # PEFT's wrapper of the trained head
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    labels = []
    try:
        with torch.no_grad():
            for batch in batches(examples, 128, tokenizer.pad_token_id):
                labels.append(batch.pop("labels"))
                model(**batch)
    finally:
        hook.remove()
    weights = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if "classifier" in k}
    return {
        "h": torch.cat(seen).float().numpy(),
        "y": torch.cat(labels).numpy(),
        "weight": weights["weight"],
        "bias": weights["bias"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/sst2")
    ap.add_argument("--base", action="store_true", help="zero every LoRA B first")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for run in args.runs:
        e = embed(run, args.data, args.base)
        results[str(run)] = margin_split(e["h"], e["y"], e["weight"], e["bias"])
        print(json.dumps({"run": str(run), **results[str(run)]}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"base": args.base, "runs": results}, indent=2))
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
