"""The exit policy: after each layer, should this item stop here?

An SVM (as in AdaInfer) reads three numbers per item and layer, [top_prob, gap, depth] with depth
= layers run / L, and is trained on "this layer's answer equals the full-depth answer". An item
stops after layer l (1-based) when l >= min_layer and the SVM's decision value >= threshold. The
threshold is chosen at calibration (see calibrate.py) to meet a stated agreement guarantee.

History. A policy may also read how the answer evolved over the layers before (`history=True`):
`streak`, for how many consecutive layers (ending at this one) the exit answer has held, over L;
and `dtop`, the top-1 probability minus its value `dtop_lag` layers back. Both come from the
same per-layer (label, top) the engine already reads, so they need no new head and no new
transfer; the engine reads features from layer 1 on so that the streak is counted from there.
A policy without history (every file written before) reads [top, gap, depth] as it always did.

Artifacts are data: a folder with `policy.json` (settings, metadata) and `arrays.safetensors`
(support vectors, coefficients, probe weights). Loading one never executes code.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import fsspec
import numpy as np

from adainfer_ray.features import FEATURE_MODES, LinearProbes

POLICY_JSON, POLICY_ARRAYS = "policy.json", "arrays.safetensors"
FORMAT_VERSION = 1
# Policies shipped in the package, one folder per (model id, built-in task): <model id>-<task name>/
SHIPPED_POLICIES = Path(__file__).parent / "data" / "policies"


class PolicyError(ValueError):
    pass


BASE_INPUTS, HISTORY_INPUTS = ("top", "gap", "depth"), ("top", "gap", "depth", "streak", "dtop")
DEFAULT_DTOP_LAG = 3


def exit_inputs(top_prob, gap, layers_run, num_layers, streak=None, dtop=None):
    """The rule's input rows [..., 3]: top-1 probability, top-1 minus top-2, relative depth; with
    history (streak [...] in layers, dtop [...]) [..., 5]: also streak / L and dtop."""
    depth = np.broadcast_to(np.asarray(layers_run, dtype=np.float64) / num_layers, np.shape(top_prob))
    cols = [np.asarray(top_prob, np.float64), np.asarray(gap, np.float64), depth]
    if streak is not None:
        cols += [np.asarray(streak, np.float64) / num_layers, np.asarray(dtop, np.float64)]
    return np.stack(cols, axis=-1)


def history_features(layer_labels: np.ndarray, top: np.ndarray, lag: int = DEFAULT_DTOP_LAG):
    """Per layer, from one mode's answers and top-1 probabilities [n, L] read from layer 1 on:
    streak [n, L] (consecutive layers ending here with this layer's answer, >= 1) and dtop [n, L]
    (top minus top `lag` layers back, or minus layer 1's top while fewer layers have run). The
    engine keeps the same two numbers per item as it goes (`engine._Item.remember`)."""
    n, L = layer_labels.shape
    streak = np.ones((n, L), np.int64)
    for col in range(1, L):
        streak[:, col] = np.where(layer_labels[:, col] == layer_labels[:, col - 1], streak[:, col - 1] + 1, 1)
    back = np.maximum(np.arange(L) - lag, 0)
    return streak, top - top[:, back]


class ExitPolicy:
    """Features -> stop/continue. `fit` on per-layer features of a calibration sample; `exit_mask` in the engine."""

    def __init__(self, features: str = "probe", kernel: str = "rbf", C: float = 1.0, gamma: float | str = "scale",
                 min_layer: int = 1, threshold: float = 0.0, max_train: int = 6000, random_state: int = 0,
                 history: bool = False, dtop_lag: int = DEFAULT_DTOP_LAG):
        if features not in FEATURE_MODES + ("none",):
            raise PolicyError(f"unknown feature mode {features!r}: choose from {FEATURE_MODES}")
        if kernel not in ("rbf", "linear"):
            raise PolicyError("kernel must be 'rbf' or 'linear'")
        self.features, self.kernel, self.C, self.gamma = features, kernel, C, gamma
        self.min_layer, self.threshold = min_layer, threshold
        self.max_train, self.random_state = max_train, random_state
        self.history, self.dtop_lag = bool(history), int(dtop_lag)
        self.probes_: LinearProbes | None = None
        self.metadata: dict = {}

    @classmethod
    def full_depth(cls, num_layers: int | None = None) -> "ExitPolicy":
        """The baseline: never stop early."""
        policy = cls(features="none")
        policy.num_layers_ = num_layers
        return policy

    @property
    def never_exits(self) -> bool:
        return self.features == "none"

    @property
    def inputs(self) -> tuple[str, ...]:
        """The names of the rule's inputs, in the order of exit_inputs' columns."""
        return HISTORY_INPUTS if self.history else BASE_INPUTS

    @property
    def first_read_layer(self) -> int:
        """The first layer after which the engine reads exit features: 1 with history (the streak
        counts from there), else min_layer. FLOPs of the exit heads count from here."""
        return 1 if self.history else self.min_layer

    # -- learning -------------------------------------------------------------------------------

    def fit(self, top_prob: np.ndarray, gap: np.ndarray, agrees: np.ndarray, layer_labels=None) -> "ExitPolicy":
        """top_prob, gap, agrees: [n, L] per item and layer (the last column, layer L, is ignored:
        there the answer is the full-depth answer by definition). agrees[i, l] = layer l+1's label
        equals item i's full-depth label. layer_labels [n, L]: each layer's answer (history only)."""
        from sklearn.svm import SVC

        n, L = top_prob.shape
        layers_run = np.arange(1, L + 1)
        hist = history_features(layer_labels, top_prob, self.dtop_lag) if self.history else (None, None)
        width = len(self.inputs)
        X = exit_inputs(top_prob, gap, layers_run, L, *hist)[:, self.min_layer - 1: L - 1].reshape(-1, width)
        y = agrees[:, self.min_layer - 1: L - 1].reshape(-1).astype(int)
        rng = np.random.default_rng(self.random_state)
        if len(y) > self.max_train:  # an RBF SVM is quadratic in its sample: a random subset is plenty for 3 features
            keep = rng.choice(len(y), self.max_train, replace=False)
            X, y = X[keep], y[keep]
        self.num_layers_ = L
        if len(np.unique(y)) < 2:  # every layer always agrees (or never does): a constant decision
            self.intercept_ = np.array([1.0 if y[0] == 1 else -1.0])
            self.kernel_, self.vectors_, self.dual_ = "constant", np.zeros((0, width)), np.zeros(0)
            return self
        svm = SVC(kernel=self.kernel, C=self.C, gamma=self.gamma).fit(X, y)
        self.kernel_ = self.kernel
        self.intercept_ = svm.intercept_.astype(np.float64)
        if self.kernel == "linear":
            self.vectors_, self.dual_ = svm.coef_.astype(np.float64), np.ones(1)
        else:
            self.vectors_, self.dual_ = svm.support_vectors_.astype(np.float64), svm.dual_coef_[0].astype(np.float64)
        self.gamma_ = float(svm._gamma)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """X [..., 3] (with history [..., 5]) -> decision values [...]: > 0 leans "this layer already agrees"."""
        X = np.asarray(X, np.float64)
        flat = X.reshape(-1, X.shape[-1])
        if self.kernel_ == "constant":
            out = np.full(len(flat), self.intercept_[0])
        elif self.kernel_ == "linear":
            out = flat @ self.vectors_[0] + self.intercept_[0]
        else:  # sum_j dual_j * exp(-gamma * |x - sv_j|^2) + b
            d2 = (flat**2).sum(1)[:, None] - 2 * flat @ self.vectors_.T + (self.vectors_**2).sum(1)[None, :]
            out = np.exp(-self.gamma_ * np.maximum(d2, 0)) @ self.dual_ + self.intercept_[0]
        return out.reshape(X.shape[:-1])

    # -- use ------------------------------------------------------------------------------------

    def exit_mask(self, layers_run: int, top_prob: np.ndarray, gap: np.ndarray, streak=None, dtop=None) -> np.ndarray:
        """Which of the items that just ran `layers_run` layers stop now (never at the last layer:
        there every item stops with the model's own answer). streak, dtop [B]: with history only."""
        n = len(top_prob)
        if self.never_exits or layers_run < self.min_layer or layers_run >= self.num_layers_:
            return np.zeros(n, dtype=bool)
        hist = (streak, dtop) if self.history else (None, None)
        return self.decision_function(exit_inputs(top_prob, gap, layers_run, self.num_layers_, *hist)) >= self.threshold

    def asks_at(self, layers_run: int) -> bool:
        """Does the policy decide after this many layers?"""
        return not self.never_exits and self.min_layer <= layers_run < self.num_layers_

    def reads_at(self, layers_run: int) -> bool:
        """Does the engine read exit features after this many layers? (else it skips them) Where
        the policy decides, and with history from layer 1 on too, to keep each item's streak."""
        return not self.never_exits and self.first_read_layer <= layers_run < self.num_layers_

    # -- artifacts ------------------------------------------------------------------------------

    def save(self, folder: str) -> str:
        """Write policy.json + arrays.safetensors into `folder`: a local path or any fsspec URI."""
        from safetensors.numpy import save

        arrays, settings = {}, {
            "format_version": FORMAT_VERSION, "features": self.features, "kernel": self.kernel,
            "C": self.C, "gamma": self.gamma, "min_layer": self.min_layer, "threshold": float(self.threshold),
            "num_layers": self.num_layers_, "metadata": self.metadata,
        }
        if self.history:  # written only with history: a policy without it keeps its old file
            settings.update(history=True, dtop_lag=self.dtop_lag)
        if not self.never_exits:
            settings.update(kernel_=self.kernel_, gamma_=getattr(self, "gamma_", None))
            arrays.update(vectors=self.vectors_, dual=self.dual_, intercept=self.intercept_)
        if self.probes_ is not None:
            arrays.update(probe_coef=self.probes_.coef_, probe_intercept=self.probes_.intercept_)
        fs, root = fsspec.core.url_to_fs(str(folder))
        fs.makedirs(root, exist_ok=True)
        with fs.open(posixpath.join(root, POLICY_ARRAYS), "wb") as f:
            f.write(save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
        with fs.open(posixpath.join(root, POLICY_JSON), "w") as f:  # last: its presence marks a whole policy
            f.write(json.dumps(settings, indent=2, default=_jsonable))
        return str(folder)

    @classmethod
    def load(cls, path) -> "ExitPolicy":
        """Load a policy folder (or its policy.json), local or fsspec URI. Plain JSON + safetensors:
        no code runs."""
        from safetensors.numpy import load

        fs, root = fsspec.core.url_to_fs(str(path))
        root = posixpath.dirname(root) if root.endswith(POLICY_JSON) else root
        try:
            with fs.open(posixpath.join(root, POLICY_JSON), "r") as f:
                settings = json.loads(f.read())
            arrays_path = posixpath.join(root, POLICY_ARRAYS)
            arrays = {}
            if fs.exists(arrays_path):
                with fs.open(arrays_path, "rb") as f:
                    arrays = load(f.read())
        except Exception as e:  # noqa: BLE001 - unreadable, not JSON, not safetensors (a pickle, say): all refused
            if isinstance(e, PolicyError):
                raise
            raise PolicyError(f"cannot read exit policy at {path}: {e}. "
                              "Pass a folder written by jobs/calibrate.py, `default`, or `full`.") from e
        if not isinstance(settings, dict) or settings.get("format_version") != FORMAT_VERSION:
            raise PolicyError(f"{path}: not an exit policy of format {FORMAT_VERSION}")
        try:
            policy = cls(features=settings["features"], kernel=settings["kernel"], C=settings["C"],
                         gamma=settings["gamma"], min_layer=settings["min_layer"], threshold=settings["threshold"],
                         history=settings.get("history", False), dtop_lag=settings.get("dtop_lag", DEFAULT_DTOP_LAG))
            policy.num_layers_, policy.metadata = settings["num_layers"], settings.get("metadata", {})
            if not policy.never_exits:
                policy.kernel_, policy.gamma_ = settings["kernel_"], settings.get("gamma_")
                policy.vectors_, policy.dual_, policy.intercept_ = arrays["vectors"], arrays["dual"], arrays["intercept"]
            if "probe_coef" in arrays:
                policy.probes_ = LinearProbes()
                policy.probes_.coef_, policy.probes_.intercept_ = arrays["probe_coef"], arrays["probe_intercept"]
        except (KeyError, TypeError) as e:
            raise PolicyError(f"cannot read exit policy at {path}: missing {e}. "
                              "Pass a folder written by jobs/calibrate.py, `default`, or `full`.") from e
        return policy

    @property
    def promise(self) -> dict | None:
        """The calibrated guarantee (epsilon, delta, sample size, expected layers skipped), if any."""
        m = self.metadata
        if self.never_exits or not m.get("guaranteed"):
            return None
        return {"promise": m.get("promise", "agreement"),
                "epsilon": m.get("epsilon"), "delta": m.get("delta"), "calibration_size": m.get("calibration_size"),
                "layers_skipped": m.get("layers_skipped"), "dtype": m.get("dtype"), "device": m.get("device")}

    def check_compatible(self, model_hash: str, task_fingerprint: str, num_layers: int):
        """Refuse a policy calibrated for other weights or another prompt format."""
        meta = self.metadata
        if self.never_exits:
            return
        if self.num_layers_ != num_layers:
            raise PolicyError(f"policy was made for a {self.num_layers_}-layer model; this model has {num_layers}")
        if meta.get("model_hash") and meta["model_hash"] != model_hash:
            raise PolicyError(f"policy was calibrated for model {meta.get('model_id')} ({meta['model_hash']}), "
                              f"not this one ({model_hash}): recalibrate with --calibrate N (or jobs/calibrate.py), or use --policy full")
        if meta.get("task_fingerprint") and meta["task_fingerprint"] != task_fingerprint:
            raise PolicyError(f"policy was calibrated for another prompt template/labels (task {meta.get('task')!r}, "
                              f"{meta['task_fingerprint']}); this run's is {task_fingerprint}: "
                              "recalibrate with --calibrate N (or jobs/calibrate.py), or use --policy full")


def shipped_policy_name(model_id: str, task_name: str, promise: str = "agreement") -> str:
    """The folder under data/policies that `--policy default` reads: <model>-<task>, with
    `-accuracy` for the policy calibrated under the accuracy promise."""
    return f"{model_id}-{task_name}" + ("-accuracy" if promise == "accuracy" else "")


def find_policy(spec: str, model_id: str, task_name: str, promise: str = "agreement") -> ExitPolicy:
    """The one place a --policy value becomes a policy: `full`, `default` (shipped for the default
    model and the built-in tasks, under `promise`), or a folder / fsspec URI written by calibration."""
    if spec == "full":
        return ExitPolicy.full_depth()
    if spec == "default":
        folder = SHIPPED_POLICIES / shipped_policy_name(model_id, task_name, promise)
        if not (folder / POLICY_JSON).exists():
            which = "accuracy-promise exit policy" if promise == "accuracy" else "exit policy"
            raise PolicyError(f"no {which} ships for model {model_id!r} and task {task_name!r}: "
                              "pass --calibrate N to calibrate one on N rows of this corpus inside the run"
                              + (", --promise agreement," if promise == "accuracy" else "")
                              + " or --policy full for no early exit")
        return ExitPolicy.load(folder)
    return ExitPolicy.load(spec)


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x)}")
