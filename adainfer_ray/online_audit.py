"""The audit, looked at while the run goes: an anytime-valid test of "the promise is broken".

Every block's audited rows (run on to full depth) add counts; after each block the run asks
whether the evidence already shows the promise broken. Asking after every block is asking many
times, so a fixed-sample bound (Clopper-Pearson at each look) would cry wolf far more often than
its 5%. This module uses a betting test instead (Waudby-Smith & Ramdas, "Estimating means of
bounded random variables by betting", 2023): for a loss X in [lo, 1] per audited row and the
promise E[X] <= eps, each bet size lam in [0, 1/(eps - lo)) gives the wealth

    W_lam(n) = prod_i (1 + lam * (X_i - eps))

a nonnegative supermartingale while the promise holds. Their average over a fixed grid of bets is
one too, so by Ville's inequality P(ever avg W >= 1/alpha) <= alpha: looked at after every block,
forever, the test raises a false alarm with probability at most alpha. With X taking few values,
each W_lam depends only on the counts, not on the order rows arrive in, so blocks finishing out of
order (and retried ones, counted once) change nothing.

Two losses, as the two promises:
  agreement  X = 1 when early exit changed the full model's label (lo = 0);
  accuracy   X = exit wrong - full wrong on rows with a gold label (lo = -1): the accuracy lost.
Leaf module: math only. (stats.py holds the fixed-sample tests; the two may be folded together.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Bet sizes as fractions of the largest allowed one: spread geometrically, so the mixture has power
# both against a promise broken tenfold (large bets win fast) and one broken by a little (small bets).
BET_FRACTIONS = tuple(0.9 * 2.0 ** -k for k in range(10))


def log_wealth(counts: dict[float, int], eps: float, lo: float) -> float:
    """log of the mixture wealth avg_lam prod (1 + lam (x - eps))^count[x], x in [lo, 1]; 0 with no data."""
    logs = []
    for f in BET_FRACTIONS:
        lam = f / (eps - lo)  # 1 + lam (lo - eps) = 1 - f > 0: wealth never reaches 0
        logs.append(sum(n * math.log1p(lam * (x - eps)) for x, n in counts.items() if n))
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs) / len(logs))


def lower_bound(counts: dict[float, int], lo: float, alpha: float, tol: float = 1e-4) -> float:
    """Anytime-valid lower confidence bound on E[X]: the smallest m the betting test does not reject
    (bisection; the wealth falls as m grows). lo when nothing is rejected."""
    if log_wealth(counts, lo + tol, lo) < math.log(1 / alpha):
        return lo
    a, b = lo + tol, 1.0 - tol  # rejected at a, and (with any row below 1) not at b
    while b - a > tol:
        m = (a + b) / 2
        a, b = (m, b) if log_wealth(counts, m, lo) >= math.log(1 / alpha) else (a, m)
    return a


@dataclass
class OnlineAudit:
    """Counts of the audit so far and the decision: fit-free, updated per block with `add`.

    kind: the promise, "agreement" (counts of audited rows and changed labels) or "accuracy"
    (audited rows with a gold label: early exit wrong where full depth was right, and the reverse).
    gold: whether the input has gold labels. An accuracy promise over an input without them is
    checked on agreement only, and says so (`checks`). Which one is tested is fixed before the
    first look: switching as rows arrive would test two hypotheses on one alpha."""

    epsilon: float
    alpha: float = 0.05
    kind: str = "agreement"
    gold: bool = True
    audited: int = 0
    changed: int = 0
    with_gold: int = 0
    exit_only_wrong: int = 0  # early exit wrong, full depth right
    full_only_wrong: int = 0  # full depth wrong, early exit right
    broken_: bool = field(default=False)

    @property
    def checks(self) -> str:
        """What the test can check: accuracy needs gold labels; without them, agreement is checked."""
        return "accuracy" if self.kind == "accuracy" and self.gold else "agreement"

    def add(self, audited: int, changed: int, with_gold: int = 0, exit_only_wrong: int = 0,
            full_only_wrong: int = 0) -> bool:
        """One block's counts; returns whether the promise is now shown broken (it stays so)."""
        self.audited += audited
        self.changed += changed
        self.with_gold += with_gold
        self.exit_only_wrong += exit_only_wrong
        self.full_only_wrong += full_only_wrong
        if not self.broken_:
            counts, lo = self._counts()
            self.broken_ = log_wealth(counts, self.epsilon, lo) >= math.log(1 / self.alpha)
        return self.broken_

    def _counts(self) -> tuple[dict[float, int], float]:
        if self.checks == "accuracy":
            rest = self.with_gold - self.exit_only_wrong - self.full_only_wrong
            return {1.0: self.exit_only_wrong, -1.0: self.full_only_wrong, 0.0: rest}, -1.0
        return {1.0: self.changed, 0.0: self.audited - self.changed}, 0.0

    def lower_bound(self) -> float:
        """Anytime-valid lower bound on the changed share (or the accuracy lost) at 1 - alpha."""
        counts, lo = self._counts()
        return max(0.0, lower_bound(counts, lo, self.alpha))

    def to_dict(self) -> dict:
        rows = self.with_gold if self.checks == "accuracy" else self.audited
        loss = (self.exit_only_wrong - self.full_only_wrong) if self.checks == "accuracy" else self.changed
        return {"kind": self.kind, "checks": self.checks, "epsilon": self.epsilon, "alpha": self.alpha,
                "audited": self.audited, "changed": self.changed, "with_gold": self.with_gold,
                "exit_only_wrong": self.exit_only_wrong, "full_only_wrong": self.full_only_wrong,
                "observed": loss / rows if rows else None, "lower_bound": self.lower_bound() if rows else None,
                "broken": self.broken_}
