"""Secure aggregation's cost per round against the plain upload: bytes and seconds
at 10 clients, FedAvg-LoRA r=16, at MiniLM size and Llama-2-7B shapes.

``python -m experiments.bench_secagg [--models minilm llama-2-7b] [--clients 10]``

Bytes: the payloads the protocol adds (public keys, encrypted shares, the share
lists, the unmask replies) measured from a real run of the sessions, plus the masked
upload (uint32, the float32 plain upload's size, and 3 meta words); Flower's record
framing is left out on both sides. Seconds: one client's quantise-and-mask (its
``k + 1`` AES-CTR expansions; clients mask in parallel) and the server's sum and
unmask of ``K`` inputs (``K`` seed expansions; dropouts add ``k`` each).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fedlora import secagg
from fedlora.comm import MODEL_SHAPES


def entries(model: str, r: int) -> int:
    """FedAvg-LoRA's upload: ``r (d_out + d_in)`` per adapted layer."""
    layers, shapes = MODEL_SHAPES[model]
    return layers * sum(r * (d_out + d_in) for d_out, d_in in shapes)


def sessions_after_sharing(clients: int) -> tuple[list[int], dict, dict, dict]:
    """``clients`` real client sessions through key exchange and sharing (every
    client a holder of every other's shares): node ids, sessions, public keys and
    the encrypted share boxes."""
    nodes = list(range(1, clients + 1))
    sessions = {u: secagg.ClientSession.start(u, 1, 0.5) for u in nodes}
    public = {u: (s.enc.public, s.mask.public) for u, s in sessions.items()}
    boxes = {u: sessions[u].share(public) for u in nodes}
    for u in nodes:
        sessions[u].receive({v: b[u] for v, b in boxes.items() if u in b})
    return nodes, sessions, public, boxes


def protocol_bytes(clients: int) -> dict[str, int]:
    """The protocol's own messages per round, all clients, from real sessions
    (classic SecAgg: every client a holder of every other's shares)."""
    nodes, sessions, public, boxes = sessions_after_sharing(clients)
    reveals = [sessions[u].reveal(nodes, []) for u in nodes]
    keys = sum(len(e) + len(m) for e, m in public.values())
    shares = sum(len(ct) for b in boxes.values() for ct in b.values())
    ids = 8 * clients  # a packed list of node ids
    return {
        "up": keys + shares + sum(len(s) + 8 for r in reveals for s in r.values()),
        # keys to each holder, the shares forwarded, alive/dropped lists
        "down": clients * (clients * 64 + ids) + shares + clients * (ids + ids),
    }


def measure(model: str, clients: int, r: int = 16) -> dict[str, float]:
    n = entries(model, r)
    rng = np.random.default_rng(0)
    update = {"x": rng.normal(0, 0.01, n)}
    values, weights = secagg.Quantiser(0.5, clients), secagg.Quantiser(1.0, clients)
    nodes, sessions, public, boxes = sessions_after_sharing(clients)
    start = time.perf_counter()
    code, _ = secagg.encode_input(update, 0.5, False, values, weights)
    masked = sessions[1].masked(code)
    client_s = time.perf_counter() - start
    inputs = [masked] + [sessions[u].masked(code) for u in nodes[1:]]
    start = time.perf_counter()
    total = np.zeros_like(masked)
    for y in inputs:
        total += y
    shares: dict[int, list[bytes]] = {}
    for u in nodes:
        for v, s in sessions[u].reveal(nodes, []).items():
            shares.setdefault(v, []).append(s)
    codes = secagg.unmask(
        total,
        1,
        nodes,
        [],
        shares,
        {u: sessions[u].threshold for u in nodes},
        {u: s.mask.public for u, s in sessions.items()},
        {u: s.masked_with for u, s in sessions.items()},
    )
    mean, info = secagg.decode_mean(codes, {"x": (n,)}, clients, values, weights)
    server_s = time.perf_counter() - start
    start = time.perf_counter()
    plain = sum(update["x"].astype(np.float32) * np.float32(1 / clients) for _ in nodes)
    plain_s = time.perf_counter() - start
    assert np.abs(mean["x"] - plain).max() < 1e-6
    extra = protocol_bytes(clients)
    upload = 4 * n
    return {
        "entries": n,
        "plain_bytes_up": clients * upload,
        "secagg_bytes_up": clients * (upload + 4 * secagg.META_WORDS) + extra["up"],
        "secagg_protocol_bytes_down": extra["down"],
        "client_mask_s": client_s,
        "server_unmask_s": server_s,
        "server_plain_mean_s": plain_s,
        "error_bound": info["error_bound"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "llama-2-7b"])
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    out = {m: measure(m, args.clients) for m in args.models}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
