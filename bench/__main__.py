"""All benchmarks, one after the other: `make bench` (about 8 minutes)."""

import runpy
import sys

for name in ("bench.bench_cache", "bench.bench_archive", "bench.bench_render", "bench.bench_poll",
             "bench.bench_ledger"):
    print(f"\n=== {name} ===", flush=True)
    sys.argv = [name]
    runpy.run_module(name, run_name="__main__")
