"""One chain client for every chain InferGrid settles on.

`Chain.embedded()` runs an EVM in this process (py-evm through eth-tester); `Chain.connect(url)`
talks JSON-RPC to anvil, BTTC or the embedded chain served by `rpc_server`. Both send legacy
transactions with an explicit gas price, signed here with eth-account keys, because BTTC has no
EIP-1559. Web3 calls are blocking: async services call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeAlias, cast

import requests
from eth_abi.exceptions import DecodingError
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.exceptions import TransactionFailed as TesterTransactionFailed
from eth_utils import to_checksum_address
from eth_utils.exceptions import ValidationError as EthValidationError
from hexbytes import HexBytes
from web3 import EthereumTesterProvider, HTTPProvider, Web3
from web3.contract import Contract
from web3.exceptions import (
    ContractLogicError,
    MismatchedABI,
    TimeExhausted,
    Web3Exception,
    Web3RPCError,
)
from web3.middleware import ExtraDataToPOAMiddleware
from web3.providers.rpc.utils import ExceptionRetryConfiguration
from web3.types import RPCEndpoint, RPCResponse, TxParams, TxReceipt

from infergrid.protocol.nodes import WEI_PER_BTT

DEV_MNEMONIC = "test test test test test test test test test test test junk"
# The derivation path anvil, hardhat and foundry use, so that embedded and anvil devnets
# fund the same addresses.
DEV_HD_PATH = "m/44'/60'/0'/0"
DEV_BALANCE_WEI = 10_000 * WEI_PER_BTT  # what anvil gives each dev account
# The conventional chain id of a local dev chain (geth --dev, Ganache); distinct from anvil's
# 31337 and from BTTC so a signed message cannot be replayed between them.
EMBEDDED_CHAIN_ID = 1337
BTTC_MAINNET_CHAIN_ID = 199
BTTC_DONAU_CHAIN_ID = 1029
# Chains whose blocks carry more than 32 bytes of extra data (POA signatures).
POA_CHAIN_IDS = frozenset({BTTC_MAINNET_CHAIN_ID, BTTC_DONAU_CHAIN_ID})
POA_MIDDLEWARE = "extradata_to_poa"

# Seconds to wait for one JSON-RPC answer, for every node and command unless the environment
# variable overrides it. A chain that accepts connections and never answers fails each request
# after this long, once: a timed-out request is not retried (web3's default retries it five
# times, which made a hung chain hold a command for 2.5 minutes).
DEFAULT_REQUEST_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_ENV = "INFERGRID_CHAIN_TIMEOUT"

ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
_REVERT_PREFIX = "execution reverted"

PrivateKey: TypeAlias = str | bytes | LocalAccount


class ChainError(Exception):
    """A chain operation failed for a reason other than a contract revert."""


class ContractRevert(ChainError):
    """A contract call or transaction reverted; `reason` is the contract's reason string."""

    def __init__(self, reason: str, tx_hash: str | None = None) -> None:
        self.reason = reason
        self.tx_hash = tx_hash
        where = f" (tx {tx_hash})" if tx_hash else ""
        super().__init__(f"contract reverted: {reason}{where}")


@dataclass(frozen=True)
class ContractEvent:
    """One decoded event log: its name and arguments."""

    name: str
    args: dict[str, Any]


def decode_events(contract: Contract, receipt: TxReceipt) -> list[ContractEvent]:
    """The events `contract` emitted in a transaction, in log order (other contracts' logs,
    such as the registry's during a slash, are skipped)."""
    address = to_checksum_address(contract.address)
    found: list[ContractEvent] = []
    for log in sorted(receipt["logs"], key=lambda entry: int(entry["logIndex"])):
        if to_checksum_address(log["address"]) != address:
            continue
        for event in contract.events:
            try:
                decoded = event.process_log(log)
            except MismatchedABI:  # not this event's signature
                continue
            found.append(ContractEvent(decoded["event"], dict(decoded["args"])))
            break
    return found


# --- dev accounts -----------------------------------------------------------------------


@lru_cache(maxsize=8)
def _dev_keys(n: int) -> tuple[str, ...]:
    Account.enable_unaudited_hdwallet_features()
    return tuple(
        Account.from_mnemonic(DEV_MNEMONIC, account_path=f"{DEV_HD_PATH}/{i}").key.to_0x_hex()
        for i in range(n)
    )


def dev_private_keys(n: int = 10) -> list[str]:
    """The first `n` private keys of the dev mnemonic (funded by anvil and the embedded EVM)."""
    if n < 0:
        raise ValueError("n must be non-negative")
    return list(_dev_keys(n))


def dev_accounts(n: int = 10) -> list[str]:
    """The checksummed addresses of `dev_private_keys(n)`."""
    return [Account.from_key(key).address for key in dev_private_keys(n)]


def as_account(key: PrivateKey) -> LocalAccount:
    if isinstance(key, LocalAccount):
        return key
    return cast(LocalAccount, Account.from_key(key))


# --- revert reasons ---------------------------------------------------------------------


def decode_revert_data(data: bytes | str | None) -> str | None:
    """The reason string in ABI-encoded `Error(string)` revert data, if that is what it is."""
    if data is None:
        return None
    raw = HexBytes(data) if isinstance(data, str) else bytes(data)
    if raw[:4] != ERROR_STRING_SELECTOR:
        return None
    try:
        from eth_abi import decode

        return cast(str, decode(["string"], raw[4:])[0])
    except (DecodingError, ValueError, OverflowError):
        return None


def encode_revert_reason(reason: str) -> bytes:
    """`Error(string)` revert data for `reason`, as geth and anvil put it in JSON-RPC errors."""
    from eth_abi import encode

    return ERROR_STRING_SELECTOR + encode(["string"], [reason])


def _strip_prefix(message: str) -> str:
    text = message.strip()
    if text.startswith(_REVERT_PREFIX):
        text = text[len(_REVERT_PREFIX) :].lstrip(":").strip()
    return text


def revert_reason(exc: BaseException) -> str | None:
    """The contract's reason string if `exc` is a revert (over HTTP or in process), else None."""
    if isinstance(exc, ContractLogicError):
        data = exc.data if isinstance(exc.data, str) else None
        decoded = decode_revert_data(data) if data and data.startswith("0x") else None
        if decoded is not None:
            return decoded
        return _strip_prefix(exc.message or "") or "execution reverted"
    if isinstance(exc, TesterTransactionFailed):
        first = exc.args[0] if exc.args else ""
        if isinstance(first, bytes):
            return decode_revert_data(first) or first.hex()
        if isinstance(first, Exception) and first.args and isinstance(first.args[0], bytes):
            return decode_revert_data(first.args[0]) or first.args[0].hex()
        return _strip_prefix(str(first)) or "execution reverted"
    return None


def default_request_timeout_s() -> float:
    """The JSON-RPC request timeout: $INFERGRID_CHAIN_TIMEOUT seconds, else the default."""
    raw = os.environ.get(REQUEST_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_REQUEST_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"{REQUEST_TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value


def _translate(exc: Exception, tx_hash: str | None = None) -> ChainError:
    reason = revert_reason(exc)
    if reason is not None:
        return ContractRevert(reason, tx_hash)
    if isinstance(exc, Web3RPCError):
        # The node's own words, not the repr of the JSON-RPC error object.
        error = (exc.rpc_response or {}).get("error")
        message = error.get("message") if isinstance(error, dict) else None
        return ChainError(" ".join(str(message or exc.message or exc).split()))
    if isinstance(exc, requests.Timeout):
        return ChainError(f"the chain did not answer in time ({exc})")
    if isinstance(exc, requests.RequestException):
        return ChainError(f"cannot reach the chain ({exc})")
    return ChainError(str(exc) or type(exc).__name__)


# Errors that mean "the chain said no" (or did not answer) rather than a bug in this code.
_CHAIN_ERRORS = (
    Web3Exception,
    TesterTransactionFailed,
    EthValidationError,
    requests.RequestException,
)


# --- the embedded EVM -------------------------------------------------------------------


class _LockedTesterProvider(EthereumTesterProvider):
    """eth-tester is not thread-safe; every request to one tester goes through one lock."""

    def __init__(
        self, tester: EthereumTester, api_endpoints: dict[str, Any], lock: threading.RLock
    ) -> None:
        super().__init__(tester, api_endpoints)
        self.lock = lock

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        with self.lock:
            return super().make_request(method, params)


def _embedded_endpoints(chain_id: int, tester: EthereumTester) -> dict[str, Any]:
    from web3.providers.eth_tester.defaults import API_ENDPOINTS

    def static(value: Any) -> Callable[..., Any]:
        return lambda *_args: value

    def increase_time(_tester: EthereumTester, params: Sequence[Any]) -> int:
        seconds = params[0] if params else 0
        seconds = int(seconds, 16) if isinstance(seconds, str) else int(seconds)
        if seconds < 0:
            raise EthValidationError("cannot travel back in time")
        pending = tester.get_block_by_number("pending")["timestamp"]
        if seconds > 0:
            tester.time_travel(pending + seconds)
        return seconds

    def set_next_timestamp(_tester: EthereumTester, params: Sequence[Any]) -> None:
        value = params[0]
        timestamp = int(value, 16) if isinstance(value, str) else int(value)
        tester.time_travel(timestamp)

    endpoints = {namespace: dict(methods) for namespace, methods in API_ENDPOINTS.items()}
    endpoints["eth"]["chainId"] = static(chain_id)
    endpoints["net"]["version"] = static(str(chain_id))
    endpoints["net"]["listening"] = static(True)
    endpoints["evm"]["increaseTime"] = increase_time
    endpoints["evm"]["setNextBlockTimestamp"] = set_next_timestamp
    return endpoints


class EmbeddedEVM:
    """An in-process EVM with the dev accounts funded; shared by a Chain and the RPC server."""

    def __init__(
        self,
        accounts: int = 10,
        balance_wei: int = DEV_BALANCE_WEI,
        chain_id: int = EMBEDDED_CHAIN_ID,
    ) -> None:
        if accounts < 1:
            raise ValueError("the embedded EVM needs at least one account")
        backend = PyEVMBackend.from_mnemonic(
            DEV_MNEMONIC,
            num_accounts=accounts,
            hd_path=DEV_HD_PATH,
            genesis_state_overrides={"balance": balance_wei},
        )
        # setup_tester_chain builds a fresh chain class per backend, so changing its chain id
        # touches no other backend; the VM checks EIP-155 signatures against this value.
        type(backend.chain).chain_id = chain_id
        self.chain_id = chain_id
        self.tester = EthereumTester(backend)
        self.lock = threading.RLock()
        self.endpoints = _embedded_endpoints(chain_id, self.tester)

    def provider(self) -> EthereumTesterProvider:
        """A new provider on this EVM. Each Web3 instance needs its own: a provider caches
        one middleware stack at a time, which concurrent users would swap under each other."""
        return _LockedTesterProvider(self.tester, self.endpoints, self.lock)

    def time_travel(self, seconds: int) -> int:
        """Mine a block `seconds` after the pending one; returns its timestamp."""
        with self.lock:
            target = int(self.tester.get_block_by_number("pending")["timestamp"]) + seconds
            self.tester.time_travel(target)
            return target

    def mine(self, blocks: int = 1) -> None:
        with self.lock:
            self.tester.mine_blocks(blocks)


# --- the client -------------------------------------------------------------------------


class Chain:
    """A web3 connection plus the keys-and-gas logic every InferGrid role needs."""

    def __init__(
        self,
        w3: Web3,
        *,
        evm: EmbeddedEVM | None = None,
        gas_price_wei: int | None = None,
        receipt_timeout_s: float = 120.0,
        url: str | None = None,
    ) -> None:
        self.w3 = w3
        # web3's validation middleware asks the node for its chain id before every eth_call
        # and gas estimate, doubling every read's round trips (a gateway polls the escrow and
        # the registry all day). We never send a transaction it would catch: every one is
        # signed here with chainId=self.chain_id (send), so the check is only a cost.
        if "validation" in {name for _, name in w3.middleware_onion.middleware}:
            w3.middleware_onion.remove("validation")
        self.evm = evm
        self.url = url
        self.gas_price_wei = gas_price_wei
        self.receipt_timeout_s = receipt_timeout_s
        self._chain_id: int | None = None
        self._genesis_hash: str | None = None
        self.poa = False  # whether blocks are read through the POA extra-data middleware
        self._sender_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @classmethod
    def embedded(cls, evm: EmbeddedEVM | None = None, **kwargs: Any) -> Chain:
        """A client on an in-process EVM (a fresh one with 10 dev accounts unless given)."""
        evm = evm or EmbeddedEVM()
        return cls(Web3(evm.provider()), evm=evm, **kwargs)

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        request_timeout_s: float | None = None,
        gas_price_wei: int | None = None,
        receipt_timeout_s: float = 120.0,
    ) -> Chain:
        """A client on any JSON-RPC endpoint (http:// or https://). Each request waits at
        most `request_timeout_s` (default: default_request_timeout_s()); a timeout is not
        retried."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"unsupported chain URL {url!r} (expected http:// or https://)")
        timeout = (
            request_timeout_s if request_timeout_s is not None else default_request_timeout_s()
        )
        retry = ExceptionRetryConfiguration(errors=(ConnectionError, requests.HTTPError))
        provider = HTTPProvider(
            url, request_kwargs={"timeout": timeout}, exception_retry_configuration=retry
        )
        w3 = Web3(provider)
        chain = cls(w3, gas_price_wei=gas_price_wei, receipt_timeout_s=receipt_timeout_s, url=url)
        if chain.chain_id in POA_CHAIN_IDS:
            w3.middleware_onion.inject(ExtraDataToPOAMiddleware, name=POA_MIDDLEWARE, layer=0)
            chain.poa = True
        return chain

    # --- reads ---

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            try:
                self._chain_id = int(self.w3.eth.chain_id)
            except Exception as exc:
                where = f" at {self.url}" if self.url else ""
                if isinstance(exc, requests.Timeout):
                    raise ChainError(f"the chain{where} did not answer in time ({exc})") from exc
                raise ChainError(f"cannot reach the chain{where}: {exc}") from exc
        return self._chain_id

    def genesis_hash(self) -> str:
        """The hash of block 0 as lowercase 0x-hex: with the chain id, what tells this chain
        apart from another with the same id (every fresh devnet or anvil; see
        settle.binding)."""
        if self._genesis_hash is None:
            try:
                block = self.w3.eth.get_block(0)
            except Exception as exc:
                raise ChainError(f"cannot read the chain's genesis block: {exc}") from exc
            self._genesis_hash = "0x" + bytes(block["hash"]).hex()
        return self._genesis_hash

    def block_number(self) -> int:
        return int(self.w3.eth.block_number)

    def timestamp(self) -> int:
        """The timestamp of the latest block."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def balance(self, address: str) -> int:
        return int(self.w3.eth.get_balance(to_checksum_address(address)))

    def contract(self, address: str, abi: list[dict[str, Any]]) -> Contract:
        return self.w3.eth.contract(address=to_checksum_address(address), abi=abi)

    def call(self, fn: Any, block: int | str = "latest") -> Any:
        """Call a view `fn` (a bound web3 ContractFunction); reverts raise ContractRevert."""
        try:
            return fn.call(block_identifier=block)
        except _CHAIN_ERRORS as exc:
            raise _translate(exc) from exc

    # --- writes ---

    def gas_price(self) -> int:
        if self.gas_price_wei is not None:
            return self.gas_price_wei
        return int(self.w3.eth.gas_price)

    def _sender_lock(self, address: str) -> threading.Lock:
        with self._locks_guard:
            return self._sender_locks.setdefault(address, threading.Lock())

    def transact(
        self,
        key: PrivateKey,
        to: str | None,
        data: bytes | str = b"",
        value: int = 0,
        gas: int | None = None,
    ) -> TxReceipt:
        """Sign and send a legacy transaction; wait for its receipt.

        The gas estimate runs first so a revert surfaces with its reason before anything is
        sent. A transaction that still fails on-chain raises ContractRevert with the reason
        found by replaying it.
        """
        if value < 0:
            raise ValueError("value must be non-negative")
        account = as_account(key)
        payload = HexBytes(data)
        tx: dict[str, Any] = {"from": account.address, "value": value, "data": payload}
        if to is not None:
            tx["to"] = to_checksum_address(to)
        with self._sender_lock(account.address):
            try:
                if gas is None:
                    estimate = int(self.w3.eth.estimate_gas(cast(TxParams, tx)))
                    gas = estimate + estimate // 5 + 10_000
                tx.update(
                    gas=gas,
                    gasPrice=self.gas_price(),
                    nonce=self.w3.eth.get_transaction_count(account.address, "pending"),
                    chainId=self.chain_id,
                )
                del tx["from"]
                signed = account.sign_transaction(tx)
                tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            except _CHAIN_ERRORS as exc:
                raise _translate(exc) from exc
            try:
                receipt = self.w3.eth.wait_for_transaction_receipt(
                    tx_hash, timeout=self.receipt_timeout_s, poll_latency=0.1
                )
            except TimeExhausted as exc:
                raise ChainError(f"transaction {tx_hash.to_0x_hex()} not mined in time") from exc
        if receipt["status"] != 1:
            tx["from"] = account.address
            raise ContractRevert(
                self._replay_reason(tx, receipt["blockNumber"]), tx_hash.to_0x_hex()
            )
        return receipt

    def _replay_reason(self, tx: dict[str, Any], block_number: int) -> str:
        call = {k: tx[k] for k in ("from", "to", "value", "data", "gas") if k in tx}
        try:
            self.w3.eth.call(cast(TxParams, call), block_identifier=max(block_number - 1, 0))
        except _CHAIN_ERRORS as exc:
            reason = revert_reason(exc)
            if reason:
                return reason
        return "transaction reverted (out of gas or no reason given)"

    def send(
        self,
        key: PrivateKey,
        contract: Contract,
        function: str,
        *args: Any,
        value: int = 0,
        gas: int | None = None,
    ) -> TxReceipt:
        """Send a transaction calling `contract.function(*args)`."""
        data = contract.encode_abi(function, args=list(args))
        return self.transact(key, contract.address, data, value=value, gas=gas)

    def deploy(
        self,
        key: PrivateKey,
        abi: list[dict[str, Any]],
        bytecode: str | bytes,
        *args: Any,
        value: int = 0,
    ) -> str:
        """Deploy a contract; returns its checksummed address."""
        ctor = next((item for item in abi if item.get("type") == "constructor"), None)
        types = [inp["type"] for inp in ctor["inputs"]] if ctor else []
        if len(types) != len(args):
            raise ValueError(f"constructor takes {len(types)} arguments, got {len(args)}")
        data = bytes(HexBytes(bytecode)) + self.w3.codec.encode(types, list(args))
        receipt = self.transact(key, None, data, value=value)
        address = receipt["contractAddress"]
        if not address:
            raise ChainError("deployment produced no contract address")
        return to_checksum_address(address)

    def transfer(self, key: PrivateKey, to: str, value: int) -> TxReceipt:
        return self.transact(key, to, b"", value=value, gas=21_000)

    # --- dev-chain helpers (embedded EVM, anvil, the embedded RPC server) ---

    def increase_time(self, seconds: int) -> int:
        """Move the chain's clock forward and mine a block; returns the new latest timestamp."""
        if seconds < 0:
            raise ValueError("cannot travel back in time")
        if self.evm is not None:
            self.evm.time_travel(seconds)
        else:
            self._rpc("evm_increaseTime", [seconds])
            self._rpc("evm_mine", [])
        return self.timestamp()

    def mine(self, blocks: int = 1) -> None:
        if self.evm is not None:
            self.evm.mine(blocks)
        else:
            for _ in range(blocks):
                self._rpc("evm_mine", [])

    def _rpc(self, method: str, params: list[Any]) -> Any:
        try:
            response = self.w3.provider.make_request(RPCEndpoint(method), params)
        except _CHAIN_ERRORS as exc:
            raise ChainError(f"{method} failed: {exc}") from exc
        if response.get("error"):
            raise ChainError(f"{method} is not supported by this chain: {response['error']}")
        return response.get("result")
