"""The AR generator: a Llama-style GPT over packed variable-length token sequences.

- :mod:`~arvid.generator.sequence`: the token format (lead's).
- :mod:`~arvid.generator.gpt`: ``GPT``, ``GPTConfig`` (presets debug, B, L, XL).
- :mod:`~arvid.generator.attention`: ``varlen_causal_attention`` and its backends.
- :mod:`~arvid.generator.cudnn_fe`: cuDNN frontend graphs for the ``cudnn_fe`` backend.
- :mod:`~arvid.generator.packing`: ``PackedBatch``, ``pack_sequences``, ``TokenBudgetBatchSampler``.
- :mod:`~arvid.generator.kv_cache`: the static ``KVCache``.
- :mod:`~arvid.generator.conditioning`: ``Conditioning`` and the CFG dropout.
- :mod:`~arvid.generator.text`: SentencePiece ``TextEncoder`` and ``train_spm``.
"""

from arvid.generator.attention import available_backends, varlen_causal_attention
from arvid.generator.conditioning import Conditioning, drop_classes, drop_text
from arvid.generator.gpt import GPT, PRESETS, GPTConfig
from arvid.generator.kv_cache import KVCache
from arvid.generator.packing import (
    PackedBatch,
    PackedBatchDataset,
    PackingSpec,
    TokenBudgetBatchSampler,
    collate_token_items,
    concat_packed,
    pack_sequences,
)
from arvid.generator.sequence import MalformedSequence, SequenceFormat
from arvid.generator.text import TextEncoder, train_spm

__all__ = [
    "GPT", "GPTConfig", "PRESETS", "Conditioning", "drop_classes", "drop_text", "KVCache", "PackedBatch",
    "PackedBatchDataset", "PackingSpec", "TokenBudgetBatchSampler", "collate_token_items", "concat_packed",
    "pack_sequences", "varlen_causal_attention", "available_backends", "SequenceFormat", "MalformedSequence",
    "TextEncoder", "train_spm",
]
