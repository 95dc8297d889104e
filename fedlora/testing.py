"""Tiny models built in-process (no downloads): for tests, smoke runs and the
scale benchmark. They reuse MiniLM's tokenizer, so every data path works."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def minilm_tokenizer() -> Any:
    """The packaged all-MiniLM-L6-v2 tokenizer (offline)."""
    from transformers import AutoTokenizer

    from fedlora.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("minilm"))


def save_tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT (hidden 32, 2 labels) with MiniLM's tokenizer, in ``folder``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A Llama of ``layers`` layers (hidden ``hidden``, MLP ``2 hidden``,
    ``max(2, hidden // 64)`` heads) with MiniLM's word pieces as its vocabulary,
    randomly initialised from seed 0; by default 2 layers of hidden 32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = minilm_tokenizer()
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    heads = max(2, hidden // 64)  # head width 16 at hidden 32, 64 from hidden 128
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.cls_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
