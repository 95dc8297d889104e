"""The multirun report: one row per strategy, mean over seeds, plots written."""

from __future__ import annotations

import json

from experiments import report
from experiments.report import curve, load_runs, markdown, plot


def fake_run(root, name, strategy, accs, err):
    run = root / name
    run.mkdir(parents=True)
    rows = [
        {"round": i, "eval_accuracy": a, "bytes_up": 1e6, "bytes_down": 1e6}
        for i, a in enumerate(accs)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(
        json.dumps(
            {
                "strategy": strategy,
                "final_eval_accuracy": accs[-1],
                "best_eval_accuracy": max(accs),
                "total_bytes_up": 3e6,
                "total_bytes_down": 3e6,
                "mean_aggregation_error": err,
                "wall_time": 10.0,
            }
        )
    )


def test_report_groups_seeds_by_strategy(tmp_path):
    fake_run(tmp_path, "0_fedavg_lora", "fedavg_lora", [0.5, 0.7, 0.8], 0.05)
    fake_run(tmp_path, "1_fedavg_lora", "fedavg_lora", [0.5, 0.6, 0.6], 0.07)
    fake_run(tmp_path, "2_fedsb", "fedsb", [0.5, 0.8, 0.9], 6e-8)
    runs = load_runs(tmp_path)
    assert {k: len(v) for k, v in runs.items()} == {"fedavg_lora": 2, "fedsb": 1}
    table = markdown(runs)
    assert (
        "| fedavg_lora | 2 | 70.0 ± 14.1 | 70.0 ± 14.1 | 6.0 ± 0.0 | 0.060 ± 0.014 |"
        in table
    )
    assert "| fedsb | 1 | 90.0 | 90.0 | 6.0 | 6.0e-08 (max) |" in table
    assert all(p.is_file() for p in plot(runs, tmp_path))


def test_a_method_with_another_main_metric_is_reported_and_plotted_by_it(tmp_path):
    """FedSA-LoRA's rows use its personalised accuracy (marked †), and the server's
    accuracy gets its own column; its missing aggregation error reads ``-``."""
    fake_run(tmp_path, "0_fedavg_lora", "fedavg_lora", [0.5, 0.7], 0.05)
    run = tmp_path / "1_fedsa_lora"
    fake_run(tmp_path, run.name, "fedsa_lora", [0.5, 0.52], None)
    summary = json.loads((run / "summary.json").read_text())
    summary.update(main_metric="federated_eval_accuracy")
    summary.update(final_federated_eval_accuracy=0.9, best_federated_eval_accuracy=0.9)
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    rows[1]["federated_eval_accuracy"] = 0.9  # round 0 has none
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = load_runs(tmp_path)
    table = markdown(runs)
    head = "| strategy | runs | final acc (%) | best acc (%) | server final acc (%) |"
    assert table.startswith(head)
    assert "| fedsa_lora | 1 | 90.0 † | 90.0 † | 52.0 | 6.0 | - |" in table
    assert "| fedavg_lora | 1 | 70.0 | 70.0 | 70.0 | 6.0 | 0.050 |" in table
    assert curve(runs["fedsa_lora"][0]) == ([1], [4.0], [0.9])
    assert all(p.is_file() for p in plot(runs, tmp_path))


def test_traffic_by_client_rank_is_per_reply_of_that_rank():
    """Two rounds of clients of ranks 2, 2 and 8: MB per client-round per tier."""
    replies = [{"adapter-rank": 2}, {"adapter-rank": 2}, {"adapter-rank": 8}]
    row = {
        "bytes_up_by_rank": {"2": 2_000_000, "8": 4_000_000},
        "bytes_down_by_rank": {"2": 1_000_000, "8": 4_000_000},
        "client_replies": replies,
    }
    run = {"rows": [{"round": 0}, row, row], "summary": {}, "dir": "x"}
    tiers = report.rank_traffic(run)
    assert list(tiers) == ["2", "8"]  # numeric order
    assert tiers["2"] == {"up_mb": 1.0, "down_mb": 0.5, "replies": 4}
    assert tiers["8"] == {"up_mb": 4.0, "down_mb": 4.0, "replies": 2}
    table = report.rank_markdown({"hetlora": [run, run]})
    assert "| hetlora | 2 | 1.000 ± 0.000 | 0.500 ± 0.000 |" in table
    assert report.rank_markdown({"fedavg_lora": [{"rows": [{"round": 1}]}]}) == ""


def test_a_tuned_sweep_is_reported_at_its_best_trial_by_validation(tmp_path):
    """The best trial is the highest final validation accuracy (not the highest
    test accuracy); its test accuracy is the one quoted; every trial is listed."""
    sweep = tmp_path / "fedsb"
    trials = [(3e-3, 0.70, 0.90), (1e-2, 0.80, 0.75), (1e-4, 0.80, 0.60)]
    for n, (lr, val, test) in enumerate(trials):
        fake_run(sweep, f"{n}_fedsb", "fedsb", [0.5, test], None)
        run = sweep / f"{n}_fedsb"
        summary = json.loads((run / "summary.json").read_text())
        summary["final_validation_accuracy"] = val
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "config.yaml").write_text(f"train:\n  lr: {lr}\n  local_epochs: 1\n")
    fake_run(tmp_path, "0_ffa_lora", "ffa_lora", [0.5, 0.7], None)  # not tuned
    studies = report.tuned_studies(tmp_path, load_runs(tmp_path))
    assert list(studies) == ["fedsb (fedsb)"]
    best = studies["fedsb (fedsb)"]["best"]
    assert (best["trial"], best["train.lr"], best["test_acc"]) == (1, 1e-2, 0.75)
    table = report.tuned_markdown(studies)
    assert "| fedsb (fedsb) | 3 | 1 | 0.01 | 1 | 80.0 | 75.0 |" in table
    assert "| fedsb (fedsb) | 2 | 0.0001 | 1 | 80.0 | 60.0 |" in table
