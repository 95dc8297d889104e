"""LoRA-SB: ``W = W0 + s B R A``, ``B`` and ``A`` frozen, only ``R`` (r x r) trained.

Paper: Ponkshe et al., "Initialization using update approximation is a silver bullet
for extreme efficient low-rank fine-tuning" (LoRA-SB), https://arxiv.org/abs/2411.19557;
federated: Singhal et al., "Fed-SB", https://arxiv.org/abs/2502.15436.

Built on PEFT's LoRA layers, so it works wherever PEFT's LoRA does: every adapted
layer gets an ``r x r`` linear map ``lora_R`` that a forward pre-hook applies to the
input of ``lora_B``; PEFT's own forward then computes ``s * B (R (A x))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlora.adapters import ADAPTER_NAME, wire_name
from fedlora.data import Example
from fedlora.errors import ConfigError
from fedlora.train import batches

Factors = tuple[
    np.ndarray, np.ndarray, np.ndarray
]  # B (d_out, r), R (r, r), A (r, d_in)


def lora_layers_of(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers of ``model`` keyed by their wire layer name."""
    from peft.tuners.lora import LoraLayer

    return {
        wire_name(name): m
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A
    }


def add_r(model: nn.Module) -> nn.Module:
    """Insert a trainable ``R`` (zeros) in every LoRA layer; freeze ``A``, ``B``."""
    for name, layer in lora_layers_of(model).items():
        r = layer.r[ADAPTER_NAME]
        base = layer.get_base_layer().weight
        if r > min(base.shape):  # B's columns / A's rows could not be orthonormal
            raise ConfigError(
                "adapter.r",
                r,
                f"LoRA-SB needs r <= min(d_out, d_in) = "
                f"{min(base.shape)} for {name}; lower adapter.r",
            )
        ref = layer.lora_A[ADAPTER_NAME].weight
        lin = nn.Linear(r, r, bias=False, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(lin.weight)
        layer.lora_R = nn.ModuleDict({ADAPTER_NAME: lin})
        layer.lora_A[ADAPTER_NAME].weight.requires_grad_(False)
        layer.lora_B[ADAPTER_NAME].weight.requires_grad_(False)

        def apply_r(
            _module: nn.Module, args: tuple[Any, ...], layer: nn.Module = layer
        ) -> tuple[Any, ...]:
            return (layer.lora_R[ADAPTER_NAME](args[0]), *args[1:])

        layer.lora_B[ADAPTER_NAME].register_forward_pre_hook(apply_r)
    return model


def gradient_sums(
    model: nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """``G = sum_i dL_i/dW0`` for every adapted ``W0`` (d_out, d_in), adapters off.

    The sum over examples (not the mean), so clients' sums add up to the pooled one.
    """
    layers = lora_layers_of(model)
    weights = {k: m.get_base_layer().weight for k, m in layers.items()}
    # PEFT's disable_adapter() re-marks the adapters trainable on exit: restore all
    saved = {p: p.requires_grad for p in model.parameters()}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    model.eval()  # no dropout: a deterministic estimate (gradients still flow)
    try:
        with model.disable_adapter():
            for batch in batches(examples, batch_size, pad_id):
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model(**batch)
                (out.loss * batch["input_ids"].shape[0]).backward()
        return {
            k: w.grad.detach().to("cpu", torch.float32).numpy().copy()
            for k, w in weights.items()
        }
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)


def init_from_gradient(grad: np.ndarray, r: int, eta: float) -> Factors:
    """LoRA-SB init: ``dW = -eta sign(G) ~ U S V^T`` (rank r); ``B = U_r``,
    ``A = V_r^T``, ``R0 = diag(S_r)``, so training starts at ``W0 + trunc_r(dW)``."""
    dw = -eta * np.sign(grad.astype(np.float64))
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return (
        u[:, :r].astype(np.float32),
        np.diag(s[:r]).astype(np.float32),
        vt[:r].astype(np.float32),
    )


def init_random_orthogonal(
    d_out: int, d_in: int, r: int, rng: np.random.Generator
) -> Factors:
    """Data-free init: orthonormal ``B`` and ``A``, ``R0 = 0`` (starts at ``W0``)."""
    b, _ = np.linalg.qr(rng.standard_normal((d_out, r)))
    a, _ = np.linalg.qr(rng.standard_normal((d_in, r)))
    return (b.astype(np.float32), np.zeros((r, r), np.float32), a.T.astype(np.float32))


def keys(layer: str) -> tuple[str, str, str]:
    """Wire keys of ``B``, ``R`` and ``A`` of one layer."""
    return (
        f"{layer}.lora_B.weight",
        f"{layer}.lora_R.weight",
        f"{layer}.lora_A.weight",
    )


def to_plain_lora(
    frozen: dict[str, np.ndarray], trained: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Export: ordinary LoRA ``B' = B R``, ``A' = A`` (use with ``alpha = r``);
    non-LoRA tensors (the head) are passed through."""
    out = {k: v for k, v in trained.items() if ".lora_R." not in k}
    for key in trained:
        if key.endswith(".lora_R.weight"):
            b, r, a = keys(key[: -len(".lora_R.weight")])
            out[b] = (frozen[b].astype(np.float64) @ trained[r]).astype(np.float32)
            out[a] = frozen[a]
    return out
