"""The chains InferGrid settles on, and the settlement parameters each kind of network uses.

BTTC (BitTorrent Chain) mainnet and its Donau testnet run Berlin rules with POA blocks: the
client sends legacy transactions with an explicit gas price and reads blocks through web3's
POA extra-data middleware (settle.chain does both, keyed by chain id); contracts are compiled
for london, which emits no PUSH0 or BASEFEE.
"""

from __future__ import annotations

from dataclasses import dataclass

from infergrid.protocol.nodes import WEI_PER_BTT
from infergrid.protocol.scoring import EarlyMinerSchedule
from infergrid.settle.chain import (
    BTTC_DONAU_CHAIN_ID,
    BTTC_MAINNET_CHAIN_ID,
    EMBEDDED_CHAIN_ID,
    POA_CHAIN_IDS,
)
from infergrid.settle.escrow import MAX_FEE_PPM

ANVIL_CHAIN_ID = 31337
DAY_S = 86_400


@dataclass(frozen=True)
class ChainProfile:
    name: str
    chain_id: int
    rpc_url: str | None  # a public endpoint, where one exists
    explorer: str | None
    poa: bool  # blocks carry POA signatures in extra data
    hardfork: str  # the newest EVM rules the chain runs


PROFILES: dict[str, ChainProfile] = {
    profile.name: profile
    for profile in [
        ChainProfile(
            "bttc",
            BTTC_MAINNET_CHAIN_ID,
            "https://rpc.bt.io",
            "https://bttcscan.com",
            True,
            "berlin",
        ),
        ChainProfile(
            "donau",
            BTTC_DONAU_CHAIN_ID,
            "https://pre-rpc.bt.io",
            "https://testnet.bttcscan.com",
            True,
            "berlin",
        ),
        ChainProfile("embedded", EMBEDDED_CHAIN_ID, None, None, False, "london"),
        ChainProfile("anvil", ANVIL_CHAIN_ID, "http://127.0.0.1:8545", None, False, "london"),
    ]
}
assert {p.chain_id for p in PROFILES.values() if p.poa} == POA_CHAIN_IDS


def profile_for(chain_id: int) -> ChainProfile | None:
    return next((p for p in PROFILES.values() if p.chain_id == chain_id), None)


@dataclass(frozen=True)
class SettlementParams:
    """Every deployment-time number of the settlement contracts."""

    min_stake_miner_wei: int
    min_stake_verifier_wei: int
    min_stake_gateway_wei: int
    unbonding_delay_s: int
    thaw_period_s: int  # escrow withdrawals and signer revocations
    fee_delay_s: int  # an escrow fee change waits this long; longer than the thaw period
    protocol_fee_ppm: int
    verifier_pool_ppm: int
    dispute_deposit_wei: int
    voting_period_s: int
    max_slash_ppm: int
    challenger_share_ppm: int
    equivocation_slash_ppm: int
    min_quorum_stake_wei: int
    min_verifier_age_s: int  # a verifier votes only on disputes opened this long after it joined
    wrong_vote_slash_ppm: int  # of its vote weight, from a verifier on the losing side
    no_quorum_forfeit_ppm: int  # of the deposit, to the treasury, when too few verifiers vote
    max_open_disputes_per_miner: int
    max_open_disputes_per_challenger: int
    epoch_s: int
    proposer_bond_wei: int
    challenge_window_s: int
    arbiter_delay_s: int  # a new reward arbiter waits this long; longer than the window
    # The registry's early-miner reward multiplier (protocol.scoring.EarlyMinerSchedule);
    # defaults for a devnet.json written before it existed: nobody is early.
    early_period_s: int = 0
    early_multiplier_ppm: int = 1_000_000
    early_decay_s: int = 0
    # After each epoch, verifiers commit to their miner scores, then reveal them (ScoreBoard).
    score_commit_window_s: int = 3_600
    score_reveal_window_s: int = 3_600
    # What the treasury pays the miners each epoch, split by their scores (verify.miner_pay).
    miner_emission_per_epoch_wei: int = 0

    def check(self) -> None:
        """Stake must stay slashable for everything it was paid for (DESIGN §4)."""
        needed = self.voting_period_s + self.epoch_s + self.challenge_window_s
        if self.unbonding_delay_s <= needed:
            raise ValueError(
                f"unbonding delay {self.unbonding_delay_s} s must exceed the dispute voting"
                f" period + epoch + challenge window ({needed} s)"
            )
        if self.protocol_fee_ppm + self.verifier_pool_ppm > MAX_FEE_PPM:
            raise ValueError(f"protocol fee + verifier pool share exceed {MAX_FEE_PPM} ppm (10 %)")
        if self.fee_delay_s <= self.thaw_period_s:
            raise ValueError(
                f"fee delay {self.fee_delay_s} s must exceed the thaw period"
                f" {self.thaw_period_s} s, so payers can leave before a fee change"
            )
        if self.challenge_window_s <= 0:
            raise ValueError("the reward challenge window must be positive")
        if self.arbiter_delay_s <= self.challenge_window_s:
            raise ValueError(
                f"arbiter delay {self.arbiter_delay_s} s must exceed the challenge window"
                f" {self.challenge_window_s} s"
            )
        if self.min_verifier_age_s <= 0:
            raise ValueError("the minimum verifier age must be positive")
        EarlyMinerSchedule(0, self.early_period_s, self.early_multiplier_ppm, self.early_decay_s)
        if self.score_commit_window_s <= 0 or self.score_reveal_window_s <= 0:
            raise ValueError("the score commit and reveal windows must be positive")
        if self.miner_emission_per_epoch_wei < 0:
            raise ValueError("the miners' emission per epoch must not be negative")


# Short delays so a developer can watch thaws, disputes and epochs finish on a devnet.
DEVNET_PARAMS = SettlementParams(
    min_stake_miner_wei=10 * WEI_PER_BTT,
    min_stake_verifier_wei=10 * WEI_PER_BTT,
    min_stake_gateway_wei=10 * WEI_PER_BTT,
    unbonding_delay_s=900,
    thaw_period_s=300,
    fee_delay_s=360,
    protocol_fee_ppm=20_000,  # 2 %
    verifier_pool_ppm=30_000,  # 3 %
    dispute_deposit_wei=1 * WEI_PER_BTT,
    voting_period_s=300,
    max_slash_ppm=500_000,
    challenger_share_ppm=200_000,
    equivocation_slash_ppm=500_000,
    min_quorum_stake_wei=10 * WEI_PER_BTT,
    min_verifier_age_s=60,
    wrong_vote_slash_ppm=50_000,
    no_quorum_forfeit_ppm=250_000,
    max_open_disputes_per_miner=4,
    max_open_disputes_per_challenger=8,
    epoch_s=300,
    proposer_bond_wei=1 * WEI_PER_BTT,
    challenge_window_s=120,
    arbiter_delay_s=180,
    # Every miner of a fresh devnet is early, so the multiplier shows in its first epochs.
    early_period_s=DAY_S,
    early_multiplier_ppm=2_000_000,
    early_decay_s=DAY_S,
    score_commit_window_s=60,
    score_reveal_window_s=60,
    miner_emission_per_epoch_wei=10 * WEI_PER_BTT,
)

# What a public network starts from; governance tunes it later.
MAINNET_PARAMS = SettlementParams(
    min_stake_miner_wei=10_000 * WEI_PER_BTT,
    min_stake_verifier_wei=50_000 * WEI_PER_BTT,
    min_stake_gateway_wei=10_000 * WEI_PER_BTT,
    unbonding_delay_s=21 * DAY_S,
    thaw_period_s=2 * DAY_S,
    fee_delay_s=3 * DAY_S,
    protocol_fee_ppm=20_000,
    verifier_pool_ppm=30_000,
    dispute_deposit_wei=1_000 * WEI_PER_BTT,
    voting_period_s=3 * DAY_S,
    max_slash_ppm=500_000,
    challenger_share_ppm=200_000,
    equivocation_slash_ppm=500_000,
    min_quorum_stake_wei=200_000 * WEI_PER_BTT,
    min_verifier_age_s=7 * DAY_S,
    wrong_vote_slash_ppm=50_000,
    no_quorum_forfeit_ppm=250_000,
    max_open_disputes_per_miner=4,
    max_open_disputes_per_challenger=8,
    epoch_s=DAY_S,
    proposer_bond_wei=10_000 * WEI_PER_BTT,
    challenge_window_s=2 * DAY_S,
    arbiter_delay_s=7 * DAY_S,
    # Miners who join in the first quarter earn 1.5x until it ends, 1x a quarter later.
    early_period_s=90 * DAY_S,
    early_multiplier_ppm=1_500_000,
    early_decay_s=90 * DAY_S,
    score_commit_window_s=6 * 3_600,
    score_reveal_window_s=6 * 3_600,
    miner_emission_per_epoch_wei=10_000 * WEI_PER_BTT,
)
