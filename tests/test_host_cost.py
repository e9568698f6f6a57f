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
