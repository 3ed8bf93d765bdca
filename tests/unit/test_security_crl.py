"""The broker's CRL stays valid: a check that warns before nextUpdate and fails after, and renewal from the command
line (``goldenhour broker check-crl`` / ``renew-crl``), keeping every revocation."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from broker_config.provision import (
    CRL_VALIDITY,
    ProvisionError,
    ProvisionResult,
    check_crl,
    provision,
    renew_crl,
    revoke,
)
from simulators.cli import main


@pytest.fixture
def pki(tmp_path: Path) -> ProvisionResult:
    return provision(tmp_path / "pki", ["AMB1", "AMB2"], ["ingest"])


def crl_number(path: Path) -> int:
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


def test_the_check_warns_before_next_update_and_fails_after(
    pki: ProvisionResult, caplog: pytest.LogCaptureFixture
) -> None:
    fresh = check_crl(pki.out_dir)
    assert fresh.state == "ok"
    assert timedelta(days=360) < fresh.remaining <= CRL_VALIDITY
    with caplog.at_level(logging.WARNING, logger="broker_config.provision"):
        due = check_crl(pki.crl_file, now=fresh.next_update - timedelta(days=10))
        assert due.state == "renew"
        assert "renew-crl" in caplog.text
        caplog.clear()
        expired = check_crl(pki.crl_file, now=fresh.next_update + timedelta(seconds=1))
        assert expired.state == "expired"
        assert expired.remaining < timedelta(0)
        assert any(r.levelno == logging.ERROR and "refuses every client" in r.message for r in caplog.records)


def test_renewal_keeps_the_revocations_and_moves_next_update(pki: ProvisionResult) -> None:
    revoke(pki.out_dir, "AMB1")
    before = x509.load_pem_x509_crl(pki.crl_file.read_bytes())
    number = crl_number(pki.crl_file)
    renew_crl(pki.out_dir)
    after = x509.load_pem_x509_crl(pki.crl_file.read_bytes())
    assert [e.serial_number for e in after] == [e.serial_number for e in before]
    assert len(after) == 1
    assert crl_number(pki.crl_file) == number + 1
    assert after.next_update_utc is not None
    assert before.next_update_utc is not None
    assert after.next_update_utc >= before.next_update_utc
    public_key = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()).public_key()
    assert after.is_signature_valid(public_key)  # type: ignore[arg-type]


def test_a_missing_or_foreign_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="cannot be read"):
        check_crl(tmp_path / "nothing.pem")
    (tmp_path / "crl.pem").write_text("not a CRL")
    with pytest.raises(ProvisionError, match="cannot be read"):
        check_crl(tmp_path)


def run(*argv: str) -> int:
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    return int(stop.value.code or 0)


def test_the_commands_check_and_renew(pki: ProvisionResult, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(pki.out_dir)
    assert run("broker", "check-crl", "--out", out) == 0
    assert "CRL ok" in capsys.readouterr().out
    assert run("broker", "check-crl", "--out", out, "--warn-days", "400") == 1, "a monitor sees the renewal due"
    number = crl_number(pki.crl_file)
    assert run("broker", "renew-crl", "--out", out, "--if-due") == 0
    assert "not due" in capsys.readouterr().out
    assert crl_number(pki.crl_file) == number
    assert run("broker", "renew-crl", "--out", out) == 0
    assert "CRL renewed" in capsys.readouterr().out
    assert crl_number(pki.crl_file) == number + 1
