"""``goldenhour bench codec``: ECG on the wire, GHE1 against the naive baseline, on the shipped MIT-BIH records.

Baseline: the same chunk as a JSON list of floats in mV (what a naive design sends).  Prints bytes per sample and
encode/decode time per 1-s chunk for each encoding, each as a ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import wfdb

from broker_config import EcgChunk, Stream, TopicSpace, decode
from broker_config.codec import EcgEncoding, encode_ecg

DATA = Path(__file__).resolve().parent / "data" / "mitdb"


def _chunks(record: str, seconds: int) -> list[EcgChunk]:
    rec = wfdb.rdrecord(str(DATA / record), physical=False, sampto=int(seconds * 360))
    now = datetime.now(UTC)
    out = []
    fs = int(rec.fs)
    for k in range(seconds):
        out.append(
            EcgChunk(
                unit_id="BENCH",
                seq=k,
                sent_at=now,
                start_at=now,
                fs_hz=rec.fs,
                leads=tuple(rec.sig_name),
                gain_adc_per_mv=rec.adc_gain[0],
                baseline_adc=rec.baseline[0],
                samples=rec.d_signal[k * fs : (k + 1) * fs].T,
            )
        )
    return out


def _json_baseline(chunk: EcgChunk) -> bytes:
    mv = (chunk.samples.astype(np.float64) - chunk.baseline_adc) / chunk.gain_adc_per_mv
    return json.dumps({"unit_id": chunk.unit_id, "seq": chunk.seq, "fs_hz": chunk.fs_hz, "mv": mv.tolist()}).encode()


def _time_per_call_us(fn: Callable[[], object], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def run(seconds: int = 120, out: Callable[[str], object] = sys.stdout.write) -> dict[str, float]:
    """Measure and print; returns the figures (bytes per sample of each encoding) for tests and docs."""
    space = TopicSpace()
    topic = space.unit("BENCH", Stream.ECG)
    figures: dict[str, float] = {}
    out(f"ECG codec on MIT-BIH records 100, 119, 201 ({seconds} s each, 2 leads, 360 Hz, 1-s chunks)\n")
    out(f"{'encoding':<22}{'bytes/sample':>14}{'ratio':>8}{'encode us':>12}{'ratio':>8}{'decode us':>12}{'ratio':>8}\n")
    chunks = [c for record in ("100", "119", "201") for c in _chunks(record, seconds)]
    samples = sum(c.samples.size for c in chunks)
    probe = chunks[len(chunks) // 2]
    base_bytes = sum(len(_json_baseline(c)) for c in chunks) / samples
    base_enc = _time_per_call_us(lambda: _json_baseline(probe), 200)
    payload = _json_baseline(probe)
    base_dec = _time_per_call_us(lambda: np.asarray(json.loads(payload)["mv"]), 200)
    rows = [("baseline JSON mV", base_bytes, base_enc, base_dec)]
    for name, enc in (("GHE1 raw int16", EcgEncoding.RAW_INT16), ("GHE1 delta-zlib", EcgEncoding.DELTA_ZLIB)):
        size = sum(len(encode_ecg(c, encoding=enc)) for c in chunks) / samples
        data = encode_ecg(probe, encoding=enc)
        enc_us = _time_per_call_us(lambda enc=enc: encode_ecg(probe, encoding=enc), 500)  # type: ignore[misc]
        dec_us = _time_per_call_us(lambda data=data: decode(space, topic, data), 500)  # type: ignore[misc]
        rows.append((name, size, enc_us, dec_us))
        figures[name] = size
    figures["baseline JSON mV"] = base_bytes
    for name, size, enc_us, dec_us in rows:
        out(
            f"{name:<22}{size:>14.3f}{size / base_bytes:>8.3f}{enc_us:>12.1f}{enc_us / base_enc:>8.3f}"
            f"{dec_us:>12.1f}{dec_us / base_dec:>8.3f}\n"
        )
    return figures
