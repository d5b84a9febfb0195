"""CLIP byte-level BPE tokenizer, ids identical to transformers' `CLIPTokenizer`.

transformers (v5) builds CLIP's tokenizer on the `tokenizers` library with this pipeline, which
this module re-implements with the standard library only (the runtime must not need torch,
transformers, `regex` or `ftfy`):

1. Added tokens (bos/eos/unk/pad and any `added_tokens_decoder` entries) are split out first:
   tokens flagged ``normalized=False`` are matched in the raw text, the others in the normalised
   text of what remains.
2. Normalizer: NFC, every run of Unicode White_Space -> one " ", lowercase (per character).
3. Pre-tokenizer: the CLIP split pattern
   ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   (whitespace dropped), then GPT-2's ByteLevel split and byte -> unicode mapping.
4. BPE with the end-of-word suffix ``</w>`` on the last symbol of every piece.
5. ``<bos> ids <eos>``, truncated to ``model_max_length`` and padded with the pad token.

Character classes come from `unicodedata`, patched with the few code points that Python's
Unicode database (14.0 in Python 3.11) leaves unassigned but the `tokenizers` build treats as
letters/numbers or lowercases (its regex engine knows Unicode 16, Rust's std Unicode 17).
"""

from __future__ import annotations

import functools
import heapq
import json
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import BundleFormatError, BundleNotFoundError, InvalidArgumentError

__all__ = ["AddedToken", "CLIPTokenizer", "TokenizedPrompt"]

END_OF_WORD = "</w>"

# transformers' CLIPTokenizer defaults, used when a folder names no such token.
_DEFAULT_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
# The named special tokens, in the order transformers registers them (see _collect_added_tokens).
_SPECIAL_ORDER = ("bos_token", "eos_token", "unk_token", "pad_token")

# Unicode White_Space, which is what `\s` means in the tokenizers regex engine. Python's
# str.isspace() also accepts U+001C..U+001F; tokenizers treats those as punctuation.
_WHITESPACE_CHARS = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
_WHITESPACE_SET = frozenset(_WHITESPACE_CHARS)
_WHITESPACE_RUN = re.compile("[" + re.escape(_WHITESPACE_CHARS) + "]+")

# Code points Python 3.11 calls "Cn" (unassigned) but tokenizers' regex engine (Unicode 16) puts
# in \p{L} / \p{N}. Newer Pythons know them already, so the table is only consulted for "Cn".
_NEWER_LETTERS = (
    (0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC), (0x105C0, 0x105F3), (0x10D4A, 0x10D65),
    (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4), (0x1123F, 0x11240), (0x11380, 0x11389), (0x1138B, 0x1138B),
    (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D3),
    (0x11BC0, 0x11BE0), (0x11F02, 0x11F02), (0x11F04, 0x11F10), (0x11F12, 0x11F33), (0x1342F, 0x1342F),
    (0x13441, 0x13446), (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C), (0x18CFF, 0x18CFF),
    (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D), (0x1E4D0, 0x1E4EB),
    (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x2B739, 0x2B739), (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF),
)
_NEWER_NUMBERS = (
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11F50, 0x11F59), (0x16130, 0x16139),
    (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3), (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA),
)
# Lowercase mappings Rust's std (Unicode 17) has and Python 3.11's str.lower() lacks.
_NEWER_LOWERCASE: dict[int, int] = {
    0x1C89: 0x1C8A, 0xA7CB: 0x0264, 0xA7CC: 0xA7CD, 0xA7CE: 0xA7CF, 0xA7D2: 0xA7D3, 0xA7D4: 0xA7D5,
    0xA7DA: 0xA7DB, 0xA7DC: 0x019B,
    **{cp: cp + 0x20 for cp in range(0x10D50, 0x10D66)},
    **{cp: cp + 0x1B for cp in range(0x16EA0, 0x16EB9)},
}

_LETTER, _NUMBER, _OTHER, _SPACE = 0, 1, 2, 3

# The CLIP split pattern lists these before its letter/number/other alternatives.
_CONTRACTION_TAILS = ("s", "t", "re", "ve", "m", "ll", "d")
_SPECIAL_PIECES = ("<|startoftext|>", "<|endoftext|>")


def _in_ranges(cp: int, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


@functools.lru_cache(maxsize=8192)
def _char_class(ch: str) -> int:
    if ch in _WHITESPACE_SET:
        return _SPACE
    category = unicodedata.category(ch)
    if category[0] == "L":
        return _LETTER
    if category[0] == "N":
        return _NUMBER
    if category == "Cn":
        cp = ord(ch)
        if _in_ranges(cp, _NEWER_LETTERS):
            return _LETTER
        if _in_ranges(cp, _NEWER_NUMBERS):
            return _NUMBER
    return _OTHER


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, indexed by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {ch: b for b, ch in enumerate(_BYTE_TO_CHAR)}


def normalize(text: str) -> str:
    """The tokenizers normalizer CLIP uses: NFC, whitespace runs -> " ", lowercase."""
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE_RUN.sub(" ", text)
    if text.isascii():
        return text.lower()
    # Rust lowercases char by char; Python's str.lower() turns a word-final capital sigma into
    # "ς", so that one letter needs the per-character path.
    lowered = "".join(ch.lower() for ch in text) if "\u03a3" in text else text.lower()
    return lowered.translate(_NEWER_LOWERCASE)


def split_words(text: str) -> list[str]:
    """CLIP's split pattern over normalised text, followed by ByteLevel's own split.

    A hand-written scanner replaces the `regex` module: at each position the pattern's
    alternatives are tried in their order, and characters that match none (whitespace) are
    dropped.
    """
    pieces: list[str] = []
    n = len(text)
    i = 0
    while i < n:
        ch = text[i]
        if ch == "<" and text.startswith(_SPECIAL_PIECES, i):
            name = "startoftext" if text.startswith(_SPECIAL_PIECES[0], i) else "endoftext"
            # ByteLevel's GPT-2 pattern splits this piece again; for every other CLIP piece
            # (a letter run, one digit, a punctuation run, a contraction) it is a no-op.
            pieces += ["<|", name, "|>"]
            i += len(name) + 4
            continue
        if ch == "'":
            tail = next((t for t in _CONTRACTION_TAILS if text.startswith(t, i + 1)), None)
            if tail is not None:
                pieces.append(text[i : i + 1 + len(tail)])
                i += 1 + len(tail)
                continue
        cls = _char_class(ch)
        if cls == _SPACE:
            i += 1
            continue
        j = i + 1
        if cls != _NUMBER:  # numbers are split one digit at a time
            while j < n and _char_class(text[j]) == cls:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


@dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim in the text before BPE (special tokens, textual inversion)."""

    content: str
    id: int
    special: bool = True
    normalized: bool = False


@dataclass(frozen=True)
class TokenizedPrompt:
    input_ids: np.ndarray  # int64, shape (model_max_length,)
    num_tokens: int  # tokens of the prompt itself, before truncation, without bos/eos
    truncated: bool  # True when prompt tokens were dropped to fit model_max_length
    dropped_text: str  # the decoded text that was cut off ("" when not truncated)


def _find_leftmost_longest(text: str, start: int, patterns: Sequence[str]) -> tuple[int, str] | None:
    """Earliest match of any pattern at or after `start`, the longest one on a tie.

    This is the aho-corasick LeftmostLongest rule tokenizers uses for added tokens.
    """
    best: tuple[int, str] | None = None
    for pattern in patterns:
        pos = text.find(pattern, start)
        if pos < 0:
            continue
        if best is None or pos < best[0] or (pos == best[0] and len(pattern) > len(best[1])):
            best = (pos, pattern)
    return best


class CLIPTokenizer:
    """Byte-level BPE tokenizer that reproduces transformers' `CLIPTokenizer` ids."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        model_max_length: int,
        bos_token: str,
        eos_token: str,
        pad_token: str,
        unk_token: str,
        added_tokens: Iterable[AddedToken] = (),
    ):
        if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or model_max_length < 2:
            raise InvalidArgumentError(
                "model_max_length", f"must be an int >= 2 (room for bos and eos), got {model_max_length!r}",
                "use the text encoder's sequence length (77 for CLIP)",
            )
        self._vocab = dict(vocab)
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, (a, b) in enumerate(merges):
            for part in (a, b, a + b):
                if part not in self._vocab:
                    raise InvalidArgumentError(
                        "merges", f"merge #{rank + 1} ({a!r} {b!r}) uses {part!r}, which is not in the vocab",
                        "pass the merges.txt that belongs to this vocab.json",
                    )
            # A repeated pair keeps its first (lowest) rank, as tokenizers does.
            self._ranks.setdefault((a, b), rank)
        self.model_max_length = model_max_length

        # Added tokens: an entry for the same text later in the list overrides an earlier one.
        by_content: dict[str, AddedToken] = {}
        for token in added_tokens:
            if not token.content:
                raise InvalidArgumentError("added_tokens", "an added token has empty content", "drop it")
            by_content[token.content] = token
        # Like transformers, special tokens given only by name are matched verbatim in the text.
        for text in (bos_token, eos_token, unk_token, pad_token):
            if text not in by_content and text in self._vocab:
                by_content[text] = AddedToken(content=text, id=self._vocab[text], special=True, normalized=False)
        self._added = by_content
        self._raw_patterns = [t.content for t in by_content.values() if not t.normalized]
        # Normalised tokens are matched in normalised text, so their own text is normalised too.
        self._normalized_patterns = {normalize(t.content): t for t in by_content.values() if t.normalized}
        self._normalized_patterns.pop("", None)
        self._normalized_pattern_list = list(self._normalized_patterns)
        self._special_ids = frozenset(t.id for t in by_content.values() if t.special)

        self._id_to_token: dict[int, str] = {i: tok for tok, i in self._vocab.items()}
        for norm_content, token in self._normalized_patterns.items():
            self._id_to_token[token.id] = norm_content
        for token in by_content.values():
            if not token.normalized:
                self._id_to_token[token.id] = token.content

        ids = {}
        for name, text in (("bos_token", bos_token), ("eos_token", eos_token),
                           ("pad_token", pad_token), ("unk_token", unk_token)):
            token_id = self._token_id(text)
            if token_id is None:
                raise InvalidArgumentError(
                    name, f"{text!r} is neither in the vocab nor an added token",
                    "use the special tokens of the tokenizer this vocab.json came from",
                )
            ids[name] = token_id
        self.bos_token_id = ids["bos_token"]
        self.eos_token_id = ids["eos_token"]
        self.pad_token_id = ids["pad_token"]
        self.unk_token_id = ids["unk_token"]
        # Per-instance cache: prompts repeat words, and BPE is the slow part.
        self._bpe_cached = functools.lru_cache(maxsize=32768)(self._bpe)

    def _token_id(self, text: str) -> int | None:
        if text in self._added:
            return self._added[text].id
        return self._vocab.get(text)

    @property
    def vocab_size(self) -> int:
        """Number of embedding rows the ids index: the largest id + 1 (49408 for CLIP)."""
        return max(max(self._vocab.values(), default=-1), max((t.id for t in self._added.values()), default=-1)) + 1

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder) -> "CLIPTokenizer":
        """Load vocab.json, merges.txt and tokenizer_config.json as transformers does.

        Which special tokens exist, and whether each is matched in raw or normalised text,
        follows transformers' loading rules (see `_collect_added_tokens`); special_tokens_map.json
        and added_tokens.json are read where transformers reads them.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise BundleNotFoundError(
                str(folder), "tokenizer folder does not exist",
                "point at the folder holding vocab.json, merges.txt and tokenizer_config.json",
            )
        vocab_path = folder / "vocab.json"
        config_path = folder / "tokenizer_config.json"
        vocab = _read_json(vocab_path, required=True)
        if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
        ):
            raise BundleFormatError(
                str(vocab_path), "must be a JSON object mapping token strings to integer ids", "re-export the bundle"
            )
        merges = _read_merges(folder / "merges.txt")
        config = _read_json(config_path, required=True)
        if not isinstance(config, dict):
            raise BundleFormatError(str(config_path), "must be a JSON object", "re-export the bundle")
        max_length = config.get("model_max_length")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 2 <= max_length <= 1_000_000:
            raise BundleFormatError(
                str(config_path), f"model_max_length must be an int between 2 and 1e6, got {max_length!r}",
                "set it to the text encoder's sequence length (77 for CLIP)",
            )
        added, specials = _collect_added_tokens(folder, config, vocab)
        try:
            return cls(vocab, merges, model_max_length=max_length, added_tokens=added, **specials)
        except InvalidArgumentError as err:
            # The constructor validates what the files hold; report the file, not the argument.
            bad_file = "merges.txt" if err.argument == "merges" else "tokenizer_config.json"
            raise BundleFormatError(
                str(folder / bad_file), f"{err.argument}: {err.problem}", "re-export the bundle"
            ) from err

    # -- encoding ----------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Ids of `text` without bos/eos, untruncated (added tokens in the text included)."""
        if not isinstance(text, str):
            raise InvalidArgumentError(
                "text", f"must be a str, got {type(text).__name__}", "pass the prompt as a Python string"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidArgumentError(
                "text", f"is not valid Unicode ({err.reason} at index {err.start})",
                "remove lone surrogate characters from the text",
            ) from err
        ids: list[int] = []
        for segment, token in self._split_added(text, self._raw_patterns, lambda c: self._added[c]):
            if token is not None:
                ids.append(token.id)
                continue
            normalized = normalize(segment)
            patterns = self._normalized_pattern_list
            for piece, norm_token in self._split_added(normalized, patterns, self._normalized_patterns.__getitem__):
                if norm_token is not None:
                    ids.append(norm_token.id)
                    continue
                for word in split_words(piece):
                    ids.extend(self._bpe_cached(word))
        return ids

    @staticmethod
    def _split_added(text: str, patterns: list[str], lookup):
        """Yield (text, None) for plain stretches and (match, AddedToken) for added tokens."""
        if not patterns:
            if text:
                yield text, None
            return
        start = 0
        while True:
            found = _find_leftmost_longest(text, start, patterns)
            if found is None:
                break
            pos, pattern = found
            if pos > start:
                yield text[start:pos], None
            yield pattern, lookup(pattern)
            start = pos + len(pattern)
        if start < len(text):
            yield text[start:], None

    def _bpe(self, word: str) -> tuple[int, ...]:
        """BPE ids of one pre-tokenized piece.

        Like tokenizers: repeatedly merge the lowest-ranked adjacent pair, leftmost first. The pairs wait in a
        heap over a linked list of symbols, so a piece of n bytes takes O(n log n): a long unbroken run (a
        pasted blob, 3000 emoji) is one piece, and rescanning it for every merge took 29 s at 12 kB.
        """
        symbols = [_BYTE_TO_CHAR[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        ranks = self._ranks
        count = len(symbols)
        following = list(range(1, count + 1))  # following[i]: index of the symbol after i (count: none)
        preceding = list(range(-1, count - 1))
        heap = [(rank, i, symbols[i], symbols[i + 1]) for i in range(count - 1)
                if (rank := ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)

        def push(i: int) -> None:
            j = following[i]
            if i >= 0 and j < count:
                rank = ranks.get((symbols[i], symbols[j]))
                if rank is not None:
                    heapq.heappush(heap, (rank, i, symbols[i], symbols[j]))

        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = following[i]
            # An entry is stale once either symbol took part in another merge (or was merged away).
            if symbols[i] != left or j >= count or symbols[j] != right:
                continue
            symbols[i], symbols[j] = left + right, ""
            following[i] = following[j]
            if following[j] < count:
                preceding[following[j]] = i
            push(preceding[i])
            push(i)
        vocab, unk = self._vocab, self.unk_token_id
        return tuple(vocab.get(s, unk) for s in symbols if s)

    def encode(self, prompt: str) -> TokenizedPrompt:
        """`tokenizer(prompt, padding="max_length", truncation=True)` as diffusers calls it."""
        if not isinstance(prompt, str):
            raise InvalidArgumentError(
                "prompt", f"must be a str, got {type(prompt).__name__}", "pass the prompt as a Python string"
            )
        try:
            content = self.tokenize(prompt)
        except InvalidArgumentError as err:
            raise InvalidArgumentError("prompt", err.problem, err.fix) from err
        room = self.model_max_length - 2
        kept, dropped = content[:room], content[room:]
        ids = np.full(self.model_max_length, self.pad_token_id, dtype=np.int64)
        ids[0] = self.bos_token_id
        ids[1 : 1 + len(kept)] = kept
        ids[1 + len(kept)] = self.eos_token_id
        return TokenizedPrompt(
            input_ids=ids,
            num_tokens=len(content),
            truncated=bool(dropped),
            dropped_text=self.decode(dropped, skip_special_tokens=False) if dropped else "",
        )

    # -- decoding ----------------------------------------------------------------------------

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of `ids` the way transformers' CLIPTokenizer.decode builds it.

        ByteLevel decoding (bytes -> UTF-8 with replacement characters), then each `</w>`
        becomes a space and the ends are stripped.
        """
        chunks: list[bytes] = []
        for raw in np.asarray(ids).reshape(-1).tolist():
            token = self._id_to_token.get(raw) if isinstance(raw, int) else None
            if token is None:
                raise InvalidArgumentError(
                    "ids", f"{raw!r} is not a token id of this tokenizer (0..{self.vocab_size - 1})",
                    "decode ids produced by this tokenizer",
                )
            if skip_special_tokens and raw in self._special_ids:
                continue
            try:
                chunks.append(bytes(_CHAR_TO_BYTE[ch] for ch in token))
            except KeyError:
                # A token outside the byte alphabet (an added token) is emitted as its UTF-8 text.
                chunks.append(token.encode("utf-8"))
        text = b"".join(chunks).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()


# -- file helpers ----------------------------------------------------------------------------


def _read_text(path: Path, *, required: bool) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        if not required:
            return None
        raise BundleNotFoundError(
            str(path), "tokenizer file is missing", "re-export the bundle so the tokenizer folder is complete"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise BundleFormatError(str(path), f"cannot read tokenizer file ({err})", "re-export the bundle") from err


def _read_json(path: Path, *, required: bool):
    text = _read_text(path, required=required)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BundleFormatError(str(path), f"is not valid JSON ({err})", "re-export the bundle") from err
    except RecursionError as err:  # nesting deeper than Python's parser recurses
        raise BundleFormatError(str(path), "nests JSON deeper than a tokenizer file does",
                                "re-export the bundle") from err


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt as tokenizers reads it: `#version` lines skipped, then one `a b` pair a line."""
    text = _read_text(path, required=True)
    merges: list[tuple[str, str]] = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        # Only `#version` is a header: merges such as "# #</w>" start with "#" too.
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise BundleFormatError(
                str(path), f"line {line_no} is not a merge of two symbols separated by one space: {line!r}",
                "re-export the bundle",
            )
        merges.append((parts[0], parts[1]))
    return merges


def _parse_id(key, path: Path) -> int:
    try:
        return int(key)
    except (TypeError, ValueError) as err:
        raise BundleFormatError(str(path), f"added token id {key!r} is not an integer", "re-export the bundle") from err


def _token_content(value, path: Path, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise BundleFormatError(
        str(path), f"{name} must be a string or an object with a 'content' string, got {value!r}",
        "re-export the bundle",
    )


@dataclass(frozen=True)
class _Candidate:
    """An added token as transformers holds it while loading (a str or an AddedToken)."""

    content: str
    special: bool
    normalized: bool | None  # None: unset, tokenizers resolves it as `not special`
    plain: bool  # given as a plain string
    token_id: int | None = None

    def same_as(self, other: "_Candidate") -> bool:
        # Python's `in` as transformers uses it: str == str by text, AddedToken == AddedToken
        # field by field, and a str never equals an AddedToken.
        if self.plain or other.plain:
            return self.plain and other.plain and self.content == other.content
        return (self.content, self.special, self.resolved(self.special)) == (
            other.content, other.special, other.resolved(other.special))

    def resolved(self, special: bool) -> bool:
        return self.normalized if self.normalized is not None else not special


def _candidate(value, path: Path, name: str, *, special_default: bool, token_id=None) -> _Candidate:
    content = _token_content(value, path, name)
    if isinstance(value, str):
        return _Candidate(content, special=True, normalized=False, plain=True, token_id=token_id)
    unsupported = [flag for flag in ("lstrip", "rstrip", "single_word") if value.get(flag)]
    if unsupported:
        raise BundleFormatError(
            str(path), f"{name} {content!r} sets {', '.join(unsupported)}, which this tokenizer does not emulate",
            "re-export the tokenizer with those flags false (CLIP tokenizers never set them)",
        )
    normalized = value.get("normalized")
    return _Candidate(content, special=bool(value.get("special", special_default)),
                      normalized=None if normalized is None else bool(normalized), plain=False, token_id=token_id)


def _collect_added_tokens(folder: Path, config: dict, vocab: dict[str, int]) -> tuple[list[AddedToken], dict[str, str]]:
    """The added tokens, with the flags transformers (5.x) ends up giving them, and bos/eos/pad/unk.

    transformers' rules, which decide whether e.g. "<|ENDOFTEXT|>" typed in a prompt becomes the
    eos id (normalized=True) or five BPE tokens (normalized=False):
    - a config with `added_tokens_decoder` (current format) is used alone; otherwise (legacy,
      as SD1.5 ships) special_tokens_map.json overrides it and added_tokens.json lists tokens;
    - listed tokens come first; then bos, eos, unk, pad, each skipped when its text is listed
      or when an equal value was already taken; for the same text the last one taken wins;
    - every token named bos/eos/unk/pad is special; an unset `normalized` means `not special`.
    """
    config_path = folder / "tokenizer_config.json"
    named: dict[str, _Candidate] = {}
    for name in _SPECIAL_ORDER:
        value = config.get(name)
        if value is not None:
            named[name] = _candidate(value, config_path, name, special_default=False)
    listed: list[_Candidate] = []
    if "added_tokens_decoder" in config:
        decoder = config["added_tokens_decoder"]
        if not isinstance(decoder, dict):
            raise BundleFormatError(str(config_path), "added_tokens_decoder must be an object", "re-export the bundle")
        for key in sorted(decoder, key=lambda k: _parse_id(k, config_path)):
            entry = decoder[key]
            if not isinstance(entry, dict):
                raise BundleFormatError(
                    str(config_path), f"added_tokens_decoder[{key!r}] must be an object", "re-export the bundle"
                )
            listed.append(_candidate(entry, config_path, "added token", special_default=False,
                                     token_id=_parse_id(key, config_path)))
    else:
        map_path = folder / "special_tokens_map.json"
        special_map = _read_json(map_path, required=False) or {}
        if not isinstance(special_map, dict):
            raise BundleFormatError(str(map_path), "must be a JSON object", "re-export the bundle")
        from_map = set()
        for name in _SPECIAL_ORDER:
            if special_map.get(name) is not None:
                named[name] = _candidate(special_map[name], map_path, name, special_default=True)
                named[name] = replace(named[name], special=True)
                from_map.add(name)
        extra_path = folder / "added_tokens.json"
        extra = _read_json(extra_path, required=False) or {}
        if not isinstance(extra, dict):
            raise BundleFormatError(str(extra_path), "must be a JSON object", "re-export the bundle")
        # At this point transformers still holds tokenizer_config's token objects as raw dicts,
        # so only plain strings and special_tokens_map entries count as "special" here.
        special_texts = {c.content for n, c in named.items() if c.plain or n in from_map}
        for content, token_id in sorted(extra.items(), key=lambda kv: _parse_id(kv[1], extra_path)):
            is_special = content in special_texts
            listed.append(_Candidate(content, special=is_special, normalized=not is_special, plain=False,
                                     token_id=_parse_id(token_id, extra_path)))

    for name in _SPECIAL_ORDER:  # tokens named nowhere get CLIPTokenizer's defaults
        named.setdefault(name, _candidate(_DEFAULT_SPECIALS[name], config_path, name, special_default=True))
    listed_ids = {c.content: c.token_id for c in listed}
    taken: list[_Candidate] = []
    for name in _SPECIAL_ORDER:
        candidate = named[name]
        if candidate.content in listed_ids or any(candidate.same_as(t) for t in taken):
            continue
        taken.append(candidate)

    named_texts = {c.content for c in named.values()}
    by_content: dict[str, AddedToken] = {}
    for candidate in listed + taken:
        special = candidate.special or candidate.content in named_texts
        token_id = vocab.get(candidate.content, candidate.token_id)  # tokenizers keeps a vocab id
        if token_id is None:
            raise BundleFormatError(
                str(config_path), f"special token {candidate.content!r} is neither in vocab.json nor an added token",
                "use the special tokens of the tokenizer this vocab.json came from",
            )
        by_content[candidate.content] = AddedToken(
            content=candidate.content, id=token_id, special=special, normalized=candidate.resolved(special)
        )
    return list(by_content.values()), {name: named[name].content for name in _SPECIAL_ORDER}
