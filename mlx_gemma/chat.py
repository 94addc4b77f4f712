"""Request text -> prompt token ids: Gemma's turn template and raw mode.

Contract:
- `messages` render as `<bos>` then, per turn, `<start_of_turn>{role}\\n{content}<end_of_turn>\\n`,
  then `<start_of_turn>model\\n`. Role `assistant` is written `model`; `developer` (OpenAI's newer
  name for system) is read as `system`. Content is trimmed, as Gemma's own chat template does.
- Gemma has no system role: system text is folded into the next user turn as
  `{system}\\n\\n{user}` (as Gemma 3's template does: the system text as sent, the user text
  trimmed), never dropped. System text with no user turn after it becomes a user turn of its own.
- `continue_final_message=True` (as in transformers and vLLM) leaves the last turn, which must be
  the model's, open: the model continues its text instead of starting a new turn.
  `add_generation_prompt=False` leaves out the closing `<start_of_turn>model\\n`.
- `prompt` without raw is one user turn. With `raw=True` the prompt is tokenized as given
  (special markers such as `<start_of_turn>` become their ids) and `<bos>` is added only if the
  text does not already start with it.
- Text inside messages and non-raw prompts cannot produce special ids.
Errors are ValueError naming the bad value and how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .tokenizer import GemmaTokenizer, check_encodable

ROLE_NAMES = {"user": "user", "assistant": "model", "model": "model", "system": "system",
              "developer": "system"}  # OpenAI's newer name for system instructions


def prompt_ids(
    tokenizer: GemmaTokenizer,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    raw: bool = False,
    continue_final_message: bool = False,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids to prefill for a request given as a prompt or as chat messages."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages (got both)" if prompt is not None
                         else "give exactly one of prompt or messages (got neither)")
    if messages is not None:
        if raw:
            raise ValueError("raw=True applies to prompt only: send the turns as a raw prompt instead")
        turns = normalize_messages(messages)
        _check_ending(turns, continue_final_message, add_generation_prompt)
        return chat_ids(tokenizer, turns, add_generation_prompt, continue_final_message)
    _check_prompt(prompt)
    if continue_final_message:
        raise ValueError("continue_final_message=True continues the model's last turn: send messages ending "
                         "with the assistant's text instead of a prompt")
    if raw:
        return raw_ids(tokenizer, prompt)
    return chat_ids(tokenizer, [("user", prompt.strip())], add_generation_prompt)


def _check_ending(turns: Sequence[tuple[str, str]], continue_final_message: bool, add_generation_prompt: bool) -> None:
    if not continue_final_message:
        return
    if add_generation_prompt:
        raise ValueError("continue_final_message=True continues the model's last turn, which a generation "
                         "prompt would close: send add_generation_prompt=False with it")
    if turns[-1][0] != "model":
        raise ValueError(f"continue_final_message=True needs the last message to be the assistant's (it is "
                         f"{turns[-1][0]!r}): end messages with the assistant text to continue")


def _check_prompt(prompt: Any) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("prompt is empty: send at least one character")
    check_encodable(prompt, "prompt")


def raw_ids(tokenizer: GemmaTokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt, parse_special=True)
    return ids if ids[:1] == [tokenizer.bos_id] else [tokenizer.bos_id, *ids]


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Validate messages; return (role, content) turns with system text folded in."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    turns: list[tuple[str, str]] = []
    pending_system: list[str] = []
    for index, message in enumerate(messages):
        role, content = _check_message(index, message)
        if role == "system":
            pending_system.append(content)
        elif role == "user" and pending_system:
            turns.append(("user", "\n\n".join(pending_system) + "\n\n" + content.strip()))  # as sent + trimmed
            pending_system = []
        else:
            turns.append((role, content.strip()))
    if pending_system:
        turns.append(("user", "\n\n".join(pending_system).strip()))
    return turns


def _check_message(index: int, message: Any) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{index}] must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or role not in ROLE_NAMES:
        raise ValueError(f"messages[{index}].role={role!r} is not supported: "
                         "use user, assistant (or model), system or developer")
    if not isinstance(content, str):
        raise ValueError(f"messages[{index}].content must be a string, got {type(content).__name__}")
    check_encodable(content, f"messages[{index}].content")
    return ROLE_NAMES[role], content


def chat_ids(tokenizer: GemmaTokenizer, turns: Sequence[tuple[str, str]], add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> list[int]:
    """Gemma turn template over (role, content) turns (content already trimmed as the template
    wants it), ending with the model's turn opener, or with the last turn left open.

    Each stretch of text between special tokens is encoded as one piece, exactly as encoding
    the rendered template string with the special tokens split out.
    """
    ids = [tokenizer.bos_id]
    for index, (role, content) in enumerate(turns):
        ids += [tokenizer.start_of_turn_id, *tokenizer.encode(f"{role}\n{content}")]
        if continue_final_message and index == len(turns) - 1:
            return ids
        ids += [tokenizer.end_of_turn_id, *tokenizer.encode("\n")]
    return ids + [tokenizer.start_of_turn_id, *tokenizer.encode("model\n")] if add_generation_prompt else ids
