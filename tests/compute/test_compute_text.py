"""Streaming text: split UTF-8 characters, stop sequences, and the deltas' sum."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from infergrid.compute.engine import IncrementalDetokenizer, StopMatcher
from infergrid.compute.transformers_engine import TransformersEngine

TEXT = "Paris – 日本語 ✓ naïve 🐉!"


def _deltas(engine: TransformersEngine, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(engine.decode)
    out = [detok.push(i) for i in ids]
    out.append(detok.flush())
    return out


def test_split_characters_never_stream_as_garbage(tiny_engine: TransformersEngine) -> None:
    ids = tiny_engine.encode(TEXT)
    assert len(ids) == len(TEXT.encode())  # one token per byte: every é and 🐉 is split
    deltas = _deltas(tiny_engine, ids)
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[-1] == ""  # nothing was left to flush


def test_deltas_add_up_to_decode_even_for_invalid_bytes(tiny_engine: TransformersEngine) -> None:
    # Byte tokens are 3 + byte value: a lone lead byte, a stray continuation byte, then text.
    ids = [3 + 0xE6, 3 + ord("a"), 3 + 0x80, 3 + ord("b"), 3 + 0xE6, 3 + 0x97]
    deltas = _deltas(tiny_engine, ids)
    assert "".join(deltas) == tiny_engine.decode(ids)
    assert deltas[-1] == "\ufffd"  # the unfinished character at the very end is flushed


@pytest.mark.slow
def test_real_bpe_tokenizer_round_trips(smollm2_tokenizer_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    ids = tokenizer.encode(TEXT)
    backend = tokenizer.backend_tokenizer
    detok = IncrementalDetokenizer(lambda xs: backend.decode(list(xs), skip_special_tokens=True))
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def _stream(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_sequence_split_across_pieces() -> None:
    assert _stream(["STOP"], ["Hello S", "TO", "P and more"]) == ("Hello ", True)
    assert _stream(["\n\n"], ["a\n", "\nb"]) == ("a", True)


def test_earliest_stop_wins_and_text_before_it_is_kept() -> None:
    assert _stream(["yz", "b"], ["xabyz"]) == ("xa", True)


def test_partial_stop_is_held_then_released() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("the E") == ("the ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("D?") == ("", True)
    matcher = StopMatcher(["END"])
    assert matcher.feed("the EN") == ("the ", False)
    assert matcher.feed("x") == ("ENx", False)
    assert _stream(["END"], ["the EN"]) == ("the EN", False)  # flushed at the end


def test_no_stops_passes_text_through() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False)


def test_long_streams_still_find_stops_after_compaction() -> None:
    pieces = ["abcdefghij"] * 2000 + ["xx", "S", "TOP", "tail"]
    text, hit = _stream(["STOP"], pieces)
    assert hit
    assert text == "abcdefghij" * 2000 + "xx"
