"""Drift of the logged predictions: is the model still seeing what it was tested on, and is it still right?

A *window* is the model server's prediction log (``predictions*.jsonl``, rotated files too) over the last
``monitor.window_hours``, one model version, at most ``monitor.max_rows`` rows; the *reference* is the same
columns for the champion's test split, scored by the shipped model at registration, with its true labels in
``true_label``. ``detect_drift(reference, window, cfg)`` compares them and returns a small frozen
``DriftReport``; ``write_report`` writes ``drift-report.md``, ``drift-report.json`` and the plots. Plain functions, no
Prefect and no MLflow, so a flow, the CLI and the tests call the same code.

The checks, and what each answers:

* ``predicted_labels``: chi-square test of the predicted-label counts; score = PSI of the label shares.
* ``confidence``: two-sample KS test of the top probability; the mean shift and the share below
  ``low_confidence`` are reported beside it.
* ``text_length`` and ``unknown_share``: KS tests of the characters per text and the share of unknown tokens.
* ``embedding_classifier``: a domain classifier (logistic regression) told to tell reference rows from window
  rows on the 32-float embeddings (NannyML's domain classifier); score = its ROC AUC on rows held out of the
  fit (``classifier_holdout`` of each side). Given the fit, the held-out scores of both sides are independent
  draws from one distribution when nothing drifted, so that AUC is a Mann-Whitney U / (nm) and its one-sided
  Mann-Whitney p-value is exact: no refit per permutation is needed. (A cross-validated AUC with the same
  closed-form null alarmed about five times too often: its folds' models are fitted on each other's rows.)
* ``embedding_mmd``: maximum mean discrepancy (unbiased MMD^2, RBF kernel, bandwidth by the median heuristic of
  the pooled distances, Gretton et al. 2012) with a permutation p-value (``permutations`` relabellings,
  p = (1 + #{MMD^2_perm >= MMD^2}) / (1 + permutations)).
* ``estimated_accuracy``: confidence-based performance estimation (NannyML's CBPE). Each class's probability
  is calibrated one-vs-rest on the reference by isotonic regression (then renormalised); the expected accuracy
  is the mean calibrated probability of the predicted class and the expected macro-F1 is built from expected
  confusion counts (TP_k = sum of p_k over rows predicted k, FP_k = sum of 1 - p_k over them, FN_k = sum of
  p_k over rows predicted otherwise). Flagged when it falls more than ``accuracy_drop_margin`` below the
  reference's real accuracy by more than ``accuracy_drop_margin`` and a one-sided z-test (the estimate's and
  the reference accuracy's standard errors) rejects "no drop".
* ``feedback_accuracy``: real accuracy and macro-F1 on window rows whose feedback label arrived (joined by
  ``request_id`` to the one logged text it names, ``langops.prediction_records.LoggedTexts``; an id that names
  several, reused by clients in logs written before the server issued its own ids, is left out and counted),
  judged once ``min_feedback_rows`` have: flagged when it is more than the margin below the reference's and a
  one-sided binomial test rejects "as accurate as the reference".

False alarms: every test with a p-value (six on the inputs and outputs, two on accuracy) is corrected with
the others (Holm by default, or Bonferroni), so on
windows without drift the chance that any of them alarms is at most ``alpha``. A test flags drift only when
its corrected p-value is at most ``alpha`` *and* its score reaches a floor; floors are calibrated on windows
without drift (``benchmarks/monitoring.py --calibrate``: the 95th percentile of each score over 1000-row
windows of demo tickets, rounded up), so a large window does not alarm on a shift smaller than a 1000-row
window's own noise. The floors never raise the false alarm rate (a flag needs the corrected p-value too);
they trade a little power on large windows for alarms that matter.

Why no library: Alibi Detect (MMD, classifier drift) needs numpy<2 and pandas<2.3 and would downgrade
transformers; NannyML (CBPE, domain classifier) and Evidently (embedding drift) install beside the pinned stack
but bring 25-30 packages each (NannyML: xgboost, lightgbm, FLAML, gcsfs/s3fs, a telemetry client; Evidently:
litestar, uvloop, nltk, statsmodels, plotly) for what is here a few hundred lines of scipy and scikit-learn,
and NannyML's domain classifier (LightGBM) and CBPE want its own chunked data model. The methods follow
their definitions (cited above) so a later switch is a drop-in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from langops.config import MonitorConfig
from langops.prediction_records import LoggedLine, LoggedTexts, Logs, as_logs, read_records

TRUE_LABEL = "true_label"  # the feedback label joined onto a window, and the reference's real label
ISSUED = "issued_id"  # read from a record with client_request_id: its request_id is the server's own
ID_COLUMNS = ("client_request_id", ISSUED)  # optional in a record (logs before issued ids lack both)
EMBEDDING_DIM = 32
REQUIRED: dict[str, tuple[type, ...]] = {
    "time": (str,),
    "request_id": (str,),
    "endpoint": (str,),
    "model_name": (str,),
    "version": (str,),
    "label": (str,),
    "confidence": (float, int),
    "probabilities": (dict,),
    "text_chars": (int,),
    "tokens": (int,),
    "unknown_share": (float, int),
    "embedding": (list,),
}
COLUMNS = tuple(REQUIRED)
TESTED = ("predicted_labels", "confidence", "text_length", "unknown_share", "embedding_classifier",
          "embedding_mmd")
Verdict = Literal["ok", "drift", "no_verdict"]


# --------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedWindow:
    """The rows of one window and what reading them found."""

    frame: pd.DataFrame
    source: str  # the log folder or the store it was read from
    lines: int
    skipped_lines: int
    skipped_examples: tuple[str, ...]
    start: datetime
    end: datetime
    ambiguous_feedback: int = 0  # feedback ids left out: each names several logged texts
    ambiguous_examples: tuple[tuple[str, int], ...] = ()  # a few of them, with how many texts each names


def read_prediction_logs(lines: Iterable[LoggedLine]) -> tuple[pd.DataFrame, int, int, tuple[str, ...]]:
    """Parse prediction log lines; a corrupt or incomplete line is skipped and counted, never fatal.

    Returns:
        (frame with ``COLUMNS``, ``ID_COLUMNS`` and any ``text``/``text_sha256``, lines read, lines skipped, a
        few skipped lines' reasons).
    """
    rows: list[dict[str, Any]] = []
    lines_read = skipped = 0
    examples: list[str] = []
    for logged in lines:
        lines_read += 1
        reason = None
        try:
            record = json.loads(logged.line)
            reason = _problem(record)
        except json.JSONDecodeError as error:
            reason = f"not JSON ({error.msg})"
        if reason is None:
            record[ISSUED] = "client_request_id" in record
            rows.append(record)
        else:
            skipped += 1
            if len(examples) < 5:
                examples.append(f"{logged.where}: {reason}")
    frame = pd.DataFrame(rows, columns=[*COLUMNS, *ID_COLUMNS, *_optional(rows)])
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
    frame["confidence"] = frame["confidence"].astype(float)
    frame["unknown_share"] = frame["unknown_share"].astype(float)
    return frame, lines_read, skipped, tuple(examples)


def _optional(rows: list[dict[str, Any]]) -> list[str]:
    return [name for name in ("text", "text_sha256") if any(name in row for row in rows[:1000])]


def _problem(record: Any) -> str | None:
    """Why a parsed record cannot be used, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key, types in REQUIRED.items():
        value = record.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            return f"{key} missing or not {types[0].__name__}"
    if len(record["embedding"]) != EMBEDDING_DIM:
        return f"embedding has {len(record['embedding'])} values, not {EMBEDDING_DIM}"
    try:
        datetime.fromisoformat(record["time"])
    except ValueError:
        return "time is not ISO-8601"
    return None


def read_feedback(lines: Iterable[LoggedLine]) -> pd.DataFrame:
    """Feedback rows ``{"request_id", "label", "time"}`` from feedback log lines."""
    rows = [record for record in read_records(lines)
            if isinstance(record.get("request_id"), str) and isinstance(record.get("label"), str)]
    return pd.DataFrame(rows, columns=["request_id", "label", "time"])


@dataclass(frozen=True)
class FeedbackMatch:
    """Feedback joined to logged rows: a label per row, and the ids that named no row or several."""

    labels: pd.Series  # the true label of each row (None where no feedback names it alone)
    unmatched: int
    ambiguous: dict[str, int]  # id -> how many rows it names: left out, never joined to one of them


def match_feedback(frame: pd.DataFrame, feedback: pd.DataFrame) -> FeedbackMatch:
    """Join each feedback id to the one row of ``frame`` it names (``LoggedTexts``); the latest label wins.

    An id that names several rows (a client's id reused in logs written before the server issued its own)
    is left out and counted; so is one that names none. Ambiguity is judged among ``frame``'s rows: give it
    the whole log, not a window cut from it.
    """
    logged = LoggedTexts()
    clients = frame["client_request_id"] if "client_request_id" in frame else pd.Series(None, index=frame.index)
    issued = frame[ISSUED] if ISSUED in frame else pd.Series(False, index=frame.index)
    for record_id, client, own in zip(frame["request_id"], clients, issued, strict=True):
        logged.add(record_id if isinstance(record_id, str) else None, client if isinstance(client, str) else None,
                   issued=bool(own) if isinstance(own, bool | np.bool_) else False)
    joined: dict[int, str] = {}
    unmatched, ambiguous = 0, {}
    if not feedback.empty:
        times = pd.to_datetime(feedback["time"], utc=True, errors="coerce", format="ISO8601")
        latest = feedback.assign(_t=times).sort_values("_t", kind="stable").drop_duplicates("request_id", keep="last")
        for name, label in zip(latest["request_id"], latest["label"], strict=True):  # oldest first
            found = logged.find(name)
            if not found:
                unmatched += 1
            elif len(found) > 1:
                ambiguous[name] = len(found)
            else:
                joined.pop(found[0], None)
                joined[found[0]] = label
    labels = np.full(len(frame), None, dtype=object)
    for position, label in joined.items():
        labels[position] = label
    return FeedbackMatch(labels=pd.Series(labels, index=frame.index, dtype=object), unmatched=unmatched,
                         ambiguous=ambiguous)


def join_feedback(window: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """``window`` with ``true_label`` from ``feedback`` (``match_feedback``: the latest label of the one row an
    id names; None elsewhere)."""
    return window.assign(**{TRUE_LABEL: match_feedback(window, feedback).labels})


def load_window(
    logs: Logs | Path,
    cfg: MonitorConfig,
    *,
    now: datetime | None = None,
    version: str | None = None,
    model_name: str | None = None,
    feedback: pd.DataFrame | None = None,
) -> LoadedWindow:
    """The window the monitor judges: the last ``window_hours`` of the logs, one version, newest ``max_rows``.

    Args:
        logs: the server's prediction log: its folder (``predictions*.jsonl`` and their rotations), or the
            fleet's store.
        cfg: the ``monitor`` section.
        now: the window's end (default: the current UTC time).
        version: keep this model version only (default: every version in the window).
        model_name: keep this registered model only.
        feedback: ``read_feedback`` rows to join into ``true_label`` (``match_feedback``, over the whole log,
            so an id that names several logged texts is left out even when only one is in the window).

    Returns:
        A ``LoadedWindow`` with the rows sorted by time, the count of corrupt lines skipped and of feedback ids
        left out as ambiguous.
    """
    end = now or datetime.now(timezone.utc)
    start = end - timedelta(hours=cfg.window_hours)
    logs = as_logs(logs)
    frame, lines, skipped, examples = read_prediction_logs(logs.prediction_lines())
    match = match_feedback(frame, feedback if feedback is not None else pd.DataFrame(columns=["request_id", "label",
                                                                                              "time"]))
    frame = frame.assign(**{TRUE_LABEL: match.labels})
    keep = (frame["time"] > pd.Timestamp(start)) & (frame["time"] <= pd.Timestamp(end))
    if version is not None:
        keep &= frame["version"] == version
    if model_name is not None:
        keep &= frame["model_name"] == model_name
    frame = frame[keep].sort_values("time", kind="stable").tail(cfg.max_rows).reset_index(drop=True)
    return LoadedWindow(frame=frame, source=str(logs), lines=lines, skipped_lines=skipped,
                        skipped_examples=examples, start=start, end=end, ambiguous_feedback=len(match.ambiguous),
                        ambiguous_examples=tuple(list(match.ambiguous.items())[:5]))


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Check:
    """One check: its score, the floor the score must reach, its p-value (corrected) and the verdict."""

    name: str
    score: float
    threshold: float
    drifted: bool
    p_value: float | None = None  # corrected for the number of tests (Holm or Bonferroni)
    raw_p_value: float | None = None
    judged: bool = True  # False: not enough rows (feedback) or no data for it; never drifted then
    details: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Histogram:
    """Counts of one column for the reference and the window over shared bin edges (for the plots)."""

    edges: tuple[float, ...]
    reference: tuple[int, ...]
    current: tuple[int, ...]


@dataclass(frozen=True)
class DriftReport:
    """The monitor's answer for one window."""

    verdict: Verdict
    reasons: tuple[str, ...]
    rows: int
    reference_rows: int
    start: str | None
    end: str | None
    versions: tuple[str, ...]
    alpha: float
    correction: str
    checks: tuple[Check, ...]
    histograms: dict[str, Histogram] = field(default_factory=dict)
    skipped_lines: int = 0
    ambiguous_feedback: int = 0  # feedback ids left out of the join: each names several logged texts

    def check(self, name: str) -> Check:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no check {name!r}; the checks are {[c.name for c in self.checks]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: what a flow logs, publishes or turns into an event."""
        return _jsonable(asdict(self))

    def to_markdown(self, heading: str = "Monitoring") -> str:
        """The report for people: the verdict and its reasons first, then every check."""
        title = {"ok": "OK: no drift", "drift": "DRIFT", "no_verdict": "No verdict"}[self.verdict]
        lines = [f"# {heading}: {title}", ""]
        span = f"{self.start} to {self.end}" if self.start else "no rows"
        lines += [f"- window: {self.rows} rows, {span}, versions {', '.join(self.versions) or '-'}",
                  f"- reference: {self.reference_rows} rows",
                  f"- tests corrected by {self.correction} for a family-wise false alarm rate of {self.alpha:g}"]
        if self.skipped_lines:
            lines.append(f"- corrupt log lines skipped: {self.skipped_lines}")
        if self.ambiguous_feedback:
            lines.append(f"- feedback left out: {self.ambiguous_feedback} ids each name more than one logged text "
                         "(a client's id reused before the server issued its own); feedback must name the issued id")
        lines += ["", "## Reasons", ""] + [f"- {reason}" for reason in self.reasons]
        if self.checks:
            lines += ["", "## Checks", "", "| check | score | floor | p (corrected) | drift | details |",
                      "|---|---|---|---|---|---|"]
            for c in self.checks:
                p = "-" if c.p_value is None else f"{c.p_value:.3g}"
                flag = "**yes**" if c.drifted else ("no" if c.judged else "not judged")
                details = ", ".join(f"{k} {v:.4g}" for k, v in c.details.items())
                if c.note:
                    details = f"{details}; {c.note}" if details else c.note
                lines.append(f"| {c.name} | {c.score:.4g} | {c.threshold:.4g} | {p} | {flag} | {details} |")
        return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


# --------------------------------------------------------------------------------------------- checks


def probability_matrix(frame: pd.DataFrame, labels: Sequence[str]) -> np.ndarray:
    """Rows x ``labels`` from the ``probabilities`` dicts (a label a row lacks counts 0)."""
    return np.array([[row.get(label, 0.0) for label in labels] for row in frame["probabilities"]], dtype=float)


def embedding_matrix(frame: pd.DataFrame) -> np.ndarray:
    return np.asarray(frame["embedding"].tolist(), dtype=float).reshape(len(frame), -1)


def population_stability_index(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """PSI of two share vectors: sum((a - e) * ln(a / e)), shares clipped at ``eps`` so empty bins stay finite."""
    e = np.clip(expected / max(expected.sum(), 1), eps, None)
    a = np.clip(actual / max(actual.sum(), 1), eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def check_predicted_labels(reference: pd.DataFrame, current: pd.DataFrame, labels: Sequence[str],
                           cfg: MonitorConfig) -> Check:
    """Chi-square test of the predicted-label counts against the reference; score = PSI of the shares."""
    from scipy.stats import chi2_contingency

    ref = reference["label"].value_counts().reindex(labels, fill_value=0).to_numpy()
    cur = current["label"].value_counts().reindex(labels, fill_value=0).to_numpy()
    table = np.vstack([ref, cur])
    table = table[:, table.sum(axis=0) > 0]
    p = float(chi2_contingency(table).pvalue) if table.shape[1] > 1 else 1.0
    psi = population_stability_index(ref.astype(float), cur.astype(float))
    details = {f"share_{label}": float(c / max(cur.sum(), 1)) for label, c in zip(labels, cur, strict=True)}
    return Check("predicted_labels", psi, cfg.label_psi_floor, False, raw_p_value=p, details=details)


def _ks(name: str, ref: np.ndarray, cur: np.ndarray, floor: float, details: dict[str, float] | None = None) -> Check:
    from scipy.stats import ks_2samp

    result = ks_2samp(ref, cur)
    return Check(name, float(result.statistic), floor, False, raw_p_value=float(result.pvalue),
                 details=details or {})


def check_confidence(reference: pd.DataFrame, current: pd.DataFrame, cfg: MonitorConfig) -> Check:
    """KS test of the top probability; the mean shift and the low-confidence shares come along."""
    ref, cur = reference["confidence"].to_numpy(float), current["confidence"].to_numpy(float)
    details = {
        "mean_reference": float(ref.mean()),
        "mean_current": float(cur.mean()),
        "mean_shift": float(cur.mean() - ref.mean()),
        "low_share_reference": float((ref < cfg.low_confidence).mean()),
        "low_share_current": float((cur < cfg.low_confidence).mean()),
        "psi": population_stability_index(*_binned(ref, cur, cfg.psi_bins)),
    }
    return _ks("confidence", ref, cur, cfg.confidence_ks_floor, details)


def _binned(ref: np.ndarray, cur: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of both over the reference's quantile bins (for PSI)."""
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    return (np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1).astype(float),
            np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1).astype(float))


def check_text_length(reference: pd.DataFrame, current: pd.DataFrame, cfg: MonitorConfig) -> Check:
    ref, cur = reference["text_chars"].to_numpy(float), current["text_chars"].to_numpy(float)
    return _ks("text_length", ref, cur, cfg.length_ks_floor,
               {"median_reference": float(np.median(ref)), "median_current": float(np.median(cur))})


def check_unknown_share(reference: pd.DataFrame, current: pd.DataFrame, cfg: MonitorConfig) -> Check:
    ref, cur = reference["unknown_share"].to_numpy(float), current["unknown_share"].to_numpy(float)
    return _ks("unknown_share", ref, cur, cfg.unknown_ks_floor,
               {"mean_reference": float(ref.mean()), "mean_current": float(cur.mean()),
                "any_unknown_current": float((cur > 0).mean())})


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[rng.choice(len(x), n, replace=False)]


def check_embedding_classifier(ref_emb: np.ndarray, cur_emb: np.ndarray, cfg: MonitorConfig) -> Check:
    """Domain classifier: ROC AUC of reference vs window on held-out rows; p-value from Mann-Whitney's test.

    The classifier is fitted on part of each side and scores only the rows it never saw
    (``classifier_holdout`` of each side). Given the fit, the held-out rows' scores are independent draws, and
    without drift those of both sides come from one distribution: the held-out AUC is then exactly a
    Mann-Whitney U / (n m) under its own null, whatever the fit learnt, so its one-sided p-value (exact for
    small samples, normal with tie correction otherwise) is valid. A cross-validated AUC is not: its folds'
    models are fitted on each other's rows, which makes its spread wider than the Mann-Whitney null's and
    gave false alarms more often than the p-value said.
    """
    from scipy.stats import mannwhitneyu
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(cfg.seed)
    ref = _subsample(ref_emb, cfg.classifier_max_rows, rng)
    cur = _subsample(cur_emb, cfg.classifier_max_rows, rng)
    x = np.vstack([ref, cur])
    y = np.r_[np.zeros(len(ref)), np.ones(len(cur))]
    x_fit, x_held, y_fit, y_held = train_test_split(x, y, test_size=cfg.classifier_holdout, stratify=y,
                                                    random_state=cfg.seed)
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=500).fit(x_fit, y_fit)
    scores = model.decision_function(x_held)
    held_cur, held_ref = scores[y_held == 1], scores[y_held == 0]
    result = mannwhitneyu(held_cur, held_ref, alternative="greater")
    n, m = len(held_ref), len(held_cur)
    auc = float(result.statistic) / (n * m)  # U of the window's scores over the reference's = the held-out AUC
    return Check("embedding_classifier", auc, cfg.classifier_auc_floor, False, raw_p_value=float(result.pvalue),
                 details={"null_sd": math.sqrt((n + m + 1) / (12 * n * m)), "rows_reference": float(n),
                          "rows_current": float(m)},
                 note="AUC on held-out rows")


def check_embedding_mmd(ref_emb: np.ndarray, cur_emb: np.ndarray, cfg: MonitorConfig) -> Check:
    """Unbiased MMD^2 with an RBF kernel (median-heuristic bandwidth) and a permutation p-value."""
    rng = np.random.default_rng(cfg.seed + 1)
    x = _subsample(ref_emb, cfg.mmd_max_rows, rng)
    y = _subsample(cur_emb, cfg.mmd_max_rows, rng)
    z = np.vstack([x, y])
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    upper = d2[np.triu_indices(len(z), k=1)]
    bandwidth2 = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    kernel = np.exp(-d2 / bandwidth2)  # k = exp(-d^2 / (2 s^2)) with 2 s^2 = median d^2
    n, m = len(x), len(y)
    side = np.zeros((len(z), cfg.permutations + 1))
    side[:n, 0] = 1.0
    for j in range(1, cfg.permutations + 1):
        side[rng.permutation(len(z))[:n], j] = 1.0
    stats = _mmd2(kernel, side, n, m)
    observed, null = stats[0], stats[1:]
    p = float((1 + np.sum(null >= observed)) / (1 + len(null)))
    return Check("embedding_mmd", float(observed), cfg.mmd_floor, False, raw_p_value=p,
                 details={"bandwidth": math.sqrt(bandwidth2 / 2), "null_p95": float(np.quantile(null, 0.95))})


def _mmd2(kernel: np.ndarray, side: np.ndarray, n: int, m: int) -> np.ndarray:
    """Unbiased MMD^2 for each column of ``side`` (1 = first sample), all at once by matrix products."""
    other = 1.0 - side
    k_side = kernel @ side
    k_other = kernel @ other
    diag = np.trace(kernel) / len(kernel)  # RBF: every k(x, x) is 1
    xx = (np.sum(side * k_side, axis=0) - n * diag) / (n * (n - 1))
    yy = (np.sum(other * k_other, axis=0) - m * diag) / (m * (m - 1))
    xy = np.sum(side * k_other, axis=0) / (n * m)
    return xx + yy - 2 * xy


@dataclass(frozen=True)
class Calibrator:
    """Per-class isotonic maps from the reference (probability -> chance the class is right), as in CBPE."""

    labels: tuple[str, ...]
    maps: tuple[Any, ...]

    def apply(self, probs: np.ndarray) -> np.ndarray:
        if not self.maps:
            return probs
        out = np.column_stack([f.predict(probs[:, k]) for k, f in enumerate(self.maps)])
        total = out.sum(axis=1, keepdims=True)
        return np.where(total > 0, out / np.where(total > 0, total, 1), probs)


def fit_calibrator(probs: np.ndarray, y_true: np.ndarray, labels: Sequence[str]) -> Calibrator:
    """Isotonic regression of each class's one-vs-rest correctness on its probability (the reference's)."""
    from sklearn.isotonic import IsotonicRegression

    maps = []
    for k in range(len(labels)):
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(probs[:, k], (y_true == k).astype(float))
        maps.append(iso)
    return Calibrator(tuple(labels), tuple(maps))


def expected_metrics(probs: np.ndarray) -> tuple[float, float]:
    """CBPE: expected accuracy and macro-F1 of argmax predictions whose probabilities are calibrated."""
    pred = probs.argmax(axis=1)
    accuracy = float(probs[np.arange(len(probs)), pred].mean())
    f1s = []
    for k in range(probs.shape[1]):
        chosen = pred == k
        tp = probs[chosen, k].sum()
        fp = (1 - probs[chosen, k]).sum()
        fn = probs[~chosen, k].sum()
        if tp + fp + fn > 0:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return accuracy, float(np.mean(f1s)) if f1s else float("nan")


def _label_ids(values: pd.Series, labels: Sequence[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return values.map(lambda v: index.get(v, -1)).to_numpy(int)


def real_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> tuple[float, float]:
    """Accuracy and macro-F1 (over the classes present in truth or prediction); a label unknown to the model is
    wrong."""
    from sklearn.metrics import f1_score

    accuracy = float(np.mean(y_true == y_pred))
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    return accuracy, float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))


def check_estimated_accuracy(ref_probs: np.ndarray, cur_probs: np.ndarray, ref_true: np.ndarray | None,
                             labels: Sequence[str], cfg: MonitorConfig) -> Check:
    """CBPE's expected accuracy of the window vs the reference's real accuracy; drifted past the margin."""
    if ref_true is None or (ref_true >= 0).sum() < 2:
        return Check("estimated_accuracy", float("nan"), cfg.accuracy_drop_margin, False, judged=False,
                     note="the reference has no true labels")
    known = ref_true >= 0
    calibrator = fit_calibrator(ref_probs[known], ref_true[known], labels)
    ref_accuracy, ref_f1 = real_metrics(ref_true, ref_probs.argmax(axis=1), len(labels))
    calibrated = calibrator.apply(cur_probs)
    est_accuracy, est_f1 = expected_metrics(calibrated)
    drop = ref_accuracy - est_accuracy
    # one-sided z-test of "no drop": the estimate's and the reference accuracy's standard errors together
    se = math.sqrt(calibrated.max(axis=1).var() / len(calibrated) + ref_accuracy * (1 - ref_accuracy) / known.sum())
    from scipy.stats import norm

    p = float(norm.sf(drop / se)) if se > 0 else float(drop <= 0)
    return Check("estimated_accuracy", drop, cfg.accuracy_drop_margin, False, raw_p_value=p,
                 details={"estimated_accuracy": est_accuracy, "estimated_macro_f1": est_f1,
                          "reference_accuracy": ref_accuracy, "reference_macro_f1": ref_f1,
                          "raw_mean_confidence": float(cur_probs.max(axis=1).mean())},
                 note="score = reference accuracy - estimated accuracy")


def check_feedback_accuracy(current: pd.DataFrame, cur_probs: np.ndarray, reference_accuracy: float | None,
                            labels: Sequence[str], cfg: MonitorConfig) -> Check:
    """Real accuracy and macro-F1 on the window rows whose feedback label arrived."""
    if TRUE_LABEL not in current:
        has = np.zeros(len(current), dtype=bool)
    else:
        has = current[TRUE_LABEL].notna().to_numpy()
    count = int(has.sum())
    if count == 0:
        return Check("feedback_accuracy", float("nan"), cfg.accuracy_drop_margin, False, judged=False,
                     details={"rows": 0.0}, note="no feedback labels in the window")
    y_true = _label_ids(current.loc[has, TRUE_LABEL], labels)
    accuracy, f1 = real_metrics(y_true, cur_probs[has].argmax(axis=1), len(labels))
    details = {"rows": float(count), "accuracy": accuracy, "macro_f1": f1}
    if reference_accuracy is None or math.isnan(reference_accuracy):
        return Check("feedback_accuracy", float("nan"), cfg.accuracy_drop_margin, False, judged=False,
                     details=details, note="no reference accuracy to compare with")
    drop = reference_accuracy - accuracy
    judged = count >= cfg.min_feedback_rows
    from scipy.stats import binomtest

    correct = round(accuracy * count)
    p = float(binomtest(correct, count, min(max(reference_accuracy, 1e-9), 1 - 1e-9), alternative="less").pvalue)
    return Check("feedback_accuracy", drop, cfg.accuracy_drop_margin, False, raw_p_value=p if judged else None,
                 judged=judged, details=details,
                 note="" if judged else f"{count} feedback labels, {cfg.min_feedback_rows} needed")


def adjust_p_values(p_values: Sequence[float], method: str) -> list[float]:
    """Holm's step-down or Bonferroni adjusted p-values (reject where adjusted <= alpha); both bound the FWER."""
    m = len(p_values)
    if method == "bonferroni":
        return [min(1.0, p * m) for p in p_values]
    order = np.argsort(p_values, kind="stable")
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _histogram(ref: np.ndarray, cur: np.ndarray, edges: np.ndarray) -> Histogram:
    return Histogram(tuple(float(e) for e in edges), tuple(int(c) for c in np.histogram(ref, edges)[0]),
                     tuple(int(c) for c in np.histogram(cur, edges)[0]))


def _histograms(reference: pd.DataFrame, current: pd.DataFrame) -> dict[str, Histogram]:
    length_top = float(np.quantile(np.r_[reference["text_chars"], current["text_chars"]], 0.99)) or 1.0
    return {
        "confidence": _histogram(reference["confidence"].to_numpy(float), current["confidence"].to_numpy(float),
                                 np.linspace(0, 1, 26)),
        "text_length": _histogram(np.minimum(reference["text_chars"].to_numpy(float), length_top),
                                  np.minimum(current["text_chars"].to_numpy(float), length_top),
                                  np.linspace(0, length_top, 31)),
    }


# --------------------------------------------------------------------------------------------- the monitor


def detect_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    cfg: MonitorConfig,
    *,
    labels: Sequence[str] | None = None,
    skipped_lines: int = 0,
    ambiguous_feedback: int = 0,
) -> DriftReport:
    """Compare a window of logged predictions with the reference and give one verdict.

    Args:
        reference: the shipped model's predictions on the champion's test split (``COLUMNS``), with the real
            label in ``true_label`` (without it the accuracy estimate is skipped).
        current: the window (``load_window(...).frame``); ``true_label`` where feedback arrived.
        cfg: the ``monitor`` section.
        labels: the model's labels in probability order (default: the reference's probability keys).
        skipped_lines: corrupt log lines ``load_window`` skipped, carried into the report.
        ambiguous_feedback: feedback ids ``load_window`` left out as ambiguous, carried into the report.

    Returns:
        A ``DriftReport``: ``no_verdict`` below ``cfg.min_rows`` rows, else ``drift`` when any check flagged,
        else ``ok``; every reason spelled out.
    """
    labels = list(labels or reference["probabilities"].iloc[0].keys())
    times = current["time"] if len(current) else pd.Series([], dtype="datetime64[ns, UTC]")
    span = (times.min().isoformat(), times.max().isoformat()) if len(current) else (None, None)
    base = {"rows": len(current), "reference_rows": len(reference), "start": span[0], "end": span[1],
                "versions": tuple(sorted(current["version"].unique())) if len(current) else (),
                "alpha": cfg.alpha, "correction": cfg.correction, "skipped_lines": skipped_lines,
                "ambiguous_feedback": ambiguous_feedback}
    if len(current) < cfg.min_rows:
        reason = f"{len(current)} rows in the window, {cfg.min_rows} needed for a verdict"
        return DriftReport(verdict="no_verdict", reasons=(reason,), checks=(), **base)
    ref_emb, cur_emb = embedding_matrix(reference), embedding_matrix(current)
    tested = [
        check_predicted_labels(reference, current, labels, cfg),
        check_confidence(reference, current, cfg),
        check_text_length(reference, current, cfg),
        check_unknown_share(reference, current, cfg),
        check_embedding_classifier(ref_emb, cur_emb, cfg),
        check_embedding_mmd(ref_emb, cur_emb, cfg),
    ]
    ref_probs, cur_probs = probability_matrix(reference, labels), probability_matrix(current, labels)
    ref_true = _label_ids(reference[TRUE_LABEL], labels) if TRUE_LABEL in reference else None
    estimated = check_estimated_accuracy(ref_probs, cur_probs, ref_true, labels, cfg)
    ref_accuracy = estimated.details.get("reference_accuracy")
    feedback = check_feedback_accuracy(current, cur_probs, ref_accuracy, labels, cfg)
    checks = [*tested, estimated, feedback]
    family = [i for i, c in enumerate(checks) if c.raw_p_value is not None]  # every check judged by a test
    adjusted = adjust_p_values([checks[i].raw_p_value for i in family], cfg.correction)  # type: ignore[misc]
    for i, p in zip(family, adjusted, strict=True):
        checks[i] = _decide(checks[i], p, cfg.alpha)
    reasons = tuple(_reason(c, cfg) for c in checks if c.drifted)
    verdict: Verdict = "drift" if reasons else "ok"
    if not reasons:
        reasons = (f"no check flagged drift on {len(current)} rows",)
    return DriftReport(verdict=verdict, reasons=reasons, checks=tuple(checks),
                       histograms=_histograms(reference, current), **base)


def compare_training_data(
    reference: pd.DataFrame, current: pd.DataFrame, cfg: MonitorConfig, *, labels: Sequence[str]
) -> DriftReport:
    """New training data against the data the champion was judged on, with the monitor's tests.

    Both frames hold one row per text: ``true_label`` (the data's own label), ``text_chars`` and, when the
    champion's graph has one, ``embedding`` (the champion's embedding of the text). The checks are the
    label mix (chi-square, PSI), the text length (KS) and the two embedding tests, corrected together as
    ``detect_drift`` corrects its family; the verdict is ``drift`` when any flags.
    """
    base = {"rows": len(current), "reference_rows": len(reference), "start": None, "end": None, "versions": (),
            "alpha": cfg.alpha, "correction": cfg.correction}
    if min(len(current), len(reference)) < cfg.min_rows:
        reason = f"{len(current)} new and {len(reference)} reference rows; {cfg.min_rows} of each needed for a verdict"
        return DriftReport(verdict="no_verdict", reasons=(reason,), checks=(), **base)
    ref_labels = reference.assign(label=reference[TRUE_LABEL])
    cur_labels = current.assign(label=current[TRUE_LABEL])
    checks = [
        replace(check_predicted_labels(ref_labels, cur_labels, labels, cfg), name="label_mix"),
        check_text_length(reference, current, cfg),
    ]
    embedded = "embedding" in reference and "embedding" in current
    if embedded and reference["embedding"].notna().all() and current["embedding"].notna().all():
        ref_emb, cur_emb = embedding_matrix(reference), embedding_matrix(current)
        checks += [check_embedding_classifier(ref_emb, cur_emb, cfg), check_embedding_mmd(ref_emb, cur_emb, cfg)]
    adjusted = adjust_p_values([c.raw_p_value for c in checks], cfg.correction)  # type: ignore[misc]
    checks = [_decide(check, p, cfg.alpha) for check, p in zip(checks, adjusted, strict=True)]
    reasons = tuple(_reason(c, cfg) for c in checks if c.drifted)
    verdict: Verdict = "drift" if reasons else "ok"
    return DriftReport(verdict=verdict, reasons=reasons or (f"no check flagged drift on {len(current)} rows",),
                       checks=tuple(checks), **base)


def _decide(check: Check, p: float, alpha: float) -> Check:
    reaches = check.score > check.threshold if check.name.endswith("accuracy") else check.score >= check.threshold
    return replace(check, p_value=p, drifted=p <= alpha and reaches)


def _reason(check: Check, cfg: MonitorConfig) -> str:
    if not check.name.endswith("accuracy"):
        return (f"{check.name}: score {check.score:.4g} >= floor {check.threshold:.4g} and corrected p "
                f"{check.p_value:.3g} <= {cfg.alpha:g}")
    return (f"{check.name}: accuracy {check.score:.3f} below the reference's (more than the margin "
            f"{check.threshold:g}), corrected p {check.p_value:.3g} <= {cfg.alpha:g}")


# --------------------------------------------------------------------------------------------- the report

REPORT_MD = "drift-report.md"
REPORT_JSON = "drift-report.json"
REPORT_HTML = "drift-report.html"  # one page with the plots inside it: open it, attach it, mail it
PLOTS = {"confidence": "confidence.png", "text_length": "text_length.png", "scores": "scores.png"}


def plot_distribution(histogram: Histogram, *, title: str, xlabel: str, path: Path) -> Path:
    """Reference vs window as shares per bin, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(histogram.edges)
    centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    ref = np.asarray(histogram.reference, float)
    cur = np.asarray(histogram.current, float)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.bar(centers, ref / max(ref.sum(), 1), width=widths, alpha=0.45, label=f"reference ({int(ref.sum())})",
           color="#4477aa", edgecolor="white")
    ax.step(edges, np.r_[cur / max(cur.sum(), 1), 0], where="post", color="#cc3311", linewidth=2,
            label=f"window ({int(cur.sum())})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of rows")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_scores(report: DriftReport, path: Path) -> Path:
    """Each tested check's corrected p-value against alpha, and its score against its floor, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checks = [c for c in report.checks if c.judged and not math.isnan(c.score)]
    names = [c.name for c in checks]
    ratios = [c.score / c.threshold if c.threshold > 0 else float("nan") for c in checks]
    tested = [c for c in checks if c.p_value is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.5 * len(checks) + 1.8), dpi=110,
                                      gridspec_kw={"width_ratios": [1, 1]})
    colours = ["#cc3311" if c.drifted else "#4477aa" for c in checks]
    y = np.arange(len(checks))
    # A log scale: ratios run from far below the floor to thousands of times above it in one report.
    right.barh(y, np.clip(np.nan_to_num(ratios), 1e-2, None), color=colours, left=1e-2)
    right.set_xscale("log")
    right.axvline(1.0, color="black", linestyle="--", linewidth=1)
    right.set_yticks(y, [f"{n}  ({c.score:.3g} / {c.threshold:.3g})" for n, c in zip(names, checks, strict=True)])
    for i, ratio in enumerate(ratios):
        if math.isnan(ratio):
            right.text(0.012, i, "no floor: the p-value decides", va="center", fontsize=8, color="#555555")
    right.set_xlabel("score / floor, log scale (drift needs >= 1)")
    right.invert_yaxis()
    ty = np.arange(len(tested))
    strength = [-math.log10(max(c.p_value or 1.0, 1e-12)) for c in tested]
    left.barh(ty, strength, color=["#cc3311" if c.drifted else "#4477aa" for c in tested])
    left.axvline(-math.log10(report.alpha), color="black", linestyle="--", linewidth=1)
    left.set_yticks(ty, [c.name for c in tested])
    left.set_xlabel(f"-log10 corrected p (drift needs >= {-math.log10(report.alpha):.2f})")
    left.invert_yaxis()
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"Drift checks: {report.verdict} ({report.rows} rows; red = flagged)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: DriftReport, folder: Path) -> Path:
    """``drift-report.md`` (with the plots linked), ``drift-report.html`` (the same, the plots inside it),
    ``drift-report.json`` and the PNGs under ``folder``; returns drift-report.md."""
    folder.mkdir(parents=True, exist_ok=True)
    text = report.to_markdown()
    if report.checks:
        links = ["", "## Plots", ""]
        hist = report.histograms
        if "confidence" in hist:
            plot_distribution(hist["confidence"], title="Top probability", xlabel="confidence",
                              path=folder / PLOTS["confidence"])
            links.append(f"![confidence]({PLOTS['confidence']})")
        if "text_length" in hist:
            plot_distribution(hist["text_length"], title="Text length (99th percentile and above in the last bin)",
                              xlabel="characters", path=folder / PLOTS["text_length"])
            links.append(f"![text length]({PLOTS['text_length']})")
        plot_scores(report, folder / PLOTS["scores"])
        links.append(f"![drift scores]({PLOTS['scores']})")
        text += "\n".join(links) + "\n"
    (folder / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (folder / REPORT_HTML).write_text(report_html(text, folder, verdict=report.verdict))
    (folder / REPORT_MD).write_text(text)
    return folder / REPORT_MD


_HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222}}
h1 {{border-left: 8px solid {colour}; padding-left: .5em}}
table {{border-collapse: collapse; font-size: 13px}} th, td {{border: 1px solid #ccc; padding: 3px 8px}}
th {{background: #f3f3f3}} img {{max-width: 100%; display: block; margin: 1em 0}}
</style></head>
<body data-verdict="{verdict}">
{body}
<script>
// Counts the plots the browser decoded, so a check in a real browser can tell the page is whole.
window.addEventListener("load", () => {{
  const shown = [...document.images].filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.imagesShown = String(shown);
}});
</script>
</body></html>
"""
_VERDICT_COLOURS = {"ok": "#2e7d32", "drift": "#c62828", "no_verdict": "#9e9e9e"}


def report_html(markdown_text: str, folder: Path, *, verdict: str) -> str:
    """The markdown report as one HTML page, each plot it links embedded (a data: URI), nothing fetched."""
    import base64
    import html
    import re

    import markdown

    # The text holds labels and reasons from the data: escaped, so none of it is markup the page would run.
    body = markdown.markdown(html.escape(markdown_text, quote=False), extensions=["tables"])

    def embed(match: re.Match[str]) -> str:
        path = folder / html.unescape(match.group(1))
        if not path.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"/:]+\.png)"', embed, body)
    title = html.escape(markdown_text.splitlines()[0].lstrip("# ") if markdown_text else "Monitoring")
    return _HTML_PAGE.format(title=title, colour=_VERDICT_COLOURS.get(verdict, "#9e9e9e"), verdict=html.escape(verdict),
                             body=body)
