"""Text augmentation: what each operation does, label handling and reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from cycleml.data.text_augment import (
    NegationFlip,
    RandomDeletion,
    RandomSwap,
    SynonymReplacement,
    TextAugment,
    negate,
)
from cycleml.errors import ConfigError

TEXTS = [
    "The film was good.",
    "The film was not good.",
    "I didn't like the dinner at all.",
    "Isn't this the best phone?",
    "I would never buy this kettle again.",
    "Great acting, superb soundtrack.",  # no auxiliary, no negation: cannot be negated
    "Lovely!",
    "We ordered it on a Monday and it is broken.",
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The film was good.", "The film was not good."),
        ("The film was not good.", "The film was good."),
        ("I didn't like the dinner.", "I did like the dinner."),
        ("Isn't this great?", "Is this great?"),
        ("I would never buy it.", "I would buy it."),
        ("Great acting, superb soundtrack.", None),
    ],
)
def test_negate(text, expected):
    assert negate(text) == expected


def test_negation_flips_the_label_exactly_when_it_edits_the_text():
    op = NegationFlip(p=1.0)
    edited = unchanged = 0
    for seed in range(5):
        for label in (0, 1):
            for text in TEXTS:
                new_text, new_label = op(text, label, np.random.default_rng(seed))
                if new_text != text:
                    edited += 1
                    assert new_label == 1 - label, (text, new_text)
                else:
                    unchanged += 1
                    assert new_label == label, text
    assert edited and unchanged  # both branches were exercised


def test_negation_share_is_respected():
    op = NegationFlip(p=0.25)
    rng = np.random.default_rng(0)
    flipped = sum(op("The film was good.", 1, rng)[1] == 0 for _ in range(4000))
    assert 0.22 < flipped / 4000 < 0.28


def test_label_preserving_ops_keep_labels_and_change_text():
    rng = np.random.default_rng(0)
    text = "The movie was really good and the story was great"
    ops = [
        RandomDeletion(p=1.0, word_p=0.3),
        RandomSwap(p=1.0, n_swaps=2),
        SynonymReplacement(p=1.0, max_words=3),
    ]
    for op in ops:
        outputs = {op(text, 1, rng) for _ in range(20)}
        assert all(label == 1 for _, label in outputs)
        assert any(new != text for new, _ in outputs), type(op).__name__
    deleted, _ = RandomDeletion(p=1.0, word_p=0.5).apply(text, 0, rng)
    assert 1 <= len(deleted.split()) < len(text.split())
    swapped, _ = RandomSwap(p=1.0).apply(text, 0, rng)
    assert sorted(swapped.split()) == sorted(text.split())


def test_synonyms_keep_polarity_and_extra_table_is_used():
    op = SynonymReplacement(p=1.0, max_words=1, extra={"kettle": ["teapot"]})
    new, _ = op.apply("Kettle", 0, np.random.default_rng(0))
    assert new == "Teapot"
    new, _ = op.apply("terrible.", 0, np.random.default_rng(0))
    assert new.rstrip(".") in {"awful", "dreadful", "horrible"} and new.endswith(".")


def test_reproducible_under_the_same_key_and_varied_across_keys():
    augment = TextAugment(
        [RandomDeletion(0.5), RandomSwap(0.5), SynonymReplacement(0.5), NegationFlip(0.3)]
    )
    first = [augment(t, 1, (7, 0, i)) for i, t in enumerate(TEXTS)]
    again = [augment(t, 1, (7, 0, i)) for i, t in enumerate(TEXTS)]
    other_epoch = [augment(t, 1, (7, 1, i)) for i, t in enumerate(TEXTS)]
    assert first == again
    assert first != other_epoch


def test_configuration_errors():
    with pytest.raises(ConfigError, match="p=1.5"):
        RandomSwap(p=1.5)
    with pytest.raises(ConfigError, match="word_p"):
        RandomDeletion(word_p=1.0)
    with pytest.raises(ConfigError, match="not a text augmentation"):
        TextAugment([lambda text: text])


def test_a_label_flip_is_skipped_with_a_warning_unless_binary(caplog):
    augment = TextAugment([RandomSwap(0.2), NegationFlip(0.1)])
    augment.fit_classes(["negative", "positive"])
    assert [type(op) for op in augment.ops] == [RandomSwap, NegationFlip]
    with caplog.at_level("WARNING", logger="cycleml.data.text_augment"):
        augment.fit_classes(["a", "b", "c"])
    assert [type(op) for op in augment.ops] == [RandomSwap]
    assert "NegationFlip flips a binary label and the data has 3 classes" in caplog.text
    assert "augment=text_light" in caplog.text
