"""The trainer: batch assembly, GRPO advantages, the decoupled-PPO train step, weight
publication (``weights.publish``: safetensors HF dirs under ``RUN_DIR/weights/v{N}``, or the
distributed broadcast), exactly-once checkpoint/resume, and data parallelism under ``torchrun``.

Modules: ``loop`` (the loop and its wiring: ``open_trainer``, ``run_trainer``), ``parts``
(the parts, built complete before the loop starts), ``data`` (a step's groups and the
staleness drop), ``step`` (one optimizer step), ``batch`` (samples and micro-batches),
``ledger`` (step records, checkpoint pointer, the one-transaction ack), ``resume``
(start/resume and replay), ``checkpoint`` (checkpoint files), ``model``, ``metrics``
(metrics.jsonl), ``crash`` (the fault-injection hook), ``config`` (the ``trainer`` section and
the explicit arguments).

Imports ``procs``, ``buffer``, ``staleness``, ``inference`` and ``weights``; never
``rollout_workers`` or the CLI. Entry point: ``sluice train`` (``sluice.commands.train``, which
composes ``TrainerConfig`` + ``TrainerArgs`` from the run file) -> ``trainer.loop.run_trainer``.
"""
