"""The official BiP implementation's training iteration, rebuilt as a baseline (not used by the package).

What it does per iteration (read from the released trainer): every forward recomputes the mask by
sorting all scores of the model, concatenated; then
  (1) forward/backward on batch A with the scores frozen, SGD step on the weights;
  (2) forward/backward on batch B with everything trainable, keeping G1, the gradients of all parameters;
  (3) forward/backward on batch B with the weights frozen, giving G2;
      the score gradients get −lr2 · G1 ⊙ G2 added, and the scores take an SGD step;
  (4) one more forward on batch B, for logging.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _StraightThrough(torch.autograd.Function):
    """The 0/1 mask of |s| forward, the gradient passed through unchanged (the released GetSubnet, which
    the released layers call on popup_scores.abs(): autograd adds sign(s) on the way to the scores)."""

    @staticmethod
    def forward(ctx, magnitudes, threshold):
        return (magnitudes >= threshold).to(magnitudes.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SortMaskedConv2d(nn.Conv2d):
    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None)
        self.load_state_dict(conv.state_dict())
        self.popup_scores = nn.Parameter(conv.weight.detach().clone())
        self.global_threshold = None

    def forward(self, x):
        mask = _StraightThrough.apply(self.popup_scores.abs(), self.global_threshold)
        return self._conv_forward(x, self.weight * mask, self.bias)


class SortMaskedLinear(nn.Linear):
    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.popup_scores = nn.Parameter(linear.weight.detach().clone())
        self.global_threshold = None

    def forward(self, x):
        mask = _StraightThrough.apply(self.popup_scores.abs(), self.global_threshold)
        return F.linear(x, self.weight * mask, self.bias)


def convert_official(model: nn.Module, keep: float) -> nn.Module:
    """Swap Conv2d / Linear for the sort-masked layers; a pre-hook sorts all scores before every forward."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Conv2d:
                setattr(module, name, SortMaskedConv2d(child))
            elif type(child) is nn.Linear:
                setattr(module, name, SortMaskedLinear(child))
    layers = [m for m in model.modules() if isinstance(m, (SortMaskedConv2d, SortMaskedLinear))]

    def sort_all_scores(_module, _inputs):
        flat = torch.cat([layer.popup_scores.detach().abs().reshape(-1) for layer in layers])
        ordered, _ = flat.sort()
        threshold = ordered[int((1 - keep) * flat.numel())]
        for layer in layers:
            layer.global_threshold = threshold

    model.register_forward_pre_hook(sort_all_scores)
    return model


class OfficialIteration:
    """One call = one iteration of the released trainer (see the module docstring)."""

    def __init__(self, model: nn.Module, keep: float, lr: float = 0.01, score_lr: float = 0.05, lr2: float = 1e-4):
        self.model = convert_official(model, keep)
        self.scores = [p for n, p in self.model.named_parameters() if n.endswith("popup_scores")]
        score_ids = {id(p) for p in self.scores}
        self.weights = [p for p in self.model.parameters() if id(p) not in score_ids]
        self.weight_optimizer = torch.optim.SGD(self.weights, lr=lr, momentum=0.9, weight_decay=1e-4)
        self.score_optimizer = torch.optim.SGD(self.scores, lr=score_lr, momentum=0.9)
        self.lr2 = lr2

    def _grads(self):
        return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                          for p in self.model.parameters()])

    def __call__(self, batch_a, batch_b):
        (inputs_a, targets_a), (inputs_b, targets_b) = batch_a, batch_b
        for p in self.scores:
            p.requires_grad_(False)
        self.weight_optimizer.zero_grad()
        F.cross_entropy(self.model(inputs_a), targets_a).backward()
        self.weight_optimizer.step()
        for p in self.scores:
            p.requires_grad_(True)
        self.model.zero_grad()
        F.cross_entropy(self.model(inputs_b), targets_b).backward()
        g1 = self._grads()
        for p in self.weights:
            p.requires_grad_(False)
        self.model.zero_grad()
        F.cross_entropy(self.model(inputs_b), targets_b).backward()
        g2 = self._grads()
        implicit = -self.lr2 * g1 * g2
        offset = 0
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.add_(implicit[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.score_optimizer.step()
        for p in self.weights:
            p.requires_grad_(True)
        with torch.no_grad():
            self.model(inputs_b)  # the logging forward
