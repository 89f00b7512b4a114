"""Weight transports: where the trainer (publisher) and the rollout workers (receivers) meet
for weights, as ``buffer`` is where they meet for trajectories.

- ``plan``: the sync plan a weight event carries (format, path, group address, buckets).
- ``distributed``: the trainer side of the broadcast to the servers (gloo / NCCL).
- ``publish``: the trainer side's contract (``WeightPublisher``) and its two transports, disk
  and distributed; the trainer picks one by ``trainer.weight_sync``.
- ``disk``: model directories written atomically (``weights/v{N}``) and pruned.
- ``receive``: the worker side's contract (``WeightReceiver``) and its two transports, disk
  (``update_weights_from_disk``) and distributed (join the group, receive every bucket).

Imports ``buffer``, ``staleness`` and ``inference`` only; never ``rollout_workers``, ``trainer``
or the CLI.
"""
