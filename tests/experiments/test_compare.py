"""The method comparison: learning-rate selection, tables and resuming on fabricated
runs (no training), and ``--quick`` end to end on the tiny BERT (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from experiments import compare
from fedlora.errors import ConfigError
from tests.conftest import REPO


def summary(acc, strategy="fedavg_lora", federated=None, wall=10.0):
    """A run's summary.json; ``federated``: FedSA-LoRA's personalised accuracy."""
    out = {
        "strategy": strategy,
        "final_eval_accuracy": acc,
        "best_eval_accuracy": acc + 0.01,
        "total_bytes_up": 2e6,
        "total_bytes_down": 3e6,
        "mean_aggregation_error": 0.1,
        "wall_time": wall,
    }
    if federated is not None:
        out.update(
            main_metric="federated_eval_accuracy",
            final_federated_eval_accuracy=federated,
            best_federated_eval_accuracy=federated,
            mean_aggregation_error=None,
        )
    return out


def fake_run(summary_dict):
    rows = [
        {"round": 0, "eval_accuracy": 0.5, "bytes_up": 0, "bytes_down": 0},
        {
            "round": 1,
            "eval_accuracy": summary_dict["final_eval_accuracy"],
            "federated_eval_accuracy": summary_dict.get(
                "final_federated_eval_accuracy"
            ),
            "bytes_up": 2e6,
            "bytes_down": 3e6,
        },
    ]
    return {"summary": summary_dict, "rows": rows, "dir": "x"}


# --- selection ----------------------------------------------------------------------
def test_chosen_lr_is_the_argmax_first_on_ties_and_failed_runs_never_win():
    assert compare.choose_lr({"1e-3": 0.6, "3e-3": 0.8, "1e-2": 0.7}) == "3e-3"
    assert compare.choose_lr({"1e-3": 0.8, "3e-3": 0.8, "1e-2": 0.7}) == "1e-3"
    assert compare.choose_lr({"1e-3": None, "3e-3": 0.5, "1e-2": None}) == "3e-3"
    assert compare.choose_lr({"1e-3": None, "3e-3": None}) is None


def test_fedsa_lora_is_judged_by_its_main_metric_not_the_server_accuracy():
    sweep = {
        "fedavg_lora": {
            "1e-3": fake_run(summary(0.70)),
            "1e-2": fake_run(summary(0.80)),
        },
        # the server's accuracy (initial B) would pick 1e-3; the personalised 1e-2
        "fedsa_lora": {
            "1e-3": fake_run(summary(0.75, "fedsa_lora", federated=0.60)),
            "1e-2": fake_run(summary(0.55, "fedsa_lora", federated=0.90)),
        },
        "rolora": {"1e-3": fake_run(summary(0.65)), "1e-2": None},  # failed run
    }
    scores = compare.sweep_scores(sweep)
    assert scores["fedsa_lora"] == {"1e-3": 0.60, "1e-2": 0.90}
    chosen = {k: compare.choose_lr(v) for k, v in scores.items()}
    assert chosen == {"fedavg_lora": "1e-2", "fedsa_lora": "1e-2", "rolora": "1e-3"}
    table = compare.sweep_markdown(scores, seed=0)
    assert "| fedavg_lora | 70.0 | **80.0** |" in table
    assert "| fedsa_lora | 60.0 | **90.0** |" in table
    assert "| rolora | **65.0** | failed |" in table


def test_edge_of_the_sweep_is_flagged_only_with_three_or_more_lrs():
    lrs = ["1e-3", "3e-3", "1e-2"]
    assert compare.at_edge("1e-2", lrs) and compare.at_edge("1e-3", lrs)
    assert not compare.at_edge("3e-3", lrs)
    assert not compare.at_edge("1e-2", ["1e-3", "1e-2"])


def test_final_table_is_mean_and_std_over_seeds_with_the_chosen_lr():
    groups = {
        "fedavg_lora": [fake_run(summary(0.70)), fake_run(summary(0.80, wall=20))],
        "fedsa_lora": [
            fake_run(summary(0.5, "fedsa_lora", federated=0.9)),
            fake_run(summary(0.5, "fedsa_lora", federated=0.8)),
        ],
    }
    figures, table = compare.final_tables(
        groups, {"fedavg_lora": "1e-2", "fedsa_lora": "3e-3"}
    )
    assert figures["fedavg_lora"]["lr"] == "1e-2"
    assert figures["fedavg_lora"]["final_acc"]["mean"] == pytest.approx(0.75)
    assert figures["fedavg_lora"]["mb"]["values"] == [5.0, 5.0]
    assert figures["fedsa_lora"]["final_acc"]["values"] == [0.9, 0.8]
    assert figures["fedsa_lora"]["server_final_acc"]["values"] == [0.5, 0.5]
    assert figures["fedsa_lora"]["aggregation_error"]["n"] == 0
    lines = table.splitlines()
    assert lines[0].startswith("| strategy | lr | runs | final acc (%) |")
    assert "server final acc (%)" in lines[0]
    assert lines[2] == (
        "| fedavg_lora | 1e-2 | 2 | 75.0 ± 7.1 | 76.0 ± 7.1 | 75.0 ± 7.1 | 5.0 ± 0.0 "
        "| 0.100 ± 0.000 | 15 ± 7 |"
    )
    assert lines[3] == (
        "| fedsa_lora | 3e-3 | 2 | 85.0 ± 7.1 † | 85.0 ± 7.1 † | 50.0 ± 0.0 "
        "| 5.0 ± 0.0 | - | 10 ± 0 |"
    )
    assert "† fedsa_lora: accuracy is its main metric, `federated_eval_accuracy`" in (
        table
    )


# --- arguments ----------------------------------------------------------------------
def test_variant_splits_overrides_outside_brackets_and_names_its_strategy():
    arm = compare.parse_variant(
        "fedavg_lora+adam:server_optimizer=adam,server_optimizer.eta=1e-3,"
        "adapter.target_modules=[query,value]"
    )
    assert arm == compare.Arm(
        "fedavg_lora+adam",
        "fedavg_lora",
        (
            "server_optimizer=adam",
            "server_optimizer.eta=1e-3",
            "adapter.target_modules=[query,value]",
        ),
    )
    for bad in ("fedavg_lora:server_optimizer=adam", "fedavg_lora+adam", "x+y: "):
        with pytest.raises(ConfigError, match="METHOD\\+TAG:OVERRIDE"):
            compare.parse_variant(bad)


def test_default_methods_are_every_shared_rank_method_available():
    from fedlora.methods import available

    args = compare.parse_args(["--quick"])
    names = compare.default_methods(compare.base_overrides(args), [])
    assert names == sorted(available())  # every shipped method shares one rank
    assert {"fedavg_lora", "ffa_lora", "fedsb", "lora_fair", "rolora"} <= set(names)


def test_a_method_giving_clients_their_own_rank_is_recognised():
    base = compare.base_overrides(compare.parse_args(["--quick"]))
    assert compare.per_client_rank(
        [*base, "strategy._target_=tests.toy_methods.ToyRanks"]
    )
    assert not compare.per_client_rank([*base, "strategy=fedavg_lora"])


def test_bad_lrs_seeds_and_a_missing_sst2_folder_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        compare.main(["--quick", "--lrs", "1e-3,fast", "--out", str(tmp_path)])
    assert "--lrs='fast': every learning rate must be" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="distinct learning rates"):
        compare.learning_rates("1e-3,0.001")
    for bad in ("0,x", "1,1", ""):
        with pytest.raises(ConfigError, match="distinct integers"):
            compare.seed_list(bad)
    with pytest.raises(ConfigError, match="train.tsv"):
        compare.base_overrides(compare.parse_args(["--data", str(tmp_path)]))


# --- the comparison on a fake launcher ------------------------------------------------
ACC = {  # (method, lr) -> final accuracy on seed 0; later seeds add 0.01 * seed
    ("fedavg_lora", "1e-3"): 0.61,
    ("fedavg_lora", "1e-2"): 0.72,
    ("ffa_lora", "1e-3"): 0.83,
    ("ffa_lora", "1e-2"): 0.64,
}


class FakeLauncher:
    """Writes what a run writes (summary, metrics, Hydra's overrides); ``fail``:
    specs that exit 1."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def accuracy(self, spec):
        return ACC[(spec.arm.strategy, spec.lr)] + 0.01 * spec.seed

    def __call__(self, spec, overrides, run_dir, log):
        self.calls.append((spec.arm.label, spec.lr, spec.seed))
        if (spec.arm.label, spec.lr, spec.seed) in self.fail:
            return 1
        s = summary(self.accuracy(spec), spec.arm.strategy)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (run_dir / "summary.json").write_text(json.dumps(s))
        rows = fake_run(s)["rows"]
        (run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
        return 0


def run_compare(tmp_path, launcher, *extra):
    argv = ["--quick", "--out", str(tmp_path), "--lrs", "1e-3,1e-2", "--seeds"]
    argv += ["0,1,2", *extra]
    args = compare.parse_args(argv)
    args.argv = argv
    return compare.compare(args, launcher)


def test_sweep_then_seeds_at_the_chosen_lr_and_an_interrupted_run_resumes(
    tmp_path, capsys
):
    launcher = FakeLauncher()
    result = run_compare(tmp_path, launcher)
    # phase 1: 2 methods x 2 lrs on seed 0; phase 2: seeds 1, 2 at the chosen lr
    assert launcher.calls == [
        ("fedavg_lora", "1e-3", 0),
        ("fedavg_lora", "1e-2", 0),
        ("ffa_lora", "1e-3", 0),
        ("ffa_lora", "1e-2", 0),
        ("fedavg_lora", "1e-2", 1),
        ("fedavg_lora", "1e-2", 2),
        ("ffa_lora", "1e-3", 1),
        ("ffa_lora", "1e-3", 2),
    ]
    assert result["chosen_lr"] == {"fedavg_lora": "1e-2", "ffa_lora": "1e-3"}
    assert result["final"]["ffa_lora"]["final_acc"]["values"] == pytest.approx(
        [0.83, 0.84, 0.85]
    )
    assert len(result["runs"]) == 8 and not result["failed"]
    out = capsys.readouterr().out
    assert "[compare] run 8/8: ffa_lora lr=1e-3 seed 2 ... 85.0% in " in out
    on_disk = json.loads((tmp_path / "compare.json").read_text())
    assert on_disk["sweep"]["ffa_lora"] == {"1e-3": 0.83, "1e-2": 0.64}
    md = (tmp_path / "compare.md").read_text()
    assert "| ffa_lora | **83.0** | 64.0 |" in md
    assert "| ffa_lora | 1e-3 | 3 | 84.0 ± 1.0 |" in md
    assert (tmp_path / "accuracy_vs_round.png").is_file()
    assert (tmp_path / "accuracy_vs_mb.png").is_file()

    # an interrupted run (folder without summary) is run again, the rest found
    partial = tmp_path / "runs" / "ffa_lora" / "lr1e-3_seed2"
    (partial / "summary.json").unlink()
    again = FakeLauncher()
    result = run_compare(tmp_path, again)
    assert again.calls == [("ffa_lora", "1e-3", 2)]
    assert "run 1/8: fedavg_lora lr=1e-3 seed 0 ... 61.0% already done" in (
        capsys.readouterr().out
    )
    assert [r["status"] for r in result["runs"]].count("found") == 7


def test_runs_made_with_other_settings_are_refused(tmp_path):
    run_compare(tmp_path, FakeLauncher())
    with pytest.raises(ConfigError, match="federation.rounds"):
        run_compare(tmp_path, FakeLauncher(), "--rounds", "2")


def test_a_failed_run_is_recorded_and_left_out_and_main_exits_1(tmp_path, monkeypatch):
    launcher = FakeLauncher(fail={("fedavg_lora", "1e-2", 0), ("ffa_lora", "1e-3", 2)})
    monkeypatch.setattr(compare, "launch", launcher)
    argv = ["--quick", "--out", str(tmp_path), "--lrs", "1e-3,1e-2", "--seeds", "0,1,2"]
    with pytest.raises(SystemExit, match="2 run\\(s\\) failed"):
        compare.main(argv)
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["chosen_lr"]["fedavg_lora"] == "1e-3"  # its best lr failed
    assert [(r["label"], r["lr"], r["seed"]) for r in result["failed"]] == [
        ("fedavg_lora", "1e-2", 0),
        ("ffa_lora", "1e-3", 2),
    ]
    assert result["final"]["ffa_lora"]["runs"] == 2
    assert "Failed runs (left out)" in (tmp_path / "compare.md").read_text()


# --- end to end ---------------------------------------------------------------------
@pytest.mark.slow
def test_quick_comparison_end_to_end_on_the_tiny_bert(tmp_path, tiny_bert):
    """2 methods x 2 lrs x 2 seeds, 1 round, through ``python -m experiments.run``."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "experiments.compare", "--quick", "--out", str(out)]
    cmd += [f"model.name={tiny_bert}", "train.batch_size=16", "train.max_length=32"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[compare] run 6/6: ffa_lora" in proc.stdout
    result = json.loads((out / "compare.json").read_text())
    assert result["settings"]["methods"] == ["fedavg_lora", "ffa_lora"]
    assert len(result["runs"]) == 6 and not result["failed"]
    for label in ("fedavg_lora", "ffa_lora"):
        # the chosen lr is the argmax of the seed-0 runs as they lie on disk
        finals = {
            lr: json.loads(
                (out / "runs" / label / f"lr{lr}_seed0" / "summary.json").read_text()
            )["final_eval_accuracy"]
            for lr in ("1e-3", "1e-2")
        }
        assert result["chosen_lr"][label] == max(finals, key=finals.get)
        chosen = result["chosen_lr"][label]
        seed1 = out / "runs" / label / f"lr{chosen}_seed1" / "summary.json"
        assert seed1.is_file()
        assert result["final"][label]["final_acc"]["n"] == 2
        # one evaluation rule for all: every client evaluates every round
        rows = out / "runs" / label / f"lr{chosen}_seed1" / "metrics.jsonl"
        last = json.loads(rows.read_text().splitlines()[-1])
        assert last.get("federated_eval_accuracy") is not None
    for name in ("compare.md", "accuracy_vs_round.png", "accuracy_vs_mb.png"):
        assert (out / name).is_file()
    assert "Learning-rate sweep" in (out / "compare.md").read_text()
    # the same command again finds every run (Hydra's recorded overrides match)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("already done") == 6
