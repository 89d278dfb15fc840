"""How a model's probabilities become a predicted class: the operating point and the temperature.

    Decision(positive, threshold, rule, temperature)

- ``temperature`` T (temperature scaling, Guo et al. 2017): the model's logits are divided by T
  before the softmax. T > 1 softens over-confident probabilities; it never changes the arg max.
  Fitted on the validation split by minimizing the negative log-likelihood (`fit_temperature`).
- ``threshold`` (two classes only): the positive class is predicted when its probability is at
  least the threshold, instead of the arg max (which is a threshold of 0.5). Chosen on the
  validation split by a rule (`fit_threshold`):

      argmax              no threshold: the class of the highest probability (the default)
      youden              the point of the ROC curve farthest above the diagonal: max
                          sensitivity + specificity − 1
      sensitivity=0.95    the highest threshold whose sensitivity is at least 0.95
      specificity=0.95    the lowest threshold whose specificity is at least 0.95

The probabilities a model outputs are those after the temperature; the threshold decides only the
``prediction`` column and the metrics computed from predictions (accuracy, the confusion matrix,
sensitivity, specificity, PPV, NPV). Checkpoints carry their Decision (``decision``), so inference
applies what training fitted.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from volumetric.errors import ConfigError

RULE = re.compile(r"^(argmax|youden|(sensitivity|specificity)=(0?\.\d+|1(\.0*)?|0))$")


@dataclass(frozen=True)
class Decision:
    """The operating point of a model: see the module docstring. The defaults change nothing."""

    positive: int = 1  # the positive class's index (two classes)
    threshold: float | None = None  # on the positive class's probability; None: arg max
    rule: str = "argmax"  # how ``threshold`` was chosen
    temperature: float | None = None  # logits divided by it before the softmax; None: 1

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """probs (N, C) → (N,) predicted class indices."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.threshold is None or probs.shape[1] != 2:
            return probs.argmax(axis=1)
        positive = probs[:, self.positive] >= self.threshold
        return np.where(positive, self.positive, 1 - self.positive)

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) logits → probabilities after the temperature."""
        t = self.temperature or 1.0
        return (logits.float() / t).softmax(dim=1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, content: dict[str, Any] | None) -> Decision:
        return cls(**(content or {}))


ARGMAX = Decision()
"""The plain decision: the arg max, no temperature."""


def check_rule(rule: str, key: str = "train.threshold") -> str:
    """``rule`` if it is one of the rules of the module docstring, else a ConfigError naming ``key``."""
    if not isinstance(rule, str) or not RULE.match(rule):
        raise ConfigError(
            f"config {key}={rule!r} is not one of argmax, youden, sensitivity=X, specificity=X "
            "(X between 0 and 1, e.g. sensitivity=0.95)"
        )
    return rule


def fit_threshold(scores: np.ndarray, positives: np.ndarray, rule: str) -> float | None:
    """The threshold on ``scores`` (N,) (the positive class's probability; ``positives`` (N,)
    bool: the truth) that ``rule`` picks; None for argmax. A rule the data cannot meet (e.g.
    sensitivity=0.95 of no positive scan) is a ConfigError saying so."""
    check_rule(rule)
    if rule == "argmax":
        return None
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
    if positives.all() or not positives.any():
        raise ConfigError(
            f"train.threshold={rule} needs positive and negative validation scans; this "
            "validation split has one kind only"
        )
    candidates = np.unique(scores)  # (K,) ascending: predicted positive when score >= t
    predicted = scores[None, :] >= candidates[:, None]  # (K, N)
    sensitivity = (predicted & positives).sum(1) / positives.sum()  # (K,) falls as t rises
    specificity = (~predicted & ~positives).sum(1) / (~positives).sum()  # (K,) rises with t
    if rule == "youden":
        return float(candidates[int(np.argmax(sensitivity + specificity - 1.0))])
    name, target = rule.split("=")
    if name == "sensitivity":
        allowed = np.nonzero(sensitivity >= float(target))[0]
        return float(candidates[allowed.max()])  # the highest such threshold (never empty: t=min)
    allowed = np.nonzero(specificity >= float(target))[0]
    if len(allowed) == 0:  # even the highest score leaves a negative above it
        return float(np.nextafter(candidates[-1], math.inf))
    return float(candidates[allowed.min()])


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimizing the negative log-likelihood of ``labels`` (N,) under
    softmax(log(probs) / T) (log-probabilities are the logits up to a constant per scan, which
    the softmax ignores), by L-BFGS on log T from T = 1, bounded to [0.05, 20]."""
    logits = torch.as_tensor(np.log(np.clip(probs, 1e-12, 1.0)), dtype=torch.float64)
    target = torch.as_tensor(labels, dtype=torch.int64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(torch.clamp(log_t.detach().exp(), 0.05, 20.0))
