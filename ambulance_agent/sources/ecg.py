"""Replay of a WFDB ECG record as the in-vehicle monitor would stream it: fixed-length blocks of ADC samples."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from fractions import Fraction
from pathlib import Path

import numpy as np

from ambulance_agent.sources.base import Clock, EcgBlock, Pacer, default_clock

__all__ = ["WfdbEcgReplay"]

logger = logging.getLogger(__name__)


class WfdbEcgReplay:
    """Streams a WFDB record's digital samples in blocks of ``chunk_s`` seconds, paced at ``pace`` x real time.

    The record is read once with ``wfdb.rdrecord(..., physical=False, return_res=16)`` (PhysioNet WFDB format;
    MIT-BIH: 360 Hz, 11-bit, 200 ADC units/mV).  Blocks carry exactly the record's samples, in order, shape
    (n_leads, round(chunk_s * fs_hz)); block ``k`` is released when its last sample would have been acquired
    (data offset ``(k + 1) * chunk_s``) and stamped ``start_at = clock() at start + k * chunk_s``.

    Saturation: a lead is flagged ``saturated`` in a block when one of its samples there is at a rail of the ADC,
    taken from the record's header (signal ``i``: ``adc_res`` bits N and ``adc_zero`` z give the codes
    z - 2**(N-1) and z + 2**(N-1) - 1; without ``adc_res``, N is the storage format's width, e.g. 12 for format
    212, 16 for format 16).  After ``resample_hz`` the flags follow time: an output sample is flagged when it falls in
    the sampling interval of a rail sample, or a rail sample falls in its own.  Samples are never altered;
    ``lead_off`` is not reported (empty) since WFDB records carry no electrode status.

    Args:
        record_path: record name without extension (``.../mitdb/100``).
        chunk_s: block length in seconds (> 0).
        start_s: offset into the record where the replay starts, seconds.
        loop: at the end of the record, continue from its beginning (the sample stream stays continuous);
            otherwise the last block may be shorter and the iteration ends.
        pace: 1.0 real time, 20.0 twenty times faster, 0 as fast as possible.
        stop_s: stop after this many seconds of data (None: the end of the record, or never when looping).
        clock: UTC clock for the data's time stamps.
        monotonic, sleep: injectable pacing primitives (tests).
        channels: lead names to keep (default every signal of the record), e.g. the 12 standard leads of a PTB
            record without its Frank leads.
        resample_hz: resample the whole record once to this rate (polyphase FIR with anti-aliasing,
            ``scipy.signal.resample_poly``; ADC units rounded back to integers), e.g. PTB's 1000 Hz to a monitor's
            500 Hz.

    Raises:
        ValueError: bad arguments, a record whose leads disagree on gain or baseline (the contract's
            EcgChunk has one of each), or samples that do not fit int16.
        FileNotFoundError: no such record.
    """

    def __init__(
        self,
        record_path: Path,
        *,
        chunk_s: float = 1.0,
        start_s: float = 0.0,
        loop: bool = True,
        pace: float = 1.0,
        stop_s: float | None = None,
        clock: Clock = default_clock,
        monotonic: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        channels: Sequence[str] = (),
        resample_hz: float | None = None,
    ) -> None:
        import wfdb  # lazy: wfdb loads pandas (~70 MB); only replays need it, never a vehicle's device sources

        kwargs: dict[str, object] = {"channel_names": list(channels)} if channels else {}
        record = wfdb.rdrecord(str(record_path), physical=False, return_res=16, **kwargs)
        if record.d_signal is None or record.fs is None:
            raise ValueError("record has no digital signal or no sampling frequency")
        if channels and len(record.sig_name) != len(channels):
            raise ValueError("some ECG channels are not in the record")
        self.fs_hz = float(record.fs)
        self.leads: tuple[str, ...] = tuple(str(n) for n in record.sig_name)
        gains = {float(g) for g in record.adc_gain}
        baselines = {int(b) for b in record.baseline}
        if len(gains) != 1 or len(baselines) != 1:
            raise ValueError("leads with different ADC gain or baseline are not supported by EcgChunk")
        self.gain_adc_per_mv = gains.pop()
        self.baseline_adc = baselines.pop()
        samples = np.asarray(record.d_signal)
        low, high = adc_rails(record)
        rails = (samples == low) | (samples == high)  # (n, n_leads)
        if resample_hz is not None and resample_hz != self.fs_hz:
            samples = _resample(samples, self.fs_hz, resample_hz)
            rails = _resample_flags(rails, self.fs_hz, resample_hz, samples.shape[0])
            self.fs_hz = float(resample_hz)
        self._rails = np.ascontiguousarray(rails.T)  # (n_leads, n), True = at a rail of the ADC
        if samples.dtype != np.int16:
            if samples.min() < -32768 or samples.max() > 32767:
                raise ValueError("record samples do not fit int16")
            samples = samples.astype(np.int16)
        self._samples = np.ascontiguousarray(samples.T)  # (n_leads, n)
        self._samples.flags.writeable = False
        if chunk_s <= 0 or start_s < 0 or (stop_s is not None and stop_s <= 0):
            raise ValueError("chunk_s and stop_s must be > 0, start_s >= 0")
        self.chunk_n = max(1, round(chunk_s * self.fs_hz))
        self.start_index = round(start_s * self.fs_hz)
        if self.start_index >= self.n_record_samples:
            raise ValueError("start_s is beyond the end of the record")
        self.loop = loop
        self.stop_n = None if stop_s is None else round(stop_s * self.fs_hz)
        self._pace = pace
        Pacer(pace)  # validate now, not at the first iteration
        self._clock = clock
        self._pacer_kwargs = {k: v for k, v in (("monotonic", monotonic), ("sleep", sleep)) if v is not None}

    @property
    def n_record_samples(self) -> int:
        """Samples per lead in the whole record."""
        return int(self._samples.shape[1])

    def record_samples(self) -> np.ndarray:
        """The whole record's digital samples, read-only int16, shape (n_leads, n)."""
        return self._samples

    def __aiter__(self) -> AsyncIterator[EcgBlock]:
        return self._blocks()

    async def _blocks(self) -> AsyncIterator[EcgBlock]:
        pacer = Pacer(self._pace, **self._pacer_kwargs)  # type: ignore[arg-type]
        anchor = self._clock()
        pacer.start()
        total = self.n_record_samples
        pos = self.start_index
        emitted_n = 0
        while True:
            n = self.chunk_n
            if self.stop_n is not None:
                n = min(n, self.stop_n - emitted_n)
            if not self.loop:
                n = min(n, total - pos)
            if n <= 0:
                return
            if pos + n <= total:
                block = self._samples[:, pos : pos + n]
                rails = self._rails[:, pos : pos + n]
            else:  # wrap around the end of the record: the stream stays continuous
                block = np.concatenate((self._samples[:, pos:], self._samples[:, : pos + n - total]), axis=1)
                block.flags.writeable = False
                rails = np.concatenate((self._rails[:, pos:], self._rails[:, : pos + n - total]), axis=1)
            await pacer.until((emitted_n + n) / self.fs_hz)
            yield EcgBlock(
                start_at=anchor + timedelta(seconds=emitted_n / self.fs_hz),
                fs_hz=self.fs_hz,
                leads=self.leads,
                gain_adc_per_mv=self.gain_adc_per_mv,
                baseline_adc=self.baseline_adc,
                samples=block,
                sample_index=pos,
                saturated=tuple(bool(v) for v in np.asarray(rails.any(axis=1))),
            )
            emitted_n += n
            if not self.loop and pos + n >= total:
                return
            pos = (pos + n) % total


_FORMAT_BITS = {"8": 8, "80": 8, "310": 10, "311": 10, "212": 12, "16": 16, "61": 16, "160": 16}


def adc_rails(record: object) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest ADC codes of each signal of a ``wfdb.Record`` (int64 arrays, one per signal).

    N-bit ADC with zero z: z - 2**(N-1) and z + 2**(N-1) - 1 (WFDB header fields ``adc_res`` and ``adc_zero``, WFDB
    "header(5)"); ``adc_res`` 0 (unspecified) falls back to the storage format's width (16 if unknown).
    """
    fmts = list(getattr(record, "fmt", None) or [])
    res = list(getattr(record, "adc_res", None) or [])
    zeros = list(getattr(record, "adc_zero", None) or [])
    n = len(getattr(record, "sig_name", None) or [])
    bits = [int(res[i]) if i < len(res) and res[i] else _FORMAT_BITS.get(str(fmts[i] if i < len(fmts) else ""), 16)
            for i in range(n)]  # fmt: skip
    zero = np.array([int(zeros[i]) if i < len(zeros) and zeros[i] is not None else 0 for i in range(n)], np.int64)
    half = np.array([1 << (min(b, 16) - 1) for b in bits], np.int64)
    return zero - half, zero + half - 1


def _resample_flags(flags: np.ndarray, fs_hz: float, target_hz: float, n_out: int) -> np.ndarray:
    """Carry per-sample flags (n, n_leads) to the resampled time base: output sample j is flagged when a flagged
    input sample i has i / fs <= j / target < (i + 1) / fs, or j / target <= i / fs < (j + 1) / target."""
    out = np.zeros((n_out, flags.shape[1]), dtype=bool)
    source = np.floor(np.arange(n_out) * (fs_hz / target_hz)).astype(np.int64)
    source = np.clip(source, 0, flags.shape[0] - 1)
    out[:] = flags[source]
    # a rail sample between two output instants (downsampling) flags the output sample before it
    hit_rows, hit_cols = np.nonzero(flags)
    if hit_rows.size:
        dest = np.clip(np.floor(hit_rows * (target_hz / fs_hz)).astype(np.int64), 0, n_out - 1)
        out[dest, hit_cols] = True
    return out


def _resample(samples: np.ndarray, fs_hz: float, target_hz: float) -> np.ndarray:
    """Polyphase resampling of (n, n_leads) ADC samples, rounded back to integer ADC units (int16 range)."""
    from scipy.signal import resample_poly  # lazy: scipy.signal costs ~70 MB of memory, only replays resample

    ratio = Fraction(target_hz / fs_hz).limit_denominator(1000)
    out = resample_poly(samples.astype(np.float64), ratio.numerator, ratio.denominator, axis=0)
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)
