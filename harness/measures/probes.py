"""Layer-wise linear probes at the hub thought (experiment 3.1).

The residual stream at the hub CT after every layer (layer 0: the thought as fed in) is
probed with a 5-fold cross-validated linear classifier (scikit-learn's RidgeClassifier on
standardised features: closed-form, so 30 probes per model take seconds, where logistic
regression took minutes on 2 cores) for targets that carry the answer.
A control task in the manner of Hewitt & Liang (2019) re-assigns labels at random per
answer value: a probe that only memorises values does as well on it, so selectivity = task
accuracy - control accuracy measures what the representation makes linearly available.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from harness.data.problems import Problem
from harness.interventions.hooks import ActivationCapture, residual_sites
from harness.measures.lens import step_results
from harness.runtime.codi import CODIModel
from harness.runtime.loop import encode_questions, run_latents
from harness.runtime.progress import bar

MAX_PROBE_STEPS = 4  # solution steps probed (the synthetic problems have 1-4)
MIN_PROBE_PROBLEMS = 10  # fewer labelled problems than this: no 5-fold cross-validated probe

MAGNITUDE_EDGES = (10, 30, 100, 1000)  # answer buckets: <10, 10-29, 30-99, 100-999, 1000+
TARGETS = ("answer_last_digit", "answer_magnitude", "first_result_last_digit")
_FIRST_RESULT = re.compile(r"=\s*(-?[\d,]*\.?\d+)\s*>>")


def _last_digit(x: float) -> int:
    return int(abs(round(x))) % 10


def first_result(problem: Problem) -> float | None:
    """The first intermediate result of the gold chain of thought (`<<a*b=c>>`), if any."""
    match = _FIRST_RESULT.search(problem.cot)
    return float(match.group(1).replace(",", "")) if match else None


def probe_targets(problems: list[Problem]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per target, ([N] integer labels, -1 where a problem has no such value; [N] the values
    the labels derive from, which the control task re-labels)."""
    answers = np.array([p.answer for p in problems])
    firsts = np.array([np.nan if (f := first_result(p)) is None else f for p in problems])
    return {
        "answer_last_digit": (np.array([_last_digit(a) for a in answers]), answers),
        "answer_magnitude": (np.digitize(np.abs(answers), MAGNITUDE_EDGES), answers),
        "first_result_last_digit": (np.array([-1 if np.isnan(f) else _last_digit(f) for f in firsts]), firsts),
    }


def probed(labels: np.ndarray) -> np.ndarray:
    """[N] bool: the problems a target's probe is fitted on, those with a label, or none when
    fewer than MIN_PROBE_PROBLEMS have one (too few to cross-validate)."""
    keep = labels >= 0
    return keep if keep.sum() >= MIN_PROBE_PROBLEMS else np.zeros_like(keep)


def control_labels(values: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Hewitt & Liang control task: every distinct value gets a random label from the task's
    label set, the same label wherever the value occurs."""
    rng = np.random.default_rng(seed)
    label_set = np.unique(labels)
    mapping = {v: rng.choice(label_set) for v in np.unique(values)}
    return np.array([mapping[v] for v in values])


@torch.no_grad()
def thought_states(
    codi: CODIModel, problems: list[Problem], thought: int, batch_size: int = 128, progress: bool = False
) -> np.ndarray:
    """Residual stream at CT_thought after every layer: [N, L + 1, d]."""
    out = []
    for start in bar(range(0, len(problems), batch_size), desc=f"states {codi.name}", disable=not progress):
        batch = encode_questions(codi, [p.question for p in problems[start : start + batch_size]])
        position = batch.positions(codi.n_latent).latent[thought]
        sites = residual_sites(codi.geometry.n_layers)
        with ActivationCapture(codi, sites, [position]) as capture:
            run_latents(codi, batch)
        states = torch.cat([capture.stacked(site) for site in sites], dim=1)  # [B, L + 1, d]
        out.append(states.float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def all_thought_states(
    codi: CODIModel, problems: list[Problem], batch_size: int = 128, progress: bool = False
) -> np.ndarray:
    """Residual stream at every thought after every layer: [N, K, L + 1, d] (float32 numpy)."""
    out = []
    sites = residual_sites(codi.geometry.n_layers)
    for start in bar(range(0, len(problems), batch_size), desc=f"thought states {codi.name}", disable=not progress):
        batch = encode_questions(codi, [p.question for p in problems[start : start + batch_size]])
        with ActivationCapture(codi, sites, batch.positions(codi.n_latent).latent) as capture:
            run_latents(codi, batch)
        states = torch.stack([capture.stacked(site) for site in sites], dim=2)  # [B, K, L + 1, d]
        out.append(states.float().cpu().numpy())
    return np.concatenate(out)


def step_probes(
    states: np.ndarray, problems: list[Problem], n_steps: int, seed: int, progress: bool = False
) -> np.ndarray:
    """Probes of each solution step's result (its last digit) at every thought and layer, with
    the control task: [n_steps, 2 (task, control), K, L + 1, N] int8 per-problem correctness
    (-1 where a problem has no such step)."""
    n, k, layers = states.shape[:3]
    out = np.full((n_steps, 2, k, layers, n), -1, dtype=np.int8)
    values = np.full((n, n_steps), np.nan)
    for i, p in enumerate(problems):
        results = step_results(p)[:n_steps]
        values[i, : len(results)] = results
    jobs = [(j, t, layer) for j in range(n_steps) for t in range(k) for layer in range(layers)]
    for j, t, layer in bar(jobs, desc="step probes", disable=not progress):
        keep = ~np.isnan(values[:, j])
        if keep.sum() < MIN_PROBE_PROBLEMS:
            continue
        y = np.array([_last_digit(v) for v in values[keep, j]])
        out[j, 0, t, layer, keep] = probe_correct(states[keep, t, layer], y, seed)
        out[j, 1, t, layer, keep] = probe_correct(
            states[keep, t, layer], control_labels(values[keep, j], y, seed), seed
        )
    return out


def probe_correct(features: np.ndarray, labels: np.ndarray, seed: int, folds: int = 5) -> np.ndarray:
    """Per-problem correctness of a cross-validated linear probe: [N] bool."""
    # scikit-learn is imported here, not at module level: the plugin loads this module on every
    # run, and a warm (fully cached) run never fits a probe
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=10.0))
    cv = KFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(probe, features, labels, cv=cv) == labels


def chance(labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent label."""
    return float(np.bincount(labels).max() / len(labels))


@dataclass
class ProbeResults:
    """Per target, per layer: per-problem correctness of the task and control probes."""

    task: dict[str, np.ndarray]  # target -> [L + 1, n] bool
    control: dict[str, np.ndarray]  # target -> [L + 1, n] bool
    labels: dict[str, np.ndarray]  # target -> [n] labels of the problems that have one
    keep: dict[str, np.ndarray]  # target -> [N] bool: which problems have a label

    def packed(self) -> np.ndarray:
        """[targets, 2 (task, control), L + 1, N] int8 (1 right, 0 wrong, -1 no label): the
        form the disk cache holds."""
        n_layers, n = next(iter(self.task.values())).shape[0], len(next(iter(self.keep.values())))
        out = np.full((len(TARGETS), 2, n_layers, n), -1, dtype=np.int8)
        for i, target in enumerate(TARGETS):
            out[i, 0][:, self.keep[target]] = self.task[target]
            out[i, 1][:, self.keep[target]] = self.control[target]
        return out

    @classmethod
    def unpack(cls, packed: np.ndarray, problems: list[Problem]) -> ProbeResults:
        targets = probe_targets(problems)
        keep = {t: probed(targets[t][0]) for t in TARGETS}
        task = {t: packed[i, 0][:, keep[t]] == 1 for i, t in enumerate(TARGETS)}
        control = {t: packed[i, 1][:, keep[t]] == 1 for i, t in enumerate(TARGETS)}
        return cls(task, control, {t: targets[t][0][keep[t]] for t in TARGETS}, keep)

    def table(self) -> pd.DataFrame:
        rows = []
        for target, task in self.task.items():
            if not task.shape[1]:  # not probed: too few problems have this target
                continue
            for layer in range(task.shape[0]):
                acc, ctrl = task[layer].mean(), self.control[target][layer].mean()
                rows.append(
                    {
                        "target": target,
                        "layer": layer,
                        "accuracy": 100 * acc,
                        "control_accuracy": 100 * ctrl,
                        "selectivity": 100 * (acc - ctrl),
                        "chance": 100 * chance(self.labels[target]),
                    }
                )
        columns = ["target", "layer", "accuracy", "control_accuracy", "selectivity", "chance"]
        return pd.DataFrame(rows, columns=columns)


def critical_layer(task: np.ndarray, control: np.ndarray) -> int:
    """The block (0-based) after which selectivity rises most: [L + 1, n] x 2 -> block index."""
    selectivity = task.mean(-1) - control.mean(-1)  # [L + 1]
    return int(np.argmax(np.diff(selectivity)))


def run_probes(states: np.ndarray, problems: list[Problem], seed: int, progress: bool = False) -> ProbeResults:
    """Probe every target at every layer of `states` [N, L + 1, d]."""
    targets = probe_targets(problems)
    task, control, labels, keeps = {}, {}, {}, {}
    jobs = [(t, layer) for t in TARGETS for layer in range(states.shape[1])]
    for target, layer in bar(jobs, desc="probes", disable=not progress):
        all_labels, values = targets[target]
        keep = probed(all_labels)
        y = all_labels[keep]
        y_control = control_labels(values[keep], y, seed)
        if layer == 0:
            task[target] = np.zeros((states.shape[1], int(keep.sum())), dtype=bool)
            control[target] = np.zeros_like(task[target])
            labels[target], keeps[target] = y, keep
        if not keep.any():
            continue
        task[target][layer] = probe_correct(states[keep, layer], y, seed)
        control[target][layer] = probe_correct(states[keep, layer], y_control, seed)
    return ProbeResults(task, control, labels, keeps)
