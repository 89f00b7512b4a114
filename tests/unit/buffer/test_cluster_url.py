"""``redis+cluster://`` URLs: parsed into startup nodes, validated with a one-line error,
redacted, and turned into redis-py's cluster client (no command sent)."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterDownError, TryAgainError

from buffer.config import RedisConfig
from buffer.connection import (
    TRANSIENT,
    cluster_nodes,
    is_cluster,
    is_cluster_url,
    make_client,
    redact_url,
    validate_url,
)


def test_nodes_of_a_cluster_url() -> None:
    url = "redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001,node3"
    assert is_cluster_url(url) and not is_cluster_url("redis://h:1/0")
    assert cluster_nodes(url) == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("node3", 6379)]
    assert cluster_nodes("rediss+cluster://[::1]:7000/0") == [("::1", 7000)]
    assert redact_url(url) == "redis+cluster://u:***@10.0.0.1:7000,10.0.0.2:7001,node3"
    assert RedisConfig(url=url).url == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://h:7000/3", "only db 0"),
        ("redis+cluster://h:7000,h:port", "is not host:port"),
        ("redis+cluster://h:70000", "is not host:port"),
        ("redis+cluster://", "is not host:port"),
        ("cluster://h:7000", r"redis\+cluster://"),
    ],
)
def test_bad_cluster_urls_are_named(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        validate_url(url)


async def test_a_cluster_url_makes_the_cluster_client() -> None:
    client = make_client("redis+cluster://u:pw@127.0.0.1:7000,127.0.0.1:7001")
    try:
        assert isinstance(client, RedisCluster) and is_cluster(client)
        assert not is_cluster(make_client("redis://127.0.0.1:1/0"))
    finally:
        await client.aclose()


def test_failover_replies_are_transient() -> None:
    assert issubclass(ClusterDownError, TRANSIENT) and issubclass(TryAgainError, TRANSIENT)
