"""Batch norm followed by an activation as one fused op: ``BatchNormAct2d``, ``BatchNormAct1d``
(subclasses of nn.BatchNorm2d / nn.BatchNorm1d: same state_dict keys, same train/eval behaviour)
and ``ConditionalBatchNormAct2d`` (BigGAN's class-conditional batch norm + activation, with
configurable buffer names). ``ganengine.fuse`` turns BatchNorm2d/1d -> ReLU/LeakyReLU pairs and lone
batch norms into them (rules in ganengine/fusion/rules.py).

Under DDP the statistics are those of each process's own batch (as nn.BatchNorm2d); DDP's
buffer broadcast then keeps rank 0's running statistics. nn.SyncBatchNorm is not fused: it is a
different type, so ``fuse`` leaves it alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ganengine.nn._adopt import act_repr, norm_with_activation

from ganengine.ops._dispatch import _requested_backend
from ganengine.ops.batch_norm_act import ACTIVATIONS, batch_norm_act, conditional_batch_norm_act


def _check_activation(owner: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _plain_eval_call(x: torch.Tensor, w, rm: torch.Tensor, rv: torch.Tensor) -> bool:
    """Whether an eval-mode call without an activation may run F.batch_norm: the backend left to
    'auto' (an explicit backend runs its kernels, for tests and benchmarks), not under torch.compile
    (its graph keeps the custom op), and dtypes eager's batch norm takes as they are (the fused op
    also takes fp32 statistics beside fp16 / bf16 x)."""
    return (type(x) is torch.Tensor and x.dtype == rm.dtype == rv.dtype and (w is None or w.dtype == x.dtype)
            and not torch.compiler.is_compiling() and _requested_backend() == "auto")


def _norm_tensors(m: nn.Module) -> tuple:
    """(running_mean, running_var, weight, bias) read from the module's dicts (None where absent),
    not through nn.Module.__getattr__ (~0.5-1 us a name: at a tiny map that put an eval call of the
    fused module above nn.BatchNorm's); a parametrized or reassigned one through the attribute."""
    bufs, params = m._buffers, m._parameters
    try:
        return bufs["running_mean"], bufs["running_var"], params["weight"], params["bias"]
    except KeyError:
        return m.running_mean, m.running_var, m.weight, m.bias


class _BatchNormActMixin:
    """forward() of nn.BatchNorm's rules on the fused op, and the fuse constructor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bn_call(x, self.activation, self.negative_slope)

    def _bn_call(self, x: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
        """forward() with another activation (fuse()'s rewritten graphs call it too). Each Parameter /
        buffer is read once, from the module's dicts (_norm_tensors)."""
        self._check_input_dim(x)
        rm, rv, w, b = _norm_tensors(self)
        momentum = self.momentum
        if self.training:
            # nn.BatchNorm: batch statistics; with track_running_stats the batch is counted in
            # num_batches_tracked (inside the op) and the running statistics updated with
            # momentum, or with 1 / num_batches_tracked when momentum is None
            track = self.track_running_stats
            nbt = self.num_batches_tracked if track else None
            momentum = momentum if (momentum is not None or nbt is not None) else 0.0
            return batch_norm_act(x, rm if track else None, rv if track else None, w, b, True, momentum, self.eps,
                                  activation, negative_slope, num_batches_tracked=nbt)
        # eval: running statistics when there are any, else the batch's
        if activation == "none" and rm is not None and rv is not None and _plain_eval_call(x, w, rm, rv):
            # one ATen op with nothing to fuse: F.batch_norm itself, eager's numbers at eager's host cost
            # (the fused op's call cost ~4 us more at a tiny map: BENCHMARKS.md, seventeenth session)
            return F.batch_norm(x, rm, rv, w, b, False, 0.0, self.eps)
        return batch_norm_act(x, rm, rv, w, b, rm is None and rv is None, momentum if momentum is not None else 0.0,
                              self.eps, activation, negative_slope)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={act_repr(self.activation, self.negative_slope)}"

    @classmethod
    def from_modules(cls, norm: nn.Module, act: nn.Module | None):
        """A fused module sharing ``norm``'s Parameters and buffers (the same tensor objects, under
        the same keys), so an optimiser built before fusing keeps training them."""
        return norm_with_activation(cls, norm, act)


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """``activation(nn.BatchNorm2d(x))`` on the fused op; (N, C, H, W) input, NCHW or channels_last.

    Arguments are nn.BatchNorm2d's plus ``activation`` ("relu", "leaky_relu", "none") and
    ``negative_slope``; state_dict keys (weight, bias, running_mean, running_var,
    num_batches_tracked) and training/eval behaviour are nn.BatchNorm2d's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "relu", negative_slope: float = 0.2,
                 device=None, dtype=None):
        _check_activation("BatchNormAct2d", activation)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """``activation(nn.BatchNorm1d(x))`` on the fused op, for (N, C) and (N, C, L) input (the
    batch norm after a Linear layer in DCGAN-style generators). Keys and behaviour as nn.BatchNorm1d."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "relu", negative_slope: float = 0.2,
                 device=None, dtype=None):
        _check_activation("BatchNormAct1d", activation)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)


class FusedBatchNorm2d(BatchNormAct2d):
    """What ``fuse()`` puts in place of an ``nn.BatchNorm2d`` (and the activation after it): a
    BatchNormAct2d whose class name still holds "BatchNorm2d", which the references' weight
    initialisers look for by name (junyanz ``init_weights``, PyTorch-GAN ``weights_init_normal``:
    ``classname.find('BatchNorm2d')``), so a model fused before its init is initialised the same."""


class FusedBatchNorm1d(BatchNormAct1d):
    """``fuse()``'s ``nn.BatchNorm1d`` (see FusedBatchNorm2d)."""


# the classes whose forward is _BatchNormActMixin's exactly (fusion/graph.py calls it with another activation)
BATCH_NORM_ACT_CLASSES = (BatchNormAct2d, BatchNormAct1d, FusedBatchNorm2d, FusedBatchNorm1d)


class ConditionalBatchNormAct2d(nn.Module):
    """``act(batch_norm(x) * gain[:, :, None, None] + bias[:, :, None, None])``: batch norm without
    affine parameters, then a per-sample (N, C) gain and bias (BigGAN's ``ccbn``, which passes
    ``1 + gain``), then the activation. ``forward(x, gain, bias)``.

    The running statistics are buffers named ``running_mean_name`` / ``running_var_name`` (BigGAN
    calls them ``stored_mean`` / ``stored_var``) and, with ``count_batches``, a
    ``num_batches_tracked`` counter as nn.BatchNorm keeps (BigGAN keeps none; momentum=None then
    is not allowed). With ``track_running_stats=False`` there are no buffers and batch statistics
    are used in eval as well.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 activation: str = "relu", negative_slope: float = 0.2, track_running_stats: bool = True,
                 running_mean_name: str = "running_mean", running_var_name: str = "running_var",
                 count_batches: bool = True, device=None, dtype=None):
        super().__init__()
        _check_activation("ConditionalBatchNormAct2d", activation)
        if momentum is None and not (track_running_stats and count_batches):
            raise ValueError("ConditionalBatchNormAct2d: momentum=None (cumulative average) needs "
                             "track_running_stats=True and count_batches=True")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.activation, self.negative_slope = activation, float(negative_slope)
        self.track_running_stats = track_running_stats
        self.running_mean_name, self.running_var_name = running_mean_name, running_var_name
        if track_running_stats:
            kw = dict(device=device, dtype=dtype)
            self.register_buffer(running_mean_name, torch.zeros(num_features, **kw))
            self.register_buffer(running_var_name, torch.ones(num_features, **kw))
            if count_batches:
                self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
            else:
                self.num_batches_tracked = None
        else:
            self.num_batches_tracked = None

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            getattr(self, self.running_mean_name).zero_()
            getattr(self, self.running_var_name).fill_(1)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"ConditionalBatchNormAct2d: expected 4D input (N, C, H, W), got shape {tuple(x.shape)}")
        rm = getattr(self, self.running_mean_name) if self.track_running_stats else None
        rv = getattr(self, self.running_var_name) if self.track_running_stats else None
        training = self.training or rm is None
        nbt = self.num_batches_tracked if (self.training and rm is not None) else None
        momentum = self.momentum if (self.momentum is not None or nbt is not None) else 0.0
        return conditional_batch_norm_act(x, gain, bias, rm, rv, training, momentum, self.eps, self.activation,
                                          self.negative_slope, num_batches_tracked=nbt)

    def extra_repr(self) -> str:
        act = act_repr(self.activation, self.negative_slope)
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, activation={act}, "
                f"track_running_stats={self.track_running_stats}")


# ----------------------------------------------------------------------------- --sync_bn
class SyncBatchNormAct(nn.SyncBatchNorm):
    """torch's SyncBatchNorm followed by the activation of the BatchNormAct it replaces (what
    ``convert_sync_batchnorm`` makes of a fused batch norm; torch's own conversion keeps only the
    norm and would drop the activation). The same state_dict keys."""

    activation: str = "none"
    negative_slope: float = 0.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.activation == "relu":
            return torch.relu(y)
        if self.activation == "leaky_relu":
            return nn.functional.leaky_relu(y, self.negative_slope)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={act_repr(self.activation, self.negative_slope)}"


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` that keeps the activation of ganengine's fused
    batch norms (``BatchNormAct1d/2d`` and the classes ``fuse()`` makes from them)."""
    acts = {name: (m.activation, m.negative_slope) for name, m in module.named_modules()
            if isinstance(m, _BatchNormActMixin)}
    out = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, m in out.named_modules():
        if name in acts and type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNormAct
            m.activation, m.negative_slope = acts[name]
    return out
