"""Accounts, refresh tokens and the audit chain on a real PostgreSQL (and SQLite): migration 0002, lockout shared by
dispatch instances, one chain under concurrent writers, tampering found by the verify endpoint."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from broker_config import BrokerSettings, TopicSpace
from broker_config.identity import Role
from dispatch.api import create_app
from dispatch.audit import AuditAction, AuditDraft, verify_chain
from dispatch.errors import AccountLockedError, InvalidCredentialsError
from dispatch.hospitals import HospitalRegistry
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService
from dispatch.sql_repository import SqlRepository

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
T0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
async def repos(pg_url: str) -> AsyncIterator[tuple[SqlRepository, SqlRepository]]:
    """Two dispatch instances on one database."""
    first, second = SqlRepository.from_url(pg_url), SqlRepository.from_url(pg_url)
    await first.open()
    await second.open()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def _draft(n: int, unit_id: str = "AMB1") -> AuditDraft:
    return AuditDraft(
        at=T0 + timedelta(seconds=n),
        actor=f"user{n % 3}",
        role="ed_staff",
        action=AuditAction.ALERT_READ,
        actor_hospital_id="MC-CCM",
        unit_id=unit_id,
        alert_id=f"A{n}",
        hospital_id="MC-CCM",
        client_addr="10.0.0.7",
    )


async def test_migration_0002_is_recorded(repos: tuple[SqlRepository, SqlRepository]) -> None:
    first, _ = repos
    assert first.applied_migrations()[:2] == [1, 2]


async def test_lockout_and_refresh_revocation_are_shared_by_dispatch_instances(
    repos: tuple[SqlRepository, SqlRepository],
) -> None:
    first, second = repos
    security = DispatchSecurity.development(clock=lambda: T0)
    a, b = security.account_service(first), security.account_service(second)
    await a.create_account("ed.a", Role.ED_STAFF, PASSWORD, hospital_id="MC-CCM")
    session = await b.login("ed.a", PASSWORD)
    assert session.claims.hospital_id == "MC-CCM"
    for service in (a, b, a, b, a):  # five failures spread over two instances
        with pytest.raises(InvalidCredentialsError):
            await service.login("ed.a", "wrong password")
    with pytest.raises(AccountLockedError):
        await b.login("ed.a", PASSWORD)
    assert session.refresh_token is not None
    await a.logout(session.refresh_token)
    stored = await second.get_refresh(hashlib.sha256(session.refresh_token.encode()).hexdigest())
    assert stored is not None
    assert stored.revoked_at is not None
    account = await second.get_account("ed.a")
    assert account is not None
    assert account.locked_until == T0 + timedelta(minutes=15)
    assert [r.username for r in await first.list_accounts()] == ["ed.a"]


async def test_concurrent_writers_extend_one_chain(repos: tuple[SqlRepository, SqlRepository]) -> None:
    first, second = repos
    await asyncio.gather(*(repo.append_audit(_draft(n)) for n in range(40) for repo in (first, second)))
    rows = await first.audit_entries()
    assert [r.seq for r in rows] == list(range(1, 81))
    report = verify_chain(rows)
    assert report.ok, report
    assert len(await second.audit_entries(unit_id="AMB1", limit=10)) == 10
    assert await second.audit_entries(unit_id="AMB2") == []
    assert [r.seq for r in await second.audit_entries(after_seq=78)] == [79, 80]


async def test_a_row_modified_in_the_database_is_reported_by_the_verify_endpoint(pg_url: str) -> None:
    repo = SqlRepository.from_url(pg_url)
    service = DispatchService(BrokerSettings(), TopicSpace("sec/"), HospitalRegistry.load(), None, repository=repo)
    await service.open()
    try:
        for n in range(6):
            await repo.append_audit(_draft(n))
        security = DispatchSecurity.development()
        app = create_app(service=service, security=security)
        qm = {"Authorization": f"Bearer {security.issue('qm', Role.QUALITY_MANAGER)}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://d", headers=qm) as http:
            assert (await http.get("/api/audit/verify")).json()["ok"] is True
            with psycopg.connect(pg_url, autocommit=True) as conn:  # an insider edits who read the record
                conn.execute("UPDATE dispatch_audit SET actor = 'nobody' WHERE seq = 4")
            verdict = (await http.get("/api/audit/verify")).json()
            assert (verdict["ok"], verdict["first_broken_seq"], verdict["checked"]) == (False, 4, 3)
            with psycopg.connect(pg_url, autocommit=True) as conn:  # ... or deletes the row altogether
                conn.execute("DELETE FROM dispatch_audit WHERE seq = 4")
            verdict = (await http.get("/api/audit/verify")).json()
            assert (verdict["ok"], verdict["first_broken_seq"]) == (False, 5)
            assert "sequence gap" in verdict["reason"]
    finally:
        await service.close()


async def test_sqlite_store_keeps_accounts_and_the_chain(tmp_path: Path) -> None:
    repo = SqlRepository.from_url(f"sqlite:///{tmp_path / 'dispatch.sqlite3'}")
    await repo.open()
    try:
        accounts = DispatchSecurity.development().account_service(repo)
        await accounts.create_account("crew1", Role.CREW, PASSWORD, unit_id="AMB1")
        assert (await accounts.login("crew1", PASSWORD)).claims.unit_id == "AMB1"
        for n in range(5):
            await repo.append_audit(_draft(n))
    finally:
        await repo.close()
    reopened = SqlRepository.from_url(f"sqlite:///{tmp_path / 'dispatch.sqlite3'}")
    await reopened.open()
    try:
        assert verify_chain(await reopened.audit_entries()).ok
        assert (await reopened.get_account("crew1")) is not None
    finally:
        await reopened.close()
