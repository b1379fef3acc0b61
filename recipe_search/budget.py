"""Compute budgets as users type them: ``50%``, ``0.5`` (FLOPs fractions) or ``64tok`` (mean tokens)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from .flops import FORMULAS, CostModel


class BudgetError(ValueError):
    pass


@dataclass(frozen=True)
class Budget:
    """A FLOPs fraction under one formula, or a mean number of visual tokens kept per layer."""

    kind: str          # "flops" or "tokens"
    value: float       # fraction in (0, 1] for flops; tokens for tokens
    formula: str = "full"
    text: str = ""     # as the user asked

    def is_met(self, schedule: Sequence[int], costs: CostModel) -> bool:
        return self.achieved(schedule, costs) <= self.value + 1e-12

    def achieved(self, schedule: Sequence[int], costs: CostModel) -> float:
        """The schedule's value in this budget's own unit."""
        if self.kind == "tokens":
            return costs.mean_tokens(schedule)
        return costs.fraction(schedule, self.formula)

    def describe(self) -> str:
        if self.kind == "tokens":
            return f"{self.value:g} visual tokens per layer (mean)"
        return f"{self.value:.2%} of LM prefill FLOPs ({self.formula})"


_TOKENS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*tok(?:ens)?\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_budget(text: str, formula: str = "full") -> Budget:
    """Parse one budget; raises BudgetError with a one-line message naming the problem."""
    if formula not in FORMULAS:
        raise BudgetError(f"unknown FLOPs formula {formula!r}; choose from {', '.join(FORMULAS)}")
    if m := _TOKENS.match(text):
        tokens = float(m.group(1))
        if tokens <= 0:
            raise BudgetError(f"budget {text!r}: a token budget must be more than 0 tokens")
        return Budget("tokens", tokens, formula, text.strip())
    if m := _PERCENT.match(text):
        fraction = float(m.group(1)) / 100
    else:
        try:
            fraction = float(text)
        except ValueError:
            raise BudgetError(
                f"budget {text!r} is not understood: use a percentage (50%), a fraction (0.5) or tokens (64tok)"
            ) from None
    if not 0 < fraction <= 1:
        raise BudgetError(f"budget {text!r} is out of range: a FLOPs budget must be in (0%, 100%]")
    return Budget("flops", fraction, formula, text.strip())


def parse_budgets(text: str, formula: str = "full") -> list[Budget]:
    """A comma-separated list of budgets, e.g. ``50%,25%,12.5%``."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise BudgetError("empty budget: use e.g. --budget 50%")
    return [parse_budget(p, formula) for p in parts]
