# pragma version ~=0.4.3
# pragma evm-version london
"""
@title InferGrid ScoreBoard
@notice Verifiers' miner scores, one vector per verifier per epoch, committed and then
        revealed, so that no verifier can copy another's scores: while anyone could still
        copy, only commitments are public; once the reveals begin, nobody can commit any more.
        Epoch e (from 1) covers [genesis + (e - 1) * epoch_length, genesis + e * epoch_length).
        After it ends, active verifiers commit for commit_window seconds, then reveal for
        reveal_window seconds. Each reveal is logged with the verifier's bonded stake at the
        end of the epoch (NodeRegistry.stake_at: stake added later weighs nothing), and the
        network's consensus (stake-weighted median, protocol/consensus.py) is computed from
        those logs by whoever proposes the epoch's reward root, which anyone can recompute.
@dev commitment = keccak256(abi_encode(COMMIT_TAG, epoch, verifier, miners, scores, salt)),
     exactly infergrid.protocol.consensus.commitment: miners in strictly ascending order (one
     score each, no duplicates), scores each miner's share of the epoch in ppm, summing to at
     most 1_000_000, salt 32 random bytes. Revert reasons start with "scores: ".
"""

interface NodeRegistry:
    def role_of(owner: address) -> uint8: view
    def is_active(owner: address) -> bool: view
    def stake_at(owner: address, timestamp: uint256) -> uint256: view


# Miners one reveal can score; a network with more splits nothing: it raises this (and the
# reveal's gas, about 1,300 a miner) in a new deployment.
MAX_SCORED: constant(uint256) = 256
PPM: constant(uint256) = 1_000_000
# Domain separation: no other message of the protocol hashes to a commitment.
COMMIT_TAG: constant(bytes32) = keccak256("InferGrid score commitment v1")
ROLE_VERIFIER: constant(uint8) = 2
# Bounds the epoch arithmetic against overflow and absurd schedules.
MAX_SPAN: constant(uint256) = 365 * 86400

registry: public(immutable(address))
genesis: public(immutable(uint256))
epoch_length: public(immutable(uint256))
commit_window: public(immutable(uint256))
reveal_window: public(immutable(uint256))

# epoch -> verifier -> commitment (zero: none)
commitments: public(HashMap[uint256, HashMap[address, bytes32]])
# epoch -> verifier -> revealed
revealed: public(HashMap[uint256, HashMap[address, bool]])
# epoch -> reveals so far
reveal_count: public(HashMap[uint256, uint256])
# epoch -> the first reveal's block << 128 | the last reveal's block (0: none yet), so that a
# reader asks a node for the logs of those blocks only, never of the whole chain.
reveal_span: HashMap[uint256, uint256]


event ScoresCommitted:
    epoch: indexed(uint256)
    verifier: indexed(address)
    commitment: bytes32


event ScoresRevealed:
    epoch: indexed(uint256)
    verifier: indexed(address)
    stake: uint256
    miners: DynArray[address, MAX_SCORED]
    scores: DynArray[uint256, MAX_SCORED]
    salt: bytes32  # so that anyone can check the log against the commitment


@deploy
def __init__(
    _registry: address, _epoch_length: uint256, _commit_window: uint256, _reveal_window: uint256
):
    assert _registry != empty(address), "scores: zero registry"
    assert _epoch_length > 0 and _epoch_length <= MAX_SPAN, "scores: bad epoch length"
    assert _commit_window > 0 and _commit_window <= MAX_SPAN, "scores: bad commit window"
    assert _reveal_window > 0 and _reveal_window <= MAX_SPAN, "scores: bad reveal window"
    registry = _registry
    genesis = block.timestamp
    epoch_length = _epoch_length
    commit_window = _commit_window
    reveal_window = _reveal_window


@internal
@view
def _epoch_end(epoch: uint256) -> uint256:
    assert epoch >= 1 and epoch <= 2**64, "scores: bad epoch"
    return genesis + epoch * epoch_length


@external
@view
def epoch_end(epoch: uint256) -> uint256:
    """@notice The first second after epoch `epoch`; its commits open then."""
    return self._epoch_end(epoch)


@external
@view
def current_epoch() -> uint256:
    """@notice The epoch now running (its scores cannot be committed yet)."""
    return (block.timestamp - genesis) // epoch_length + 1


@external
@view
def reveal_blocks(epoch: uint256) -> (uint256, uint256):
    """@notice The blocks of `epoch`'s first and last reveal (0, 0 if none): its logs' range."""
    span: uint256 = self.reveal_span[epoch]
    return span >> 128, span & (2**128 - 1)


@external
def commit(epoch: uint256, commitment: bytes32):
    """
    @notice Commit to this verifier's scores of `epoch`, during its commit window; a second
            commit in the window replaces the first.
    """
    end: uint256 = self._epoch_end(epoch)
    assert block.timestamp >= end, "scores: epoch not over"
    assert block.timestamp < end + commit_window, "scores: commit window closed"
    assert commitment != empty(bytes32), "scores: empty commitment"
    assert staticcall NodeRegistry(registry).role_of(msg.sender) == ROLE_VERIFIER, (
        "scores: not a verifier"
    )
    assert staticcall NodeRegistry(registry).is_active(msg.sender), "scores: verifier inactive"
    self.commitments[epoch][msg.sender] = commitment
    log ScoresCommitted(epoch=epoch, verifier=msg.sender, commitment=commitment)


@external
def reveal(
    epoch: uint256,
    miners: DynArray[address, MAX_SCORED],
    scores: DynArray[uint256, MAX_SCORED],
    salt: bytes32,
):
    """
    @notice Reveal the scores committed for `epoch`, during its reveal window, once.
    """
    end: uint256 = self._epoch_end(epoch)
    opens: uint256 = end + commit_window
    assert block.timestamp >= opens, "scores: reveal window not open"
    assert block.timestamp < opens + reveal_window, "scores: reveal window closed"
    commitment: bytes32 = self.commitments[epoch][msg.sender]
    assert commitment != empty(bytes32), "scores: nothing committed"
    assert not self.revealed[epoch][msg.sender], "scores: already revealed"
    assert len(miners) == len(scores), "scores: length mismatch"
    previous: uint256 = 0
    total: uint256 = 0
    for i: uint256 in range(MAX_SCORED):
        if i >= len(miners):
            break
        miner: uint256 = convert(miners[i], uint256)
        assert miner > previous, "scores: miners not strictly ascending"
        assert scores[i] <= PPM, "scores: score above 1_000_000"
        total += scores[i]
        previous = miner
    assert total <= PPM, "scores: shares sum above 1_000_000"
    assert keccak256(
        abi_encode(COMMIT_TAG, epoch, msg.sender, miners, scores, salt)
    ) == commitment, "scores: reveal does not match the commitment"
    self.revealed[epoch][msg.sender] = True
    self.reveal_count[epoch] += 1
    span: uint256 = self.reveal_span[epoch]
    first: uint256 = span >> 128
    if first == 0:
        first = block.number
    self.reveal_span[epoch] = (first << 128) | block.number
    stake: uint256 = staticcall NodeRegistry(registry).stake_at(msg.sender, end)
    log ScoresRevealed(
        epoch=epoch, verifier=msg.sender, stake=stake, miners=miners, scores=scores, salt=salt
    )
