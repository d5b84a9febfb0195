"""Property tests of the runtime tokenizer over arbitrary text (hypothesis, derandomized: the same examples
every run, no example database written).

- Any Python str (unicode of every category, lone surrogates, control characters, empty, very long) gives
  77 ids that start with BOS, end in EOS + padding, and index the vocabulary; the only error allowed is a
  typed InvalidArgumentError naming `prompt`.
- On the valid range (text the reference accepts: no lone surrogates) the ids equal transformers'
  CLIPTokenizer's, called as diffusers calls it, on SD1.5's real vocabulary.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
transformers = pytest.importorskip("transformers")

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lcm_edge.errors import InvalidArgumentError  # noqa: E402
from lcm_edge.tokenizer import CLIPTokenizer  # noqa: E402

MAX_LEN = 77
# hypothesis keeps caches in ./.hypothesis by default; not in the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "lcm_edge_hypothesis")
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Pieces that reach the tokenizer's special paths: special tokens in any case, contractions, digits,
# whitespace and control characters of every kind, combining marks, emoji sequences, CJK, RTL, HTML entities.
PIECES = ["<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|EndOfText|>", "<|", "|>", "'s", "'T", "'re",
          "'VE", "'m", "'ll", "'d", "’s", "3.14", "1,000", "٣", "½", "①", " ", "  ", "\t", "\n", "\r\n", "\x0b",
          "\x0c", "\x85", "\u00a0", "\u2028", "\u3000", "\u200b", "\ufeff", "\x00", "\x1f", "\x7f", "\u0301",
          "\u0338", "😀", "👨‍👩‍👧", "🇺🇸", "👍🏽", "猫", "日本語", "한국어", "שלום", "مرحبا", "\u202e", "&amp;",
          "&#39;", "ﬁ", "ẞ", "İ", "Σ", "cat", "a", "A", "!!!", "...", "(", ":1.2)", "#", "@", "_", "-"]

any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=300)
valid_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)
prompt_like = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=60).map("".join)
long_text = st.builds(lambda unit, n: unit * n, st.sampled_from(["a ", "cat ", "猫", "😀", "!?", "word", "1"]),
                      st.integers(min_value=40, max_value=1500))


def _well_formed(ours: CLIPTokenizer, prompt: str) -> None:
    try:
        tokens = ours.encode(prompt)
    except InvalidArgumentError as exc:
        assert exc.argument == "prompt"
        return
    ids = tokens.input_ids.tolist()
    assert len(ids) == MAX_LEN and ids[0] == ours.bos_token_id
    end = ids.index(ours.eos_token_id, 1)
    assert all(i == ours.pad_token_id for i in ids[end + 1:])
    assert all(0 <= i < ours.vocab_size for i in ids)
    assert tokens.truncated == (tokens.num_tokens > MAX_LEN - 2)


@settings(FUZZ, max_examples=60)
@given(prompt=st.one_of(any_text, prompt_like, long_text, st.just("")))
def test_any_text_gives_well_formed_ids_or_a_typed_error(ours, prompt):
    _well_formed(ours, prompt)


@FUZZ
@given(prompt=st.one_of(valid_text, prompt_like, st.just(""), st.just(" \t\n")))
def test_ids_match_transformers_on_valid_text(ours, reference, prompt):
    expected = reference(prompt, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
    assert ours.encode(prompt).input_ids.tolist() == list(expected)


@settings(derandomize=True, database=None, deadline=None, max_examples=15,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(prompt=long_text)
def test_long_text_matches_transformers_and_reports_truncation(ours, reference, prompt):
    expected = reference(prompt, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
    tokens = ours.encode(prompt)
    assert tokens.input_ids.tolist() == list(expected)
    full = reference(prompt).input_ids
    assert tokens.num_tokens == len(full) - 2 and tokens.truncated == (len(full) > MAX_LEN)
