"""Export generators to ONNX and TorchScript with every fused op lowered to standard ops.

ganengine's fused ops are ``torch.library`` custom ops (``ganengine::*``): a graph that contains
them only runs where ganengine is installed, and the ONNX exporter cannot translate them. Export
therefore traces the model with each custom op replaced by its ``torch`` backend, the plain
PyTorch composition that is also the ops' ground truth (same numbers, standard aten ops), and
then checks that no ``ganengine::`` node is left. The files run in onnxruntime and load with
``torch.jit.load`` in a process that never imports ganengine.

ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``): it works offline with only
the ``onnx`` package, while the newer dynamo exporter, torch 2.14's default, also needs
``onnxscript``. The batch dimension is dynamic; other sizes are those of ``example_input``
(the generators are fully convolutional, but the traced graph may fix spatial sizes).
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from typing import Sequence

import torch
from torch import nn

from ganengine._state import restored

NAMESPACE = "ganengine"
DEFAULT_OPSET = 17


class ExportError(RuntimeError):
    """The model could not be exported to standard ops."""


# ----------------------------------------------------------------------------- lowering
@contextlib.contextmanager
def lowered_ops():
    """Within this context, calls of ganengine custom ops run their torch composition directly.

    The custom op objects (``torch.library.custom_op``) are callables that enter the dispatcher,
    which a tracer records as one opaque ``ganengine::op`` node. Here their Python body runs
    instead, with the ``torch`` backend selected, so the tracer sees the standard ops it is made
    of. Process-wide while active (do not train in another thread meanwhile).
    """
    from torch._library import custom_ops

    from ganengine.backends import use_backend

    original = custom_ops.CustomOpDef.__call__

    def call(self, *args, **kwargs):
        if getattr(self, "_namespace", None) == NAMESPACE:
            with use_backend("torch"):
                return self._init_fn(*args, **kwargs)
        return original(self, *args, **kwargs)

    custom_ops.CustomOpDef.__call__ = call
    try:
        with use_backend("torch"):
            yield
    finally:
        custom_ops.CustomOpDef.__call__ = original


class _TensorOutputs(nn.Module):
    """Calls the model and returns only its tensor outputs (drops the Nones some reference
    generators return, e.g. StackGAN's ``(None, image, mu, logvar)``; nested tuples/lists
    flattened in order); one tensor unwrapped.

    ``present``: for each positional argument of the model, whether it is a graph input (True) or
    passed as None (an optional argument the model is called without, e.g. IC-GAN's label)."""

    def __init__(self, model: nn.Module, present: Sequence[bool] | None = None):
        super().__init__()
        self.model = model
        self.present = None if present is None or all(present) else tuple(bool(p) for p in present)

    def forward(self, *inputs):
        if self.present is not None:
            it = iter(inputs)
            inputs = tuple(next(it) if p else None for p in self.present)
        out = self.model(*inputs)
        if isinstance(out, torch.Tensor):
            return out
        tensors = _flat_tensors(out)
        if not tensors:
            raise ExportError(f"the model returned {_describe(out)}: no tensor to export (export needs a tensor, "
                              "or tuples/lists of tensors)")
        return tensors[0] if len(tensors) == 1 else tensors


def _flat_tensors(out) -> tuple:
    """The tensors of a (nested) tuple/list output in order, Nones dropped: pix2pixHD's and SPADE's
    multiscale discriminators return ``[[features..., logits] per scale]``, exported as one flat tuple."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if out is None:
        return ()
    if isinstance(out, (tuple, list)):
        return tuple(t for o in out for t in _flat_tensors(o))
    raise ExportError(f"the model returned {_describe(out)}; export needs tensors, or tuples/lists of tensors "
                      "(Nones are dropped)")


def _describe(out) -> str:
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of [{', '.join(_describe(o) for o in out)}]"
    return type(out).__name__


def _as_inputs(example_input) -> tuple[tuple[torch.Tensor, ...], tuple[bool, ...]]:
    """(the tensors of ``example_input``: the graph's inputs, which positional arguments they are)."""
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not any(isinstance(t, torch.Tensor) for t in args) or not all(t is None or isinstance(t, torch.Tensor)
                                                                        for t in args):
        raise TypeError("example_input must be a tensor or a tuple/list of tensors (None for an optional argument "
                        f"the model is called without), got {type(example_input).__name__} of "
                        f"{[type(t).__name__ for t in args]}")
    return tuple(t for t in args if t is not None), tuple(t is not None for t in args)


NORM_STATS = ("running", "input", "per_image")
# the method a module may define to be replaced for export (see prepare_for_export)
EXPORT_HOOK = "export_module"


def _input_stats(norm: nn.Module) -> None:
    """Make a norm layer normalise with its input's statistics and keep no running statistics."""
    norm.track_running_stats = False
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if name in norm._buffers:
            norm._buffers[name] = None


class BatchStatsNorm(nn.Module):
    """A BatchNorm layer normalising with the batch's own statistics, in plain ops (the ONNX
    exporter translates a training-mode batch_norm only for a fixed batch size)."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, per_image: bool = False):
        super().__init__()
        self.eps = norm.eps
        # per_image: each sample's own statistics (over its spatial positions), what the batch norm
        # computes in training mode on a batch of one image
        self.per_image = bool(per_image)
        self.weight, self.bias = norm.weight, norm.bias
        # a fused gnn.BatchNormAct2d/1d carries its activation: keep it
        self.activation = getattr(norm, "activation", "none")
        self.negative_slope = float(getattr(norm, "negative_slope", 0.0))

    def forward(self, x):
        if self.per_image and x.dim() < 3:
            raise ValueError("norm_stats='per_image': a batch norm over (N, C) inputs has no positions of its own "
                             "to normalise one image over (training mode refuses one value per channel); use "
                             "norm_stats 'running' or 'input' for this network")
        dims = list(range(2, x.dim())) if self.per_image else [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.activation == "relu":
            y = torch.relu(y)
        elif self.activation == "leaky_relu":
            y = torch.nn.functional.leaky_relu(y, self.negative_slope)
        return y


def _instance_norm_as_batch_norm(norm: nn.InstanceNorm2d) -> nn.BatchNorm2d:
    """InstanceNorm2d in eval mode with running statistics is BatchNorm2d's eval map; the ONNX
    exporter translates the latter with a dynamic batch size, the former only with a fixed one."""
    bn = nn.BatchNorm2d(norm.num_features, eps=norm.eps, affine=norm.affine)
    bn.load_state_dict(norm.state_dict(), strict=False)
    return bn.eval()


def prepare_for_export(model: nn.Module, eval_mode: bool = True, norm_stats: str = "running") -> nn.Module:
    """A copy of ``model`` set up for export: eval mode (dropout off), and norm layers that use
    their running statistics (``norm_stats="running"``, the usual inference behaviour) or the
    input's statistics (``"input"``: as in training mode, and as the StarGAN reference translates at
    test time), or each image's own (``"per_image"``: batch norms normalise every sample over its
    own positions, what training mode computes on a batch of one image, as the pix2pix / CycleGAN
    references test without --eval at batch size 1 and ``translate`` does image by image; other
    norms as with ``"input"``). The original model is not touched.

    Export semantics (the same for every network): the graph computes what the network's forward
    computes now in eval mode (``eval_mode=True``, the default), from its current state, and
    writes nothing: no running-statistics
    update, and spectral norms use their current u/v estimate (a reference SN that iterates in
    eval mode too, SAGAN's, runs that iteration inside the graph from the stored u, without
    writing it back, so every call of the exported graph equals the network's next forward).
    Only the normalisation statistics are chosen, by ``norm_stats``.

    A module of a custom norm layer can take part through the hook method
    ``export_module(norm_stats)`` (``EXPORT_HOOK``): called on the copy, it returns a module that
    replaces it in the exported network (plain ops; nothing written), or None to keep it."""
    if norm_stats not in NORM_STATS:
        raise ValueError(f"norm_stats must be one of {NORM_STATS}, got {norm_stats!r}")
    net = copy.deepcopy(model)
    net.train(not eval_mode)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            hook = getattr(child, EXPORT_HOOK, None)
            if callable(hook):
                if norm_stats == "per_image":
                    raise ValueError(f"norm_stats='per_image' is for torch's norm layers; {type(child).__name__} "
                                     "defines its own export form (norm_stats 'running' or 'input')")
                replacement = hook(norm_stats)
                if replacement is not None:
                    setattr(parent, name, replacement)
                continue
            if not isinstance(child, nn.modules.batchnorm._NormBase):
                continue
            batch_stats = norm_stats != "running" or not child.track_running_stats
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and batch_stats:
                setattr(parent, name, BatchStatsNorm(child, per_image=norm_stats == "per_image"))
            elif not child.track_running_stats:
                continue  # instance norm on input statistics: exports as InstanceNormalization
            elif norm_stats != "running":
                _input_stats(child)
            elif type(child) is nn.InstanceNorm2d and not child.training:
                setattr(parent, name, _instance_norm_as_batch_norm(child))
    return net


@contextlib.contextmanager
def _quiet():
    with torch.no_grad(), warnings.catch_warnings():
        # tracing warns about every Python-side shape check and about torch.jit's deprecation
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
        # norm layers with input statistics are intended (norm_stats="input", non-tracking norms)
        warnings.filterwarnings("ignore", message=".*TrainingMode.EVAL.*")
        yield


def custom_ops_in_graph(graph) -> list[str]:
    """Kinds of the nodes of a TorchScript graph (and its sub-blocks) in the ganengine namespace."""
    found = []

    def walk(block):
        for node in block.nodes():
            if node.kind().startswith(NAMESPACE + "::") or node.kind().startswith(NAMESPACE + "_C::"):
                found.append(node.kind())
            for sub in node.blocks():
                walk(sub)

    walk(graph)
    return sorted(set(found))


# ----------------------------------------------------------------------------- TorchScript
def trace(model: nn.Module, example_input, eval_mode: bool = True, norm_stats: str = "running"
          ) -> torch.jit.ScriptModule:
    """A TorchScript trace of ``model`` on ``example_input`` with the fused ops lowered
    (see ``prepare_for_export`` for ``eval_mode`` and ``norm_stats``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs, present = _as_inputs(example_input)
    wrapper = _TensorOutputs(prepare_for_export(model, eval_mode, norm_stats), present)
    with _quiet(), lowered_ops():
        traced = torch.jit.trace(wrapper, inputs, check_trace=False)
    left = custom_ops_in_graph(traced.inlined_graph)
    if left:
        raise ExportError(f"the traced graph still contains custom ops {left}: they are called in a way "
                          "the lowering cannot see (e.g. through torch.ops.ganengine directly)")
    return traced


def to_torchscript(model: nn.Module, example_input, path: str | os.PathLike, eval_mode: bool = True,
                   norm_stats: str = "running") -> str:
    """Trace ``model`` (fused ops lowered to standard ops) and save it; ``torch.jit.load(path)``
    runs it without ganengine. Returns the path."""
    traced = trace(model, example_input, eval_mode, norm_stats)
    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, path)
    return path


# ----------------------------------------------------------------------------- ONNX
def _copy_symbolic(g, self, src, non_blocking):
    # aten::copy(dst, src): src cast to dst's dtype and broadcast to dst's shape. The torch
    # compositions write results with `empty_like(x).copy_(z)` (keeps x's memory format),
    # which the TorchScript exporter turns into aten::copy and has no translation for.
    return g.op("Expand", g.op("CastLike", src, self), g.op("Shape", self))


def _vdot_symbolic(g, self, other):
    # aten::vdot (torch.nn.utils.parametrizations.spectral_norm's sigma = vdot(u, W v)) has no ONNX
    # translation; for the real tensors exported here it is the sum of the products
    return g.op("ReduceSum", g.op("Mul", self, other), keepdims_i=0)


_SYMBOLICS = {"aten::copy": _copy_symbolic, "aten::vdot": _vdot_symbolic}


def _names(prefix: str, n: int, given: Sequence[str] | None) -> list[str]:
    if given is not None:
        if len(given) != n:
            raise ValueError(f"{prefix}_names must have {n} names, got {list(given)}")
        return list(given)
    return [prefix] if n == 1 else [f"{prefix}{i}" for i in range(n)]


def to_onnx(model: nn.Module, example_input, path: str | os.PathLike, opset_version: int = DEFAULT_OPSET,
            dynamic_batch: bool = True, input_names: Sequence[str] | None = None,
            output_names: Sequence[str] | None = None, eval_mode: bool = True, norm_stats: str = "running") -> str:
    """Export ``model`` to an ONNX file of standard ONNX ops (fused ops lowered). Returns the path.

    Inputs are named ``input`` (or ``input0``, ``input1``, ...), outputs ``output`` (or
    ``output0``, ...); the batch dimension is dynamic unless ``dynamic_batch=False``.
    ``eval_mode``/``norm_stats``: see ``prepare_for_export``.
    """
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if opset_version < 15:
        raise ValueError(f"opset_version must be >= 15 (CastLike), got {opset_version}")
    inputs, present = _as_inputs(example_input)
    wrapper = _TensorOutputs(prepare_for_export(model, eval_mode, norm_stats), present)
    with _quiet(), lowered_ops():
        # (the eager call counts the outputs; the trace below starts from the same state: it must
        # not move the spectral-norm vectors or running statistics of the network then traced)
        with restored(list(wrapper.parameters()) + list(wrapper.buffers())):
            out = wrapper(*inputs)
        n_out = 1 if isinstance(out, torch.Tensor) else len(out)
        in_names = _names("input", len(inputs), input_names)
        out_names = _names("output", n_out, output_names)
        axes = {name: {0: "batch"} for name in in_names + out_names} if dynamic_batch else None
        for op, fn in _SYMBOLICS.items():
            register_custom_op_symbolic(op, fn, opset_version)
        try:
            torch.onnx.export(wrapper, inputs, os.fspath(path), dynamo=False, opset_version=opset_version,
                              input_names=in_names, output_names=out_names, dynamic_axes=axes,
                              do_constant_folding=True,
                              training=torch.onnx.TrainingMode.EVAL if eval_mode else torch.onnx.TrainingMode.PRESERVE)
        except Exception as exc:
            raise ExportError(f"ONNX export failed: {exc}") from exc
        finally:
            for op in _SYMBOLICS:
                unregister_custom_op_symbolic(op, opset_version)
    _check_onnx(os.fspath(path))
    return os.fspath(path)


def _check_onnx(path: str) -> None:
    try:
        import onnx
    except ImportError:  # the export itself only needs torch; the check is a bonus
        return
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(f"{path}: non-standard ONNX ops remain: {foreign}")


__all__ = ["EXPORT_HOOK", "to_onnx", "to_torchscript", "trace", "prepare_for_export", "lowered_ops", "custom_ops_in_graph", "ExportError"]
