"""Server reflection, as grpcurl uses it, including ``describe pkg.Service.Method``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection


class _MethodAwarePool:
    """The default descriptor pool, which also finds the file of a method's full name.
    Python's pool finds messages, enums and services but not methods (grpc/grpc#34743),
    so ``grpcurl describe pkg.Service.Method`` answered "Symbol not found"."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            if not service_name:
                raise
            service = self._pool.FindServiceByName(service_name)  # KeyError if not one
            if method not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable(service_names: Sequence[str], server: grpc.Server) -> None:
    """Reflection for these services (and itself) on ``server``."""
    reflection.enable_server_reflection(
        [*service_names, reflection.SERVICE_NAME],
        server,
        pool=_MethodAwarePool(descriptor_pool.Default()),  # type: ignore[arg-type]
    )
