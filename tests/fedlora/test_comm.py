"""Communication: the analytic calculator and measured bytes per method."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from experiments.comm import table
from fedlora.adapters import get_state
from fedlora.build import build
from fedlora.comm import layer_shapes, num_parameters, raw_bytes, round_parameters
from fedlora.methods import available
from fedlora.settings import with_
from strategies.wire import KEY_EXPERIMENT, payload_bytes, state_to_record
from tests.conftest import FEDAVG_LORA, FEDSB, FFA_LORA

METHODS = available()


def test_mistral_counts_match_the_published_figures():
    shapes = layer_shapes("mistral-7b")
    assert sum(d_out + d_in for d_out, d_in in shapes) == 32 * 81_920
    fedit = round_parameters(shapes, 32, METHODS["fedavg_lora"]())
    fedsb = round_parameters(shapes, 200, METHODS["fedsb"]())
    assert fedit == 83_886_080  # 83.9M
    assert fedsb == 8_960_000  # 8.96M
    assert round(fedit / fedsb, 1) == 9.4
    # FFA sends B only: r * sum(d_out) = 44.0M. "Half of LoRA's" (41.9M) holds
    # only for square layers; Mistral's k, v, gate, up, down are not.
    assert round_parameters(shapes, 32, METHODS["ffa_lora"]()) == 32 * 32 * 43_008
    assert round_parameters(shapes, 32, METHODS["ffa_lora"]()) == pytest.approx(
        fedit / 2, rel=0.06
    )


def test_calculator_table_has_one_row_per_method():
    rows = table(
        "llama-2-7b", ["fedavg_lora", "fedsb"], {"fedavg_lora": 16, "fedsb": 200}, 10, 1
    )
    assert [r["method"] for r in rows] == ["fedavg_lora", "fedsb"]
    assert rows[0]["params_per_client_round"] == 16 * 32 * (4 * 8192 + 3 * 15104)
    assert rows[1]["one_time_MB_per_client"] > 0 and rows[1]["r"] == 200


@pytest.mark.parametrize("method,r", [(FEDAVG_LORA, 64), (FFA_LORA, 128), (FEDSB, 256)])
def test_measured_bytes_are_within_5_percent_of_raw_parameters(settings, method, r):
    settings = with_(
        settings,
        "model.name",
        "minilm",
        "strategy",
        {"_target_": method},
        "adapter.r",
        r,
        "adapter.alpha",
        r,
    )
    state = get_state(build(settings)[0])
    rng = np.random.default_rng(0)  # trained values: no identical arrays to share
    state = {
        k: rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()
    }
    content = RecordDict(
        {
            "arrays": state_to_record(state),
            "config": ConfigRecord({KEY_EXPERIMENT: json.dumps(settings.to_dict())}),
        }
    )
    measured = payload_bytes(content)
    assert raw_bytes(state) >= 1_000_000
    assert 1.0 <= measured / (num_parameters(state) * 4) <= 1.05
