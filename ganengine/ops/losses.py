"""Fused GAN loss reductions: adversarial terms (gan_loss, discriminator_loss) and the
CycleGAN L1 terms (cycle_loss), plus the WGAN-GP gradient penalty.

Every loss here is a mean-reduced elementwise function, computed by one two-stage
deterministic reduction over all of its terms at once (per-block partial sums, then a
fixed-order final sum; no float atomics). Two op groups:

* ``adv``: k logit maps, each with its own elementwise loss (mode code below), a target and a
  scale (1/numel times the term weight). Returns the 0-d total and, for the nonlinear modes,
  the elementwise gradient written *in the forward pass*: a logit map is
  small (a 30x30 PatchGAN map), so one extra write saves backward from re-reading x and
  recomputing sigmoid/exp; backward is one multiply by grad_output. The linear modes
  (wgangp, hinge for the generator) have a constant gradient, so they write nothing and
  backward returns an expanded scalar.
* ``l1``: k (prediction, target) image pairs. Forward writes only the total and the k weighted
  terms (for logging); backward recomputes
  sign(pred - target) (torch's sign(0) = 0) from the inputs: images are large, and a gradient
  buffer written in forward would cost a full extra write plus the memory held until backward.

Accumulation is fp32 (fp64 for fp64 inputs); fp16/bf16 inputs are read natively. The result is
returned in the input dtype like torch's losses, except under autocast, where it stays fp32
(what autocast gives for mse_loss / l1_loss / bce_with_logits, without casting the inputs).

Eager gan_loss / discriminator_loss calls on CPU tensors go to one C++ op with its autograd in C++
(the lean entries below, csrc/cpu/losses_autograd.cpp); other eager calls go through a
``torch.autograd.Function`` (about 5 us of Python per call); under
``torch.compile`` and any tracing (make_fx, FakeTensorMode, functionalization, torch.jit.trace,
tensor subclasses: ``_eager.plain_eager``) the same backends run inside ``torch.library.custom_op``s
(``ganengine::adv_loss``, ``ganengine::l1_loss_multi``, ``ganengine::l1_loss_multi_backward``)
with fake impls and registered autograd, so the graph has no breaks. The custom-op layer costs
about 50 us per call in eager mode on this CPU, which is more than the whole loss on a
30x30 map, hence the two entry points over one implementation.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ganengine import _ext
from ganengine.ops import _dispatch, _eager

# elementwise loss codes shared with the kernels (kernels/losses.py, csrc/*/losses.*)
BCE, MSE, HINGE_REAL, HINGE_FAKE, LINEAR = 0, 1, 2, 3, 4
MAX_TERMS = 4  # the CUDA kernels, and Triton's L1 kernel, take up to 4 terms per launch
MAX_TRITON_ADV_TERMS = 2
MODES = ("vanilla", "lsgan", "hinge", "wgangp")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# torch backend: the reference composition
# --------------------------------------------------------------------------------------------
def _torch_term(x: Tensor, mode: int, target: float) -> Tensor:
    """Sum over x of the elementwise loss, in the accumulation dtype."""
    xf = x.to(acc_dtype(x.dtype))
    if mode == BCE:
        return F.binary_cross_entropy_with_logits(xf, torch.full_like(xf, target), reduction="sum")
    if mode == MSE:
        return F.mse_loss(xf, torch.full_like(xf, target), reduction="sum")
    if mode == HINGE_REAL:
        return torch.relu(1.0 - xf).sum()
    if mode == HINGE_FAKE:
        return torch.relu(1.0 + xf).sum()
    if mode == LINEAR:
        return xf.sum() * target
    raise ValueError(f"unknown loss code {mode}")


def torch_adv_grad(x: Tensor, mode: int, target: float) -> Tensor:
    """d(elementwise loss)/dx in the accumulation dtype; differentiable (double backward)."""
    xf = x.to(acc_dtype(x.dtype))
    if mode == BCE:
        return torch.sigmoid(xf) - target
    if mode == MSE:
        return 2.0 * (xf - target)
    # hinge: relu's own backward (threshold_backward: relu'(0) = 0, a NaN logit passes the
    # gradient) applied to 1 -+ x, so a NaN gets eager's -+1 and, under create_graph, the
    # result keeps a grad_fn (its derivative is 0, as eager's) instead of being a constant
    if mode == HINGE_REAL:
        return torch.ops.aten.threshold_backward(torch.full_like(xf, -1.0), 1.0 - xf, 0.0)
    if mode == HINGE_FAKE:
        return torch.ops.aten.threshold_backward(torch.ones_like(xf), 1.0 + xf, 0.0)
    if mode == LINEAR:
        return torch.full_like(xf, target)
    raise ValueError(f"unknown loss code {mode}")


def torch_adv_fwd(xs, modes, targets, scales, want_grad):
    """(0-d total, grads): the reference for losses_adv_fwd."""
    total, grads = None, []
    for x, m, t, s in zip(xs, modes, targets, scales):
        term = _torch_term(x, m, t) * s
        total = term if total is None else total + term
        if want_grad and m != LINEAR:
            grads.append((torch_adv_grad(x, m, t) * s).to(x.dtype).contiguous())
        else:
            grads.append(x.new_empty(0))
    return total, grads


def torch_l1_fwd(preds, targets, scales, want_grad=False):
    """(0-d total, terms [k], grads): the reference for losses_l1_fwd."""
    terms, grads = [], []
    for p, t, s in zip(preds, targets, scales):
        acc = acc_dtype(p.dtype)
        terms.append(F.l1_loss(p.to(acc), t.to(acc), reduction="sum") * s)
        grads.append((torch.sign(p.to(acc) - t.to(acc)) * s).to(p.dtype) if want_grad else p.new_empty(0))
    terms = torch.stack(terms)
    return terms.sum(), terms, grads


def torch_l1_bwd(preds, targets, coef):
    return [(torch.sign(p.to(coef.dtype) - t.to(coef.dtype)) * coef[i]).to(p.dtype).contiguous()
            for i, (p, t) in enumerate(zip(preds, targets))]


# --------------------------------------------------------------------------------------------
# backend dispatch
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _verdicts_cached(device: torch.device, dtype: torch.dtype, k: int, cpp_op: str, triton_max: int) -> dict:
    # The extension's kernel table is fixed once loaded: asking the dispatcher on every call
    # costs more than the whole loss on a 30x30 map.
    triton_why = None
    if k > triton_max:
        triton_why = f"more than {triton_max} terms in one call"
    elif dtype not in _DTYPES:
        triton_why = f"dtype {dtype} is not supported"
    cuda_why = _dispatch.ext_reason(cpp_op, device) if device.type == "cuda" else "needs CUDA tensors"
    if cuda_why is None and k > MAX_TERMS:
        cuda_why = f"more than {MAX_TERMS} terms in one call"
    cpu_why = _dispatch.ext_reason(cpp_op, device) if device.type == "cpu" else "needs CPU tensors"
    return {"triton": triton_why, "cpu": cpu_why, "cuda": cuda_why}


def _verdicts(x: Tensor, k: int, cpp_op: str, triton_max: int = MAX_TERMS) -> dict:
    """The backends' verdicts for ``choose``: one cached dict per call site and tensor kind, shared
    and read-only (a copy per call cost 0.4 us)."""
    return _verdicts_cached(x.device, x.dtype, k, cpp_op, triton_max)


@functools.lru_cache(maxsize=256)
def _const(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    # read-only per-term scales; training repeats the same values, so this is a cache hit
    return torch.tensor(values, dtype=dtype, device=device)


# The C++ ops make non-contiguous inputs contiguous themselves (cheaper than from Python); the
# Triton launchers take contiguous tensors.
def _contig(ts):
    return [t.contiguous() for t in ts]


def adv_fwd(xs, modes, targets, scales, want_grad):
    """Backend forward for the adversarial group: (0-d total, grads list)."""
    # (Triton takes the terms MAX_TRITON_ADV_TERMS at a time, summed in a fixed order)
    backend = _dispatch.choose("gan_loss", xs[0], _verdicts(xs[0], len(xs), "losses_adv_fwd", len(xs)))
    if backend == "triton":
        K = _dispatch.triton_kernels("losses")
        xs, step = _contig(xs), MAX_TRITON_ADV_TERMS
        total, grads = None, []
        for i in range(0, len(xs), step):
            t, g = K.adv_fwd(xs[i:i + step], modes[i:i + step], targets[i:i + step], scales[i:i + step], want_grad)
            total = t if total is None else total + t
            grads += list(g)
        return total, grads
    if backend in ("cpu", "cuda"):
        total, grads = _ext.raw_op("losses_adv_fwd")(list(xs), list(modes), list(targets), list(scales), want_grad)
        return total, list(grads)
    return torch_adv_fwd(xs, modes, targets, scales, want_grad)


def l1_fwd(preds, targets, scales, want_grad=False):
    """Backend forward for the L1 group: (0-d total, terms [k], grads)."""
    backend = _dispatch.choose("cycle_loss", preds[0], _verdicts(preds[0], len(preds), "losses_l1_fwd"))
    if backend == "triton":
        K = _dispatch.triton_kernels("losses")
        return K.l1_fwd(_contig(preds), _contig(targets), scales, want_grad)
    if backend in ("cpu", "cuda"):
        total, terms, grads = _ext.raw_op("losses_l1_fwd")(list(preds), list(targets), list(scales), want_grad)
        return total, terms, list(grads)
    return torch_l1_fwd(preds, targets, scales, want_grad)


def l1_bwd(preds, targets, coef):
    backend = _dispatch.choose("cycle_loss", preds[0], _verdicts(preds[0], len(preds), "losses_l1_bwd"))
    if backend == "triton":
        K = _dispatch.triton_kernels("losses")
        return K.l1_bwd(_contig(preds), _contig(targets), coef.contiguous())
    if backend in ("cpu", "cuda"):
        return list(_ext.raw_op("losses_l1_bwd")(list(preds), list(targets), coef))
    return torch_l1_bwd(preds, targets, coef)


# --------------------------------------------------------------------------------------------
# autograd (shared by the eager Function and the custom ops)
# --------------------------------------------------------------------------------------------
def _is_one(g: Tensor) -> bool:
    # Reading grad_output is free on the CPU (no device sync); it is 1 whenever the loss is
    # summed into the objective unscaled, and then the gradient written in forward is final.
    return g.device.type == "cpu" and g.item() == 1.0


def adv_backward(xs, bufs, modes, targets, scales, g, owned=False, per_numel=False):
    """Gradients of the 0-d total w.r.t. each x, given its 0-d grad_output g.

    ``owned``: the buffers are ours to hand out or scale in place (the eager Function pops
    them from its context, so a second backward recomputes instead). ``per_numel``: each scale
    is a weight to divide by its map's numel (the custom op's, see adv_loss_op)."""
    res, one = [], None
    for x, b, m, t, s in zip(xs, bufs, modes, targets, scales):
        missing = m != LINEAR and (b is None or b.numel() != x.numel())
        if torch.is_grad_enabled() or (missing and not owned):
            # create_graph=True, or the custom op's backward (traced under compile) without a
            # buffer: the differentiable reference formula
            # (per_numel: s / numel in Python, as the eager route's scale, so the same bits; a
            # symbolic float under dynamic shapes, which the graph computes per call)
            res.append((torch_adv_grad(x, m, t) * (g * (s / x.numel() if per_numel else s))).to(x.dtype))
        elif m == LINEAR:  # constant gradient: an expanded scalar, nothing written
            res.append((g * ((s / x.numel() if per_numel else s) * t)).to(x.dtype).expand(x.shape))
        elif owned:  # ours to scale in place; final as it is where grad_output is 1
            if missing:  # the eager Function's second backward (retain_graph; the first took the
                # buffer): the forward's kernel again, so the gradient has the first backward's bits
                b = adv_fwd([x], [m], [t], [s], True)[1][0]
            if one is None:
                one = _is_one(g)
            res.append(b if one else b.mul_(g.to(b.dtype)))
        else:
            res.append(b * g.to(x.dtype))
    return res


def l1_coef(g_total, g_terms, scales, dtype, device, cached=True) -> Tensor:
    """Per-term multiplier of sign(p - t): (dL/dtotal + dL/dterm_i) * scale_i.

    ``cached=False`` under tracing (the custom-op path): a cached real tensor cannot enter a
    fake-tensor graph, a freshly made one becomes a graph constant."""
    sc = _const(tuple(scales), dtype, device) if cached else torch.tensor(scales, dtype=dtype, device=device)
    if g_total is None:
        g_total = torch.zeros((), dtype=dtype, device=device)
    coef = g_total * sc
    if g_terms is not None:
        coef = coef + g_terms * sc
    return coef


def l1_backward_grad_mode(preds, targets, coef):
    acc = coef.dtype
    return [(torch.sign(p.to(acc) - t.to(acc)) * coef[i]).to(p.dtype) for i, (p, t) in enumerate(zip(preds, targets))]


class _AdvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, modes, targets, scales, want_grad, *xs):
        total, bufs = adv_fwd(list(xs), modes, targets, scales, want_grad)
        ctx.save_for_backward(*xs)
        ctx.bufs, ctx.cfg = bufs, (modes, targets, scales)
        return total

    @staticmethod
    def backward(ctx, g):
        bufs, ctx.bufs = ctx.bufs, [None] * len(ctx.bufs)  # handed out: a second backward recomputes
        grads = adv_backward(ctx.saved_tensors, bufs, *ctx.cfg, g, owned=True)
        return (None, None, None, None, *[gx if need else None for gx, need in zip(grads, ctx.needs_input_grad[4:])])


class _L1Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scales, write_grad, *tensors):
        k = len(scales)
        total, terms, bufs = l1_fwd(list(tensors[:k]), list(tensors[k:]), scales, write_grad)
        ctx.save_for_backward(*tensors)
        ctx.scales = scales
        ctx.bufs = bufs if write_grad else None
        ctx.set_materialize_grads(False)  # the terms are for logging: usually no gradient
        # the terms as k separate outputs: split here, untracked, rather than by an unbind
        # node after the Function (one autograd node and k views less per call)
        return (total, *terms.unbind(0))

    @staticmethod
    def backward(ctx, g_total, *g_term):
        k = len(ctx.scales)
        g_terms = None
        if any(g is not None for g in g_term):
            ref = next(g for g in g_term if g is not None)
            g_terms = torch.stack([g if g is not None else torch.zeros_like(ref) for g in g_term])
        saved = ctx.saved_tensors
        if g_total is None and g_terms is None:  # no output had a gradient (undefined grads)
            return (None, None, *[None] * len(saved))
        preds, targets = list(saved[:k]), list(saved[k:])
        bufs, ctx.bufs = ctx.bufs, None  # handed out: a second backward recomputes
        if bufs is not None and g_total is not None and g_terms is None and not torch.is_grad_enabled():
            # gradient written in forward (CPU): final as it is when grad_output is 1
            gp = bufs if _is_one(g_total) else [b.mul_(g_total.to(b.dtype)) for b in bufs]
        else:
            ref = g_total if g_total is not None else g_terms
            coef = l1_coef(g_total, g_terms, ctx.scales, ref.dtype, ref.device)
            if torch.is_grad_enabled():
                gp = l1_backward_grad_mode(preds, targets, coef)
            else:
                gp = l1_bwd(preds, targets, coef)
        need = ctx.needs_input_grad[2:]
        gt = [-gp[i] if need[k + i] else None for i in range(k)]
        return (None, None, *[gp[i] if need[i] else None for i in range(k)], *gt)


# --------------------------------------------------------------------------------------------
# custom ops: the torch.compile path
# --------------------------------------------------------------------------------------------
# ``per_numel``: each of ``scales`` is a weight w_i, the scale being w_i / xs[i].numel(), divided
# inside the op: the public functions' mean scales without a Python float of 1/numel in the graph,
# which under dynamic shapes (torch.compile(dynamic=True), torch.export with a dynamic batch) is a
# symbolic float that the float[] argument would specialise (one graph per batch size)
@torch.library.custom_op("ganengine::adv_loss", mutates_args=())
def adv_loss_op(xs: list[Tensor], modes: list[int], targets: list[float], scales: list[float],
                want_grad: bool, per_numel: bool = False) -> tuple[Tensor, list[Tensor]]:
    if per_numel:  # (the same expression as the eager route's: the same numbers)
        scales = [s / x.numel() for s, x in zip(scales, xs)]
    total, grads = adv_fwd(xs, modes, targets, scales, want_grad)
    # (a gradient not written is an empty tensor: the C++ kernels give one, the others None)
    return total, [x.new_empty(0) if g is None else g for x, g in zip(xs, grads)]


@adv_loss_op.register_fake
def _(xs, modes, targets, scales, want_grad, per_numel=False):
    total = xs[0].new_empty((), dtype=acc_dtype(xs[0].dtype))
    grads = [x.new_empty(x.shape) if (want_grad and m != LINEAR) else x.new_empty(0) for x, m in zip(xs, modes)]
    return total, grads


def _adv_setup(ctx, inputs, output):
    xs, modes, targets, scales, _, per_numel = inputs
    ctx.save_for_backward(*xs)
    ctx.bufs, ctx.cfg, ctx.per_numel = output[1], (modes, targets, scales), per_numel
    ctx.set_materialize_grads(False)  # no zero gradient built for the buffers (one kernel per map)


def _adv_bwd(ctx, g, _g_bufs):
    grads = adv_backward(ctx.saved_tensors, ctx.bufs, *ctx.cfg, g, per_numel=ctx.per_numel)
    return grads, None, None, None, None, None


adv_loss_op.register_autograd(_adv_bwd, setup_context=_adv_setup)


@torch.library.custom_op("ganengine::l1_loss_multi", mutates_args=())
def l1_loss_multi_op(preds: list[Tensor], targets: list[Tensor], scales: list[float],
                     per_numel: bool = False) -> tuple[Tensor, Tensor]:
    if per_numel:  # (weights to divide by each prediction's numel, as adv_loss_op's)
        scales = [s / p.numel() for s, p in zip(scales, preds)]
    total, terms, _ = l1_fwd(preds, targets, scales, False)
    return total, terms


@l1_loss_multi_op.register_fake
def _(preds, targets, scales, per_numel=False):
    acc = acc_dtype(preds[0].dtype)
    return preds[0].new_empty((), dtype=acc), preds[0].new_empty(len(preds), dtype=acc)


@torch.library.custom_op("ganengine::l1_loss_multi_backward", mutates_args=())
def l1_loss_multi_backward_op(preds: list[Tensor], targets: list[Tensor], coef: Tensor) -> list[Tensor]:
    return l1_bwd(preds, targets, coef)


@l1_loss_multi_backward_op.register_fake
def _(preds, targets, coef):
    return [p.new_empty(p.shape) for p in preds]


def _l1_setup(ctx, inputs, output):
    preds, targets, scales, per_numel = inputs
    ctx.save_for_backward(*preds, *targets)
    ctx.scales, ctx.per_numel = scales, per_numel
    ctx.target_needs = [t.requires_grad for t in targets]
    ctx.set_materialize_grads(False)  # the terms are for logging: usually no gradient, as _L1Fn


def _l1_bwd(ctx, g_total, g_terms):
    k = len(ctx.scales)
    saved = ctx.saved_tensors
    preds, targets = list(saved[:k]), list(saved[k:])
    ref = g_total if g_total is not None else g_terms
    scales = ctx.scales
    if ctx.per_numel:  # each weight over its prediction's numel, as the eager route's scales
        scales = [s / p.numel() for s, p in zip(scales, preds)]
    if all(type(s) is float for s in scales):
        coef = l1_coef(g_total, g_terms, scales, ref.dtype, ref.device, cached=False)
    else:  # symbolic floats (dynamic shapes): no tensor made of them (that would specialise), the
        # same products per term as l1_coef's
        g = g_total if g_total is not None else torch.zeros((), dtype=ref.dtype, device=ref.device)
        per_term = []
        for i, sc in enumerate(scales):
            c = g * sc
            per_term.append(c if g_terms is None else c + g_terms[i] * sc)
        coef = torch.stack(per_term)
    if torch.is_grad_enabled():
        gp = l1_backward_grad_mode(preds, targets, coef)
    else:
        gp = l1_loss_multi_backward_op(preds, targets, coef)
    gt = [-gp[i] if ctx.target_needs[i] else None for i in range(k)]
    return gp, gt, None, None


l1_loss_multi_op.register_autograd(_l1_bwd, setup_context=_l1_setup)


# The eager route (ganengine/ops/_eager.py): a plain eager call runs _AdvFn / _L1Fn, the custom
# ops' twins (the same forward bodies adv_fwd / l1_fwd and backwards adv_backward / l1 sign, and
# no custom-op layer); anything that traces (torch.compile, torch.export, make_fx / FakeTensorMode
# or functionalization, torch.jit.trace, tensor subclasses) runs the custom op. The twins are
# written out rather than made by _eager.twin: autograd.Function sees only top-level tensors, not
# the ops' list arguments, and they keep what only eager can do (gradient buffers handed out or
# scaled in place, read grad_output on the CPU, the L1 gradient written in the CPU forward).
def run_adv(xs, modes, targets, scales, per_numel=False) -> Tensor:
    """0-d total in the accumulation dtype, differentiable. ``per_numel``: each scale is a weight
    to divide by its map's numel (the mean losses): in the custom op where the call traces (no
    symbolic 1/numel in the graph, see adv_loss_op), here in eager mode."""
    want_grad = torch.is_grad_enabled() and any(x.requires_grad for x in xs)
    if not _eager.plain_eager(*xs):
        return adv_loss_op(list(xs), list(modes), list(targets), list(scales), want_grad, per_numel)[0]
    if per_numel:
        scales = [s / x.numel() for s, x in zip(scales, xs)]
    return _AdvFn.apply(tuple(modes), tuple(targets), tuple(scales), want_grad, *xs)


def run_l1(preds, targets, scales, per_numel=False) -> tuple[Tensor, Tensor | list[Tensor]]:
    """(0-d total, terms) in the accumulation dtype, differentiable: terms a [k] tensor on the
    custom op (torch.compile, any tracing), a list of k 0-d tensors in plain eager mode.
    ``per_numel``: each scale is a weight to divide by its prediction's numel (as run_adv's)."""
    if not _eager.plain_eager(*preds, *targets):
        return l1_loss_multi_op(list(preds), list(targets), list(scales), per_numel)
    if per_numel:
        scales = [s / p.numel() for s, p in zip(scales, preds)]
    # On the CPU the forward writes scale * sign(p - t) as it reads p and t (one pass instead of
    # two over the images; backward is free when grad_output is 1). On a GPU checking
    # grad_output would synchronise, so backward recomputes the sign instead (same traffic,
    # no gradient buffers held between the passes).
    write_grad = (preds[0].device.type == "cpu" and torch.is_grad_enabled()
                  and any(p.requires_grad for p in preds))
    total, *terms = _L1Fn.apply(tuple(scales), write_grad, *preds, *targets)
    return total, terms


# --------------------------------------------------------------------------------------------
# lean cpu entries
# --------------------------------------------------------------------------------------------
# gan_loss and discriminator_loss on CPU tensors under 'auto' / 'cpu': one call of the C++ ops
# ganengine_C::gan_loss / ::discriminator_loss (csrc/cpu/losses_autograd.cpp: the same
# losses_adv_fwd kernel, the same backward as adv_backward, autograd in C++), which skips the
# Python checks and the autograd.Function above: 1.3-1.8x eager's host time per call at a 4x4 map
# through them, under 1x through the C++ op (docs/losses.md). They decline what they do not serve
# (an empty list or map, mixed dtypes or devices, an unknown or non-lowercase mode, ...) before any
# work; the full route below then serves the call or raises the public error.
_ADV_KERNELS = ("losses_adv_fwd",)
_GAN_REFUSAL = "gan_loss: not served by the C++ entry"
_DISC_REFUSAL = "discriminator_loss: not served by the C++ entry"


def _entry(name: str, logits):
    """The C++ entry ``name`` for ``logits`` (a map or a list of maps), by the first map's device: on
    the CPU the lean entry (_dispatch.lean_op); on CUDA the same entry where the cuda backend is
    the one chosen (_dispatch.cuda_entry; the adversarial losses dispatch as "gan_loss"), else
    None, so that a GPU call the entry would refuse does not pay for the refusal (a C++ exception
    and the message check: about 30 us). Anything not a tensor is asked about, as before (its
    refusals and the dispatcher's conversion errors lead to the full route)."""
    x = logits[0] if type(logits) in (list, tuple) and logits else logits
    if not isinstance(x, Tensor):
        return _dispatch.lean_op(name, _ADV_KERNELS)
    return _dispatch.entry(x, name, "gan_loss", _ADV_KERNELS)


_lean = _eager.lean_ok  # the tensors the lean C++ entries take
_is_compiling = torch.compiler.is_compiling
_last_used = _dispatch.last_used  # (one dict for the process: read, never rebound)


def _plain_maps(logits) -> bool:
    """A non-empty list or tuple of tensors _eager.lean_ok takes (the lean entries' gate for a list of maps)."""
    if type(logits) is not list and type(logits) is not tuple or not logits:
        return False
    for t in logits:
        if not _lean(t):
            return False
    return True


def _entry_backend(xs) -> str:
    """The backend a served entry call ran on: its maps' device."""
    return "cpu" if xs[0].is_cpu else "cuda"


def _lean_declined(e: RuntimeError, prefix: str, xs, mode, real_label, fake_label) -> bool:
    """_dispatch.refused for the loss entries: also declined when the dispatcher could not convert
    the mode or a label (the full route then raises its own error, or converts them itself)."""
    plain = (type(mode) is str and type(xs) in (list, tuple)
             and all(type(v) is float or type(v) is int for v in (real_label, fake_label)))
    return not plain or _dispatch.refused(e, prefix, required=xs)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def _check_mode(mode) -> str:
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode.lower()


def _check_logits(x, name: str, fn: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {tuple(x.shape)}); the mean over an empty tensor is undefined")


def _check_flag(value, name: str, fn: str) -> bool:
    """A bool argument as a Python bool: a bool, NumPy's bool (a real boolean, e.g. a label flip drawn
    as ``np.random.rand() < p``) or the int 0 / 1 (eager-style code passes 1 for True; served so far).
    Anything else raises: by truthiness the string "False" (a CLI or config value) meant True and
    None meant False; a tensor, a float or another int is rejected too."""
    if type(value) is bool:
        return value
    t = type(value)
    if t.__module__ == "numpy" and t.__name__ in ("bool", "bool_"):  # (NumPy 2 names it bool)
        return bool(value)
    if t is int and (value == 0 or value == 1):
        return value == 1
    got = f"{t.__name__} {value!r}" if t in (str, int) else t.__name__
    raise TypeError(f"{fn}: {name} must be a Python bool (True or False; NumPy bools and the ints 0 and 1 "
                    f"are taken too), got {got}")


def _term_code(mode: str, is_real: bool, for_discriminator: bool, real_label: float, fake_label: float):
    """(loss code, target) of one term; the flags are bools (gan_loss checked them)."""
    if mode in ("vanilla", "lsgan"):
        name, label = ("real_label", real_label) if is_real else ("fake_label", fake_label)
        try:
            target = float(label)
        except (TypeError, ValueError, RuntimeError) as exc:  # (the class float() raised: "a" ValueError)
            raise (ValueError if isinstance(exc, ValueError) else TypeError)(
                f"{name} must be a number (the {mode} target), got {label!r}") from None
        return (BCE if mode == "vanilla" else MSE), target
    if mode == "hinge" and for_discriminator:
        return (HINGE_REAL if is_real else HINGE_FAKE), 0.0
    # wgangp, and hinge for the generator: -mean(x) towards "real", +mean(x) towards "fake"
    return LINEAR, (-1.0 if is_real else 1.0)


def _finish(out: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Input dtype like torch's losses; fp32 under autocast (autocast's rule for losses)."""
    if dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(device.type):
        return out.to(dtype)
    return out


def _common(tensors: list[Tensor], fn: str, names: list[str]) -> list[Tensor]:
    dev, dtype = tensors[0].device, tensors[0].dtype
    same = True
    for t, n in zip(tensors, names):
        if t.device != dev:
            raise ValueError(f"{fn}: {n} is on {t.device} but {names[0]} is on {dev}; all inputs must share a device")
        same = same and t.dtype == dtype
    if not same:  # e.g. fp32 images vs fp16 generator outputs under AMP: promote, as torch would
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        tensors = [t.to(dtype) for t in tensors]
    return tensors


def gan_loss(logits: Tensor | list[Tensor] | tuple[Tensor, ...], target_is_real: bool, mode: str = "lsgan",
             for_discriminator: bool = True, *, real_label: float = 1.0, fake_label: float = 0.0) -> Tensor:
    """Mean-reduced adversarial loss of ``logits`` towards the real (or fake) target.

    vanilla: BCE-with-logits against ``real_label``/``fake_label``; lsgan: MSE against them;
    wgangp: -mean(x) if real else +mean(x); hinge: mean(relu(1 - x)) for real and
    mean(relu(1 + x)) for fake when ``for_discriminator``, -mean(x) for the generator
    (``target_is_real=True``; +mean(x) for ``False``). Labels apply to vanilla and lsgan only,
    as in the CycleGAN reference's GANLoss.

    ``logits`` may be a list or tuple of maps (CycleGAN's generator step scores both
    generators' outputs, ``[D_A(fake_B), D_B(fake_A)]``): the result is the sum of each map's
    mean loss, computed in one pass, one autograd node instead of one per map.
    """
    # the flags: bools (a NumPy bool converted), anything else a TypeError naming the argument; the
    # common case, two Python bools, pays two type tests
    if type(target_is_real) is not bool or type(for_discriminator) is not bool:
        target_is_real = _check_flag(target_is_real, "target_is_real", "gan_loss")
        for_discriminator = _check_flag(for_discriminator, "for_discriminator", "gan_loss")
    # the lean route (see _ADV_KERNELS): CPU maps, and CUDA maps where the cuda backend is chosen (_entry)
    # (_eager.lean_ok: plain tensors, or subclasses of concrete sizes; make_fx's symbolic
    # FakeTensors, whose sizes the entry's checks cannot read, take the full route)
    # (written out flat: at a (64, 1) critic output this Python is a third of a call, next to
    # eager's -x.mean(); _entry's work, for the tensors _lean / _plain_maps let through)
    plain = type(logits) is Tensor
    single = plain or isinstance(logits, Tensor)
    if (plain or (_lean(logits) if single else _plain_maps(logits))) and not _is_compiling():
        x = logits if single else logits[0]
        op = (_dispatch.lean_op("gan_loss", _ADV_KERNELS) if x.is_cpu
              else _dispatch.entry(x, "gan_loss", "gan_loss", _ADV_KERNELS))
        if op is not None:
            xs = (logits,) if single else logits
            try:
                total = op(xs, mode, target_is_real, for_discriminator, real_label, fake_label)
            except RuntimeError as e:  # (NotImplementedError is one)
                if not _lean_declined(e, _GAN_REFUSAL, xs, mode, real_label, fake_label):
                    raise
            else:
                _last_used["gan_loss"] = "cpu" if x.is_cpu else "cuda"  # (_entry_backend)
                return total
    fn = "gan_loss"
    mode = _check_mode(mode)
    code, target = _term_code(mode, target_is_real, for_discriminator, real_label, fake_label)
    if isinstance(logits, (list, tuple)):
        if not logits:
            raise ValueError(f"{fn}: logits is an empty {type(logits).__name__}; give at least one map")
        names = [f"logits[{i}]" for i in range(len(logits))]
        for n, x in zip(names, logits):
            _check_logits(x, n, fn)
        xs = _common(list(logits), fn, names)
    else:
        _check_logits(logits, "logits", fn)
        xs = [logits]
    total = run_adv(xs, [code] * len(xs), [target] * len(xs), [1.0] * len(xs), per_numel=True)
    return _finish(total, xs[0].dtype, xs[0].device)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, mode: str = "lsgan",
                       *, real_label: float = 1.0, fake_label: float = 0.0) -> Tensor:
    """0.5 * (gan_loss(real_logits, True) + gan_loss(fake_logits, False)), both in one pass."""
    if (isinstance(real_logits, Tensor) and _lean(real_logits) and isinstance(fake_logits, Tensor)
            and _lean(fake_logits)  # the lean route, as gan_loss's
            and not torch.compiler.is_compiling()):
        op = _entry("discriminator_loss", real_logits)
        if op is not None:
            try:
                total = op(real_logits, fake_logits, mode, real_label, fake_label)
            except RuntimeError as e:
                if not _lean_declined(e, _DISC_REFUSAL, (real_logits, fake_logits), mode, real_label, fake_label):
                    raise
            else:
                _dispatch.last_used["discriminator_loss"] = _entry_backend((real_logits,))
                return total
    mode = _check_mode(mode)
    _check_logits(real_logits, "real_logits", "discriminator_loss")
    _check_logits(fake_logits, "fake_logits", "discriminator_loss")
    real_logits, fake_logits = _common([real_logits, fake_logits], "discriminator_loss", ["real_logits", "fake_logits"])
    cr, tr = _term_code(mode, True, True, real_label, fake_label)
    cf, tf = _term_code(mode, False, True, real_label, fake_label)
    total = run_adv([real_logits, fake_logits], [cr, cf], [tr, tf], [0.5, 0.5], per_numel=True)
    return _finish(total, real_logits.dtype, real_logits.device)


def cycle_loss(real_a: Tensor, rec_a: Tensor, real_b: Tensor, rec_b: Tensor, idt_a: Tensor | None = None,
               idt_b: Tensor | None = None, lambda_a: float = 10.0, lambda_b: float = 10.0,
               lambda_identity: float = 0.5):
    """CycleGAN's L1 terms in one pass. Returns ``(total, terms)``.

    terms: cycle_a = L1(rec_a, real_a) * lambda_a, cycle_b = L1(rec_b, real_b) * lambda_b and,
    when identity images are given, idt_a = L1(idt_a, real_b) * lambda_b * lambda_identity,
    idt_b = L1(idt_b, real_a) * lambda_a * lambda_identity (idt_a = G_A(real_b) in the reference).
    """
    fn = "cycle_loss"
    if (idt_a is None) != (idt_b is None):
        raise ValueError(f"{fn}: give both idt_a and idt_b or neither")
    with_idt = idt_a is not None
    # every distinct input checked once (real_a and real_b serve two terms each)
    named = [("real_a", real_a), ("rec_a", rec_a), ("real_b", real_b), ("rec_b", rec_b)]
    if with_idt:
        named += [("idt_a", idt_a), ("idt_b", idt_b)]
    for n, t in named:
        _check_logits(t, n, fn)
    for pn, p, tn, t in (("rec_a", rec_a, "real_a", real_a), ("rec_b", rec_b, "real_b", real_b)) + (
            (("idt_a", idt_a, "real_b", real_b), ("idt_b", idt_b, "real_a", real_a)) if with_idt else ()):
        if p.shape != t.shape:
            raise ValueError(f"{fn}: {pn} has shape {tuple(p.shape)} but {tn} has shape {tuple(t.shape)}; they must match")
    real_a, rec_a, real_b, rec_b, *idt = _common([t for _, t in named], fn, [n for n, _ in named])
    preds, targets = [rec_a, rec_b], [real_a, real_b]
    weights = [lambda_a, lambda_b]
    names = ("cycle_a", "cycle_b")
    if with_idt:
        preds += idt
        targets += [real_b, real_a]
        weights += [lambda_b * lambda_identity, lambda_a * lambda_identity]
        names += ("idt_a", "idt_b")
    total, terms = _weighted_l1(preds, targets, weights)
    dtype, device = real_a.dtype, real_a.device
    return _finish(total, dtype, device), {n: _finish(t, dtype, device) for n, t in zip(names, terms)}


def _weighted_l1(preds, targets, weights, step=None):
    """(total, k 0-d terms) of sum_i weight_i * mean|pred_i - target_i| in passes of ``step``
    terms. Float weights ride in the kernel's scales (weight_i / pred_i.numel(), divided in
    run_l1: no symbolic 1/numel under dynamic shapes); a tensor weight (a learned or scheduled
    lambda) multiplies the unit-weighted term outside it, so its gradient is kept."""
    tensor_w = any(isinstance(w, Tensor) for w in weights)
    scales = [1.0 if tensor_w else float(w) for w in weights]
    step = step or len(preds)
    total, terms = None, []
    for i in range(0, len(preds), step):
        t, ts = run_l1(preds[i:i + step], targets[i:i + step], scales[i:i + step], per_numel=True)
        total = t if total is None else total + t
        terms += list(ts.unbind(0) if isinstance(ts, Tensor) else ts)  # [k] tensor (compiled) or k 0-d tensors
    if tensor_w:
        terms = [t * w for t, w in zip(terms, weights)]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
    return total, terms


def cycle_synthesized_loss(real_a: Tensor, rec_a: Tensor, real_b: Tensor, rec_b: Tensor, fake_a: Tensor,
                           fake_b: Tensor, idt_a: Tensor | None = None, idt_b: Tensor | None = None,
                           lambda_a: float = 10.0, lambda_b: float = 10.0, lambda_identity: float = 0.5,
                           lambda_cs: float = 30.0):
    """CSGAN's L1 terms (Kancharagunta & Dubey 2019): :func:`cycle_loss`'s terms plus the
    cycle-synthesized ones, all in one pass. Returns ``(total, terms)`` with the keys of
    ``cycle_loss`` and cs_a = L1(fake_a, rec_a.detach()) * lambda_cs, cs_b = L1(fake_b,
    rec_b.detach()) * lambda_cs (fake_a = G_B(real_b) is the image synthesised in domain A,
    rec_a = G_B(G_A(real_a)) the cycled one; the reference detaches the cycled image).
    """
    fn = "cycle_synthesized_loss"
    for n, t in (("fake_a", fake_a), ("fake_b", fake_b)):
        _check_logits(t, n, fn)
    for pn, p, tn, t in (("fake_a", fake_a, "rec_a", rec_a), ("fake_b", fake_b, "rec_b", rec_b)):
        if p.shape != t.shape:
            raise ValueError(f"{fn}: {pn} has shape {tuple(p.shape)} but {tn} has shape {tuple(t.shape)}; they must match")
    if (idt_a is None) != (idt_b is None):
        raise ValueError(f"{fn}: give both idt_a and idt_b or neither")
    named = [("real_a", real_a), ("rec_a", rec_a), ("real_b", real_b), ("rec_b", rec_b)]
    for n, t in named + ([("idt_a", idt_a), ("idt_b", idt_b)] if idt_a is not None else []):
        _check_logits(t, n, fn)
    for pn, p, tn, t in (("rec_a", rec_a, "real_a", real_a), ("rec_b", rec_b, "real_b", real_b)) + (
            (("idt_a", idt_a, "real_b", real_b), ("idt_b", idt_b, "real_a", real_a)) if idt_a is not None else ()):
        if p.shape != t.shape:
            raise ValueError(f"{fn}: {pn} has shape {tuple(p.shape)} but {tn} has shape {tuple(t.shape)}; they must match")
    tensors = [real_a, rec_a, real_b, rec_b, fake_a, fake_b] + ([idt_a, idt_b] if idt_a is not None else [])
    real_a, rec_a, real_b, rec_b, fake_a, fake_b, *idt = _common(tensors, fn, ["real_a", "rec_a", "real_b", "rec_b",
                                                                              "fake_a", "fake_b", "idt_a", "idt_b"])
    preds, targets = [rec_a, rec_b, fake_a, fake_b], [real_a, real_b, rec_a.detach(), rec_b.detach()]
    weights = [lambda_a, lambda_b, lambda_cs, lambda_cs]
    names = ["cycle_a", "cycle_b", "cs_a", "cs_b"]
    if idt:
        preds += idt
        targets += [real_b, real_a]
        weights += [lambda_b * lambda_identity, lambda_a * lambda_identity]
        names += ["idt_a", "idt_b"]
    # the CPU kernel takes any number of terms; the GPU kernels MAX_TERMS per launch
    step = len(preds) if real_a.device.type == "cpu" else MAX_TERMS
    total, terms = _weighted_l1(preds, targets, weights, step)
    dtype, device = real_a.dtype, real_a.device
    return _finish(total, dtype, device), {n: _finish(t, dtype, device) for n, t in zip(names, terms)}


def _check_alpha(alpha, real: Tensor, fn: str) -> None:
    """alpha: a number, or a tensor of real's rank broadcastable to real (one value per sample is
    (N, 1, ..., 1)); a (N,) vector would broadcast along real's last axis instead."""
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        return
    per_sample = (real.shape[0],) + (1,) * (real.dim() - 1)
    ok = isinstance(alpha, Tensor) and (alpha.dim() == 0 or alpha.dim() == real.dim())
    if ok:
        try:
            ok = torch.broadcast_shapes(alpha.shape, real.shape) == real.shape
        except RuntimeError:
            ok = False
    if not ok:
        got = tuple(alpha.shape) if isinstance(alpha, Tensor) else type(alpha).__name__
        raise ValueError(f"{fn}: alpha must be a number or a tensor of real's rank that broadcasts to real "
                         f"{tuple(real.shape)}, e.g. {per_sample} for one value per sample; got {got}")


def gradient_penalty(discriminator, real: Tensor, fake: Tensor, weight: float = 10.0, *,
                     alpha: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP: ``weight * mean_i (||dD(x_hat)/dx_hat||_2 - 1)^2``, x_hat = alpha*real + (1-alpha)*fake.

    One alpha ~ U[0, 1) per sample (or the ``alpha`` given, broadcastable to ``real``); real and
    fake are detached (the penalty trains D only, as StarGAN's ``.data``); the gradient is taken
    with ``create_graph=True`` so the result backpropagates into D's parameters; it is flattened
    per sample (``view(N, -1)``, as both references) and its 2-norm is
    ``torch.linalg.vector_norm``, which equals StarGAN's ``sqrt(sum(g**2))`` and differs from
    CycleGAN's ``(g + 1e-16).norm(2, dim=1)`` by at most 1e-16 * sqrt(numel per sample): that
    epsilon guards the norm's gradient at a zero gradient, which vector_norm defines as 0.
    A discriminator returning a tuple (StarGAN's ``(out_src, out_cls)``) is penalised on its
    first output.
    """
    fn = "gradient_penalty"
    _check_logits(real, "real", fn)
    _check_logits(fake, "fake", fn)
    if real.shape != fake.shape:
        raise ValueError(f"{fn}: real has shape {tuple(real.shape)} but fake has shape {tuple(fake.shape)}; they must match")
    if real.dim() == 0 or real.numel() == 0:
        raise ValueError(f"{fn}: real must be a non-empty batch (N, ...) with one sample per row, got shape "
                         f"{tuple(real.shape)}")
    real, fake = real.detach(), fake.detach()
    n = real.shape[0]
    if alpha is None:
        alpha = torch.rand((n,) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype, generator=generator)
    else:
        _check_alpha(alpha, real, fn)
    with torch.enable_grad():
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        out = discriminator(x_hat)
        if isinstance(out, (tuple, list)):
            if not out:
                raise ValueError(f"{fn}: the discriminator returned an empty {type(out).__name__}; the penalty "
                                 "needs its scores (a tuple's first output) as a non-empty tensor computed from "
                                 "the input")
            out = out[0]
        if not isinstance(out, Tensor) or out.numel() == 0 or not out.requires_grad:
            what = (type(out).__name__ if not isinstance(out, Tensor) else
                    f"an empty tensor of shape {tuple(out.shape)}" if out.numel() == 0 else "a tensor that does not "
                    "depend on its input")
            raise ValueError(f"{fn}: the discriminator returned {what}; the penalty needs its scores as a "
                             "non-empty tensor computed from the input")
        (grad,) = torch.autograd.grad(out, x_hat, grad_outputs=torch.ones_like(out), create_graph=True,
                                      allow_unused=True)
        if grad is None:  # (scores computed from the parameters only: a D that detaches its input)
            raise ValueError(f"{fn}: the discriminator's output does not depend on its input (does it detach "
                             "it?); the penalty needs d(scores)/d(input)")
        norm = torch.linalg.vector_norm(grad.reshape(n, -1).float() if grad.dtype in (torch.float16, torch.bfloat16) else grad.reshape(n, -1), 2, dim=1)
        return weight * ((norm - 1.0) ** 2).mean()


# ----------------------------------------------------------------------------- fake impls of the C++ ops
# (the lean entries run only outside torch.compile; these let a FakeTensorMode trace them)
if _ext.loaded() and _ext.has_kernel("losses_adv_fwd", "CPU"):
    @torch.library.register_fake("ganengine_C::losses_adv_fwd")
    def _(xs, modes, targets, scales, want_grad):
        total = xs[0].new_empty((), dtype=acc_dtype(xs[0].dtype))
        return total, [x.new_empty(x.shape) if (want_grad and m != LINEAR) else x.new_empty(0)
                       for x, m in zip(xs, modes)]

if _ext.loaded() and _ext.has_kernel("losses_l1_fwd", "CPU"):
    @torch.library.register_fake("ganengine_C::losses_l1_fwd")
    def _(preds, targets, scales, want_grad):
        acc = acc_dtype(preds[0].dtype)
        return (preds[0].new_empty((), dtype=acc), preds[0].new_empty((len(preds),), dtype=acc),
                [p.new_empty(p.shape) if want_grad else p.new_empty(0) for p in preds])

if _ext.loaded() and _ext.has_kernel("gan_loss", "CompositeExplicitAutograd"):
    def _lean_fake(x):
        half = x.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled("cpu")
        return x.new_empty((), dtype=x.dtype if half else acc_dtype(x.dtype))

    @torch.library.register_fake("ganengine_C::gan_loss")
    def _(logits, mode, target_is_real, for_discriminator, real_label, fake_label):
        return _lean_fake(logits[0])

    @torch.library.register_fake("ganengine_C::discriminator_loss")
    def _(real_logits, fake_logits, mode, real_label, fake_label):
        return _lean_fake(real_logits)
