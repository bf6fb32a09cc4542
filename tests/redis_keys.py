"""Cleaning up after a test that used the machine's Redis under a key prefix of its own."""

from redis import Redis


def delete_keys(connection: Redis, key_prefix: str) -> None:
    """Every key of this test's deployment: its records, its RQ queues, jobs, registries and workers."""
    for key in connection.scan_iter(match=f"*{key_prefix}*", count=1000):
        connection.delete(key)
    for set_key in (b"rq:queues", b"rq:workers"):
        for member in connection.smembers(set_key):
            if key_prefix.encode() in member:
                connection.srem(set_key, member)
