"""The engines rollout workers drive.

- ``protocol``: the ``InferenceClient`` Protocol a worker depends on, the request and result
  types and the errors (numpy only, no HTTP).
- ``client``: ``SGLangClient``, the one HTTP client for SGLang and the CPU reference server.
- ``launch``: the one place that builds an engine's command line, starts it and waits for
  its health.
- ``cpu_server``: the CPU reference server (``sluice serve``).
- ``models``: Hugging Face model directories (tiny random-init models, checks, loading).

Imports ``procs`` only; never ``rollout_workers``, ``trainer`` or the CLI.
"""
