# pragma version ~=0.4.3
"""
@title timelock
@notice Delayed changes: a change is announced (its parameters hashed into `change`) and can
        take effect only once `delay` seconds have passed, so everyone it affects sees it
        coming and can leave first. One change per kind is pending at a time; announcing
        another replaces it and restarts the clock.
@dev A contract `initializes:` this module with its delay and keys each kind of change by a
     constant bytes32 (e.g. keccak256("fees")). The contract keeps the announced values itself
     (for its views and events) and passes their hash here.
"""

event ChangeScheduled:
    kind: indexed(bytes32)
    change: bytes32
    ready_at: uint256

event ChangeCancelled:
    kind: indexed(bytes32)
    change: bytes32

event ChangeApplied:
    kind: indexed(bytes32)
    change: bytes32


struct Pending:
    change: bytes32  # hash of the announced parameters; empty when nothing is pending
    ready_at: uint256  # block timestamp from which it may be applied


# Longest delay allowed: bounds now + delay against overflow.
MAX_DELAY: constant(uint256) = 365 * 86400

delay: public(immutable(uint256))
pending: public(HashMap[bytes32, Pending])


@deploy
def __init__(_delay: uint256):
    assert _delay > 0, "timelock: zero delay"
    assert _delay <= MAX_DELAY, "timelock: delay too long"
    delay = _delay


@internal
def _schedule(kind: bytes32, change: bytes32) -> uint256:
    """@notice Announce `change` for `kind`; returns when it may be applied."""
    assert change != empty(bytes32), "timelock: empty change"
    ready_at: uint256 = block.timestamp + delay
    self.pending[kind] = Pending(change=change, ready_at=ready_at)
    log ChangeScheduled(kind=kind, change=change, ready_at=ready_at)
    return ready_at


@internal
def _cancel(kind: bytes32):
    change: bytes32 = self.pending[kind].change
    assert change != empty(bytes32), "timelock: nothing pending"
    self.pending[kind] = empty(Pending)
    log ChangeCancelled(kind=kind, change=change)


@internal
def _consume(kind: bytes32, change: bytes32):
    """@notice Apply the pending `change` of `kind`: it must be the one announced and due."""
    pending: Pending = self.pending[kind]
    assert pending.change != empty(bytes32), "timelock: nothing pending"
    assert pending.change == change, "timelock: not the announced change"
    assert block.timestamp >= pending.ready_at, "timelock: not ready"
    self.pending[kind] = empty(Pending)
    log ChangeApplied(kind=kind, change=change)
