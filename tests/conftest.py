"""Shared fixtures: tiny models built in-process (no downloads), small settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedlora.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved to a folder."""
    from fedlora.testing import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) with MiniLM's word pieces as its vocabulary."""
    from fedlora.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def data_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for a local data set (SST-2's layout and data=local's default
    splits): ``train.tsv``, ``dev.tsv``, ``test.tsv`` with columns ``sentence``,
    ``text`` and integer ``label``. Validation reads the data, so configs naming
    ``data.path`` need one."""
    folder = tmp_path_factory.mktemp("data")
    for split in ("train", "dev", "test"):
        rows = "".join(f"s{i}\ts{i}\t{i % 2}\n" for i in range(4))
        (folder / f"{split}.tsv").write_text("sentence\ttext\tlabel\n" + rows)
    return folder


FEDAVG_LORA = "fedlora.methods.fedavg_lora.FedAvgLoRA"
FFA_LORA = "fedlora.methods.ffa_lora.FFALoRA"
FEDSB = "fedlora.methods.fedsb.FedSB"
LORA_FAIR = "fedlora.methods.lora_fair.LoRAFAIR"

#: the unit tests' small experiment on the tiny BERT: conf/ composed with these
#: overrides (the model's name is added by the fixture)
BASE_OVERRIDES = [
    "adapter.r=4",
    "adapter.alpha=8",
    "data.num_examples=200",
    "data.num_eval_examples=40",
    "partition.min_partition_size=5",
    "federation.num_clients=2",
    "federation.rounds=2",
    "federation.min_train_clients=2",
    "federation.round_timeout=600",
    "train.lr=1e-2",
    "train.batch_size=16",
    "train.eval_batch_size=32",
    "train.max_length=32",
    "train.device=cpu",
    "train.num_threads=0",
]


@pytest.fixture(scope="session")
def base_settings(tiny_bert: Path) -> Settings:
    """The typed settings of :data:`BASE_OVERRIDES` on the tiny BERT (immutable,
    so one object serves every test)."""
    from fedlora.data import resolve_labels
    from strategies.server_app import compose_settings

    # model.num_labels, null in conf/, taken from the data as the server does
    return resolve_labels(
        compose_settings([*BASE_OVERRIDES, f"model.name={tiny_bert}"])
    )


@pytest.fixture
def settings(base_settings: Settings) -> Settings:
    """Complete typed experiment settings on the tiny BERT; a test varies them
    with ``with_(settings, "train.lr", 0.5)``."""
    return base_settings


REPO = Path(__file__).resolve().parent.parent


def processes_in_group(pgid: int) -> list[str]:
    """Command lines of the processes still in process group ``pgid``."""
    out = subprocess.run(
        ["ps", "-eo", "pgid=,args="], capture_output=True, text=True
    ).stdout
    return [line for line in out.splitlines() if line.split(None, 1)[0] == str(pgid)]


#: what the libraries print that a default run (neither quiet nor verbose) hides:
#: Flower's deprecation banner and echoed config, transformers' notice and loading
#: bars (in the server and in the simulated clients)
NOISE = (
    "DEPRECATED FEATURE",
    "ConfigRecord (train)",
    "is_gradient_checkpointing",
    "Loading weights",
    "Manually terminating ClientAppActor",
)


def front_door_command(
    out: Path, model: Path, *overrides: str, drop: tuple[str, ...] = ()
) -> list[str]:
    """The tests' small experiment: 3 clients x 2 rounds on ``model`` (``drop``:
    keys of its own overrides to leave out, e.g. the synthetic task's)."""
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        f"hydra.run.dir={out}",
        f"model.name={model}",
        "federation.num_clients=3",
        "federation.rounds=2",
        "data.num_examples=240",
        "data.num_eval_examples=60",
        "train.lr=5e-3",
        "train.batch_size=16",
        "simulation.client_num_cpus=1",
        *overrides,
    ]
    return [arg for arg in command if arg.partition("=")[0] not in drop]


def run_in_group(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900
) -> tuple[int, str, str]:
    """Run ``cmd`` from the repository offline, in its own process group; return
    its exit status, stdout and stderr, once no process of its group is left (Ray's
    daemons and workers join it; they get a few seconds to finish exiting)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        stdout, stderr = proc.communicate(timeout=timeout)
    deadline = time.monotonic() + 20
    while processes_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_in_group(proc.pid), processes_in_group(proc.pid)
    return proc.returncode, stdout, stderr


def run_front_door(
    out: Path,
    model: Path,
    *overrides: str,
    env: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """``python -m experiments.run`` on a tiny model: 3 clients x 2 rounds.

    Asserts it succeeded, showed progress and left no process behind; returns the rows
    of ``metrics.jsonl``. ``env`` adds environment variables; ``drop`` as in
    :func:`front_door_command`.
    """
    cmd = front_door_command(out, model, *overrides, drop=drop)
    code, stdout, stderr = run_in_group(cmd, env=env)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "[fedlora] round 2/" in stdout  # progress is shown
    assert "[fedlora] done" in stdout  # and the summary table, with the run's path
    assert re.search(rf"\n  run directory +{re.escape(str(out))}\n", stdout), stdout
    for noise in NOISE:  # the default console: our lines, not the libraries'
        assert noise not in stdout + stderr, (noise, (stdout + stderr)[-3000:])
    return [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


class Grid:
    """Flower's grid as far as its sampling needs one: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's messages need a run identity, which its runtime sets; fake one
    (``pytestmark = pytest.mark.usefixtures("task_identity")``)."""
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, field, 1, raising=False)


def exchange(strategy: Any, global_state: dict, contents: list) -> list:
    """Send ``global_state`` to ``len(contents)`` fake nodes (recorded as the
    strategy's ``sent``, ``sampled`` and round-1 ``clients_sampled``, as
    ``configure_train`` would); return their replies, node ``i`` answering with
    ``contents[i - 1]`` (a RecordDict)."""
    from flwr.app import Message, RecordDict

    from strategies.wire import record_to_state, state_to_record

    arrays = state_to_record(global_state)
    strategy.begin_round(1, record_to_state(arrays))
    strategy.sampled = list(range(1, len(contents) + 1))
    strategy.round_log.setdefault(1, {})["clients_sampled"] = len(contents)
    replies = []
    for node, content in enumerate(contents, start=1):
        sent = Message(
            content=RecordDict({"arrays": arrays}),
            dst_node_id=node,
            message_type="train",
        )
        reply = Message(content=content, reply_to=sent)
        reply.metadata.__dict__["_src_node_id"] = node  # Flower's runtime sets it
        replies.append(reply)
    return replies


def adapter_metrics(base: Any, adapter_dir: Path, settings: Settings) -> dict:
    """The server-side evaluation metrics (``eval_accuracy``, ``eval_loss``) of the
    adapter saved in ``adapter_dir``
    read back by PEFT onto ``base`` (what a user loading the run's adapter gets)."""
    import torch
    from peft import PeftModel

    from fedlora.data import server_examples
    from fedlora.models import load_tokenizer
    from fedlora.train import evaluate

    loaded = PeftModel.from_pretrained(base, str(adapter_dir))
    tok = load_tokenizer(settings.model)
    return evaluate(
        loaded,
        server_examples(settings, tok),
        "seq_cls",
        torch.device("cpu"),
        tok.pad_token_id,
        settings.train.eval_batch_size,
    )


def assert_same_logits(model: Any, loaded: Any, settings: Settings, tokenizer: Any):
    """``loaded`` (e.g. an exported adapter read back by PEFT) gives ``model``'s
    logits on a batch of partition 0's first 8 examples (atol 1e-5)."""
    import torch

    from fedlora.data import client_examples
    from fedlora.train import batches

    examples = client_examples(settings, tokenizer, 0, 2)[0][:8]
    batch = next(batches(examples, 8, tokenizer.pad_token_id))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0
        )
