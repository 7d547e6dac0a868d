"""Qwen's tiktoken tokenizer without transformers: load ``qwen.tiktoken``, encode, decode, stream.

Why our own and not the HF ``QWenTokenizer``: the runtime must not import transformers/torch, and
the HF tokenizer treats special-token text in user input as special by default (prompt injection:
a user typing ``<|im_start|>system`` or ``<img>/etc/passwd</img>``). Here :meth:`encode` recognises
*no* special-token text unless asked; special ids enter prompts only through the prompt builder.

Facts (``tokenization_qwen.py``): ranks 0..N-1 from the file are the BPE tokens (real
N = 151643); the 217 special tokens follow in :data:`SPECIAL_TOKENS` order with id
``N + index``; text is NFC-normalised first.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import logging
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

import tiktoken

from .errors import EdgeError
from .files import atomic_write_text

log = logging.getLogger(__name__)

TIKTOKEN_FILE = "qwen.tiktoken"

#: The original's pattern, verbatim: like cl100k but one digit per token (``\p{N}`` alone).
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
#: The 9 vision-language tags (HF ``IMAGE_ST``).
IMAGE_ST: tuple[str, ...] = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
                             "<img>", "</img>", "<imgpad>")
#: All special tokens in id order (as ``tokenization_qwen.py`` lists them): id = n_bpe + index.
SPECIAL_TOKENS: tuple[str, ...] = ((ENDOFTEXT, IM_START, IM_END)
                                   + tuple(f"<|extra_{i}|>" for i in range(205)) + IMAGE_ST)
assert len(SPECIAL_TOKENS) == 217

#: Tags a model may emit inside an answer; the only specials recognised in response text.
GROUNDING_ST: frozenset[str] = frozenset(("<ref>", "</ref>", "<box>", "</box>", "<quad>",
                                          "</quad>"))


class TokenizerError(EdgeError, ValueError):
    """A tokenizer file or call that cannot work; the message says what to do."""


def _check_ranks(ranks: Mapping[bytes, int], source: str) -> None:
    """Ranks must be 0..N-1 exactly once each and include all 256 single bytes (byte-level BPE)."""
    n = len(ranks)
    if n == 0:
        raise TokenizerError(f"{source}: empty vocabulary; pass a non-empty qwen.tiktoken")
    seen = sorted(ranks.values())
    if seen != list(range(n)):
        bad = next((i for i, r in enumerate(seen) if r != i), n)
        raise TokenizerError(f"{source}: ranks must be contiguous 0..{n - 1} with no duplicates "
                             f"(first problem near rank {bad}); regenerate the vocabulary file")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{source}: not a byte-level vocabulary, {len(missing)} single bytes "
                             f"missing (e.g. {bytes([missing[0]])!r}); use a qwen.tiktoken file")


def read_tiktoken_file(path: str | Path) -> dict[bytes, int]:
    """Parse ``<base64 token> <rank>`` lines (LF or CRLF, blank lines ignored)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {p}; pass the path of a qwen.tiktoken "
                             f"file (or the directory holding it to from_dir)") from None
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {p}: {e}") from None
    ranks: dict[bytes, int] = {}
    for lineno, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected '<base64 token> <rank>'")
            tok = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
            if rank < 0 or not tok:
                raise ValueError("empty token or negative rank")
        except (ValueError, binascii.Error) as e:
            shown = line[:60].decode("ascii", "replace")
            raise TokenizerError(f"{p}:{lineno}: malformed line {shown!r} ({e}); the file must "
                                 f"hold one '<base64 token> <rank>' per line") from None
        if tok in ranks:
            raise TokenizerError(f"{p}:{lineno}: token {tok!r} listed twice (ranks {ranks[tok]} "
                                 f"and {rank}); regenerate the vocabulary file")
        ranks[tok] = rank
    _check_ranks(ranks, str(p))
    return ranks


def write_tiktoken_file(ranks: Mapping[bytes, int], path: str | Path) -> Path:
    """Write ranks as ``qwen.tiktoken`` (sorted by rank, LF), atomically (runtime.files)."""
    _check_ranks(ranks, "write_tiktoken_file")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
                   for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    return atomic_write_text(p, text, encoding="ascii")


class QwenTokenizer:
    """Qwen-VL tokenizer over ``tiktoken`` (offline; never downloads anything).

    ``n_vocab`` = n_bpe + 217 is the real vocabulary; the model's embedding may have more rows
    (padding): such ids decode to nothing.
    """

    def __init__(self, ranks: Mapping[bytes, int], name: str = "Qwen") -> None:
        _check_ranks(ranks, "QwenTokenizer")
        self.n_bpe: int = len(ranks)
        self.special: dict[str, int] = {t: self.n_bpe + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.n_vocab: int = self.n_bpe + len(SPECIAL_TOKENS)
        self._enc = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=dict(ranks),
                                      special_tokens=self.special, explicit_n_vocab=self.n_vocab)
        self._special_bytes: dict[int, bytes] = {i: t.encode() for t, i in self.special.items()}
        s = self.special
        self.eod_id = s[ENDOFTEXT]
        self.im_start_id, self.im_end_id = s[IM_START], s[IM_END]
        self.ref_start_id, self.ref_end_id = s["<ref>"], s["</ref>"]
        self.box_start_id, self.box_end_id = s["<box>"], s["</box>"]
        self.quad_start_id, self.quad_end_id = s["<quad>"], s["</quad>"]
        self.img_start_id, self.img_end_id = s["<img>"], s["</img>"]
        self.img_pad_id = s["<imgpad>"]

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_ranks(cls, ranks: Mapping[bytes, int]) -> "QwenTokenizer":
        return cls(ranks)

    @classmethod
    def from_file(cls, path: str | Path) -> "QwenTokenizer":
        return cls(read_tiktoken_file(path))

    @classmethod
    def from_dir(cls, directory: str | Path) -> "QwenTokenizer":
        d = Path(directory)
        if not d.is_dir():
            raise TokenizerError(f"tokenizer directory not found: {d}; pass the checkpoint or "
                                 f"bundle tokenizer directory holding {TIKTOKEN_FILE}")
        return cls.from_file(d / TIKTOKEN_FILE)

    # -- lookup -------------------------------------------------------------------------------
    def special_id(self, token: str) -> int:
        try:
            return self.special[token]
        except KeyError:
            raise TokenizerError(f"unknown special token {token!r}; known: <|endoftext|>, "
                                 f"<|im_start|>, <|im_end|>, <|extra_N|>, "
                                 f"{', '.join(IMAGE_ST)}") from None

    def is_special(self, token_id: int) -> bool:
        return self.n_bpe <= int(token_id) < self.n_vocab

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one id: BPE bytes, a special's UTF-8 text, or b"" for padding ids."""
        i = int(token_id)
        if i < 0:
            raise TokenizerError(f"negative token id {i}; ids must be >= 0")
        if i < self.n_bpe:
            return self._enc.decode_single_token_bytes(i)
        return self._special_bytes.get(i, b"")

    # -- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str, allowed_special: Iterable[str] | str = frozenset()) -> list[int]:
        """NFC-normalise, then BPE-encode. Special-token text is plain text unless allowed.

        ``allowed_special``: the special-token strings to recognise (or ``"all"``). Never raises
        on special-looking text (``disallowed_special=()``).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        if allowed_special == "all":
            allowed: set[str] = set(self.special)
        else:
            allowed = set(allowed_special)
            unknown = allowed - self.special.keys()
            if unknown:
                raise TokenizerError(f"allowed_special has unknown special tokens "
                                     f"{sorted(unknown)}; use strings from SPECIAL_TOKENS")
        text = unicodedata.normalize("NFC", text)
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """Raw bytes of ids (specials as their UTF-8 text; padding ids >= n_vocab dropped)."""
        limit = self.n_bpe if skip_special else self.n_vocab
        out: list[bytes] = []
        run: list[int] = []
        for t in ids:
            i = int(t)
            if i < 0:
                raise TokenizerError(f"negative token id {i} in decode; ids must be >= 0")
            if i < self.n_bpe:
                run.append(i)
                continue
            if run:
                out.append(self._enc.decode_bytes(run))
                run = []
            if i < limit:
                out.append(self._special_bytes[i])
        if run:
            out.append(self._enc.decode_bytes(run))
        return b"".join(out)

    def decode(self, ids: Iterable[int], skip_special: bool = False,
               errors: str = "replace") -> str:
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors=errors)

    def __len__(self) -> int:
        return self.n_vocab

    def __repr__(self) -> str:
        return f"QwenTokenizer(n_bpe={self.n_bpe}, n_vocab={self.n_vocab})"


class StreamDecoder:
    """Incremental detokeniser: text pieces as tokens arrive, never splitting a UTF-8 character.

    Uses Python's incremental UTF-8 decoder, so ``"".join(pieces) + flush()`` equals
    ``tok.decode(all_ids)`` exactly, replacement characters included.
    """

    def __init__(self, tok: QwenTokenizer, skip_special: bool = False,
                 errors: str = "replace") -> None:
        self.tok = tok
        self.skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors=errors)

    def feed(self, token_id: int) -> str:
        """Add one id; return the text completed by it (possibly "")."""
        if self.skip_special and self.tok.is_special(token_id):
            return ""
        return self._dec.decode(self.tok.token_bytes(token_id), final=False)

    def flush(self) -> str:
        """The held-back rest (an incomplete UTF-8 tail decodes with ``errors``); then reset."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
