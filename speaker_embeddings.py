"""The agent's voices and emotions, and the prosody controls applied to the audio it speaks.

Two mechanisms, each used for what it can really do:

1. Conditioning (learned). `SpeakerEmbedding` and `EmotionEmbedding` are tables of learned vectors
   that TeluguS2STransformer adds to every decoder step. They are looked up by id, or mixed by
   weights: `voice_mix("Priya", "Lakshmi", 0.3)` gives the weights (0, 0, 0.7, 0.3), and the model
   speaks with 0.7 * Priya + 0.3 * Lakshmi, an interpolated voice.

2. DSP on the decoded audio (measurable without a trained model). `ProsodyControls` holds pitch
   (semitones), energy (dB), speaking rate (factor) and Telugu accent level; `apply_prosody` applies
   them with Praat's PSOLA (the same "Change gender" transform the corpus uses to make the voices,
   make_telugu_speech.change_voice) plus a gain. Each control moves one measured quantity of
   prosody.prosody_signature: pitch the F0 median, energy the active RMS, rate the duration,
   accent level the F0 range.

   "Accent level" has an honest, narrow definition here: the depth of the intonation contour,
   i.e. the F0 excursion around the speaker's median (Praat's pitch-range factor). 0 flattens the
   melody to a monotone, 1 keeps it as generated, 2 doubles the excursion. Telugu's sentence melody
   (wide phrase-final rises and falls) is what a listener hears most as "accent" in synthetic
   speech; this control scales it. It is not a dialect converter and says nothing about
   segmental (consonant or vowel) features.

   Prosody modulation: `ProsodyControls.for_emotion("happy", strength)` turns an emotion's prosody
   signature (make_telugu_speech.EMOTION_PROSODY, the one table the corpus is rendered with) into
   controls, and `a.then(b)` composes two sets of controls, so a voice's controls, an emotion
   emphasis and a user's request combine into one PSOLA pass.

Usage:
    from speaker_embeddings import ProsodyControls, apply_prosody, voice_mix
    weights = voice_mix("Priya", "Lakshmi", 0.3)          # (4,) -> model speaker input
    wav = apply_prosody(wav, ProsodyControls(pitch_semitones=2, rate=1.1, accent_level=1.3))
    python speaker_embeddings.py                           # voices, parameter count, DSP latency
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from config import EMOTIONS, SAMPLE_RATE, VOICES, Voice, emotion_id, voice_by_name

# --------------------------------------------------------------------------------------
# Learned conditioning


class ConditionEmbedding(nn.Module):
    """One learned vector per class (voice or emotion), selected by id or mixed by weights.

    forward(x): x is a LongTensor (B,) of ids, or a FloatTensor (B, num) of non-negative weights
    summing to 1 (a mix of classes). Returns (B, dim).
    """

    def __init__(self, num: int, dim: int, what: str):
        super().__init__()
        self.num, self.what = num, what
        self.table = nn.Embedding(num, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_condition(x, self.num, self.what)
        if x.dtype.is_floating_point:
            return x.to(self.table.weight.dtype) @ self.table.weight  # (B, num) @ (num, dim)
        return self.table(x)


def check_condition(x, num: int, what: str) -> None:
    """Raise ValueError unless `x` is ids (B,) in [0, num) or mixing weights (B, num)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}_id must be a tensor, e.g. torch.tensor([0]); got {type(x).__name__}")
    if x.dtype.is_floating_point:
        if x.dim() != 2 or x.shape[1] != num:
            raise ValueError(
                f"{what} weights must have shape (batch, {num}); got {tuple(x.shape)}. "
                f"Pass ids as a LongTensor (batch,) or weights from voice_mix / one-hot"
            )
        if x.numel() and (bool((x < 0).any()) or not torch.allclose(x.sum(1), torch.ones_like(x[:, 0]), atol=1e-3)):
            raise ValueError(f"{what} weights must be non-negative and sum to 1 per row; got {x.tolist()}")
        return
    if x.dim() != 1:
        raise ValueError(f"{what}_id must have shape (batch,), e.g. torch.tensor([0]); got {tuple(x.shape)}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num):
        raise ValueError(f"{what}_id {x.tolist()} out of range: valid ids are 0..{num - 1}")


class SpeakerEmbedding(ConditionEmbedding):
    """The agent's voices (config.VOICES) as learned vectors; `voices` holds their metadata."""

    def __init__(self, num_speakers: int, dim: int):
        super().__init__(num_speakers, dim, "speaker")
        self.voices: tuple[Voice, ...] = VOICES[:num_speakers]


class EmotionEmbedding(ConditionEmbedding):
    """The nine emotions (config.EMOTIONS) as learned vectors."""

    def __init__(self, num_emotions: int, dim: int):
        super().__init__(num_emotions, dim, "emotion")
        self.emotions: tuple[str, ...] = EMOTIONS[:num_emotions]


def _voice_index(voice: int | str) -> int:
    if isinstance(voice, str):
        return voice_by_name(voice).id
    if not 0 <= int(voice) < len(VOICES):
        raise ValueError(f"voice id {voice} out of range 0..{len(VOICES) - 1}")
    return int(voice)


def voice_mix(a: int | str, b: int | str | None = None, weight: float = 0.0) -> torch.Tensor:
    """Speaker weights (num_speakers,) for (1 - weight) * voice a + weight * voice b.

    Voices by id or name ("Priya", "female_young"). Unsqueeze(0) for a batch of one.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"interpolation weight must be in [0, 1]; got {weight}")
    w = torch.zeros(len(VOICES))
    w[_voice_index(a)] += 1.0 - weight
    if b is not None:
        w[_voice_index(b)] += weight
    elif weight:
        raise ValueError("weight given without a second voice b")
    return w


def emotion_mix(a: int | str, b: int | str | None = None, weight: float = 0.0) -> torch.Tensor:
    """Emotion weights (num_emotions,) for (1 - weight) * a + weight * b (ids or names)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"interpolation weight must be in [0, 1]; got {weight}")

    def index(e):
        return emotion_id(e) if isinstance(e, str) else int(e)

    w = torch.zeros(len(EMOTIONS))
    w[index(a)] += 1.0 - weight
    if b is not None:
        w[index(b)] += weight
    return w


# --------------------------------------------------------------------------------------
# Prosody controls (DSP on decoded audio)


@dataclass(frozen=True)
class ProsodyControls:
    """What a listener can ask of the agent's delivery; identity by default.

    pitch_semitones: F0 level shift (-12..12); energy_db: gain (-20..20); rate: speaking-rate
    factor (0.5..2, >1 faster, duration divides by it); accent_level: intonation depth (0..3,
    F0 excursion factor around the median; see the module docstring).
    """

    pitch_semitones: float = 0.0
    energy_db: float = 0.0
    rate: float = 1.0
    accent_level: float = 1.0

    def __post_init__(self):
        limits = {"pitch_semitones": (-12, 12), "energy_db": (-20, 20), "rate": (0.5, 2.0), "accent_level": (0.0, 3.0)}
        for name, (lo, hi) in limits.items():
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and lo <= v <= hi):
                raise ValueError(f"ProsodyControls.{name}={v!r} outside [{lo}, {hi}]")

    @property
    def is_identity(self) -> bool:
        return self == ProsodyControls()

    def then(self, other: ProsodyControls) -> ProsodyControls:
        """Both sets of controls at once: shifts and gains add, factors multiply (clipped to range)."""
        return ProsodyControls(
            pitch_semitones=float(np.clip(self.pitch_semitones + other.pitch_semitones, -12, 12)),
            energy_db=float(np.clip(self.energy_db + other.energy_db, -20, 20)),
            rate=float(np.clip(self.rate * other.rate, 0.5, 2.0)),
            accent_level=float(np.clip(self.accent_level * other.accent_level, 0.0, 3.0)),
        )

    @classmethod
    def for_emotion(cls, emotion: str | int, strength: float = 1.0) -> ProsodyControls:
        """An emotion's prosody signature (the corpus's EMOTION_PROSODY) scaled by `strength`
        (0 = none, 1 = as rendered in the corpus), as controls to add on top of generated audio."""
        from make_telugu_speech import EMOTION_PROSODY

        name = EMOTIONS[emotion] if isinstance(emotion, int) else EMOTIONS[emotion_id(emotion)]
        e = EMOTION_PROSODY[name]
        return cls(
            pitch_semitones=e.pitch_semitones * strength,
            energy_db=e.gain_db * strength,
            rate=e.tempo**strength,
            accent_level=e.pitch_range**strength,
        )


def apply_prosody(wav: np.ndarray, controls: ProsodyControls, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Apply `controls` to mono float audio (T,) and return the new audio (length / rate).

    Pitch, rate and accent level go through one Praat PSOLA pass (pitch marks follow the voiced
    parts, so unvoiced consonants and pauses are only stretched in time); energy is a gain,
    clipped at +-1. Runs offline on a whole segment: PSOLA needs a few pitch periods of context,
    so streaming callers apply it per phrase or per reply.
    """
    from make_telugu_speech import change_voice
    from prosody import f0_track

    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"apply_prosody works at {SAMPLE_RATE} Hz; resample the audio first")
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.size == 0:
        raise ValueError("apply_prosody: empty audio")
    out = wav
    if (controls.pitch_semitones, controls.rate, controls.accent_level) != (0.0, 1.0, 1.0):
        f0 = f0_track(wav, sample_rate)
        # 0 tells Praat to keep the median (no voiced frames, or no pitch change asked).
        new_median = float(np.median(f0)) * 2 ** (controls.pitch_semitones / 12) if len(f0) else 0.0
        out = change_voice(
            wav, pitch_hz=new_median, pitch_range=controls.accent_level, formant_ratio=1.0, tempo=controls.rate
        )
    if controls.energy_db:
        out = out * np.float32(10 ** (controls.energy_db / 20))
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description="Show the voices and emotions; time the prosody DSP.")
    parser.add_argument("--dim", type=int, default=768, help="embedding size (the model's hidden_dim)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of the test signal for the DSP timing")
    args = parser.parse_args()

    speakers, emotions = SpeakerEmbedding(len(VOICES), args.dim), EmotionEmbedding(len(EMOTIONS), args.dim)
    for v in speakers.voices:
        print(f"speaker {v.id}: {v.name:8s} {v.style:20s} {v.gender:6s} {v.description}")
    print("emotions:", ", ".join(f"{i} {e}" for i, e in enumerate(emotions.emotions)))
    n = sum(p.numel() for p in speakers.parameters()) + sum(p.numel() for p in emotions.parameters())
    mix = voice_mix("Priya", "Lakshmi", 0.3)
    print(f"parameters: {n:,}; voice_mix(Priya, Lakshmi, 0.3) = {mix.tolist()} -> "
          f"embedding {tuple(speakers(mix[None]).shape)}")

    t = np.arange(int(args.seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 140 + 25 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    wav = (0.3 * sum(np.sin(k * phase) / k for k in range(1, 20))).astype(np.float32)
    controls = ProsodyControls(pitch_semitones=3, energy_db=-4, rate=1.2, accent_level=1.5)
    start = time.perf_counter()
    out = apply_prosody(wav, controls)
    ms = (time.perf_counter() - start) * 1000
    print(f"apply_prosody({controls}): {len(wav)} -> {len(out)} samples in {ms:.1f} ms "
          f"({ms / args.seconds:.1f} ms per second of audio)")


if __name__ == "__main__":
    main()
