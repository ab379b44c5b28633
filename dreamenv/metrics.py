"""Scores of a done (termination) head against the true terminations: precision and recall, thresholded and sampled."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None (JSON null) where undefined."""
    return numerator / denominator if denominator else None


@dataclass
class DoneScores:
    """Running counts of p(done) against the truth: hits at threshold 0.5, and expected hits under Bernoulli sampling."""

    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0
    expected_tp: float = 0.0
    expected_fp: float = 0.0
    positives: float = 0.0

    def add(self, prob: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> None:
        """Count the masked steps of a batch: prob = predicted p(done), truth = 1 where the episode ended."""
        prob, truth = prob * mask, truth * mask
        pred = (prob > 0.5).float()
        self.tp += (pred * truth).sum().item()
        self.fp += (pred * (1 - truth) * mask).sum().item()
        self.fn += ((1 - pred) * truth).sum().item()
        self.expected_tp += (prob * truth).sum().item()
        self.expected_fp += (prob * (1 - truth)).sum().item()
        self.positives += truth.sum().item()

    def metrics(self) -> dict[str, float | None]:
        """done_precision/recall at threshold 0.5, their expectations under sampling, and the predicted ends per true end.

        predicted_dones_per_true is the sum of p(done) over all steps divided by the true terminations: 1 when M expects
        as many ends as happen, below 1 when its dream is safer than the game. None where undefined.
        """
        return {
            "done_precision": ratio(self.tp, self.tp + self.fp),
            "done_recall": ratio(self.tp, self.tp + self.fn),
            "done_precision_sampled": ratio(self.expected_tp, self.expected_tp + self.expected_fp),
            "done_recall_sampled": ratio(self.expected_tp, self.positives),
            "predicted_dones_per_true": ratio(self.expected_tp + self.expected_fp, self.positives),
            "terminal_steps": self.positives,
        }
