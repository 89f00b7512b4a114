"""Local processes: the one place that starts a child, waits for its health and stops it.

- ``process``: ``spawn`` (log file, own session, CPU pinning), ``wait_http_ok`` (poll a URL
  until 200; fails with the log tail when the process exits), ``stop_pid`` / ``stop_pids``
  (SIGTERM, then SIGKILL, then reap), ``kill_pid``, ``alive`` (never reaps), ``pid_alive`` (any pid), ``free_port``,
  ``log_tail``.
- ``redis_server``: ``RedisServer``, a private ``redis-server`` on a free loopback port.
- ``redis_cluster``: ``RedisCluster``, a private Redis Cluster (masters with replicas), each
  node started and stopped by its pid.

Every process is started by us and stopped by its own pid; nothing here looks processes up by
name. Imports nothing from the project (every package may use it).
"""

from procs.process import (
    NotHealthy,
    ProcessExited,
    alive,
    free_port,
    http_ok,
    kill_pid,
    log_tail,
    pid_alive,
    reap,
    spawn,
    stop_pid,
    stop_pids,
    wait_exit,
    wait_http_ok,
)
from procs.redis_cluster import RedisCluster
from procs.redis_server import RedisServer

__all__ = [
    "NotHealthy",
    "ProcessExited",
    "RedisCluster",
    "RedisServer",
    "alive",
    "free_port",
    "http_ok",
    "kill_pid",
    "log_tail",
    "pid_alive",
    "reap",
    "spawn",
    "stop_pid",
    "stop_pids",
    "wait_exit",
    "wait_http_ok",
]
