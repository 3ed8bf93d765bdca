"""MLLP deframing without sockets: frames split anywhere, several per read, garbage and oversize (FF-08)."""

from __future__ import annotations

import pytest

from ambulance_agent.devices.mllp import MllpDecoder, MllpReason, frame

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
ACK = b"MSH|^~\\&|EDBOARD|CITYHOSP|MONITOR|AMB12|20250314093016||ACK^R01^ACK|ACK00042|P|2.6\rMSA|AA|MSG00042\r"


def test_frame_wraps_in_vt_fs_cr() -> None:
    assert frame(b"x") == b"\x0bx\x1c\r"


def test_ff08_three_writes_vt_body_end() -> None:
    decoder = MllpDecoder()
    assert decoder.feed(VT) == []
    assert decoder.in_frame
    assert decoder.feed(ACK) == []
    assert decoder.feed(FS + CR) == [ACK]
    assert not decoder.in_frame


@pytest.mark.parametrize("cut", range(len(frame(ACK)) + 1))
def test_a_frame_split_at_any_byte_is_reassembled(cut: int) -> None:
    data = frame(ACK)
    decoder = MllpDecoder()
    assert decoder.feed(data[:cut]) + decoder.feed(data[cut:]) == [ACK]


def test_split_between_fs_and_cr() -> None:
    decoder = MllpDecoder()
    assert decoder.feed(VT + ACK + FS) == []
    assert decoder.in_frame
    assert decoder.feed(CR) == [ACK]


def test_byte_by_byte() -> None:
    decoder = MllpDecoder()
    out: list[bytes] = []
    for byte in frame(ACK) + frame(b"second"):
        out += decoder.feed(bytes((byte,)))
    assert out == [ACK, b"second"]


def test_two_frames_in_one_read_and_garbage_outside_frames_discarded() -> None:
    decoder = MllpDecoder()
    data = b"noise\r\n" + frame(b"one") + b"\x00\xff" + frame(b"two") + b"tail"
    assert decoder.feed(data) == [b"one", b"two"]
    assert decoder.discarded_bytes == len(b"noise\r\n") + 2 + len(b"tail")
    assert decoder.rejects.total == 0


def test_oversized_frame_is_dropped_and_the_next_one_survives() -> None:
    decoder = MllpDecoder(max_frame_bytes=10)
    assert decoder.feed(VT + b"0123456789ABCDEF") == []
    assert not decoder.in_frame
    assert decoder.feed(b"more" + FS + CR + frame(b"ok")) == [b"ok"]
    assert decoder.rejects.count(MllpReason.FRAME_TOO_LARGE) == 1


def test_oversize_counts_across_reads() -> None:
    decoder = MllpDecoder(max_frame_bytes=10)
    for _ in range(3):
        decoder.feed(VT + b"01234" if not decoder.in_frame else b"56789")
    assert decoder.rejects.count(MllpReason.FRAME_TOO_LARGE) == 1


def test_new_start_inside_a_frame_drops_the_unterminated_one() -> None:
    decoder = MllpDecoder()
    assert decoder.feed(VT + b"cut off" + frame(b"whole")) == [b"whole"]
    assert decoder.rejects.count(MllpReason.UNTERMINATED_FRAME) == 1


def test_fs_without_cr_drops_the_frame() -> None:
    decoder = MllpDecoder()
    assert decoder.feed(VT + b"body" + FS + b"x" + frame(b"next")) == [b"next"]
    assert decoder.rejects.count(MllpReason.FS_WITHOUT_CR) == 1


def test_fs_then_vt_keeps_the_following_frame() -> None:
    decoder = MllpDecoder()
    assert decoder.feed(VT + b"body" + FS + frame(b"next")) == [b"next"]
    assert decoder.rejects.count(MllpReason.FS_WITHOUT_CR) == 1


def test_max_frame_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MllpDecoder(max_frame_bytes=0)
