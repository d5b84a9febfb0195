"""Train a CLIP-format byte-level BPE (vocab.json + merges.txt) on a caption corpus.

The words are cut exactly as the runtime tokenizer cuts them (`lcm_edge.tokenizer.normalize`
and `split_words`), so every training word becomes one token and the files load unchanged in
transformers' CLIPTokenizer and in lcm_edge's. Vocabulary order follows CLIP's: the 256 byte
symbols, the same with `</w>`, one entry per merge, then the two special tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from lcm_edge.tokenizer import END_OF_WORD, _BYTE_TO_CHAR, normalize, split_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _symbols(word: str) -> tuple[str, ...]:
    chars = [_BYTE_TO_CHAR[b] for b in word.encode("utf-8")]
    chars[-1] += END_OF_WORD
    return tuple(chars)


def train_bpe(texts: Iterable[str], max_merges: int = 10_000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Merge the most frequent adjacent pair until every word is one symbol (or max_merges).

    Ties go to the lexicographically smallest pair so the result is deterministic.
    """
    words = Counter(_symbols(w) for text in texts for w in split_words(normalize(text)))
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        updated: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            updated[tuple(out)] += count
        words = updated
    tokens = list(_BYTE_TO_CHAR) + [c + END_OF_WORD for c in _BYTE_TO_CHAR] + [a + b for a, b in merges]
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:  # a merge can re-create a byte symbol's string; keep the first id
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int) -> Path:
    """vocab.json, merges.txt and an SD1.5-style tokenizer_config.json (pad = eos)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
              "eos_token": EOS, "pad_token": EOS, "unk_token": EOS, "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
