"""Analytic communication calculator.

    python -m experiments.comm --model mistral-7b --r 32 --clients 10
    python -m experiments.comm --model llama-2-7b --method fedsb --r 200 --rounds 50
    python -m experiments.comm --model llama-2-7b --ranks 2,2,4,4,8,8

Prints, per method (and per rank tier with ``--ranks``, one rank per client), the
parameters one client sends up and gets down per round, in float32 MB per client and
over all the clients of the tier, one-time costs (Fed-SB's federated
initialisation) and the run's total. Every client takes part in every round; the
downlink is each client's own rank's share (the server truncates it per rank) plus
what the method folds into the base weights (FLoRA's stack of every reply). Where
the per-client downlink grows with the number of clients (FLoRA), a second table
shows it for 2, 4, 8, ... clients at the same rank tiers, up to where every layer
travels dense.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from fedlora.comm import (
    MODEL_SHAPES,
    client_traffic,
    dense_from,
    fold_sizes,
    layer_shapes,
    one_time_parameters,
    spread_ranks,
)
from fedlora.methods import available

METHODS = available()  # {name: Method class}, every method fedlora ships


def table(
    model: str,
    methods: list[str],
    ranks: dict[str, list[int]],
    rounds: int,
    dtype_bytes: int = 4,
) -> list[dict[str, Any]]:
    """One row per method and rank tier (``ranks[method]``: every client's rank):
    per-client parameters up and down per round, MB per client and over the
    tier's clients, one-time MB per client and the tier's run total in GB."""
    shapes = layer_shapes(model)
    rows = []
    for method in methods:
        obj = METHODS[method]()
        for r, n in sorted(Counter(ranks[method]).items()):
            up, down = client_traffic(shapes, r, ranks[method], obj)
            once_up, once_down = one_time_parameters(shapes, r, obj)
            rows.append(
                {
                    "method": method,
                    "r": r,
                    "clients": n,
                    "params_up_per_client_round": up,
                    "params_down_per_client_round": down,
                    "MB_up_per_client_round": up * dtype_bytes / 1e6,
                    "MB_down_per_client_round": down * dtype_bytes / 1e6,
                    "MB_up_round_tier": up * dtype_bytes * n / 1e6,
                    "MB_down_round_tier": down * dtype_bytes * n / 1e6,
                    "one_time_MB_per_client": (once_up + once_down) * dtype_bytes / 1e6,
                    "total_GB_run_up_and_down": (
                        (up + down) * rounds + once_up + once_down
                    )
                    * dtype_bytes
                    * n
                    / 1e9,
                }
            )
    return rows


def growing_downlink(method: str, ranks: list[int]) -> bool:
    """Whether ``method``'s per-client downlink grows with the number of clients
    (as counted by its ``round_traffic``: the same tiers on twice the clients, on a
    layer too large for anything to travel dense)."""
    shapes, obj = [(2**40, 2**40)], METHODS[method]()
    r = min(ranks)
    return (
        client_traffic(shapes, r, ranks * 2, obj)[1]
        > client_traffic(shapes, r, ranks, obj)[1]
    )


def growth(
    model: str, method: str, ranks: list[int], dtype_bytes: int = 4
) -> list[dict[str, Any]]:
    """``method``'s per-client downlink on 2, 4, 8, ... clients with ``ranks``'
    tiers spread over them (:func:`fedlora.comm.spread_ranks`), up to the first
    count at which every layer's fold travels dense; with the fold's size as a
    stack, dense, and as sent (each layer the smaller)."""
    shapes, obj = layer_shapes(model), METHODS[method]()
    rows, clients = [], 2
    while True:
        spread = spread_ranks(ranks, clients)
        down = [client_traffic(shapes, r, spread, obj)[1] for r in sorted(set(spread))]
        fold = fold_sizes(shapes, sum(spread))
        rows.append(
            {
                "clients": clients,
                "sum_r": sum(spread),
                "fold_stacked_MB": fold["stacked"] * dtype_bytes / 1e6,
                "fold_dense_MB": fold["dense"] * dtype_bytes / 1e6,
                "fold_sent_MB": fold["sent"] * dtype_bytes / 1e6,
                "dense_layers": fold["dense_layers"],
                "layers": len(shapes),
                "MB_down_per_client_round": [d * dtype_bytes / 1e6 for d in down],
                "GB_down_round_all_clients": sum(
                    client_traffic(shapes, r, spread, obj)[1] for r in spread
                )
                * dtype_bytes
                / 1e9,
            }
        )
        if fold["dense_layers"] == len(shapes):
            return rows
        clients *= 2


def print_table(rows: list[dict[str, Any]], tiers: bool) -> None:
    """The per-method table (``tiers``: a line per rank tier and a total)."""
    print(
        f"{'method':<12} {'r':>4} {'clients':>7} {'params up/client':>17} "
        f"{'params down/client':>19} {'MB up/client':>13} {'MB down/client':>15} "
        f"{'MB up/round':>12} {'MB down/round':>14} {'one-time MB/client':>19} "
        f"{'run GB':>8}"
    )
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    for method, own in by_method.items():
        for row in own:
            print(
                f"{method:<12} {row['r']:>4} {row['clients']:>7} "
                f"{row['params_up_per_client_round']:>17,} "
                f"{row['params_down_per_client_round']:>19,} "
                f"{row['MB_up_per_client_round']:>13.1f} "
                f"{row['MB_down_per_client_round']:>15.1f} "
                f"{row['MB_up_round_tier']:>12.1f} {row['MB_down_round_tier']:>14.1f} "
                f"{row['one_time_MB_per_client']:>19.1f} "
                f"{row['total_GB_run_up_and_down']:>8.2f}"
            )
        if tiers and len(own) > 1:
            print(
                f"{method:<12} {'all':>4} {sum(r['clients'] for r in own):>7} "
                f"{'':>17} {'':>19} {'':>13} {'':>15} "
                f"{sum(r['MB_up_round_tier'] for r in own):>12.1f} "
                f"{sum(r['MB_down_round_tier'] for r in own):>14.1f} {'':>19} "
                f"{sum(r['total_GB_run_up_and_down'] for r in own):>8.2f}"
            )


def print_growth(model: str, method: str, ranks: list[int], rows: list[dict]) -> None:
    """The downlink-growth table and where each layer shape turns dense."""
    tiers = ",".join(map(str, sorted(set(ranks))))
    print(
        f"\n{method}: the downlink grows with the clients (tiers {tiers} spread over "
        "them); the fold travels per layer as the stack or dense, whichever is "
        "smaller"
    )
    print(
        f"{'clients':>7} {'sum r_k':>8} {'stack MB':>10} {'dense MB':>10} "
        f"{'fold sent MB':>13} {'dense layers':>13} {'MB down/client':>22} "
        f"{'GB down/round':>14}"
    )
    for row in rows:
        low, high = (f(row["MB_down_per_client_round"]) for f in (min, max))
        span = f"{low:.1f}" if low == high else f"{low:.1f}..{high:.1f}"
        print(
            f"{row['clients']:>7} {row['sum_r']:>8} {row['fold_stacked_MB']:>10.1f} "
            f"{row['fold_dense_MB']:>10.1f} {row['fold_sent_MB']:>13.1f} "
            f"{row['dense_layers']:>6}/{row['layers']:<6} {span:>22} "
            f"{row['GB_down_round_all_clients']:>14.2f}"
        )
    for d_out, d_in in sorted(set(layer_shapes(model))):
        k = dense_from(d_out, d_in)
        n = next(c for c in range(1, 10**7) if sum(spread_ranks(ranks, c)) >= k)
        print(
            f"  ({d_out} x {d_in}) layers travel dense from sum r_k >= {k}, {n} clients"
        )


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, print the tables (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODEL_SHAPES), default="mistral-7b")
    ap.add_argument("--method", choices=[*METHODS, "all"], default="all")
    ap.add_argument("--r", type=int, default=32, help="rank of the LoRA methods")
    ap.add_argument("--fedsb-r", type=int, default=200, help="rank of Fed-SB")
    ap.add_argument(
        "--ranks",
        help="one LoRA rank per client, e.g. 2,2,4,4,8,8 (sets the number of "
        "clients; only the methods that take a rank per client)",
    )
    ap.add_argument("--clients", type=int, help="number of clients (default 10)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON instead")
    args = ap.parse_args(argv)
    methods = list(METHODS) if args.method == "all" else [args.method]
    left_out: list[str] = []
    if args.ranks:
        client_ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
        if not client_ranks or min(client_ranks) < 1:
            ap.error(f"--ranks {args.ranks}: give positive ranks, one per client")
        if args.clients is not None and args.clients != len(client_ranks):
            ap.error(
                f"--clients {args.clients} and {len(client_ranks)} ranks: the rank "
                "list has one rank per client; drop --clients"
            )
        left_out = [m for m in methods if not METHODS[m].accepts_client_ranks]
        methods = [m for m in methods if METHODS[m].accepts_client_ranks]
        ranks = {m: client_ranks for m in methods}
    else:
        clients = 10 if args.clients is None else args.clients
        ranks = {
            m: [args.fedsb_r if m == "fedsb" else args.r] * clients for m in methods
        }
    rows = table(args.model, methods, ranks, args.rounds)
    growing = {
        m: growth(args.model, m, ranks[m])
        for m in methods
        if growing_downlink(m, ranks[m])
    }
    if args.json:
        print(json.dumps({"rows": rows, "left_out": left_out, "growth": growing}))
        return
    n = len(next(iter(ranks.values()))) if ranks else 0
    print(
        f"{args.model}: {len(layer_shapes(args.model))} adapted matrices, "
        f"{n} clients{' (ranks ' + args.ranks + ')' if args.ranks else ''}, "
        f"{args.rounds} round(s), float32; per round from round 2 on, every "
        "client in every round"
    )
    if rows:
        print_table(rows, tiers=bool(args.ranks))
    if left_out:
        print(
            f"left out (one rank on every client, no adapter.client_ranks): "
            f"{', '.join(left_out)}"
        )
    for method, growth_rows in growing.items():
        print_growth(args.model, method, ranks[method], growth_rows)


if __name__ == "__main__":
    main()
