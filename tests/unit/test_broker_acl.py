"""The generated Mosquitto ACL against the contract (FF-04), and the shipped broker configurations (FF-02, FF-19)."""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

import pytest

from broker_config import STREAMS, Scope, Stream, TopicSpace
from broker_config.acl import ROLE_RIGHTS, UNIT_STREAMS, Role, generate_acl, grants_for, lint_acl
from broker_config.broker_check import (
    TEMPLATE_DIR,
    BrokerCheckError,
    broker_user,
    check_config,
    check_persistence_dir,
    log_warnings,
    override_options,
    render_config,
    template_text,
)

SPACE = TopicSpace()
UNITS = ["AMB1", "AMB2", "AMB12"]
SERVICES = {"ingest": Role.INGEST, "dispatch": Role.DISPATCH, "board": Role.BOARD}
SAMPLE_ID = "X9"


# --- a small, independent reading of Mosquitto's ACL semantics (user blocks of topic lines) ------------------


def parse_acl(text: str) -> dict[str, list[tuple[str, str]]]:
    """user -> [(access, filter)].  Lines before any user line are filed under ``""`` (anonymous)."""
    rights: dict[str, list[tuple[str, str]]] = {"": []}
    user = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword == "user":
            user = rest.strip()
            rights.setdefault(user, [])
            continue
        access, _, topic_filter = rest.partition(" ")
        rights[user].append((access, topic_filter))
    return rights


def allowed(rights: dict[str, list[tuple[str, str]]], user: str, topic: str, want: str) -> bool:
    """Would Mosquitto let ``user`` ``want`` ("read"/"write") ``topic``?  (No deny lines are generated.)"""
    return any(
        access in {want, "readwrite"} and TopicSpace.matches(topic_filter, topic)
        for access, topic_filter in rights.get(user, [])
    )


def concrete(space: TopicSpace, stream: Stream, owner: str = SAMPLE_ID) -> str:
    return space.topic(stream, owner)


@pytest.fixture
def acl_text() -> str:
    return generate_acl(SPACE, UNITS, SERVICES)


# --- the ACL and the contract never disagree -----------------------------------------------------------------


def test_every_stream_has_a_writer_and_a_reader_in_the_table() -> None:
    for stream in STREAMS:
        assert any(stream in r.writes for r in ROLE_RIGHTS.values()), f"nobody may publish {stream}"
        assert any(stream in r.reads for r in ROLE_RIGHTS.values()), f"nobody may receive {stream}"


def test_every_stream_has_a_writer_and_a_reader_in_the_generated_acl(acl_text: str) -> None:
    rights = parse_acl(acl_text)
    users = [u for u in rights if u]
    for stream in STREAMS:
        owner = UNITS[0]
        topic = concrete(SPACE, stream, owner)
        assert any(allowed(rights, u, topic, "write") for u in users), f"no writer for {stream}"
        assert any(allowed(rights, u, topic, "read") for u in users), f"no reader for {stream}"


def test_every_acl_topic_parses_in_the_grammar(acl_text: str) -> None:
    lines = [line for line in acl_text.splitlines() if line.startswith("topic ")]
    assert lines
    for line in lines:
        _, access, topic_filter = line.split(" ")
        assert access in {"read", "write", "readwrite"}
        assert "#" not in topic_filter
        parsed = SPACE.parse(topic_filter.replace("+", SAMPLE_ID))  # raises TopicError when off-grammar
        assert parsed.owner_id in {SAMPLE_ID, *UNITS}, "a filter names a provisioned unit or any owner"


def test_no_pattern_line_and_nothing_for_anonymous_clients(acl_text: str) -> None:
    for line in acl_text.splitlines():
        assert not line.startswith("pattern"), "pattern lines apply to every client (FF-04)"
    assert parse_acl(acl_text)[""] == []


def test_lint_finds_nothing_in_the_generated_acl(acl_text: str) -> None:
    assert lint_acl(acl_text, SPACE) == []


@pytest.mark.parametrize("prefix", ["", "test-1a2b/", "site/a/"])
def test_topic_prefix_reaches_every_line(prefix: str) -> None:
    space = TopicSpace(prefix=prefix)
    text = generate_acl(space, UNITS, SERVICES)
    for line in text.splitlines():
        if line.startswith("topic "):
            topic_filter = line.split(" ")[2]
            assert topic_filter.startswith(space.root + "/")
            space.parse(topic_filter.replace("+", SAMPLE_ID))
    assert lint_acl(text, space) == []


# --- the rights, as the brief states them (independent of ROLE_RIGHTS) ---------------------------------------

UNIT_WRITES = {Stream.AVAILABILITY, Stream.STATUS, Stream.VITALS, Stream.ECG, Stream.GPS, Stream.PREALERT, Stream.VIDEO}
EXPECTED: dict[Role, tuple[set[Stream], set[Stream]]] = {
    # role: (reads from any owner, writes to any owner)
    Role.INGEST: (UNIT_WRITES, {Stream.GAP, Stream.RECEIPT}),
    Role.DISPATCH: (
        {Stream.PREALERT, Stream.GPS, Stream.STATUS, Stream.AVAILABILITY, Stream.ACK},
        {Stream.ALERT, Stream.NOTICE},
    ),
    # + ACK read: every screen of a hospital shows an acknowledgement made on another (hospital_board.sources).
    Role.BOARD: (
        {
            Stream.ALERT,
            Stream.ACK,
            Stream.AVAILABILITY,
            Stream.STATUS,
            Stream.VITALS,
            Stream.ECG,
            Stream.GPS,
            Stream.GAP,
        },
        {Stream.ACK},
    ),
}


def test_unit_streams_are_the_unit_scope_of_the_contract() -> None:
    assert UNIT_STREAMS == UNIT_WRITES == {s for s, spec in STREAMS.items() if spec.scope is Scope.UNIT}


@pytest.mark.parametrize("role", [Role.INGEST, Role.DISPATCH, Role.BOARD])
def test_service_rights_match_the_brief(acl_text: str, role: Role) -> None:
    rights = parse_acl(acl_text)
    reads, writes = EXPECTED[role]
    for stream in STREAMS:
        topic = concrete(SPACE, stream)
        assert allowed(rights, role.value, topic, "read") == (stream in reads), (role, stream, "read")
        assert allowed(rights, role.value, topic, "write") == (stream in writes), (role, stream, "write")


def test_a_unit_writes_only_its_own_unit_streams_and_reads_only_its_own_notices_and_receipts(acl_text: str) -> None:
    rights = parse_acl(acl_text)
    for stream in STREAMS:
        own, other = concrete(SPACE, stream, "AMB1"), concrete(SPACE, stream, "AMB2")
        assert allowed(rights, "AMB1", own, "write") == (stream in UNIT_WRITES), stream
        assert allowed(rights, "AMB1", own, "read") == (stream in {Stream.NOTICE, Stream.RECEIPT}), stream
        assert not allowed(rights, "AMB1", other, "write"), stream
        assert not allowed(rights, "AMB1", other, "read"), stream


def test_unit_ids_that_prefix_each_other_stay_apart(acl_text: str) -> None:
    rights = parse_acl(acl_text)
    assert not allowed(rights, "AMB1", concrete(SPACE, Stream.VITALS, "AMB12"), "write")
    assert not allowed(rights, "AMB12", concrete(SPACE, Stream.VITALS, "AMB1"), "write")


def test_the_board_cannot_publish_unit_data(acl_text: str) -> None:
    rights = parse_acl(acl_text)
    for stream in UNIT_WRITES:
        assert not allowed(rights, "board", concrete(SPACE, stream, "AMB1"), "write")


def test_unknown_accounts_get_nothing(acl_text: str) -> None:
    rights = parse_acl(acl_text)
    for stream in STREAMS:
        assert not allowed(rights, "AMB99", concrete(SPACE, stream, "AMB99"), "write")
        assert not allowed(rights, "AMB99", concrete(SPACE, stream, "AMB99"), "read")


def test_grants_of_a_unit_are_exactly_its_streams() -> None:
    grants = grants_for(SPACE, Role.UNIT, "AMB1")
    assert {g.topic_filter for g in grants} == {
        SPACE.topic(s, "AMB1") for s in UNIT_WRITES | {Stream.NOTICE, Stream.RECEIPT}
    }


# --- generation rules ------------------------------------------------------------------------------------------


def test_output_is_deterministic_and_deduplicated() -> None:
    a = generate_acl(SPACE, ["AMB2", "AMB1", "AMB1"], dict(reversed(list(SERVICES.items()))))
    b = generate_acl(SPACE, ["AMB1", "AMB2"], SERVICES)
    assert a == b
    assert a.count("user AMB1\n") == 1


@pytest.mark.parametrize(
    ("units", "services"),
    [
        (["AMB 1"], {}),
        (["AMB/1"], {}),
        (["+"], {}),
        (["x" * 33], {}),
        ([], {"ingest#": Role.INGEST}),
        (["ingest"], {"ingest": Role.INGEST}),
        ([], {"rogue": Role.UNIT}),
    ],
)
def test_bad_accounts_are_refused(units: list[str], services: dict[str, Role]) -> None:
    with pytest.raises(ValueError):
        generate_acl(SPACE, units, services)


def test_a_service_may_both_read_and_write_a_stream_with_readwrite() -> None:
    text = generate_acl(SPACE, [], {"board": Role.BOARD})
    assert f"topic readwrite {SPACE.filter(Stream.ACK)}" in text


# --- the linter catches what FF-04 is about --------------------------------------------------------------------


def test_lint_flags_the_ff04_acl() -> None:
    vitals = SPACE.filter(Stream.VITALS)
    text = f"pattern read {vitals}\nuser AMB12\npattern readwrite {vitals}\n"
    problems = lint_acl(text, SPACE)
    assert sum("pattern without %u" in p for p in problems) == 2


def test_lint_accepts_a_pattern_with_substitution_and_flags_anonymous_and_off_grammar_lines() -> None:
    own = SPACE.topic(Stream.VITALS, "AMB1").replace("AMB1", "%u")
    text = "\n".join(
        [
            f"topic read {SPACE.filter(Stream.STATUS)}",
            "user board",
            f"pattern write {own}",
            f"topic read {SPACE.root}/#",
            f"topic read {SPACE.root}/unit/+/nonsense",
            f"topic read {SPACE.root}/hospital/+/vitals",
            "topic read elsewhere/x",
            "grant all",
        ]
    )
    problems = lint_acl(text, SPACE)
    assert any(p.startswith("line 1:") and "anonymous" in p for p in problems)
    assert not any(p.startswith("line 3:") for p in problems)
    for number in (4, 5, 6, 7, 8):
        assert any(p.startswith(f"line {number}:") for p in problems), number


def test_no_module_of_ours_spells_a_topic() -> None:
    root = Path(__file__).resolve().parents[2] / "broker_config"
    literal = "ems" + "/"
    for name in ("acl.py", "provision.py", "broker_check.py"):
        assert literal not in (root / name).read_text(), name
    for path in TEMPLATE_DIR.iterdir():
        assert literal not in path.read_text(), path.name


# --- the shipped configurations --------------------------------------------------------------------------------


def options(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found.setdefault(key, []).append(value.strip())
    return found


MAX_PAYLOAD = max(spec.max_payload_bytes for spec in STREAMS.values())


def test_dev_conf_is_loopback_persistent_and_sized_for_an_outage() -> None:
    conf = options(template_text("dev.conf"))
    assert conf["listener"] == ["1883 127.0.0.1"]
    assert conf["allow_anonymous"] == ["true"]
    assert conf["persistence"] == ["true"]
    assert conf["persistence_location"][0].endswith("/")
    # FF-19: the default (1000) drops QoS 1 messages; 10 units x 5 msg/s x 1 h must fit.
    assert int(conf["max_queued_messages"][0]) >= 10 * 5 * 3600
    assert MAX_PAYLOAD + 1024 <= int(conf["max_packet_size"][0]) < 2 * MAX_PAYLOAD


def test_production_template_is_locked_down() -> None:
    text = template_text("production.conf.template")
    conf = options(text)
    assert conf["allow_anonymous"] == ["false"]
    assert conf["per_listener_settings"] == ["false"]
    assert len(conf["listener"]) == 2
    assert len(conf["certfile"]) == len(conf["keyfile"]) == len(conf["cafile"]) == 2, "every listener is TLS"
    assert conf["tls_version"] == ["tlsv1.2", "tlsv1.2"]
    assert conf["require_certificate"] == ["true", "false"]
    assert conf["use_identity_as_username"] == ["true"]
    assert conf["crlfile"] == ["{pki_dir}/crl.pem"]
    assert conf["acl_file"] == ["{pki_dir}/acl"]
    assert conf["password_file"] == ["{pki_dir}/passwd"]
    assert conf["persistence"] == ["true"]
    assert conf["persistence_location"] == ["{data_dir}/"]
    # FF-19 budget: 1,000 units x 3 msg/s x 300 s; ~13 kB/s per unit x 1,000 x 300 s.
    assert int(conf["max_queued_messages"][0]) >= 1000 * 3 * 300
    assert int(conf["max_queued_bytes"][0]) >= 13_000 * 1000 * 300
    assert conf["queue_qos0_messages"] == ["false"]
    assert MAX_PAYLOAD + 1024 <= int(conf["max_packet_size"][0]) < 2 * MAX_PAYLOAD
    assert "pattern" not in conf


def test_render_fills_the_given_placeholders_only() -> None:
    text = template_text("production.conf.template")
    rendered = render_config(
        text, password_port=8884, bind_address="0.0.0.0", pki_dir="/etc/gh", data_dir="/var/lib/gh", user="mosquitto"
    )
    assert "{port}" in rendered
    assert "{" not in rendered.replace("{port}", "")
    assert "password_file /etc/gh/passwd" in rendered
    with pytest.raises(KeyError):
        render_config(text, pki_dri="/etc/gh")


def test_override_options_replaces_appends_and_drops() -> None:
    text = "listener 1883 127.0.0.1\n# listener comment\nmax_queued_messages 5\n"
    out = override_options(text, listener="{port} 127.0.0.1", user="root", max_queued_messages=None)
    assert out.splitlines() == ["listener {port} 127.0.0.1", "# listener comment", "user root"]


# --- start-up checks -------------------------------------------------------------------------------------------


def test_persistence_dir_missing_or_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BrokerCheckError, match="does not exist"):
        check_persistence_dir(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BrokerCheckError, match="not a directory"):
        check_persistence_dir(tmp_path / "file")
    check_persistence_dir(tmp_path)
    check_persistence_dir(tmp_path, user=getpass.getuser())


def test_persistence_dir_not_writable_for_the_broker_user_is_refused(tmp_path: Path) -> None:
    """FF-02's pitfall: root starts Mosquitto, which drops to an account that cannot write the directory."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    with pytest.raises(BrokerCheckError, match="nobody"):
        check_persistence_dir(data, user="nobody")


def test_persistence_dir_writable_for_another_user_passes() -> None:
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="gh-check-"))
    try:
        base.chmod(0o777)
        check_persistence_dir(base, user="nobody")
        base.chmod(0o755)
        if getpass.getuser() != "nobody":
            with pytest.raises(BrokerCheckError, match="not writable"):
                check_persistence_dir(base, user="nobody")
    finally:
        base.rmdir()


def test_broker_user_follows_mosquittos_privilege_drop() -> None:
    if os.geteuid() == 0:
        assert broker_user("svc") == "svc"
        assert broker_user(None) in {"mosquitto", "nobody"}
    else:
        assert broker_user("svc") == getpass.getuser()


def _dev_conf(tmp_path: Path, **overrides: str | None) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    text = override_options(
        template_text("dev.conf"), persistence_location=f"{data}/", user=getpass.getuser(), **overrides
    )
    path = tmp_path / "mosquitto.conf"
    path.write_text(text)
    return path


def test_check_config_passes_the_dev_conf(tmp_path: Path) -> None:
    check_config(_dev_conf(tmp_path))


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"pattern read {SPACE.filter(Stream.VITALS)}\n")
    path = _dev_conf(
        tmp_path,
        max_queued_messages=None,
        persistence="false",
        listener="1883 0.0.0.0",
        acl_file=str(acl),
        password_file=str(tmp_path / "missing"),
    )
    with pytest.raises(BrokerCheckError) as caught:
        check_config(path)
    text = " | ".join(caught.value.problems)
    for needle in ("FF-02", "FF-19", "loopback", "pattern without %u", "password_file"):
        assert needle in text


def test_log_warnings_picks_warnings_and_errors() -> None:
    log = (
        "1: mosquitto version 2.0.11 starting\n"
        "2: Warning: ACL pattern 'a/#' does not contain '%c' or '%u'.\n"
        "3: Warning: Mosquitto should not be run as root/administrator.\n"
        "4: Error: Address already in use\n"
    )
    assert len(log_warnings(log)) == 3
    assert log_warnings(log, ignore={"run as root": "tests run as root"}) == [log.splitlines()[1], log.splitlines()[3]]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root starts Mosquitto under another account")
def test_check_config_finds_files_the_broker_account_cannot_reread(tmp_path: Path) -> None:
    from broker_config.provision import provision

    pki = provision(tmp_path / "pki", ["AMB1"], ["ingest"])
    data = tmp_path / "data"
    data.mkdir()
    text = render_config(
        template_text("production.conf.template"),
        password_port=8884,
        bind_address="127.0.0.1",
        pki_dir=pki.out_dir,
        data_dir=data,
        user="nobody",
    ).replace("{port}", "8883")
    path = tmp_path / "mosquitto.conf"
    path.write_text(text)
    with pytest.raises(BrokerCheckError) as caught:
        check_config(path)
    problems = " | ".join(caught.value.problems)
    for option in ("password_file", "acl_file", "crlfile", "keyfile"):
        assert f"{option} {pki.out_dir}" in problems
    assert "nobody" in problems


def test_broker_check_help_is_help_not_a_file_name(capsys: pytest.CaptureFixture[str]) -> None:
    from broker_config import broker_check

    with pytest.raises(SystemExit) as exit_info:
        broker_check.main(["--help"])
    assert exit_info.value.code == 0
    assert "Mosquitto configuration" in capsys.readouterr().out
