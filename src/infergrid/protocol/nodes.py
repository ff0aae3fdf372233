"""Node roles and the records the on-chain registry holds about each node."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

WEI_PER_BTT = 10**18


class Role(IntEnum):
    """A node's role; the values are the ones stored in the NodeRegistry contract."""

    MINER = 1
    VERIFIER = 2
    GATEWAY = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(r.name.lower() for r in cls)
            raise ValueError(f"unknown role {text!r} (expected one of: {names})") from None


@dataclass(frozen=True)
class ModelOffer:
    """One model a node serves, with its price in wei per token."""

    name: str
    model_id: str  # 0x-prefixed 32-byte hex, see protocol.models.model_id
    price_in_wei: int  # per prompt token
    price_out_wei: int  # per completion token


@dataclass(frozen=True)
class NodeRecord:
    """A node as the registry stores it; the owner address is the node's identity."""

    owner: str
    role: Role
    endpoint: str
    signer: str
    models: tuple[ModelOffer, ...] = field(default_factory=tuple)
    stake_wei: int = 0
    unbonding_wei: int = 0
    unbond_at: int = 0  # unix time after which unbonding stake can be withdrawn
    active: bool = True
    # Under an open dispute: cannot unbond or withdraw, and gateways must not route to it.
    frozen: bool = False

    def serves(self, model_name: str) -> bool:
        return any(offer.name == model_name for offer in self.models)
