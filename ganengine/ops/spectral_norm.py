"""Spectral normalisation: the power iteration, sigma and ``weight / sigma`` of one weight or of
many at once (a whole model's layers in one call), with dispatch, autograd and custom ops.

Numerics (``torch.nn.utils.parametrizations.spectral_norm``): the weight is the matrix
M = weight with ``dim`` moved to the front, flattened to (H, -1). With state vectors u (H) and
v (Wd), a power iteration is ``u = normalize(M v); v = normalize(M^H u)`` (F.normalize:
``x / max(||x||, eps)``), under no_grad; then ``sigma = vdot(u, M v)`` with u and v constants
(so the gradient reaches the weight through sigma: d sigma / dM = u v^T) and the result is
``weight / sigma``. In eval mode the state is used without iterating.

A call is described by ``(first, steps)``: ``steps`` half steps alternating U (u from v) and V
(v from u), starting with ``first``:
  * PyTorch's parametrization, state (u, v): first U, 2n steps;
  * only u given (the contract's ``spectral_norm_weight(weight, u)``): v = normalize(M^H u)
    first, i.e. first V, 2n + 1 steps: bit-identical to the parametrization whenever its stored
    v is the one it derived from u (always true after any iteration with the current weight);
  * ``order="classic"`` (the hook-based ``torch.nn.utils.spectral_norm``, BigGAN's and SAGAN's
    own layers): ``v = normalize(M^T u); u = normalize(M v)`` per iteration: first V, 2n steps;
  * eval (no iteration): steps 0, sigma directly from the stored (u, v).

Backends:
  torch   PyTorch's own composition, op for op (``F.normalize(torch.mv(...), out=...)``, the
          clones, ``vdot``, the division) with PyTorch's autograd: bit-identical to the
          parametrization, forward and backward; the reference.
  cpu     ganengine._C (csrc/cpu/spectral_norm.cpp), fp32/fp64, ``dim=0`` contiguous weights.
  triton  kernels/spectral_norm.py: every layer of a group in 2n + 1 launches (train) or 2
          (eval), backward in 2; any strides, fp16/bf16/fp32/fp64.
Both native backends take sigma from the last half step (``||s||^2 / max(||s||, eps)``, equal to
``u . M v`` in exact arithmetic) instead of a third pass over M, accumulate in fp32 (fp64 for
fp64), and give the same bits for a layer alone or in a group. Their backward is
``dW = g / sigma + (g_sigma - <g, W> / sigma^2) u v^T``; under ``create_graph=True`` it is the
differentiable torch formula instead (double backward, e.g. R1 through the discriminator's
weights' gradients).

Eager calls go through one ``torch.autograd.Function`` per group (cheap on the host), or, when
the call records no graph (no_grad, eval, a D's weights frozen in the G step), straight to the
same native forward; under ``torch.compile`` a functional custom op ``ganengine::spectral_norm``
(fake impl, registered autograd) serves one layer at a time; under a torch.func transform
(functionalize, grad, vmap...) PyTorch's own composition (``functorch_layer``: no transform takes
that autograd.Function).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ganengine import _ext
from ganengine.ops import _dispatch, _eager

U_STEP, V_STEP = 0, 1
ORDERS = ("pytorch", "classic")
_NATIVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- shapes
def weight_matrix(weight: Tensor, dim: int) -> Tensor:
    """PyTorch's ``_SpectralNorm._reshape_weight_to_matrix``: ``dim`` first, then flatten."""
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.dim()) if d != dim))
    return weight.flatten(1)


def plan(order: str, n_power_iterations: int, has_v: bool) -> tuple[int, int]:
    """(first half step, number of half steps) for a call; see the module docstring."""
    n = int(n_power_iterations)
    if order == "classic":
        if n == 0 and not has_v:
            return V_STEP, 1
        return V_STEP, 2 * n
    if has_v:
        return U_STEP, 2 * n
    return V_STEP, 2 * n + 1


def _merge(sizes, strides):
    """Stride of the dims flattened into one run, or None if they do not merge."""
    dims = [(s, st) for s, st in zip(sizes, strides) if s != 1]
    if not dims:
        return 0
    for (_, st_a), (s_b, st_b) in zip(dims, dims[1:]):
        if st_a != s_b * st_b:
            return None
    return dims[-1][1]


def matrix_layout(shape, strides, dim: int):
    """(H, Wd, K, s_r, s_1, s_2): matrix element (r, c) of ``weight_matrix`` lives at
    ``r * s_r + (c // K) * s_1 + (c % K) * s_2``; None if the strides cannot say it."""
    h, s_r = shape[dim], strides[dim]
    rest = [(shape[d], strides[d]) for d in range(len(shape)) if d != dim]
    wd = 1
    for s, _ in rest:
        wd *= s
    whole = _merge([s for s, _ in rest], [st for _, st in rest])
    if whole is not None:  # one run: K = Wd
        return h, wd, max(wd, 1), s_r, 0, whole
    inner = _merge([s for s, _ in rest[1:]], [st for _, st in rest[1:]])
    if inner is None:
        return None
    return h, wd, max(wd // rest[0][0], 1), s_r, rest[0][1], inner


# matrix_layout costs ~3 us of Python; the hot paths (a gradient's layout on every backward) ask
# it on a weight's few shapes and strides (ints only: tensors of the eager route)
_matrix_layout_cached = functools.lru_cache(maxsize=1024)(matrix_layout)


def _contig_strides(shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


# ----------------------------------------------------------------------------- torch backend
def torch_iterate(wmat: Tensor, u: Tensor, v: Tensor | None, first: int, steps: int, eps: float):
    """The half steps on the buffers ``u``/``v`` in place (PyTorch's ``_power_method`` ops);
    returns (u, v). ``v`` may be None when the first step is V."""
    with torch.no_grad():
        side = first
        for _ in range(steps):
            if side == U_STEP:
                u = F.normalize(torch.mv(wmat, v), dim=0, eps=eps, out=u)
            elif v is None:
                v = F.normalize(torch.mv(wmat.H, u), dim=0, eps=eps)
            else:
                v = F.normalize(torch.mv(wmat.H, u), dim=0, eps=eps, out=v)
            side ^= 1
    return u, v


def torch_sigma(wmat: Tensor, u: Tensor, v: Tensor, order: str = "pytorch") -> Tensor:
    """sigma with u, v constants: ``vdot(u, mv(M, v))`` (``dot`` for the classic order)."""
    if order == "classic":
        return torch.dot(u, torch.mv(wmat, v))
    return torch.vdot(u, torch.mv(wmat, v))


def _torch_call(weight, u, v, first, steps, eps, dim, order, in_place):
    """PyTorch's composition. ``in_place``: u/v are the state buffers and are updated (module);
    else they are cloned first (functional). Returns (w_sn, u_new, v_new, sigma)."""
    wmat = weight_matrix(weight, dim)
    if not in_place:  # (detached: u and v are constants of the functional call, as on every backend)
        u = u.detach().clone(memory_format=torch.contiguous_format)
        v = v.detach().clone(memory_format=torch.contiguous_format) if v is not None else None
    u, v = torch_iterate(wmat, u, v, first, steps, eps)
    # PyTorch clones before use so that a later in-place update cannot break this graph
    uc = u.clone(memory_format=torch.contiguous_format)
    vc = v.clone(memory_format=torch.contiguous_format)
    sigma = torch_sigma(wmat, uc, vc, order)
    return weight / sigma, u, v, sigma


def _reference_grads(weights, dims, u_outs, v_outs, grads, gsigs, needs):
    """Differentiable torch backward (create_graph=True): sigma recomputed from u, v."""
    out = []
    for w, d, u, v, g, gs, need in zip(weights, dims, u_outs, v_outs, grads, gsigs, needs):
        if not need or (g is None and gs is None):
            out.append(None)
            continue
        with torch.enable_grad():
            sigma = torch.vdot(u, torch.mv(weight_matrix(w, d), v))
            outs, gouts = [], []
            if g is not None:
                outs.append(w / sigma)
                gouts.append(g)
            if gs is not None:
                outs.append(sigma)
                gouts.append(gs)
            (dw,) = torch.autograd.grad(outs, [w], gouts, create_graph=True)
        out.append(dw)
    return out


# ----------------------------------------------------------------------------- torch.func transforms
# Under a torch.func transform (functionalize, grad, vjp, jacrev, jvp, vmap) an autograd.Function
# needs the forward / setup_context split, and even then PyTorch has no functionalize rule for one
# ("NYI: Functionalize rule for custom_function_call"); the split also costs eager ~15 us a call
# (apply binds the arguments through inspect.signature). So calls made under a transform take
# PyTorch's own composition, written functionally (the transforms see plain ops: functionalize,
# grad, jvp and vmap all have rules for them), and eager keeps its one-node Function.
functorch_active = torch._C._are_functorch_transforms_active


def functorch_layer(weight: Tensor, u: Tensor, v: Tensor | None, first: int, steps: int, eps: float, dim: int,
                    order: str, write_state: bool):
    """(w_sn, u_new, v_new, sigma) of one layer with PyTorch's ops (the same bits as its
    parametrization). Writing the state, PyTorch's own in-place iteration (``F.normalize(...,
    out=u)``: what torch.func.grad lets a function do to a captured buffer); where a transform
    has no rule for that (vmap: ``div.out``) the iteration in new tensors, then ``copy_``
    (a batched state takes a batched update). Without a write, new tensors throughout."""
    if write_state and steps > 0:
        try:
            return _torch_call(weight, u, v, first, steps, eps, dim, order, True)
        except RuntimeError as e:
            if "Batching rule" not in str(e) and "vmap" not in str(e):
                raise
    wmat = weight_matrix(weight, dim)
    un, vn = u, v
    with torch.no_grad():
        side = first
        for _ in range(steps):
            if side == U_STEP:
                un = F.normalize(torch.mv(wmat, vn), dim=0, eps=eps)
            else:
                vn = F.normalize(torch.mv(wmat.H, un), dim=0, eps=eps)
            side ^= 1
    sigma = torch_sigma(wmat, un, vn, order)
    if write_state and steps > 0:
        try:
            with torch.no_grad():
                u.copy_(un)
                if v is not None:
                    v.copy_(vn)
        except RuntimeError as e:
            raise RuntimeError(
                "spectral_norm under torch.vmap: the power iteration writes its new u / v into the state buffers "
                f"in place, but the weight is batched and its state (u {tuple(u.shape)}) is not, so B estimates "
                "would go into one buffer: batch the buffers with the weights (functional_call with stacked "
                "buffers), or call the module in eval mode (no iteration, nothing written)") from e
    else:  # (the functional call's outputs are new tensors, as _torch_call's clones)
        un = un.clone() if un is u else un
        vn = vn.clone() if vn is v else vn
    return weight / sigma, un, vn, sigma


def functorch_apply(cfg, *weights):
    """``SpectralNormFn.apply``'s outputs (L normalised weights, L sigmas, L u, L v) from
    ``functorch_layer`` per layer (its callers outside this module apply it directly)."""
    _, dims, us, vs, first, steps, eps, write_state = cfg
    outs = [functorch_layer(w, u, v, first, steps, eps, d, "pytorch", write_state)
            for w, d, u, v in zip(weights, dims, us, vs)]
    return (*(o[0] for o in outs), *(o[3] for o in outs), *(o[1] for o in outs), *(o[2] for o in outs))


# ----------------------------------------------------------------------------- backend choice
@functools.lru_cache(maxsize=256)
def _verdicts_cached(device: torch.device, dtype: torch.dtype, ndim: int, dim: int, contiguous: bool,
                     layout_ok: bool) -> dict:
    """The verdicts _dispatch.choose reads (shared: never mutated)."""
    if ndim < 2:
        why = "1-D weights are normalised by their norm (torch path)"
        return {"triton": why, "cpu": why}
    triton = None if dtype in _NATIVE_DTYPES else f"dtype {dtype} is not supported"
    if triton is None and not layout_ok:
        triton = "the weight's strides do not flatten to a matrix view"
    cpu = _dispatch.ext_reason("spectral_norm_fwd", device) if device.type == "cpu" else "needs CPU tensors"
    if cpu is None and dtype not in (torch.float32, torch.float64):
        cpu = f"the C++ kernels are fp32/fp64, got {dtype}"
    if cpu is None and (dim != 0 or not contiguous):
        cpu = "the C++ kernels take contiguous weights normalised over dim 0"
    return {"triton": triton, "cpu": cpu}


def choose_backend(weight: Tensor, dim: int) -> str:
    # a contiguous weight normalised over dim 0 is always one matrix run (matrix_layout: ~3 us)
    contiguous, ndim = weight.is_contiguous(), weight.dim()
    layout_ok = (ndim < 2 or (dim == 0 and contiguous)
                 or matrix_layout(weight.shape, weight.stride(), dim) is not None)
    return _dispatch.choose("spectral_norm", weight,
                            _verdicts_cached(weight.device, weight.dtype, ndim, dim, contiguous, layout_ok))


# ----------------------------------------------------------------------------- native backends
def _kernels():
    return _dispatch.triton_kernels("spectral_norm")


class _TritonLayoutCache:
    """Device tables of a layer list, rebuilt only when a pointer, shape or stride changes."""

    def __init__(self, size: int = 64):
        self.size = size
        self.entries: dict = {}

    def get1(self, w, d, u, v):
        """get() for one layer, with the same key."""
        key = ((w.data_ptr(), w.shape, w.stride(), d, u.data_ptr(), v.data_ptr() if v is not None else 0),)
        hit = self.entries.get(key)
        return hit if hit is not None else self._build(key, [w], [d], [u], [v])

    def get(self, weights, dims, us, vs):
        # (torch.Size hashes and compares as the tuple of its ints: no tuple() copies per call)
        key = tuple((w.data_ptr(), w.shape, w.stride(), d, u.data_ptr(),
                     v.data_ptr() if v is not None else 0) for w, d, u, v in zip(weights, dims, us, vs))
        hit = self.entries.get(key)
        return hit if hit is not None else self._build(key, weights, dims, us, vs)

    def _build(self, key, weights, dims, us, vs):
        K = _kernels()
        layouts, ptrs = [], []
        for w, d, u, v in zip(weights, dims, us, vs):
            h, wd, k, sr, s1, s2 = matrix_layout(w.shape, w.stride(), d)
            _, _, k_out, o_r, o1, o2 = matrix_layout(w.shape, _contig_strides(w.shape), d)
            layouts.append((h, wd, k, sr, s1, s2, k_out, o_r, o1, o2))
            ptrs.append((w.data_ptr(), u.data_ptr(), (v if v is not None else u).data_ptr()))
        hit = K.Layout(layouts, ptrs, weights[0].device)
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = hit
        return hit


_layouts = _TritonLayoutCache()


def _split(flat: Tensor, offsets, which: int, shapes=None):
    """The per-layer pieces of a flat buffer (several layers: one layer takes its buffers whole,
    native_forward / native_backward)."""
    out = []
    for i, off in enumerate(offsets):
        start, n = off[which], off[3 + which]
        piece = flat[start:start + n]
        out.append(piece.view(shapes[i]) if shapes is not None else piece)
    return out


def native_forward(backend, weights, dims, us, vs, first, steps, eps, write_state):
    """(w_sns, u_outs, v_outs, sigma[L] in the accumulation dtype, aux for backward)."""
    if backend == "triton":
        K = _kernels()
        if len(weights) == 1:  # one layer (the functional call, a module's own): no lists, no slices
            w, u, v = weights[0], us[0], vs[0]
            u = u if u.is_contiguous() else u.contiguous()
            v = v if (v is None or v.is_contiguous()) else v.contiguous()
            layout = _layouts.get1(w, dims[0], u, v)
            wout, uout, vout, sigma = K.forward(layout, w.dtype, w.device, first, steps, float(eps), write_state,
                                                w.shape)
            return [wout], [uout], [vout], sigma, (layout, uout, vout)
        # the kernels read the state vectors through raw pointers: they must be dense vectors
        us = [u if u.is_contiguous() else u.contiguous() for u in us]
        vs = [v if (v is None or v.is_contiguous()) else v.contiguous() for v in vs]
        layout = _layouts.get(weights, dims, us, vs)
        wout, uout, vout, sigma = K.forward(layout, weights[0].dtype, weights[0].device, first, steps, float(eps),
                                            write_state)
        w_sns = _split(wout, layout.offsets, 2, [w.shape for w in weights])
        return w_sns, _split(uout, layout.offsets, 0), _split(vout, layout.offsets, 1), sigma, (layout, uout, vout)
    # (the C++ kernels too read dense state vectors; a V-first plan never reads v: u as placeholder)
    us = [u if u.is_contiguous() else u.contiguous() for u in us]
    vs = [u if v is None else (v if v.is_contiguous() else v.contiguous()) for v, u in zip(vs, us)]
    # (the raw builtin, not the overload packet: ~1 us less; its lists come back as new lists)
    w_sns, u_outs, v_outs, sigma = _ext.raw_op("spectral_norm_fwd")(
        weights if type(weights) is list else list(weights), us, vs, first, steps, float(eps), write_state)
    return w_sns, u_outs, v_outs, sigma, None


def native_backward(backend, aux, weights, dims, u_outs, v_outs, sigma, grads, gsigs):
    """dW per layer (None where neither output had a gradient)."""
    if backend == "triton" and len(weights) == 1:  # one layer: no lists, no slices
        g, gs, w = grads[0], gsigs[0], weights[0]
        if g is None and gs is None:
            return [None]
        if g is None:
            g = torch.zeros_like(w)
        lay = _matrix_layout_cached(g.shape, g.stride(), dims[0])
        if lay is None:
            g = g.contiguous()
            lay = _matrix_layout_cached(g.shape, g.stride(), dims[0])
        layout, uout, vout = aux
        gs_vec = None if gs is None else gs.to(sigma.dtype).reshape(1)
        return [_kernels().backward(layout, [g], [lay[2:]], gs_vec, sigma, uout, vout, w.dtype, w.shape)]
    live = [i for i, (g, gs) in enumerate(zip(grads, gsigs)) if g is not None or gs is not None]
    out = [None] * len(weights)
    if not live:
        return out
    if all(gs is None for gs in gsigs):  # the usual case
        gs_vec = None if backend == "triton" else sigma.new_zeros(len(gsigs))
    else:
        gs_vec = torch.stack([gs.to(sigma.dtype) if gs is not None else sigma.new_zeros(()) for gs in gsigs])
    full = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, weights)]
    if backend == "triton":
        K = _kernels()
        layout, uout, vout = aux
        gl = []
        for i, (g, d) in enumerate(zip(full, dims)):
            lay = _matrix_layout_cached(g.shape, g.stride(), d) if g.dtype == full[0].dtype else None
            if lay is None:
                full[i] = g = g.to(full[0].dtype).contiguous()
                lay = _matrix_layout_cached(g.shape, g.stride(), d)
            gl.append(lay[2:])
        dw = K.backward(layout, full, gl, gs_vec, sigma, uout, vout, weights[0].dtype)
        dws = _split(dw, layout.offsets, 2, [w.shape for w in weights])
    else:
        dws = _ext.raw_op("spectral_norm_bwd")(full, gs_vec, weights if type(weights) is list else list(weights),
                                               u_outs if type(u_outs) is list else list(u_outs),
                                               v_outs if type(v_outs) is list else list(v_outs), sigma)
    for i in live:
        out[i] = dws[i]
    return out


def _sigmas(sigma: Tensor, weights) -> list:
    """sigma[L] (accumulation dtype) as one scalar per layer in its weight's dtype."""
    if len(weights) == 1:  # (a view: half an unbind's cost)
        s, dtype = sigma.view(()), weights[0].dtype
        return [s if s.dtype == dtype else s.to(dtype)]
    return [s if s.dtype == w.dtype else s.to(w.dtype) for s, w in zip(sigma.unbind(0), weights)]


class SpectralNormFn(torch.autograd.Function):
    """One autograd node for a group of layers on a native backend.

    ``apply(cfg, *weights)`` with cfg = (backend, dims, us, vs, first, steps, eps, write_state)
    returns L normalised weights, then L sigmas (weight dtype), then the L u and L v used
    (not differentiable). Under a torch.func transform ``apply`` runs ``functorch_apply``
    instead (see there): one more Python call per eager apply (~0.3 us), for every caller
    (biggan_ops applies it directly)."""

    @classmethod
    def apply(cls, cfg, *weights):
        if functorch_active():
            return functorch_apply(cfg, *weights)
        return _fn_apply(cfg, *weights)

    @staticmethod
    def forward(ctx, cfg, *weights):
        backend, dims, us, vs, first, steps, eps, write_state = cfg
        w_sns, u_outs, v_outs, sigma, aux = native_forward(backend, weights, dims, us, vs, first, steps, eps,
                                                           write_state)
        ctx.save_for_backward(*weights)
        ctx.cfg = (backend, dims, u_outs, v_outs, sigma, aux)
        ctx.set_materialize_grads(False)
        sigmas = _sigmas(sigma, weights)
        ctx.mark_non_differentiable(*u_outs, *v_outs)
        return (*w_sns, *sigmas, *u_outs, *v_outs)

    @staticmethod
    def backward(ctx, *grads):
        weights = ctx.saved_tensors
        backend, dims, u_outs, v_outs, sigma, aux = ctx.cfg
        n = len(weights)
        g_w, g_s = grads[:n], grads[n:2 * n]
        needs = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():
            dws = _reference_grads(weights, dims, u_outs, v_outs, g_w, g_s, needs)
        else:
            dws = native_backward(backend, aux, weights, dims, u_outs, v_outs, sigma, g_w, g_s)
            dws = [d if need else None for d, need in zip(dws, needs)]
        return (None, *dws)


# autograd.Function's own (C) apply, bound to SpectralNormFn: what the override above calls eagerly
_fn_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, SpectralNormFn)


# ----------------------------------------------------------------------------- custom ops (compile)
@torch.library.custom_op("ganengine::spectral_norm", mutates_args=())
def spectral_norm_op(weight: Tensor, u: Tensor, v: Tensor | None, first: int, steps: int, eps: float, dim: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Functional: (weight / sigma, u used, v used, sigma) for one layer; state not written.
    ``first``/``steps`` as ``plan`` gives them: a plan starting with a U step reads v."""
    if v is None and (first == U_STEP or steps == 0):
        raise ValueError(f"ganengine::spectral_norm: first={first}, steps={steps} reads v (a U step first, or sigma "
                         f"from u and v directly), but v is None: give v, or start with a V step (first={V_STEP}, "
                         "steps >= 1), as plan() does without v")
    backend = choose_backend(weight, dim)
    if backend == "torch":
        w_sn, u_new, v_new, sigma = _torch_call(weight, u, v, first, steps, eps, dim, "pytorch", False)
        return w_sn, u_new, v_new.clone(), sigma
    w_sns, u_outs, v_outs, sigma, _ = native_forward(backend, [weight], [dim], [u], [v], first, steps, eps, False)
    return w_sns[0].clone(), u_outs[0].clone(), v_outs[0].clone(), sigma[0].to(weight.dtype, copy=True)


# fakes of the C++ kernels (the lean entry's C++ autograd calls them through the dispatcher: under a
# FakeTensorMode they need their own, as the other families register theirs)
if _ext.loaded() and _ext.has_kernel("spectral_norm_fwd", "CPU"):
    def _sn_fwd_fake(weights, us, vs, first, steps, eps, write_state):
        return ([w.new_empty(w.shape) for w in weights], [u.new_empty(u.shape) for u in us],
                [w.new_empty((w.numel() // w.shape[0],)) for w in weights], weights[0].new_empty((len(weights),)))

    torch.library.register_fake("ganengine_C::spectral_norm_fwd")(_sn_fwd_fake)
    # its out-of-place twin: spectral_norm_fwd's Functionalize kernel (csrc/cpu/spectral_norm.cpp)
    # runs it under AOTAutograd and hands u_out / v_out over as the new state
    if _ext.has_kernel("spectral_norm_fwd_functional", "CPU"):
        torch.library.register_fake("ganengine_C::spectral_norm_fwd_functional")(_sn_fwd_fake)

    @torch.library.register_fake("ganengine_C::spectral_norm_bwd")
    def _(grads, gsig, weights, u_out, v_out, sigma):
        return [w.new_empty(w.shape) for w in weights]


@spectral_norm_op.register_fake
def _(weight, u, v, first, steps, eps, dim):
    wd = weight.numel() // weight.shape[dim]
    return (torch.empty(weight.shape, dtype=weight.dtype, device=weight.device), torch.empty_like(u),
            u.new_empty((wd,)), weight.new_empty(()))


@torch.library.custom_op("ganengine::spectral_norm_backward", mutates_args=())
def spectral_norm_backward_op(grad: Tensor, grad_sigma: Tensor, weight: Tensor, u: Tensor, v: Tensor,
                              sigma: Tensor, dim: int) -> Tensor:
    """dW = g / sigma + (g_sigma - <g, W> / sigma^2) u v^T."""
    backend = choose_backend(weight, dim)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if backend == "torch":
        wmat = weight_matrix(weight, dim)
        gmat = weight_matrix(grad, dim)
        s = sigma.to(acc)
        coef = grad_sigma.to(acc) - (gmat.to(acc) * wmat.to(acc)).sum() / (s * s)
        dmat = gmat.to(acc) / s + coef * torch.outer(u.to(acc), v.to(acc))
        if dim != 0:  # back to the weight's dim order
            perm = [dim] + [d for d in range(weight.dim()) if d != dim]
            inv = [perm.index(i) for i in range(weight.dim())]
            shape = [weight.shape[p] for p in perm]
            return dmat.view(shape).permute(inv).contiguous().to(weight.dtype)
        return dmat.view(weight.shape).to(weight.dtype)
    dws = native_backward(backend, None if backend != "triton" else _triton_aux(weight, u, v, dim), [weight],
                          [dim], [u], [v], sigma.to(acc).reshape(1), [grad], [grad_sigma])
    return dws[0].clone()


def _triton_aux(weight, u, v, dim):
    """(layout, u, v) for one layer's backward: its u/v are the flat buffers (offsets 0)."""
    u, v = u.contiguous(), v.contiguous()
    return _layouts.get([weight], [dim], [u], [v]), u, v


@spectral_norm_backward_op.register_fake
def _(grad, grad_sigma, weight, u, v, sigma, dim):
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def _op_setup(ctx, inputs, output):
    weight, u, v, first, steps, eps, dim = inputs
    _, u_used, v_used, sigma = output
    ctx.save_for_backward(weight, u_used, v_used, sigma)
    ctx.dim = dim


def _op_backward(ctx, g_w, g_u, g_v, g_sigma):
    weight, u, v, sigma = ctx.saved_tensors
    if g_w is None and g_sigma is None:
        return None, None, None, None, None, None, None
    if torch.is_grad_enabled():
        (dw,) = _reference_grads([weight], [ctx.dim], [u], [v], [g_w], [g_sigma], [True])
    else:
        g_w = g_w if g_w is not None else torch.zeros_like(weight)
        g_sigma = g_sigma if g_sigma is not None else sigma.new_zeros(())
        dw = spectral_norm_backward_op(g_w, g_sigma, weight, u, v, sigma, ctx.dim)
    return dw, None, None, None, None, None, None


spectral_norm_op.register_autograd(_op_backward, setup_context=_op_setup)


# ----------------------------------------------------------------------------- entry points
def _compiling() -> bool:
    # (torch.jit.trace too: it records the custom op; the C++ route's autograd.Function takes
    # non-tensor arguments a trace cannot record)
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


# ----------------------------------------------------------------------------- lean CPU route
# At small weights the host time of a call is what is compared with eager (whose 11 ATen ops
# forward cost about 25 us on one core): choose_backend (a matrix_layout in Python, the verdict
# cache, _dispatch.choose) cost about 6 us and the autograd.Function about 6 us more, which left
# the cpu backend at 1.08x eager's forward. When the requested backend would run the C++ kernels
# (auto or cpu, CPU tensors: _dispatch.lean_op) on a dim-0 weight, the call goes straight to
# spectral_norm_fwd: through SpectralNormFn only when a graph is recorded. The kernel checks the
# weight, u and v (>= 2-D, contiguous, fp32/fp64, the vector shapes) before any work; a call it
# refuses with a RuntimeError takes the full route instead, which serves it (1-D weights, other
# dtypes, strides) or raises the public error. Same kernel, same bits as the full route.
_SN_KERNELS = ()


def _kernel_declined(e: RuntimeError) -> bool:
    """Whether the C++ kernel refused the call in its argument checks, before any work or state
    write (dtype, layout, shapes: every such check's message starts with the op name); the full
    route then serves the call or raises the public error. Any other error propagates."""
    return str(e).startswith("spectral_norm_fwd:")


def _lean_layer(weight: Tensor, u: Tensor, v: Tensor | None, first: int, steps: int, eps: float,
                write_state: bool):
    """(w_sn, u_new, v_new, sigma) from the C++ kernels directly, or None (not served here)."""
    op = _dispatch.lean_op("spectral_norm_fwd", _SN_KERNELS)
    if op is None or not (isinstance(weight, Tensor) and weight.is_cpu and weight.dim() > 1) or functorch_active():
        return None
    # u and v plain CPU tensors (the kernel reads them through their pointers and does not check
    # devices; a list is refused by the dispatcher, not with the public TypeError): else the full
    # route raises the public error
    if not (type(u) in _eager._TENSOR_TYPES and u.is_cpu and (v is None or (type(v) in _eager._TENSOR_TYPES and v.is_cpu))):
        return None
    try:
        if torch.is_grad_enabled() and weight.requires_grad:
            w_sn, sigma, u_new, v_new = SpectralNormFn.apply(("cpu", [0], [u], [v], first, steps, eps, write_state),
                                                             weight)
        else:  # (a V-first plan never reads v: u stands in for an absent one, as native_forward does)
            w_sns, u_outs, v_outs, sigmas = op([weight], [u], [v if v is not None else u], first, steps, eps,
                                               write_state)
            w_sn, u_new, v_new, sigma = w_sns[0], u_outs[0], v_outs[0], sigmas[0]
    except RuntimeError as e:
        if _kernel_declined(e):
            return None
        raise
    _dispatch.last_used["spectral_norm"] = "cpu"
    return w_sn, u_new, v_new, sigma


def run_layer(weight: Tensor, u: Tensor, v: Tensor | None, first: int, steps: int, eps: float, dim: int,
              order: str, in_place: bool, lean: bool = True):
    """(w_sn, u_new, v_new, sigma) for one layer on the chosen backend. ``in_place``: u and v
    are state buffers, updated in place (when steps > 0); otherwise left untouched. ``lean``:
    try the lean CPU route first (False: the caller already did)."""
    compiling = _compiling()
    if lean and dim == 0 and not compiling:
        lean = _lean_layer(weight, u, v, first, steps, eps, in_place and steps > 0)
        if lean is not None:
            return lean
    if not compiling and functorch_active():  # (see functorch_layer)
        return functorch_layer(weight, u, v, first, steps, eps, dim, order, in_place)
    if compiling:
        w_sn, u_new, v_new, sigma = spectral_norm_op(weight, u, v, first, steps, eps, dim)
        if in_place and steps > 0:
            with torch.no_grad():
                u.copy_(u_new)
                v.copy_(v_new)
        return w_sn, u_new, v_new, sigma
    backend = choose_backend(weight, dim)
    if backend == "torch":
        return _torch_call(weight, u, v, first, steps, eps, dim, order, in_place)
    write_state = in_place and steps > 0
    if not _eager.records_graph((weight,)):  # (a D's weights in the G step, eval, no_grad: same numbers)
        w_sns, u_outs, v_outs, sigma, _ = native_forward(backend, [weight], [dim], [u], [v], first, steps, eps,
                                                         write_state)
        return w_sns[0], u_outs[0], v_outs[0], _sigmas(sigma, (weight,))[0]
    outs = SpectralNormFn.apply((backend, [dim], [u], [v], first, steps, eps, write_state), weight)
    return outs[0], outs[2], outs[3], outs[1]


def run_group(weights, dims, us, vs, first: int, steps: int, eps: float, write_state: bool, backend: str):
    """Every layer of a group on one native backend in one autograd node: (w_sns, sigmas)."""
    if functorch_active():  # (see functorch_layer: per layer, PyTorch's ops)
        outs = functorch_apply((backend, list(dims), list(us), list(vs), first, steps, eps, write_state), *weights)
        n = len(weights)
        return list(outs[:n]), list(outs[n:2 * n])
    if not _eager.records_graph(weights):
        w_sns, _, _, sigma, _ = native_forward(backend, list(weights), list(dims), list(us), list(vs), first, steps,
                                               eps, write_state)
        return list(w_sns), _sigmas(sigma, weights)
    outs = SpectralNormFn.apply((backend, list(dims), list(us), list(vs), first, steps, eps, write_state), *weights)
    n = len(weights)
    return list(outs[:n]), list(outs[n:2 * n])


def _check(weight, u, v, n_power_iterations, eps, dim, order):
    fn = "spectral_norm_weight"
    if not isinstance(weight, Tensor):
        raise TypeError(f"{fn}: weight must be a Tensor, got {type(weight).__name__}")
    if not (weight.is_floating_point() or weight.is_complex()):
        raise TypeError(f"{fn}: weight must be floating point or complex, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{fn}: weight is empty (shape {tuple(weight.shape)})")
    if order not in ORDERS:
        raise ValueError(f"{fn}: order must be one of {ORDERS}, got {order!r}")
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 0:
        raise ValueError(f"{fn}: n_power_iterations must be an int >= 0, got {n_power_iterations!r}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"{fn}: eps must be a positive number, got {eps!r}")
    nd = weight.dim()
    if not isinstance(dim, int) or not -max(nd, 1) <= dim < max(nd, 1):
        raise IndexError(f"{fn}: dim must be in [-{nd}, {nd - 1}] for a {nd}-D weight, got {dim!r}")
    if nd < 2:
        return
    h = weight.shape[dim % nd]
    wd = weight.numel() // h
    for name, t, n in (("u", u, h), ("v", v, wd)):
        if t is None:
            if name == "u":
                raise TypeError(f"{fn}: u must be a Tensor of shape ({h},), got None")
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{fn}: {name} must have shape ({n},) for a weight of shape {tuple(weight.shape)} "
                             f"with dim={dim}, got {tuple(t.shape)}")
        if t.dtype != weight.dtype or t.device != weight.device:
            raise ValueError(f"{fn}: {name} must have the weight's dtype and device ({weight.dtype}, "
                             f"{weight.device}), got ({t.dtype}, {t.device})")


def spectral_norm_weight(weight: Tensor, u: Tensor, n_power_iterations: int = 1, eps: float = 1e-12, *,
                         v: Tensor | None = None, dim: int = 0, order: str = "pytorch", return_v: bool = False):
    """``(weight / sigma, u_new, sigma)``: spectral normalisation with the numerics of
    ``torch.nn.utils.parametrizations.spectral_norm``.

    ``u`` (H,) is the left singular vector estimate of the weight as an (H, -1) matrix (``dim``
    first, as PyTorch). ``n_power_iterations`` power iterations run under no_grad; sigma =
    ``vdot(u, M v)`` with u and v constants, so gradients reach ``weight`` through sigma as in
    PyTorch's graph. Inputs are never modified: ``u_new`` (and ``v_new``) are new tensors.

    * ``v`` (Wd,): also give the right vector, as the parametrization stores it (``_v``): then
      each iteration is ``u = normalize(M v); v = normalize(M^H u)`` exactly as PyTorch's, and
      ``n_power_iterations=0`` gives its eval-mode result. Without ``v``, v is first derived
      from u (``v = normalize(M^H u)``), which is what the parametrization holds after any
      iteration with this weight, so the numbers are the same.
    * ``order="classic"``: ``v = normalize(M^T u); u = normalize(M v)`` per iteration, sigma =
      ``dot(u, M v)``: the hook-based ``torch.nn.utils.spectral_norm`` and BigGAN's / SAGAN's
      own layers (``v`` is then only read when ``n_power_iterations == 0``).
    * ``return_v=True`` returns ``(weight / sigma, u_new, sigma, v_new)``.

    1-D weights are ``F.normalize(weight, dim=0, eps=eps)`` (sigma = max(||w||, eps)) as in
    PyTorch; ``u`` is returned unchanged.
    """
    # the lean route (see _lean_layer): plain arguments only, every one the full route would accept
    if (dim == 0 and type(dim) is int and type(n_power_iterations) is int and n_power_iterations >= 0
            and type(eps) is float and eps > 0 and (order == "pytorch" or order == "classic")
            and not _compiling()):
        lean = _lean_layer(weight, u, v, *plan(order, n_power_iterations, v is not None), eps, False)
        if lean is not None:
            w_sn, u_new, v_new, sigma = lean
            return (w_sn, u_new, sigma, v_new) if return_v else (w_sn, u_new, sigma)
    _check(weight, u, v, n_power_iterations, eps, dim, order)
    if weight.dim() < 2:
        sigma = torch.linalg.vector_norm(weight).clamp_min(eps)
        w_sn = F.normalize(weight, dim=0, eps=eps)
        return (w_sn, u, sigma, v) if return_v else (w_sn, u, sigma)
    dim = dim % weight.dim()
    first, steps = plan(order, n_power_iterations, v is not None)
    w_sn, u_new, v_new, sigma = run_layer(weight, u, v, first, steps, float(eps), dim, order, in_place=False,
                                          lean=False)
    return (w_sn, u_new, sigma, v_new) if return_v else (w_sn, u_new, sigma)
