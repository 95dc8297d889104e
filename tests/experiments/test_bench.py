"""The performance benchmark's building blocks, at toy sizes (no timings asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import bench


@pytest.mark.parametrize("method", ["fedavg_lora", "ffa_lora", "fedsb", "lora_fair"])
def test_server_round_on_llama_shapes_runs_every_strategy(method):
    out = bench.server_arm(method, 4, None, clients=3, layers=1, repeats=1)
    assert out["numpy_mean_s"] > 0 and out["aggregate_train_s"] > 0
    if method in ("ffa_lora", "fedsb"):  # exact methods, through the fast diagnostic
        assert out["aggregation_error"] < 1e-5
    else:
        assert out["aggregation_error"] > 1e-3


def test_the_whole_round_is_reported_against_the_goal_with_and_without_diagnostic():
    out = bench.server_arm("fedsb", 16, None, clients=2, layers=1, repeats=1)
    for key, diagnostic in [
        ("round_ratio", "auto, the default: measured in 2 of 2 rounds after"),
        ("round_ratio_every_round", "every round"),
        ("round_ratio_no_diagnostic", "never"),
    ]:
        rr = out[key]
        assert rr["goal"] == 2.0 and rr["met"] == (rr["ratio"] <= 2.0)
        assert rr["ratio"] == pytest.approx(
            rr["aggregate_train_s"] / rr["numpy_mean_s"]
        )
        assert rr["diagnostic"].startswith(diagnostic)
    other = bench.server_arm("fedsb", 4, None, clients=2, layers=1, repeats=1)
    assert other["round_ratio"]["goal"] == "report"  # not one of the goal's cases
    assert other["round_ratio"]["met"] is None
    table = bench.table({"server": {"fedsb_r16": out}})
    assert "fedsb_r16 whole round, diagnostic never" in table


@pytest.mark.parametrize("method", bench.HETERO_STRATEGIES)
def test_server_round_with_a_rank_per_client_runs_every_heterogeneous_method(method):
    """Ranks 2, 4, 8 (global 8) on toy shapes: the replies go through the
    strategy at their own ranks (none rejected) and the padded baseline runs."""
    out = bench.server_arm(method, 8, None, 3, 1, 1, (2, 4, 8), "minilm")
    assert out["ranks"] == [2, 4, 8] and out["model"] == "minilm"
    assert out["numpy_mean_s"] > 0 and out["aggregate_train_s"] > 0
    assert set(out["aggregation_error_by_rank"]) == {"2", "4", "8"}
    if method == "flora":  # exact: the stack of every reply
        assert out["aggregation_error"] < 1e-9
    else:
        assert out["aggregation_error"] > 1e-3


def test_states_with_a_rank_per_client_are_at_each_clients_rank():
    states, sent, _ = bench.llm_states("fedavg_lora", 8, 3, 1, ranks=(2, 4, 8))
    for state, r in zip(states, (2, 4, 8), strict=True):
        assert {v.shape for k, v in state.items() if ".lora_A." in k} == {
            (r, 4096),
            (r, 11008),
        }
    assert {v.shape[0] for k, v in sent.items() if ".lora_A." in k} == {8}


def test_server_arms_are_picked_by_name_and_one_rank_takes_the_plain_diagnostic():
    """``--server-arms``: only the arms named; with one rank for every client
    (the replies report it, as the ClientApp does) the strategy runs the plain
    diagnostic, not the one for clients of different ranks."""
    case = bench.RankCase("minilm", 1, (2, 4), 1)
    out = bench.measure_server(1, 2, 1, case, only=["ffa_lora", "hetlora"])
    assert {k for k, v in out.items() if isinstance(v, dict)} == {
        "ffa_lora_r16",
        "hetlora_r2-4",
    }
    assert out["ffa_lora_r16"]["aggregation_error_by_rank"] is None
    plain = bench.server_arm("fedavg_lora", 4, None, 2, 1, 1)
    assert plain["aggregation_error_by_rank"] is None


def test_llama_shaped_states_have_the_calculators_parameter_counts():
    from fedlora.comm import layer_shapes, round_parameters
    from fedlora.methods import available

    shapes = layer_shapes("llama-2-7b")[:7]  # one decoder layer
    for method, r in [("fedavg_lora", 16), ("ffa_lora", 16), ("fedsb", 200)]:
        states, sent, _ = bench.llm_states(method, r, 1, 1)
        count = round_parameters(shapes, r, available()[method]())
        assert sum(v.size for v in sent.values()) == count
        assert states[0].keys() == sent.keys()


def test_wire_ratio_of_a_large_payload_is_within_two_percent():
    rng = np.random.default_rng(0)
    state = {f"l{i}.lora_B.weight": rng.standard_normal((512, 64)) for i in range(8)}
    out = bench.wire_ratio({k: v.astype(np.float32) for k, v in state.items()})
    assert out["raw_bytes"] == 8 * 512 * 64 * 4
    assert 1.0 <= out["ratio"] <= 1.02 and out["met"]


def test_table_has_a_row_per_figure_and_flags_unmet_goals():
    results = {
        "trainer": {
            "ours_examples_per_s": 90.0,
            "ours_ungrouped_examples_per_s": 50.0,
            "baseline_examples_per_s": 60.0,
            "ratio": 1.5,
            "ratio_ungrouped": 0.83,
            "goal": ">= 0.95",
            "met": True,
        }
    }
    rows = bench.table(results).splitlines()
    assert len(rows) == 4
    assert "| yes |" in rows[2] and "**no**" in rows[3]


def test_unknown_measurement_is_refused_with_the_choices():
    with pytest.raises(SystemExit, match="trainer"):
        bench.main(["--only", "speed"])


def test_dp_overhead_times_both_trainers_on_the_same_batches(tiny_bert, monkeypatch):
    """The overhead ratio compares like with like: the plain epoch and the DP-SGD
    epoch (no Poisson sampling) pad and run exactly the same batches."""
    from fedlora import privacy, train

    seen: dict[str, list[list[tuple[int, ...]]]] = {"plain": [], "dp": []}
    monkeypatch.setattr(bench, "dp_physical", lambda *a, **k: {})

    def recording(module, key):
        original = module.collate

        def collate(batch, pad_id):
            seen[key].append(sorted(tuple(e["input_ids"]) for e in batch))
            return original(batch, pad_id)

        monkeypatch.setattr(module, "collate", collate)

    recording(train, "plain")
    recording(privacy, "dp")
    out = bench.dp_overhead(
        [f"model.name={tiny_bert}", "data=synthetic", "train.batch_size=8"],
        n=40,
        repeats=1,
    )
    assert out["examples"] == 40 and out["repeats"] == 1
    plain = seen["plain"][-5:]  # after the warm-up epoch on 32 examples
    assert len(plain) == 5 and seen["dp"] == plain


def test_tree_memory_reports_the_roots_own_peak_even_after_it_freed_it():
    """The server's figure is its process's kernel peak mark: a spike freed
    between two samples still counts (the child's own VmHWM is the reference)."""
    import subprocess
    import sys

    code = (
        "import time\n"
        "time.sleep(0.3)\n"  # between the samples at 0 and 1 s
        "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); del b\n"
        "time.sleep(1.5)\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    ) as proc:
        with bench.TreeMemory(proc.pid, every=1.0) as mem:  # fewer samples
            out, _ = proc.communicate()
    own = int(out.split()[1]) * 1024  # kB
    assert own > 300 * 2**20
    assert mem.root_peak == pytest.approx(own, rel=0.02)


def test_scale_memory_row_flags_a_server_that_grows_with_registered_clients():
    run = {"server_peak_rss_mb": 700.0, "peak_rss_mb": 2600.0, "per_round_s": 1.0}
    out = {
        "clients": 1000,
        "baseline_clients": 100,
        "sampled_per_round": 10,
        "big": {**run, "server_peak_rss_mb": 900.0},
        "baseline": run,
        "ratio": 900 / 700,
        "tree_ratio": 1.0,
        "goal": "<= 1.1",
        "met": False,
    }
    rows = bench.table({"scale_memory": out}).splitlines()
    assert len(rows) == 3 and "1000 clients" in rows[2]
    assert "| 1.286 | <= 1.1 (tree 1.000) | **no** |" in rows[2]


def test_wire16_bytes_are_measured_through_the_strategy_each_way():
    """The step's figures are the strategy's own ``bytes_down``/``bytes_up``; the
    16-bit ones save half the float32 arrays' data (one Llama layer, r = 16)."""
    from fedlora.comm import raw_bytes

    config = bench.plain_settings(["data=synthetic"]).to_dict()
    sizes = {
        d: bench.wire16_round("llama-2-7b", 1, d, config)
        for d in ("float32", "bfloat16")
    }
    _, sent, _ = bench.llm_states("fedavg_lora", 16, 1, 1)
    for way in ("down", "up"):
        saved = sizes["float32"][f"bytes_{way}"] - sizes["bfloat16"][f"bytes_{way}"]
        assert saved == pytest.approx(raw_bytes(sent) / 2, abs=100)  # + dtype tags
    out = bench.measure_wire16(1)
    assert set(out) == {
        f"{m}_r16_{w}_{d}"
        for m in ("minilm", "llama")
        for w in ("down", "up")
        for d in ("bfloat16", "float16")
    }
    for v in out.values():
        assert v["ratio"] == pytest.approx(v["bytes"] / v["float32_bytes"])
        assert v["met"] == (v["ratio"] <= bench.WIRE16_GOAL)
    assert out["llama_r16_up_bfloat16"]["ratio"] < 0.505
    assert "wire16 llama_r16_down_float16 (1 layers)" in bench.table({"wire16": out})
