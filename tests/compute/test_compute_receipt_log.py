"""The miner's receipt log on a real SQLite file: batching, totals, cut-offs, restarts."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
from eth_utils import keccak

from infergrid.compute.receipt_log import LoggedResponse, ReceiptLog, normalize_address
from infergrid.settle.binding import ChainBinding, ChainMismatch

PAYER = "0x" + "11" * 20
GATEWAY = "0x" + "22" * 20
OTHER_GATEWAY = "0x" + "33" * 20
MODEL = "0x" + "ab" * 32


def record(
    n: int,
    value: int,
    *,
    payer: str | None = PAYER,
    gateway: str | None = GATEWAY,
    at: float = 1000.0,
) -> LoggedResponse:
    return LoggedResponse(
        request_id=f"r{n}",
        request_hash=keccak(text=f"r{n}"),
        payer=normalize_address(payer),
        gateway=normalize_address(gateway),
        model_id=MODEL,
        tokens_in=10 + n,
        tokens_out=n,
        value_wei=value,
        created_at=at,
    )


def test_totals_per_pair_and_wei_beyond_64_bits(tmp_path: Path) -> None:
    big = 3 * 2**70  # far past SQLite's integers: amounts are exact decimal text
    with ReceiptLog(tmp_path / "log.db") as log:
        log.append(record(1, big))
        log.append(record(2, 5))
        log.append(record(3, 7, gateway=OTHER_GATEWAY))
        log.append(record(4, 9, payer=None, gateway=None))
        log.flush()
        totals = {(t.payer, t.gateway): t for t in log.totals()}
        pair = totals[(normalize_address(PAYER), normalize_address(GATEWAY))]
        assert (pair.responses, pair.tokens_in, pair.tokens_out, pair.value_wei) == (
            2,
            23,
            3,
            big + 5,
        )
        assert totals[(normalize_address(PAYER), normalize_address(OTHER_GATEWAY))].value_wei == 7
        assert totals[(None, None)].value_wei == 9
        assert log.total(PAYER.upper().replace("0X", "0x"), GATEWAY) == big + 5
        assert log.total(PAYER, "0x" + "44" * 20) == 0
        assert log.total(None, None) == 9


def test_a_request_hash_counts_once(tmp_path: Path) -> None:
    with ReceiptLog(tmp_path / "log.db") as log:
        log.append(record(1, 100))
        log.append(record(1, 100))
        log.flush()
        log.append(record(1, 100))
        log.flush()
        assert log.total(PAYER, GATEWAY) == 100
        assert len(log.responses()) == 1


def test_total_until_leaves_out_newer_responses(tmp_path: Path) -> None:
    with ReceiptLog(tmp_path / "log.db") as log:
        log.append(record(1, 100, at=1000.0))
        log.append(record(2, 20, at=1000.9))
        log.append(record(3, 3, at=1001.0))
        log.flush()
        assert log.total(PAYER, GATEWAY) == 123
        assert log.total(PAYER, GATEWAY, until=1001.0) == 120
        assert log.total(PAYER, GATEWAY, until=1000.0) == 0
        assert log.total(PAYER, GATEWAY, until=2000.0) == 123


def test_contains_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "log.db"
    with ReceiptLog(path) as log:
        log.append(record(1, 100))
        log.flush()
        assert log.contains(keccak(text="r1"))
        assert not log.contains(keccak(text="r2"))
        log.append(record(2, 50))
    # close() wrote the last append; a new process sees it all
    with ReceiptLog(path) as again:
        assert again.contains(keccak(text="r2"))
        assert again.total(PAYER, GATEWAY) == 150
        got = again.responses()
        assert [r.request_id for r in got] == ["r1", "r2"]
        assert got[0] == record(1, 100)


def test_appends_from_many_threads_are_group_committed(tmp_path: Path) -> None:
    with ReceiptLog(tmp_path / "log.db", flush_interval_s=0.01) as log:

        def work(start: int) -> None:
            for n in range(start, start + 200):
                log.append(record(n, n))

        threads = [threading.Thread(target=work, args=(i * 1000,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        log.flush()
        expected = sum(n for i in range(4) for n in range(i * 1000, i * 1000 + 200))
        assert log.total(PAYER, GATEWAY) == expected
        assert log.totals()[0].responses == 800
        assert log.write_errors == 0


def test_bad_addresses_and_closed_logs_are_refused(tmp_path: Path) -> None:
    assert normalize_address(None) is None
    assert normalize_address("") is None
    with pytest.raises(ValueError):
        normalize_address("0x1234")
    log = ReceiptLog(tmp_path / "log.db")
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError):
        log.append(record(1, 1))


def test_an_unstorable_response_is_dropped_alone(tmp_path: Path) -> None:
    # A token count past SQLite's INTEGER raised OverflowError, which the writer did not
    # catch: the writer thread died and nothing was logged (or flushed) after it.
    with ReceiptLog(tmp_path / "log.db", flush_interval_s=0.5) as log:
        poisoned = dataclasses.replace(record(2, 5), tokens_in=2**63)
        for item in (record(1, 100), poisoned, record(3, 7)):
            log.append(item)
        log.flush(timeout=10)
        assert [r.request_id for r in log.responses()] == ["r1", "r3"]
        assert log.total(PAYER, GATEWAY) == 107
        assert (log.rejected, log.write_errors) == (1, 0)
        log.append(record(4, 1))
        log.flush(timeout=10)
        assert log.total(PAYER, GATEWAY) == 108 and log.rejected == 1


def test_log_is_bound_to_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    a = ChainBinding.make(1337, "0x" + "aa" * 32, {"PaymentEscrow": GATEWAY})
    with ReceiptLog(path, chain=a) as log:
        log.append(record(1, 100))
    other = ChainBinding.make(1337, "0x" + "bb" * 32, {"PaymentEscrow": GATEWAY})
    with pytest.raises(ChainMismatch, match=r"the miner.s receipt log .* genesis block differs"):
        ReceiptLog(path, chain=other)
    with ReceiptLog(path, chain=a) as log:
        assert log.total(PAYER, GATEWAY) == 100
