"""Global-memory traffic: what a Triton kernel moves, what eager PyTorch moves, the minimum.

Memory-bound kernels on a GPU run at bytes / bandwidth, so without a GPU the ratio
``eager bytes / kernel bytes`` is the predicted speedup of a fused kernel over eager PyTorch.

* :class:`TritonTraffic` counts the bytes every Triton kernel really loads and stores. It runs
  under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported) and hooks
  the interpreter's memory primitives (``InterpreterBuilder.create_masked_load`` /
  ``create_masked_store``, through which plain, masked and descriptor loads/stores all go, and
  the atomics). Only active lanes count: bytes = active lanes x element size. Every launch is
  recorded with its kernel name and grid; bytes are attributed to the tensor arguments whose
  storage the addresses fall in, which also gives the *unique* bytes touched per argument (a
  kernel that reads its input twice shows total = 2 x unique). A kernel can also reach a tensor
  that is not one of its arguments, through a table of addresses (the spectral-norm kernels read
  their weights that way): tensors registered with :meth:`TritonTraffic.track` are attributed
  like arguments (under their registered name), and the bytes at addresses in no known storage
  are kept too, as the pseudo-argument ``<unattributed>`` (unique bytes: each distinct byte
  address once per launch), so no byte a kernel moves is dropped from the unique figure.
* :class:`EagerTraffic` is a ``TorchDispatchMode`` that sums, over every aten op executed
  (views excluded: they move no data), the bytes of the tensors it reads and writes: what the
  same computation costs as a chain of separate kernels.
* :func:`minimum_bytes`: each input read once, each output written once.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


# ----------------------------------------------------------------------------- tensor sizes
def footprint_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor view covers (broadcast dims count once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    if t.numel() == 0:
        return 0
    return n * t.element_size()


def _tensors(obj: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def minimum_bytes(inputs: Iterable[Any], outputs: Iterable[Any]) -> int:
    """The least an op can move: every distinct input tensor read once, every output written once."""
    seen: set[tuple[int, int, tuple, tuple]] = set()
    total = 0
    for t in _tensors(list(inputs)) + _tensors(list(outputs)):
        key = (t.data_ptr(), t.element_size(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            continue
        seen.add(key)
        total += footprint_bytes(t)
    return total


# ----------------------------------------------------------------------------- Triton kernels
@dataclasses.dataclass
class ArgTraffic:
    """Traffic of one launch into one tensor argument's storage."""

    name: str
    load_bytes: int = 0
    store_bytes: int = 0
    unique_load_bytes: int = 0
    unique_store_bytes: int = 0


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple
    load_bytes: int = 0
    store_bytes: int = 0
    atomic_bytes: int = 0
    args: dict[str, ArgTraffic] = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.load_bytes + self.store_bytes + self.atomic_bytes


UNATTRIBUTED = "<unattributed>"


class _Region:
    """One tensor storage: address range + bitmaps of the bytes touched.

    ``tracked``: a storage registered with :meth:`TritonTraffic.track` rather than passed as an
    argument; it shows in a launch's ``args`` only when the launch touched it.
    """

    def __init__(self, name: str, t: torch.Tensor, tracked: bool = False):
        storage = t.untyped_storage()
        self.name = name
        self.tracked = tracked
        self.start = storage.data_ptr()
        self.end = self.start + storage.nbytes()
        self._loaded = None  # per byte (exact for any dtype); allocated on first touch
        self._stored = None
        self.touched = False

    @property
    def loaded(self):
        import numpy as np

        if self._loaded is None:
            self._loaded = np.zeros(self.end - self.start, dtype=bool)
        return self._loaded

    @property
    def stored(self):
        import numpy as np

        if self._stored is None:
            self._stored = np.zeros(self.end - self.start, dtype=bool)
        return self._stored

    def unique_loaded(self) -> int:
        return 0 if self._loaded is None else int(self._loaded.sum())

    def unique_stored(self) -> int:
        return 0 if self._stored is None else int(self._stored.sum())


class TritonTraffic:
    """Context manager counting the global-memory bytes of every Triton launch inside it.

    >>> with TritonTraffic() as tt:
    ...     kernel[grid](x, y, n, BLOCK=128)
    >>> tt.load_bytes, tt.store_bytes, tt.launches[0].kernel

    Needs the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported); nesting
    is not supported. Counting costs a few numpy operations per load/store.

    ``tensors`` (or :meth:`track`): tensors a kernel may reach without getting them as an
    argument (through a table of pointers); their bytes are attributed to them by name. Bytes at
    addresses in no argument's and no tracked tensor's storage are counted under
    :data:`UNATTRIBUTED` (never dropped).
    """

    _active_lock = threading.Lock()

    def __init__(self, tensors: Any = None):
        self.launches: list[Launch] = []
        self._current: Launch | None = None
        self._regions: list[_Region] = []
        self._known: list[tuple[str, torch.Tensor]] = []
        self._stray: dict[str, list] = {"load": [], "store": []}
        self._saved: dict[str, Any] = {}
        if tensors is not None:
            self.track(tensors)

    def track(self, tensors: Any, prefix: str = "tensor") -> "TritonTraffic":
        """Register tensors whose storage kernels may reach through pointers they load.

        ``tensors``: a ``{name: tensor}`` mapping, or any nest of tensors (named
        ``{prefix}{i}``). Non-CPU and empty tensors are ignored (the interpreter runs on CPU).
        """
        if isinstance(tensors, dict):
            items = [(str(k), v) for k, v in tensors.items()]
        else:
            items = [(f"{prefix}{i}", t) for i, t in enumerate(_tensors(tensors))]
        for name, t in items:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel():
                self._known.append((name, t))
        return self

    # totals over all launches
    @property
    def load_bytes(self) -> int:
        return sum(x.load_bytes for x in self.launches)

    @property
    def store_bytes(self) -> int:
        return sum(x.store_bytes for x in self.launches)

    @property
    def atomic_bytes(self) -> int:
        return sum(x.atomic_bytes for x in self.launches)

    @property
    def total_bytes(self) -> int:
        return self.load_bytes + self.store_bytes + self.atomic_bytes

    def per_kernel(self) -> dict[str, dict[str, int]]:
        """{kernel name: {launches, load_bytes, store_bytes, atomic_bytes}} summed over launches."""
        out: dict[str, dict[str, int]] = {}
        for launch in self.launches:
            d = out.setdefault(launch.kernel, {"launches": 0, "load_bytes": 0, "store_bytes": 0,
                                               "atomic_bytes": 0})
            d["launches"] += 1
            d["load_bytes"] += launch.load_bytes
            d["store_bytes"] += launch.store_bytes
            d["atomic_bytes"] += launch.atomic_bytes
        return out

    # -- hooks
    def _record(self, kind: str, ptrs, mask) -> None:
        import numpy as np

        addrs = np.asarray(ptrs.data)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
        active = addrs[m].astype(np.uint64, copy=False).ravel()
        elt = ptrs.get_element_ty()
        size = max(1, elt.primitive_bitwidth // 8)
        nbytes = int(active.size) * size
        launch = self._current
        if launch is None:  # a load outside a GridExecutor launch (should not happen)
            launch = Launch("<unknown>", ())
            self.launches.append(launch)
            self._current = launch
        if kind == "load":
            launch.load_bytes += nbytes
        elif kind == "store":
            launch.store_bytes += nbytes
        else:
            launch.atomic_bytes += nbytes
        if not active.size:
            return
        rest = np.ones(active.size, dtype=bool)  # addresses in no known storage
        for region in self._regions:
            sel = (active >= region.start) & (active < region.end)
            inside = active[sel]
            if not inside.size:
                continue
            rest &= ~sel
            region.touched = True
            rel = (inside - np.uint64(region.start)).astype(np.int64)
            at = launch.args.setdefault(region.name, ArgTraffic(region.name))
            span = (rel[:, None] + np.arange(size, dtype=np.int64)[None, :]).ravel()
            span = span[span < region.end - region.start]
            if kind in ("load", "atomic"):
                at.load_bytes += int(inside.size) * size
                region.loaded[span] = True
            if kind in ("store", "atomic"):
                at.store_bytes += int(inside.size) * size
                region.stored[span] = True
        stray = active[rest]
        if stray.size:
            # not in any argument's or tracked tensor's storage: still DRAM traffic, counted
            # under UNATTRIBUTED, unique per distinct byte address (at the end of the launch)
            at = launch.args.setdefault(UNATTRIBUTED, ArgTraffic(UNATTRIBUTED))
            span = np.unique((stray[:, None] + np.arange(size, dtype=np.uint64)[None, :]).ravel())
            if kind in ("load", "atomic"):
                at.load_bytes += int(stray.size) * size
                self._stray["load"].append(span)
            if kind in ("store", "atomic"):
                at.store_bytes += int(stray.size) * size
                self._stray["store"].append(span)

    def _begin_launch(self, fn, grid, args, kwargs) -> None:
        import inspect

        name = getattr(fn, "__name__", repr(fn))
        launch = Launch(name, tuple(grid) if isinstance(grid, (tuple, list)) else ("<callable>",))
        self.launches.append(launch)
        self._current = launch
        self._regions = []
        self._stray = {"load": [], "store": []}
        try:
            params = inspect.signature(fn).parameters
            kwargs = {k: v for k, v in kwargs.items() if k in params}  # drop num_warps etc.
            bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = {f"arg{i}": a for i, a in enumerate(args)}
        by_storage: dict[int, tuple[list[str], torch.Tensor]] = {}
        for arg_name, value in bound.items():
            if not isinstance(value, torch.Tensor):  # a host TensorDescriptor wraps its tensor
                value = getattr(value, "base", None)
            if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.numel():
                # arguments that are views of one storage share a region (counted once)
                ptr = value.untyped_storage().data_ptr()
                by_storage.setdefault(ptr, ([], value))[0].append(arg_name)
        regions = [_Region("=".join(names), t) for names, t in by_storage.values()]
        # tensors reached through pointer tables: attributed like arguments, shown when touched
        tracked: dict[int, tuple[list[str], torch.Tensor]] = {}
        for name, t in self._known:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in by_storage:
                tracked.setdefault(ptr, ([], t))[0].append(name)
        regions += [_Region("=".join(names), t, tracked=True) for names, t in tracked.values()]
        self._regions = regions

    def _end_launch(self) -> None:
        import numpy as np

        launch = self._current
        if launch is not None:
            for region in self._regions:
                if region.tracked and not region.touched:
                    continue
                at = launch.args.setdefault(region.name, ArgTraffic(region.name))
                at.unique_load_bytes = region.unique_loaded()
                at.unique_store_bytes = region.unique_stored()
            if UNATTRIBUTED in launch.args:
                at = launch.args[UNATTRIBUTED]
                for kind, spans in self._stray.items():
                    n = int(np.unique(np.concatenate(spans)).size) if spans else 0
                    if kind == "load":
                        at.unique_load_bytes = n
                    else:
                        at.unique_store_bytes = n
        self._regions = []
        self._stray = {"load": [], "store": []}
        self._current = None

    # -- install / remove
    def __enter__(self) -> "TritonTraffic":
        interp = _interpreter_module()
        if not self._active_lock.acquire(blocking=False):
            raise RuntimeError("TritonTraffic contexts cannot be nested or used from two threads")
        builder = interp.InterpreterBuilder
        executor = interp.GridExecutor
        self._saved = {
            "load": builder.create_masked_load,
            "store": builder.create_masked_store,
            "rmw": builder.create_atomic_rmw,
            "cas": builder.create_atomic_cas,
            "call": executor.__call__,
        }
        counter = self
        saved = self._saved

        def create_masked_load(b, ptrs, mask, other, *a, **k):
            counter._record("load", ptrs, mask)
            return saved["load"](b, ptrs, mask, other, *a, **k)

        def create_masked_store(b, ptrs, value, mask, *a, **k):
            counter._record("store", ptrs, mask)
            return saved["store"](b, ptrs, value, mask, *a, **k)

        def create_atomic_rmw(b, op, ptr, val, mask, *a, **k):
            counter._record("atomic", ptr, mask)
            return saved["rmw"](b, op, ptr, val, mask, *a, **k)

        def create_atomic_cas(b, ptr, cmp, val, *a, **k):
            import numpy as np

            ones = type("M", (), {"data": np.ones(np.shape(ptr.data), dtype=bool)})()
            counter._record("atomic", ptr, ones)
            return saved["cas"](b, ptr, cmp, val, *a, **k)

        def call(ex, *args, **kwargs):
            from torch.utils._python_dispatch import _disable_current_modes

            counter._begin_launch(ex.fn, ex.grid, args, kwargs)
            try:
                # the interpreter copies every argument's storage back after the launch: that
                # copy_ is its own bookkeeping, not traffic, so hide it from an EagerTraffic mode
                with _disable_current_modes():
                    return saved["call"](ex, *args, **kwargs)
            finally:
                counter._end_launch()

        builder.create_masked_load = create_masked_load
        builder.create_masked_store = create_masked_store
        builder.create_atomic_rmw = create_atomic_rmw
        builder.create_atomic_cas = create_atomic_cas
        executor.__call__ = call
        return self

    def __exit__(self, *exc) -> bool:
        interp = _interpreter_module()
        builder = interp.InterpreterBuilder
        builder.create_masked_load = self._saved["load"]
        builder.create_masked_store = self._saved["store"]
        builder.create_atomic_rmw = self._saved["rmw"]
        builder.create_atomic_cas = self._saved["cas"]
        interp.GridExecutor.__call__ = self._saved["call"]
        self._active_lock.release()
        return False


def _interpreter_module():
    from ganengine import backends

    if not backends.triton_interpret():
        raise RuntimeError(
            "counting Triton memory traffic needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "in the environment before triton is imported (e.g. `TRITON_INTERPRET=1 ganengine bench "
            "--traffic`)")
    from triton.runtime import interpreter

    return interpreter


# ----------------------------------------------------------------------------- eager PyTorch
# Ops that only allocate (no data is written until another op fills the tensor).
_ALLOC_ONLY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
               "resize_", "set_"}
# Ops that return an alias without the schema saying so, or metadata only.
_NO_DATA = {"detach", "lift_fresh", "alias", "_unsafe_view", "_reshape_alias", "sym_size", "sym_stride",
            "sym_numel", "sym_storage_offset"}
# Factories that take a tensor only for its shape/dtype (they read no data).
_NO_READ = {"ones_like", "zeros_like", "full_like", "rand_like", "randn_like", "randint_like"}
# In-place ops that overwrite their destination without reading it.
_OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_",
              "exponential_", "index_put_"}
# A read of one element to the host (`.item()`, `float(t)`): on a GPU a device-to-host copy, not a
# kernel (the profiler count leaves Memcpy out too). Counted apart, in ``scalar_reads``: on CPU
# tensors it also stands for reads the CUDA path skips (a loss's "is grad_output 1?" test).
_SCALAR_READ = {"_local_scalar_dense"}


@dataclasses.dataclass
class EagerOpRecord:
    op: str
    read_bytes: int
    write_bytes: int


class EagerTraffic(TorchDispatchMode):
    """Sums the bytes each executed aten op reads and writes (views and allocations excluded).

    Reads: every tensor argument (its distinct elements), except destinations an op only
    overwrites (``copy_``'s ``self``, ``out=`` buffers). Writes: every tensor output and every
    mutated argument, once. This is the traffic of running the composition as one kernel per
    aten op, which is what eager PyTorch does.
    """

    def __init__(self, skip_namespaces: tuple[str, ...] = ()):
        super().__init__()
        self.records: list[EagerOpRecord] = []
        # ops of these namespaces are not counted (their kernels are counted by TritonTraffic)
        self.skip_namespaces = tuple(skip_namespaces)
        self.skipped: list[str] = []
        self.scalar_reads = 0

    @property
    def read_bytes(self) -> int:
        return sum(r.read_bytes for r in self.records)

    @property
    def write_bytes(self) -> int:
        return sum(r.write_bytes for r in self.records)

    @property
    def total_bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    @property
    def num_kernels(self) -> int:
        return len(self.records)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        namespace, _, base = schema.name.rpartition("::")
        if namespace == "profiler":  # record_function markers (an optimiser's step): no kernel
            return out
        if namespace in self.skip_namespaces:
            self.skipped.append(str(func))
            return out
        if func.is_view or base in _NO_DATA or base in _ALLOC_ONLY:
            return out
        if base in _SCALAR_READ:
            self.scalar_reads += 1
            return out
        written: list[torch.Tensor] = []
        read = 0
        overload = func._overloadname
        for i, arg in enumerate(schema.arguments):
            value = kwargs.get(arg.name, args[i] if i < len(args) and not arg.kwarg_only else None)
            ts = _tensors(value)
            if not ts:
                continue
            is_write = arg.alias_info is not None and arg.alias_info.is_write
            if is_write:
                written.extend(ts)
                overwrite = base in _OVERWRITE or arg.is_out or overload.startswith("out")
                if not overwrite:  # in-place arithmetic reads its destination too
                    read += sum(footprint_bytes(t) for t in ts)
            elif base not in _NO_READ:
                read += sum(footprint_bytes(t) for t in ts)
        write_ptrs = {(t.data_ptr(), tuple(t.shape), tuple(t.stride())) for t in written}
        write = sum(footprint_bytes(t) for t in written)
        for t in _tensors(out):
            if (t.data_ptr(), tuple(t.shape), tuple(t.stride())) not in write_ptrs:
                write += footprint_bytes(t)
        self.records.append(EagerOpRecord(str(func), read, write))
        return out

    def per_op(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            d = out.setdefault(r.op, {"calls": 0, "read_bytes": 0, "write_bytes": 0})
            d["calls"] += 1
            d["read_bytes"] += r.read_bytes
            d["write_bytes"] += r.write_bytes
        return out


# ----------------------------------------------------------------------------- convenience
def count_eager(fn: Callable, *args, **kwargs) -> tuple[Any, EagerTraffic]:
    """Run ``fn(*args, **kwargs)`` counting eager aten traffic; returns (result, counter)."""
    with EagerTraffic() as mode:
        result = fn(*args, **kwargs)
    return result, mode


def count_triton(fn: Callable, *args, **kwargs) -> tuple[Any, TritonTraffic]:
    """Run ``fn(*args, **kwargs)`` counting Triton kernel traffic; returns (result, counter)."""
    with TritonTraffic() as counter:
        result = fn(*args, **kwargs)
    return result, counter

