"""Build the real SD1.5 CLIP tokenizer files offline, for parity tests and the full-size benchmark.

OpenAI's `bpe_simple_vocab_16e6.txt.gz` (benchmarks/data) holds CLIP's merge list; the
`vocab.json`/`merges.txt` that SD1.5 ships are derived from it exactly the way OpenAI's
`SimpleTokenizer` builds its encoder, so no model hub is needed.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# CLIP keeps 49152 - 256 - 2 merges: the vocab is 256 bytes + 256 bytes</w> + merges + 2 specials.
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table, in CLIP's vocab order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def sd15_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(DATA_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != 49408:
        raise RuntimeError(f"derived CLIP vocab has {len(vocab)} entries, expected 49408")
    return vocab, merges


def write_sd15_tokenizer(folder, *, pad_token: str = EOS) -> Path:
    """Write SD1.5's vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json.

    `pad_token="!"` gives the SD2-style variant (pad differs from eos).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = sd15_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": pad_token,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    # SD1.5 ships this file too, agreeing with tokenizer_config.json (transformers lets it win).
    special_map = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config[name]
        special_map[name] = {k: v for k, v in value.items() if k != "__type"} if isinstance(value, dict) else value
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    return folder
