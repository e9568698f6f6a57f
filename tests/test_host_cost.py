"""The host-cost table (ganengine.bench.host_cost): every op case measures at its tiny shape,
through the backend auto picks, and the kernel counts of the CUDA path come from the interpreter."""
from __future__ import annotations

from ganengine.bench import host_cost, registry


def test_every_op_case_has_a_tiny_shape_and_measures():
    cases = [c for c in registry.all_cases().values() if c.kind == "op"]
    assert cases
    for case in cases:
        assert "tiny" in case.shapes, f"{case.name}: register a 'tiny' shape for the host-cost table"
    recs = host_cost.measure(cases[:2], calls=2, rounds=1, with_kernels=True)
    assert recs and all(r["status"] == "ok" for r in recs), [r["reason"] for r in recs]
    for r in recs:
        assert r["eager_us"] > 0 and r["ganengine_us"] > 0 and r["backends"]
        # conftest turns the interpreter on: the CUDA-path kernel counts are filled in
        assert r["eager_kernels"] >= 1 and r["ganengine_kernels"] >= 1
    table = host_cost.markdown(recs)
    assert cases[0].name in table and "kernels eager" in table


def test_optimiser_and_module_cases_measure_the_same_work():
    """rmsprop_step: both optimisers make the same update (their own copies of the same
    parameters); the kernel counts exclude the profiler's record_function markers (no kernel)
    and the first step's state allocation. gan_loss_module: the reference module's loss."""
    import torch

    case = registry.all_cases()["rmsprop_step"]
    work = case.setup(host_cost.tiny_shape(case), torch.device("cpu"), torch.float32)
    work.reference(), work.fused()
    ref_p = [c.cell_contents for c in work.reference.__closure__ if isinstance(c.cell_contents, torch.optim.Optimizer)]
    fused_p = [c.cell_contents for c in work.fused.__closure__ if isinstance(c.cell_contents, torch.optim.Optimizer)]
    for a, b in zip(ref_p[0].param_groups[0]["params"], fused_p[0].param_groups[0]["params"]):
        # two RMSprop steps of lr 5e-5 on equal starts: fp32 rounding of |p| ~ 4 and of the steps
        torch.testing.assert_close(a, b, rtol=0, atol=4 * 2 ** -21)
    (rec,) = host_cost.measure([case], calls=2, rounds=1, with_kernels=True)
    assert rec["status"] == "ok", rec["reason"]
    n = len(work.args) // 2  # parameters
    # multi-tensor RMSprop: step += 1, square_avg *= a, += (1 - a) g^2, sqrt, + eps, addcdiv;
    # FusedRMSprop: the step counters, then the fused kernel
    assert (rec["eager_kernels"], rec["ganengine_kernels"]) == (6, 2) and n == 6
    loss = registry.all_cases()["gan_loss_module"].setup(dict(n=1, h=3, w=5), torch.device("cpu"), torch.float32)
    x = loss.args[0]
    torch.testing.assert_close(loss.fused(x), torch.nn.functional.mse_loss(x, torch.ones_like(x)))
    torch.testing.assert_close(loss.reference(x), torch.nn.functional.mse_loss(x, torch.ones_like(x)))


def test_kernel_counts_are_taken_after_a_warm_up_call():
    """gan_loss_module's forward issues 3 kernels on its first call (lazy one-time
    work) and 1 after: the counts (host_cost, bench --host, the traffic table) were of the first
    call; they are of a call after a warm-up call now (timing.count_kernels' own rule)."""
    import torch

    from ganengine import backends
    from ganengine.bench import timing
    from ganengine.bench.runner import backend_scope

    if not backends.triton_interpret() or "gan_loss_module" not in registry.all_cases():
        import pytest

        pytest.skip("needs TRITON_INTERPRET=1 and the losses")
    case = registry.all_cases()["gan_loss_module"]
    work = case.setup(host_cost.tiny_shape(case), torch.device("cpu"), torch.float32)

    def fwd():
        with torch.no_grad():
            return work.fused(*work.args)

    with backend_scope("triton"):
        fwd()
        steady = timing.count_kernels(fwd)["kernels"]
    recs = host_cost.measure([case], calls=2, rounds=1, with_kernels=True)
    (rec,) = [r for r in recs if r["mode"] == "forward"]
    assert rec["status"] == "ok", rec["reason"]
    assert rec["ganengine_kernels"] == steady == 1


def test_gan_loss_module_backward_issues_no_more_kernels_than_eager():
    """The module's forward+backward on the CUDA path: the forward kernel (loss and gradient) and
    the scale by grad_output, against eager's mse_loss and mse_loss_backward. The CPU run reads
    grad_output once to skip the scale when it is 1, a read the CUDA path does not make."""
    import pytest

    from ganengine import backends
    from ganengine.bench import traffic_table

    if not backends.triton_interpret() or "gan_loss_module" not in registry.all_cases():
        pytest.skip("needs TRITON_INTERPRET=1 and the losses")
    case = registry.all_cases()["gan_loss_module"]
    (rec,) = [r for r in traffic_table.measure_case(case, params=host_cost.tiny_shape(case))
              if r["mode"] == "forward_backward"]
    assert rec["status"] == "ok", rec["reason"]
    assert rec["ganengine_kernels"] <= rec["eager_kernels"] == 2
