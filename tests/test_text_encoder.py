"""The pluggable text encoder of item titles, and the pinned vectors of the hashed encoder."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from memento.encoder import (
    TEXT_PROJECTION_SEED, ItemEncoder, ItemMeta, SentenceTransformerTextEncoder, TextEncoder,
    text_encoder_from_path,
)

VOCAB = ["red", "silk", "dress", "scarf", "steel", "drill", "blue", "bolt"]


class BagOfWords(TextEncoder):
    """Counts of the words of VOCAB; records every call."""

    dim = len(VOCAB)

    def __init__(self):
        self.calls: list[list[str]] = []

    def _encode(self, texts):
        self.calls.append(list(texts))
        return [[t.split().count(w) for w in VOCAB] for t in texts]


class Broken(TextEncoder):
    """Returns whatever it was built with."""

    dim = 3

    def __init__(self, output):
        self.output = output

    def _encode(self, texts):
        return self.output


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


CATALOGUE = {
    "a": ItemMeta("a", "11-1", "b1", "s1", "red silk dress"),
    "b": ItemMeta("b", "22-2", "b2", "s2", "red silk scarf"),
    "c": ItemMeta("c", "33-3", "b3", "s3", "steel drill"),
    "d": ItemMeta("d", "44-4", "b4", "s4", "blue bolt"),
    "untitled": ItemMeta("untitled", "55-5", "b5", "s5", "  "),
}


def test_shared_words_bring_titles_closer():
    plain = ItemEncoder(64, CATALOGUE)
    text = ItemEncoder(64, CATALOGUE, text_encoder=BagOfWords())
    cos_plain = _cos(plain.encode("a"), plain.encode("b"))
    cos_text = _cos(text.encode("a"), text.encode("b"))
    assert cos_text > cos_plain + 0.1
    # Disjoint titles gain far less than the pair sharing two of three words.
    gain_disjoint = _cos(text.encode("c"), text.encode("d")) - _cos(plain.encode("c"), plain.encode("d"))
    assert gain_disjoint < (cos_text - cos_plain) / 2
    for item in "abcd":
        assert float(np.linalg.norm(text.encode(item))) == pytest.approx(1.0, abs=1e-6)


def test_text_part_is_the_seeded_gaussian_projection_of_the_unit_embedding():
    # With every hashed weight at 0 the vector is the projected title embedding alone.
    zero = {k: 0.0 for k in ("category", "category_top", "brand", "seller", "title", "id")}
    enc = ItemEncoder(16, CATALOGUE, weights=zero, text_encoder=BagOfWords())
    emb = np.array([1, 1, 1, 0, 0, 0, 0, 0], np.float64) / np.sqrt(3)  # "red silk dress"
    proj = np.random.RandomState(TEXT_PROJECTION_SEED).standard_normal((len(VOCAB), 16))
    expected = emb @ proj
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(enc.encode("a"), expected, atol=1e-6)
    # The same projection in another encoder (another process) for the same dims.
    again = ItemEncoder(16, CATALOGUE, weights=zero, text_encoder=BagOfWords())
    np.testing.assert_array_equal(again.encode("a"), enc.encode("a"))


def test_no_title_or_zero_text_weight_gives_the_hashed_vector():
    plain = ItemEncoder(32, CATALOGUE)
    text = ItemEncoder(32, CATALOGUE, text_encoder=BagOfWords())
    for item in ("untitled", "not-in-catalogue"):
        np.testing.assert_array_equal(text.encode(item), plain.encode(item))
    assert text.text_encoder.calls == []
    off = ItemEncoder(32, CATALOGUE, weights={"text": 0.0}, text_encoder=BagOfWords())
    np.testing.assert_allclose(off.encode("a"), plain.encode("a"), atol=1e-7)


def test_encode_many_embeds_uncached_titles_in_one_call():
    bow = BagOfWords()
    enc = ItemEncoder(32, {**CATALOGUE, "a2": ItemMeta("a2", "11-1", title="red silk dress")},
                      text_encoder=bow)
    first = enc.encode("c")
    out = enc.encode_many(["a", "b", "c", "a", "a2", "untitled", "zzz"])
    # One call for the batch; "c" was cached, "a2" shares a's title, untitled/unknown items
    # have none.
    assert bow.calls == [["steel drill"], ["red silk dress", "red silk scarf"]]
    np.testing.assert_array_equal(out[2], first)
    single = ItemEncoder(32, enc.catalogue, text_encoder=BagOfWords())
    for row, item in zip(out, ["a", "b", "c", "a", "a2", "untitled", "zzz"]):
        np.testing.assert_allclose(row, single.encode(item), atol=1e-7)
    enc.encode_many(["a", "b"])
    assert len(bow.calls) == 2


@pytest.mark.parametrize("output, match", [
    (np.zeros((2, 4)), r"Broken returned shape \(2, 4\) for 2 texts; expected \(2, 3\)"),
    (np.zeros(3), r"Broken returned shape \(3,\)"),
    (np.full((2, 3), np.nan), "Broken returned non-finite values"),
])
def test_bad_encoder_output_is_rejected_naming_the_encoder(output, match):
    with pytest.raises(ValueError, match=match):
        Broken(output).encode(["x", "y"])


def test_bad_output_surfaces_through_item_encoder():
    enc = ItemEncoder(8, CATALOGUE, text_encoder=Broken(np.zeros((1, 5))))
    with pytest.raises(ValueError, match="text encoder Broken"):
        enc.encode("a")


def test_encode_wants_a_sequence_not_a_string():
    with pytest.raises(TypeError, match="BagOfWords.encode takes a sequence"):
        BagOfWords().encode("red silk")
    assert BagOfWords().encode([]).shape == (0, len(VOCAB))


# Computed with the hashed encoder before the text encoder existed: without a text encoder
# the vectors must not change by one bit (stored cases, serving and the learner rely on it).
PINNED_CATALOGUE = {
    "1": ItemMeta("1", "50011-1101", "b7", "s3", "red silk dress"),
    "2": ItemMeta("2", "50011-2202", "", "s9", ""),
}
PINNED = {
    "1": [0.7700343132019043, 0.09897231310606003, -0.04434141889214516, 0.41530293226242065,
          0.24981842935085297, -0.14925435185432434, 0.11085356026887894, -0.35473135113716125],
    "2": [0.4874666631221771, 0.0, -0.6905777454376221, 0.08124443888664246,
          0.4874666631221771, 0.20311109721660614, 0.0, 0.0],
    "777": [0.0, 0.0, 0.0, 0.0, 0.40824827551841736, 0.0, -0.8164965510368347, 0.40824827551841736],
}


def test_without_text_encoder_vectors_equal_pinned_values():
    enc = ItemEncoder(8, PINNED_CATALOGUE)
    for item, values in PINNED.items():
        vec = enc.encode(item)
        assert vec.dtype == np.float32
        np.testing.assert_array_equal(vec, np.array(values, np.float32))
    many = ItemEncoder(8, PINNED_CATALOGUE).encode_many(list(PINNED))
    np.testing.assert_array_equal(many, np.array(list(PINNED.values()), np.float32))


def test_sentence_transformer_missing_path_is_named():
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        SentenceTransformerTextEncoder("/no/such/model")


def test_sentence_transformer_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    with pytest.raises(RuntimeError, match="pip install sentence-transformers; --text-encoder needs it"):
        SentenceTransformerTextEncoder(str(tmp_path))
    with pytest.raises(RuntimeError, match="sentence_transformers"):
        text_encoder_from_path(str(tmp_path))


def test_sentence_transformer_wiring_with_a_stand_in_package(tmp_path, monkeypatch):
    seen = {}

    class FakeModel:
        def __init__(self, path, device):
            seen["init"] = (path, device)

        def get_sentence_embedding_dimension(self):
            return 2

        def encode(self, texts, batch_size, convert_to_numpy, show_progress_bar):
            seen["batch_size"] = batch_size
            return np.array([[len(t), 0.5] for t in texts])

    module = types.ModuleType("sentence_transformers")
    module.SentenceTransformer = FakeModel
    monkeypatch.setitem(sys.modules, "sentence_transformers", module)
    enc = SentenceTransformerTextEncoder(str(tmp_path), device="cuda:1", batch_size=7)
    assert enc.dim == 2 and seen["init"] == (str(tmp_path), "cuda:1")
    np.testing.assert_array_equal(enc.encode(["abc"]), np.array([[3.0, 0.5]], np.float32))
    assert seen["batch_size"] == 7
    assert isinstance(text_encoder_from_path(str(tmp_path)), SentenceTransformerTextEncoder)
    assert text_encoder_from_path(None) is None and text_encoder_from_path("") is None


def test_ids_whose_hashes_cancel_still_get_a_unit_vector():
    # "item932"'s four signed hashes cancel exactly in 32 dimensions; it is hashed again.
    items = ItemEncoder(32)
    vecs = items.encode_many([f"item{i}" for i in range(20_000)])
    assert np.linalg.norm(vecs, axis=1).min() == pytest.approx(1.0, abs=1e-5)
    assert np.linalg.norm(items.encode("item932")) == pytest.approx(1.0, abs=1e-5)
