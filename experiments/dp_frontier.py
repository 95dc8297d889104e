"""Where does DP-SGD start to learn SST-2? One client, centrally, no federation.

The privacy-utility sweep (``experiments.bench_privacy``) finds every DP arm at
chance. This experiment takes the federation out and asks, on one client's data,
which data size and logical batch DP-SGD needs, with each DP arm next to its
baseline: the same run with the noise multiplier set to 0 (same Poisson batches,
same clipping, same optimizer), so any gap is the noise's doing, not the code's.

It also measures the signal that the noise competes with: the norm of the mean
clipped per-example gradient at initialisation, as a share of the clipping norm,
and how much of each example's gradient is in the classification head.

    HF_HUB_OFFLINE=1 python -m experiments.dp_frontier [--arms a,b] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

# name: (training phrases, strategy, logical batch, physical batch, local epochs)
ARMS: dict[str, tuple[int, str, int, int, int]] = {
    "n2000_b32_fedavg": (2000, "fedavg_lora", 32, 0, 1),
    "n2000_b256_fedavg": (2000, "fedavg_lora", 256, 64, 3),
    "n2000_b256_ffa": (2000, "ffa_lora", 256, 64, 3),
    "n7000_b875_fedavg": (7000, "fedavg_lora", 875, 64, 3),
    "n7000_b875_ffa": (7000, "ffa_lora", 875, 64, 3),
    "n7000_b180_fedavg": (7000, "fedavg_lora", 180, 64, 3),  # more, smaller steps
    "n7000_b180_ffa": (7000, "ffa_lora", 180, 64, 3),
    "n20000_b2500_fedavg": (20000, "fedavg_lora", 2500, 64, 3),
    "n20000_b2500_ffa": (20000, "ffa_lora", 2500, 64, 3),
}
DEFAULT = "n2000_b32_fedavg,n2000_b256_fedavg,n7000_b875_fedavg,n7000_b875_ffa"


def settings(data: Path, arm: str, epsilon: float, lr: float) -> Any:
    """Validated settings of one arm (one client holding all ``n`` phrases)."""
    from experiments.bench import plain_settings

    n, strategy, logical, physical, epochs = ARMS[arm]
    return plain_settings(
        [
            "data=sst2",
            f"data.path={data}",
            f"data.max_train_examples={n}",
            "data.max_eval_examples=400",
            "data.client_eval_fraction=0",
            "federation.num_clients=1",
            "federation.min_train_clients=1",
            "federation.rounds=1",
            f"strategy={strategy}",
            "privacy=dp_sgd",
            f"privacy.target_epsilon={epsilon}",
            f"privacy.max_physical_batch_size={physical or 'null'}",
            f"train.batch_size={logical}",
            f"train.local_epochs={epochs}",
            f"train.lr={lr}",
        ]
    )


def alignment(model: torch.nn.Module, examples: list, pad_id: int, norm: float):
    """``|mean_i clip(g_i)| / C`` over ``examples`` and the median share of each
    example's gradient norm that lies in the classification head."""
    from fedlora.train import collate

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.train()
    total = None
    shares = []
    for ex in examples:
        model.zero_grad()
        model(**collate([ex], pad_id)).loss.backward()
        flat = torch.cat([p.grad.flatten() for _, p in params])
        head = torch.cat([p.grad.flatten() for n, p in params if "classifier" in n])
        shares.append(float(head.norm() / flat.norm()))
        clipped = flat * min(1.0, norm / (float(flat.norm()) + 1e-6))
        total = clipped if total is None else total + clipped
    model.zero_grad()
    assert total is not None
    return float(total.norm()) / len(examples) / norm, float(
        torch.tensor(shares).median()
    )


def run_arm(cfg: Any, noise: bool, probe: int = 0) -> dict[str, Any]:
    """Train one DP-SGD round on the whole set (noise off: sigma = 0) and evaluate."""
    import dataclasses

    from fedlora import privacy
    from fedlora.build import build
    from fedlora.data import client_examples, server_examples
    from fedlora.train import evaluate

    model, tok = build(cfg)
    examples, _ = client_examples(cfg, tok, 0, 1)
    dev = server_examples(cfg, tok)
    plan = privacy.plan(cfg.privacy, cfg.train, len(examples), 1)
    out: dict[str, Any] = {"examples": len(examples), "sigma": plan.noise_multiplier}
    if probe:
        out["alignment"], out["head_share"] = alignment(
            model, examples[:probe], tok.pad_token_id, cfg.privacy.max_grad_norm
        )
    if not noise:
        plan = dataclasses.replace(plan, noise_multiplier=0.0)
    accountant = privacy.make_accountant(plan.accountant)
    cpu = torch.device("cpu")
    stats = privacy.train_local_dp(
        model,
        examples,
        cfg.train,
        cfg.privacy,
        plan,
        accountant,
        cpu,
        tok.pad_token_id,
        noise_seed=0,  # one party, no server: the DP and noise-free twins share
    )  # their Poisson batches
    ev = evaluate(
        model, dev, cfg.model.task, cpu, tok.pad_token_id, cfg.train.eval_batch_size
    )
    out.update(
        steps=int(stats["steps"]),
        train_s=round(stats["train_time"], 1),
        examples_per_s=round(stats["num_examples"] / stats["train_time"], 1),
        accuracy=ev["eval_accuracy"],
        eval_loss=ev["eval_loss"],
        epsilon=accountant.get_epsilon(plan.delta) if noise else 0.0,
    )
    return out


def table(results: dict[str, Any]) -> str:
    """Markdown: per arm, DP accuracy against its noise-free twin."""
    lines = [
        "| arm | examples | logical batch | steps | sigma | epsilon | acc, no noise "
        "(%) | acc, DP (%) | DP eval loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        dp = r["dp"]
        base = f"{100 * r['no_noise']['accuracy']:.1f}" if "no_noise" in r else "-"
        lines.append(
            f"| {arm} | {dp['examples']} | {ARMS[arm][2]} | {dp['steps']} | "
            f"{dp['sigma']:.2f} | {dp['epsilon']:.2f} | {base} | "
            f"{100 * dp['accuracy']:.1f} | {dp['eval_loss']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the arms (each DP run next to its noise-free twin), print, save JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/sst2")
    ap.add_argument("--out", type=Path, default=REPO / "results/dp_frontier.json")
    ap.add_argument("--arms", default=DEFAULT, help=f"comma list of {','.join(ARMS)}")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument(
        "--twins",
        default="n2000_b32_fedavg,n2000_b256_fedavg",
        help="arms that also run without noise (the baseline)",
    )
    args = ap.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms {unknown}: choose from {', '.join(ARMS)}")
    if not args.data.is_dir():
        raise SystemExit(f"--data {args.data}: no such folder (SST-2 train/dev)")
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for i, arm in enumerate(arms):
        cfg = settings(args.data, arm, args.epsilon, args.lr)
        results[arm] = {}
        if arm in args.twins.split(","):
            print(f"[frontier] {arm}: no noise ...", flush=True)
            results[arm]["no_noise"] = run_arm(cfg, noise=False)
        print(f"[frontier] {arm}: epsilon {args.epsilon:g} ...", flush=True)
        results[arm]["dp"] = run_arm(cfg, noise=True, probe=256 if i == 0 else 0)
        print(f"[frontier] {arm}: {json.dumps(results[arm])}", flush=True)
    report = {
        "epsilon": args.epsilon,
        "lr": args.lr,
        "arms": results,
        "table": table(results),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(report["table"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[frontier] written: {args.out}")


if __name__ == "__main__":
    main()
