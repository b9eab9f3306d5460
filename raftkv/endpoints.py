"""``raftkv client endpoint health|status``: what each node says about itself.

etcdctl's ``endpoint health`` and ``endpoint status`` ask every endpoint separately, which is
what an operator needs when one node misbehaves: the cluster-wide ``status`` goes through
whichever node answers first. Here, too, each check is a call to exactly one node, with its
own deadline, and every endpoint is reported, reachable or not.

Healthy means: the node answers the standard gRPC health check as SERVING, and it serves a
linearizable read (of a key nobody writes), which needs its shard's leader and a quorum.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv.client import Client

# Read by `endpoint health` (linearizably); never written, so NOT_FOUND is the healthy answer.
HEALTH_KEY = b"\x00raftkv-endpoint-health"


@dataclass(frozen=True)
class Health:
    endpoint: str
    healthy: bool
    took_ms: float
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EndpointStatus:
    endpoint: str
    took_ms: float
    node: str = ""
    version: str = ""
    leads: int = 0
    replicas: int = 0
    applied: int = 0
    term: int = 0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _endpoints(client: Client, cluster: bool) -> list[str]:
    if not cluster:
        return list(client.endpoints)
    status = await client.status()
    return [n.grpc for n in status.nodes]


def _describe(e: grpc.aio.AioRpcError) -> str:
    """One short line: gRPC's resolver and connection texts are long and repetitive."""
    details = e.details() or ""
    if e.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower():
        return f"not reachable ({details.rsplit(': ', 1)[-1].strip().lower()})"
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer in time"
    return f"{e.code().name.lower()}: {details}".strip()


async def _health(client: Client, endpoint: str) -> Health:
    started = time.monotonic()
    deadline = client.attempt_timeout
    channel = client.channel(endpoint)
    try:
        check = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=deadline
        )
        if check.status != health_pb2.HealthCheckResponse.SERVING:
            return Health(endpoint, False, _ms(started), "the node is not serving yet")
        try:
            await kv_grpc.KVStub(channel).Get(
                kv.GetRequest(key=HEALTH_KEY, consistency=kv.LINEARIZABLE),
                timeout=deadline,
                metadata=client.metadata,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
    except grpc.aio.AioRpcError as e:
        return Health(endpoint, False, _ms(started), _describe(e))
    return Health(endpoint, True, _ms(started))


async def _status(client: Client, endpoint: str) -> EndpointStatus:
    started = time.monotonic()
    try:
        reply = await kv_grpc.ClusterStub(client.channel(endpoint)).Status(
            kv.StatusRequest(local_only=True),
            timeout=client.attempt_timeout,
            metadata=client.metadata,
        )
    except grpc.aio.AioRpcError as e:
        return EndpointStatus(endpoint, _ms(started), error=_describe(e))
    # Leaderships and replicas count data shards, as `client status`, `top` and `member list`
    # do; the meta group's replica still counts for the applied index, term and problems.
    data = [r for s in reply.shards for r in s.replica_status if r.node == reply.node]
    mine = [*data, *(r for r in reply.meta.replica_status if r.node == reply.node)]
    problems = "; ".join(sorted({r.problem for r in mine if r.problem}))
    return EndpointStatus(
        endpoint,
        _ms(started),
        node=reply.node,
        version=reply.version,
        leads=sum(1 for r in data if r.role == "leader"),
        replicas=len(data),
        applied=sum(r.last_applied for r in mine),
        term=max((r.term for r in mine), default=0),
        error=problems,
    )


async def check_health(client: Client, cluster: bool) -> list[Health]:
    endpoints = await _endpoints(client, cluster)
    return list(await asyncio.gather(*(_health(client, e) for e in endpoints)))


async def check_status(client: Client, cluster: bool) -> list[EndpointStatus]:
    endpoints = await _endpoints(client, cluster)
    return list(await asyncio.gather(*(_status(client, e) for e in endpoints)))


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)
