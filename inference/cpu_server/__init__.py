"""CPU reference inference server: a transformers causal LM behind SGLang's HTTP subset.

Speaks the protocol in docs/sglang-protocol.md (token ids in, token ids out, as SGLang with
``--skip-tokenizer-init``) so that the one worker client is exercised by tests on CPU.
Start it with ``sluice serve --model DIR --port P`` (or ``inference.launch.launch_cpu_server``,
which builds that command line and waits for ``/health``).

- ``sampling``: request validation (``BadRequest`` -> 400), ``Sampling``, ``Req``,
  ``sample_rows`` (the token and its reported log-prob) and the ``/generate`` answer.
- ``engine``: ``Engine``, the model with its left-padded running batch and KV cache, weight
  loads from disk and over a gloo broadcast.
- ``scheduler``: ``Scheduler``, the waiting queue and the engine's running batch under one
  lock, one engine step at a time.
- ``control``: ``Control``, the control endpoints (pause, continue, abort, flush, the weight
  updates) and the information ones (``model_info``, ``get_weights_by_name``, health).
- ``app``: ``CPUServer``, the aiohttp app (``/generate``, the routes, the admin key), and
  ``serve``.

Each module's docstring states its invariants and the tests that prove them.
"""
