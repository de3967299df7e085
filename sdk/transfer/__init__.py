"""Page transfer between processes (prefill worker → decode worker)."""

from __future__ import annotations

from kvfuse._transport import PoolDescriptor, Transport
from kvfuse.transfer._mooncake import MooncakeTransport
from kvfuse.transfer._tcp import TcpTransport

__all__ = ["MooncakeTransport", "PoolDescriptor", "TcpTransport", "Transport"]
