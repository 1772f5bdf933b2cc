"""Prosody measurement: F0, pitch range, speaking time and energy of a speech signal.

Used wherever the repo checks that a voice or an emotion sounds as intended: the corpus report
(make_telugu_speech.py), the tests, and the evaluation of generated replies.

    sig = prosody_signature(wav)           # wav: float32 (T,) at 16 kHz
    sig.f0_median_hz, sig.f0_range_st, sig.energy_db, sig.voiced_seconds
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from config import SAMPLE_RATE

F0_FLOOR_HZ = 60.0
F0_CEILING_HZ = 500.0


def f0_track(wav: np.ndarray, sample_rate: int = SAMPLE_RATE, time_step: float = 0.01) -> np.ndarray:
    """Voiced F0 values in Hz (unvoiced frames dropped), Praat's autocorrelation pitch."""
    import parselmouth

    sound = parselmouth.Sound(np.asarray(wav, dtype=np.float64), sampling_frequency=sample_rate)
    pitch = sound.to_pitch(time_step=time_step, pitch_floor=F0_FLOOR_HZ, pitch_ceiling=F0_CEILING_HZ)
    f0 = pitch.selected_array["frequency"]
    return f0[f0 > 0]


def active_rms_db(wav: np.ndarray, sample_rate: int = SAMPLE_RATE, floor_db: float = 40.0) -> float:
    """RMS level in dBFS of the 20 ms frames within `floor_db` of the loudest frame (speech, not pauses)."""
    frame = sample_rate // 50
    n = len(wav) // frame
    if n == 0:
        return float(20 * np.log10(np.sqrt(np.mean(np.square(wav))) + 1e-9))
    frames = np.asarray(wav[: n * frame], dtype=np.float64).reshape(n, frame)
    energy = np.mean(frames**2, axis=1) + 1e-12
    energy_db = 10 * np.log10(energy)
    active = energy[energy_db > energy_db.max() - floor_db]
    return float(10 * np.log10(np.mean(active)))


@dataclass
class ProsodySignature:
    f0_median_hz: float  # NaN when nothing is voiced
    f0_range_st: float  # 10th to 90th percentile of F0, in semitones
    energy_db: float  # active-speech RMS, dBFS
    voiced_seconds: float  # time spent voiced: a speaking-time measure that ignores padding
    duration_s: float

    def as_dict(self) -> dict:
        return {k: round(float(v), 3) for k, v in asdict(self).items()}


def prosody_signature(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> ProsodySignature:
    f0 = f0_track(wav, sample_rate)
    if len(f0) >= 3:
        p10, p50, p90 = np.percentile(f0, [10, 50, 90])
        f0_median, f0_range = float(p50), float(12 * np.log2(p90 / p10))
    else:
        f0_median, f0_range = float("nan"), float("nan")
    return ProsodySignature(
        f0_median_hz=f0_median,
        f0_range_st=f0_range,
        energy_db=active_rms_db(wav, sample_rate),
        voiced_seconds=len(f0) * 0.01,
        duration_s=len(wav) / sample_rate,
    )


def semitones(f_hz: float, ref_hz: float) -> float:
    return float(12 * np.log2(f_hz / ref_hz))
