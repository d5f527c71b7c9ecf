"""The voter methods as torch modules, for the exported ensemble (TorchScript and ONNX).

Each takes the views' probabilities as a list of (N, C) tensors, in the voter's view
order, and computes exactly what its :mod:`triview.voter` method computes in numpy; the
export checks the two against each other on real test crops.
"""
from __future__ import annotations

import torch
from torch import nn


class GeometricMean(nn.Module):
    def __init__(self, multilabel: bool, eps: float) -> None:
        super().__init__()
        self.multilabel, self.eps = multilabel, eps

    def forward(self, probs: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(probs, 0)
        if self.multilabel:  # mean logit per label
            return torch.sigmoid((torch.log(stacked + self.eps)
                                  - torch.log1p(self.eps - stacked)).mean(0))
        return torch.softmax(torch.log(stacked + self.eps).mean(0), dim=1)


class WeightedMean(nn.Module):
    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, probs: list[torch.Tensor]) -> torch.Tensor:
        return (torch.stack(probs, 0) * self.weights).sum(0)


class MajorityVote(nn.Module):
    def __init__(self, n_classes: int, multilabel: bool, tie_break: float) -> None:
        super().__init__()
        self.n_classes, self.multilabel, self.tie_break = n_classes, multilabel, tie_break

    def forward(self, probs: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(probs, 0)
        if self.multilabel:
            return (1 - self.tie_break) * (stacked >= 0.5).to(stacked.dtype).mean(0) \
                + self.tie_break * stacked.mean(0)
        votes = nn.functional.one_hot(stacked.argmax(-1), self.n_classes).to(stacked.dtype).sum(0)
        score = votes + self.tie_break * stacked.mean(0)
        return score / score.sum(1, keepdim=True)


class LogisticHead(nn.Module):
    def __init__(self, coef: list[list[float]], intercept: list[float], eps: float) -> None:
        super().__init__()
        self.eps = eps
        coef_t = torch.tensor(coef, dtype=torch.float32)
        self.linear = nn.Linear(coef_t.shape[1], coef_t.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(coef_t)
            self.linear.bias.copy_(torch.tensor(intercept, dtype=torch.float32))

    def forward(self, probs: list[torch.Tensor]) -> torch.Tensor:
        return torch.softmax(self.linear(torch.log(torch.cat(probs, 1) + self.eps)), dim=1)


class MlpHead(nn.Module):
    def __init__(self, w1, b1, w2, b2, multilabel: bool, eps: float) -> None:
        super().__init__()
        self.eps = eps
        w1_t, w2_t = torch.tensor(w1, dtype=torch.float32), torch.tensor(w2, dtype=torch.float32)
        self.mlp = nn.Sequential(nn.Linear(*w1_t.shape), nn.ReLU(), nn.Linear(*w2_t.shape))
        with torch.no_grad():  # scikit-learn keeps (in, out) matrices; nn.Linear wants (out, in)
            self.mlp[0].weight.copy_(w1_t.T)
            self.mlp[0].bias.copy_(torch.tensor(b1, dtype=torch.float32))
            self.mlp[2].weight.copy_(w2_t.T)
            self.mlp[2].bias.copy_(torch.tensor(b2, dtype=torch.float32))
        self.multilabel = multilabel

    def forward(self, probs: list[torch.Tensor]) -> torch.Tensor:
        logits = self.mlp(torch.log(torch.cat(probs, 1) + self.eps))
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)


class Pick(nn.Module):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, probs: list[torch.Tensor]) -> torch.Tensor:
        return probs[self.index]


class Temperature(nn.Module):
    """The ensemble's temperature (:mod:`triview.temperature`): probabilities rescaled
    through their log (softmax of log p / T) or, per label, their logit."""

    def __init__(self, temperature: float, multilabel: bool, eps: float) -> None:
        super().__init__()
        self.temperature, self.multilabel, self.eps = float(temperature), multilabel, eps

    def forward(self, prob: torch.Tensor) -> torch.Tensor:
        p = prob.clamp(self.eps, 1.0)
        if self.multilabel:
            p = p.clamp(self.eps, 1.0 - self.eps)
            return torch.sigmoid((torch.log(p) - torch.log1p(-p)) / self.temperature)
        return torch.softmax(torch.log(p) / self.temperature, dim=1)
