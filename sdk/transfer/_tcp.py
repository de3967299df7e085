"""TcpTransport: pages between processes over plain TCP, scatter-gather on both sides.

Mooncake's TCP transport moves each slice through one asio thread per side in 64 KiB
reads and writes, and pays a request per slice: one slice of all the bytes reaches only
45–55 % of raw TCP on the 2-core VM, and scattered 32 KiB pages about 20 %. Here the
receiver takes part (two-sided), so no page layout costs more than another:

- the sender writes a header, the destination ids, then the pages' bytes straight out of
  its pool with ``sendmsg`` (up to ``IOV_MAX`` pages per call, each page one iovec);
- the receiver checks the header, then takes the bytes straight into its pool's pages
  with ``recvmsg_into``, and answers one status byte; the send completes on ``OK``.

Wire format (little-endian). Each connection starts with a handshake that proves both
ends hold the same ``key`` (a keyed blake2b over both sides' nonces; without a key the
same exchange unkeyed, so a keyed and an unkeyed end never talk)::

    receiver: b"KVFH" | 16-byte nonce_r
    sender:   16-byte nonce_s | 32-byte tag("send", nonce_r, nonce_s)
    receiver: 32-byte tag("recv", nonce_r, nonce_s)

then one message per send::

    b"KVFT" | u16 version | u16 0 | u64 pool | u64 page_bytes | u32 n | u32 0 |
    n x u32 destination page ids | K of each page, in id order | V of each page

``pool`` is the id the receiver's descriptor gave (``k_addr``): a name, never an address
the receiver dereferences. Nothing is unpickled. The receiver refuses, before it writes a
byte, a message whose magic, version, pool, page size or ids (in range, unique) are not
its own: it answers ``REFUSED`` and closes the connection. A sender that dies or stalls
mid-message leaves pages that were never acknowledged, so never valid (see
:mod:`kvfuse._transport`); a receiver that dies, refuses or stalls past ``timeout``
seconds is a :class:`TransferError` naming every page of the send, never a hang. A
receiver drops a connection idle for ``timeout`` seconds; the sender then connects anew,
once. ``close()`` shuts down every sender's connection and waits for its thread, so no
page lands in a registered pool after it returns.

Who may connect: without a key, anyone who reaches the listening address may write into a
registered pool, as with Mooncake's TCP transport. With ``key`` (16–64 bytes, the same on
both ends) a receiver takes pages only from senders that hold it, and a sender sends only
to receivers that hold it; a failed handshake is a refusal. The key authenticates the
ends of each connection, not each byte: someone who can inject into the TCP stream
itself, or read it, is out of its reach (use a private network). It listens on ``host``
(default 127.0.0.1).

Pools are contiguous host tensors; a GPU pool is refused (``TransferError``): its pages
would need a staging copy each way, and RDMA (Mooncake with ``protocol="rdma"``) is the
transport for device memory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import hmac
import os
import socket
import struct
import threading

import torch
from kvfuse._errors import TransferError
from kvfuse._hookspecs import hookimpl
from kvfuse._transport import PoolDescriptor, Transport, check_send, check_timeout, page_bytes
from kvfuse.ops import TransferHandle
from kvfuse.store._pool import bytes_of

MAGIC, VERSION, HELLO = b"KVFT", 1, b"KVFH"
NONCE, TAG = 16, 32
HEADER = struct.Struct("<4sHHQQII")
OK, REFUSED = b"\x00", b"\x01"
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)


def _pages(t: torch.Tensor, ids: list[int]) -> list[memoryview]:
    """The bytes of pages ``ids`` of contiguous host ``t``, one view each, no copy."""
    whole = bytes_of(t)
    size = whole.nbytes // t.shape[0]
    return [whole[i * size : (i + 1) * size] for i in ids]


def _advance(views: list[memoryview], i: int, n: int) -> int:
    """Past ``n`` more bytes of ``views`` from view ``i``: the index of the first view not
    done, which is trimmed in place to its unsent part."""
    while i < len(views) and n >= views[i].nbytes:
        n -= views[i].nbytes
        i += 1
    if n:
        views[i] = views[i][n:]
    return i


def _sendv(sock: socket.socket, views: list[memoryview]) -> None:
    """Send every byte of ``views`` (trimmed in place as it goes), ``IOV_MAX`` per call."""
    i = 0
    while i < len(views):
        i = _advance(views, i, sock.sendmsg(views[i : i + IOV_MAX]))


def _recvv(sock: socket.socket, views: list[memoryview]) -> None:
    """Fill every byte of ``views`` (trimmed in place as it goes), in order;
    ConnectionError if the peer closes first."""
    i = 0
    while i < len(views):
        if not views[i].nbytes:
            i += 1
            continue
        got = sock.recvmsg_into(views[i : i + IOV_MAX])[0]
        if got == 0:
            raise ConnectionError("the sender closed the connection mid-message")
        i = _advance(views, i, got)


def _deadline(sock: socket.socket, seconds: float) -> None:
    """Blocking ``sock`` whose every send and receive fails after ``seconds`` (the
    kernel's own timeouts: a Python timeout would poll before every call)."""
    sock.settimeout(None)
    tv = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) != n:
        raise ConnectionError("the peer closed the connection")
    return data


def _tag(key: bytes | None, role: bytes, nonces: bytes) -> bytes:
    return hashlib.blake2b(role + nonces, digest_size=TAG, key=key or b"", person=b"kvfuse-tcp").digest()


class TcpTransport(Transport):
    """See the module docstring. ``host``: where this process listens for pages once it
    registers a pool; ``timeout``: seconds any one socket operation may take; ``key``:
    the secret both ends of a connection must hold (None: no authentication)."""

    name = "tcp"

    def __init__(self, host: str = "127.0.0.1", timeout: float = 60.0, key: bytes | None = None) -> None:
        if key is not None and not (isinstance(key, bytes) and 16 <= len(key) <= 64):
            raise TransferError(f"key: expected 16 to 64 bytes, got {len(key) if isinstance(key, bytes) else key!r}")
        self.host, self.timeout, self.key = host, check_timeout(timeout), key
        self._pools: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._server: socket.socket | None = None
        self._conns: dict[str, socket.socket] = {}  # ours, to receivers
        self._accepted: dict[socket.socket, threading.Thread] = {}  # senders', to us, and who serves each
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # one message at a time on a connection
        self._sender = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfuse-tcp-send")
        self.refused = 0  # messages this receiver refused (bad header, unknown pool or pages)

    # -- receiving --------------------------------------------------------------------------

    def register_pool(self, k_pages: torch.Tensor, v_pages: torch.Tensor) -> PoolDescriptor:
        for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
            if t.device.type != "cpu":
                raise TransferError(f"the tcp transport receives into host memory only; {name} is on {t.device}")
            if not t.is_contiguous() or t.dim() != 4 or t.shape != k_pages.shape or t.dtype != k_pages.dtype:
                raise TransferError(f"{name} must be contiguous [num_pages, page_size, num_kv_heads, head_dim]")
        with self._lock:
            if self._server is None:
                self._server = socket.create_server((self.host, 0))
                threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()
            self._pools[k_pages.data_ptr()] = (k_pages, v_pages)
            port = self._server.getsockname()[1]
        return PoolDescriptor(
            transport=self.name,
            session=f"{self.host}:{port}",
            k_addr=k_pages.data_ptr(),
            v_addr=v_pages.data_ptr(),
            page_bytes=page_bytes(k_pages),
            num_pages=k_pages.shape[0],
        )

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed
                return
            with self._lock:
                if self._server is not server:  # closed meanwhile
                    conn.close()
                    return
                thread = self._accepted[conn] = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                thread.start()  # under the lock: close() joins only started threads

    def _serve(self, conn: socket.socket) -> None:
        """Messages from one sender until it closes, stalls (or idles) past the timeout,
        sends one this receiver refuses, or this transport closes."""
        try:
            self._session(conn)
        finally:
            with self._lock:
                self._accepted.pop(conn, None)
            conn.close()

    def _session(self, conn: socket.socket) -> None:
        _deadline(conn, self.timeout)
        with contextlib.suppress(OSError):
            nonce_r = os.urandom(NONCE)
            conn.sendall(HELLO + nonce_r)
            reply = _recv_exact(conn, NONCE + TAG)
            nonces = nonce_r + reply[:NONCE]
            if not hmac.compare_digest(reply[NONCE:], _tag(self.key, b"send", nonces)):
                with self._lock:
                    self.refused += 1
                return  # not a sender holding our key: not a byte more
            conn.sendall(_tag(self.key, b"recv", nonces))
            while True:
                head = conn.recv(HEADER.size, socket.MSG_WAITALL)
                if len(head) != HEADER.size:
                    return
                views = self._destination(conn, head)
                if views is None:
                    with self._lock:
                        self.refused += 1
                    conn.sendall(REFUSED)
                    return
                _recvv(conn, views)
                conn.sendall(OK)

    def _destination(self, conn: socket.socket, head: bytes) -> list[memoryview] | None:
        """The pool pages a message's payload goes into (K's, then V's), or None if this
        receiver refuses it."""
        magic, version, _, pool_id, size, n, _ = HEADER.unpack(head)
        pool = self._pools.get(pool_id) if magic == MAGIC and version == VERSION else None
        if pool is None:
            return None
        k, v = pool
        if size != page_bytes(k) or n > k.shape[0]:
            return None
        ids = list(struct.unpack(f"<{n}I", _recv_exact(conn, 4 * n)))
        if len(set(ids)) != n or any(i >= k.shape[0] for i in ids):
            return None
        return [*_pages(k, ids), *_pages(v, ids)]

    # -- sending ----------------------------------------------------------------------------

    def send_pages(
        self,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        src_ids: list[int],
        peer: PoolDescriptor,
        dst_ids: list[int],
        *,
        non_blocking: bool = False,
    ) -> TransferHandle:
        for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
            if t.device.type != "cpu" or not t.is_contiguous() or t.shape != k_pages.shape:
                raise TransferError(f"{name} must be a contiguous host pool shaped like k_pages", dst_ids)
        page = check_send(k_pages, src_ids, peer, dst_ids)
        ids = list(dst_ids)
        head = HEADER.pack(MAGIC, VERSION, 0, peer["k_addr"], page, len(ids), 0) + struct.pack(f"<{len(ids)}I", *ids)
        views = [*_pages(k_pages, src_ids), *_pages(v_pages, src_ids)]

        def send() -> None:
            session = peer["session"]
            for retry in (False, True):  # a kept connection the receiver closed while idle: once more, anew
                fresh = True  # until a kept connection is found
                try:
                    with self._send_lock:
                        sock, fresh = self._connection(session)
                        _sendv(sock, [memoryview(head), *views])
                        status = _recv_exact(sock, 1)
                    break
                except OSError as exc:
                    self._drop(session)
                    if fresh or retry:
                        raise TransferError(f"transfer to {session} failed: {exc}", ids) from exc
            if status != OK:
                self._drop(session)
                raise TransferError(f"{session} refused the pages (unknown pool, geometry or ids)", ids)

        if non_blocking:
            return TransferHandle(ids, self._sender.submit(send))
        send()
        return TransferHandle(ids)

    def _connection(self, session: str) -> tuple[socket.socket, bool]:
        """This process's connection to ``session`` (one, kept; sends go one at a time),
        and whether it is new."""
        with self._lock:
            sock = self._conns.get(session)
        if sock is not None:
            return sock, False
        host, _, port = session.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=self.timeout)
        _deadline(sock, self.timeout)
        try:
            self._handshake(sock)
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._conns[session] = sock
        return sock, True

    def _handshake(self, sock: socket.socket) -> None:
        """Prove this sender holds the key and check that the receiver does too, before a
        page is sent; OSError (a refusal) if either fails."""
        hello = _recv_exact(sock, len(HELLO) + NONCE)
        if hello[: len(HELLO)] != HELLO:
            raise ConnectionRefusedError("not a kvfuse tcp receiver")
        nonce_s = os.urandom(NONCE)
        nonces = hello[len(HELLO) :] + nonce_s
        sock.sendall(nonce_s + _tag(self.key, b"send", nonces))
        try:
            answer = _recv_exact(sock, TAG)
        except ConnectionError:
            raise ConnectionRefusedError("the receiver refused this sender's key (or its lack of one)") from None
        if not hmac.compare_digest(answer, _tag(self.key, b"recv", nonces)):
            raise ConnectionRefusedError("the receiver does not hold this transport's key")

    def _drop(self, session: str) -> None:
        with self._lock:
            sock = self._conns.pop(session, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Stop sending and receiving: no page lands in a registered pool after this returns
        (each sender's connection is shut down, and the pools are forgotten)."""
        self._sender.shutdown(wait=True)
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = list(self._conns.values()), {}
            accepted = list(self._accepted.items())
            self._pools.clear()
        for conn, _ in accepted:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread, which closes it
        for _, thread in accepted:
            thread.join(self.timeout)
        for s in [*conns, *([server] if server else [])]:
            with contextlib.suppress(OSError):
                s.close()


@hookimpl
def kvfuse_transports() -> list[type[Transport]]:
    return [TcpTransport]
