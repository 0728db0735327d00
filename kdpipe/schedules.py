"""Schedules of a value (KD temperature T, KD weight α) over the training steps.

A spec is :class:`kdpipe.config.ScheduleCfg` (kind, start, end, milestones); start/end None mean the
base value (``distill.temperature`` / ``distill.alpha``), so the default (constant) changes nothing.
With progress p = min(step / total_steps, 1) ∈ [0, 1]:
"""
from __future__ import annotations

import bisect
import math

from kdpipe.config import ConfigError, ScheduleCfg


def value(spec: ScheduleCfg, step: int, total_steps: int, base: float | None = None) -> float:
    """The scheduled value at ``step`` (0-based) of ``total_steps``; e.g. T 20 → 4 with kind=linear."""
    start = spec.start if spec.start is not None else base
    if start is None:
        raise ConfigError(f"schedule {spec.kind}: 'start' is not set and no base value was given")
    end = spec.end if spec.end is not None else start
    p = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if spec.kind == "constant":  # v = start
        return float(start)
    if spec.kind == "linear":  # v = start + (end − start)·p
        return start + (end - start) * p
    if spec.kind == "cosine":  # v = end + (start − end)·(1 + cos(π·p))/2
        return end + (start - end) * (1 + math.cos(math.pi * p)) / 2
    if spec.kind == "step":  # v = start + (end − start)·k/K, k = #{milestones m_i ≤ p}, K = #milestones
        return start + (end - start) * bisect.bisect_right(sorted(spec.milestones), p) / len(spec.milestones)
    raise ConfigError(f"schedule: unknown kind '{spec.kind}'")
