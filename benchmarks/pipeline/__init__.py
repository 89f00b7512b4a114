"""The parts of ``sluice bench pipeline`` (the command itself is ``benchmarks/pipeline_bench.py``):

- ``placement``: which cores inference and training own, and the processes started on them;
- ``workloads``: the task/model mixes, one invocation's settings (``Setup``), a run's config;
- ``services``: Redis, the CPU server or the shared SGLang server, and the server's busy time;
- ``measure``: windows, interpolation and Redis memory read from a finished run;
- ``runner``: the two ceilings and one pipeline run at one eta;
- ``report``: the summary numbers, the table and the plot.
"""
