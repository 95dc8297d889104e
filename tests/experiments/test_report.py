"""The multirun report: one row per strategy, mean over seeds, plots written."""

from __future__ import annotations

import json

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
