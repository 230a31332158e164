"""Redis connections: a write on a closed connection is the ``ConnectionError`` it is; commands packed in C.

redis-py 8.1 turns an ``OSError`` while writing into ``ConnectionError`` (retried by its clients
and an outage for ``redis_guard``), but a write on a transport the peer or the client already
closed raises a foreign error instead: ``RuntimeError: unable to perform operation on
<TCPTransport closed=True>; the handler is closed`` under uvloop, ``TypeError`` or
``AttributeError`` under asyncio (redis/redis-py#4287). The cluster client closes a node's
connections when it fails over, under commands still using them, so a master killed mid-run
surfaced such errors and failed records as ``internal`` dead letters. Every connection of a
worker is one of these classes: the foreign error becomes a ``ConnectionError`` (the cluster
client then re-reads the slot map and retries). The command is packed before this point, so
these errors can only come from the transport.

They also pack each command with ``hiredis.pack_command`` (as redis-py's own synchronous client
does) instead of the asyncio connection's pure-Python packer: the same bytes (a float as
``repr`` gives it), at a fifth of the CPU; about 13 of the 27 us a pipelined command cost a
worker went to the Python packer. Anything hiredis refuses (a ``bool``, a lone surrogate, an
encoder other than strict UTF-8) goes to redis-py's packer, so its errors are unchanged.

Usage::

    pool.connection_class = safe_connection_class(pool.connection_class)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar, cast

import hiredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT

_TRANSPORT_ERRORS = (RuntimeError, TypeError, AttributeError)
C = TypeVar("C", bound=AbstractConnection)


class _SafeWrite(AbstractConnection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        enc = self.encoder
        if enc.encoding == "utf-8" and enc.encoding_errors == "strict":
            try:
                # redis-py splits a command name of several words ("CONFIG GET") into arguments
                head = args[0]
                if isinstance(head, str):
                    args = (*head.encode().split(), *args[1:])
                elif isinstance(head, bytes) and b" " in head:
                    args = (*head.split(), *args[1:])
                return [hiredis.pack_command(cast(Any, args))]
            except Exception:  # noqa: BLE001 - redis-py's packer raises its own error for it
                pass
        return super().pack_command(*args)

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except _TRANSPORT_ERRORS as exc:  # redis-py has disconnected this connection already
            raise RedisConnectionError(
                f"connection closed while writing ({type(exc).__name__})"
            ) from exc


class SafeConnection(_SafeWrite, Connection):
    """``Connection`` with the closed-transport errors translated."""


class SafeSSLConnection(_SafeWrite, SSLConnection):
    """``SSLConnection`` with the closed-transport errors translated."""


class SafeUnixConnection(_SafeWrite, UnixDomainSocketConnection):
    """``UnixDomainSocketConnection`` with the closed-transport errors translated."""


_SAFE: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: SafeConnection,
    SSLConnection: SafeSSLConnection,
    UnixDomainSocketConnection: SafeUnixConnection,
}


def safe_connection_class(cls: type[C]) -> type[C]:
    """The translating twin (a subclass) of one of redis-py's connection classes; any other
    class is returned unchanged."""
    return cast(type[C], _SAFE.get(cls, cls))
