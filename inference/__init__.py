"""The engines rollout workers drive.

- ``protocol``: the ``InferenceClient`` Protocol a worker depends on, the request and result
  types and the errors (numpy only, no HTTP).
- ``client``: ``SGLangClient``, the one HTTP client for SGLang and the CPU reference server.
- ``responses``: the parsing of SGLang's answers (pure functions, numpy only, no HTTP).
- ``launch``: the one place that builds an engine's command line (``sglang_command``,
  ``cpu_server_command``), starts it (through ``procs``) and waits for its health.
- ``cpu_server``: the CPU reference server (``sluice serve``): ``sampling``, ``engine``, ``app``.
- ``models``: Hugging Face model directories (tiny random-init models, checks, loading).

Imports ``procs`` only; never ``rollout_workers``, ``trainer`` or the CLI.
"""
