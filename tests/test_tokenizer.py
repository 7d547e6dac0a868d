"""runtime.tokenizer and models.nano_vocab: file I/O, specials, injection safety, streaming, BPE."""

from __future__ import annotations

import pytest

from models.nano_vocab import NANO_CORPUS, byte_ranks, nano_ranks, train_bpe
from runtime.tokenizer import (PAT_STR, SPECIAL_TOKENS, QwenTokenizer, StreamDecoder,
                               TokenizerError, read_tiktoken_file, write_tiktoken_file)


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return nano_ranks()


def _py_bpe(piece: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's algorithm, independently: merge the adjacent pair of lowest rank until none."""
    parts = [bytes([b]) for b in piece]
    while True:
        best = min(((ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                    if parts[i] + parts[i + 1] in ranks), default=None)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


# -- vocabulary -------------------------------------------------------------------------------

def test_pat_str_is_the_spec_regex():
    assert PAT_STR == (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_gpt2_byte_order(ranks):
    assert ranks[b"!"] == 0 and ranks[b"\x00"] == 188 and ranks[b"\n"] == 198
    assert ranks[b" "] == 220 and ranks[b"~"] == 93
    assert sorted(byte_ranks().values()) == list(range(256))
    assert {r for t, r in ranks.items() if len(t) == 1} == set(range(256))


def test_nano_vocab_size_deterministic_and_reachable(ranks, tok):
    assert len(ranks) == 256 + 512
    assert nano_ranks() == ranks
    for t, r in ranks.items():  # every token is what BPE makes of its own bytes
        assert _py_bpe(t, ranks) == [t]
        if hasattr(tok._enc, "_encode_single_piece"):
            assert tok._enc._encode_single_piece(t) == [r]


def test_nano_corpus_round_trips_and_compresses(tok):
    ids = tok.encode(NANO_CORPUS)
    assert tok.decode(ids) == NANO_CORPUS
    assert len(ids) < len(NANO_CORPUS.encode()) / 2.5
    for word in ("You are a helpful assistant.", "system", "user", "assistant",
                 "Describe the image in English:", "Where is the red circle?"):
        assert len(tok.encode(word)) <= len(word.split()) + 2, word


def test_train_bpe_tie_break_and_frequency():
    # (b" ", b"c"), (b"a", b"b"), (b"c", b"d") all count 1: the smallest pair bytes wins
    assert train_bpe("ab cd", 1)[b" c"] == 256
    r = train_bpe("ab ab ab cd", 2)
    assert r[b"ab"] == 256 and r[b" ab"] == 257
    assert len(train_bpe("ab", 50)) == 257  # corpus exhausted: stops early


# -- file I/O ---------------------------------------------------------------------------------

def test_file_round_trip_crlf_and_blank_lines(ranks, tmp_path):
    p = write_tiktoken_file(ranks, tmp_path / "qwen.tiktoken")
    assert [f.name for f in tmp_path.iterdir()] == ["qwen.tiktoken"]  # no temp file left
    lines = p.read_text().splitlines()
    assert lines[0].endswith(" 0") and lines[-1].endswith(f" {len(ranks) - 1}")
    crlf = tmp_path / "crlf.tiktoken"
    crlf.write_bytes(b"\r\n".join(l.encode() for l in lines) + b"\r\n\r\n")
    assert read_tiktoken_file(crlf) == ranks
    assert QwenTokenizer.from_file(crlf).n_bpe == len(ranks)


@pytest.mark.parametrize("bad", ["!!!notbase64 3", "IQ==", "IQ== x", "IQ== 1 2"])
def test_malformed_file_names_file_and_line(ranks, tmp_path, bad):
    write_tiktoken_file(ranks, tmp_path / "good.tiktoken")
    lines = (tmp_path / "good.tiktoken").read_text().splitlines()
    lines[2] = bad
    p = tmp_path / "bad.tiktoken"
    p.write_text("\n".join(lines))
    with pytest.raises(TokenizerError, match=r"bad\.tiktoken:3: malformed line") as e:
        QwenTokenizer.from_file(p)
    assert "\n" not in str(e.value)


def test_bad_vocabularies_rejected(tmp_path, ranks):
    with pytest.raises(TokenizerError, match="not found"):
        QwenTokenizer.from_file(tmp_path / "missing.tiktoken")
    with pytest.raises(TokenizerError, match="directory not found"):
        QwenTokenizer.from_dir(tmp_path / "nope")
    gap = dict(ranks)
    gap[b"zzz_new"] = len(ranks) + 5
    with pytest.raises(TokenizerError, match="contiguous"):
        QwenTokenizer.from_ranks(gap)
    no_bytes = {b"ab": 0, b"a": 1}
    with pytest.raises(TokenizerError, match="byte-level"):
        QwenTokenizer.from_ranks(no_bytes)
    p = tmp_path / "dup.tiktoken"
    p.write_text("IQ== 0\nIQ== 1\n")
    with pytest.raises(TokenizerError, match=r"dup\.tiktoken:2: .*twice"):
        read_tiktoken_file(p)


# -- special tokens ---------------------------------------------------------------------------

def test_special_ids(tok):
    assert len(SPECIAL_TOKENS) == 217
    assert SPECIAL_TOKENS[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert SPECIAL_TOKENS[3] == "<|extra_0|>" and SPECIAL_TOKENS[207] == "<|extra_204|>"
    assert SPECIAL_TOKENS[-9:] == ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
                                   "<img>", "</img>", "<imgpad>")
    n = tok.n_bpe
    assert tok.n_vocab == n + 217 == len(tok)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.special_id(t) == n + i
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (n, n + 1, n + 2)
    assert (tok.ref_start_id, tok.ref_end_id, tok.box_start_id, tok.box_end_id) == \
        (n + 208, n + 209, n + 210, n + 211)
    assert (tok.quad_start_id, tok.quad_end_id) == (n + 212, n + 213)
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id) == (n + 214, n + 215, n + 216)
    # the real vocabulary's numbers (151643 BPE ranks in Qwen-VL's qwen.tiktoken)
    real = 151643
    assert real + SPECIAL_TOKENS.index("<img>") == 151857
    assert real + SPECIAL_TOKENS.index("</img>") == 151858
    assert real + SPECIAL_TOKENS.index("<imgpad>") == 151859
    with pytest.raises(TokenizerError, match="unknown special token"):
        tok.special_id("<image>")


# -- encode / decode --------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "", "Hello, world!", "What does the sign say?\n  (12,345),(678,999)\r\n\ttabs",
    "héllo wörld — naïve café", "日本語のテキスト", "emoji 🙂👍🏽 and Ωμέγα", "a\x00b\x7f",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.n_bpe for i in ids)
    assert tok.decode(ids) == text


def test_nfc_normalisation(tok):
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    assert tok.encode(decomposed) == tok.encode(composed)
    assert tok.decode(tok.encode(decomposed)) == composed


def test_digits_are_single_tokens(tok):
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]


def test_special_text_is_plain_by_default(tok):
    text = "<img>/etc/passwd</img> <|im_start|>system <|endoftext|><box>(1,2),(3,4)</box><imgpad>"
    ids = tok.encode(text)
    assert ids and max(ids) < tok.n_bpe
    assert tok.decode(ids) == text


def test_allowed_special(tok):
    ids = tok.encode("<ref>dog</ref>", allowed_special={"<ref>", "</ref>"})
    assert ids[0] == tok.ref_start_id and ids[-1] == tok.ref_end_id
    assert tok.decode(ids[1:-1]) == "dog"
    # only the allowed ones are special
    ids = tok.encode("<ref>x</ref><img>", allowed_special={"<ref>"})
    assert ids.count(tok.ref_start_id) == 1 and tok.img_start_id not in ids
    assert tok.ref_end_id not in ids
    assert tok.im_start_id in tok.encode("<|im_start|>", allowed_special="all")
    with pytest.raises(TokenizerError, match="unknown special"):
        tok.encode("x", allowed_special={"<nope>"})


def test_decode_specials_and_padding(tok):
    ids = [tok.im_start_id] + tok.encode("hi") + [tok.im_end_id, tok.n_vocab, tok.n_vocab + 70]
    assert tok.decode(ids) == "<|im_start|>hi<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "hi"
    assert tok.decode_bytes(ids) == b"<|im_start|>hi<|im_end|>"
    assert tok.decode([tok.img_pad_id, tok.box_start_id]) == "<imgpad><box>"
    assert tok.decode([tok.n_vocab + 3]) == ""
    with pytest.raises(TokenizerError, match="negative"):
        tok.decode([-1])


def test_decode_invalid_utf8_replaced(tok, ranks):
    bad = [ranks[b"\xe6"], ranks[b"A"]]  # a lead byte without its continuation
    assert tok.decode(bad) == "\ufffdA"
    assert tok.decode_bytes(bad) == b"\xe6A"


# -- streaming --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["naïve 日本 🙂 done", "plain ascii", "🙂🙂", "é"])
def test_stream_decoder_joins_to_decode(tok, text):
    ids = tok.encode(text) + [tok.im_end_id]
    sd = StreamDecoder(tok)
    pieces = [sd.feed(i) for i in ids]
    assert "".join(pieces) + sd.flush() == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # never emits half a character


def test_stream_decoder_holds_back_split_characters(tok, ranks):
    ids = [ranks[bytes([b])] for b in "🙂".encode()]  # one 4-byte character, 4 tokens
    sd = StreamDecoder(tok)
    assert [sd.feed(i) for i in ids] == ["", "", "", "🙂"]
    assert sd.flush() == ""


def test_stream_decoder_invalid_and_truncated(tok, ranks):
    ids = [ranks[b"\xe6"], ranks[b"A"], ranks[b"\xf0"], ranks[b"\x9f"]]
    sd = StreamDecoder(tok)
    out = "".join(sd.feed(i) for i in ids) + sd.flush()
    assert out == tok.decode(ids) == "\ufffdA\ufffd"
    sd = StreamDecoder(tok, skip_special=True)
    assert sd.feed(tok.im_end_id) == "" and sd.feed(tok.n_vocab + 1) == ""
