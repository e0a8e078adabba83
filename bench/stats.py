"""Medians, spreads and ratios over interleaved repetitions: what the bench reports.

Shared 2-core machines drift; a figure is its median over reps with (max-min)/median."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

NOISY = 0.10          # a spread above this is marked in the tables


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    def add(self, value: float | None) -> None:
        if value is not None:
            self.values.append(value)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def spread(self) -> float | None:
        m = self.median
        if not self.values or not m:
            return None
        return (max(self.values) - min(self.values)) / m

    @property
    def noisy(self) -> bool:
        return (self.spread or 0.0) > NOISY


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


def fmt_rate(s: Series) -> str:
    if s.median is None:
        return "-"
    mark = " ⚠" if s.noisy else ""
    return f"{s.median:,.0f} ±{100 * (s.spread or 0):.0f}%{mark}"


def fmt_us(s: Series) -> str:
    return "-" if s.median is None else f"{s.median:,.0f}"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def fmt_seconds(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:,.1f} ms" if v < 1 else f"{v:,.2f} s"
