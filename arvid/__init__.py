"""arvid: autoregressive video generation with an adaptive-length video tokenizer."""

__version__ = "0.1.0"
