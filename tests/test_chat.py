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


# Gemma 3's own chat template (google/gemma-3-*-it), for text content: the system text is kept as
# sent before the first user text, which is trimmed like every other turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@pytest.mark.parametrize("system, user", [(" Be brief. \n", "Hello"), ("S", ""), ("Be brief.", "  Hello  ")])
def test_system_text_is_kept_as_sent_as_gemma3s_template_does(tiny_dir, tok, system, user):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = hf.apply_chat_template(messages, chat_template=GEMMA3_CHAT_TEMPLATE, add_generation_prompt=True,
                                  tokenize=False)
    assert prompt_ids(tok, messages=messages) == hf(text, add_special_tokens=False)["input_ids"]


def test_continue_final_message_leaves_the_models_turn_open(tiny_dir, tok):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Paris "}]
    continued = prompt_ids(tok, messages=messages, continue_final_message=True, add_generation_prompt=False)
    assert continued == [BOS, SOT, *USER, *HELLO, EOT, NL, SOT, 368, NL, 411, 361]
    closed = prompt_ids(tok, messages=messages, add_generation_prompt=False)
    assert closed == [*continued, EOT, NL]
    assert prompt_ids(tok, messages=messages) == [*closed, *MODEL_OPEN]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    text = hf.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert continued == hf(text, add_special_tokens=False)["input_ids"]


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
    ({"messages": [{"role": "user", "content": "x"}], "continue_final_message": True, "add_generation_prompt": False},
     "needs the last message to be the assistant's (it is 'user')"),
    ({"messages": [{"role": "assistant", "content": "x"}], "continue_final_message": True},
     "send add_generation_prompt=False with it"),
    ({"prompt": "x", "continue_final_message": True}, "send messages ending with the assistant's text"),
])
def test_bad_requests_name_the_value(tok, kwargs, message):
    with pytest.raises(ValueError) as err:
        prompt_ids(tok, **kwargs)
    assert message in str(err.value)
