"""Capabilities, declared once; RPCs the driver does not support are rejected from here.

``reject_unsupported`` gives a servicer class an async UNIMPLEMENTED handler for every RPC of
its generated base class it does not define, so an unsupported call answers the spec's
UNIMPLEMENTED instead of relying on the generated default.
"""

from __future__ import annotations

from typing import Any, TypeVar

from csi_driver._gen import csi_pb2
from csi_driver.errors import UnimplementedError
from csi_driver.rpc import Ctx, rpc_method

_C = csi_pb2.ControllerServiceCapability.RPC
_N = csi_pb2.NodeServiceCapability.RPC

CONTROLLER_CAPABILITIES = (
    _C.CREATE_DELETE_VOLUME,
    _C.LIST_VOLUMES,
    _C.GET_CAPACITY,
    _C.EXPAND_VOLUME,
    _C.GET_VOLUME,
    _C.VOLUME_CONDITION,
    _C.SINGLE_NODE_MULTI_WRITER,
)

NODE_CAPABILITIES = (
    _N.STAGE_UNSTAGE_VOLUME,
    _N.GET_VOLUME_STATS,
    _N.EXPAND_VOLUME,
    _N.VOLUME_CONDITION,
    _N.SINGLE_NODE_MULTI_WRITER,
)


def controller_capabilities() -> list[csi_pb2.ControllerServiceCapability]:
    return [
        csi_pb2.ControllerServiceCapability(rpc=csi_pb2.ControllerServiceCapability.RPC(type=c))
        for c in CONTROLLER_CAPABILITIES
    ]


def node_capabilities() -> list[csi_pb2.NodeServiceCapability]:
    return [
        csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=c))
        for c in NODE_CAPABILITIES
    ]


T = TypeVar("T")


def _unimplemented(name: str) -> Any:
    async def handler(self: Any, request: Any, context: Ctx) -> Any:
        raise UnimplementedError(f"{name} is not supported by tandem")

    handler.__name__ = name
    return rpc_method(handler)


def reject_unsupported(base: type[Any]) -> Any:
    """Class decorator: RPCs of ``base`` the class does not define answer UNIMPLEMENTED."""

    def decorate(cls: type[T]) -> type[T]:
        for name in vars(base):
            if name[0].isupper() and name not in vars(cls):
                setattr(cls, name, _unimplemented(name))
        return cls

    return decorate
