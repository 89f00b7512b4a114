"""The trainer: batch assembly, GRPO advantages, the decoupled-PPO train step, weight
publication (safetensors HF dirs under ``RUN_DIR/weights/v{N}``), exactly-once
checkpoint/resume, and data parallelism under ``torchrun``.

Imports ``buffer`` and ``staleness``, never ``rollout_workers``. Entry point: ``sluice train``
(``sluice.commands.train``) -> ``trainer.loop.run_trainer``.
"""
