"""End to end, per method: what is frozen stays identical everywhere, only the
method's parts travel, and exact methods report ~0 aggregation error."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from fedlora.adapters import get_frozen_state
from fedlora.build import build
from fedlora.settings import Settings
from tests.conftest import run_front_door

pytestmark = pytest.mark.slow


def crc(state):
    value = 0
    for key, array in sorted(state.items()):
        value = zlib.crc32(array.tobytes(), zlib.crc32(key.encode(), value))
    return value


def client_crcs(rows):
    return {c["frozen-crc"] for r in rows[1:] for c in r["client_replies"]}


def test_ffa_lora_a_is_identical_everywhere_and_never_changes(tiny_bert, tmp_path):
    rows = run_front_door(tmp_path / "run", tiny_bert, "strategy=ffa_lora")
    cfg = Settings.from_dict(
        yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    )
    server_a = get_frozen_state(build(cfg)[0])
    assert client_crcs(rows) == {crc(server_a)}  # bit-identical on every client, always
    for r in rows[1:]:
        assert r["aggregation_error"] < 1e-5
        per_client = r["params_up"] / r["clients"]
        assert per_client == 4 * 32 * 8 + 2 * 32 + 2  # B of 4 layers (32 x 8) + head


def test_fedsb_sends_only_r_after_the_initial_broadcast(tiny_bert, tmp_path):
    rows = run_front_door(tmp_path / "run", tiny_bert, "strategy=fedsb", "adapter.r=8")
    assert len(client_crcs(rows)) == 1  # the same B and A on every client, every round
    init, first, second = rows
    assert init["clients"] == 3 and init["params_up"] == 3 * 4 * 32 * 32  # gradients
    r_and_head = 4 * 8 * 8 + 2 * 32 + 2
    for r in (first, second):
        assert r["aggregation_error"] < 1e-5
        assert r["params_up"] == r["params_down"] == 3 * r_and_head
    # B and A (4 layers x 2 x 32 x 8 float32) went down in round 1 only
    assert first["bytes_down"] - second["bytes_down"] > 3 * 4 * 2 * 32 * 8 * 4 * 0.9
    assert second["bytes_down"] < 3 * (r_and_head * 4 + 12_000)  # R + head + config
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["total_bytes_up"] >= init["bytes_up"]  # the init round is counted


def test_lora_fair_runs_and_exports_a_plain_lora_adapter(tiny_bert, tmp_path):
    rows = run_front_door(
        tmp_path / "run", tiny_bert, "strategy=lora_fair", "strategy.solver=ridge"
    )
    assert all(r["aggregation_error"] > 0 for r in rows[1:])
    config = json.loads(
        (tmp_path / "run" / "adapter" / "adapter_config.json").read_text()
    )
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert np.isfinite(rows[-1]["eval_loss"])


def test_rolora_sends_one_factor_a_round_and_is_exact(tiny_bert, tmp_path):
    rows = run_front_door(tmp_path / "run", tiny_bert, "strategy=rolora")
    factor, head = 4 * 32 * 8, 2 * 32 + 2  # one factor of 4 layers (32 x 8)
    for r in rows[1:]:
        assert r["aggregation_error"] < 1e-5
        assert r["params_up"] == 3 * (factor + head)
    # down: both factors to the new nodes of round 1, then the changed one only
    assert rows[1]["params_down"] == 3 * (2 * factor + head)
    assert rows[2]["params_down"] == 3 * (factor + head)


def test_fedsa_lora_keeps_b_on_each_node_across_rounds(tiny_bert, tmp_path):
    rows = run_front_door(tmp_path / "run", tiny_bert, "strategy=fedsa_lora")
    a_and_head = 4 * 8 * 32 + 2 * 32 + 2
    for r in rows[1:]:
        assert r["params_up"] == r["params_down"] == 3 * a_and_head
        assert r["aggregation_error"] is None  # the server never sees B
        assert "federated_eval_accuracy" in r
    # every node kept its own B from round 1 into round 2 (Flower's node state)
    assert [c["local-rounds"] for c in rows[2]["client_replies"]] == [2, 2, 2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["main_metric"] == "federated_eval_accuracy"
    assert (
        summary["final_federated_eval_accuracy"] == rows[-1]["federated_eval_accuracy"]
    )


def test_a_server_optimizer_with_fedprox_resumes_bit_identically(tiny_bert, tmp_path):
    """RoLoRA + Adam at the server + FedProx in the clients, 3 rounds in one go
    against 2 rounds and a resume: the same adapter to the bit (the optimizer's
    moments are in the checkpoint)."""
    run = [
        "strategy=rolora",
        "server_optimizer=adam",
        "server_optimizer.eta=1e-3",
        "server_optimizer.tau=1e-6",
        "train.proximal_mu=0.1",
    ]
    whole = run_front_door(tmp_path / "whole", tiny_bert, *run, "federation.rounds=3")
    out = tmp_path / "resumed"
    run_front_door(out, tiny_bert, *run, "federation.rounds=2")
    rows = run_front_door(out, tiny_bert, *run, f"resume={out}", "federation.rounds=3")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    adapter = "adapter/adapter_model.safetensors"
    a = load_file(str(tmp_path / "whole" / adapter))
    b = load_file(str(out / adapter))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert rows[3]["eval_loss"] == whole[3]["eval_loss"]


@pytest.mark.parametrize(
    "strategy,export_rank",
    [("fedavg_lora", None), ("hetlora", 2), ("flexlora", 4)],
)
def test_a_rank_per_client_pads_to_the_global_rank(
    tiny_bert, tmp_path, strategy, export_rank
):
    """Ranks [2, 4, 8] on 3 clients, global rank 8: the zero-padding baseline
    (fedavg_lora), HetLoRA and FlexLoRA. Round 1 goes down at the global rank
    (ranks unknown yet), round 2 at each node's rank. Each exports a PEFT adapter
    that loads, at the largest client rank (8, the adapter as trained) or at
    ``export.rank``."""
    from peft import PeftModel

    from fedlora.models import load_base_model

    rows = run_front_door(
        tmp_path / "run",
        tiny_bert,
        f"strategy={strategy}",
        "adapter.r=8",
        "adapter.client_ranks=[2,4,8]",
        *([f"export.rank={export_rank}"] if export_rank else []),
    )
    for r in rows[1:]:
        assert r["clients"] == 3 and r["rejected"] == []
        ranks = sorted(c["adapter-rank"] for c in r["client_replies"])
        assert ranks == [2, 4, 8]
        up = r["bytes_up_by_rank"]
        assert set(up) == {"2", "4", "8"}
        assert up["2"] < up["4"] < up["8"]  # each tier sends its own rank's factors
        # as sent: each client's own rank (the server pads after receiving)
        assert r["params_up"] == 4 * 2 * 32 * (2 + 4 + 8) + 3 * (2 * 32 + 2)
        down = r["bytes_down_by_rank"]
        assert set(down) == {"2", "4", "8"}
        assert sum(down.values()) == r["bytes_down"]
        if r["round"] == 1:
            assert len(set(down.values())) == 1
        else:
            assert down["2"] < down["4"] < down["8"]
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["export_rank"] == config["r"] == (export_rank or 8)
    if export_rank is None:  # as trained: rank 8, alpha 16, nothing dropped
        assert config["lora_alpha"] == 16 and summary["export_truncation_error"] == 0
    else:  # the truncated SVD at scale 1
        assert config["lora_alpha"] == export_rank
        assert 0 < summary["export_truncation_error"] < 1
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert {v.shape[0] for k, v in saved.items() if ".lora_A." in k} == {config["r"]}
    cfg = Settings.from_dict(
        yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    )
    PeftModel.from_pretrained(load_base_model(cfg.model, seed=0), str(adapter))


def test_flora_is_exact_and_a_node_that_lost_its_state_catches_up(tiny_bert, tmp_path):
    """FLoRA, ranks [2, 4, 8], 4 rounds; partition 1's node loses its node state at
    the start of round 3 (a restart). The folds it gets continue from a round it no
    longer holds, so it refuses that round; the server then sends it the whole
    sum, and in round 4 every node holds the same base weights."""
    out = tmp_path / "run"
    rows = run_front_door(
        out,
        tiny_bert,
        "strategy=flora",
        "adapter.r=8",
        "adapter.client_ranks=[2,4,8]",
        "federation.rounds=4",
        "+faults.forget_partition=1",
        "+faults.forget_round=3",
    )
    assert all(r["aggregation_error"] < 1e-6 for r in rows[1:])  # exact
    assert rows[1]["bytes_down_folds_eval"] > 0  # the stack goes down (with eval)
    assert all(
        sum(r["bytes_down_by_rank"].values()) == r["bytes_down"] for r in rows[1:]
    )
    [failure] = rows[3]["failure_reasons"]
    assert "continue from round" in failure["reason"]
    last = rows[4]["client_replies"]
    assert len(last) == 3 and {c["base-round"] for c in last} == {3}
    norms = [c["base-norm"] for c in last]
    np.testing.assert_allclose(norms, norms[0], rtol=1e-6)
    assert (out / "adapter" / "merged_delta.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["export_rank"] == 8 and 0 <= summary["export_truncation_error"] < 1
