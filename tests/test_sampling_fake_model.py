"""A fake GPT with the generator's inference API, for sampler tests that need no real model.

Its next-token logits depend on the class, the position, the last token and the whole history
(through a running sum of tokens), so a wrong cache position or a lost history shows up; they
are random-looking (tables drawn from a seeded generator). The tests in this file check that
the fake keeps the API's contract (prefill/decode_step == forward_dense).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from arvid.generator.conditioning import Conditioning


def make_cond(class_ids) -> Conditioning:
    return Conditioning(class_ids=torch.as_tensor(class_ids, dtype=torch.long))


class FakeCache:
    def __init__(self, batch_size: int, max_len: int, device) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        self.cls = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.hist = torch.zeros(batch_size, dtype=torch.long, device=device)  # running sum of tokens

    def reset(self) -> None:
        self.cls.zero_()
        self.hist.zero_()


class FakeGPT(nn.Module):
    """Random-logit model: logits = T[x_p] + P[p] + Cls[c] + H[(sum of tokens <= p) % 97] + offset."""

    H = 97

    def __init__(self, vocab_size: int, num_classes: int = 0, max_seq_len: int = 4096, seed: int = 0,
                 scale: float = 2.0, len_offset: float = 0.0, codebook_size: int | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(vocab_size=vocab_size, num_classes=num_classes, max_seq_len=max_seq_len)
        V = vocab_size
        self.register_buffer("tok_table", torch.randn(V + 1, V, generator=g) * scale)  # row V: the cond slot
        self.register_buffer("pos_table", torch.randn(max_seq_len, V, generator=g) * scale)
        self.register_buffer("cls_table", torch.randn(num_classes + 1, V, generator=g) * scale)
        self.register_buffer("hist_table", torch.randn(self.H, V, generator=g) * scale)
        offset = torch.zeros(V)
        if codebook_size is not None:
            offset[codebook_size:] = len_offset
        self.register_buffer("offset", offset)
        self.decode_calls = 0
        self.kv_lens: list[tuple[int, int | None]] = []  # (pos, kv_len) of every decode_step call

    def num_prefix(self, cond) -> int:
        return 1

    def _class(self, cond, B: int, device) -> torch.Tensor:
        if cond is not None and getattr(cond, "class_ids", None) is not None:
            return cond.class_ids.to(device)
        return torch.full((B,), self.config.num_classes, dtype=torch.long, device=device)

    def _logits(self, x, pos, cls, hist):
        """x, pos, hist: [B, L] (x == V at the cond slot); cls: [B] -> [B, L, V]."""
        return (self.tok_table[x] + self.pos_table[pos] + self.cls_table[cls][:, None]
                + self.hist_table[hist % self.H] + self.offset)

    def allocate_cache(self, batch_size, max_len, device, dtype) -> FakeCache:
        return FakeCache(batch_size, max_len, device)

    def prefill(self, cache: FakeCache, cond, prefix_tokens=None) -> torch.Tensor:
        B = cache.batch_size
        dev = self.tok_table.device
        cache.cls.copy_(self._class(cond, B, dev))
        slot = torch.full((B, 1), self.config.vocab_size, dtype=torch.long, device=dev)
        x = slot if prefix_tokens is None else torch.cat([slot, prefix_tokens.to(dev)], 1)
        hist = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), x[:, 1:].cumsum(1)], 1)
        cache.hist.copy_(hist[:, -1])
        pos = torch.arange(x.shape[1], device=dev)[None].expand(B, -1)
        return self._logits(x, pos, cache.cls, hist)[:, -1]

    def decode_step(self, cache: FakeCache, tokens, pos, kv_len: int | None = None) -> torch.Tensor:
        self.decode_calls += 1
        if pos.dim() != 0:
            raise ValueError("pos must be a 0-dim tensor")
        if kv_len is not None and not int(pos) < kv_len <= cache.max_len:
            raise ValueError(f"kv_len {kv_len} must lie in (pos={int(pos)}, max_len={cache.max_len}]")
        self.kv_lens.append((int(pos), kv_len))  # what the sampler asked for (a host sync: CPU tests only)
        cache.hist.add_(tokens)
        B = tokens.shape[0]
        return self._logits(tokens[:, None], pos.expand(B, 1), cache.cls, cache.hist[:, None])[:, 0]

    def forward_dense(self, cond, tokens) -> torch.Tensor:
        B = tokens.shape[0]
        dev = self.tok_table.device
        slot = torch.full((B, 1), self.config.vocab_size, dtype=torch.long, device=dev)
        x = torch.cat([slot, tokens.to(dev)], 1)
        hist = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), x[:, 1:].cumsum(1)], 1)
        pos = torch.arange(x.shape[1], device=dev)[None].expand(B, -1)
        return self._logits(x, pos, self._class(cond, B, dev), hist)


def test_fake_cache_matches_dense():
    m = FakeGPT(vocab_size=20, num_classes=3, seed=1)
    cond = make_cond([0, 2])
    toks = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    dense = m.forward_dense(cond, toks)  # [2, 8, V]
    cache = m.allocate_cache(2, 16, "cpu", torch.float32)
    got = [m.prefill(cache, cond, toks[:, :3])]
    for j in range(3, 7):
        got.append(m.decode_step(cache, toks[:, j], torch.tensor(1 + j)))
    torch.testing.assert_close(torch.stack(got, 1), dense[:, 3:])
    # The history matters: changing an early token changes later logits.
    toks2 = toks.clone()
    toks2[:, 0] += 1
    assert not torch.allclose(m.forward_dense(cond, toks2)[:, -1], dense[:, -1])
