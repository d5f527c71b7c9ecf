"""The losses: class-weighted, label-smoothed cross-entropy (multi-class) and sigmoid
binary cross-entropy with per-label ``pos_weight`` (multi-label)."""
from __future__ import annotations

import torch
from torch import nn

from triview.train.config import TrainConfig


class MultiLabelLoss(nn.Module):
    """Sigmoid binary cross-entropy per label with ``pos_weight`` (negatives / positives
    of each label) and label smoothing towards 0.5."""

    def __init__(self, pos_weight: torch.Tensor, smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype) * (1 - self.smoothing) + 0.5 * self.smoothing
        return nn.functional.binary_cross_entropy_with_logits(logits, target,
                                                              pos_weight=self.pos_weight)


def make_criterion(task: str, balance: dict, classes: list[str], config: TrainConfig) -> nn.Module:
    """Multi-class: softmax cross-entropy with class weights and label smoothing;
    multi-label: :class:`MultiLabelLoss` with balance's per-label ``pos_weight``."""
    if task == "multilabel":
        pos = balance.get("labels", {}).get("pos_weight", {})
        pos_weight = torch.tensor([float(pos.get(c, 1.0)) or 1.0 for c in classes])
        return MultiLabelLoss(pos_weight, config.label_smoothing)
    weights = torch.tensor(balance["class_weights"], dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
