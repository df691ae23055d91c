"""Replicas on one endpoint with the same credentials share one S3 client and pool (issue 14)."""

from __future__ import annotations

import pytest

from replicad.clients.s3 import S3ReplicaClient
from tests.s3servers import ClientFactory


@pytest.mark.parametrize("backend", ["moto"], indirect=True)
async def test_clients_of_one_endpoint_share_a_pool_and_count_their_own_requests(
    make_replica_client: ClientFactory,
) -> None:
    a = await make_replica_client(prefix="tenants/a.db")
    b = await make_replica_client(prefix="tenants/b.db")
    other = await make_replica_client(prefix="tenants/c.db", read_timeout=21.0)
    assert isinstance(a, S3ReplicaClient)
    assert isinstance(b, S3ReplicaClient)
    assert isinstance(other, S3ReplicaClient)
    assert a._client is b._client, "same endpoint and settings: one botocore client"
    assert other._client is not a._client, "different settings: a client of its own"

    await a.put_object("x", b"from a")
    await b.put_object("y", b"from b")
    await b.put_object("z", b"from b")
    assert a.stats.requests == {"PUT": 1}, "each client counts only its own requests"
    assert b.stats.requests == {"PUT": 2}
    assert [o.key for o in await a.list_objects()] == ["x"], "and keeps its own prefix"

    pool = a._client
    await a.close()
    assert await b.get_object("y") == b"from b", "closing one leaves the pool to the others"
    await b.close()
    fresh = await make_replica_client(prefix="tenants/d.db")
    assert isinstance(fresh, S3ReplicaClient)
    assert fresh._client is not pool, "the last user closed the shared client"
    assert await fresh.list_objects() == []
