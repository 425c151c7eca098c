"""Token-budget control: ask for a mean number of tokens per video, or cap each video exactly.

Soft (mean) mode: the sampler adds ``beta * f(count)`` to the length-token logits
(``SamplerConfig.budget_bias``, ``budget_fn``; ``f = log`` by default). The mean tokens per video
grows with ``beta``; :func:`calibrate_budget_bias` finds the ``beta`` whose mean meets the target
on a calibration batch by bisection. Each evaluation samples the same batch with the same seed
(common random numbers), which keeps the measured mean close to monotone in ``beta`` so the
bisection does not chase noise. Length tokens are only ever chosen among length tokens, so the
bias changes how many codes a block gets, never the codes.

Exact mode: ``Sampler.generate(..., budget=N)`` (``SequenceConstraint``): the sampler tracks the
codes committed so far and masks the length tokens that would leave the remaining blocks unable
to fit at their smallest allowed counts; no video exceeds ``N`` (unless ``N`` is below the
smallest possible total, when every block gets its smallest count).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from arvid.sampling.sampler import Sampler, mean_tokens


@dataclass
class BudgetCalibration:
    """The result of :func:`calibrate_budget_bias`.

    ``beta``: the bias to use; ``mean_tokens``: the calibration batch's mean at ``beta``;
    ``target``: what was asked; ``history``: every ``(beta, mean)`` evaluated, in order.
    """

    beta: float
    mean_tokens: float
    target: float
    history: list[tuple[float, float]] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        return abs(self.mean_tokens - self.target) / self.target


def calibration_rows(total: int, n: int) -> torch.Tensor:
    """``n`` row indices (``n <= total``) spread evenly over ``0..total-1``, first and last included:
    which videos of a run condition the calibration batch. Runs list their classes (or prompts) in
    order, so their first ``n`` rows are often one class, whose lengths need not be the run's."""
    if not 1 <= n <= total:
        raise ValueError(f"calibration rows: need 1 <= n <= total, got n={n}, total={total}")
    return torch.linspace(0, total - 1, n).round().long() if n > 1 else torch.zeros(1, dtype=torch.long)


def bisect_bias(measure: Callable[[float], float], target: float, lo: float = -4.0, hi: float = 4.0,
                iters: int = 24, rel_tol: float = 0.01, expand: int = 6, beta_tol: float = 1e-3) -> BudgetCalibration:
    """Find ``beta`` with ``measure(beta) ~= target`` for a non-decreasing ``measure``.

    The bracket ``[lo, hi]`` is widened (doubled, up to ``expand`` times) until it contains the
    target. Stops when the relative error is under ``rel_tol``, after ``iters`` halvings, or when
    the bracket is narrower than ``beta_tol`` (a measure over few samples is a step function);
    returns the best ``beta`` seen.

    Raises:
        ValueError: the target lies outside what any ``beta`` reaches (e.g. below the smallest
            possible sequence).
    """
    if target <= 0:
        raise ValueError(f"the target mean tokens must be positive, got {target}")
    history: list[tuple[float, float]] = []

    def m(beta: float) -> float:
        v = float(measure(beta))
        history.append((beta, v))
        return v

    m_lo, m_hi = m(lo), m(hi)
    for _ in range(expand):
        if m_lo <= target <= m_hi:
            break
        if m_lo > target:
            lo, hi, m_hi = lo * 2 if lo < 0 else lo - 1, lo, m_lo
            m_lo = m(lo)
        else:
            lo, hi, m_lo = hi, hi * 2 if hi > 0 else hi + 1, m_hi
            m_hi = m(hi)
    if not m_lo <= target <= m_hi:
        raise ValueError(f"target {target:g} tokens per video is out of reach: beta={lo:g} gives {m_lo:.1f}, "
                         f"beta={hi:g} gives {m_hi:.1f}")
    for _ in range(iters):
        best = min(history, key=lambda h: abs(h[1] - target))
        if abs(best[1] - target) <= rel_tol * target or hi - lo < beta_tol:
            break
        mid = 0.5 * (lo + hi)
        v = m(mid)
        if v < target:
            lo = mid
        else:
            hi = mid
    beta, mean = min(history, key=lambda h: abs(h[1] - target))
    return BudgetCalibration(beta, mean, float(target), history)


def calibrate_budget_bias(sampler: Sampler, target: float, cond=None, *, batch_size: int | None = None,
                          seed: int = 0, lo: float = -4.0, hi: float = 4.0, iters: int = 24,
                          rel_tol: float = 0.01, **generate_kwargs) -> BudgetCalibration:
    """The length bias ``beta`` that makes the mean codes per video meet ``target``.

    Args:
        sampler: the :class:`Sampler` (its config's guidance, temperature ... are used; its
            ``budget_bias`` is overridden during calibration, not changed).
        target: mean codes per video to reach (e.g. 600).
        cond, batch_size: the calibration batch (e.g. a few classes x a few samples each).
        seed: every evaluation samples with this seed.
        generate_kwargs: passed to ``Sampler.generate`` (prefix, allowed_counts, ...).

    Returns:
        :class:`BudgetCalibration`; set ``SamplerConfig.budget_bias = result.beta``.

    Under ``torch.distributed`` with several processes, rank 0 calibrates and every process gets its
    result: they all sample with one ``beta`` (GPU kernels need not give each process the same
    calibration means, and a per-process ``beta`` would make the samples depend on the process count).
    """
    import torch.distributed as dist

    def measure(beta: float) -> float:
        g = torch.Generator().manual_seed(seed)
        out = sampler.generate(cond, batch_size=batch_size, generator=g, budget_bias=beta, **generate_kwargs)
        return mean_tokens(out)

    shared = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not shared:
        return bisect_bias(measure, target, lo=lo, hi=hi, iters=iters, rel_tol=rel_tol)
    result: BudgetCalibration | Exception | None = None
    if dist.get_rank() == 0:
        try:
            result = bisect_bias(measure, target, lo=lo, hi=hi, iters=iters, rel_tol=rel_tol)
        except Exception as e:  # noqa: BLE001 - shared below, so no process waits for a result that never comes
            result = e
    box = [result]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        if dist.get_rank() == 0:
            raise box[0]
        raise RuntimeError(f"budget calibration failed on process 0: {box[0]}") from box[0]
    return box[0]
