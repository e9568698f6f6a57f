"""Memory-traffic counters: exact bytes on kernels / compositions whose traffic is known."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from ganengine import backends  # noqa: E402
from ganengine.bench.traffic import EagerTraffic, TritonTraffic, footprint_bytes, minimum_bytes  # noqa: E402

interpret = pytest.mark.skipif(not backends.triton_interpret(),
                               reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)


@triton.jit
def _twice_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # reads x twice (like a two-pass norm): total loads = 2x the unique bytes
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(x_ptr + offs, mask=m)
    b = tl.load(x_ptr + offs, mask=m)
    tl.store(out_ptr + offs, a * b, mask=m)


@triton.jit
def _copy2d_kernel(x_ptr, out_ptr, rows, cols, stride, BR: tl.constexpr, BC: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    c = tl.program_id(1) * BC + tl.arange(0, BC)[None, :]
    m = (r < rows) & (c < cols)
    tl.store(out_ptr + r * cols + c, tl.load(x_ptr + r * stride + c, mask=m), mask=m)


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1000, 128, 129])
def test_masked_add_exact_bytes(n, dtype):
    x, y = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    out = torch.empty(n, dtype=dtype)
    es = x.element_size()
    with TritonTraffic() as tt:
        _add_kernel[(triton.cdiv(n, 128),)](x, y, out, n, BLOCK=128)
    torch.testing.assert_close(out, x + y)
    assert tt.load_bytes == n * 2 * es
    assert tt.store_bytes == n * es
    assert tt.total_bytes == n * 3 * es
    (launch,) = tt.launches
    assert launch.kernel == "_add_kernel" and launch.grid == (triton.cdiv(n, 128),)
    assert launch.args["x_ptr"].load_bytes == launch.args["x_ptr"].unique_load_bytes == n * es
    assert launch.args["out_ptr"].store_bytes == launch.args["out_ptr"].unique_store_bytes == n * es
    assert launch.args["out_ptr"].load_bytes == 0
    assert tt.per_kernel()["_add_kernel"] == {"launches": 1, "load_bytes": 2 * n * es,
                                              "store_bytes": n * es, "atomic_bytes": 0}


@interpret
def test_reread_counts_total_and_unique():
    n = 300
    x, out = torch.randn(n), torch.empty(n)
    with TritonTraffic() as tt:
        _twice_kernel[(3,)](x, out, n, BLOCK=128)
        _twice_kernel[(3,)](x, out, n, BLOCK=128)
    assert len(tt.launches) == 2
    for launch in tt.launches:
        assert launch.args["x_ptr"].load_bytes == 2 * n * 4
        assert launch.args["x_ptr"].unique_load_bytes == n * 4
    assert tt.load_bytes == 4 * n * 4 and tt.store_bytes == 2 * n * 4


@interpret
def test_2d_masks_and_strided_rows():
    rows, cols = 37, 50
    base = torch.randn(rows, 64)
    x = base[:, :cols]  # row stride 64: the columns beyond 50 must not be counted
    out = torch.empty(rows, cols)
    with TritonTraffic() as tt:
        _copy2d_kernel[(triton.cdiv(rows, 16), triton.cdiv(cols, 32))](x, out, rows, cols, 64, BR=16, BC=32)
    torch.testing.assert_close(out, x)
    assert tt.load_bytes == rows * cols * 4 and tt.store_bytes == rows * cols * 4
    assert tt.launches[0].args["x_ptr"].unique_load_bytes == rows * cols * 4


@interpret
def test_hooks_are_removed_on_exit():
    from triton.runtime import interpreter

    before = interpreter.InterpreterBuilder.create_masked_load
    with TritonTraffic():
        assert interpreter.InterpreterBuilder.create_masked_load is not before
    assert interpreter.InterpreterBuilder.create_masked_load is before
    x, y, out = torch.randn(10), torch.randn(10), torch.empty(10)
    with TritonTraffic() as tt:
        pass
    _add_kernel[(1,)](x, y, out, 10, BLOCK=16)  # outside: not counted
    assert tt.total_bytes == 0 and tt.launches == []


def test_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with TritonTraffic():
            pass


def test_eager_counter_exact_composition():
    n = 1000
    x, y = torch.randn(n), torch.randn(n)
    with EagerTraffic() as m:
        torch.relu(x * 2 + y)  # mul: r n w n; add: r 2n w n; relu: r n w n
    assert [r.op for r in m.records] == ["aten.mul.Tensor", "aten.add.Tensor", "aten.relu.default"]
    assert m.read_bytes == 4 * n * 4 and m.write_bytes == 3 * n * 4 and m.num_kernels == 3


def test_eager_counter_views_inplace_out_and_broadcast():
    n = 256
    x, y = torch.randn(16, 16), torch.randn(16, 16)
    out = torch.empty(16, 16)
    row = torch.randn(16)
    with EagerTraffic() as m:
        v = x.view(n).view(16, 16).t()    # views: no traffic
        x.add_(y)                          # reads x, y; writes x
        torch.mul(x, y, out=out)           # reads x, y; writes out (not read)
        out.copy_(v)                       # reads v; overwrites out
        z = x + row                        # broadcast row counts once: 16 elements
    assert z.shape == (16, 16)
    assert [r.op.split(".")[1] for r in m.records] == ["add_", "mul", "copy_", "add"]
    assert m.read_bytes == (2 * n + 2 * n + n + n + 16) * 4
    assert m.write_bytes == (n + n + n + n) * 4


def test_footprint_and_minimum_bytes():
    x = torch.randn(4, 8)
    assert footprint_bytes(x) == 128
    assert footprint_bytes(torch.randn(8).expand(4, 8)) == 32
    assert footprint_bytes(x.t()) == 128
    y = torch.randn(4, 8, dtype=torch.float16)
    assert minimum_bytes([x, x, y], [torch.empty(4)]) == 128 + 64 + 16  # x counted once


@interpret
def test_norm_act_traffic_record():
    from ganengine.bench import registry, traffic_table

    cases = registry.all_cases()
    if "instance_norm_act" not in cases:
        pytest.skip("norm_act is not in this build")
    recs = traffic_table.measure_case(cases["instance_norm_act"], params=dict(n=2, c=4, h=8, w=8, affine=True))
    assert [r["mode"] for r in recs] == ["forward", "forward_backward"]
    for r in recs:
        assert r["status"] == "ok", r["reason"]
        # a kernel cannot move less than its inputs and outputs; eager moves at least as much
        assert r["ganengine_bytes"] >= r["min_bytes"]
        assert r["triton_unique_bytes"] <= r["triton_bytes"]
        assert r["ganengine_issued_bytes"] == r["triton_bytes"] + r["aten_around_bytes"]
        assert r["eager_bytes"] > r["min_bytes"]
        assert r["predicted_speedup"] == pytest.approx(r["eager_bytes"] / r["ganengine_bytes"])
        assert r["kernels"] and all(k["kernel"] for k in r["kernels"])
    fwd = recs[0]
    x_bytes = 2 * 4 * 8 * 8 * 4
    assert fwd["min_bytes"] == 2 * x_bytes + 2 * 4 * 4  # x read, y written, weight + bias
    # + grad_y read, grad_x / grad_weight / grad_bias written
    assert recs[1]["min_bytes"] == 4 * x_bytes + 4 * 4 * 4
    md = traffic_table.traffic_markdown(recs)
    assert "instance_norm_act" in md and "predicted speedup" in md


def test_eager_counter_factories_and_backward():
    x = torch.randn(4, 8, requires_grad=True)
    with EagerTraffic() as m:
        torch.ones_like(x)                 # reads no data: writes 128 B
        y = (x * 3).sum()                  # mul: r 128 w 128; sum: r 128 w 4
        y.backward()                       # the backward's kernels are counted too
    ops = [r.op for r in m.records]
    assert ops[:3] == ["aten.ones_like.default", "aten.mul.Tensor", "aten.sum.default"]
    assert (m.records[0].read_bytes, m.records[0].write_bytes) == (0, 128)
    assert len(ops) > 3 and x.grad is not None


@interpret
def test_aliased_arguments_share_one_region():
    n = 200
    buf = torch.randn(2 * n)
    x, y = buf[:n], buf[n:]  # two views of one storage
    out = torch.empty(n)
    with TritonTraffic() as tt:
        _add_kernel[(2,)](x, y, out, n, BLOCK=128)
    args = tt.launches[0].args
    assert set(args) == {"x_ptr=y_ptr", "out_ptr"}
    assert args["x_ptr=y_ptr"].load_bytes == args["x_ptr=y_ptr"].unique_load_bytes == 2 * n * 4
    assert tt.load_bytes == 2 * n * 4


@interpret
def test_interpreter_bookkeeping_is_not_eager_traffic():
    n = 100
    x, y, out = torch.randn(n), torch.randn(n), torch.empty(n)
    with TritonTraffic() as tt, EagerTraffic() as et:
        _add_kernel[(1,)](x, y, out, n, BLOCK=128)
        out.mul_(2)  # a real aten op around the kernel is still counted
    assert tt.total_bytes == 3 * n * 4
    assert [r.op for r in et.records] == ["aten.mul_.Tensor"] and et.total_bytes == 2 * n * 4


@triton.jit
def _indirect_twice_kernel(tab_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # reaches its input through a table of addresses (as the spectral-norm kernels reach their
    # weights): the input is no argument of the kernel. Reads it twice.
    x_ptr = tl.load(tab_ptr).to(tl.pointer_type(tl.float32))
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(x_ptr + offs, mask=m)
    b = tl.load(x_ptr + offs, mask=m)
    tl.store(out_ptr + offs, a + b, mask=m)


def _indirect_launch(n=300):
    x, out = torch.randn(n), torch.empty(n)
    tab = torch.tensor([x.data_ptr()], dtype=torch.int64)
    return x, out, tab, lambda: _indirect_twice_kernel[(3,)](tab, out, n, BLOCK=128)


@interpret
def test_pointer_table_bytes_are_not_dropped():
    """Bytes at addresses in no argument's storage count under <unattributed>, once per address."""
    from ganengine.bench.traffic import UNATTRIBUTED

    n = 300
    x, out, tab, launch = _indirect_launch(n)
    with TritonTraffic() as tt:
        launch()
    torch.testing.assert_close(out, 2 * x)
    args = tt.launches[0].args
    assert args[UNATTRIBUTED].load_bytes == 2 * n * 4          # issued: both reads
    assert args[UNATTRIBUTED].unique_load_bytes == n * 4       # DRAM: each address once
    assert args["tab_ptr"].unique_load_bytes == 8
    unique = sum(a.unique_load_bytes + a.unique_store_bytes for a in args.values())
    assert unique == n * 4 + 8 + n * 4                         # x + table + out
    assert tt.total_bytes == sum(a.load_bytes + a.store_bytes for a in args.values())


@interpret
def test_tracked_tensor_reached_through_pointer_table():
    n = 300
    x, out, tab, launch = _indirect_launch(n)
    with TritonTraffic({"x": x}) as tt:
        launch()
        _add_kernel[(3,)](out, out, out, n, BLOCK=128)  # does not touch x: x is not listed
    first, second = (launch.args for launch in tt.launches)
    assert set(first) == {"tab_ptr", "out_ptr", "x"}
    assert first["x"].load_bytes == 2 * n * 4 and first["x"].unique_load_bytes == n * 4
    assert "x" not in second
    tt2 = TritonTraffic().track([x], prefix="in")
    with tt2:
        launch()
    assert tt2.launches[0].args["in0"].unique_load_bytes == n * 4


def _op_traffic_records():
    from ganengine.bench import registry

    return [c for c in registry.all_cases().values() if c.kind == "op"]


@interpret
@pytest.mark.parametrize("name", ["spectral_norm_weight", "spectral_norm_group"])
def test_spectral_norm_traffic_not_below_minimum(name):
    """The spectral-norm kernels read their weights through a pointer table: those bytes count."""
    from ganengine.bench import registry, traffic_table

    cases = registry.all_cases()
    if name not in cases:
        pytest.skip(f"{name} is not in this build")
    recs = traffic_table.measure_case(cases[name], params=cases[name].traffic_shape)
    assert [r["mode"] for r in recs] == ["forward", "forward_backward"]
    for r in recs:
        assert r["status"] == "ok", r["reason"]
        assert r["ganengine_bytes"] >= r["min_bytes"], r
        assert r["efficiency"] <= 1.0 + 1e-9
        assert r["triton_unique_bytes"] <= r["triton_bytes"]
        for k in r["kernels"]:  # every byte a kernel moves is attributed to some storage
            assert k["load_bytes"] + k["store_bytes"] + k["atomic_bytes"] == sum(
                a["load_bytes"] + a["store_bytes"] for a in k["args"].values())
    fwd = recs[0]
    if name == "spectral_norm_weight":  # every launch reads the weight (input0) from its table
        assert all("input0" in k["args"] for k in fwd["kernels"])


@interpret
def test_every_op_case_traffic_efficiency_at_most_one():
    """minimum / ganengine DRAM bytes can never exceed 1 (+ rounding), for any op case."""
    from ganengine.bench import traffic_table

    measured = 0
    for case in _op_traffic_records():
        for r in traffic_table.measure_case(case, params=case.traffic_shape):
            if r["status"] != "ok":
                continue
            measured += 1
            assert r["ganengine_bytes"] >= r["min_bytes"], (case.name, r["mode"])
            assert r["efficiency"] is not None and r["efficiency"] <= 1.0 + 1e-9, (case.name, r["mode"])
            assert r["triton_unique_bytes"] <= r["triton_bytes"], (case.name, r["mode"])
    assert measured


@interpret
def test_traffic_record_counts_a_call_after_a_warm_up_call():
    """measure_case counted the first call inside the counters: gan_loss_module's forward showed 3
    kernels (1 after); a warm-up call of each side comes first now."""
    from ganengine.bench import registry, traffic_table
    from ganengine.bench.host_cost import tiny_shape

    case = registry.all_cases().get("gan_loss_module")
    if case is None:
        pytest.skip("the losses are not in this build")
    recs = {r["mode"]: r for r in traffic_table.measure_case(case, params=tiny_shape(case))}
    fwd = recs["forward"]
    assert fwd["status"] == "ok", fwd["reason"]
    assert (fwd["eager_kernels"], fwd["ganengine_kernels"]) == (1, 1)


def test_eager_counter_counts_a_scalar_read_apart_from_kernels():
    """`.item()` is a device-to-host copy on a GPU, not a kernel (the profiler count leaves Memcpy
    out): it was counted as one, so a loss's CPU-only "is grad_output 1?" read showed up as a
    kernel of the CUDA path (gan_loss_module forward+backward: 3 against eager's 2)."""
    x = torch.randn(8)
    with EagerTraffic() as m:
        y = x * 2
        float(y.sum())
        y.sum().item()
    assert m.num_kernels == 3 and m.scalar_reads == 2
    assert [r.op for r in m.records] == ["aten.mul.Tensor", "aten.sum.default", "aten.sum.default"]
