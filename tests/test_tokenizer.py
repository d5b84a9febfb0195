"""Parity of lcm_edge's pure-Python CLIP tokenizer with transformers' CLIPTokenizer.

The vocabulary is SD1.5's real one, derived offline from OpenAI's merge list (benchmarks/clip_vocab.py).
"""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from clip_vocab import sd15_vocab_and_merges, write_sd15_tokenizer
from lcm_edge.errors import BundleFormatError, BundleNotFoundError, InvalidArgumentError
from lcm_edge.tokenizer import CLIPTokenizer, TokenizedPrompt

MAX_LEN = 77
BOS, EOS = 49406, 49407

transformers = pytest.importorskip("transformers")


# `sd15_tokenizer_dir` (SD1.5's real tokenizer files) comes from tests/conftest.py.


@pytest.fixture(scope="session")
def sd2_tokenizer_dir(tmp_path_factory):
    return write_sd15_tokenizer(tmp_path_factory.mktemp("sd2_tokenizer"), pad_token="!")


def reference_ids(tok, prompt: str) -> list[int]:
    # Exactly how diffusers' pipelines call the tokenizer.
    return tok(prompt, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids


# -- corpus ------------------------------------------------------------------------------------

HAND_WRITTEN = [
    # empty and whitespace-only
    "", " ", "   ", "\t", "\n", "\r\n", " \t\n ", "\u00a0", "\u3000", "\u2028\u2029", "\x85", "\u200b",
    # basic prompts
    "a photo of a cat",
    "A Photo Of A Cat",
    "A PHOTO OF A CAT",
    "a photo of a cat.",
    "masterpiece, best quality, 1girl, solo, looking at viewer",
    "(masterpiece:1.2), ((best quality)), [worst quality], {extra}",
    "a cat <lora:catStyle:0.8> sitting",
    "astronaut riding a horse on mars, 8k, octane render, trending on artstation",
    "a dog running on the beach at sunset, cinematic lighting, 35mm film",
    "waves crashing against rocks, slow motion, highly detailed",
    # contractions in many cases
    "it's a dog's life", "IT'S A DOG'S LIFE", "It'S", "don't stop", "DON'T", "Don'T", "they're here",
    "THEY'RE", "we've got", "WE'VE", "I'm fine", "I'M", "we'll see", "WE'LL", "she'd go", "SHE'D",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'x", "''s", "'''", "rock'n'roll", "o'clock",
    "y'all'd've", "it’s curly", "dog`s", "the cats' toys", "'sup", "' s", "'S'T'RE",
    # digits and numbers
    "3.14", "1,000", "1,000,000 stars", "2024-01-01", "12:30pm", "v1.5", "4k 8k 16k", "50%", "$100",
    "-273.15°C", "1e10", "0x1F", "#1 best", "one2three", "x²+y²", "½ cup", "Ⅻ o'clock", "٣ cats",
    "①②③", "１２３ full-width",
    # punctuation runs
    "!!!", "???", "...", "hello!!! world???", "a--b", "a---b", "a_b_c", "#hashtag", "@user", "##",
    "# #", "#:", "~~~", "***bold***", "a/b\\c", "<html>", "[[double]]", "(((a)))", "a,b;c:d", "\"quoted\"",
    "«guillemets»", "¿qué?", "¡hola!", "a|b", "<|", "|>", "<>", "&&", "...a...", ":-)", "^_^",
    # HTML entities stay literal
    "fish &amp; chips", "a &lt; b &gt; c", "&quot;hi&quot;", "&#39;", "&#x27;s", "&nbsp;space", "&amp;amp;",
    # special token strings typed by the user
    "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|StartOfText|>", "a<|endoftext|>b",
    "a <|endoftext|> b", "x<|startoftext|>!", "!<|endoftext|>!", "<|endoftext|>\u0338", "<|endoftext",
    "a<|ENDOFTEXT|>!", "x <|EndOfText|>?? y", "<|ENDOFTEXT|><|ENDOFTEXT|>",
    # accents, NFC composition, combining marks
    "café", "cafe\u0301", "CAFÉ", "CAFE\u0301", "naïve résumé", "Ångström", "A\u030angstrom",
    "\u0301leading combining", "e\u0301\u0301", "ñandú", "Zürich", "São Paulo", "Kraków", "İstanbul",
    "ΟΔΟΣ", "Σ", "ΣΑΣ ΣΑΣ", "straße", "STRASSE", "ẞ", "ǅ", "Ǆ", "ﬁ ligature", "K", "Å", "Ω",
    "crème brûlée", "Œuvre", "æsir", "ø", "ħ", "Ǝ", "z\u0335\u0321a\u0336\u0322l\u0337go",
    # scripts
    "猫", "一只猫在睡觉", "日本語のテキスト", "東京タワー at night", "한국어 문장", "Привет, мир!",
    "ПРИВЕТ", "Ελληνικά", "שלום עולם", "مرحبا بالعالم", "हिन्दी", "ภาษาไทย", "ქართული", "Հայերեն",
    "\u202eright-to-left override", "\u200fRLM\u200e", "a\u200bb", "a\u200cb\u200db", "\ufeffBOM",
    "\U00031350 new CJK", "\u1c89 new cyrillic", "\U00010d50 garay",
    # emoji
    "😀", "a 😀 b", "😀😀😀", "👍🏽", "👨‍👩‍👧", "🇺🇸 flag", "❤️ love", "★☆", "⚡fast⚡", "🐱cat",
    # control characters and odd whitespace
    "a\tb", "a\nb", "a\r\nb", "a  b", "a \t \n b", "a\u00a0b", "a\u2003b", "a\u3000b", "a\u202fb",
    "a\x1cb", "a\x1fb", "a\x00b", "a\x07b", "a\x85b", "\ta cat\n", "  leading and trailing  ",
    "tab\tseparated\tvalues", "multi\n\nline\n\nprompt", "a\u2028b",
    # long prompts (> 77 tokens)
    "a " * 100,
    "cat " * 80,
    ", ".join(["beautiful detailed landscape"] * 20),
    "supercalifragilisticexpialidocious " * 10,
    "".join(chr(0x4E00 + i) for i in range(200)),
    "😀" * 50,
    "1234567890" * 10,
    "!?" * 60,
    "word" * 100,
]

SUBJECTS = ["a cat", "an astronaut", "Two Dogs", "a RED car", "the Eiffel Tower", "a koi fish", "an old man's face",
            "a robot", "waves", "a city at night", "a bowl of ramen", "a dancer"]
ACTIONS = ["walking", "sitting quietly", "running fast!", "floating in space", "dancing, smiling", "on fire"]
STYLES = ["", ", 4k", ", trending on artstation", " (masterpiece:1.3)", ", photorealistic, 85mm f/1.4",
          ", by Studio Ghibli", " -- anime style", ", highly-detailed; sharp focus", ", 1,000 lanterns",
          ", v2.0", " 🎥", ", dolly zoom & pan"]


def templated_prompts() -> list[str]:
    prompts = []
    for i, (subject, action) in enumerate(itertools.product(SUBJECTS, ACTIONS)):
        style = STYLES[i % len(STYLES)]
        prompt = f"{subject} {action}{style}"
        prompts.append(prompt)
        if i % 3 == 0:
            prompts.append(prompt.upper())
        if i % 5 == 0:
            prompts.append(" ".join(prompt.split()) + ",\t" + prompt)  # tabs and repeats
    return prompts


CORPUS = HAND_WRITTEN + templated_prompts()


def test_corpus_is_large():
    assert len(CORPUS) >= 200
    assert len(set(CORPUS)) == len(CORPUS), "duplicate prompts in the corpus"


def _mismatches(ours_tok, ref_tok, prompts):
    bad = []
    for prompt in prompts:
        expected = reference_ids(ref_tok, prompt)
        got = ours_tok.encode(prompt).input_ids.tolist()
        if got != expected:
            bad.append(f"{prompt!r}:\n    transformers {expected[:20]}\n    lcm_edge     {got[:20]}")
    return bad


def test_corpus_matches_transformers(ours, reference):
    bad = _mismatches(ours, reference, CORPUS)
    assert not bad, f"{len(bad)} of {len(CORPUS)} prompts differ:\n" + "\n".join(bad)


def test_sampled_code_points_match_transformers(ours, reference):
    # Every character class decision (letter / number / whitespace / other, lowercase, NFC)
    # over a spread of code points, in contexts that expose run merging and digit splitting.
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer.from_str(reference.backend_tokenizer.to_str())  # a copy to reconfigure
    backend.no_padding()
    backend.no_truncation()
    chars = [chr(cp) for cp in range(0, 0x110000, 173) if not 0xD800 <= cp < 0xE000]
    texts = [t for c in chars for t in (f"a{c}b", f"{c}{c}1'{c}", f"!{c}x{c.upper()}")]
    expected = [enc.ids[1:-1] for enc in backend.encode_batch(texts)]
    bad = [f"{t!r}: {e} != {ours.tokenize(t)}" for t, e in zip(texts, expected) if ours.tokenize(t) != e]
    assert not bad, f"{len(bad)} of {len(texts)} differ:\n" + "\n".join(bad[:50])


def test_encode_output_shape_and_padding(ours):
    out = ours.encode("a photo of a cat")
    assert isinstance(out, TokenizedPrompt)
    assert out.input_ids.dtype == np.int64
    assert out.input_ids.shape == (MAX_LEN,)
    assert out.input_ids[:8].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS, EOS]
    assert (out.input_ids[6:] == EOS).all()
    assert out.num_tokens == 5
    assert out.truncated is False
    assert out.dropped_text == ""


def test_empty_prompt(ours):
    out = ours.encode("")
    assert out.input_ids[:3].tolist() == [BOS, EOS, EOS]
    assert out.num_tokens == 0 and not out.truncated


def test_truncation_flag_and_dropped_text(ours, reference):
    prompt = " ".join(["a", "photograph", "of", "an", "orange", "tabby", "cat"] * 12 + ["finale"])
    out = ours.encode(prompt)
    assert out.truncated is True
    assert out.num_tokens == len(reference(prompt).input_ids) - 2 > MAX_LEN - 2
    assert out.input_ids.tolist() == reference_ids(reference, prompt)
    assert out.input_ids[0] == BOS and out.input_ids[-1] == EOS
    kept_text = ours.decode(out.input_ids)
    # Together, kept and dropped text are the whole prompt (cut at a token boundary).
    assert (kept_text + out.dropped_text).replace(" ", "") == prompt.replace(" ", "")
    assert out.dropped_text.endswith("cat finale")
    assert prompt.startswith(kept_text.rsplit(" ", 1)[0])


def test_prompt_of_exactly_75_tokens_is_not_truncated(ours):
    out = ours.encode("a " * 75)
    assert out.num_tokens == 75 and not out.truncated
    assert out.input_ids[-1] == EOS and out.input_ids[-2] == 320
    over = ours.encode("a " * 76)
    assert over.truncated and over.num_tokens == 76 and over.dropped_text == "a"


def test_num_tokens_counts_prompt_tokens_only(ours, reference):
    for prompt in ["a photo of a cat", "it's 3.14!", "一只猫", "😀 party"]:
        unpadded = reference(prompt).input_ids
        assert ours.encode(prompt).num_tokens == len(unpadded) - 2
        assert ours.tokenize(prompt) == unpadded[1:-1]


def test_decode_round_trip(ours, reference):
    for prompt in ["a photo of a cat", "astronaut riding a horse on mars", "hello world",
                   "café au lait", "一只猫"]:
        ids = ours.encode(prompt).input_ids
        assert ours.decode(ids) == prompt
        assert ours.decode(ids) == reference.decode(ids.tolist(), skip_special_tokens=True)
    ids = reference_ids(reference, "Hello, World! It's 3.14")
    assert ours.decode(ids) == "hello , world ! it 's 3 . 1 4"
    assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids)


def test_decode_rejects_unknown_ids(ours):
    with pytest.raises(InvalidArgumentError) as err:
        ours.decode([320, 10**6])
    assert err.value.argument == "ids"


def test_constructor_registers_named_special_tokens(ours):
    vocab, merges = sd15_vocab_and_merges()
    direct = CLIPTokenizer(vocab, merges, model_max_length=MAX_LEN, bos_token="<|startoftext|>",
                           eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    prompt = "a <|endoftext|> cat <|startoftext|>"
    assert direct.encode(prompt).input_ids.tolist() == ours.encode(prompt).input_ids.tolist()
    assert direct.tokenize(prompt) == [320, EOS, 2368, BOS]
    with pytest.raises(InvalidArgumentError) as err:
        CLIPTokenizer(vocab, merges, model_max_length=1, bos_token="<|startoftext|>",
                      eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    assert err.value.argument == "model_max_length"


def test_vocab_size(ours):
    assert ours.vocab_size == 49408
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (BOS, EOS, EOS)


@pytest.mark.parametrize("bad", [None, 42, b"a cat", ["a cat"], 3.5])
def test_non_str_prompt_raises(ours, bad):
    with pytest.raises(InvalidArgumentError) as err:
        ours.encode(bad)
    assert err.value.argument == "prompt"
    assert "str" in str(err.value)


def test_lone_surrogate_raises(ours):
    with pytest.raises(InvalidArgumentError) as err:
        ours.encode("a \ud800 cat")
    assert err.value.argument == "prompt"


def test_missing_vocab_raises_bundle_not_found(sd15_tokenizer_dir, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(sd15_tokenizer_dir, folder)
    (folder / "vocab.json").unlink()
    with pytest.raises(BundleNotFoundError) as err:
        CLIPTokenizer.from_folder(folder)
    assert err.value.path == str(folder / "vocab.json")
    assert "vocab.json" in str(err.value)


def test_missing_folder_raises_bundle_not_found(tmp_path):
    with pytest.raises(BundleNotFoundError):
        CLIPTokenizer.from_folder(tmp_path / "nope")


@pytest.mark.parametrize(
    "filename, content",
    [
        ("vocab.json", "{not json"),
        ("vocab.json", '["a", "b"]'),
        ("tokenizer_config.json", '{"bos_token": "<|startoftext|>"}'),  # no model_max_length
        ("merges.txt", "#version: 0.2\ni n\nthree parts here\n"),
        ("merges.txt", "#version: 0.2\nzz\u00e9q n\n"),  # symbol not in vocab
    ],
)
def test_malformed_files_raise_bundle_format_error(sd15_tokenizer_dir, tmp_path, filename, content):
    folder = tmp_path / "tok"
    shutil.copytree(sd15_tokenizer_dir, folder)
    (folder / filename).write_text(content, encoding="utf-8")
    with pytest.raises(BundleFormatError) as err:
        CLIPTokenizer.from_folder(folder)
    assert err.value.path == str(folder / filename)


def test_merges_starting_with_hash_are_kept(ours, reference):
    # merges.txt has real merges like "# #</w>"; only the "#version" header is skipped.
    assert ours.tokenize("##") == reference("##").input_ids[1:-1] == [15483]


def test_pad_token_other_than_eos_is_honoured(sd2_tokenizer_dir):
    ours_sd2 = CLIPTokenizer.from_folder(sd2_tokenizer_dir)
    ref_sd2 = transformers.CLIPTokenizer.from_pretrained(sd2_tokenizer_dir)
    assert ours_sd2.pad_token_id == ref_sd2.pad_token_id == 0
    out = ours_sd2.encode("a photo of a cat")
    assert out.input_ids[:8].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS, 0]
    # "!" is now an added special token, so it is split out of the text even inside prompts.
    prompts = CORPUS[::4] + ["hello!", "wow!!! amazing!", "!", "a ! b"]
    bad = _mismatches(ours_sd2, ref_sd2, prompts)
    assert not bad, f"{len(bad)} of {len(prompts)} prompts differ:\n" + "\n".join(bad)


def test_added_tokens_and_special_tokens_map_match_transformers(sd15_tokenizer_dir, tmp_path):
    # Textual-inversion style tokens in added_tokens_decoder, and special_tokens_map.json that
    # overrides tokenizer_config.json (transformers' precedence).
    folder = tmp_path / "tok"
    shutil.copytree(sd15_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        "49408": {"content": "<Cat-Toy>", "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False, "special": False},
        "49409": {"content": "<Dog>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False, "special": False},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    special_map = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
    special_map["bos_token"] = "<|startoftext|>"  # plain string: matched in raw text only
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")

    ours_ti = CLIPTokenizer.from_folder(folder)
    ref_ti = transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours_ti.vocab_size == len(ref_ti) == 49410
    prompts = ["a <Cat-Toy> and <cat-toy> and <CAT-TOY>", "x<Dog>y <dog> <DOG>", "<|STARTOFTEXT|> <|startoftext|>",
               "<|ENDOFTEXT|><|endoftext|>", "a photo of <Cat-Toy>, 4k"]
    bad = _mismatches(ours_ti, ref_ti, prompts)
    assert not bad, "\n".join(bad)
    ids = reference_ids(ref_ti, prompts[0])
    assert ours_ti.decode(ids, skip_special_tokens=False) == ref_ti.decode(ids)
