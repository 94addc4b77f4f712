"""Gemma tokenizer: text <-> token ids, stop ids, and a streaming detokenizer.

Contract:
- `encode(text, parse_special=False)` never adds <bos>. With parse_special=False, text such as
  "<start_of_turn>" in user input is tokenized as plain characters, so a message cannot forge a
  turn; with parse_special=True (raw prompts) such markers become their special ids.
  Text holding a lone surrogate, which no UTF-8 can encode, raises ValueError.
- `decode(ids)` drops special tokens.
- `stop_ids` holds <eos>, <end_of_turn> and any eos id of generation_config.json.
- `StreamingDetokenizer` turns ids into text pieces whose concatenation equals
  `decode(all ids)`: it never emits a split UTF-8 character (byte-fallback tokens are held until
  the character completes) and keeps each piece's leading space. One exception: where the ids
  end part way through a byte-fallback character, the pieces keep the complete characters of
  that byte run and end with U+FFFD, where `decode` turns the whole run into U+FFFD.
Reads a Hugging Face `tokenizer.json` with the `tokenizers` library.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

STOP_TOKENS = ("<eos>", "<end_of_turn>")
REPLACEMENT_CHAR = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


class GemmaTokenizer:
    def __init__(self, raw: Tokenizer, extra_stop_ids: Iterable[int] = ()):
        self._raw = raw
        self._plain = Tokenizer.from_str(raw.to_str())
        self._plain.encode_special_tokens = True
        self.bos_id = self._required_id("<bos>")
        self.eos_id = self._required_id("<eos>")
        self.start_of_turn_id = self._required_id("<start_of_turn>")
        self.end_of_turn_id = self._required_id("<end_of_turn>")
        self.stop_ids = frozenset([self.eos_id, self.end_of_turn_id, *extra_stop_ids])
        self.vocab_size = raw.get_vocab_size()

    @classmethod
    def from_dir(cls, path: str | Path) -> "GemmaTokenizer":
        path = Path(path)
        raw = Tokenizer.from_file(str(path / "tokenizer.json"))
        return cls(raw, _generation_eos_ids(path))

    def _required_id(self, token: str) -> int:
        token_id = self._raw.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token} token: this is not a Gemma tokenizer")
        return token_id

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        check_encodable(text)
        tokenizer = self._raw if parse_special else self._plain
        return tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._raw.decode(list(ids), skip_special_tokens=True)

    @functools.cached_property
    def byte_values(self) -> dict[int, int]:
        """The byte-fallback tokens ("<0xE2>"): id -> the byte each stands for."""
        return {token_id: int(token[3:5], 16) for token, token_id in self._raw.get_vocab().items()
                if _BYTE_TOKEN.fullmatch(token)}

    def token_to_id(self, token: str) -> int | None:
        return self._raw.token_to_id(token)

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


def check_encodable(text: str, name: str = "the text") -> None:
    """Refuse text that no UTF-8 can hold: a lone surrogate such as "\\ud800" (left by a bad decode)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} {text[:40]!r} holds a lone UTF-16 surrogate {text[exc.start]!r} at index "
                         f"{exc.start}: pass valid Unicode (join a surrogate pair into one character, or decode "
                         "bytes with errors='replace')") from None


def _generation_eos_ids(path: Path) -> list[int]:
    config_file = path / "generation_config.json"
    if not config_file.exists():
        return []
    eos = json.loads(config_file.read_text()).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


class StreamingDetokenizer:
    """Feed ids one at a time with `add`; each call returns the text that became final.

    It decodes the ids held since the last piece it returned: one token, or the byte-fallback
    tokens of a character still incomplete. A piece is returned, and the held ids dropped, as soon
    as their text ends on a complete character. Decoding no more than that also keeps characters
    that completed before a cut-off one: the tokenizer's decode turns a whole run of byte tokens
    into U+FFFD when the run ends part way through a character.
    """

    def __init__(self, tokenizer: GemmaTokenizer):
        self._tokenizer = tokenizer
        self._held: list[int] = []

    def add(self, token_id: int) -> str:
        self._held.append(token_id)
        text = self._tokenizer.decode(self._held)
        if text.endswith(REPLACEMENT_CHAR):
            return ""  # a character is still incomplete: wait for its next bytes
        self._held = []
        return text

    def flush(self) -> str:
        """Return whatever is held back: an incomplete character at the end reads as one U+FFFD, as
        Python's `bytes.decode("utf-8", "replace")` reads it (the tokenizer gives one per byte)."""
        held, self._held = self._held, []
        byte_values = self._tokenizer.byte_values
        cut = len(held)
        while cut and held[cut - 1] in byte_values:
            cut -= 1
        tail = bytes(byte_values[token_id] for token_id in held[cut:])
        return self._tokenizer.decode(held[:cut]) + tail.decode("utf-8", "replace")
