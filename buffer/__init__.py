"""The trajectory wire format and the Redis stream buffer between rollout workers and trainers.

Imports neither ``rollout_workers`` nor ``trainer`` nor the CLI.
"""

from buffer.codec import CodecError, decode_group, encode_group
from buffer.connection import RedisUnavailable, connect, key, redact_url
from buffer.redis_buffer import BufferStats, Delivered, RedisTrajectoryBuffer
from buffer.schema import SCHEMA_VERSION, Sample, TrajectoryGroup

__all__ = [
    "SCHEMA_VERSION",
    "BufferStats",
    "CodecError",
    "Delivered",
    "RedisTrajectoryBuffer",
    "RedisUnavailable",
    "Sample",
    "TrajectoryGroup",
    "connect",
    "decode_group",
    "encode_group",
    "key",
    "redact_url",
]
