"""Speed, timed beside the pipeline rather than in it: how fast each sampler of the speed table (and one training
step of each stage) runs, as a speed record of its own (`biflow-bench bench speed`, `run speed`).

    timing.py     timing primitives: warm-up, device sync, median of repeats; the matmul peak; peak memory
    flops.py      FLOP counting over one call (matmuls and attention)
    harness.py    what is timed: models from a variant's config, a sampler call, a training step as `fit` takes it
    benchmark.py  `run_speed_bench` (the speed record) and `record_speed_bench` (run it and write the record)
    table.py      the speed record as a terminal table
"""
