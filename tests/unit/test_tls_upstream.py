"""Which pools are mTLS ones (auto mTLS), and what replaces them when the config changes."""

from __future__ import annotations

from sidecar.config import ClusterConfig, EndpointConfig, SecretConfig, UpstreamTlsConfig
from sidecar.tls import TlsIdentity
from sidecar.upstream.cluster import Cluster, ClusterManager
from tests.support.pki import Ca, spiffe

TLS = UpstreamTlsConfig(san=spiffe("b"), alpn=("http/1.1",), sni="outbound_.b.default")
EPS = (EndpointConfig("10.0.0.1", 80, mtls=True), EndpointConfig("10.0.0.2", 80))


def cluster(tls=TLS, identity=None) -> Cluster:
    c = Cluster(ClusterConfig("outbound|b.default", tls=tls), identity=identity or TlsIdentity())
    c.set_endpoints(EPS)
    return c


def pools(c: Cluster):
    return {key: ep.pool for key, ep in c.endpoints.items()}


def test_only_marked_endpoints_of_a_tls_cluster_get_mtls_pools():
    c = cluster()
    p = pools(c)
    assert p["10.0.0.1:80"].tls.config is TLS and p["10.0.0.2:80"].tls is None
    assert c.admin_view()["endpoints"][0]["tls_mode"] == "mutual"
    assert all(pool.tls is None for pool in pools(cluster(tls=None)).values())
    assert all(pool.tls is None for pool in pools(Cluster(ClusterConfig("x", tls=TLS))).values())  # no identity


def test_an_endpoint_that_changes_kind_gets_a_new_pool_and_the_others_keep_theirs():
    c = cluster()
    before = pools(c)
    c.set_endpoints((EndpointConfig("10.0.0.1", 80, mtls=False), EndpointConfig("10.0.0.2", 80, weight=2)))
    after = pools(c)
    assert after["10.0.0.1:80"] is not before["10.0.0.1:80"] and before["10.0.0.1:80"].closed
    assert after["10.0.0.1:80"].tls is None
    assert after["10.0.0.2:80"] is before["10.0.0.2:80"]


def test_a_cluster_tls_change_replaces_the_pools():
    c = cluster()
    before = pools(c)
    c.set_config(ClusterConfig("outbound|b.default", tls=UpstreamTlsConfig(san=spiffe("c"))))
    after = pools(c)
    assert all(after[k] is not before[k] for k in before)
    assert after["10.0.0.1:80"].tls.config.san == spiffe("c")


def test_the_first_certificate_closes_idle_plaintext_connections_of_mtls_pools_only():
    identity = TlsIdentity()
    manager = ClusterManager(identity=identity)
    manager.update_clusters({"outbound|b.default": ClusterConfig("outbound|b.default", tls=TLS)})
    manager.update_endpoints("outbound|b.default", EPS)
    closed: list[str] = []

    class IdleConnection:  # what close_idle closes
        def __init__(self, key: str) -> None:
            self.key = key

        def close(self) -> None:
            closed.append(self.key)

    for key, ep in manager.get("outbound|b.default").endpoints.items():
        ep.pool._idle.append(IdleConnection(key))
    ca = Ca()
    w = ca.workload("a")
    identity.set_pending_key(w.key_pem)
    identity.apply_secrets({"default": SecretConfig("default", certificate_chain=w.chain_pem),
                            "ROOTCA": SecretConfig("ROOTCA", trusted_ca=ca.bundle_pem)})
    assert closed == ["10.0.0.1:80"]
    for ep in manager.get("outbound|b.default").endpoints.values():
        ep.pool._idle.append(IdleConnection("again"))
    rotated = ca.workload("a")
    identity.set_pending_key(rotated.key_pem)
    identity.apply_secrets({"default": SecretConfig("default", certificate_chain=rotated.chain_pem)})
    assert closed == ["10.0.0.1:80"]  # a rotation leaves pooled connections alone


def test_every_destination_of_an_original_dst_cluster_with_tls_gets_an_mtls_pool():
    secure = Cluster(ClusterConfig("passthrough-mtls|b.default", discovery="ORIGINAL_DST", tls=TLS), identity=TlsIdentity())
    ep = secure.original_dst_host("10.0.0.1", 8080)
    assert ep.pool.tls.config is TLS and secure.admin_view()["endpoints"][0]["tls_mode"] == "mutual"
    assert secure.upstream_tls().config is TLS  # a tcp_proxy's own pool to the original destination
    plain = Cluster(ClusterConfig("passthrough|b.default", discovery="ORIGINAL_DST"), identity=TlsIdentity())
    assert plain.original_dst_host("10.0.0.1", 8080).pool.tls is None and plain.upstream_tls() is None
    no_identity = Cluster(ClusterConfig("passthrough-mtls|b.default", discovery="ORIGINAL_DST", tls=TLS))
    assert no_identity.original_dst_host("10.0.0.1", 8080).pool.tls is None and no_identity.upstream_tls() is None
    assert cluster().upstream_tls() is None  # an EDS cluster's TLS is per endpoint (its metadata)
    # a CDS update that drops the TLS: new plaintext pools
    before = ep.pool
    secure.set_config(ClusterConfig("passthrough-mtls|b.default", discovery="ORIGINAL_DST"))
    assert before.closed and secure.endpoints["10.0.0.1:8080"].pool.tls is None and secure.upstream_tls() is None
