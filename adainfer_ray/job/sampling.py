"""Seeded samples that need no state: a number in [0, 1) per id fixed by (salt, id), so the same
rows are audited, or drawn for calibration, in every run, on every retry and on every actor."""

from __future__ import annotations

import hashlib

import numpy as np


def uniform_keys(ids, salt: str) -> np.ndarray:
    """[n] floats in [0, 1), uniform and fixed by (salt, id)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{salt}:{i}".encode(), digest_size=8).digest(), "big") / 2**64
                     for i in ids])


def audit_mask(ids, fraction: float, seed: int) -> np.ndarray:
    """[n] bools: the rows also run on to full depth (the audit)."""
    if fraction <= 0:
        return np.zeros(len(ids), bool)
    return uniform_keys(ids, f"{seed}") < fraction


def corpus_audit_rate(cfg, rows: int) -> float:
    """The share of a `rows`-row corpus the job audits: --audit-fraction, or enough for --audit-rows;
    none at all with --audit-fraction 0 (one flag turns the audit off: --audit-rows is its floor only
    while it is on)."""
    if cfg.audit_fraction <= 0:
        return 0.0
    return max(cfg.audit_fraction, min(1.0, cfg.audit_rows / max(1, rows)))


def calibration_keys(ids, seed: int) -> np.ndarray:
    """[n] keys that draw the --calibrate sample: the N rows with the smallest keys."""
    return uniform_keys(ids, f"calibrate:{seed}")
