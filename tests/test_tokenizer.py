"""Tokenizer: stop ids, special-token handling, and the streaming detokenizer."""

from __future__ import annotations

import pytest

from mlx_gemma.tokenizer import GemmaTokenizer

TEXTS = [
    " héllo wörld, 日本語のテキスト and émojis 🙂🚀 at the end",
    "Water boils at a temperature of 100°C — ça va? ",
    "  leading spaces, then\nnew lines\n\n and ∑ symbols ∞",
]


@pytest.fixture(scope="module")
def tok(tiny_dir) -> GemmaTokenizer:
    return GemmaTokenizer.from_dir(tiny_dir)


def test_special_ids_and_stop_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.start_of_turn_id, tok.end_of_turn_id) == (2, 1, 5, 6)
    assert tok.stop_ids == frozenset({1, 6})


def test_round_trip_and_byte_fallback(tok):
    ids = tok.encode("日本")
    assert len(ids) == 6  # two 3-byte characters, one byte token each byte
    assert tok.decode(ids) == "日本"
    assert tok.decode([2, *tok.encode("Hi"), 6]) == "Hi"


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_join_to_the_full_decode(tok, text):
    ids = tok.encode(text)
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_pieces_wait_for_complete_characters(tok):
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in tok.encode("🙂")]
    assert pieces == ["", "", "", "🙂"]


def test_leading_space_is_kept(tok):
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in tok.encode("Hi there")]
    assert "".join(pieces) == "Hi there" and any(p.startswith(" ") for p in pieces)


def test_long_streams_lose_nothing(tok):
    text = " ".join(TEXTS) * 4
    ids = tok.encode(text)
    detok = tok.detokenizer()
    assert "".join(detok.add(i) for i in ids) + detok.flush() == text


def test_a_character_cut_off_costs_only_itself(tok):
    """Two 4-byte characters as 8 byte tokens, cut after 6: the first stays, the cut one is one U+FFFD
    (as Python's decode with errors="replace"), where the tokenizer's decode blanks the whole run."""
    ids = tok.encode("\U0001d522\U0001d522")
    assert all(i in tok.byte_values for i in ids) and len(ids) == 8
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids[:6]] + [detok.flush()]
    assert pieces == ["", "", "", "\U0001d522", "", "", "\ufffd"]
    assert tok.decode(ids[:6]) == "\ufffd" * 6


def test_incomplete_character_is_flushed_at_the_end(tok):
    detok = tok.detokenizer()
    assert detok.add(tok.encode("日")[0]) == ""
    assert detok.flush() == "\ufffd"


def test_a_lone_surrogate_is_refused_naming_it_and_the_fix(tok):
    with pytest.raises(ValueError) as refused:
        tok.encode("ok \ud800 then")
    assert str(refused.value) == (
        "the text 'ok \\ud800 then' holds a lone UTF-16 surrogate '\\ud800' at index 3: pass valid Unicode "
        "(join a surrogate pair into one character, or decode bytes with errors='replace')")
    assert tok.decode(tok.encode("ok \U0001f642")) == "ok \U0001f642"  # a joined pair is one character and encodes


def _with_replacement_token(tiny_dir) -> tuple[GemmaTokenizer, int]:
    """The tiny tokenizer plus a token whose own text is U+FFFD, as Gemma's vocabulary has."""
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    raw.add_tokens(["\ufffd"])
    tok = GemmaTokenizer(raw)
    return tok, tok.token_to_id("\ufffd")


def test_a_token_whose_text_is_the_replacement_character_streams_at_once(tiny_dir):
    tok, replacement = _with_replacement_token(tiny_dir)
    detok = tok.detokenizer()
    ids = [replacement, replacement, *tok.encode(" ok")]
    pieces = [detok.add(i) for i in ids]
    assert pieces[:2] == ["\ufffd", "\ufffd"]
    assert "".join(pieces) + detok.flush() == tok.decode(ids) == "\ufffd\ufffd ok"
    assert all(detok.add(replacement) == "\ufffd" for _ in range(200))  # nothing held: each is one decode


def test_a_stray_continuation_byte_costs_only_itself(tok):
    """日 then a lone 0x80 then x: the character stays whole and the bad byte is one U+FFFD, as Python's
    decode with errors="replace" reads the bytes (the tokenizer's decode blanks the whole run)."""
    byte_ids = {value: token_id for token_id, value in tok.byte_values.items()}
    ids = [*tok.encode("日"), byte_ids[0x80], *tok.encode("x")]
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert pieces == ["", "", "日", "\ufffd", "x", ""]
    assert tok.decode(ids) == "\ufffd" * 4 + "x"


def test_a_cut_character_followed_by_a_byte_token_is_one_replacement_then_the_byte(tok):
    byte_ids = {value: token_id for token_id, value in tok.byte_values.items()}
    ids = [byte_ids[0xE6], byte_ids[0x97], byte_ids[0x41]]  # 日 cut after 2 bytes, then "A" as a byte
    detok = tok.detokenizer()
    assert [detok.add(i) for i in ids] + [detok.flush()] == ["", "", "\ufffdA", ""]


def test_a_long_run_of_cut_characters_streams_as_it_goes(tok):
    """Lead bytes cut off again and again: each cut character comes out as soon as the next byte
    shows it is cut, as Python's decode with errors="replace" reads the bytes; nothing piles up."""
    byte_ids = {value: token_id for token_id, value in tok.byte_values.items()}
    run = [0xE6, 0x97] * 200 + [0xE6]
    detok = tok.detokenizer()
    pieces = [detok.add(byte_ids[b]) for b in run]
    assert pieces[:4] == ["", "", "\ufffd", ""]
    assert sum(1 for piece in pieces if piece) == 200
    assert "".join(pieces) + detok.flush() == bytes(run).decode("utf-8", "replace")


def test_encoding_lets_other_threads_run(tok):
    """A server tokenizes on a worker thread; holding the GIL for the whole of a long prompt would
    stall its event loop (every other client's stream) all the same."""
    import threading

    text = "hello world, " * 60_000
    ticks, done = [0], threading.Event()

    def ticker() -> None:
        while not done.is_set():
            ticks[0] += 1
            done.wait(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        for _ in range(3):
            ids = tok.encode(text)
    finally:
        done.set()
        thread.join()
    assert ids == tok._plain.encode(text, add_special_tokens=False).ids
    assert ticks[0] >= 20  # holding the GIL, the ticker gets a tick or two in
