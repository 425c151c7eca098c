"""The sampling loop: prefill, then one decode step per token over a static KV cache.

One step = ``model.decode_step`` + classifier-free guidance + length-token bias + the constraint
mask + temperature / top-k / top-p + sampling + the constraint state update. Every part is
tensor ops on preallocated buffers with the step index held on the device, so the same step
can be replayed from a captured CUDA graph (``arvid.sampling.compiled``): the host only
replays and, every ``check_every`` steps, asks whether every sample is finished.

A step attends only over the filled part of the KV cache, rounded up to a multiple of
``SamplerConfig.kv_bucket`` positions (:func:`bucket_len`): the host knows the position of
every step, so it picks the bucket (one captured graph each) without asking the device, and
eager steps use the same buckets as graph steps.

Randomness: one uniform per sample and step, drawn up front from the caller's
``torch.Generator`` (``[steps, B]``) and consumed by inverse-CDF sampling, so a seed gives the
same samples eagerly and from a graph, and the graph needs no RNG state.

Guidance puts the conditional and unconditional rows in one batch of ``2B``: rows ``0..B-1``
conditional, ``B..2B-1`` with the null class (or the null text); the combined logits are
``c + (s - 1) * (c - u)`` (= ``u + s * (c - u)``, exact for ``s = 1``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from arvid.config import doc
from arvid.data.types import TokenizedVideo
from arvid.generator.sequence import SequenceFormat
from arvid.sampling.constraints import DUMMY_TOKEN, ConstraintState, SequenceConstraint, prefix_tokens


@dataclass
class SamplerConfig:
    """How tokens are drawn (guidance, temperature, truncation, length bias, execution)."""

    temperature: float = doc(1.0, "softmax temperature; 0 = greedy (argmax)")
    top_k: int = doc(0, "keep only the k most likely tokens (0 = off)")
    top_p: float = doc(1.0, "nucleus sampling: keep the smallest set of tokens with probability >= p (1 = off)")
    cfg_scale: float = doc(1.0, "classifier-free guidance scale s: logits = u + s * (c - u); 1 = no guidance")
    cfg_schedule: Literal["constant", "linear"] = doc(
        "constant", "guidance over the sequence: constant s, or a linear ramp over sequence positions from 1 at "
                    "position 0 to s at the format's longest sequence (max_length - 1): a shorter sample ends below s")
    budget_bias: float = doc(0.0, "beta: add beta * f(count) to the length-token logits (negative: fewer tokens)")
    budget_fn: Literal["log", "linear"] = doc("log", "f(count) of the length bias: log(count) or count / max count")
    check_every: int = doc(16, "steps between host checks for 'all samples finished' (each check is a device sync)",
                           execution=True)
    compile: Literal["auto", "eager", "cuda_graph", "compile", "triton"] = doc(
        "auto", "decode step execution: eager; cuda_graph (captured step); compile (torch.compile + captured "
                "step); triton (the model's step as arvid's Triton decode kernels, five per layer, "
                "arvid.generator.decode_kernels; the sampling part compiled as under compile; captured; at most "
                "16 rows); auto = cuda_graph on CUDA, eager on CPU", execution=True)
    use_cache: bool = doc(True, "False: recompute the whole sequence at every step without a KV cache (reference)",
                          execution=True)
    compile_mode: str = doc("default", "torch.compile mode of the model's step under compile=compile: default "
                            "(cuBLAS matmuls, fused pointwise kernels) or max-autotune-no-cudagraphs (also tries "
                            "Triton matmul templates; CUDA graphs are captured by the sampler either way)",
                            execution=True)
    compile_sampling: bool = doc(True, "under compile=compile, also compile the step's sampling part (guidance, "
                                       "constraint mask, truncation, draw): about 75 small kernels at batch 1 "
                                       "become a few; if inductor cannot compile it, it stays eager (a warning)",
                                 execution=True)
    decode_attention: Literal["sdpa", "flex"] = doc(
        "sdpa", "attention of the compiled decode step (compile=compile only; the other modes use sdpa): sdpa "
                "(scaled_dot_product_attention with a length mask) or flex (FlexAttention's split-KV decoding "
                "kernel)", execution=True)
    kv_bucket: int = doc(64, "a decode step attends over the KV cache filled so far, rounded up to a multiple of "
                             "this many positions (one captured CUDA graph per bucket); 0 = always the whole "
                             "cache. At batch 64 the step reads its bucket at the memory bandwidth, so finer is "
                             "faster: the compiled L step took 4.76 ms with 64 against 5.37 ms with 256 on the "
                             "H100 (BENCHMARKS.md, Sampling)", execution=True)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")
        if self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {self.cfg_schedule!r}")
        if self.budget_fn not in ("log", "linear"):
            raise ValueError(f"budget_fn must be 'log' or 'linear', got {self.budget_fn!r}")
        if self.compile not in ("auto", "eager", "cuda_graph", "compile", "triton"):
            raise ValueError(f"compile must be auto|eager|cuda_graph|compile|triton, got {self.compile!r}")
        if self.compile_mode not in ("default", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile_mode must be default|max-autotune-no-cudagraphs, got {self.compile_mode!r}")
        if isinstance(self.kv_bucket, bool) or not isinstance(self.kv_bucket, int) or self.kv_bucket < 0:
            raise ValueError(f"kv_bucket must be an int >= 0 (0 = always the whole cache), got {self.kv_bucket!r}")
        if self.decode_attention not in ("sdpa", "flex"):
            raise ValueError(f"decode_attention must be sdpa|flex, got {self.decode_attention!r}")

    @property
    def guided(self) -> bool:
        """Whether guidance changes anything (scale 1 is plain conditional sampling)."""
        return self.cfg_scale != 1.0


@dataclass
class SampleOutput:
    """Sampled sequences.

    ``sequences``: ``LongTensor[sum L]`` packed (prefix included); ``lengths``: ``LongTensor[B]``;
    ``tokens``: the parsed :class:`TokenizedVideo` (codes + block lengths); ``steps``: decode
    steps run (the prefill's prediction included).
    """

    sequences: torch.Tensor
    lengths: torch.Tensor
    tokens: TokenizedVideo
    steps: int

    def unpacked(self) -> list[torch.Tensor]:
        return list(torch.split(self.sequences, [int(x) for x in self.lengths.tolist()]))


# --------------------------------------------------------------------------- token choice


def prefix_sum(p: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """``p.cumsum(-1)`` of ``float [B, V]``; under ``torch.compile``, as sums within chunks of
    ``chunk`` entries plus each chunk's offset (a cumulative sum over ``V / chunk`` chunk totals).

    The same sums in another order (float rounding apart). Why: on the GPU, inductor (torch 2.11)
    splits a cumulative sum over the ~8k-entry vocabulary into a multi-kernel scan whose code it
    fails to generate ("NYI TritonSplitDimKernel reductions", a TypeError in the split-scan
    code; H100, 2026-12-05), so the compiled sampling part fell back to eager; scans of 128 and
    of ``V / 128`` entries are not split. Eagerly the plain ``cumsum`` is the faster (the blocked
    one took 2.1 ms against 0.26 ms at batch 64 on a 2-core CPU), so it stays."""
    if not torch.compiler.is_compiling():
        return p.cumsum(-1)
    B, V = p.shape
    n = -(-V // chunk)
    x = torch.nn.functional.pad(p, (0, n * chunk - V)).view(B, n, chunk).cumsum(-1)  # [B, n, chunk]
    totals = x[..., -1]  # [B, n]
    offsets = totals.cumsum(-1) - totals  # sum of the chunks before each chunk
    return (x + offsets[..., None]).view(B, n * chunk)[:, :V]


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Draw one token per row by inverse-CDF sampling.

    Args:
        logits: ``float [B, V]``; ``-inf`` marks forbidden tokens (at least one finite per row).
        u: ``float [B]`` uniforms in [0, 1) (drawn by the caller from its generator).
        temperature: 0 = argmax.
        top_k, top_p: truncation (0 / 1 = off).

    Returns:
        ``LongTensor[B]``. Never a forbidden token. Tensor ops only (CUDA-graph safe).
    """
    # NaN (a model overflow) becomes a very unlikely token, not a forbidden one (-inf stays -inf);
    # the row's max is subtracted before the division, so a tiny temperature cannot overflow to
    # +-inf and NaN (the best token maps to 0, the rest to <= 0).
    logits = torch.nan_to_num(logits.float(), nan=-1e30, posinf=1e30, neginf=float("-inf"))
    if temperature == 0:
        return logits.argmax(-1)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)  # [B, V]
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        # Drop a token when the tokens before it already hold top_p; the first always stays.
        before = prefix_sum(probs) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    cdf = prefix_sum(probs)  # [B, V]
    x = u.to(cdf.dtype) * cdf[:, -1]
    idx = (cdf <= x[:, None]).sum(-1).clamp(max=V - 1)  # first index with cdf > x
    # Rounding at the top end of the cdf could land on a zero-probability token: take the mode.
    bad = probs.gather(1, idx[:, None]).squeeze(1) <= 0
    idx = torch.where(bad, probs.argmax(-1), idx)
    if order is not None:
        idx = order.gather(1, idx[:, None]).squeeze(1)
    return idx


def length_bias(fmt: SequenceFormat, beta: float, fn: str = "log") -> torch.Tensor:
    """``float [V]``: ``beta * f(count)`` on the length tokens, 0 on codes."""
    cand = torch.tensor(fmt.layout.candidates, dtype=torch.float32)
    if fn == "log":
        f = torch.log(cand)
    elif fn == "linear":
        f = cand / cand.max()
    else:
        raise ValueError(f"budget_fn must be 'log' or 'linear', got {fn!r}")
    out = torch.zeros(fmt.vocab_size)
    out[fmt.len_token_base:] = beta * f
    return out


def cfg_scales(cfg: SamplerConfig, fmt: SequenceFormat, start: int, steps: int) -> torch.Tensor:
    """``float [steps]``: the guidance scale for tokens at sequence positions ``start..start+steps-1``."""
    s = float(cfg.cfg_scale)
    if cfg.cfg_schedule == "constant":
        return torch.full((steps,), s)
    t = torch.arange(start, start + steps, dtype=torch.float32)
    return 1.0 + (s - 1.0) * t / max(fmt.max_length - 1, 1)


# --------------------------------------------------------------------------- conditioning


def conditioning_class() -> type:
    """The generator's ``Conditioning`` dataclass (wherever the generator package defines it)."""
    try:
        from arvid.generator.conditioning import Conditioning
    except ImportError:
        from arvid.generator.gpt import Conditioning
    return Conditioning


def cond_batch_size(cond: Any) -> int | None:
    for name in ("class_ids", "text_ids"):
        t = getattr(cond, name, None)
        if t is not None:
            return int(t.shape[0])
    return None


def null_conditioning(model: Any, cond: Any) -> Any:
    """The unconditional counterpart of ``cond`` for guidance: the null class id
    (``num_classes``) for classes, the model's empty text for text."""
    B = cond_batch_size(cond)
    if B is None:
        raise ValueError("classifier-free guidance needs a conditioning (class_ids or text_ids); "
                         "this batch has none: set cfg_scale to 1")
    if hasattr(model, "null_conditioning"):
        ref = cond.class_ids if getattr(cond, "class_ids", None) is not None else cond.text_ids
        return model.null_conditioning(B, ref.device)
    changes: dict[str, Any] = {}
    if getattr(cond, "class_ids", None) is not None:
        changes["class_ids"] = torch.full_like(cond.class_ids, int(model.config.num_classes))
    if getattr(cond, "text_ids", None) is not None:
        pad = int(getattr(model.config, "text_pad_id", 0))
        changes["text_ids"] = torch.full_like(cond.text_ids, pad)
    if not changes:
        raise ValueError("classifier-free guidance needs a conditioning (class_ids or text_ids); "
                         "this batch has none: set cfg_scale to 1")
    return dataclasses.replace(cond, **changes)


def cat_conditioning(a: Any, b: Any) -> Any:
    """Stack two conditionings of the same kind along the batch (``[B] + [B] -> [2B]``)."""
    changes = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            changes[f.name] = torch.cat([x, y])
    return dataclasses.replace(a, **changes)


def cond_to(cond: Any, device: torch.device) -> Any:
    changes = {f.name: getattr(cond, f.name).to(device) for f in dataclasses.fields(cond)
               if isinstance(getattr(cond, f.name), torch.Tensor)}
    return dataclasses.replace(cond, **changes)


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


# --------------------------------------------------------------------------- the decoder


def bucket_len(pos: int, bucket: int, max_len: int) -> int:
    """Cache positions a decode step at position ``pos`` attends over (its ``kv_len``): ``pos + 1``
    rounded up to a multiple of ``bucket``, at most ``max_len``; ``bucket`` 0 = ``max_len``.

    Steps in one bucket share one static shape (one captured CUDA graph)."""
    if not 0 <= pos < max_len:
        raise ValueError(f"pos must lie in [0, max_len={max_len}), got {pos}")
    if bucket < 0:
        raise ValueError(f"bucket must be >= 0 (0 = the whole cache), got {bucket}")
    if bucket == 0:
        return max_len
    return min(max_len, -(-(pos + 1) // bucket) * bucket)


class _Decoder:
    """Static buffers of one batch shape, and the prefill / step functions over them.

    Reused across calls with the same shape (a captured graph stays valid); :meth:`load`
    refills the buffers in place for a new batch. The prefilled prefix length ``p0`` is not part
    of the shape: the buffers hold room for a whole sequence and the step reads its first
    position from a device scalar, so batches whose shortest context differs (frame prediction
    at router-chosen counts) share one decoder and its graphs.
    """

    def __init__(self, model, fmt: SequenceFormat, cfg: SamplerConfig, batch_size: int, n_prefix: int,
                 guided: bool, has_budget: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.fmt, self.cfg = model, fmt, cfg
        self.B, self.n, self.guided = batch_size, n_prefix, guided
        # per batch (load): the prefilled prefix length and the most tokens a sample can still need
        self.p0, self.G = 0, fmt.max_length
        self.loads = 0  # batches loaded so far (a PreparedBatch remembers which one is its own)
        self.ran = 0  # the load last run (its state is spent: run() does not rewind it)
        self.device = device
        rows = 2 * batch_size if guided else batch_size
        # Positions 0 .. n + max_length - 2: the last token of the longest sequence is never fed.
        self.cache = (model.allocate_cache(rows, n_prefix + fmt.max_length - 1, device, dtype)
                      if cfg.use_cache else None)
        B, G = batch_size, fmt.max_length
        long = dict(dtype=torch.long, device=device)
        self.i = torch.zeros((), **long)  # index of the next token to choose (device scalar)
        self.pos_base = torch.zeros((), **long)  # n + p0 - 1: the input position of token -1
        self.tok = torch.zeros(B, **long)  # the last chosen token
        self.out = torch.zeros(B, G, **long)
        self.u = torch.zeros(G, B, device=device)
        self.scales = torch.ones(G, device=device)
        self.bias = torch.zeros(fmt.vocab_size, device=device)
        self.forced = torch.zeros(B, G, **long)
        self.forced_len = torch.zeros(B, **long)
        self.constraint = SequenceConstraint(fmt, B, budget=1 if has_budget else None, device=device)
        self.state = ConstraintState.initial(B, device)
        self.kv_bucket = cfg.kv_bucket
        # kv_len -> the step captured for it; set by compiled.capture_decoder when the step runs from
        # CUDA graphs (empty: eager).
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.decode_fn = model.decode_step  # compiled.capture_decoder may swap in a compiled one
        self.choose_fn = self.choose  # likewise (compiled.compile_choose)
        # Dense (no-cache) mode keeps the whole input on the device.
        self.cond2 = None
        self.prefix2 = None

    # ------------------------------------------------------------------ KV length buckets
    def kv_len(self, chosen: int) -> int:
        """The ``kv_len`` of the step run after ``chosen`` tokens were chosen: that step feeds token
        ``chosen - 1`` at position ``chosen - 1 + n + p0`` (host-side twin of ``pos`` in :meth:`step`)."""
        return bucket_len(chosen - 1 + self.n + self.p0, self.kv_bucket, self.cache.max_len)

    def kv_lens(self) -> list[int]:
        """Every ``kv_len`` the run loop can use, whatever the batch's ``p0``, ascending; the last
        is always the whole cache. A step feeds a position from ``n`` (the first token after the
        prefill, ``p0 = 0``) to ``n + max_length - 2`` (the last token is never fed)."""
        first, last = self.n, self.n + self.fmt.max_length - 2
        lens = {bucket_len(pos, self.kv_bucket, self.cache.max_len) for pos in range(first, last + 1)}
        lens.add(self.cache.max_len)
        return sorted(lens)

    # ------------------------------------------------------------------ buffers
    def load(self, p0: int, constraint: SequenceConstraint, state: ConstraintState, u: torch.Tensor,
             scales: torch.Tensor, bias: torch.Tensor, forced: torch.Tensor, forced_len: torch.Tensor) -> None:
        """Fill the buffers for a batch whose first ``p0`` tokens are prefilled: ``u [G, B]`` and
        ``scales [G]`` for its ``G = max_length - p0`` steps, ``forced [B, F]`` (``F <= G``)."""
        self.p0, self.G = p0, self.fmt.max_length - p0
        self.loads += 1
        if u.shape[0] != self.G or scales.shape[0] != self.G or forced.shape[1] > self.G:
            raise ValueError(f"a batch with p0={p0} needs u [{self.G}, B], scales [{self.G}] and at most {self.G} "
                             f"forced tokens; got {tuple(u.shape)}, {tuple(scales.shape)}, {tuple(forced.shape)}")
        self.constraint.load_(constraint)
        self.state.copy_(state)
        self.i.zero_()
        self.pos_base.fill_(self.n + p0 - 1)
        self.tok.zero_()
        self.out.zero_()
        self.u.zero_()
        self.u[:self.G].copy_(u)
        self.scales.fill_(1.0)
        self.scales[:self.G].copy_(scales)
        self.bias.copy_(bias)
        self.forced.zero_()
        if forced.shape[1]:
            self.forced[:, :forced.shape[1]].copy_(forced)
        self.forced_len.copy_(forced_len)

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self._mutable()]

    def restore(self, snap: list[torch.Tensor]) -> None:
        for t, s in zip(self._mutable(), snap):
            t.copy_(s)

    def _mutable(self) -> list[torch.Tensor]:
        return [self.i, self.tok, self.out, *self.state.tensors()]

    # ------------------------------------------------------------------ steps
    def choose(self, logits: torch.Tensor) -> None:
        """Pick token ``i`` from next-token ``logits`` ``[rows, V]`` and advance (tensor ops only)."""
        logits = logits.float()
        i = self.i.view(1)
        if self.guided:
            c, u = logits.chunk(2)  # [B, V] each: conditional rows first
            s = self.scales.index_select(0, i)  # [1]
            logits = c + (s - 1.0) * (c - u)
        logits = logits + self.bias
        allowed = self.constraint.mask(self.state)  # [B, V]
        logits = logits.masked_fill(~allowed, float("-inf"))
        uni = self.u.index_select(0, i).squeeze(0)  # [B]
        tok = sample_from_logits(logits, uni, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p)
        fi = i.clamp(max=self.forced.shape[1] - 1)
        forced = self.forced.index_select(1, fi).squeeze(1)  # [B]
        tok = torch.where(self.i < self.forced_len, forced, tok)
        done = self.constraint.done(self.state)
        tok = torch.where(done, torch.full_like(tok, DUMMY_TOKEN), tok)  # finished samples step with a dummy
        self.out.index_copy_(1, i, tok[:, None])
        self.constraint.advance(self.state, tok)
        self.tok.copy_(tok)
        self.i.add_(1)

    def step(self, kv_len: int | None = None) -> None:
        """Feed the last chosen token at its position, then choose the next one; attend over the
        first ``kv_len`` cache positions (:meth:`kv_len`; None = the whole cache)."""
        feed = torch.cat([self.tok, self.tok]) if self.guided else self.tok
        pos = self.i + self.pos_base  # position of token i-1 in the model's input (a device scalar)
        logits = self.decode_fn(self.cache, feed, pos, kv_len)
        self.choose_fn(logits)

    def advance(self, chosen: int) -> None:
        """Run the step that follows ``chosen`` chosen tokens over its KV length bucket: the bucket's
        captured graph when the decoder has graphs, else the same step eagerly (so eager and graph
        sampling attend over the same positions and give bit-identical samples)."""
        kv_len = self.kv_len(chosen)
        if self.graphs:
            self.graphs[kv_len].replay()
        else:
            self.step(kv_len)

    def step_dense(self, i: int) -> None:
        """No-cache reference: recompute every position, keep the last logits. ``i`` = tokens chosen so far."""
        gen = self.out[:, :i]
        if self.guided:
            gen = torch.cat([gen, gen])
        tokens = torch.cat([self.prefix2, gen], 1) if self.prefix2 is not None else gen
        logits = self.model.forward_dense(self.cond2, tokens)[:, -1]
        self.choose(logits)


# --------------------------------------------------------------------------- the sampler


@dataclass
class PreparedBatch:
    """A batch set up by :meth:`Sampler.prepare`: its decoder (static buffers, cache, graph), the
    model's conditioning rows (``2B`` with guidance), the prefilled prefix rows (or None), the
    prefix kept for the output (``[B, p0]``, CPU), the constraint, and which of the decoder's
    loads is this batch's (batches of one shape share a decoder: run one before preparing the next)."""

    decoder: _Decoder
    cond: Any
    prefix_rows: torch.Tensor | None
    prefix: torch.Tensor
    constraint: SequenceConstraint
    load: int


#: decoders a Sampler keeps (each holds a whole KV cache and, on a GPU, its captured graphs): the
#: most recently used ones. Until 2026-12-06 the prefilled prefix length was part of a decoder's
#: shape, and frame prediction at router-chosen context counts made (and kept) one per batch.
MAX_DECODERS = 2


class Sampler:
    """Samples token sequences from a GPT, constrained to the sequence format.

    Args:
        model: a GPT with ``allocate_cache / prefill / decode_step / forward_dense / num_prefix``
            (``arvid.generator.gpt.GPT``).
        fmt: the sequence format the model was trained on.
        cfg: :class:`SamplerConfig`.

    Decoders (static buffers, KV cache, captured graphs) are kept per batch shape and reused, the
    :data:`MAX_DECODERS` most recently used ones; :meth:`clear` frees them all.
    """

    def __init__(self, model: torch.nn.Module, fmt: SequenceFormat, cfg: SamplerConfig | None = None) -> None:
        self.model, self.fmt = model, fmt
        self.cfg = cfg or SamplerConfig()
        self._decoders: dict[tuple, _Decoder] = {}

    def clear(self) -> None:
        self._decoders.clear()

    def execution(self, device: torch.device) -> str:
        """The step execution actually used on ``device``: eager | cuda_graph | compile | triton.
        ``triton`` off CUDA runs where Triton's CPU interpreter is on (``TRITON_INTERPRET=1``: tests),
        without graphs."""
        mode = self.cfg.compile
        if (mode == "triton" and self.cfg.use_cache and device.type != "cuda"
                and os.environ.get("TRITON_INTERPRET") == "1"):
            return mode
        if not self.cfg.use_cache or device.type != "cuda":
            return "eager"
        return "cuda_graph" if mode == "auto" else mode

    @torch.no_grad()
    def generate(
        self,
        cond: Any = None,
        *,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        prefix: torch.Tensor | TokenizedVideo | None = None,
        prefix_lengths: torch.Tensor | None = None,
        allowed_counts: Any = None,
        fixed_assignment: Any = None,
        budget: int | torch.Tensor | None = None,
        guided: bool | None = None,
        budget_bias: float | None = None,
    ) -> SampleOutput:
        """Sample one sequence per row.

        Args:
            cond: the generator's ``Conditioning`` (class ids ``[B]`` / text ids ``[B, Lt]``), or
                None for an unconditional model (then give ``batch_size``).
            generator: the source of all randomness (same seed, same samples).
            prefix: given leading tokens: a ``TokenizedVideo`` of the first blocks of each video
                (frame prediction's context), or ``LongTensor[B, P]`` in the sequence format
                (``prefix_lengths [B]`` when rows differ). The common part is prefilled; the rest
                of each row is forced token by token.
            allowed_counts, fixed_assignment, budget: see :class:`SequenceConstraint`.
            guided: force guidance on/off (default: on iff ``cfg_scale != 1``).
            budget_bias: override ``cfg.budget_bias`` (beta) for this call.

        Returns:
            :class:`SampleOutput` (well formed by construction; parsed to check).
        """
        return self.run(self.prepare(
            cond, batch_size=batch_size, generator=generator, prefix=prefix, prefix_lengths=prefix_lengths,
            allowed_counts=allowed_counts, fixed_assignment=fixed_assignment, budget=budget, guided=guided,
            budget_bias=budget_bias))

    @torch.no_grad()
    def prepare(
        self,
        cond: Any = None,
        *,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        prefix: torch.Tensor | TokenizedVideo | None = None,
        prefix_lengths: torch.Tensor | None = None,
        allowed_counts: Any = None,
        fixed_assignment: Any = None,
        budget: int | torch.Tensor | None = None,
        guided: bool | None = None,
        budget_bias: float | None = None,
    ) -> PreparedBatch:
        """Set a batch up without sampling (validate, load the decoder's static buffers, capture its
        CUDA graph); :meth:`run` samples from it. Arguments as :meth:`generate`. Batches of the
        same shape share one decoder: run a prepared batch before preparing the next."""
        cfg, fmt, model = self.cfg, self.fmt, self.model
        device, dtype = _model_device_dtype(model)
        if cond is None:
            cond = conditioning_class()()
        B = cond_batch_size(cond)
        if B is None:
            B = batch_size if batch_size is not None else (
                prefix.batch_size if isinstance(prefix, TokenizedVideo) else
                (prefix.shape[0] if prefix is not None else None))
        if B is None:
            raise ValueError("give cond (class_ids / text_ids), a prefix or batch_size: the batch size is unknown")
        if batch_size is not None and batch_size != B:
            raise ValueError(f"batch_size={batch_size} does not match the conditioning's batch {B}")
        n = int(model.num_prefix(cond))  # also validates cond (class ids are checked while still on the CPU)
        cond = cond_to(cond, device)
        guided = cfg.guided if guided is None else guided

        # Prefix: prefilled up to the shortest row, forced beyond.
        if isinstance(prefix, TokenizedVideo):
            if prefix_lengths is not None:
                raise ValueError("prefix_lengths is derived from a TokenizedVideo prefix; do not pass both")
            prefix, prefix_lengths = prefix_tokens(fmt, prefix)
        if prefix is None:
            prefix = torch.zeros(B, 0, dtype=torch.long)
        prefix = torch.as_tensor(prefix, dtype=torch.long).cpu()  # kept for the output, on the host
        if prefix.dim() != 2 or prefix.shape[0] != B:
            raise ValueError(f"prefix must be LongTensor[B={B}, P], got shape {tuple(prefix.shape)}")
        if prefix_lengths is None:
            prefix_lengths = torch.full((B,), prefix.shape[1], dtype=torch.long)
        prefix_lengths = torch.as_tensor(prefix_lengths, dtype=torch.long).cpu()
        if prefix_lengths.shape != (B,) or bool(((prefix_lengths < 0) | (prefix_lengths > prefix.shape[1])).any()):
            raise ValueError(f"prefix_lengths must be [B={B}] values in [0, {prefix.shape[1]}], got "
                             f"{prefix_lengths.tolist()[:8]}")
        p0 = int(prefix_lengths.min()) if B else 0
        if p0 >= fmt.max_length:
            raise ValueError(f"the prefix ({p0} tokens) leaves nothing to generate (max length {fmt.max_length})")

        constraint = SequenceConstraint(fmt, B, allowed_counts, fixed_assignment, budget, device=device)
        # Validate whole prefixes; the state starts after the prefilled part (forced tokens
        # advance it in the loop like sampled ones).
        if bool(constraint.done(constraint.state_after(prefix, prefix_lengths)).any()):
            raise ValueError("a prefix is already a complete sequence: nothing to generate")
        state = constraint.state_after(prefix[:, :p0])

        forced = prefix[:, p0:]
        forced_len = prefix_lengths - p0
        key = (B, n, guided, budget is not None, cfg.use_cache)  # not p0: see _Decoder
        dec = self._decoders.pop(key, None)
        if dec is None:
            while len(self._decoders) >= MAX_DECODERS:  # the least recently used goes (its cache and graphs)
                self._decoders.pop(next(iter(self._decoders)))
            dec = _Decoder(model, fmt, cfg, B, n, guided, budget is not None, device, dtype)
        self._decoders[key] = dec  # most recently used last

        G = fmt.max_length - p0  # most tokens any sample can still need
        gdev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(G, B, generator=generator, device=gdev)  # [G, B]: one uniform per step and sample
        beta = cfg.budget_bias if budget_bias is None else float(budget_bias)
        dec.load(p0, constraint, state, u.to(device), cfg_scales(cfg, fmt, p0, G).to(device),
                 length_bias(fmt, beta, cfg.budget_fn).to(device), forced.to(device), forced_len.to(device))

        full_cond = cat_conditioning(cond, cond_to(null_conditioning(model, cond), device)) if guided else cond
        pre = prefix[:, :p0].to(device)
        pre2 = torch.cat([pre, pre]) if guided else pre
        mode = self.execution(device)
        if mode == "triton" and dec.decode_fn == model.decode_step:
            from arvid.generator import decode_kernels

            why = decode_kernels.unsupported(model, dec.cache.batch_size, device)
            if why is not None:
                raise ValueError(f"SamplerConfig.compile='triton': {why}; use compile='compile' or 'cuda_graph'")
            dec.decode_fn = functools.partial(decode_kernels.decode_step, model)
        # (triton off CUDA: Triton's interpreter, in tests; nothing to capture)
        if mode != "eager" and not dec.graphs and (mode != "triton" or device.type == "cuda"):
            from arvid.sampling.compiled import capture_decoder

            # Capture first (one graph per KV length bucket): the warm-up steps write garbage into
            # the cache and the buffers; the decoder's buffers are restored and the prefill in
            # run() overwrites the cache.
            capture_decoder(dec, compile_step=(mode == "compile"), compile_mode=self.cfg.compile_mode,
                            compile_sampling=self.cfg.compile_sampling and mode in ("compile", "triton"),
                            attention=self.cfg.decode_attention)
            if mode == "triton":  # the warm-up steps ran the kernels: a grid barrier that gave up shows here
                from arvid.generator import decode_kernels

                if decode_kernels.barrier_errors(device):
                    raise RuntimeError("the Triton decode step's one-launch layer could not keep all its programs "
                                       "resident on this GPU (another process holds SMs?): set "
                                       "arvid.generator.decode_kernels.TILES['layer'] = 0 or use compile='compile'")

        return PreparedBatch(dec, full_cond, pre2 if p0 else None, prefix[:, :p0], constraint, dec.loads)

    @torch.no_grad()
    def run(self, prep: PreparedBatch) -> SampleOutput:
        """Prefill, then step until every sample is finished (see :meth:`generate`)."""
        cfg, fmt, model = self.cfg, self.fmt, self.model
        dec, constraint, pre2 = prep.decoder, prep.constraint, prep.prefix_rows
        p0, G = dec.p0, dec.G
        if dec.loads != prep.load:
            raise RuntimeError("this prepared batch's decoder was loaded for another batch since: run each prepared "
                               "batch before preparing the next")
        if dec.ran == prep.load:
            raise RuntimeError("this prepared batch was run already (its decoder state is spent): call prepare() "
                               "again to sample it again")
        dec.ran = prep.load
        if cfg.use_cache:
            dec.cache.reset()
            logits = model.prefill(dec.cache, prep.cond, pre2)  # [rows, V]
        else:
            dec.cond2, dec.prefix2 = prep.cond, pre2
            empty = torch.zeros(dec.B * (2 if dec.guided else 1), 0, dtype=torch.long, device=dec.device)
            logits = model.forward_dense(prep.cond, pre2 if pre2 is not None else empty)[:, -1]
        dec.choose(logits)
        steps = 1
        # No sample can finish before the shortest possible remaining sequence.
        min_left = max(int((fmt.layout.num_blocks + constraint.min_rest[:, 0]).min()) - p0, 1)
        while steps < G:
            chunk = min(cfg.check_every, G - steps) if steps >= min_left else min(min_left - steps, G - steps)
            for _ in range(chunk):
                if not cfg.use_cache:
                    dec.step_dense(steps)
                else:
                    dec.advance(steps)
                steps += 1
            if steps >= min_left and bool(constraint.done(dec.state).all()):
                break
        if not bool(constraint.done(dec.state).all()):
            raise RuntimeError("sampling ended before every sample finished its last block (a bug)")

        lengths = dec.state.length.cpu()  # [B] whole sequence lengths
        full = torch.cat([prep.prefix, dec.out.cpu()], 1)  # [B, p0 + G]
        valid = torch.arange(full.shape[1])[None, :] < lengths[:, None]
        seq = full[valid]
        tokens = fmt.from_sequences(seq, lengths)
        return SampleOutput(seq, lengths, tokens, steps)



def mean_tokens(out: SampleOutput) -> float:
    """Mean codes per video (the paper's 'tokens per video')."""
    return float(out.tokens.lengths.float().mean())


__all__ = ["SamplerConfig", "Sampler", "SampleOutput", "sample_from_logits", "length_bias", "cfg_scales",
           "null_conditioning", "cat_conditioning", "conditioning_class", "mean_tokens", "bucket_len", "prefix_sum"]
