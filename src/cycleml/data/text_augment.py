"""Text augmentation for the training split: word deletion, swaps, synonyms, negation.

Every operation maps ``(text, label, rng) -> (text, label)``. Only negation changes the
label, and only when it actually edited the text. :class:`TextAugment` chains the
operations; each example's random draws come from a key (the data module passes
``(augment_seed, epoch, index, visit)``), so a run is reproducible under its seed
whatever the batch order.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np

from cycleml.errors import ConfigError

log = logging.getLogger(__name__)

# Label-preserving synonyms: each word maps to words of the same meaning and polarity.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "good": ("fine", "decent", "nice"),
    "great": ("excellent", "superb", "terrific"),
    "excellent": ("great", "outstanding", "superb"),
    "amazing": ("wonderful", "fantastic", "stunning"),
    "love": ("adore", "enjoy"),
    "loved": ("adored", "enjoyed"),
    "like": ("enjoy", "appreciate"),
    "liked": ("enjoyed", "appreciated"),
    "happy": ("pleased", "glad", "satisfied"),
    "bad": ("poor", "lousy"),
    "terrible": ("awful", "dreadful", "horrible"),
    "awful": ("terrible", "dreadful"),
    "boring": ("dull", "tedious"),
    "hate": ("detest", "loathe"),
    "hated": ("detested", "loathed"),
    "disappointing": ("underwhelming", "unsatisfying"),
    "movie": ("film", "picture"),
    "film": ("movie", "picture"),
    "product": ("item", "purchase"),
    "book": ("novel", "read"),
    "restaurant": ("place", "diner"),
    "food": ("meal", "dish"),
    "service": ("staff", "support"),
    "really": ("truly", "very"),
    "very": ("really", "quite"),
    "quick": ("fast", "speedy"),
    "slow": ("sluggish", "unhurried"),
    "cheap": ("inexpensive", "affordable"),
    "story": ("plot", "narrative"),
}

# Auxiliaries after which "not" reads naturally ("was good" -> "was not good").
_AUXILIARIES = frozenset(
    ["is", "are", "was", "were", "am", "be", "do", "does", "did", "will", "would", "can",
     "could", "should", "has", "have", "had"]
)  # fmt: skip
# Contracted negations and the auxiliary that remains once the negation is removed.
_CONTRACTIONS = {
    "isn't": "is", "aren't": "are", "wasn't": "was", "weren't": "were",
    "don't": "do", "doesn't": "does", "didn't": "did", "won't": "will",
    "wouldn't": "would", "can't": "can", "couldn't": "could", "shouldn't": "should",
    "hasn't": "has", "haven't": "have", "hadn't": "had",
}  # fmt: skip
_WORD = re.compile(r"[A-Za-z']+")


class TextOp(ABC):
    """One augmentation step, applied to an example with probability ``p``."""

    # operations that flip a binary label only work with exactly two classes
    binary_only = False

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"{type(self).__name__}: p={p} must be in [0, 1]")
        self.p = p

    def __call__(self, text: str, label: int, rng: np.random.Generator) -> tuple[str, int]:
        if rng.random() >= self.p:
            return text, label
        return self.apply(text, label, rng)

    @abstractmethod
    def apply(self, text: str, label: int, rng: np.random.Generator) -> tuple[str, int]:
        """Augment ``text`` unconditionally; return the new text and label."""


class RandomDeletion(TextOp):
    """Delete each word with probability ``word_p``; at least one word is kept."""

    def __init__(self, p: float = 0.5, word_p: float = 0.1) -> None:
        super().__init__(p)
        if not 0.0 <= word_p < 1.0:
            raise ConfigError(f"RandomDeletion: word_p={word_p} must be in [0, 1)")
        self.word_p = word_p

    def apply(self, text: str, label: int, rng: np.random.Generator) -> tuple[str, int]:
        words = text.split()
        if len(words) < 2:
            return text, label
        keep = rng.random(len(words)) >= self.word_p
        if not keep.any():
            keep[rng.integers(len(words))] = True
        return " ".join(w for w, k in zip(words, keep, strict=True) if k), label


class RandomSwap(TextOp):
    """Swap two random words, ``n_swaps`` times."""

    def __init__(self, p: float = 0.5, n_swaps: int = 1) -> None:
        super().__init__(p)
        if n_swaps < 1:
            raise ConfigError(f"RandomSwap: n_swaps={n_swaps} must be at least 1")
        self.n_swaps = n_swaps

    def apply(self, text: str, label: int, rng: np.random.Generator) -> tuple[str, int]:
        words = text.split()
        if len(words) < 2:
            return text, label
        for _ in range(self.n_swaps):
            i, j = rng.choice(len(words), size=2, replace=False)
            words[i], words[j] = words[j], words[i]
        return " ".join(words), label


class SynonymReplacement(TextOp):
    """Replace up to ``max_words`` words that have synonyms (built-in table + ``extra``)."""

    def __init__(
        self,
        p: float = 0.5,
        max_words: int = 2,
        extra: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(p)
        if max_words < 1:
            raise ConfigError(f"SynonymReplacement: max_words={max_words} must be at least 1")
        self.max_words = max_words
        self.table = {**SYNONYMS, **{k.lower(): tuple(v) for k, v in (extra or {}).items()}}

    def apply(self, text: str, label: int, rng: np.random.Generator) -> tuple[str, int]:
        words = text.split()
        candidates = [i for i, w in enumerate(words) if _core(w).lower() in self.table]
        if not candidates:
            return text, label
        count = min(self.max_words, len(candidates))
        for i in rng.choice(candidates, size=count, replace=False):
            core = _core(words[i])
            choices = self.table[core.lower()]
            new = choices[int(rng.integers(len(choices)))]
            if core[:1].isupper():
                new = new.capitalize()
            words[i] = words[i].replace(core, new, 1)
        return " ".join(words), label


class NegationFlip(TextOp):
    """Binary sentiment: remove a negation, or insert one, and flip the label.

    The first negation ("not", "never", "n't") is removed ("isn't good" -> "is good");
    a text without one gets "not" after its first auxiliary ("was good" -> "was not
    good"). A text with neither is left as it is, and so is its label. ``p`` is the
    share of training examples this is tried on.
    """

    binary_only = True

    def __init__(self, p: float = 0.1) -> None:
        super().__init__(p)

    def apply(self, text: str, label: int, rng: np.random.Generator) -> tuple[str, int]:
        edited = negate(text)
        if edited is None or edited == text:
            return text, label
        return edited, 1 - label


def negate(text: str) -> str | None:
    """``text`` with its first negation removed, or with "not" inserted; None if neither."""
    words = text.split(" ")
    for i, word in enumerate(words):
        core = _core(word)
        lower = core.lower()
        if lower in ("not", "never"):
            return " ".join(words[:i] + words[i + 1 :])
        if lower in _CONTRACTIONS:
            aux = _CONTRACTIONS[lower]
            words[i] = word.replace(core, aux.capitalize() if core[:1].isupper() else aux, 1)
            return " ".join(words)
    for i, word in enumerate(words):
        if _core(word).lower() in _AUXILIARIES and word == _core(word):
            return " ".join(words[: i + 1] + ["not"] + words[i + 1 :])
    return None


class TextAugment:
    """The ``augment`` config for text: operations applied in order."""

    def __init__(self, ops: Sequence[TextOp] = ()) -> None:
        self.ops = list(ops)
        for op in self.ops:
            if not isinstance(op, TextOp):
                raise ConfigError(f"augment.ops: {op!r} is not a text augmentation operation")

    def fit_classes(self, class_names: Sequence[str]) -> None:
        """Drop, with a warning, the operations that cannot work with these classes: a
        label flip means nothing unless there are exactly two classes."""
        skipped = [op for op in self.ops if op.binary_only and len(class_names) != 2]
        for op in skipped:
            log.warning(
                "augment: %s flips a binary label and the data has %d classes %s: skipped "
                "(augment=text_light gives the same text noise without it)",
                type(op).__name__, len(class_names), list(class_names),
            )  # fmt: skip
        self.ops = [op for op in self.ops if op not in skipped]

    def __call__(self, text: str, label: int, key: Sequence[int]) -> tuple[str, int]:
        """Augment one example; ``key`` (seed, epoch, index, ...) picks its random draws."""
        rng = np.random.default_rng(list(key))
        for op in self.ops:
            text, label = op(text, label, rng)
        return text, label


def _core(word: str) -> str:
    """The word without surrounding punctuation ("good!" -> "good")."""
    match = _WORD.search(word)
    return match.group(0).strip("'") if match else ""
