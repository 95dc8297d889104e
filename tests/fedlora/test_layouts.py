"""Causal-LM data layouts: the loss covers exactly the response in every layout.

The check is independent of the code under test: the tokens whose label is not -100
are decoded by the tokenizer and compared with the response text written out in the
test. A byte-level BPE tokenizer built here (no download) decodes to the very
characters it read, so the comparison is exact; MiniLM's word pieces (lower case,
spacing normalised) are compared without case and whitespace.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pandas as pd
import pytest

from fedlora.data import check_columns, read_table, tokenise
from fedlora.errors import ConfigError
from fedlora.layouts import resolve_layout
from fedlora.testing import minilm_tokenizer

EOS = "<eos>"
#: a small chat template (ChatML-like markers as plain text): each message is
#: ``<|role|>\n<content><|end|>\n``; the generation prompt is ``<|assistant|>\n``
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And its population?"},
    {"role": "assistant", "content": "About two million."},
]
CORPUS = [
    "Review: the film is good. Sentiment: positive, goodness",
    "Instruction: Name a colour. Input: the sky Response: Blue, or grey.",
    *[m["content"] for m in CHAT],
    "<|user|> <|assistant|> <|system|> <|end|> User: Assistant: System:",
]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer trained on :data:`CORPUS`, ``<eos>`` its EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=[EOS, "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token="<pad>"
    )


@pytest.fixture
def chat_bpe(bpe):
    """:func:`bpe` with :data:`TEMPLATE` as its chat template."""
    tok = bpe.__class__(tokenizer_object=bpe.backend_tokenizer, eos_token=EOS)
    tok.chat_template = TEMPLATE
    return tok


def runs(example, tok, trained=True):
    """The decoded runs of consecutive tokens the loss covers (``trained``) or
    skips, in order."""
    out, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if (label != -100) == trained:
            assert label == token or not trained
            current.append(token)
        elif current:
            out.append(tok.decode(current))
            current = []
    if current:
        out.append(tok.decode(current))
    return out


def data_settings(settings, **changes):
    return replace(settings.data, **changes)


def test_prompt_response_trains_on_the_response_and_eos(settings, bpe):
    table = pd.DataFrame(
        {
            "prompt": ["Review: the film is good.\nSentiment:", "Name a colour:"],
            "response": [" positive", "\nBlue, or grey."],
        }
    )
    examples = tokenise(table, bpe, data_settings(settings), "causal_lm", 64)
    assert [runs(ex, bpe) for ex in examples] == [
        [" positive<eos>"],
        ["\nBlue, or grey.<eos>"],
    ]
    assert [bpe.decode(ex["input_ids"]) for ex in examples] == [
        "Review: the film is good.\nSentiment: positive<eos>",
        "Name a colour:\nBlue, or grey.<eos>",
    ]


def test_instruction_layout_renders_the_template_with_and_without_input(settings, bpe):
    table = pd.DataFrame(
        {
            "instruction": ["Name a colour.", "Name a colour."],
            "input": ["the sky", ""],
            "output": ["Blue, or grey.", "Blue."],
        }
    )
    examples = tokenise(table, bpe, data_settings(settings), "causal_lm", 64)
    assert [runs(ex, bpe) for ex in examples] == [
        ["Blue, or grey.<eos>"],
        ["Blue.<eos>"],
    ]
    assert [runs(ex, bpe, trained=False) for ex in examples] == [
        ["Instruction:\nName a colour.\n\nInput:\nthe sky\n\nResponse:\n"],
        ["Instruction:\nName a colour.\n\nResponse:\n"],  # no empty Input block
    ]
    # the input column is optional, and the columns' names configurable
    renamed = table.drop(columns="input").rename(
        columns={"instruction": "task", "output": "answer"}
    )
    custom = data_settings(settings, instruction_column="task", output_column="answer")
    again = tokenise(renamed, bpe, custom, "causal_lm", 64)
    assert again[1] == examples[1]
    assert runs(again[0], bpe, trained=False) == [
        "Instruction:\nName a colour.\n\nResponse:\n"
    ]


def test_chat_with_a_template_trains_on_every_assistant_turn_only(settings, chat_bpe):
    table = pd.DataFrame({"messages": [CHAT]})
    (ex,) = tokenise(table, chat_bpe, data_settings(settings), "causal_lm", 128)
    # as the template renders each assistant turn: its content and end marker
    assert runs(ex, chat_bpe) == ["Paris.<|end|>\n", "About two million.<|end|>\n"]
    assert runs(ex, chat_bpe, trained=False) == [
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is the capital of France?"
        "<|end|>\n<|assistant|>\n",
        "<|user|>\nAnd its population?<|end|>\n<|assistant|>\n",
    ]
    # the tokens are the whole rendering's, as the model reads it
    rendered = chat_bpe.apply_chat_template(CHAT, tokenize=False)
    assert ex["input_ids"] == chat_bpe(rendered, add_special_tokens=False)["input_ids"]


def test_chat_without_a_template_uses_the_documented_format(settings, bpe):
    assert not bpe.chat_template
    table = pd.DataFrame({"messages": [CHAT]})
    (ex,) = tokenise(table, bpe, data_settings(settings), "causal_lm", 128)
    assert runs(ex, bpe) == ["Paris.<eos>", "About two million.<eos>"]
    assert bpe.decode(ex["input_ids"]) == (
        "System:\nBe brief.\n\nUser:\nWhat is the capital of France?\n\n"
        "Assistant:\nParis.<eos>\n\nUser:\nAnd its population?\n\n"
        "Assistant:\nAbout two million.<eos>"
    )


def test_every_layout_masks_exactly_the_response_with_minilms_word_pieces(settings):
    tok = minilm_tokenizer()
    tok.eos_token = "[SEP]"
    tok.chat_template = TEMPLATE

    def squash(text):
        return "".join(text.lower().split())

    tables = {
        "prompt_response": pd.DataFrame(
            {"prompt": ["Review: fine\nSentiment:"], "response": [" positive"]}
        ),
        "instruction": pd.DataFrame(
            {"instruction": ["Name a colour."], "input": [""], "output": ["Blue."]}
        ),
        "chat": pd.DataFrame({"messages": [CHAT]}),
    }
    expected = {
        "prompt_response": ["positive[SEP]"],
        "instruction": ["Blue.[SEP]"],
        "chat": ["Paris.<|end|>", "About two million.<|end|>"],
    }
    for name, table in tables.items():
        (ex,) = tokenise(table, tok, data_settings(settings), "causal_lm", 128)
        got = [squash(run) for run in runs(ex, tok)]
        assert got == [squash(run) for run in expected[name]], name


def test_a_word_split_between_prompt_and_response_is_still_masked_exactly(
    settings, bpe
):
    # "goodness" is one token of the whole text, so the prompt alone ("good")
    # does not tokenise to a prefix of it
    assert "Ġgoodness" in bpe.tokenize("Review: goodness")
    table = pd.DataFrame({"prompt": ["Review: good"], "response": ["ness"]})
    (ex,) = tokenise(table, bpe, data_settings(settings), "causal_lm", 64)
    assert runs(ex, bpe) == ["ness<eos>"]
    assert runs(ex, bpe, trained=False) == ["Review: good"]


def test_a_template_that_rewrites_earlier_turns_is_refused(settings, chat_bpe):
    chat_bpe.chat_template = (  # hides every assistant turn but the last
        "{% for m in messages %}<|{{ m['role'] }}|>\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}"
        "{{ m['content'] }}{% endif %}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    table = pd.DataFrame({"messages": [CHAT]})
    with pytest.raises(ConfigError, match="data.messages_column.*row 0.*message 2"):
        tokenise(table, chat_bpe, data_settings(settings), "causal_lm", 128)


@pytest.mark.parametrize(
    "columns,layout",
    [
        (["prompt", "response", "label"], "prompt_response"),
        (["instruction", "input", "output"], "instruction"),
        (["instruction", "output"], "instruction"),
        (["id", "messages"], "chat"),
    ],
)
def test_auto_picks_the_layout_whose_columns_the_data_has(settings, columns, layout):
    assert resolve_layout(columns, data_settings(settings)).name == layout


def test_auto_refuses_data_that_fits_no_layout_or_several(settings):
    with pytest.raises(ConfigError) as info:
        resolve_layout(["text", "label"], data_settings(settings))
    message = str(info.value)
    assert message.startswith("data.layout='auto'")
    assert "['text', 'label']" in message  # the columns found
    assert "data.messages_column='messages'" in message  # what a layout needs
    with pytest.raises(ConfigError, match="several layouts.*prompt_response, chat"):
        resolve_layout(["prompt", "response", "messages"], data_settings(settings))
    # named explicitly, the layout settles it; a column it lacks is named
    chosen = data_settings(settings, layout="chat")
    assert resolve_layout(["prompt", "response", "messages"], chosen).name == "chat"
    table = pd.DataFrame({"instruction": ["x"], "answer": ["y"]})
    with pytest.raises(ConfigError, match=r"data.output_column='output'.*'answer'"):
        check_columns(table, data_settings(settings, layout="instruction"), "causal_lm")
    with pytest.raises(ConfigError, match="data.layout='dialogue'.*choose one of"):
        resolve_layout(["messages"], data_settings(settings, layout="dialogue"))


def test_a_bad_messages_cell_names_the_column_and_row(settings, bpe):
    table = pd.DataFrame({"messages": [CHAT, "hello"]})
    with pytest.raises(ConfigError, match="data.messages_column.*row 1"):
        tokenise(table, bpe, data_settings(settings), "causal_lm", 128)


def test_examples_left_without_a_response_token_are_dropped_and_counted(
    settings, bpe, caplog
):
    long = "Review: the film is good. " * 10
    table = pd.DataFrame(
        {
            "prompt": ["Sentiment:", long, "Sentiment:"],
            "response": [" positive", " positive", " positive, goodness" * 3],
        }
    )
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        examples = tokenise(table, bpe, data_settings(settings), "causal_lm", 8)
    assert len(examples) == 2
    assert "1 of 3 examples" in caplog.text and "train.max_length=8" in caplog.text
    # a response cut short keeps its first tokens
    kept = runs(examples[1], bpe)
    assert len(kept) == 1 and (" positive, goodness" * 3).startswith(kept[0])
    assert len(examples[1]["input_ids"]) == 8 and not kept[0].endswith(EOS)
    with pytest.raises(ConfigError, match="train.max_length=8"):
        tokenise(table.iloc[[1]], bpe, data_settings(settings), "causal_lm", 8)
    # a conversation with no assistant turn has nothing to learn either
    silent = pd.DataFrame({"messages": [CHAT, CHAT[:2]]})
    assert len(tokenise(silent, bpe, data_settings(settings), "causal_lm", 128)) == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_conversations_read_from_every_file_type_tokenise_the_same(
    settings, bpe, tmp_path, suffix
):
    rows = [{"id": 0, "messages": CHAT}, {"id": 1, "messages": CHAT[1:3]}]
    path = tmp_path / f"chats{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:  # a JSON string per cell
        pd.DataFrame(
            [{"id": r["id"], "messages": json.dumps(r["messages"])} for r in rows]
        ).to_csv(path, index=False)
    examples = tokenise(
        read_table(path), bpe, data_settings(settings), "causal_lm", 128
    )
    assert [runs(ex, bpe) for ex in examples] == [
        ["Paris.<eos>", "About two million.<eos>"],
        ["Paris.<eos>"],
    ]
