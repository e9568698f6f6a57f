"""ganengine.bench.timing.interleave, the timing core of `ganengine bench` and benchmarks/*.py:
turns taken in order, warm-up untimed, median per variant (a fake clock: no real timing)."""
import pytest

from ganengine.bench import timing


class FakeClock:
    """Time advances only when a variant runs: each call of a variant costs its next duration."""

    def __init__(self):
        self.now = 0.0
        self.log = []

    def __call__(self):
        return self.now

    def variant(self, name, durations_s):
        it = iter(durations_s)

        def call():
            self.log.append(name)
            self.now += next(it)
        return call


def test_interleave_takes_turns_and_takes_the_median():
    clock = FakeClock()
    # a: 2 warm-up calls (slow: compilation), then 10, 30, 20 ms -> median 20; b: 5, 1, 9 -> 5
    calls = {"a": clock.variant("a", [9.0, 9.0, 0.010, 0.030, 0.020]),
             "b": clock.variant("b", [9.0, 9.0, 0.005, 0.001, 0.009])}
    res = timing.interleave(calls, 3, warmup=2, clock=clock)
    assert clock.log == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert res["a"]["median"] == pytest.approx(20.0) and res["b"]["median"] == pytest.approx(5.0)
    assert res["a"]["repeats"] == res["b"]["repeats"] == 3
    assert res["a"]["min"] == pytest.approx(10.0) and res["a"]["max"] == pytest.approx(30.0)
    assert list(res) == ["a", "b"]


def test_interleave_rounds_alternate_scopes_and_batches():
    clock = FakeClock()
    entered = []

    class Scope:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            entered.append(self.name)
            clock.now += 100.0  # a scope's cost is outside the clock's samples

        def __exit__(self, *exc):
            clock.now += 100.0

    calls = {"a": clock.variant("a", [0.002] * 12), "b": clock.variant("b", [0.004] * 12)}
    res = timing.interleave(calls, 4, warmup=0, per_round=2, round_warmup=1, alternate=True,
                            scopes={"a": lambda: Scope("a")}, clock=clock)
    # round 0: a (1 warm-up + 2 timed), b (same); round 1 reversed
    assert clock.log == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert entered == ["a", "a"]
    assert res["a"]["median"] == pytest.approx(2.0) and res["b"]["median"] == pytest.approx(4.0)
    assert res["a"]["repeats"] == 4
    clock2 = FakeClock()
    res = timing.interleave({"c": clock2.variant("c", [0.001, 0.003] * 6)}, 3, warmup=0,
                            calls_per_sample=4, clock=clock2)
    assert res["c"]["median"] == pytest.approx(2.0) and len(clock2.log) == 12  # mean of 4 calls


def test_interleave_budget_errors_and_bad_arguments():
    clock = FakeClock()
    calls = {"slow": clock.variant("slow", [1.0] * 100), "fast": clock.variant("fast", [0.001] * 100)}
    res = timing.interleave(calls, 50, warmup=0, budget_s=2.5, min_repeats=2, clock=clock)
    assert res["slow"]["repeats"] == res["fast"]["repeats"] == 3  # stopped once over budget

    failed = {}

    def boom():
        raise RuntimeError("cannot serve")

    res = timing.interleave({"ok": lambda: None, "bad": boom}, 3, on_error=failed.__setitem__)
    assert set(res) == {"ok"} and isinstance(failed["bad"], RuntimeError)
    with pytest.raises(RuntimeError, match="cannot serve"):
        timing.interleave({"bad": boom}, 3)
    with pytest.raises(ValueError, match="repeats"):
        timing.interleave({"ok": lambda: None}, 0)


def test_load_note_and_kernel_count():
    import torch

    assert "load average" in timing.load_note()
    x = torch.randn(8)
    c = timing.count_kernels(lambda: torch.relu(x * 2 + 1), "cpu")
    assert c["kernels"] >= 3  # mul, add, relu: each one kernel on a GPU
    assert "| variant | kernels per call |" in timing.kernel_table({"eager": lambda: torch.relu(x)})
