"""What a batch checks before writing, and how a lost race is retried (services.common.db)."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import BigInteger, Column, Integer, LargeBinary, MetaData, String, Table, Text
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError

from services.common.db import ColumnLimits, refused_item, retry_conflicts
from services.common.errors import STORE_CONFLICT, InvalidArgument, store_problem

TABLE = Table(
    "t",
    MetaData(),
    Column("name", String(8)),
    Column("note", Text),
    Column("count", Integer),
    Column("total", BigInteger),
    Column("data", LargeBinary),
)


class _Cause(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def test_column_limits_name_every_value_its_column_cannot_hold() -> None:
    limits = ColumnLimits(TABLE)
    assert limits.problems({"name": "8 chars!", "note": "x" * 10**5, "count": -(2**31)}) == []
    assert limits.problems(
        {"name": "nine char", "note": "a\x00b", "count": 2**31, "total": 2**63, "data": b"\x00"}
    ) == [
        ("name", "at most 8 characters"),
        ("note", "must not contain NUL (\\x00)"),
        ("count", "out of range (a 32-bit integer)"),
        ("total", "out of range (a 64-bit integer)"),
    ]
    with pytest.raises(InvalidArgument) as refused:
        limits.check({"name": "nine char"}, "row 1")
    assert refused.value.violations == [("name", "at most 8 characters")]
    assert refused.value.reason == "VALUE_REFUSED"


def test_a_deadlock_is_retried_then_aborted_never_unavailable() -> None:
    calls = []

    def deadlocked_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("UPDATE", {}, _Cause("40P01"))
        return "done"

    assert retry_conflicts(deadlocked_once) == "done" and len(calls) == 2

    lost = []

    def always() -> None:
        lost.append(1)
        raise OperationalError("UPDATE", {}, _Cause("40001"))

    with pytest.raises(OperationalError) as raised:
        retry_conflicts(always, attempts=3)
    assert len(lost) == 3
    # What the edge answers for it: ABORTED (retry), never "the database is unavailable".
    problem = store_problem(raised.value)
    assert problem is STORE_CONFLICT and problem.code == grpc.StatusCode.ABORTED


def test_only_the_datas_refusals_fail_one_item() -> None:
    assert isinstance(refused_item(DataError("INSERT", {}, _Cause("22001"))), InvalidArgument)
    assert isinstance(refused_item(IntegrityError("INSERT", {}, _Cause("23505"))), InvalidArgument)
    assert refused_item(OperationalError("INSERT", {}, _Cause("40P01"))) is None  # a lost race
    assert refused_item(OperationalError("INSERT", {}, _Cause("08006"))) is None  # an outage
    assert refused_item(ProgrammingError("INSERT", {}, _Cause("42601"))) is None  # a bug
