"""One health check of a gRPC server by the gRPC health protocol (``grpc.health.v1.Health/Check``,
grpcio-health-checking), as Kubernetes' gRPC probes and Envoy's gRPC health checker do it.

Used by health-gated registration (sidecar.registration) for ``protocol: grpc`` instances. Each
check dials anew: a channel kept between checks would sit in grpc's reconnect back-off (up to two
minutes) after the app restarts, and the instance would come back that much later.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

CHECK_TIMEOUT = 2.0


async def check_grpc(host: str, port: int, service: str = "", timeout: float = CHECK_TIMEOUT) -> bool:
    """True when the server answers ``SERVING`` for ``service`` ("" asks about the whole server).
    Any other answer, an error (UNIMPLEMENTED: no health service; NOT_FOUND: an unknown service) or
    no answer within ``timeout`` is unhealthy."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.aio.AioRpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
