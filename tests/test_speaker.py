"""Speaker system: voice and emotion embeddings (ids, mixes, interpolation) and the four prosody
controls, each measured on the audio it produces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from config import SAMPLE_RATE, VOICES
from prosody import prosody_signature
from speaker_embeddings import EmotionEmbedding, ProsodyControls, SpeakerEmbedding, apply_prosody, emotion_mix, voice_mix


@pytest.fixture(scope="module")
def voiced():
    """2.5 s of a vowel-like voice: harmonics of an F0 gliding 110..150 Hz, syllable-rate loudness
    changes, a pause in the middle (PSOLA must keep pauses unvoiced)."""
    t = np.arange(int(2.5 * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 130 + 20 * np.sin(2 * np.pi * 1.2 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    wav = sum(np.sin(k * phase) / k for k in range(1, 25)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2)
    wav[int(1.2 * SAMPLE_RATE) : int(1.4 * SAMPLE_RATE)] = 0.0
    wav = 0.2 * wav / np.abs(wav).max()
    return wav.astype(np.float32), prosody_signature(wav.astype(np.float32))


def semitones(a, b):
    return 12 * np.log2(a / b)


def test_identity_controls_leave_audio_unchanged(voiced):
    wav, _ = voiced
    assert np.array_equal(apply_prosody(wav, ProsodyControls()), wav)


def test_pitch_control_moves_the_median_f0(voiced):
    wav, base = voiced
    for st in (4.0, -3.0):
        out = prosody_signature(apply_prosody(wav, ProsodyControls(pitch_semitones=st)))
        assert semitones(out.f0_median_hz, base.f0_median_hz) == pytest.approx(st, abs=0.5)
        assert out.duration_s == pytest.approx(base.duration_s, rel=0.02)


def test_energy_control_changes_the_level_only(voiced):
    wav, base = voiced
    out = prosody_signature(apply_prosody(wav, ProsodyControls(energy_db=-6.0)))
    assert out.energy_db - base.energy_db == pytest.approx(-6.0, abs=0.2)
    assert semitones(out.f0_median_hz, base.f0_median_hz) == pytest.approx(0, abs=0.3)


def test_rate_control_changes_the_duration(voiced):
    wav, base = voiced
    out = prosody_signature(apply_prosody(wav, ProsodyControls(rate=1.25)))
    assert out.duration_s == pytest.approx(base.duration_s / 1.25, rel=0.03)
    assert semitones(out.f0_median_hz, base.f0_median_hz) == pytest.approx(0, abs=0.5)
    slow = prosody_signature(apply_prosody(wav, ProsodyControls(rate=0.8)))
    assert slow.duration_s == pytest.approx(base.duration_s / 0.8, rel=0.03)


def test_accent_level_scales_the_intonation_range(voiced):
    wav, base = voiced
    wide = prosody_signature(apply_prosody(wav, ProsodyControls(accent_level=2.0)))
    flat = prosody_signature(apply_prosody(wav, ProsodyControls(accent_level=0.0)))
    assert 1.6 < wide.f0_range_st / base.f0_range_st < 2.4
    assert flat.f0_range_st < 0.3 * base.f0_range_st
    for out in (wide, flat):  # the level stays where it was
        assert semitones(out.f0_median_hz, base.f0_median_hz) == pytest.approx(0, abs=1.0)


def test_emotion_prosody_and_composition(voiced):
    wav, base = voiced
    sad = ProsodyControls.for_emotion("sad")
    out = prosody_signature(apply_prosody(wav, sad))
    assert out.f0_median_hz < base.f0_median_hz and out.energy_db < base.energy_db - 3
    assert out.duration_s > base.duration_s * 1.1 and out.f0_range_st < base.f0_range_st
    assert ProsodyControls.for_emotion("happy", 0.0).is_identity
    both = ProsodyControls(pitch_semitones=2, rate=1.2).then(ProsodyControls(pitch_semitones=1, rate=1.5, energy_db=3))
    assert (both.pitch_semitones, both.energy_db, both.accent_level) == (3, 3, 1.0)
    assert both.rate == pytest.approx(1.8)
    with pytest.raises(ValueError, match="rate"):
        ProsodyControls(rate=3.0)
    with pytest.raises(ValueError, match="pitch_semitones"):
        ProsodyControls(pitch_semitones=float("nan"))


def test_voice_embeddings_mix_and_interpolate():
    torch.manual_seed(0)
    speakers, emotions = SpeakerEmbedding(4, 16), EmotionEmbedding(9, 16)
    assert [v.name for v in speakers.voices] == [v.name for v in VOICES]
    table = speakers.table.weight
    w = voice_mix("Priya", "Lakshmi", 0.3)
    assert w.tolist() == pytest.approx([0, 0, 0.7, 0.3])
    assert torch.allclose(speakers(w[None]), 0.7 * table[2] + 0.3 * table[3], atol=1e-6)
    assert torch.allclose(speakers(voice_mix("female_young")[None]), speakers(torch.tensor([2])))
    assert torch.allclose(emotions(emotion_mix("happy", "sad", 1.0)[None]), emotions(torch.tensor([2])))
    with pytest.raises(ValueError, match="unknown voice"):
        voice_mix("Sita")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        voice_mix(0, 1, 1.5)
    with pytest.raises(ValueError, match="out of range"):
        speakers(torch.tensor([4]))
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        speakers(torch.ones(1, 3) / 3)
