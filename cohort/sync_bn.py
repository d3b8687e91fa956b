"""BatchNorm over the global batch when one batch is split across data-parallel ranks.

With DDP each rank sees B/N samples. Plain BatchNorm then normalises with the statistics of
its own shard, so N ranks train a different function than one process on the whole batch.
Synchronised BatchNorm uses the statistics of the global batch in training mode (and updates
the running averages with them), which makes N ranks compute what one process computes.

`torch.nn.SyncBatchNorm` only runs on GPUs (its kernels have no CPU implementation), so
`GlobalBatchNorm` does the same on any device with two differentiable all-reduces per layer
(sum, then sum of squared deviations: a two-pass variance, as accurate as F.batch_norm's).
The backward pass all-reduces the gradients of those sums, so DDP's gradient average over
ranks is the gradient of the global-batch loss. In eval mode, or with one rank, it is plain
BatchNorm. Its state dict keys are those of BatchNorm1d/2d, so checkpoints load either way.

Pure torch: no Ray.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward all-reduces the incoming gradients (each rank's loss
    depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(tensor)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the batch summed over all ranks."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def _synchronised(self) -> bool:
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._synchronised():
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        local = x.new_tensor([x.numel() // x.shape[1]], dtype=x.dtype)
        summed = all_reduce(torch.cat([x.sum(dims), local]))
        count = summed[-1].detach()
        mean = summed[:-1] / count
        centered = x - mean.view(shape)
        var = all_reduce((centered * centered).sum(dims)) / count
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:   # cumulative moving average, as nn.BatchNorm
            factor = 1.0 / float(self.num_batches_tracked.item())
        else:
            factor = self.momentum
        unbiased = var * (count / (count - 1).clamp_min(1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def _convert(module: nn.Module, make) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        out = make(module)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert(child, make))
    return out


def synchronise_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` synchronised across ranks: torch's SyncBatchNorm on CUDA,
    GlobalBatchNorm elsewhere (CPU with gloo). Call before wrapping the model in DDP."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model, lambda bn: GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum,
                                                      bn.affine, bn.track_running_stats))
