"""The ScoreBoard contract from Python: verifiers commit to their miner scores of an epoch, then
reveal them, and anyone reads the revealed vectors back with the stake each one weighs.

Epochs are the contract's, numbered from 1 by time since its deployment: epoch e covers
[genesis + (e - 1) * epoch_length, genesis + e * epoch_length). After it ends, active verifiers
commit during `commit_window` seconds, then reveal during `reveal_window` seconds; a reveal
that does not match its commitment is refused by the contract (and here first, before gas is
spent). The consensus over the revealed vectors is the network's rule in
infergrid.protocol.consensus; this module only moves them on and off the chain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from eth_utils import to_checksum_address
from web3.contract import Contract
from web3.types import TxReceipt

from infergrid.protocol.consensus import Consensus, ScoreReport, consensus, new_salt
from infergrid.protocol.consensus import commitment as score_commitment
from infergrid.settle.build import load_artifact
from infergrid.settle.chain import Chain, ContractEvent, PrivateKey, as_account, decode_events
from infergrid.settle.registry import check_address

CONTRACT_NAME = "ScoreBoard"
# Mirror MAX_SCORED and MAX_SPAN in the contract.
MAX_SCORED = 256
MAX_SPAN_S = 365 * 86400

__all__ = [
    "MAX_SCORED",
    "RevealedScores",
    "ScoreBoard",
    "ScoreSchedule",
    "deploy_scoreboard",
    "epoch_consensus",
    "new_salt",  # re-exported: protocol.consensus's
]


@dataclass(frozen=True)
class ScoreSchedule:
    """When each epoch's commits and reveals are taken (immutable in the contract)."""

    genesis: int
    epoch_length_s: int
    commit_window_s: int
    reveal_window_s: int

    def epoch_end(self, epoch: int) -> int:
        """The first second after `epoch`: its commit window opens then."""
        return self.genesis + _epoch(epoch) * self.epoch_length_s

    def reveal_opens(self, epoch: int) -> int:
        return self.epoch_end(epoch) + self.commit_window_s

    def reveal_closes(self, epoch: int) -> int:
        return self.reveal_opens(epoch) + self.reveal_window_s

    def epoch_at(self, timestamp: int) -> int:
        """The epoch running at block time `timestamp` (at or after genesis)."""
        if timestamp < self.genesis:
            raise ValueError(f"time {timestamp} is before the score board's genesis")
        return (timestamp - self.genesis) // self.epoch_length_s + 1


@dataclass(frozen=True)
class RevealedScores:
    """One verifier's revealed vector as logged: miner -> share in ppm, the salt, and its bonded
    stake at the end of the epoch (what its report weighs in the consensus)."""

    epoch: int
    verifier: str
    stake_wei: int
    scores: dict[str, int]
    salt: bytes
    block_number: int

    def report(self) -> ScoreReport:
        """As protocol.consensus takes it."""
        return ScoreReport(self.epoch, self.verifier, self.scores, self.salt)


def deploy_scoreboard(
    chain: Chain,
    deployer_key: PrivateKey,
    *,
    registry: str,
    epoch_length_s: int,
    commit_window_s: int,
    reveal_window_s: int,
) -> str:
    """Deploy a ScoreBoard reading verifiers from `registry`; returns its address."""
    registry = check_address(registry, "registry")
    if int(registry, 16) == 0:
        raise ValueError("registry must not be the zero address")
    for name, value in (
        ("epoch length", epoch_length_s),
        ("commit window", commit_window_s),
        ("reveal window", reveal_window_s),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SPAN_S:
            raise ValueError(f"{name} must be an int of seconds in 1..{MAX_SPAN_S}, not {value!r}")
    artifact = load_artifact(CONTRACT_NAME)
    return chain.deploy(
        deployer_key,
        artifact.abi,
        artifact.bytecode,
        registry,
        epoch_length_s,
        commit_window_s,
        reveal_window_s,
    )


class ScoreBoard:
    """A deployed ScoreBoard. Writes return the receipt; reverts raise `ContractRevert` with
    the contract's reason ("scores: ...")."""

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain = chain
        self.address = check_address(address, "score board address")
        self.contract: Contract = chain.contract(self.address, load_artifact(CONTRACT_NAME).abi)
        self._schedule: ScoreSchedule | None = None

    def schedule(self) -> ScoreSchedule:
        if self._schedule is None:
            fns = self.contract.functions
            self._schedule = ScoreSchedule(
                genesis=int(self.chain.call(fns.genesis())),
                epoch_length_s=int(self.chain.call(fns.epoch_length())),
                commit_window_s=int(self.chain.call(fns.commit_window())),
                reveal_window_s=int(self.chain.call(fns.reveal_window())),
            )
        return self._schedule

    def current_epoch(self) -> int:
        return int(self.chain.call(self.contract.functions.current_epoch()))

    def commitment_of(self, epoch: int, verifier: str) -> bytes | None:
        address = check_address(verifier, "verifier")
        value = bytes(self.chain.call(self.contract.functions.commitments(_epoch(epoch), address)))
        return None if value == bytes(32) else value

    def has_revealed(self, epoch: int, verifier: str) -> bool:
        address = check_address(verifier, "verifier")
        return bool(self.chain.call(self.contract.functions.revealed(_epoch(epoch), address)))

    def events(self, receipt: TxReceipt) -> list[ContractEvent]:
        return decode_events(self.contract, receipt)

    def commit(
        self, key: PrivateKey, epoch: int, scores: Mapping[str, int], salt: bytes
    ) -> TxReceipt:
        """Commit the key's verifier to `scores` (miner -> ppm) for `epoch`."""
        verifier = as_account(key).address
        commitment = score_commitment(epoch, verifier, scores, salt)
        return self.chain.send(key, self.contract, "commit", _epoch(epoch), commitment)

    def reveal(
        self, key: PrivateKey, epoch: int, scores: Mapping[str, int], salt: bytes
    ) -> TxReceipt:
        """Reveal what `commit` committed; refused here, before any gas, when it would not
        match the commitment on-chain."""
        verifier = as_account(key).address
        expected = score_commitment(epoch, verifier, scores, salt)  # validates the scores
        miners, values = _vector(scores)
        if len(miners) > MAX_SCORED:
            raise ValueError(f"a reveal scores at most {MAX_SCORED} miners, not {len(miners)}")
        committed = self.commitment_of(epoch, verifier)
        if committed is None:
            raise ValueError(f"{verifier} committed no scores for epoch {epoch}")
        if committed != expected:
            raise ValueError(
                f"these scores and salt do not match {verifier}'s commitment for epoch {epoch}"
            )
        return self.chain.send(
            key, self.contract, "reveal", _epoch(epoch), miners, values, bytes(salt)
        )

    def reveal_count(self, epoch: int) -> int:
        return int(self.chain.call(self.contract.functions.reveal_count(_epoch(epoch))))

    def reveal_blocks(self, epoch: int) -> tuple[int, int]:
        """The blocks of `epoch`'s first and last reveal; (0, 0) if none."""
        first, last = self.chain.call(self.contract.functions.reveal_blocks(_epoch(epoch)))
        return int(first), int(last)

    def revealed(self, epoch: int) -> list[RevealedScores]:
        """Every vector revealed for `epoch`, in the order they were mined (the contract
        checked each against its commitment)."""
        first, last = self.reveal_blocks(epoch)
        if first == 0:
            return []
        # Only the blocks the contract says hold this epoch's reveals: a node (eth-tester
        # above all) reads every transaction of the range it is asked about.
        event = self.contract.events.ScoresRevealed
        found = event.get_logs(
            argument_filters={"epoch": _epoch(epoch)}, from_block=first, to_block=last
        )
        found = sorted(found, key=lambda e: (int(e["blockNumber"]), int(e["logIndex"])))
        return [
            RevealedScores(
                epoch=int(entry["args"]["epoch"]),
                verifier=to_checksum_address(entry["args"]["verifier"]),
                stake_wei=int(entry["args"]["stake"]),
                scores={
                    to_checksum_address(m): int(s)
                    for m, s in zip(entry["args"]["miners"], entry["args"]["scores"], strict=True)
                },
                salt=bytes(entry["args"]["salt"]),
                block_number=int(entry["blockNumber"]),
            )
            for entry in found
        ]


def _epoch(epoch: int) -> int:
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= 2**64:
        raise ValueError(f"epoch must be an int in 1..2**64, not {epoch!r}")
    return epoch


def _vector(scores: Mapping[str, int]) -> tuple[list[str], list[int]]:
    """The contract's form of a valid score vector (protocol.consensus.commitment checked it):
    miners ascending by address, their shares in ppm."""
    pairs = sorted(
        ((to_checksum_address(m), s) for m, s in scores.items()), key=lambda p: int(p[0], 16)
    )
    return [m for m, _ in pairs], [s for _, s in pairs]


def epoch_consensus(board: ScoreBoard, epoch: int) -> Consensus:
    """protocol.consensus over the vectors revealed for `epoch`, each weighted by the stake
    the contract logged with it; verifiers whose logged stake is 0 (registered after the epoch)
    are left out. ValueError if no verifier with stake revealed."""
    revealed = [r for r in board.revealed(epoch) if r.stake_wei > 0]
    if not revealed:
        raise ValueError(f"no verifier with stake revealed scores for epoch {epoch}")
    return consensus([r.report() for r in revealed], {r.verifier: r.stake_wei for r in revealed})
