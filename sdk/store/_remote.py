"""The remote tier: chunk KV shared between machines through Mooncake Store.

Values are kvfuse's own checksummed chunk format (the disk tier's bytes), moved with
``put_from`` / ``get_into`` from a registered buffer — never a pickle or an opaque tensor
serializer. A checksum or layout mismatch is a miss. If the master or a peer is gone, the
tier reports a miss (or skips a publish) with a warning and a counter, and stays quiet for
``retry_after_s`` before trying again: no request fails because the remote tier failed.

On a GPU machine install the CUDA wheel of the Mooncake transfer engine; the TCP protocol
used here becomes RDMA by configuration (``protocol="rdma"``, ``rdma_devices``).
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from kvfuse._errors import StoreError
from kvfuse.store._disk import decode, encode_parts
from kvfuse.store._keys import Namespace
from kvfuse.store._pool import bytes_of

OBJECT_NOT_FOUND = -704  # Mooncake Store's code for an absent key (a miss, not a failure)


@dataclass(frozen=True)
class RemoteConfig:
    """Where the Mooncake master and metadata server are, and how to reach peers."""

    master: str  # "host:port" of mooncake_master's RPC server
    metadata: str = "P2PHANDSHAKE"  # or a metadata server URL, e.g. "http://host:8080/metadata"
    protocol: str = "tcp"  # or "rdma"
    rdma_devices: str = ""
    local_hostname: str = "127.0.0.1"
    global_segment_bytes: int = 64 << 20  # memory this process contributes to the shared pool
    local_buffer_bytes: int = 64 << 20  # registered staging buffer for put_from / get_into
    retry_after_s: float = 5.0
    connect_timeout_s: float = 5.0  # setup against a master that is down or unreachable fails after this


class RemoteTier:
    def __init__(self, config: RemoteConfig, namespace: Namespace) -> None:
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as exc:
            raise StoreError("the remote tier needs Mooncake: pip install 'kvfuse[remote]'") from exc
        self.config = config
        self.namespace = namespace
        self.mac_key: bytes | None = None  # set by the TieredStore that uses this tier
        self.failures = 0
        self.corrupt = 0
        self._down_until = 0.0
        _check_reachable(config.master, config.connect_timeout_s)
        self.client = _setup_bounded(MooncakeDistributedStore(), config)
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._reserve(1 << 20)

    def _reserve(self, nbytes: int) -> None:
        """A registered staging buffer of at least ``nbytes``."""
        if self._buffer.numel() >= nbytes:
            return
        if self._buffer.numel():
            self.client.unregister_buffer(self._buffer.data_ptr())
        self._buffer = torch.empty(max(nbytes, 2 * self._buffer.numel()), dtype=torch.uint8)
        rc = self.client.register_buffer(self._buffer.data_ptr(), self._buffer.numel())
        if rc != 0:
            raise StoreError(f"Mooncake register_buffer failed (code {rc})")

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _fail(self, what: str, detail: object) -> None:
        self.failures += 1
        self._down_until = time.monotonic() + self.config.retry_after_s
        warnings.warn(
            f"kvfuse remote tier: {what} failed ({detail}); serving from the local tiers", RuntimeWarning, stacklevel=3
        )

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chunk, or None: absent, unreachable (warned, counted) or corrupt (counted).
        The tensors are views into this tier's staging buffer: use them (the store copies
        them into its pool) before the next ``get`` or ``put``."""
        if not self.up:
            return None
        try:
            size = self.client.get_size(key)  # one round trip to the master, not an is_exist first
            if size == OBJECT_NOT_FOUND or size == 0:
                return None
            if size < 0:
                self._fail("lookup", f"code {size}")
                return None
            self._reserve(size)
            got = self.client.get_into(key, self._buffer.data_ptr(), size)
        except Exception as exc:
            self._fail("get", exc)
            return None
        if got < 0:
            self._fail("get", f"code {got}")
            return None
        try:
            # views into the staging buffer, verified: valid until this tier's next get or put
            return decode(bytes_of(self._buffer[:got]), key, self.namespace, self.mac_key, copy=False)
        except Exception as exc:  # any malformed value (short, bad header, wrong payload) is a miss
            self.corrupt += 1
            warnings.warn(
                f"kvfuse remote tier: value of {key} rejected ({exc}); treated as a miss", RuntimeWarning, stacklevel=2
            )
            return None

    def put(self, key: str, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Publish a chunk; False (warned, counted) if the remote tier is unreachable."""
        if not self.up:
            return False
        parts = encode_parts(key, self.namespace, k, v, self.mac_key)
        size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        try:
            if self.client.is_exist(key) == 1:
                return True  # same key, same bytes: already published
            self._reserve(size)
            view, at = bytes_of(self._buffer), 0
            for part in parts:  # the encoded value straight into the registered buffer
                n = len(part) if isinstance(part, bytes) else part.nbytes
                view[at : at + n] = part
                at += n
            rc = self.client.put_from(key, self._buffer.data_ptr(), size)
        except Exception as exc:
            self._fail("put", exc)
            return False
        if rc != 0:
            self._fail("put", f"code {rc}")
            return False
        return True

    def close(self) -> None:
        self.client.close()


def _check_reachable(master: str, timeout: float) -> None:
    """Fail fast when nothing listens at the master's address (Mooncake's own setup retries
    for about 90 s before it gives up)."""
    import socket

    host, _, port = master.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise StoreError(f"Mooncake master {master} is not reachable: {exc}") from exc


def _setup_bounded(client: Any, config: RemoteConfig) -> Any:
    """``client.setup(...)`` with a deadline of ``config.connect_timeout_s``. Mooncake's call
    cannot be interrupted, so it runs in a daemon thread; if the deadline passes, the thread
    is abandoned (it closes the client should its setup still succeed) and this raises."""
    done = threading.Event()
    state: dict[str, Any] = {"abandoned": False}

    def run() -> None:
        try:
            state["rc"] = client.setup(
                config.local_hostname,
                config.metadata,
                config.global_segment_bytes,
                config.local_buffer_bytes,
                config.protocol,
                config.rdma_devices,
                config.master,
            )
        except Exception as exc:  # surfaced below as a StoreError
            state["error"] = exc
        done.set()
        if state["abandoned"] and state.get("rc") == 0:
            client.close()

    threading.Thread(target=run, name="kvfuse-mooncake-setup", daemon=True).start()
    if not done.wait(config.connect_timeout_s):
        state["abandoned"] = True
        raise StoreError(f"Mooncake setup for master {config.master} did not finish in {config.connect_timeout_s} s")
    if "error" in state:
        error = state["error"]
        raise StoreError(f"Mooncake store setup failed for master {config.master}: {error}") from error
    if state["rc"] != 0:
        raise StoreError(f"Mooncake store setup failed (code {state['rc']}) for master {config.master}")
    return client


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalMaster:
    """A ``mooncake_master`` on 127.0.0.1 only (RPC, HTTP metadata and metrics servers), for
    tests, demos and single-machine use. ``with LocalMaster() as m: RemoteTier(m.config, ns)``."""

    def __init__(self) -> None:
        self.proc: object = None
        self.rpc, self.metrics = _free_port(), _free_port()
        self.config = RemoteConfig(master=f"127.0.0.1:{self.rpc}", metadata="P2PHANDSHAKE")

    def start(self, timeout: float = 30.0) -> LocalMaster:
        import shutil
        import socket
        import subprocess
        import sys
        from pathlib import Path

        binary = shutil.which("mooncake_master") or str(Path(sys.executable).parent / "mooncake_master")
        # no HTTP metadata server (this master binds it on every interface whatever the
        # host flag says): clients exchange metadata peer to peer (P2PHANDSHAKE)
        args = [
            binary,
            "-rpc_address=127.0.0.1",
            f"-rpc_port={self.rpc}",
            "-enable_http_metadata_server=false",
            "-metrics_host=127.0.0.1",
            f"-metrics_port={self.metrics}",
            "-enable_metric_reporting=false",
        ]
        try:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as exc:
            raise StoreError(f"cannot start mooncake_master ({binary}): {exc}") from exc
        deadline = time.monotonic() + timeout
        for port in (self.rpc,):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise StoreError(f"mooncake_master did not open 127.0.0.1:{port}") from None
                    time.sleep(0.05)
        return self

    def stop(self) -> None:
        import subprocess

        if isinstance(self.proc, subprocess.Popen):
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalMaster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
