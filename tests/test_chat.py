"""Chat template and raw mode: exact token ids on the tiny tokenizer (ids 5/6 = start/end of turn)."""

from __future__ import annotations

import pytest

from mlx_gemma.chat import prompt_ids
from mlx_gemma.tokenizer import GemmaTokenizer

BOS, SOT, EOT, NL = 2, 5, 6, 263
USER = [331, 329, 343, NL]  # "user\n"
MODEL_OPEN = [SOT, 368, NL]  # "<start_of_turn>model\n"
HI_THERE = [292, 319, 337, 389, 343, 315]
HELLO = [409, 325]


@pytest.fixture(scope="module")
def tok(tiny_dir) -> GemmaTokenizer:
    return GemmaTokenizer.from_dir(tiny_dir)


def test_prompt_is_one_user_turn(tok):
    assert prompt_ids(tok, prompt="Hi there") == [BOS, SOT, *USER, *HI_THERE, EOT, NL, *MODEL_OPEN]


def test_messages_with_model_turns_and_trimmed_content(tok):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": " Why? "}]
    expected = [BOS, SOT, *USER, *HELLO, EOT, NL,
                SOT, 368, NL, 411, 361, EOT, NL,
                SOT, *USER, 307, 318, 335, 284, EOT, NL, *MODEL_OPEN]
    assert prompt_ids(tok, messages=messages) == expected
    assert prompt_ids(tok, messages=[{**m, "role": "model"} if m["role"] == "assistant" else m
                                     for m in messages]) == expected


def test_system_text_is_folded_into_first_user_turn(tok):
    folded = prompt_ids(tok, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert folded == [BOS, SOT, *USER, 286, 339, 375, 319, 315, 316, 271, NL, NL, *HELLO, EOT, NL, *MODEL_OPEN]
    assert folded == prompt_ids(tok, prompt="Be brief.\n\nHello")
    alone = prompt_ids(tok, messages=[{"role": "system", "content": "Hello"}])
    assert alone == prompt_ids(tok, prompt="Hello")


def test_matches_the_checkpoint_chat_template(tiny_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    messages = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once"},
                {"role": "user", "content": "More\nplease"}]
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt_ids(tok, messages=messages) == hf(text, add_special_tokens=False)["input_ids"]


def test_raw_adds_bos_only_when_missing(tok):
    water = [415, 515, 379, 354, 330]
    assert prompt_ids(tok, prompt="Water boils at", raw=True) == [BOS, *water]
    assert prompt_ids(tok, prompt="<bos>Water boils at", raw=True) == [BOS, *water]


def test_raw_parses_turn_markers_but_messages_cannot_forge_them(tok):
    raw = prompt_ids(tok, prompt="<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", raw=True)
    assert raw == prompt_ids(tok, prompt="Hi there")
    forged = prompt_ids(tok, prompt="<end_of_turn>")
    assert forged.count(EOT) == 1 and forged.count(SOT) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of prompt or messages (got neither)"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of prompt or messages (got both)"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": 5}, "prompt must be a string, got int"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role='tool' is not supported"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content must be a string, got NoneType"),
    ({"messages": [{"role": "user", "content": "x"}], "raw": True}, "raw=True applies to prompt only"),
])
def test_bad_requests_name_the_value(tok, kwargs, message):
    with pytest.raises(ValueError) as err:
        prompt_ids(tok, **kwargs)
    assert message in str(err.value)
