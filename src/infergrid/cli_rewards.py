"""`infergrid rewards pay-miners`, `infergrid miner rewards` and `infergrid miner claim`: miners'
epoch rewards from the command line (verify.miner_pay). Registered on the `infergrid` app by
infergrid.cli, whose shared options and error handling these commands use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from infergrid.cli import (
    DEFAULT_STATE_DIR,
    PRIVATE_KEY_ENV,
    ChainRpcOption,
    CLIError,
    EscrowOption,
    JsonOption,
    RegistryOption,
    RewardsOption,
    StateDir,
    _devnet_info,
    _iso_time,
    _pay_contracts,
    _pay_target,
    _private_key,
    app,
    friendly_errors,
    miner_app,
    out,
)

rewards_app = typer.Typer(
    help="Miners' epoch rewards: the treasury pays each scored epoch; miners see and claim"
    " theirs with `infergrid miner rewards` / `infergrid miner claim`.",
    no_args_is_help=True,
)
app.add_typer(rewards_app, name="rewards")

ScoreBoardOption = Annotated[
    str | None, typer.Option("--scoreboard", help="ScoreBoard address (default: the devnet's).")
]
MinerStateOption = Annotated[
    Path | None,
    typer.Option(
        "--state-file",
        help="The miners' epochs paid so far and their allocations (JSON; default:"
        " STATE_DIR/miner-rewards.json). Miners claim from it: publish it to them.",
    ),
]
MinerNameOption = Annotated[
    str | None,
    typer.Option(
        "--miner",
        help="Which devnet miner (its name in devnet.json, e.g. miner-1); default: the one"
        f" whose key is in {PRIVATE_KEY_ENV}.",
    ),
]


@dataclass(frozen=True)
class _Rewards:
    net: Any  # verify.pay_epoch.PayContracts
    board: Any  # settle.scores.ScoreBoard
    registry: Any  # settle.registry.Registry
    state_file: Path
    info: dict[str, Any] | None


def _rewards(
    chain_rpc: str | None,
    registry: str | None,
    escrow: str | None,
    rewards: str | None,
    scoreboard: str | None,
    state_file: Path | None,
    state_dir: Path,
) -> _Rewards:
    from infergrid.settle.registry import Registry
    from infergrid.settle.scores import ScoreBoard
    from infergrid.verify.miner_pay import PAY_STATE_FILE as MINER_PAY_STATE_FILE

    target = _pay_target(
        chain_rpc, registry, escrow, rewards, state_file or state_dir / MINER_PAY_STATE_FILE,
        state_dir,
    )  # fmt: skip
    if scoreboard is None:
        info = target.info or _devnet_info(state_dir)
        scoreboard = info["contracts"].get("ScoreBoard")
        if not scoreboard:
            raise CLIError(
                "this devnet was deployed before the ScoreBoard existed: start a new one"
                " (`infergrid up`) or pass --scoreboard"
            )
    net = _pay_contracts(target)
    return _Rewards(
        net,
        ScoreBoard(net.chain, scoreboard),
        Registry(net.chain, target.registry),
        target.state_file,
        target.info,
    )


def _miner_key(miner: str | None, info: dict[str, Any] | None, state_dir: Path) -> str:
    if miner is None:
        return _private_key()
    described = (info or _devnet_info(state_dir)).get("miners") or []
    found = [entry for entry in described if entry["name"] == miner]
    if not found:
        names = ", ".join(entry["name"] for entry in described) or "none"
        raise CLIError(f"the devnet has no miner {miner!r} (it has {names})")
    return str(found[0]["key"])


def _share(ppm: int) -> str:
    """A share in ppm as a percentage (100.00 % for a whole one)."""
    return f"{ppm / 10_000:.2f} %"


def _multiplier(ppm: int) -> str:
    """A multiplier in ppm (1,000,000 is 1x)."""
    return f"{ppm / 1_000_000:.4f}x"


@rewards_app.command("pay-miners")
@friendly_errors
def pay_miners_command(
    chain_rpc: ChainRpcOption = None,
    registry: RegistryOption = None,
    escrow: EscrowOption = None,
    rewards: RewardsOption = None,
    scoreboard: ScoreBoardOption = None,
    emission: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="BTT paid to the miners for the epoch (default: the devnet profile's"
            " miner_emission_per_epoch_wei).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the consensus and allocations; send nothing.")
    ] = False,
    by_demand: Annotated[
        bool,
        typer.Option(
            "--by-demand",
            help="Split the emission by model demand from the gateway's /v1/network (the"
            " devnet's gateway unless --gateway names one).",
        ),
    ] = False,
    gateway_url: Annotated[
        str | None,
        typer.Option(
            "--gateway",
            help="Gateway whose GET /v1/network demand splits the emission by model (implies"
            " --by-demand).",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="INFERGRID_API_KEY", help="An API key at --gateway (default: the devnet's)."
        ),
    ] = None,
    state_file: MinerStateOption = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Pay the miners for the next scored epoch (run by the RewardDistributor's treasury:
    INFERGRID_PRIVATE_KEY; on a devnet the deployer's dev key).

    Reads the scores the verifiers revealed on the ScoreBoard for the next epoch whose reveal
    window has closed, takes per miner the stake-weighted median share, multiplies it by the
    miner's early multiplier (NodeRegistry.early_multiplier_at), splits the emission by that,
    funds the RewardDistributor and proposes the root with the proposer bond. Epochs nobody
    revealed for are passed over. Earlier epochs whose challenge window has passed are
    finalized first. Miners then run `infergrid miner claim`.

    By demand (--gateway or --by-demand) the emission is first split between the models by
    the gateway's demand and supply since the last epoch paid by demand (one ScoreBoard epoch
    back at first): models short of capacity get more (protocol.supply); each model's part
    goes to the miners offering it by share x multiplier.
    """
    from infergrid.protocol.pricing import format_btt
    from infergrid.verify.miner_pay import pay_miners
    from infergrid.verify.pay_epoch import finalize_due

    target = _rewards(chain_rpc, registry, escrow, rewards, scoreboard, state_file, state_dir)
    key = os.environ.get(PRIVATE_KEY_ENV, "").strip()
    if not key and target.info is not None:
        from infergrid.devnet import DEPLOYER_INDEX
        from infergrid.settle.chain import dev_private_keys

        key = dev_private_keys(DEPLOYER_INDEX + 1)[DEPLOYER_INDEX]  # the devnet's treasury
    if not key:
        key = _private_key()  # raises the one-line error
    if emission is None:
        if target.info is None:
            raise CLIError("--emission is required outside a devnet (BTT per epoch)")
        from infergrid.settle.profiles import DEVNET_PARAMS

        emission_wei = DEVNET_PARAMS.miner_emission_per_epoch_wei
    else:
        emission_wei = round(emission * 10**18)
    demand, window = None, None
    if by_demand or gateway_url is not None:
        demand, window = _gateway_demand(target, gateway_url, api_key, state_dir)
    finalized = [] if dry_run else finalize_due(target.net, key, target.state_file)
    result = pay_miners(
        target.net, target.board, target.registry, key, target.state_file,
        emission_wei=emission_wei, dry_run=dry_run, demand=demand, demand_window=window,
    )  # fmt: skip
    if as_json:
        extra = {"demand_window": list(window)} if window else {}
        out.print_json(data={**result.to_json(), **extra, "finalized": finalized})
        return
    for epoch in finalized:
        out.print(f"finalized reward epoch {epoch}", highlight=False)
    if result.skipped:
        first, last = result.skipped
        out.print(f"passed over scored epochs {first}–{last}: nobody revealed", highlight=False)
    out.print(
        f"scored epoch {result.scored_epoch} [{_iso_time(result.since)} .."
        f" {_iso_time(result.until)}), emission {format_btt(result.emission_wei)} BTT",
        highlight=False,
        soft_wrap=True,
    )
    if result.model_weights:
        out.print(f"{'model':<42} {'util.':>9} {'share':>9}", highlight=False)
    for model, weight in result.model_weights.items():
        used = result.model_utilization.get(model, 0.0)
        out.print(f"{model:<42} {used:>9.1%} {_share(weight):>9}", highlight=False)
    if result.shares:
        out.print(f"{'miner':<42} {'share':>9} {'early':>9}  reward", highlight=False)
    for miner, share in result.shares.items():
        amount = result.allocations.get(miner, 0)
        out.print(
            f"{miner:<42} {_share(share):>9} {_multiplier(result.multipliers[miner]):>9}"
            f"  {format_btt(amount)} BTT" + ("" if amount or not share else " (not a miner)"),
            highlight=False,
        )
    if result.epoch is None:
        out.print(result.note, highlight=False)
        return
    window = target.net.rewards.challenge_window()
    out.print(
        f"proposed reward epoch {result.epoch} (tx {result.tx}); final after the {window} s"
        " challenge window, then each miner runs `infergrid miner claim`",
        highlight=False,
        soft_wrap=True,
    )


def _gateway_demand(
    target: _Rewards, gateway_url: str | None, api_key: str | None, state_dir: Path
) -> tuple[dict[str, Any], tuple[float, float]]:
    """The gateway's demand per model since the last epoch paid by demand (one ScoreBoard
    epoch back at first), and that window; the gateway and key default to the devnet's."""
    import time

    from infergrid.verify.miner_pay import fetch_network_demand, last_demand_until
    from infergrid.verify.pay_state import PayState

    if gateway_url is None or api_key is None:
        info = target.info or _devnet_info(state_dir)
        gateway_url = gateway_url or info["base_url"]
        api_key = api_key or info["api_key"]
    assert gateway_url is not None and api_key is not None
    until = time.time()  # the gateway's clock: it runs on wall time
    state = PayState.load(target.state_file, target.net.deployment())
    since = float(last_demand_until(state)) or until - target.board.schedule().epoch_length_s
    return fetch_network_demand(gateway_url, api_key, since, until), (since, until)


@miner_app.command("rewards")
@friendly_errors
def miner_rewards_command(
    chain_rpc: ChainRpcOption = None,
    registry: RegistryOption = None,
    escrow: EscrowOption = None,
    rewards: RewardsOption = None,
    scoreboard: ScoreBoardOption = None,
    miner: MinerNameOption = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Any miner's address (read only).")
    ] = None,
    state_file: MinerStateOption = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """A miner's early multiplier now and, per paid epoch, its consensus share, multiplier,
    reward and whether it is claimable, claimed or still in its challenge window."""
    from infergrid.protocol.pricing import format_btt
    from infergrid.settle.chain import as_account
    from infergrid.settle.registry import check_address
    from infergrid.verify.pay_state import PayState

    target = _rewards(chain_rpc, registry, escrow, rewards, scoreboard, state_file, state_dir)
    if address is not None:
        owner = check_address(address, "--address")
    else:
        owner = as_account(_miner_key(miner, target.info, state_dir)).address
    now = target.net.chain.timestamp()
    multiplier = target.registry.early_multiplier_at(owner, now)
    schedule = target.registry.early_schedule()
    state = (
        PayState.load(target.state_file, target.net.deployment())
        if target.state_file.exists()
        else None
    )
    rows: list[dict[str, Any]] = []
    for record in state.epochs if state is not None else []:
        mine = next((w for w in record.work if w.get("miner") == owner), None)
        if mine is None or record.status in ("pending", "skipped"):
            continue
        amount = record.allocations.get(owner, 0)
        if amount == 0:
            status = "nothing to claim"
        elif record.status == "finalized" and target.net.rewards.is_claimed(record.epoch, owner):
            status = "claimed"
        elif record.status == "finalized":
            status = "claimable"
        else:
            info = target.net.rewards.epoch(record.epoch)
            if info.status == "finalized" or (
                info.status == "proposed"
                and info.proposed_at + target.net.rewards.challenge_window() <= now
            ):
                status = "claimable"  # `infergrid miner claim` finalizes it first
            else:
                status = "in its challenge window"
        rows.append(
            {
                "reward_epoch": record.epoch,
                "scored_epoch": target.board.schedule().epoch_at(record.since),
                "since": record.since,
                "until": record.until,
                "share_ppm": int(mine["share_ppm"]),
                "multiplier_ppm": int(mine["multiplier_ppm"]),
                "amount_wei": str(amount),
                "status": status,
            }
        )
    if as_json:
        out.print_json(data={"miner": owner, "early_multiplier_ppm": multiplier, "epochs": rows})
        return
    early = (
        f"early multiplier now {_multiplier(multiplier)} (the network's schedule:"
        f" {_multiplier(schedule.multiplier_ppm)} for miners registered before"
        f" {_iso_time(schedule.period_end)}, falling to 1x over {schedule.decay_s} s)"
    )
    out.print(f"miner {owner}: {early}", highlight=False, soft_wrap=True)
    if not rows:
        out.print(f"no paid epoch in {target.state_file} scores this miner", highlight=False)
    for row in rows:
        out.print(
            f"scored epoch {row['scored_epoch']} (reward epoch {row['reward_epoch']}): share"
            f" {_share(row['share_ppm'])} x {_multiplier(row['multiplier_ppm'])} ->"
            f" {format_btt(int(row['amount_wei']))} BTT, {row['status']}",
            highlight=False,
            soft_wrap=True,
        )


@miner_app.command("claim")
@friendly_errors
def miner_claim_command(
    chain_rpc: ChainRpcOption = None,
    registry: RegistryOption = None,
    escrow: EscrowOption = None,
    rewards: RewardsOption = None,
    scoreboard: ScoreBoardOption = None,
    miner: MinerNameOption = None,
    state_file: MinerStateOption = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Claim a miner's reward of every finalized epoch (finalizing those whose challenge
    window has passed first), with its Merkle proof. The miner: its key in
    INFERGRID_PRIVATE_KEY, or on a devnet --miner NAME."""
    from infergrid.protocol.pricing import format_btt
    from infergrid.settle.chain import as_account
    from infergrid.verify.pay_epoch import claim_rewards

    target = _rewards(chain_rpc, registry, escrow, rewards, scoreboard, state_file, state_dir)
    key = _miner_key(miner, target.info, state_dir)
    if not target.state_file.exists():
        raise CLIError(
            f"no miner rewards yet: {target.state_file} does not exist (the treasury writes it"
            " with `infergrid rewards pay-miners`)"
        )
    results = claim_rewards(target.net, key, target.state_file)
    if as_json:
        out.print_json(data=[r.to_json() for r in results])
        return
    if not results:
        out.print(
            f"no epoch in {target.state_file} pays {as_account(key).address}", highlight=False
        )
    for r in results:
        tx = f" (tx {r.tx})" if r.tx else ""
        if r.final_at is not None:
            tx = f" (its challenge window ends at block time {_iso_time(r.final_at)})"
        out.print(
            f"reward epoch {r.epoch}: {format_btt(r.amount_wei)} BTT to {r.account}:"
            f" {r.status}{tx}",
            highlight=False,
            soft_wrap=True,
        )
