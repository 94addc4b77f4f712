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
  the character completes) and keeps each piece's leading space. Tokens whose
  own text holds U+FFFD (Gemma's vocabulary has some) are emitted at once. One exception: where
  byte-fallback tokens do not form valid UTF-8 (a character cut off, a stray continuation byte),
  the pieces keep every complete character and read each bad sequence as U+FFFD, as Python's
  `bytes.decode("utf-8", "replace")` does, where `decode` turns the whole byte run into U+FFFD.
Reads a Hugging Face `tokenizer.json` with the `tokenizers` library.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

STOP_TOKENS = ("<eos>", "<end_of_turn>")
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
        # encode_batch lets go of the GIL while it works (encode holds it): a long prompt tokenized on
        # a server's worker thread must not stall the event loop. The ids are the same.
        return tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._raw.decode(list(ids), skip_special_tokens=True)

    @functools.cached_property
    def byte_values(self) -> dict[int, int]:
        """The byte-fallback tokens ("<0xE2>"): id -> the byte each stands for."""
        return {token_id: int(token[3:5], 16) for token, token_id in self._raw.get_vocab().items()
                if _BYTE_TOKEN.fullmatch(token)}

    def token_to_id(self, token: str) -> int | None:
        return self._raw.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._raw.id_to_token(token_id)

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

    Byte-fallback tokens go through one incremental UTF-8 decoder (errors="replace"), which keeps
    back only the bytes of a character not finished yet; any other token first ends a pending
    character (one U+FFFD if cut off) and then adds its own text. Constant work per token.
    """

    def __init__(self, tokenizer: GemmaTokenizer):
        self._tokenizer = tokenizer
        self._bytes = codecs.getincrementaldecoder("utf-8")("replace")
        self._bytes_fed = False  # since the last flush: plain tokens then skip the decoder

    def add(self, token_id: int) -> str:
        byte = self._tokenizer.byte_values.get(token_id)
        if byte is not None:
            self._bytes_fed = True
            return self._bytes.decode(bytes((byte,)))
        return (self.flush() if self._bytes_fed else "") + self._tokenizer.decode([token_id])

    def flush(self) -> str:
        """Return whatever is held back: an incomplete character at the end reads as one U+FFFD, as
        Python's `bytes.decode("utf-8", "replace")` reads it (the tokenizer gives one per byte)."""
        text = self._bytes.decode(b"", final=True)
        self._bytes.reset()
        self._bytes_fed = False
        return text
