"""Benchmarking, memory-traffic counting and profiling for ganengine.

Modules (each with one job):
  registry       benchmark cases (ops: forward / forward+backward; models: training step)
  cases_ops      the built-in op cases, registered per op family present in this build
  cases_models   the built-in model cases (ganengine.models.build_model + train_step)
  runner         runs cases under eager, torch.compile and each ganengine backend
  timing         the one timing core: variants interleaved (warm-up, repeats, median), CUDA
                 do_bench, the machine's load, kernel counts; every benchmarks/*.py uses it
  memory         peak memory: CUDA allocator, CPU resident-set high-water mark
  machine        machine, versions and git revision recorded with every figure
  report         JSON, Markdown and PNG outputs
  traffic        Triton kernel / eager PyTorch global-memory byte counters
  traffic_table  per-op traffic table: kernel bytes vs minimum vs eager
  profile        torch.profiler runs, operator table grouped ganengine vs PyTorch

Command line: ``ganengine bench``, ``ganengine profile``; tables for BENCHMARKS.md:
``python -m ganengine.tools.bench_tables``. See docs/bench.md.
"""
