"""Deploy and wire every settlement contract of one network.

Order: NodeRegistry → PaymentEscrow → DisputeManager (whose EIP-712 domain is the escrow's,
and which becomes the registry's slasher, once and for good) → RewardDistributor. The
deployer is the admin of all four (each handed on in two steps) and, on a devnet, the
treasury and the reward arbiter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from infergrid.protocol.nodes import Role
from infergrid.settle.chain import Chain, PrivateKey, as_account
from infergrid.settle.disputes import deploy_disputes
from infergrid.settle.escrow import deploy_escrow
from infergrid.settle.profiles import SettlementParams
from infergrid.settle.registry import Registry, deploy_registry
from infergrid.settle.rewards import deploy_rewards
from infergrid.settle.scores import deploy_scoreboard


@dataclass(frozen=True)
class NetworkContracts:
    NodeRegistry: str  # keyed by contract name, as devnet.json stores them
    PaymentEscrow: str
    DisputeManager: str
    RewardDistributor: str
    # Verifiers' score commit-reveal (issue 11); none in a devnet.json written before it.
    ScoreBoard: str | None = None

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def deploy_network(
    chain: Chain,
    deployer_key: PrivateKey,
    params: SettlementParams,
    *,
    treasury: str | None = None,
    verifier_pool: str | None = None,
    arbiter: str | None = None,
) -> NetworkContracts:
    """Deploy the four contracts; treasury, verifier pool and arbiter default to the deployer."""
    params.check()
    deployer = as_account(deployer_key).address
    treasury = treasury or deployer
    verifier_pool = verifier_pool or treasury
    registry_address = deploy_registry(
        chain,
        deployer_key,
        {
            Role.MINER: params.min_stake_miner_wei,
            Role.VERIFIER: params.min_stake_verifier_wei,
            Role.GATEWAY: params.min_stake_gateway_wei,
        },
        params.unbonding_delay_s,
        early_period_s=params.early_period_s,
        early_multiplier_ppm=params.early_multiplier_ppm,
        early_decay_s=params.early_decay_s,
    )
    escrow_address = deploy_escrow(
        chain,
        deployer_key,
        treasury=treasury,
        verifier_pool=verifier_pool,
        protocol_fee_ppm=params.protocol_fee_ppm,
        verifier_pool_ppm=params.verifier_pool_ppm,
        thaw_period_s=params.thaw_period_s,
        fee_delay_s=params.fee_delay_s,
    )
    disputes_address = deploy_disputes(
        chain,
        deployer_key,
        registry=registry_address,
        escrow=escrow_address,
        treasury=treasury,
        dispute_deposit_wei=params.dispute_deposit_wei,
        voting_period_s=params.voting_period_s,
        max_slash_ppm=params.max_slash_ppm,
        challenger_share_ppm=params.challenger_share_ppm,
        equivocation_slash_ppm=params.equivocation_slash_ppm,
        min_quorum_stake_wei=params.min_quorum_stake_wei,
        min_verifier_age_s=params.min_verifier_age_s,
        wrong_vote_slash_ppm=params.wrong_vote_slash_ppm,
        no_quorum_forfeit_ppm=params.no_quorum_forfeit_ppm,
        max_open_per_miner=params.max_open_disputes_per_miner,
        max_open_per_challenger=params.max_open_disputes_per_challenger,
    )
    Registry(chain, registry_address).set_slasher(deployer_key, disputes_address)
    rewards_address = deploy_rewards(
        chain,
        deployer_key,
        arbiter=arbiter or deployer,
        treasury=treasury,
        proposer_bond_wei=params.proposer_bond_wei,
        challenge_window_s=params.challenge_window_s,
        arbiter_delay_s=params.arbiter_delay_s,
    )
    scoreboard_address = deploy_scoreboard(
        chain,
        deployer_key,
        registry=registry_address,
        epoch_length_s=params.epoch_s,
        commit_window_s=params.score_commit_window_s,
        reveal_window_s=params.score_reveal_window_s,
    )
    return NetworkContracts(
        NodeRegistry=registry_address,
        PaymentEscrow=escrow_address,
        DisputeManager=disputes_address,
        RewardDistributor=rewards_address,
        ScoreBoard=scoreboard_address,
    )
