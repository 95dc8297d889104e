"""``python -m experiments.comm``: the rank-list table, the left-out note and FLoRA's
downlink growth."""

from __future__ import annotations

import json

import pytest

from experiments import comm

# Llama-2-7B: 32 decoder layers, sum(d_out + d_in) = 4 * 8192 + 3 * 15104 per layer
PER_RANK = 32 * 78_080
SINGLE_RANK = ["fedex_lora", "fedsa_lora", "fedsb", "ffa_lora", "lora_fair", "rolora"]


def run(capsys, *argv: str) -> str:
    comm.main(list(argv))
    return capsys.readouterr().out


def test_a_rank_list_prints_each_tier_and_leaves_out_single_rank_methods(capsys):
    out = run(capsys, "--model", "llama-2-7b", "--ranks", "2,2,4,4,8,8")
    lines = out.splitlines()
    assert "6 clients (ranks 2,2,4,4,8,8)" in lines[0]
    for method in ("fedavg_lora", "hetlora", "flexlora", "flora"):
        tiers = [line.split()[1:3] for line in lines if line.startswith(method + " ")]
        assert tiers == [["2", "2"], ["4", "2"], ["8", "2"], ["all", "6"]]
    fedavg_8 = next(line for line in lines if line.startswith("fedavg_lora     8"))
    assert f"{8 * PER_RANK:,}" in fedavg_8  # up and down at the client's own rank
    note = next(line for line in lines if line.startswith("left out"))
    assert note.endswith(", ".join(SINGLE_RANK))
    assert not any(line.startswith(tuple(SINGLE_RANK)) for line in lines)
    # only FLoRA's downlink grows with the clients; every layer dense at the end
    assert out.count("the downlink grows with the clients") == 1
    assert "flora: the downlink grows" in out
    growth = [line.split() for line in lines if line[:7].strip().isdigit()]
    assert [int(row[0]) for row in growth] == [2**k for k in range(1, 11)]
    assert growth[0][5] == "0/224" and growth[-1][5] == "224/224"
    assert "(4096 x 4096) layers travel dense from sum r_k >= 2048, 440 clients" in out


def test_the_json_counts_flora_downlink_as_the_stack_of_every_reply(capsys):
    out = json.loads(
        run(capsys, "--model", "llama-2-7b", "--ranks", "2,2,4,4,8,8", "--json")
    )
    flora = {row["r"]: row for row in out["rows"] if row["method"] == "flora"}
    for r in (2, 4, 8):
        assert flora[r]["params_up_per_client_round"] == r * PER_RANK
        # no factors (fresh ones each round), the stack (sum r_k = 28)
        assert flora[r]["params_down_per_client_round"] == 28 * PER_RANK
    assert out["left_out"] == SINGLE_RANK
    assert list(out["growth"]) == ["flora"]
    rows = out["growth"]["flora"]
    assert [row["sum_r"] for row in rows[:3]] == [6, 16, 34]  # tiers spread
    # 4 clients of ranks 2, 2, 4, 8: the fold alone
    assert rows[1]["MB_down_per_client_round"] == pytest.approx(
        [16 * PER_RANK * 4e-6] * 3
    )
    for row in rows:  # as sent, each layer the smaller of stack and dense
        assert row["fold_sent_MB"] <= min(row["fold_stacked_MB"], row["fold_dense_MB"])
    assert (
        rows[-2]["fold_sent_MB"] < rows[-1]["fold_sent_MB"] == rows[-1]["fold_dense_MB"]
    )


def test_single_rank_table_counts_flora_stack_over_the_clients(capsys):
    out = json.loads(
        run(capsys, "--model", "llama-2-7b", "--r", "16", "--clients", "4", "--json")
    )
    rows = {row["method"]: row for row in out["rows"]}
    assert len(rows) == len(comm.METHODS) and out["left_out"] == []
    assert rows["fedavg_lora"]["params_down_per_client_round"] == 16 * PER_RANK
    assert rows["flora"]["params_down_per_client_round"] == 64 * PER_RANK  # the stack
    assert rows["fedsb"]["r"] == 200 and rows["fedsb"]["clients"] == 4


def test_a_rank_list_with_a_single_rank_method_prints_only_the_note(capsys):
    out = run(capsys, "--method", "ffa_lora", "--ranks", "2,4")
    assert "left out (one rank on every client" in out and "ffa_lora" in out
    assert "params up/client" not in out


def test_clients_that_contradict_the_rank_list_are_refused(capsys):
    with pytest.raises(SystemExit):
        comm.main(["--ranks", "2,4,8", "--clients", "4"])
    assert "one rank per client" in capsys.readouterr().err
