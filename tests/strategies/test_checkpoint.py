"""Checkpoints and resume: the checkpoint files, the strategies' state, the refusals,
and (slow) a run resumed after round 2, also after being killed, ends exactly as an
uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from safetensors.numpy import load_file

from fedlora import checkpoint
from fedlora.errors import ConfigError
from fedlora.methods.fedavg_lora import FedAvgLoRA
from fedlora.methods.fedsb import FedSB
from strategies.strategy import LoRAStrategy
from strategies.wire import KEY_CONFIG, KEY_ROUND, state_to_record
from tests.conftest import (
    REPO,
    front_door_command,
    processes_in_group,
    run_front_door,
)


def arrays(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return {
        "global": {
            "l.lora_B.weight": rng.standard_normal((5, 2)).astype(f32),
            "l.lora_A.weight": rng.standard_normal((2, 6)).astype(f32),
            "a.head.weight": rng.standard_normal(4).astype(f32),
        },
        "strategy.frozen": {"x": rng.standard_normal((3, 3))},  # float64
        "rng": {"key": rng.integers(0, 2**32, 624, dtype=np.uint32)},
        "empty": {},
    }


def test_round_trip_is_bit_exact(tmp_path):
    state = {
        "metrics": [{"round": 0, "eval_loss": 0.5, "missing": None}],
        "strategy": {"epsilon": {"0": 1.5}},
        "nan": float("nan"),
    }
    checkpoint.save(tmp_path, 3, arrays(0), state)
    ckpt = checkpoint.load_latest(tmp_path)
    assert ckpt is not None and ckpt.round == 3
    assert ckpt.path == tmp_path / "checkpoints" / "round-000003.manifest.json"
    assert set(ckpt.arrays) == set(arrays(0))  # the empty group comes back empty
    for group, named in arrays(0).items():
        assert list(ckpt.arrays[group]) == list(named)  # in the saved order
        for name, value in named.items():
            got = ckpt.arrays[group][name]
            assert got.dtype == value.dtype and np.array_equal(got, value)
    assert ckpt.state["metrics"] == state["metrics"]
    assert np.isnan(ckpt.state["nan"])
    assert checkpoint.load_latest(tmp_path / "elsewhere") is None


def _tear_payload(folder: Path) -> None:  # a crash mid-write of the arrays
    path = folder / "round-000002.safetensors"
    path.write_bytes(path.read_bytes()[:-7])


def _flip_state_byte(folder: Path) -> None:  # silent corruption of the JSON state
    path = folder / "round-000002.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _tear_manifest(folder: Path) -> None:
    path = folder / "round-000002.manifest.json"
    path.write_bytes(path.read_bytes()[:10])


def _no_manifest(folder: Path) -> None:  # a crash before the manifest was written
    (folder / "round-000002.manifest.json").unlink()


@pytest.mark.parametrize(
    "damage", [_tear_payload, _flip_state_byte, _tear_manifest, _no_manifest]
)
def test_torn_or_corrupted_newest_checkpoint_falls_back_to_the_previous(
    tmp_path, damage
):
    checkpoint.save(tmp_path, 1, arrays(1), {"round": 1})
    checkpoint.save(tmp_path, 2, arrays(2), {"round": 2})
    damage(tmp_path / "checkpoints")
    ckpt = checkpoint.load_latest(tmp_path)
    assert ckpt is not None and ckpt.round == 1 and ckpt.state == {"round": 1}
    assert np.array_equal(
        ckpt.arrays["global"]["l.lora_B.weight"], arrays(1)["global"]["l.lora_B.weight"]
    )
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(tmp_path / "checkpoints" / "round-000002.manifest.json")
    (tmp_path / "checkpoints" / "round-000001.safetensors").write_bytes(b"")
    assert checkpoint.load_latest(tmp_path) is None  # nothing valid is left


def test_only_the_last_two_are_kept_and_an_abandoned_timeline_goes(tmp_path):
    folder = tmp_path / "checkpoints"
    for r in range(4):
        checkpoint.save(tmp_path, r, arrays(r), {"round": r})
    (folder / ".round-000004.json.123.tmp").write_text("debris of a dead writer")
    checkpoint.save(tmp_path, 4, arrays(4), {"round": 4})
    assert sorted(p.name for p in folder.iterdir()) == [
        "round-000003.json",
        "round-000003.manifest.json",
        "round-000003.safetensors",
        "round-000004.json",
        "round-000004.manifest.json",
        "round-000004.safetensors",
    ]
    # resumed from round 2 (say 3 and 4 were torn): the new round 3 replaces the
    # old timeline, and round 2 stays as the fallback
    checkpoint.save(tmp_path, 2, arrays(2), {"round": 2})
    checkpoint.save(tmp_path, 3, arrays(7), {"round": 3})
    assert sorted(p.name for p in folder.iterdir()) == [
        "round-000002.json",
        "round-000002.manifest.json",
        "round-000002.safetensors",
        "round-000003.json",
        "round-000003.manifest.json",
        "round-000003.safetensors",
    ]
    assert checkpoint.load_latest(tmp_path).state == {"round": 3}


def test_rng_states_round_trip():
    saved = checkpoint.rng_state()
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    checkpoint.set_rng_state(saved[0], json.loads(json.dumps(saved[1])))
    assert (random.random(), np.random.normal()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_rewrite_lines_replaces_extra_and_torn_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "eval_lo')
    checkpoint.rewrite_lines(path, [{"round": 0}, {"round": 1}])
    assert path.read_text() == '{"round": 0}\n{"round": 1}\n'


# --- the strategies' side ----------------------------------------------------------
class FakeGrid:
    def get_node_ids(self):
        return [11, 12, 13]


def test_round_offset_keeps_the_real_round_numbers(task_identity):
    strategy = LoRAStrategy(FedAvgLoRA(), min_available_nodes=1)
    strategy.round_offset = 2
    record = state_to_record(arrays(0)["global"])
    messages = list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid()))
    assert {m.content[KEY_CONFIG][KEY_ROUND] for m in messages} == {3}
    assert list(strategy.round_log) == [3]
    messages = list(strategy.configure_evaluate(1, record, ConfigRecord(), FakeGrid()))
    assert {m.content[KEY_CONFIG][KEY_ROUND] for m in messages} == {3}


def test_fedsb_state_round_trips_and_every_node_gets_the_factors_again():
    frozen = {
        "l.lora_B.weight": np.arange(6.0).reshape(3, 2),
        "l.lora_A.weight": np.ones((2, 4)),
    }
    old = LoRAStrategy(FedSB(init="random_orthogonal"), min_available_nodes=1)
    old.frozen, old.failed_rounds = frozen, 1
    old.holdings.frozen = {11, 12}
    old.epsilon = {0: 1.25}
    groups, state = old.checkpoint_state()
    assert state["method"] == {"init": "random_orthogonal"}
    new = LoRAStrategy(FedSB(init="random_orthogonal"), min_available_nodes=1)
    new.restore_state(groups, json.loads(json.dumps(state)))
    assert new.frozen.keys() == frozen.keys()
    assert all(np.array_equal(new.frozen[k], v) for k, v in frozen.items())
    assert new.failed_rounds == 1 and new.epsilon == {0: 1.25}
    assert new.holdings.frozen == set()  # a new Flower run: nodes start empty
    with pytest.raises(ValueError, match="fedavg_lora"):
        LoRAStrategy(FedAvgLoRA()).restore_state(groups, state)


# --- resume configuration -----------------------------------------------------------
def checkpointed_run(tmp_path, overrides, run_id="20261130-000000-0123abcd"):
    from strategies.server_app import compose, settings

    plain = settings(compose(overrides))
    state = {"settings": plain, "metrics": [], "run_id": run_id}
    checkpoint.save(tmp_path, 2, {"global": {}}, state)
    return tmp_path


def test_resume_takes_the_checkpoints_settings_and_more_rounds(tmp_path):
    from strategies.server_app import compose, resume_config

    run = checkpointed_run(tmp_path, ["strategy=fedsb", "train.lr=0.01"])
    cfg = resume_config(
        compose([f"resume={run}", "federation.rounds=7"]),
        [f"resume={run}", "federation.rounds=7"],
    )
    assert cfg.federation.rounds == 7 and cfg.resume == str(run)
    assert (
        cfg.strategy._target_ == "fedlora.methods.fedsb.FedSB" and cfg.train.lr == 0.01
    )
    with pytest.raises(ConfigError, match=r"train\.lr"):  # not silently ignored
        resume_config(
            compose([f"resume={run}", "train.lr=0.5"]),
            [f"resume={run}", "train.lr=0.5"],
        )
    with pytest.raises(ConfigError, match=r"federation\.rounds"):
        resume_config(compose([f"resume={run}", "federation.rounds=1"]), [])
    with pytest.raises(ConfigError, match="no valid checkpoint"):
        resume_config(compose([f"resume={tmp_path / 'nothing'}"]), [])


def test_resume_may_add_or_drop_the_test_only_faults(tmp_path):
    from strategies.server_app import compose, resume_config

    faults = ["+faults.raise_partition=1", "+faults.raise_every=2"]
    run = checkpointed_run(tmp_path / "plain", [])  # its settings have no faults
    overrides = [f"resume={run}", *faults]
    cfg = resume_config(compose(overrides), overrides)
    assert cfg.faults == {"raise_partition": 1, "raise_every": 2}
    run = checkpointed_run(tmp_path / "faulty", faults)
    cfg = resume_config(compose([f"resume={run}"]), [f"resume={run}"])
    assert "faults" not in cfg  # not given again: the resumed run has none


def test_resume_may_change_the_export_rank_even_of_a_run_from_before_it(tmp_path):
    from strategies.server_app import compose, resume_config, settings

    run = checkpointed_run(tmp_path / "new", ["strategy=fedex_lora"])
    overrides = [f"resume={run}", "export.rank=3"]
    assert resume_config(compose(overrides), overrides).export.rank == 3
    # written before export.rank: no export section, FedEx's strategy.export_rank
    plain = settings(compose(["strategy=fedex_lora"]))
    del plain["export"]
    plain["strategy"]["export_rank"] = None
    state = {"settings": plain, "metrics": [], "run_id": "20261130-000000-0123abcd"}
    checkpoint.save(tmp_path / "old", 2, {"global": {}}, state)
    overrides = [f"resume={tmp_path / 'old'}", "export.rank=3"]
    cfg = resume_config(compose(overrides), overrides)
    assert cfg.export.rank == 3 and "export_rank" not in cfg.strategy  # moved
    plain["strategy"]["export_rank"] = 5  # a rank set then: kept, under its new key
    checkpoint.save(tmp_path / "old5", 2, {"global": {}}, state)
    overrides = [f"resume={tmp_path / 'old5'}"]
    cfg = resume_config(compose(overrides), overrides)
    assert cfg.export.rank == 5 and "export_rank" not in cfg.strategy
    overrides.append("export.rank=3")  # unless the resumed run sets it
    assert resume_config(compose(overrides), overrides).export.rank == 3


def test_resume_keeps_the_runs_logger_unless_the_command_line_sets_one(tmp_path):
    from strategies.server_app import compose, resume_config, settings

    run = checkpointed_run(tmp_path / "mlflow", ["logger=mlflow"])
    overrides = [f"resume={run}"]  # resume alone: go on logging where it did
    assert (
        resume_config(compose(overrides), overrides).logger
        == (settings(compose(["logger=mlflow"]))["logger"])
    )
    overrides = [f"resume={run}", "logger=tensorboard"]  # or somewhere else
    cfg = resume_config(compose(overrides), overrides)
    assert cfg.logger._target_ == "fedlora.tracking.TensorBoard"
    # settings written before the section: the command line's (default none)
    plain = settings(compose([]))
    del plain["logger"]
    state = {"settings": plain, "metrics": [], "run_id": "20261130-000000-0123abcd"}
    checkpoint.save(tmp_path / "old", 2, {"global": {}}, state)
    overrides = [f"resume={tmp_path / 'old'}"]
    cfg = resume_config(compose(overrides), overrides)
    assert cfg.logger._target_ == "fedlora.tracking.Tracker"


DP_SGD = ["privacy=dp_sgd", "federation.fraction_evaluate=0"]


def test_resume_of_a_dp_sgd_run_keeps_its_run_id_and_client_folder(tmp_path):
    from strategies.server_app import compose, resume_config

    run = checkpointed_run(tmp_path / "a", DP_SGD)
    overrides = [f"resume={run}", "federation.rounds=4", *DP_SGD]
    cfg = resume_config(compose(overrides), overrides)  # resumable now
    assert cfg.federation.rounds == 4 and cfg.privacy.mode == "dp_sgd"
    # the clients' ledgers live in simulation.client_dir: moving it is refused
    moved = [*overrides, "simulation.client_dir=/elsewhere"]
    with pytest.raises(ConfigError, match=r"^simulation\.client_dir=.*ledgers"):
        resume_config(compose(moved), moved)


def test_resume_refuses_a_dp_sgd_checkpoint_without_a_run_id(tmp_path):
    from strategies.server_app import compose, resume_config

    run = checkpointed_run(tmp_path, DP_SGD, run_id=None)  # written before ledgers
    overrides = [f"resume={run}", *DP_SGD]
    with pytest.raises(ConfigError, match=r"^resume=.*privacy\.mode=dp_sgd.*run id"):
        resume_config(compose(overrides), overrides)


# --- end to end ----------------------------------------------------------------
FEDSB = ("strategy=fedsb", "adapter.r=8")  # the most server state: B, A, init round
ADAPTER = Path("adapter") / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert, tmp_path_factory):
    """Fed-SB, 4 rounds in one go: the reference."""
    out = tmp_path_factory.mktemp("ckpt") / "full"
    return out, run_front_door(out, tiny_bert, *FEDSB, "federation.rounds=4")


def assert_same_run(out: Path, rows: list[dict], reference: tuple[Path, list[dict]]):
    ref_dir, ref_rows = reference
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    for got, want in zip(rows, ref_rows, strict=True):  # bit-identical on CPU
        for key in (
            "eval_loss",
            "eval_accuracy",
            "federated_eval_loss",
            "aggregation_error",
            "clients",
        ):
            assert got.get(key) == want.get(key), (got["round"], key)
    got, want = load_file(str(out / ADAPTER)), load_file(str(ref_dir / ADAPTER))
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    assert json.loads((out / "summary.json").read_text())["rounds"] == 4
    assert checkpoint.load_latest(out).round == 4
    assert sorted(p.name for p in (out / "checkpoints").glob("*.manifest.json")) == [
        "round-000003.manifest.json",
        "round-000004.manifest.json",
    ]


@pytest.mark.slow
def test_a_2_round_run_resumed_to_4_rounds_matches_an_uninterrupted_run(
    uninterrupted, tiny_bert, tmp_path
):
    out = tmp_path / "run"
    first = run_front_door(out, tiny_bert, *FEDSB)  # federation.rounds=2
    assert checkpoint.load_latest(out).round == 2
    rows = run_front_door(
        out, tiny_bert, *FEDSB, f"resume={out}", "federation.rounds=4"
    )
    assert rows[:3] == first  # the old rows are kept as they were
    assert_same_run(out, rows, uninterrupted)
    # B and A travel to every node again (a new run), R alone as before
    assert rows[3]["bytes_down"] > uninterrupted[1][3]["bytes_down"]


@pytest.mark.slow
def test_a_run_killed_after_round_2_resumes_to_the_same_result(
    uninterrupted, tiny_bert, tmp_path
):
    out = tmp_path / "run"
    cmd = front_door_command(out, tiny_bert, "federation.rounds=4", *FEDSB)
    manifest = out / "checkpoints" / "round-000002.manifest.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "killed.log"
    with (
        open(log, "w") as fh,
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ) as proc,
    ):
        deadline = time.monotonic() + 900
        while (
            not manifest.exists()
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the run, Ray and its workers
    assert manifest.exists(), log.read_text()[-3000:]
    deadline = time.monotonic() + 20
    while processes_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_in_group(proc.pid)
    assert checkpoint.load_latest(out).round in (2, 3)  # 4 would mean no kill
    # the worst moment: the next round's row written, its checkpoint not, torn
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "eval_loss": 9.9}\n{"round": 4, "eval_lo')
    (out / "checkpoints" / "round-000003.manifest.json").unlink(missing_ok=True)
    rows = run_front_door(
        out, tiny_bert, *FEDSB, f"resume={out}", "federation.rounds=4"
    )
    assert_same_run(out, rows, uninterrupted)
