"""Registration of the local app in ZooKeeper, gated by its health.

The sidecar checks the local app (HTTP GET on the health path, or a TCP connect) and keeps an
EPHEMERAL instance znode only while the app is healthy:

* registered after the first passing check (``HEALTHY_THRESHOLD``),
* deleted after ``UNHEALTHY_THRESHOLD`` consecutive failures, re-created on recovery,
* re-created after a ZooKeeper session expiry or if someone deletes it,
* deleted first on shutdown, before the listeners drain.

kazoo callbacks run on kazoo's threads: they only hand events to the loop. Blocking kazoo calls
run in the default executor so that the loop never waits on ZooKeeper.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import NodeExistsError, NoNodeError
from kazoo.protocol.states import EventType

from meshkeeper.registry import InstanceRecord, Paths, ServiceRecord

log = logging.getLogger("meshkeeper.sidecar.registration")

HEALTHY_THRESHOLD = 1
UNHEALTHY_THRESHOLD = 3
CHECK_TIMEOUT = 2.0


async def check_http(host: str, port: int, path: str, timeout: float = CHECK_TIMEOUT) -> bool:
    """One HTTP health check: 2xx/3xx is healthy, as with Kubernetes probes."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: meshkeeper-health\r\n"
                         "Connection: close\r\n\r\n".encode())
            line = await reader.readline()
        parts = line.split(None, 2)
        return len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1][:1] in (b"2", b"3")
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()


async def check_tcp(host: str, port: int, timeout: float = CHECK_TIMEOUT) -> bool:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        return True
    except (OSError, TimeoutError):
        return False


class Registration:
    def __init__(self, *, zk_hosts: str, session_timeout: float, paths: Paths, service: str,
                 record: InstanceRecord, service_record: ServiceRecord,
                 check: Callable[[], asyncio.Future[bool]], interval: float = 1.0,
                 gate: Callable[[], bool] = lambda: True,
                 on_change: Callable[[], None] | None = None) -> None:
        self.paths = paths
        self.service = service
        self.record = record
        self.service_record = service_record
        self.path = paths.instance(service, record.key)
        self.check = check
        self.interval = interval
        self.gate = gate  # registration also waits for this (the sidecar's first config)
        self.on_change = on_change or (lambda: None)
        self.zk = KazooClient(hosts=zk_hosts, timeout=session_timeout,
                              connection_retry={"max_tries": -1, "delay": 0.2, "max_delay": 2.0},
                              command_retry={"max_tries": 3, "delay": 0.1, "max_delay": 1.0})
        self.healthy = False
        self.registered = False
        self.zk_state = "CONNECTING"
        self.draining = False
        self.registrations = 0
        self.failures = 0  # consecutive failed checks
        self.last_check_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deleting = False  # our own delete is in flight: its watch event is expected
        self._verify = False  # re-check our znode (after a reconnect)
        self.conflicts = 0  # times another session held our instance znode
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.zk.add_listener(self._on_zk_state)
        self.zk.start_async()
        self._task = self._loop.create_task(self._run(), name="registration")

    async def deregister_and_stop(self) -> None:
        """Delete the instance znode first (callers stop sending), then close the session."""
        self.draining = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.get_running_loop().run_in_executor(None, self._stop_zk)
        self.registered = False
        self.on_change()

    def _stop_zk(self) -> None:
        try:
            if self.zk.connected:
                self.zk.delete(self.path)
                log.info("deregistered %s", self.path)
        except NoNodeError:
            pass
        except Exception as exc:  # the session closes next, which removes the znode anyway
            log.warning("could not delete %s: %s", self.path, exc)
        self.zk.stop()
        self.zk.close()

    def poke(self) -> None:
        """Re-evaluate now (called when the gate may have opened)."""
        self._wake.set()

    # ------------------------------------------------------------------ kazoo thread -> loop

    def _on_zk_state(self, state: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._zk_state_changed, state)

    def _on_own_node(self, event) -> None:
        if event is not None and event.type == EventType.DELETED and self._loop is not None:
            self._loop.call_soon_threadsafe(self._node_deleted)

    # ------------------------------------------------------------------ loop side

    def _zk_state_changed(self, state: str) -> None:
        self.zk_state = state
        if state == KazooState.LOST:
            # The session expired: ZooKeeper has deleted our ephemeral znode.
            if self.registered and not self.draining:
                log.warning("ZooKeeper session lost; %s will be re-created on reconnect", self.path)
            self.registered = False
        elif state == KazooState.CONNECTED:
            # kazoo drops every watch when the connection is suspended and does not re-arm them:
            # look at our znode again (and re-arm its watch) on every reconnect.
            self._verify = True
        log.info("ZooKeeper %s", state)
        self._wake.set()
        self.on_change()

    def _node_deleted(self) -> None:
        if self.registered and not self.draining and not self._deleting:
            log.warning("instance znode %s was deleted; re-creating it", self.path)
            self.registered = False
            self._wake.set()
            self.on_change()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = 0.0
        while True:
            now = time.monotonic()
            if now >= next_check:
                ok = await self.check()
                self.last_check_at = time.time()
                self._record_check(ok)
                next_check = time.monotonic() + self.interval
            if self._verify and self.zk.connected:
                self._verify = False
                if self.registered:
                    try:
                        stat = await loop.run_in_executor(None, self.zk.exists, self.path, self._on_own_node)
                    except Exception as exc:
                        log.warning("could not check %s after reconnect: %s", self.path, exc)
                        self._verify = True
                    else:
                        if stat is None:
                            log.warning("instance znode %s vanished while disconnected; re-creating it", self.path)
                            self.registered = False
            want = self.healthy and not self.draining and self.gate()
            if self.zk.connected and want != self.registered:
                try:
                    if want:
                        await loop.run_in_executor(None, self._create)
                        self.registered = True
                        self.registrations += 1
                        log.info("registered %s", self.path)
                    else:
                        self._deleting = True
                        try:
                            await loop.run_in_executor(None, self._delete)
                        finally:
                            self._deleting = False
                        self.registered = False
                        log.info("deregistered %s (app unhealthy)", self.path)
                    self.on_change()
                except Exception as exc:
                    log.warning("registration of %s failed, will retry: %s", self.path, exc)
                    next_check = min(next_check, time.monotonic() + self.interval)
            self._wake.clear()
            try:
                async with asyncio.timeout(max(0.0, next_check - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _record_check(self, ok: bool) -> None:
        if ok:
            self.failures = 0
            if not self.healthy:
                log.info("local app is healthy")
                self.healthy = True
                self.on_change()
        else:
            self.failures += 1
            if self.healthy and self.failures >= UNHEALTHY_THRESHOLD:
                log.warning("local app failed %d consecutive health checks", self.failures)
                self.healthy = False
                self.on_change()

    # ------------------------------------------------------------------ blocking kazoo calls (executor)

    def _create(self) -> None:
        svc_path = self.paths.service(self.service)
        try:
            self.zk.create(svc_path, self.service_record.encode(), makepath=True)
        except NodeExistsError:
            pass
        self.zk.ensure_path(self.paths.instances(self.service))
        data = self.record.encode()
        try:
            self.zk.create(self.path, data, ephemeral=True)
        except NodeExistsError:
            _, stat = self.zk.get(self.path)
            if stat.ephemeralOwner == self.zk.client_id[0]:
                self.zk.set(self.path, data)
            elif self.registrations == 0:
                # Left by an earlier run of this same instance (SIGKILL, then a restart before its
                # session expired): the name is ours, so replace it.
                self.zk.delete(self.path)
                self.zk.create(self.path, data, ephemeral=True)
            else:
                # Another live process registers the same address:port (two hosts both advertising
                # 127.0.0.1:15006?). Taking it over would start a delete/re-create storm between us.
                self.conflicts += 1
                raise RuntimeError(f"{self.path} is held by another ZooKeeper session "  # noqa: B904
                                   f"({stat.ephemeralOwner:#x}); check --advertise-host/--inbound-port")
        self.zk.exists(self.path, watch=self._on_own_node)

    def _delete(self) -> None:
        try:
            self.zk.delete(self.path)
        except NoNodeError:
            pass
