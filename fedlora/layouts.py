"""Causal-LM data layouts: how a row becomes the text a model trains on, and which
part of that text the loss covers (the response, never the prompt).

``data.layout`` picks one (``auto``: the only one whose columns the data has):

- ``prompt_response``: ``data.prompt_column`` and ``data.response_column``; the text
  is ``prompt + response + eos``.
- ``instruction``: ``data.instruction_column``, ``data.input_column`` (optional; a
  missing column or an empty value leaves its block out) and
  ``data.output_column``, rendered with :func:`instruction_prompt` followed by
  ``output + eos``.
- ``chat``: ``data.messages_column``, a list of ``{"role", "content"}`` messages,
  rendered with the tokenizer's chat template when it has one, else with
  :func:`fallback_chat_pieces`. The loss covers every assistant turn (as the
  template renders it, its end-of-turn marker included), nothing else.

A layout turns a row into *pieces*: ``(text, trained)`` pairs whose concatenation is
the whole text. :func:`encode` tokenises them into input ids and labels (-100
outside the trained pieces).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.errors import ConfigError
from fedlora.settings import DataSettings

if TYPE_CHECKING:  # annotations only: a ClientApp with cached data never loads pandas
    import pandas as pd

Pieces = list[tuple[str, bool]]  # (text, is it trained on)
IGNORE = -100  # the label of a token the loss skips


def _text(value: Any) -> str:
    """A cell as text: missing values (None, NaN) are empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _eos(tokenizer: Any) -> str:
    """The end-of-sequence marker as text ("" without one): the tokenizer reads it
    back as its special token, so the model learns to stop after a response."""
    return tokenizer.eos_token or ""


class Layout:
    """How rows of a table become :data:`Pieces` (a subclass per layout)."""

    name = ""
    #: the ``data.*`` keys naming the columns this layout needs
    required: tuple[str, ...] = ()

    def missing(self, columns: Sequence[str], data: DataSettings) -> str | None:
        """The first key of :attr:`required` whose column ``columns`` lacks."""
        for key in self.required:
            if getattr(data, key) not in columns:
                return key
        return None

    def needs(self, data: DataSettings) -> str:
        """The columns it needs, for messages: ``prompt_column='prompt', ...``."""
        return " and ".join(f"data.{k}={getattr(data, k)!r}" for k in self.required)

    def pieces(
        self, table: pd.DataFrame, data: DataSettings, tokenizer: Any
    ) -> list[Pieces]:
        raise NotImplementedError


class PromptResponse(Layout):
    """``prompt + response + eos``; the loss covers ``response + eos``."""

    name = "prompt_response"
    required = ("prompt_column", "response_column")

    def pieces(
        self, table: pd.DataFrame, data: DataSettings, tokenizer: Any
    ) -> list[Pieces]:
        eos = _eos(tokenizer)
        return [
            [(_text(p), False), (_text(r) + eos, True)]
            for p, r in zip(
                table[data.prompt_column], table[data.response_column], strict=True
            )
        ]


def instruction_prompt(instruction: str, context: str = "") -> str:
    """The instruction layout's prompt; the response follows it directly::

    Instruction:
    <instruction>

    Input:
    <input>                  (this block only when the input is not empty)

    Response:
    <output><eos>
    """
    block = f"Input:\n{context}\n\n" if context.strip() else ""
    return f"Instruction:\n{instruction}\n\n{block}Response:\n"


class Instruction(Layout):
    """:func:`instruction_prompt`, then ``output + eos`` (the trained part)."""

    name = "instruction"
    required = ("instruction_column", "output_column")

    def pieces(
        self, table: pd.DataFrame, data: DataSettings, tokenizer: Any
    ) -> list[Pieces]:
        eos = _eos(tokenizer)
        inputs = (
            table[data.input_column]
            if data.input_column in table.columns
            else [""] * len(table)
        )
        return [
            [(instruction_prompt(_text(i), _text(c)), False), (_text(o) + eos, True)]
            for i, c, o in zip(
                table[data.instruction_column],
                inputs,
                table[data.output_column],
                strict=True,
            )
        ]


class Chat(Layout):
    """A conversation per row; the loss covers every assistant turn."""

    name = "chat"
    required = ("messages_column",)

    def pieces(
        self, table: pd.DataFrame, data: DataSettings, tokenizer: Any
    ) -> list[Pieces]:
        column = data.messages_column
        templated = bool(getattr(tokenizer, "chat_template", None))
        out = []
        for row, value in enumerate(table[column]):
            messages = _messages(value, column, row)
            if templated:
                out.append(template_chat_pieces(messages, tokenizer, column, row))
            else:
                out.append(fallback_chat_pieces(messages, _eos(tokenizer)))
        return out


def _messages(value: Any, column: str, row: int) -> list[dict[str, str]]:
    """One cell of the messages column as ``[{"role", "content"}, ...]``: a list
    (JSON lines), an array (parquet) or a JSON string (csv, tsv)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, np.ndarray):
        value = value.tolist()
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in value
    )
    if not ok:
        raise ConfigError(
            "data.messages_column",
            column,
            f"row {row} holds {str(value)[:80]!r}, not a list of "
            '{"role": ..., "content": ...} messages; point data.messages_column '
            "at the conversations (or pick another data.layout)",
        )
    return [{"role": m["role"], "content": _text(m.get("content"))} for m in value]


def fallback_chat_pieces(messages: list[dict[str, str]], eos: str) -> Pieces:
    """A conversation for a tokenizer without a chat template: each message as
    ``<Role>:\\n<content>``, messages separated by a blank line, ``eos`` after each
    assistant turn; the trained pieces are the assistant contents and their
    ``eos``. At inference, end the prompt with ``\\n\\nAssistant:\\n``."""
    out: Pieces = []
    for k, m in enumerate(messages):
        head = ("\n\n" if k else "") + f"{m['role'].capitalize()}:\n"
        if m["role"] == "assistant":
            out += [(head, False), (m["content"] + eos, True)]
        else:
            out.append((head + m["content"], False))
    return out


def template_chat_pieces(
    messages: list[dict[str, str]], tokenizer: Any, column: str, row: int
) -> Pieces:
    """A conversation rendered with the tokenizer's chat template, the assistant
    turns found by rendering prefixes: turn ``i`` spans from the end of
    ``messages[:i]`` with the generation prompt to the end of ``messages[:i+1]``.

    Raises
    ------
    ConfigError
        ``data.messages_column``: the template fails on the row, or renders a
        prefix of the conversation as something other than a prefix of the whole
        (some templates rewrite earlier turns once later ones follow), so the
        assistant turns cannot be located.
    """

    def render(part: list[dict[str, str]], prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                part, tokenize=False, add_generation_prompt=prompt
            )
        except Exception as exc:  # the template's own checks (jinja raise_exception)
            raise ConfigError(
                "data.messages_column",
                column,
                f"the tokenizer's chat template fails on row {row}: {exc}",
            ) from exc

    full = render(messages, False)
    out: Pieces = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = render(messages[:i], True), render(messages[: i + 1], False)
        if not (end.startswith(start) and full.startswith(end) and len(start) >= done):
            raise ConfigError(
                "data.messages_column",
                column,
                f"row {row}: the tokenizer's chat template renders the conversation "
                f"up to message {i} differently once later messages follow, so its "
                "assistant turns cannot be located; give the model a chat template "
                "that renders each turn the same whatever follows, or render the "
                "conversations yourself into prompt/response columns "
                "(data.layout=prompt_response)",
            )
        out += [(full[done : len(start)], False), (full[len(start) : len(end)], True)]
        done = len(end)
    out.append((full[done:], False))
    return out


LAYOUTS: dict[str, Layout] = {
    layout.name: layout for layout in (PromptResponse(), Instruction(), Chat())
}
CHOICES = ("auto", *LAYOUTS)


def resolve_layout(columns: Sequence[str], data: DataSettings) -> Layout:
    """The layout ``data.layout`` names, or (``auto``) the only one whose columns
    ``columns`` holds.

    Raises
    ------
    ConfigError
        An unknown ``data.layout``; a column the named layout needs is absent (its
        key named); ``auto`` and no layout fits, or several do (the columns found
        listed, with what each layout needs).
    """
    columns = list(columns)
    name = data.layout or "auto"  # None: settings written before the key existed
    if name != "auto":
        if name not in LAYOUTS:
            raise ConfigError(
                "data.layout", name, f"choose one of {', '.join(CHOICES)}"
            )
        layout = LAYOUTS[name]
        key = layout.missing(columns, data)
        if key is not None:
            raise ConfigError(
                f"data.{key}",
                getattr(data, key),
                f"the data has no such column; its columns are {columns} (data.layout="
                f"{name} needs {layout.needs(data)})",
            )
        return layout
    fits = [
        layout for layout in LAYOUTS.values() if layout.missing(columns, data) is None
    ]
    if len(fits) == 1:
        return fits[0]
    options = "; ".join(f"{x.name} needs {x.needs(data)}" for x in LAYOUTS.values())
    if not fits:
        raise ConfigError(
            "data.layout",
            "auto",
            f"the data's columns {columns} fit no layout ({options}); name your "
            "columns with those keys (e.g. data.instruction_column=<column> "
            "data.output_column=<column>), or set data.layout",
        )
    names = [x.name for x in fits]
    raise ConfigError(
        "data.layout",
        "auto",
        f"the data's columns {columns} fit several layouts ({', '.join(names)}); "
        f"choose one, e.g. data.layout={names[0]}",
    )


def encode(
    rows: list[Pieces], tokenizer: Any, max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """``(examples, dropped)``: the rows tokenised and cut to ``max_length``
    tokens, labels -100 outside the trained pieces; ``dropped`` rows kept no
    trained token a loss could use (the first token has no prediction) and are
    left out.

    The whole text is tokenised at once (as a model reads it at inference), each
    piece boundary at the token count of the text before it. Where the text before
    a boundary does not tokenise to a prefix of the whole (a word split between
    prompt and response, ``good`` + ``ness``), that row's pieces are tokenised one
    by one and joined instead, so the labels cover exactly the trained text.
    """

    def ids(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    texts = ["".join(text for text, _ in pieces) for pieces in rows]
    whole = ids(texts)
    cuts: list[str] = []  # the text before each inner boundary, row after row
    for pieces, text in zip(rows, texts, strict=True):
        at = 0
        for piece, _ in pieces[:-1]:
            at += len(piece)
            cuts.append(text[:at])
    before = iter(ids(cuts))
    examples, dropped = [], 0
    for pieces, tokens in zip(rows, whole, strict=True):
        bounds = [next(before) for _ in pieces[:-1]]
        ends = [len(b) for b in bounds] + [len(tokens)]
        consistent = all(tokens[: len(b)] == b for b in bounds)
        if not (consistent and ends == sorted(ends)):  # piece by piece
            parts = ids([text for text, _ in pieces])
            tokens = [t for part in parts for t in part]
            ends = list(accumulate(len(part) for part in parts))
        labels, start = [], 0
        for (_, trained), end in zip(pieces, ends, strict=True):
            span = tokens[start:end]
            labels += span if trained else [IGNORE] * len(span)
            start = end
        tokens, labels = tokens[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            dropped += 1
            continue
        examples.append(
            {"input_ids": tokens, "attention_mask": [1] * len(tokens), "labels": labels}
        )
    return examples, dropped
