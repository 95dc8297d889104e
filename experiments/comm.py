"""Analytic communication calculator.

    python -m experiments.comm --model mistral-7b --r 32 --clients 10
    python -m experiments.comm --model llama-2-7b --method fedsb --r 200 --rounds 50

Prints, per method, the parameters and float32 bytes one client sends up (and gets
down) per round, the per-round total over the clients, and one-time costs
(Fed-SB's federated initialisation).
"""

from __future__ import annotations

import argparse
import json

from fedlora.comm import (
    MODEL_SHAPES,
    layer_shapes,
    one_time_parameters,
    round_parameters,
)
from fedlora.methods import available

METHODS = available()  # {name: Method class}, every method fedlora ships


def table(
    model: str,
    methods: list[str],
    ranks: dict[str, int],
    clients: int,
    rounds: int,
    dtype_bytes: int = 4,
) -> list[dict[str, float]]:
    """One row per method: per-client/round parameters and bytes, run totals."""
    shapes = layer_shapes(model)
    rows = []
    for method in methods:
        r = ranks[method]
        per_round = round_parameters(shapes, r, METHODS[method]())
        once_up, once_down = one_time_parameters(shapes, r, METHODS[method]())
        rows.append(
            {
                "method": method,
                "r": r,
                "params_per_client_round": per_round,
                "MB_per_client_round": per_round * dtype_bytes / 1e6,
                "MB_per_round_all_clients_up": per_round * dtype_bytes * clients / 1e6,
                "one_time_MB_per_client": (once_up + once_down) * dtype_bytes / 1e6,
                "total_GB_run_up_and_down": (
                    2 * per_round * rounds + once_up + once_down
                )
                * dtype_bytes
                * clients
                / 1e9,
            }
        )
    return rows


def main() -> None:
    """Parse arguments, print the table (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODEL_SHAPES), default="mistral-7b")
    ap.add_argument("--method", choices=[*METHODS, "all"], default="all")
    ap.add_argument("--r", type=int, default=32, help="rank of the LoRA methods")
    ap.add_argument("--fedsb-r", type=int, default=200, help="rank of Fed-SB")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON instead")
    args = ap.parse_args()
    methods = list(METHODS) if args.method == "all" else [args.method]
    ranks = {m: (args.fedsb_r if m == "fedsb" else args.r) for m in METHODS}
    rows = table(args.model, methods, ranks, args.clients, args.rounds)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{args.model}: {len(layer_shapes(args.model))} adapted matrices, "
        f"{args.clients} clients, {args.rounds} round(s), float32"
    )
    print(
        f"{'method':<12} {'r':>4} {'params/client/round':>20} {'MB/client/round':>16} "
        f"{'one-time MB/client':>19} {'run GB (up+down)':>17}"
    )
    for row in rows:
        print(
            f"{row['method']:<12} {row['r']:>4} {row['params_per_client_round']:>20,} "
            f"{row['MB_per_client_round']:>16.1f} "
            f"{row['one_time_MB_per_client']:>19.1f} "
            f"{row['total_GB_run_up_and_down']:>17.2f}"
        )


if __name__ == "__main__":
    main()
