"""Spectral norm as a scale on the output instead of a divided weight.

A spectrally normalised conv computes ``conv(x, W / sigma) + b``. Exactly the same function is
``conv(x, W) / sigma + b``: the division moves from the weight (one weight-sized pass forward,
several backward: the quotient's gradient and sigma's ``-sum(g * W) / sigma**2``) to the conv's
output (one output-sized pass each way, sigma's gradient ``-sum(g * y) / sigma**2`` over the
output). BigGAN's deep blocks carry 1536x1536x3x3 weights over 8x8 maps: at a GAN's batch the
output is far smaller than the weight, and the weight-sized passes were a quarter of the
generator's step (docs/fuse.md). ``conv_apply`` picks, per call, whichever side is smaller.

``biggan_sigma(m)``: the first singular value estimate of BigGAN-PyTorch's ``SN`` mixin
(``layers.SN``: buffers ``u0..``, ``sv0..``; ``num_svs``, ``num_itrs``, ``transpose``, ``eps``):
power iteration with Gram-Schmidt against the previous vectors, ``u`` / ``sv`` written in
training mode only, the estimate differentiable in W (u and v are constants), exactly as its
``W_()`` computes before returning ``weight / svs[0]``. Written from the description of the
method; a module is only given this path after ``verify.same_function`` found its own
``W_``-based forward equal to it (outputs, gradients, buffers, train and eval).

``sagan_like(w)`` / ``sagan_sigma(w)``: SAGAN's (heykeetae) ``SpectralNorm`` wrapper, which
keeps ``weight_bar`` / ``weight_u`` / ``weight_v`` Parameters on its inner conv and, each call,
runs ``power_iterations`` steps of ``v = l2n(W^T u)``, ``u = l2n(W v)`` on the data (train and
eval), then ``sigma = u . W v`` (differentiable in W), sets the inner conv's ``weight`` to
``W / sigma`` and calls it. The wrapper rule gives such a wrapper a forward that divides the
smaller side instead (``mixins.SpectralNormWrapperMixin``), again only after
``verify.same_function`` found it equal to the wrapper's own forward on both sides.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def biggan_like(m: nn.Module) -> bool:
    """BigGAN SN structure: num_svs / num_itrs ints, eps float, buffers u{i} (1, out), sv{i} (1,)."""
    n, itrs, eps = getattr(m, "num_svs", None), getattr(m, "num_itrs", None), getattr(m, "eps", None)
    if not (isinstance(n, int) and isinstance(itrs, int) and isinstance(eps, float) and n >= 1 and itrs >= 1):
        return False
    w = m._parameters.get("weight")
    if not isinstance(w, nn.Parameter):
        return False
    rows = w.shape[1] if getattr(m, "transpose", False) and w.dim() == 2 else w.shape[0]
    for i in range(n):
        u, sv = m._buffers.get(f"u{i}"), m._buffers.get(f"sv{i}")
        if u is None or sv is None or tuple(u.shape) != (1, rows) or sv.numel() != 1:
            return False
    return True


def _orthogonalise(x: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    for y in basis:
        x = x - torch.mm(y, x.t()) * y / torch.mm(y, y.t())
    return x


_vector_norm = torch.linalg.vector_norm


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.normalize(x, eps=eps)`` (p=2, dim=1) op for op: the ``vector_norm`` that ``x.norm(2.0,
    1, keepdim=True)`` ends in (without torch.norm's Python dispatch), ``clamp_min``, and the
    division (broadcast instead of ``expand_as``: the same quotient per element)."""
    return x / _vector_norm(x, 2.0, 1, True).clamp_min(eps)


def _biggan_sigma_one(m: nn.Module, weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``num_svs == 1`` (BigGAN's setting, no Gram-Schmidt): the reference's ops (``matmul`` of
    2-D tensors is ``mm``; ``F.normalize`` as ``_normalize``), the same bits. In eval every
    iteration starts from the same, unwritten ``u0``, so one iteration gives the reference's
    vectors; without a graph to record, sigma reuses the iteration's ``v W^T`` (the same op on
    the same inputs as the reference's differentiable one)."""
    u0, eps, training = m._buffers["u0"], m.eps, m.training
    wt = w.t()
    with torch.no_grad():
        for _ in range(m.num_itrs if training else 1):
            v = _normalize(torch.mm(u0, w), eps)
            t = torch.mm(v, wt)
            u = _normalize(t, eps)
            if training:
                u0.copy_(u)
    if weight.requires_grad and torch.is_grad_enabled():
        sigma = torch.mm(torch.mm(v, wt), u.t()).squeeze()
    else:
        sigma = torch.mm(t, u.t()).squeeze()
    if training:
        with torch.no_grad():
            m._buffers["sv0"].copy_(sigma)
    return sigma


def biggan_sigma(m: nn.Module) -> torch.Tensor:
    weight = m.weight
    w = weight.reshape(weight.size(0), -1)
    if getattr(m, "transpose", False):
        w = w.t()
    if m.num_svs == 1:
        return _biggan_sigma_one(m, weight, w)
    buffers = [getattr(m, f"u{i}") for i in range(m.num_svs)]
    svs: list[torch.Tensor] = []
    for _ in range(m.num_itrs):
        us, vs, svs = [], [], []
        for i, u in enumerate(buffers):
            with torch.no_grad():
                v = F.normalize(_orthogonalise(torch.matmul(u, w), vs), eps=m.eps)
                vs.append(v)
                u = F.normalize(_orthogonalise(torch.matmul(v, w.t()), us), eps=m.eps)
                us.append(u)
                if m.training:
                    buffers[i][:] = u
            svs.append(torch.squeeze(torch.matmul(torch.matmul(v, w.t()), u.t())))
    if m.training:
        with torch.no_grad():
            for i, s in enumerate(svs):
                getattr(m, f"sv{i}")[:] = s
    return svs[0]


def sagan_like(w: nn.Module) -> bool:
    """SAGAN SpectralNorm structure: ``module`` (a conv), ``name`` (str), ``power_iterations``
    (int >= 0); Parameters ``{name}_u`` (out,), ``{name}_v`` (in*k*k,), ``{name}_bar`` (the
    weight's shape) on the inner conv, which has no ``{name}`` Parameter of its own."""
    m, name, its = getattr(w, "module", None), getattr(w, "name", None), getattr(w, "power_iterations", None)
    if not (isinstance(m, nn.Module) and isinstance(name, str) and isinstance(its, int) and its >= 0):
        return False
    u, v, bar = (m._parameters.get(name + s) for s in ("_u", "_v", "_bar"))
    if not all(isinstance(t, nn.Parameter) for t in (u, v, bar)) or name in m._parameters:
        return False
    h = bar.shape[0]
    return u.dim() == 1 and v.dim() == 1 and u.shape[0] == h and v.shape[0] * h == bar.numel()


def _l2n(t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The reference's ``l2normalize``, ``t / (t.norm() + eps)``: ``Tensor.norm()`` (p="fro", no
    dim) ends in ``linalg.vector_norm(t, 2)``, called here without its two Python layers (a few
    microseconds a call at SAGAN's tiny layers); the same op on the same input, the same bits."""
    return t / (_vector_norm(t) + eps)


def sagan_sigma(w: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weight W, sigma): the wrapper's power iteration, u and v written through ``.data``
    as it does (so the updates follow it in train and eval), sigma differentiable in W.

    The reference's ops on the same values: its ``w.view(h, -1).data`` is one detached view here
    (made once), its ``u.data`` / ``v.data`` operands are u and v themselves (Parameters without
    gradient: nothing is recorded either way), and its last ``w.view(h, -1)`` (the graph's) is
    made once; the tensors are read from the modules' dicts (``nn.Module.__getattr__`` is Python)."""
    m, name = w._modules["module"], w.name
    params = m._parameters
    u, v, bar = params[name + "_u"], params[name + "_v"], params[name + "_bar"]
    w2 = bar.view(bar.shape[0], -1)
    its = w.power_iterations
    if its:
        w2d = w2.detach()
        w2t = w2d.t()
        for _ in range(its):
            v.data = _l2n(torch.mv(w2t, u))
            u.data = _l2n(torch.mv(w2d, v))
    return bar, u.dot(w2.mv(v))
