"""Serve the embedded EVM over HTTP JSON-RPC, so other processes can share one chain.

Miners, gateways, verifiers, `cast` or web3 in another terminal connect to
`http://127.0.0.1:PORT` as to any node. Requests go to eth-tester through web3's
EthereumTesterProvider; results are turned into canonical JSON-RPC (hex quantities, camelCase
keys) and reverts into geth-style errors (code 3, "execution reverted: <reason>", revert data),
which web3, ethers and foundry all decode into the contract's reason. Dev extras: evm_mine,
evm_increaseTime, evm_setNextBlockTimestamp, evm_snapshot, evm_revert.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from eth_bloom import BloomFilter
from eth_tester.exceptions import TransactionFailed
from eth_tester.exceptions import ValidationError as TesterValidationError
from eth_utils.exceptions import ValidationError as EthValidationError
from hexbytes import HexBytes
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from web3 import Web3
from web3.providers.eth_tester.middleware import TRANSACTION_RESULT_KEY_MAPPING
from web3.types import RPCEndpoint

from infergrid.settle.chain import EmbeddedEVM, encode_revert_reason, revert_reason

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8545

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000  # what geth answers for a rejected transaction (nonce, funds, ...)
REVERT_ERROR = 3  # geth's code for "execution reverted", with the revert data

_BLOCK_METHODS = frozenset({"eth_getBlockByNumber", "eth_getBlockByHash"})
_RECEIPT_METHOD = "eth_getTransactionReceipt"
_TRANSACTION_METHODS = frozenset(
    {
        "eth_getTransactionByHash",
        "eth_getTransactionByBlockHashAndIndex",
        "eth_getTransactionByBlockNumberAndIndex",
    }
)


# --- turning eth-tester results into canonical JSON-RPC ---------------------------------


def to_rpc(value: Any) -> Any:
    """Python values as Ethereum JSON-RPC writes them: ints as hex quantities, bytes as hex."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): to_rpc(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_rpc(v) for v in value]
    raise TypeError(f"cannot encode {type(value).__name__} as JSON-RPC")


def _bloom_hex(bloom: int) -> str:
    return "0x" + bloom.to_bytes(256, "big").hex()


def _receipt_bloom(logs: list[dict[str, Any]]) -> int:
    bloom = BloomFilter()
    for entry in logs:
        bloom.add(bytes(HexBytes(entry["address"])))
        for topic in entry.get("topics", []):
            bloom.add(bytes(HexBytes(topic)))
    return int(bloom)


def _transaction(tx: dict[str, Any]) -> dict[str, Any]:
    # Full transactions inside blocks keep eth-tester's snake_case keys.
    out = {TRANSACTION_RESULT_KEY_MAPPING.get(k, k): v for k, v in tx.items()}
    v = out.get("v")
    # eth-tester leaves chainId out of EIP-155 legacy transactions; it is in their v.
    if "chainId" not in out and isinstance(v, int) and v >= 35:
        out["chainId"] = (v - 35) // 2
    return out


def normalize_result(method: str, result: Any) -> Any:
    """Fix the spots where eth-tester's output differs from what clients expect, then encode."""
    if method in _BLOCK_METHODS and isinstance(result, dict):
        result = dict(result)
        if isinstance(result.get("logsBloom"), int):
            result["logsBloom"] = _bloom_hex(result["logsBloom"])
        result["transactions"] = [
            _transaction(tx) if isinstance(tx, dict) else tx
            for tx in result.get("transactions", [])
        ]
    elif method in _TRANSACTION_METHODS and isinstance(result, dict):
        result = _transaction(result)
    elif method == _RECEIPT_METHOD and isinstance(result, dict):
        result = {k: v for k, v in result.items() if k != "state_root"}
        # eth-tester leaves out the receipt bloom; strict clients (alloy, ethers) need it.
        result.setdefault("logsBloom", _bloom_hex(_receipt_bloom(result.get("logs", []))))
    return to_rpc(result)


def _error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


# --- the dispatcher -----------------------------------------------------------------------


class JsonRpcDispatcher:
    """JSON-RPC 2.0 over an EmbeddedEVM: parsed request in, response object out."""

    def __init__(self, evm: EmbeddedEVM) -> None:
        self.evm = evm
        # Its own provider and a Web3 without client middleware: only eth-tester's own
        # formatting runs, so results come back raw, ready to encode.
        self._w3 = Web3(evm.provider(), middleware=[])
        self._request = self._w3.provider.request_func(self._w3, self._w3.middleware_onion)

    def handle(self, payload: Any) -> Any:
        """A response (object or batch list) for `payload`; None when only notifications."""
        if isinstance(payload, list):
            if not payload:
                return _error(None, INVALID_REQUEST, "invalid request: empty batch")
            responses = [self.handle_one(item) for item in payload]
            answered = [r for r in responses if r is not None]
            return answered or None
        return self.handle_one(payload)

    def handle_one(self, request: Any) -> dict[str, Any] | None:
        if not isinstance(request, dict):
            return _error(None, INVALID_REQUEST, "invalid request: not an object")
        request_id = request.get("id")
        method = request.get("method")
        params = request.get("params", [])
        if request.get("jsonrpc") != "2.0" or not isinstance(method, str) or not method:
            return _error(request_id, INVALID_REQUEST, "invalid request")
        if not isinstance(request_id, str | int | type(None)) or isinstance(request_id, bool):
            return _error(None, INVALID_REQUEST, "invalid request: bad id")
        if not isinstance(params, list):
            return _error(request_id, INVALID_PARAMS, "invalid params: expected an array")
        response = self._call(request_id, method, params)
        # A request without an id is a notification: it is executed but gets no answer.
        return response if "id" in request else None

    def _call(self, request_id: Any, method: str, params: list[Any]) -> dict[str, Any]:
        try:
            raw = self._request(RPCEndpoint(method), params)
        except TransactionFailed as exc:
            reason = revert_reason(exc) or "execution reverted"
            return _error(
                request_id,
                REVERT_ERROR,
                f"execution reverted: {reason}",
                "0x" + encode_revert_reason(reason).hex(),
            )
        except (EthValidationError, TesterValidationError) as exc:
            return _error(request_id, SERVER_ERROR, str(exc) or type(exc).__name__)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            return _error(request_id, INVALID_PARAMS, f"invalid params: {exc}")
        except Exception as exc:  # keep serving; the client sees what went wrong
            log.exception("JSON-RPC %s failed", method)
            return _error(request_id, INTERNAL_ERROR, f"internal error: {exc}")
        if raw.get("error"):
            error = raw["error"]
            if isinstance(error, dict):
                return _error(
                    request_id,
                    int(error.get("code", INTERNAL_ERROR)),
                    str(error.get("message", "")),
                    error.get("data"),
                )
            return _error(request_id, INTERNAL_ERROR, str(error))
        try:
            result = normalize_result(method, raw.get("result"))
        except TypeError as exc:
            log.exception("cannot encode the result of %s", method)
            return _error(request_id, INTERNAL_ERROR, f"internal error: {exc}")
        return {"jsonrpc": "2.0", "id": request_id, "result": result}


def create_app(evm: EmbeddedEVM) -> Starlette:
    dispatcher = JsonRpcDispatcher(evm)

    async def rpc(request: Request) -> Response:
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse(_error(None, PARSE_ERROR, "parse error"))
        # The EVM is synchronous and serialised by its lock: run it off the event loop so
        # the server keeps accepting connections meanwhile.
        response = await run_in_threadpool(dispatcher.handle, payload)
        if response is None:
            return Response(status_code=204)
        return JSONResponse(response)

    async def health(_request: Request) -> Response:
        return JSONResponse({"chain_id": evm.chain_id})

    return Starlette(
        routes=[Route("/", rpc, methods=["POST"]), Route("/health", health, methods=["GET"])]
    )


# --- the server shells --------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn, stopping on SIGINT/SIGTERM without re-raising the signal afterwards, and
    telling the caller once it listens."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            self._on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(_signum: int, _frame: Any) -> None:
            self.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _bind(host: str, port: int) -> socket.socket:
    # Binding here rather than in uvicorn: a port in use raises OSError to the caller instead
    # of uvicorn's sys.exit, and port 0 gives a free port we can report.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class EmbeddedChainServer:
    """The embedded EVM served from a background thread (tests, the devnet).

    with EmbeddedChainServer() as server:
        chain = Chain.connect(server.url)
    """

    def __init__(
        self, evm: EmbeddedEVM | None = None, host: str = DEFAULT_HOST, port: int = 0
    ) -> None:
        self.evm = evm or EmbeddedEVM()
        self.host = host
        self.port = port
        self.url = ""
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 10.0) -> str:
        if self._thread is not None:
            raise RuntimeError("server already started")
        sock = _bind(self.host, self.port)
        self.url = _url(sock)
        ready = threading.Event()
        config = uvicorn.Config(
            create_app(self.evm), log_level="warning", access_log=False, lifespan="off"
        )
        self._server = _Server(config, ready.set)

        def run() -> None:
            try:
                self._server.run(sockets=[sock])  # type: ignore[union-attr]
            except BaseException as exc:
                self._error = exc
            finally:
                sock.close()
                ready.set()

        self._thread = threading.Thread(target=run, name="infergrid-chain-rpc", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s) or self._error is not None:
            self.stop()
            raise RuntimeError(f"chain RPC server did not start: {self._error}")
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._thread = None
        self._server = None

    def __enter__(self) -> EmbeddedChainServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class BlockTicker:
    """Mines an empty block every `interval_s` seconds on a daemon thread, as a real chain
    keeps producing blocks (anvil's --block-time): the embedded EVM otherwise mines only on a
    transaction, so an idle chain's clock (its latest block's time) stands still and whatever
    counts time in blocks (epochs, windows) waits for the next transaction."""

    def __init__(self, evm: EmbeddedEVM, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"the block time must be positive, not {interval_s}")
        self.evm = evm
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chain-blocks", daemon=True)

    def start(self) -> BlockTicker:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.evm.mine(1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval_s + 5)


def serve_embedded_chain(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    ready_callback: Callable[[str], None] | None = None,
    *,
    evm: EmbeddedEVM | None = None,
    block_time_s: float | None = None,
) -> None:
    """Serve an embedded EVM (a fresh one unless `evm` is given) until SIGINT or SIGTERM.

    Blocking. `ready_callback(url)` runs once the port is listening. The chain id is
    `evm.chain_id` (EMBEDDED_CHAIN_ID, 1337, by default); the dev mnemonic's first accounts
    are funded as on anvil. With `block_time_s`, an empty block is also mined every that many
    seconds (BlockTicker); without it, blocks are mined only by transactions.
    """
    evm = evm or EmbeddedEVM()
    ticker = BlockTicker(evm, block_time_s) if block_time_s is not None else None
    sock = _bind(host, port)
    url = _url(sock)
    config = uvicorn.Config(create_app(evm), log_level="warning", access_log=False, lifespan="off")
    on_started = (lambda: ready_callback(url)) if ready_callback is not None else None
    server = _Server(config, on_started)
    if ticker is not None:
        ticker.start()
    try:
        server.run(sockets=[sock])
    finally:
        if ticker is not None:
            ticker.stop()
        sock.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m infergrid.settle.rpc_server [--host H] [--port P]` (the CLI's `chain`)."""
    import argparse

    parser = argparse.ArgumentParser(description="Serve an embedded EVM over JSON-RPC.")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--accounts", type=int, default=10, help="funded dev accounts")
    args = parser.parse_args(argv)
    evm = EmbeddedEVM(accounts=args.accounts)
    serve_embedded_chain(
        args.host,
        args.port,
        lambda url: print(f"embedded chain {evm.chain_id} on {url}", flush=True),
        evm=evm,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
