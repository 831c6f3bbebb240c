"""The text tokenizer: training, saving and loading, truncation and padding."""

from __future__ import annotations

import numpy as np
import pytest

from cycleml.data.tokenizer import TextTokenizer, TokenizerSettings
from cycleml.errors import ConfigError, DataError

CORPUS = [
    "The film was wonderful and the acting was superb.",
    "I did not enjoy the dinner, the service was slow.",
    "Terrible battery, the phone died after an hour.",
    "A delightful novel with a clever plot.",
    "The hotel room was clean but the breakfast was poor.",
] * 20
UNSEEN = ["The soundtrack wasn't memorable!", "Zyxqv unknownword plot", "ok"]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_saved_and_loaded_tokenizer_gives_identical_ids(tmp_path, kind):
    settings = TokenizerSettings(kind=kind, vocab_size=200, min_frequency=1)
    trained = TextTokenizer.train(CORPUS, settings, max_length=12)
    path = trained.save(tmp_path / "run" / "tokenizer.json")

    loaded = TextTokenizer.load(path, max_length=12)
    texts = CORPUS[:5] + UNSEEN
    np.testing.assert_array_equal(trained.encode(texts), loaded.encode(texts))
    # and from the JSON kept inline in a checkpoint's data_spec
    inline = TextTokenizer.from_json(trained.to_json(), max_length=12)
    np.testing.assert_array_equal(trained.encode(texts), inline.encode(texts))
    assert loaded.vocab_size == trained.vocab_size <= 200


def test_saved_json_alone_reproduces_ids_with_plain_tokenizers(tmp_path):
    """Inference needs only the `tokenizers` library and the file: padding and truncation
    live in the JSON."""
    from tokenizers import Tokenizer

    trained = TextTokenizer.train(CORPUS, TokenizerSettings(vocab_size=200), max_length=8)
    path = trained.save(tmp_path / "tokenizer.json")
    plain = Tokenizer.from_file(str(path))
    ids = np.asarray([e.ids for e in plain.encode_batch(UNSEEN)])
    np.testing.assert_array_equal(ids, trained.encode(UNSEEN))


def test_padding_truncation_and_pad_id():
    settings = TokenizerSettings(vocab_size=200, min_frequency=1)
    longest = TextTokenizer.train(CORPUS, settings, max_length=6, padding="longest")
    fixed = TextTokenizer.train(CORPUS, settings, max_length=6, padding="max_length")
    assert longest.pad_id == 0
    short = longest.encode(["the", "the film"])
    assert short.dtype == np.int64
    assert short.shape[1] == 2 and short[0, 1] == 0  # padded to the longest text only
    assert fixed.encode(["ok", "the film"]).shape == (2, 6)
    cut = longest.encode([CORPUS[0]])
    assert cut.shape == (1, 6) and (cut != 0).all()  # truncated to max_length
    assert longest.token_counts([CORPUS[0]])[0] > 6
    assert fixed.encode([]).shape == (0, 6)


def test_bpe_training_is_deterministic():
    settings = TokenizerSettings(kind="bpe", vocab_size=150, min_frequency=1)
    first = TextTokenizer.train(CORPUS, settings, max_length=16)
    second = TextTokenizer.train(CORPUS, settings, max_length=16)
    assert first.to_json() == second.to_json()


def test_lowercase_setting_changes_ids():
    lower = TextTokenizer.train(CORPUS, TokenizerSettings(vocab_size=200), max_length=16)
    cased = TextTokenizer.train(
        CORPUS, TokenizerSettings(vocab_size=200, lowercase=False), max_length=16
    )
    np.testing.assert_array_equal(lower.encode(["the film"]), lower.encode(["THE FILM"]))
    assert not np.array_equal(cased.encode(["the film"]), cased.encode(["THE FILM"]))


def test_loads_a_model_folder_tokenizer(tmp_path):
    trained = TextTokenizer.train(CORPUS, TokenizerSettings(vocab_size=200), max_length=10)
    trained.save(tmp_path / "model" / "tokenizer.json")
    from_folder = TextTokenizer.load(tmp_path / "model", max_length=10)
    np.testing.assert_array_equal(from_folder.encode(UNSEEN), trained.encode(UNSEEN))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="kind='sentencepiece'"):
        TokenizerSettings.from_mapping({"kind": "sentencepiece"})
    with pytest.raises(ConfigError, match="unknown key"):
        TokenizerSettings.from_mapping({"vocab": 10})
    with pytest.raises(DataError, match="tokenizer file not found"):
        TextTokenizer.load(tmp_path / "missing.json", max_length=8)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizers JSON"):
        TextTokenizer.load(bad, max_length=8)
    trained = TextTokenizer.train(CORPUS, TokenizerSettings(vocab_size=200), max_length=8)
    with pytest.raises(ConfigError, match="padding"):
        TextTokenizer.from_json(trained.to_json(), max_length=8, padding="left")
