"""Provisioning without a broker: certificates, password hashes, the ACL and the CRL on disk, add and revoke."""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import shutil
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker_config import Stream, TopicSpace
from broker_config.acl import Role, generate_acl
from broker_config.provision import (
    ProvisionError,
    ProvisionResult,
    add_unit,
    hash_password,
    load,
    provision,
    renew_crl,
    revoke,
    role_for_service,
    verify_password,
)

UNITS = ["AMB1", "AMB2"]
SERVICES = ["ingest", "dispatch", "board"]


@pytest.fixture
def pki(tmp_path: Path) -> ProvisionResult:
    return provision(tmp_path / "pki", UNITS, SERVICES)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def crl(result: ProvisionResult) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(result.crl_file.read_bytes())


def passwords(result: ProvisionResult) -> dict[str, str]:
    lines = result.password_file.read_text().splitlines()
    return dict(line.split(":", 1) for line in lines)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cn(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_certificates_chain_to_the_ca_with_the_right_names_and_usages(pki: ProvisionResult) -> None:
    ca = cert(pki.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = cert(pki.server_cert)
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(pki.clients) == {*UNITS, *SERVICES}
    serials = set()
    for client_id, creds in pki.clients.items():
        leaf = cert(creds.cert_file)
        leaf.verify_directly_issued_by(ca)
        assert cn(leaf) == client_id, "the CN is the broker username (use_identity_as_username)"
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert leaf.not_valid_after_utc > datetime.now(UTC)
        serials.add(leaf.serial_number)
    assert len(serials) == len(pki.clients)


def test_roles_follow_the_service_names(pki: ProvisionResult) -> None:
    assert {c: creds.role for c, creds in pki.clients.items()} == {
        "AMB1": Role.UNIT,
        "AMB2": Role.UNIT,
        "ingest": Role.INGEST,
        "dispatch": Role.DISPATCH,
        "board": Role.BOARD,
    }


def test_secrets_are_private_and_public_material_readable(pki: ProvisionResult) -> None:
    for creds in pki.clients.values():
        assert mode(creds.key_file) == 0o600
        assert mode(creds.secret_file) == 0o600
        assert mode(creds.cert_file) == 0o644
    assert mode(pki.out_dir / "ca.key") == 0o600
    assert mode(pki.server_key) == 0o600
    assert mode(pki.password_file) == 0o600
    assert mode(pki.acl_file) == 0o644
    assert not list(pki.out_dir.rglob(".*.tmp")), "no temporary file left behind"


def test_password_file_holds_a_mosquitto_hash_for_every_account(pki: ProvisionResult) -> None:
    entries = passwords(pki)
    assert set(entries) == set(pki.clients)
    for client_id, creds in pki.clients.items():
        encoded = entries[client_id]
        assert encoded.startswith("$7$101$")
        password = creds.password()
        assert len(password) >= 40
        assert password not in pki.password_file.read_text()
        assert verify_password(password, encoded)
        assert not verify_password(password + "x", encoded)


def test_hash_format_is_mosquittos_own() -> None:
    salt = bytes(range(12))
    encoded = hash_password("secret", salt=salt)
    _, seven, iterations, salt_b64, digest_b64 = encoded.split("$")
    assert (seven, iterations, salt_b64) == ("7", "101", "AAECAwQFBgcICQoL")
    assert len(digest_b64) == 88  # 64-byte SHA-512 output, base64
    assert verify_password("secret", encoded)
    assert not verify_password("secret", "$6$abc$def")
    assert not verify_password("secret", "$7$x$y$z")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_hashes_of_mosquitto_passwd_verify_with_ours(tmp_path: Path) -> None:
    """Compatibility in the other direction; that Mosquitto accepts ours is the integration tests' job."""
    path = tmp_path / "passwd"
    subprocess.run(
        [shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-c", "-b", str(path), "u1", "pa:ss wörd"],
        check=True,
        capture_output=True,
    )
    user, encoded = path.read_text().strip().split(":", 1)
    assert user == "u1"
    assert verify_password("pa:ss wörd", encoded)
    assert not verify_password("pass word", encoded)


def test_acl_file_is_generated_from_the_roster(pki: ProvisionResult) -> None:
    roles = {"ingest": Role.INGEST, "dispatch": Role.DISPATCH, "board": Role.BOARD}
    assert pki.acl_file.read_text() == generate_acl(TopicSpace(), UNITS, roles)


def test_topic_prefix_is_kept_for_later_regeneration(tmp_path: Path) -> None:
    space = TopicSpace(prefix="test-abc/")
    provision(tmp_path / "pki", ["AMB1"], ["ingest"], space=space)
    add_unit(tmp_path / "pki", "AMB2")
    text = (tmp_path / "pki" / "acl").read_text()
    assert f"topic write {space.topic(Stream.VITALS, 'AMB2')}" in text


def test_crl_starts_empty_signed_and_valid_for_months(pki: ProvisionResult) -> None:
    ca = cert(pki.ca_cert)
    revocations = crl(pki)
    assert len(revocations) == 0
    assert revocations.issuer == ca.subject
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert revocations.is_signature_valid(public_key)
    assert revocations.next_update_utc is not None
    assert (revocations.next_update_utc - datetime.now(UTC)).days >= 300


def test_provision_refuses_to_replace_a_ca(pki: ProvisionResult) -> None:
    with pytest.raises(ProvisionError, match="already holds a CA"):
        provision(pki.out_dir, ["AMB3"], [])


@pytest.mark.parametrize(
    ("units", "services"),
    [(["AMB 1"], []), (["AMB1"], ["AMB1"]), (["AMB1"], ["printer"]), ([], {"x": Role.UNIT})],
)
def test_provision_refuses_bad_accounts(
    tmp_path: Path, units: list[str], services: list[str] | dict[str, Role]
) -> None:
    with pytest.raises(ValueError):
        provision(tmp_path / "pki", units, services)
    assert not (tmp_path / "pki").exists(), "nothing written before the input is known to be good"


def test_role_for_service() -> None:
    assert role_for_service("ingest") is Role.INGEST
    assert role_for_service("ingest-2") is Role.INGEST
    assert role_for_service("board_cityhosp") is Role.BOARD
    assert role_for_service("dispatch") is Role.DISPATCH
    for bad in ("unit", "boards", "printer", "ingestor"):
        with pytest.raises(ValueError):
            role_for_service(bad)


def test_add_unit_issues_credentials_and_grants_its_streams(pki: ProvisionResult) -> None:
    before = passwords(pki)
    creds = add_unit(pki.out_dir, "AMB3")
    assert cn(cert(creds.cert_file)) == "AMB3"
    cert(creds.cert_file).verify_directly_issued_by(cert(pki.ca_cert))
    after = passwords(pki)
    assert verify_password(creds.password(), after["AMB3"])
    assert {k: v for k, v in after.items() if k != "AMB3"} == before, "other accounts untouched"
    assert "user AMB3\n" in pki.acl_file.read_text()
    assert set(load(pki.out_dir).clients) == {*UNITS, *SERVICES, "AMB3"}
    with pytest.raises(ProvisionError, match="already provisioned"):
        add_unit(pki.out_dir, "AMB3")
    with pytest.raises(ValueError):
        add_unit(pki.out_dir, "ingest")
    with pytest.raises(ValueError):
        add_unit(pki.out_dir, "AMB/4")


def test_revoke_lists_the_certificate_and_removes_password_acl_and_keys(pki: ProvisionResult) -> None:
    target = pki.clients["AMB1"]
    serial = cert(target.cert_file).serial_number
    number_before = crl(pki).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    others = {k: v for k, v in passwords(pki).items() if k != "AMB1"}

    revoke(pki.out_dir, "AMB1")

    revocations = crl(pki)
    assert revocations.get_revoked_certificate_by_serial_number(serial) is not None
    assert revocations.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number_before + 1
    assert passwords(pki) == others
    acl = pki.acl_file.read_text()
    assert "user AMB1\n" not in acl
    assert "user AMB2\n" in acl
    assert not target.key_file.exists()
    assert not target.secret_file.exists()
    assert not target.cert_file.exists()
    assert (pki.out_dir / "revoked" / f"AMB1-{serial:x}.crt").exists(), "kept for the audit trail"
    assert "AMB1" not in load(pki.out_dir).clients
    with pytest.raises(ProvisionError, match="not provisioned"):
        revoke(pki.out_dir, "AMB1")


def test_revocations_accumulate_and_survive_renewal(pki: ProvisionResult) -> None:
    serials = [cert(pki.clients[c].cert_file).serial_number for c in ("AMB1", "board")]
    revoke(pki.out_dir, "AMB1")
    revoke(pki.out_dir, "board")
    assert "user board\n" not in pki.acl_file.read_text()
    renew_crl(pki.out_dir)
    assert sorted(entry.serial_number for entry in crl(pki)) == sorted(serials)


def test_a_revoked_unit_can_be_recommissioned_with_a_new_certificate(pki: ProvisionResult) -> None:
    old_serial = cert(pki.clients["AMB1"].cert_file).serial_number
    revoke(pki.out_dir, "AMB1")
    creds = add_unit(pki.out_dir, "AMB1")
    assert cert(creds.cert_file).serial_number != old_serial
    assert crl(pki).get_revoked_certificate_by_serial_number(old_serial) is not None


def test_operations_need_a_provisioning_directory(tmp_path: Path) -> None:
    for operation in (add_unit, revoke):
        with pytest.raises(ProvisionError, match="not a provisioning directory"):
            operation(tmp_path, "AMB1")


def _broker_group() -> grp.struct_group:
    """A group to hand the broker's files to: a real other group as root, else our own."""
    if os.geteuid() == 0:
        for name in ("nogroup", "mosquitto", "daemon"):
            with contextlib.suppress(KeyError):
                return grp.getgrnam(name)
    return grp.getgrgid(os.getgid())


def test_broker_group_owns_what_the_broker_rereads_after_dropping_root(tmp_path: Path) -> None:
    group = _broker_group()
    pki = provision(tmp_path / "pki", UNITS, SERVICES, broker_group=group.gr_name)
    add_unit(pki.out_dir, "AMB3")
    revoke(pki.out_dir, "AMB2")
    for path, wanted in [
        (pki.server_key, 0o640),
        (pki.password_file, 0o640),
        (pki.acl_file, 0o644),
        (pki.crl_file, 0o644),
        (pki.ca_cert, 0o644),
        (pki.server_cert, 0o644),
    ]:
        assert path.stat().st_gid == group.gr_gid, path.name
        assert mode(path) == wanted, path.name
    assert pki.out_dir.stat().st_gid == group.gr_gid
    assert mode(pki.out_dir / "ca.key") == 0o600, "the CA key never goes to the broker"
    assert mode(pki.clients["AMB1"].key_file) == 0o600


def test_unknown_broker_group_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="group"):
        provision(tmp_path / "pki", UNITS, SERVICES, broker_group="no-such-group-gh")
    assert not (tmp_path / "pki").exists()
