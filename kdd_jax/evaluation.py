"""Detection quality over a zoo: the paper's protocol (its `score2detect.py`), and the binary
"distilled or not" rates. Pure numpy; `zoo_metrics` is what the zoo detection benchmarks under benchmarks/ report
(accuracy, per recipe, binary rates), and what anyone who evaluates the detector on their own zoo
should call.

Multiple choice, per run r (R runs with different seeds):
    accuracy_r = share of distilled students whose argmax-score teacher is their true teacher
    auc_r      = one-vs-rest macro AUC of softmax-over-teachers(scores) against the true teacher,
                 as sklearn.metrics.roc_auc_score(labels, probs, multi_class="ovr") computes it
and the result is mean +- std over runs (numpy std, ddof=0).
"""

from __future__ import annotations

import numpy as np


def softmax_over_teachers(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + 0.5 P(tie)
    (Mann-Whitney U with mid-ranks for ties)."""
    positive = np.asarray(positive, bool)
    score = np.asarray(score, np.float64)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), np.float64)
    sorted_scores = score[order]
    # mid-ranks over tie groups
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ovr_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes (teachers), sklearn's multi_class="ovr" default."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, np.float64)
    return float(np.mean([binary_auc(labels == k, probs[:, k]) for k in range(probs.shape[1])]))


def tie_aware_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of students whose true teacher has the top score; a k-way tie for the top earns 1/k
    (the expected accuracy of breaking the tie at random), never the first-index luck of argmax."""
    s = np.asarray(scores, np.float64)
    return tie_aware_share(s, np.eye(s.shape[-1], dtype=bool)[np.asarray(labels)])


def tie_aware_share(scores: np.ndarray, hits: np.ndarray) -> float:
    """scores [M, K], hits [M, K] bool (which teachers count as a hit for each model, e.g. those of its
    own architecture family) -> share of models whose top-scored teacher is a hit, a tie for the top
    counting the fraction of tied teachers that are hits (argmax would credit the first in full)."""
    s = np.asarray(scores, np.float64)
    hits = np.asarray(hits, bool)
    if hits.shape != s.shape:
        raise ValueError(f"hits {hits.shape} do not match scores {s.shape}")
    top = s == s.max(-1, keepdims=True)
    return float(np.mean((top & hits).sum(-1) / top.sum(-1)))


def multiple_choice_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    """scores [R, M, K] (run, distilled student, teacher; higher = more teacher-like), labels [M]
    (index of each student's true teacher) -> accuracy and AUC, per run and mean/std."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim == 2:
        scores = scores[None]
    labels = np.asarray(labels)
    if scores.shape[1] != len(labels):
        raise ValueError(f"scores have {scores.shape[1]} students, labels {len(labels)}")
    acc = [tie_aware_accuracy(s, labels) for s in scores]
    present = np.unique(labels)
    auc = []
    for s in scores:
        p = softmax_over_teachers(s)
        # a teacher without a student has no positives: sklearn refuses; we score the others
        auc.append(float(np.mean([binary_auc(labels == k, p[:, k]) for k in present])) if len(present) > 1
                   else float("nan"))
    return {"accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
            "auc": float(np.nanmean(auc)) if not np.all(np.isnan(auc)) else float("nan"),
            "auc_std": float(np.nanstd(auc)) if not np.all(np.isnan(auc)) else float("nan"),
            "accuracy_per_run": [float(a) for a in acc], "auc_per_run": auc, "runs": len(scores)}


def margin_statistic(scores: np.ndarray) -> np.ndarray:
    """[..., K] -> [...]: the best teacher's score minus the mean of the others. Invariant to a
    per-student offset (a student's own calibration shifts every teacher's -KL alike), so it
    compares across students better than the raw best score."""
    s = np.asarray(scores, np.float64)
    k = s.shape[-1]
    best = s.max(-1)
    return best - (s.sum(-1) - best) / max(k - 1, 1)


def binary_rates_loo(distilled: np.ndarray, controls: np.ndarray, *, tpr_target: float = 0.9) -> dict:
    """Binary detection with a threshold never fitted on the model it is applied to.

    For every model (distilled or control) in turn, the threshold is the largest value that flags at
    least `tpr_target` of the OTHER distilled students' statistics; the model is flagged if its
    statistic is >= that threshold. Returns the true-positive rate on distilled students and the
    false-positive rate on controls under these leave-one-out thresholds."""
    d = np.asarray(distilled, np.float64)
    c = np.asarray(controls, np.float64)
    if len(d) < 2:
        raise ValueError("need at least two distilled students")

    def thr(pool: np.ndarray) -> float:
        srt = np.sort(pool)
        keep = int(np.ceil(tpr_target * len(srt)))  # flag at least this many
        return float(srt[len(srt) - keep]) if keep > 0 else float("inf")

    all_d = thr(d)
    tp = sum(d[i] >= thr(np.delete(d, i)) for i in range(len(d)))
    fp = sum(x >= all_d for x in c)
    return {"tpr": tp / len(d), "fpr": fp / len(c) if len(c) else float("nan"), "n_distilled": len(d),
            "n_controls": len(c), "tpr_target": tpr_target}


def zoo_metrics(scores: np.ndarray, labels: np.ndarray, *, recipes=None, controls: np.ndarray | None = None,
                tpr_target: float = 0.9) -> dict:
    """Everything a zoo benchmark reports for one (probe method, score, N) cell, in one place.

    scores [R, M, K] (or [M, K] for one run) for the distilled students, labels [M] their teachers'
    indices, recipes [M] (optional) their recipe names, controls [R, C, K] (optional) the independent
    models' scores on the same runs' probes. Returns `multiple_choice_metrics`, plus
      per_recipe: {recipe: accuracy, mean over runs} in first-appearance order (when recipes are given);
      binary:     {tpr, fpr, tpr_target, n_controls}: `binary_rates_loo` of the margin statistic per run,
                  averaged over runs (when controls are given and there are >= 2 students; fpr is nan
                  with an empty control set).
    """
    s = np.asarray(scores, np.float64)
    if s.ndim == 2:
        s = s[None]
    labels = np.asarray(labels)
    out = multiple_choice_metrics(s, labels)
    if recipes is not None:
        rec = np.asarray(recipes)
        if rec.ndim != 1 or rec.shape != labels.shape:
            raise ValueError(f"recipes: one name per student expected ({len(labels)}), got {recipes!r:.80}")
        out["per_recipe"] = {r: float(np.mean([tie_aware_accuracy(run[rec == r], labels[rec == r]) for run in s]))
                             for r in dict.fromkeys(rec.tolist())}
    if controls is not None and s.shape[1] >= 2:
        c = np.asarray(controls, np.float64)
        if c.size == 0:  # no controls (np.stack of empty rows gives [R, 0])
            c = np.zeros((s.shape[0], 0, s.shape[2]))
        elif c.ndim == 2:
            c = c[None]
        if c.shape[0] != s.shape[0] or c.shape[2] != s.shape[2]:
            raise ValueError(f"controls {c.shape} do not match the students' runs x teachers {s.shape}")
        rates = [binary_rates_loo(margin_statistic(run), margin_statistic(ctl), tpr_target=tpr_target)
                 for run, ctl in zip(s, c)]
        out["binary"] = {"tpr": float(np.mean([x["tpr"] for x in rates])),
                         "fpr": float(np.mean([x["fpr"] for x in rates])),
                         "tpr_target": tpr_target, "n_controls": int(c.shape[1])}
    return out
