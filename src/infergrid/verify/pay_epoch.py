"""Paying verifiers, one epoch at a time: the chain and gateway side of verify.pay.

Run by the holder of the escrow's verifier pool (on a devnet the deployer, also the treasury):

1. the window is [since, until) in unix seconds, on two clocks: block timestamps for what
   the chain says (fees, votes), the gateway's clock for its records (audits). They differ:
   an embedded devnet mines every transaction a second after the last and travels in time
   for voting periods, so its blocks run ahead of the wall clock. Each clock has its own
   cursor: a window starts where the last paid epoch's ended on that clock (0 the first
   time) and ends by default one second past the chain's latest block (every later block
   has a later timestamp) and at the gateway's now, so nothing can still land inside a
   window already paid. An explicit --since/--until sets both;
2. the work: each verifier's audits are the verdicts the gateway recorded for requests it
   received in the window (`GET /v1/verifiers`, `fetch_verifier_audits`); its votes are read
   from the DisputeManager's `Voted` events on the disputes whose `DisputeResolved` block falls
   in the window (`resolved_votes`);
3. the pool: the `verifier_fee` of every escrow `Collected` event in the window — what the
   escrow credited the verifier pool then (read from events, not `fees_owed`, because on a
   devnet the pool and the treasury are one address);
4. the shares (verify.pay.verifier_shares) become a reward tree (settle.rewards.reward_tree);
   the holder claims what the escrow owes it (`claim_fees`), funds the RewardDistributor with
   the epoch's total and proposes the tree's root for `next_epoch()`, posting the bond;
5. after the challenge window anyone finalizes (`finalize_due`), and each verifier claims its
   amount with its proof (`claim_rewards`).

The epochs paid are kept in a small JSON **state file** (verify.pay_state; one section per
deployment: chain id, genesis hash, RewardDistributor address), each with its windows, pool,
work and allocations: the next run starts where the last one's windows ended, so no window is
paid twice, and the allocations are what verifiers build their proofs from (publish the file
to them). A record is written as "pending" before any money moves, so a run interrupted
between funding and proposing is completed by the next run rather than paid again. A window
in which nobody scored, or no fee was credited, is not closed: its audits and fees carry into
the next run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import to_checksum_address

from infergrid.gateway_client import get_gateway_json
from infergrid.settle.chain import Chain, PrivateKey, as_account
from infergrid.settle.disputes import STATUS_NAMES, DisputeManager
from infergrid.settle.escrow import PaymentEscrow
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import RewardDistributor, reward_tree
from infergrid.verify.pay import VOTE_WEIGHT, VerifierWork, verifier_shares
from infergrid.verify.pay_state import EpochRecord, PayState

__all__ = [
    "ClaimResult",
    "EpochRecord",
    "PayContracts",
    "PayResult",
    "PayState",
    "claim_rewards",
    "fetch_verifier_audits",
    "finalize_due",
    "pay_epoch",
    "pool_credited",
    "propose_record",
    "resolved_votes",
]

# The treasury's record of verifier pay, by default in the state directory.
PAY_STATE_FILE = "verifier-pay.json"


@dataclass(frozen=True)
class PayContracts:
    """The three contracts verifier pay touches, found from the registry (its slasher is the
    DisputeManager) plus the escrow and the RewardDistributor."""

    chain: Chain
    escrow: PaymentEscrow
    disputes: DisputeManager
    rewards: RewardDistributor

    @classmethod
    def connect(cls, chain: Chain, *, registry: str, escrow: str, rewards: str) -> PayContracts:
        slasher = Registry(chain, registry).slasher()
        return cls(
            chain,
            PaymentEscrow(chain, escrow),
            DisputeManager(chain, slasher),
            RewardDistributor(chain, rewards),
        )

    def deployment(self) -> str:
        """The state file's section key: which chain and which distributor."""
        return f"{self.chain.chain_id}:{self.chain.genesis_hash()}:{self.rewards.address}"


# --- reading the window -----------------------------------------------------------------------


class _BlockTimes:
    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self._times: dict[int, int] = {}

    def __call__(self, block_number: int) -> int:
        if block_number not in self._times:
            block = self.chain.w3.eth.get_block(block_number)
            self._times[block_number] = int(block["timestamp"])
        return self._times[block_number]


def _logs_in_window(
    chain: Chain, event: Any, since: int, until: int, times: _BlockTimes
) -> list[Any]:
    head = chain.block_number()
    found = event.get_logs(from_block=0, to_block=head)
    return sorted(
        (entry for entry in found if since <= times(int(entry["blockNumber"])) < until),
        key=lambda entry: (int(entry["blockNumber"]), int(entry["logIndex"])),
    )


@dataclass
class VoteTally:
    """One verifier's votes on the disputes resolved in a window, by side."""

    agreeing: int = 0
    against_upheld: int = 0
    for_rejected: int = 0


def resolved_votes(disputes: DisputeManager, since: int, until: int) -> dict[str, VoteTally]:
    """Per voter: its votes on disputes whose resolution was mined in [since, until), on the
    winning side (uphold on upheld, reject on rejected) or the losing one. Disputes that
    ended without quorum are left out: no outcome to agree with."""
    times = _BlockTimes(disputes.chain)
    events = disputes.contract.events
    outcome: dict[int, str] = {}
    for entry in _logs_in_window(disputes.chain, events.DisputeResolved, since, until, times):
        outcome[int(entry["args"]["dispute_id"])] = STATUS_NAMES.get(
            int(entry["args"]["status"]), "open"
        )
    tallies: dict[str, VoteTally] = {}
    if not outcome:
        return tallies
    for entry in events.Voted.get_logs(from_block=0, to_block=disputes.chain.block_number()):
        status = outcome.get(int(entry["args"]["dispute_id"]))
        if status not in ("upheld", "rejected"):
            continue
        tally = tallies.setdefault(to_checksum_address(entry["args"]["voter"]), VoteTally())
        uphold = bool(entry["args"]["uphold"])
        if uphold == (status == "upheld"):
            tally.agreeing += 1
        elif status == "upheld":
            tally.against_upheld += 1
        else:
            tally.for_rejected += 1
    return tallies


def pool_credited(escrow: PaymentEscrow, since: int, until: int) -> int:
    """What the escrow credited its verifier pool in [since, until): the `verifier_fee` of
    every Collected event mined then."""
    times = _BlockTimes(escrow.chain)
    found = _logs_in_window(escrow.chain, escrow.contract.events.Collected, since, until, times)
    return sum(int(entry["args"]["verifier_fee"]) for entry in found)


def fetch_verifier_audits(
    gateway_url: str,
    api_key: str,
    *,
    since: int | None = None,
    until: int | None = None,
    timeout_s: float = 10.0,
) -> dict[str, int]:
    """Per verifier, the verdicts `GET /v1/verifiers` says the gateway recorded in
    [since, until) (passed and failed alike). `gateway_url`: its root or its base URL ending
    in /v1. RuntimeError with the gateway's message; ConnectionError when unreachable."""
    base_url = gateway_url.rstrip("/").removesuffix("/v1") + "/v1"
    query = {k: str(v) for k, v in (("since", since), ("until", until)) if v is not None}
    body = get_gateway_json(base_url, "/verifiers", api_key, query=query, timeout_s=timeout_s)
    try:
        return {
            to_checksum_address(entry["address"]): int(entry["audits"]["total"])
            for entry in body["data"]
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise RuntimeError(f"the gateway's /v1/verifiers answer is malformed: {exc}") from None


def gather_work(audits: Mapping[str, int], votes: Mapping[str, VoteTally]) -> list[VerifierWork]:
    """One VerifierWork per address that audited or voted, ordered by address."""
    merged: dict[str, VerifierWork] = {}
    for address in {to_checksum_address(a) for a in (*audits, *votes)}:
        tally = votes.get(address, VoteTally())
        merged[address] = VerifierWork(
            address,
            audits=sum(n for a, n in audits.items() if to_checksum_address(a) == address),
            votes_agreeing=tally.agreeing,
            votes_against_upheld=tally.against_upheld,
            votes_for_rejected=tally.for_rejected,
        )
    return [merged[a] for a in sorted(merged)]


# --- paying -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PayResult:
    """What one `pay_epoch` run found and did. `epoch` is None when nothing was proposed
    (a dry run, or nothing to pay); `note` says why in one line."""

    since: int  # the chain window
    until: int
    audits_since: int  # the gateway window
    audits_until: int
    pool_wei: int
    work: list[VerifierWork]
    shares: dict[str, int]
    epoch: int | None
    note: str
    tx: str | None = None
    claimed_fees_wei: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "audits_since": self.audits_since,
            "audits_until": self.audits_until,
            "pool_wei": str(self.pool_wei),
            "work": [w.to_json() for w in self.work],
            "shares": {a: str(w) for a, w in self.shares.items()},
            "epoch": self.epoch,
            "note": self.note,
            "tx": self.tx,
            "claimed_fees_wei": str(self.claimed_fees_wei),
        }


def _tx_hash(receipt: Any) -> str:
    return receipt["transactionHash"].to_0x_hex()


def _funded_since(net: PayContracts, funder: str, amount: int, block: int) -> bool:
    """Whether `funder` funded the distributor with exactly `amount` from `block` on."""
    head = net.chain.block_number()
    for entry in net.rewards.contract.events.Funded.get_logs(from_block=block, to_block=head):
        args = entry["args"]
        if to_checksum_address(args["funder"]) == funder and int(args["amount"]) == amount:
            return True
    return False


def propose_record(
    net: PayContracts,
    key: PrivateKey,
    state: PayState,
    record: EpochRecord,
    *,
    resumed: bool,
    claim_fees: bool = True,
) -> tuple[str, int]:
    """Claim the key's escrow fees (with `claim_fees`: the verifier pool's, for verifier pay),
    fund the distributor with the record's total and propose `record` (already saved as
    pending); returns the proposal's tx and the fees claimed. Resuming an interrupted run: a
    root the chain already holds for the record's epoch is only marked proposed, and funding
    the run already sent (its Funded event) is not sent again."""
    rewards = net.rewards
    tree = reward_tree(record.allocations)
    on_chain = rewards.epoch(record.epoch)
    if on_chain.status != "none" and on_chain.root == tree.root:
        record.status = "proposed"
        state.save()
        return record.tx or "", 0
    if on_chain.status != "none":
        # Someone else proposed this epoch number meanwhile: take the next free one.
        record.epoch = rewards.next_epoch()
        state.save()
    claimed = 0
    holder = as_account(key).address
    owed = net.escrow.fees_owed(holder) if claim_fees else 0
    if owed > 0:
        net.escrow.claim_fees(key)
        claimed = owed
    if not (resumed and _funded_since(net, holder, tree.total, record.block)):
        rewards.fund(key, tree.total)
    receipt = rewards.propose_tree(key, record.epoch, tree)
    record.status = "proposed"
    record.tx = _tx_hash(receipt)
    state.save()
    return record.tx, claimed


def pay_epoch(
    net: PayContracts,
    key: PrivateKey,
    state_path: Path,
    audits: Callable[[int, int], Mapping[str, int]],
    *,
    since: int | None = None,
    until: int | None = None,
    dry_run: bool = False,
    vote_weight: int = VOTE_WEIGHT,
    now: float | None = None,
) -> PayResult:
    """Pay the verifiers for the next window (module docstring), or [since, until) on both
    clocks where given. `audits(since, until)` gives the verdicts per verifier in a gateway
    window (fetch_verifier_audits). `key` must be the escrow's verifier pool; `now` is the
    gateway's clock (default time.time()). A dry run reads and computes, and changes nothing
    (no state, no transaction). ValueError for a window that would pay time already paid,
    reach past the chain's latest block or past now, or a key that is not the pool's."""
    holder = as_account(key).address
    pool_address = net.escrow.verifier_pool()
    if holder != pool_address:
        raise ValueError(
            f"{holder} is not the escrow's verifier pool ({pool_address}): only its holder pays"
        )
    state = PayState.load(state_path, net.deployment())
    pending = [e for e in state.epochs if e.status == "pending"]
    if pending and not dry_run:
        record = pending[-1]
        tx, claimed = propose_record(net, key, state, record, resumed=True)
        work = [VerifierWork(**{k: v for k, v in w.items() if k != "score"}) for w in record.work]
        return PayResult(
            record.since, record.until, record.audits_since, record.audits_until,
            record.pool_wei, work, record.allocations, record.epoch,
            "completed the interrupted run for this window", tx, claimed,
        )  # fmt: skip
    chain_paid, audits_paid = state.last_until()
    if since is not None and since < max(chain_paid, audits_paid):
        raise ValueError(
            f"--since {since} would pay again: epoch {state.epochs[-1].epoch} already paid up to"
            f" {max(chain_paid, audits_paid)}"
        )
    # Every later block is mined at a later second than the latest (the chain's rule), so a
    # window may end one second after it and no event can still land inside.
    latest = net.chain.timestamp() + 1
    wall = int(time.time() if now is None else now)
    if until is not None and until > latest:
        raise ValueError(
            f"--until {until} is after the chain's latest block ({latest - 1}): events could"
            " still land before it"
        )
    if until is not None and until > wall:
        raise ValueError(f"--until {until} is in the future: the gateway could still record audits")
    start = chain_paid if since is None else since
    a_start = audits_paid if since is None else since
    if until is not None and until <= start:
        raise ValueError(f"empty window: --until {until} is not after --since {start}")
    end = latest if until is None else until
    # A gateway clock set back gives an empty window, not a negative one.
    a_end = max(a_start, wall if until is None else until)
    work = gather_work(audits(a_start, a_end), resolved_votes(net.disputes, start, end))
    pool = pool_credited(net.escrow, start, end)
    shares = verifier_shares(work, pool, vote_weight=vote_weight)

    def result(shares: dict[str, int], epoch: int | None, note: str, *extra: Any) -> PayResult:
        return PayResult(start, end, a_start, a_end, pool, work, shares, epoch, note, *extra)

    if not shares:
        why = "no fee was credited to the verifier pool" if pool == 0 else "no verifier scored"
        return result({}, None, f"nothing to pay: {why}; the window stays open")
    if dry_run:
        return result(shares, None, "dry run: nothing sent")
    tree = reward_tree(shares)
    record = EpochRecord(
        epoch=net.rewards.next_epoch(),
        since=start,
        until=end,
        pool_wei=pool,
        allocations=dict(tree.allocations),
        work=[w.to_json(vote_weight) for w in work],
        audits_since=a_start,
        audits_until=a_end,
        root="0x" + tree.root.hex(),
        block=net.chain.block_number(),
    )
    state.epochs.append(record)
    state.save()  # pending: a crash from here on is completed by the next run
    tx, claimed = propose_record(net, key, state, record, resumed=False)
    return result(shares, record.epoch, "proposed", tx, claimed)


def finalize_due(net: PayContracts, key: PrivateKey, state_path: Path) -> list[int]:
    """Finalize every proposed epoch of the state file whose challenge window has passed (any
    key may); returns the epochs finalized now."""
    state = PayState.load(state_path, net.deployment())
    now = net.chain.timestamp()
    window = net.rewards.challenge_window()
    done: list[int] = []
    for record in state.epochs:
        if record.status != "proposed":
            continue
        info = net.rewards.epoch(record.epoch)
        if info.status == "proposed" and info.proposed_at + window <= now:
            net.rewards.finalize(key, record.epoch)
            info = net.rewards.epoch(record.epoch)
            done.append(record.epoch)
        if info.status == "finalized":
            record.status = "finalized"
    state.save()
    return done


@dataclass(frozen=True)
class ClaimResult:
    epoch: int
    account: str
    amount_wei: int
    status: str  # "claimed" | "already claimed" | "not final yet"
    tx: str | None = None
    final_at: int | None = None  # not final yet: the block time its window ends (None: challenged)

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "account": self.account,
            "amount_wei": str(self.amount_wei),
            "status": self.status,
            "tx": self.tx,
            "final_at": self.final_at,
        }


def claim_rewards(
    net: PayContracts, key: PrivateKey, state_path: Path, account: str | None = None
) -> list[ClaimResult]:
    """Claim `account`'s (default: the key's) share of every epoch in the state file that
    names it: due epochs are finalized first; one already claimed is reported, not claimed
    twice; one still in its challenge window is reported as not final yet."""
    holder = to_checksum_address(account) if account else as_account(key).address
    finalize_due(net, key, state_path)
    state = PayState.load(state_path, net.deployment())
    results: list[ClaimResult] = []
    for record in state.epochs:
        if holder not in record.allocations or record.status == "pending":
            continue
        amount = record.allocations[holder]
        if record.status != "finalized":
            info = net.rewards.epoch(record.epoch)
            final_at = (
                info.proposed_at + net.rewards.challenge_window()
                if info.status == "proposed"
                else None
            )
            results.append(
                ClaimResult(record.epoch, holder, amount, "not final yet", final_at=final_at)
            )
        elif net.rewards.is_claimed(record.epoch, holder):
            results.append(ClaimResult(record.epoch, holder, amount, "already claimed"))
        else:
            tree = reward_tree(record.allocations)
            receipt = net.rewards.claim_from_tree(key, record.epoch, tree, holder)
            results.append(ClaimResult(record.epoch, holder, amount, "claimed", _tx_hash(receipt)))
    return results
