"""Render the Telugu text corpora in data/ to a synthetic speech corpus for every later phase.

No Telugu recordings can be downloaded here, so the repo makes its own from Debian's two offline
Telugu synthesizers: festival (festvox-te-nsk, one male voice) and espeak-ng (`te`). A formant
shift and Praat's PSOLA (change_voice: what "Change gender" does, in steps that never hang) turn
festival's voice into the agent's four voices and nine emotions; espeak-ng variants and
transformed festival voices, with noise, reverberation, EQ and level augmentation, make sixteen
user voices, so that no later model ties itself to one voice.

Usage:
    python make_telugu_speech.py                          # full corpus into <workspace>/telugu_synth
    python make_telugu_speech.py --limit 10 --output_dir /tmp/tiny   # a quick subset
    python make_telugu_speech.py --check                  # validate texts and tools only

Output (under --output_dir):
    wavs/{train,val,test}/{user,agent}/*.wav    16 kHz mono PCM16
    manifests/{train,val,test}.jsonl            one row per utterance (format: audio_io.py)
    metadata/{train,validation,test}_pairs.json S2S pairs, multi-turn sequences included
    corpus_stats.json                           hours, counts, F0 per voice, emotion signatures,
                                                voice similarity, wall time

Splits: the test split holds unseen question paraphrases (each intent's last question) spoken by
unseen user voices; val holds the second-to-last paraphrase and two other unseen voices; every
rendering belongs to exactly one split (agent answers are rendered separately per split, with
a small per-split prosody jitter, so no file or waveform is shared).

The run is deterministic for a given --seed and resumable: finished WAVs are kept and skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import yaml

from audio_io import PAIRS_FILES, SPLITS, audio_duration, load_audio, save_audio, write_json, write_manifest
from config import DATA_DIR, EMOTIONS, SAMPLE_RATE, VOICES, add_workspace_arg, voice_by_name, workspace_from_args

DIALOGS_PATH = DATA_DIR / "dialogs_te.yaml"
SENTENCES_PATH = DATA_DIR / "sentences_te.txt"


class ToolMissingError(RuntimeError):
    """A system synthesizer is not installed; the message names the package to install."""


# --------------------------------------------------------------------------------------
# Text


TELUGU_BLOCK = (0x0C00, 0x0C7F)
PUNCTUATION = set(".,?!")
# Characters festival or espeak read wrongly or not at all, and what to say instead.
SPOKEN_SYMBOLS = {"%": " శాతం", "।": ".", "॥": ".", ";": ",", ":": ",", "-": " ", "–": " ", "—": " "}


def is_telugu_char(ch: str) -> bool:
    return TELUGU_BLOCK[0] <= ord(ch) <= TELUGU_BLOCK[1]


def invalid_chars(text: str) -> list[str]:
    """Characters outside Telugu script, space and . , ? ! (what the corpora may contain)."""
    return sorted({ch for ch in text if not (is_telugu_char(ch) or ch == " " or ch in PUNCTUATION)})


def normalize_for_tts(text: str) -> str:
    """Make arbitrary Telugu text safe to synthesize.

    festival silently drops Latin letters and emoji and reads `%` wrongly, so: symbols with a
    spoken form are replaced (% -> శాతం), quotes, brackets and emoji are removed, digits are kept
    (both synthesizers read them as Telugu numbers), and Latin letters raise: they would vanish
    from the audio without a trace.
    """
    text = unicodedata.normalize("NFC", text)
    latin = [ch for ch in text if ch.isascii() and ch.isalpha()]
    if latin:
        raise ValueError(
            f"Latin letters in {text!r}: festival drops them silently. "
            "Write the words in Telugu script (e.g. బస్సు, not bus)."
        )
    out = []
    for ch in text:
        if ch in SPOKEN_SYMBOLS:
            out.append(SPOKEN_SYMBOLS[ch])
        elif is_telugu_char(ch) or ch in PUNCTUATION or ch.isdigit():
            out.append(ch)
        elif ch.isspace():
            out.append(" ")
        # anything else (quotes, brackets, emoji, symbols) has no spoken form: dropped
    text = " ".join("".join(out).split())
    if not any(is_telugu_char(ch) or ch.isdigit() for ch in text):
        raise ValueError("nothing speakable left after normalisation; give Telugu text")
    return text


@dataclass
class Intent:
    id: str
    category: str
    topic: str
    questions: list[str]
    answer: str


@dataclass
class ContextIntent:
    id: str
    context: str  # "repeat_previous_answer" | "recall_previous_question"
    questions: list[str]
    answer_without_context: str
    answer_template: str | None = None  # recall: "మీరు {topic} గురించి అడిగారు."


@dataclass
class Dialogs:
    intents: list[Intent]
    context_intents: list[ContextIntent]

    def context(self, kind: str) -> ContextIntent:
        return next(c for c in self.context_intents if c.context == kind)


CONTEXT_KINDS = ("repeat_previous_answer", "recall_previous_question")


def _check_text(text, where: str, errors: list[str], ends: str) -> None:
    if not isinstance(text, str) or not text.strip():
        errors.append(f"{where}: empty or not a string")
        return
    bad = invalid_chars(text.replace("{topic}", ""))
    if bad:
        errors.append(f"{where}: characters outside Telugu script and . , ? ! : {bad} in {text!r}")
    if text != " ".join(text.split()):
        errors.append(f"{where}: extra whitespace in {text!r}")
    if text[-1] not in ends:
        errors.append(f"{where}: must end with one of {ends!r}: {text!r}")


def load_dialogs(path: str | os.PathLike = DIALOGS_PATH) -> Dialogs:
    """Parse and validate dialogs_te.yaml; every problem is reported at once with its location."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; it is part of the repo (git checkout data/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict) or not raw.get("intents"):
        raise ValueError(f"{path}: expected a mapping with an `intents:` list")
    errors: list[str] = []
    intents, contexts = [], []
    seen_ids, seen_questions = set(), {}
    for i, item in enumerate(raw.get("intents") or []):
        where = f"{path.name}: intents[{i}] ({item.get('id', '?')})"
        missing = [k for k in ("id", "category", "topic", "questions", "answer") if k not in item]
        if missing:
            errors.append(f"{where}: missing {missing}")
            continue
        intents.append(Intent(item["id"], item["category"], item["topic"], list(item["questions"]), item["answer"]))
    for i, item in enumerate(raw.get("context_intents") or []):
        where = f"{path.name}: context_intents[{i}] ({item.get('id', '?')})"
        if item.get("context") not in CONTEXT_KINDS:
            errors.append(f"{where}: context must be one of {CONTEXT_KINDS}")
            continue
        contexts.append(
            ContextIntent(item["id"], item["context"], list(item.get("questions") or []),
                          item.get("answer_without_context", ""), item.get("answer_template"))
        )
    for it in intents + contexts:
        where = f"{path.name}: {it.id}"
        if it.id in seen_ids:
            errors.append(f"{where}: duplicate id")
        seen_ids.add(it.id)
        if len(it.questions) < 4:
            errors.append(f"{where}: {len(it.questions)} questions, at least 4 needed")
        for q in it.questions:
            _check_text(q, f"{where} question", errors, "?.")
            if q in seen_questions:
                errors.append(f"{where}: question {q!r} also in {seen_questions[q]}")
            seen_questions[q] = it.id
    for it in intents:
        _check_text(it.answer, f"{path.name}: {it.id} answer", errors, ".!?")
        _check_text(it.topic, f"{path.name}: {it.id} topic", errors, "".join(chr(c) for c in range(0x0C00, 0x0C80)))
    for c in contexts:
        _check_text(c.answer_without_context, f"{path.name}: {c.id} answer_without_context", errors, ".!")
        if c.context == "recall_previous_question":
            if not c.answer_template or "{topic}" not in c.answer_template:
                errors.append(f"{path.name}: {c.id}: answer_template with {{topic}} needed")
            else:
                _check_text(c.answer_template, f"{path.name}: {c.id} answer_template", errors, ".!")
    kinds = {c.context for c in contexts}
    for kind in CONTEXT_KINDS:
        if kind not in kinds:
            errors.append(f"{path.name}: no context intent with context: {kind}")
    if errors:
        raise ValueError(f"{len(errors)} problem(s) in {path}:\n  " + "\n  ".join(errors))
    return Dialogs(intents, contexts)


def load_sentences(path: str | os.PathLike = SENTENCES_PATH) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; it is part of the repo (git checkout data/)")
    lines = [unicodedata.normalize("NFC", l.strip()) for l in path.read_text(encoding="utf-8").splitlines()]
    lines = [l for l in lines if l]
    errors: list[str] = []
    for n, line in enumerate(lines, 1):
        _check_text(line, f"{path.name}:{n}", errors, ".?!")
    dupes = [l for l, c in Counter(lines).items() if c > 1]
    if dupes:
        errors.append(f"{path.name}: {len(dupes)} duplicated sentence(s), e.g. {dupes[0]!r}")
    if errors:
        raise ValueError(f"{len(errors)} problem(s) in {path}:\n  " + "\n  ".join(errors[:50]))
    return lines


# --------------------------------------------------------------------------------------
# Synthesizers

FESTIVAL_SETUP = """(voice_telugu_NSK_diphone)
(Parameter.set 'Int_Method 'General)
(Parameter.set 'Int_Target_Method Int_Targets_General)
(set! int_general_params (list (list 'targ_func telugu_NSK_targ_func1)))
"""


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissingError(
            f"`{name}` not found: install it with `apt-get install -y {package}` "
            "(or run `bash run.sh setup`, which installs every system package the repo needs)"
        )
    return path


def festival_batch(texts: list[str]) -> list[np.ndarray]:
    """Synthesize each text with festival's Telugu NSK voice in one festival process.

    Returns float32 (T,) arrays at 16 kHz, in order. Raises ToolMissingError when festival or
    the Telugu voice is missing, RuntimeError naming the text when one cannot be rendered.
    """
    festival = require_tool("festival", "festival festvox-te-nsk")
    with tempfile.TemporaryDirectory(prefix="festival_") as tmp:
        lines = [FESTIVAL_SETUP]
        for i, text in enumerate(texts):
            quoted = text.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'(utt.save.wave (SynthText "{quoted}") "{tmp}/{i}.wav" \'riff)')
        script = Path(tmp) / "batch.scm"
        script.write_text("\n".join(lines) + "\n", encoding="utf-8")
        proc = subprocess.run([festival, "-b", str(script)], capture_output=True, text=True, timeout=600)
        if "voice_telugu_NSK_diphone" in proc.stderr and "unbound" in proc.stderr:
            raise ToolMissingError(
                "festival's Telugu voice is missing: `apt-get install -y festvox-te-nsk`"
            )
        out = []
        for i, text in enumerate(texts):
            wav_path = Path(tmp) / f"{i}.wav"
            if not wav_path.is_file() or wav_path.stat().st_size <= 44:
                raise RuntimeError(f"festival rendered nothing for {text!r}: {proc.stderr.strip()[-300:]}")
            import soundfile as sf

            wav, sr = sf.read(str(wav_path), dtype="float32")
            out.append(_resample(wav, sr))
    return out


def espeak(text: str, variant: str, pitch: int, speed: int) -> np.ndarray:
    """espeak-ng's Telugu voice with a voice variant (e.g. "m3", "f2"), pitch 0-99, words/min."""
    exe = require_tool("espeak-ng", "espeak-ng")
    with tempfile.TemporaryDirectory(prefix="espeak_") as tmp:
        wav_path = Path(tmp) / "out.wav"
        proc = subprocess.run(
            [exe, "-v", f"te+{variant}", "-p", str(pitch), "-s", str(speed), "-w", str(wav_path), text],
            capture_output=True, text=True, timeout=60,
        )
        if proc.returncode != 0 or not wav_path.is_file():
            raise RuntimeError(f"espeak-ng failed for {text!r}: {proc.stderr.strip()}")
        import soundfile as sf

        wav, sr = sf.read(str(wav_path), dtype="float32")
    return _resample(wav, sr)


def _resample(wav: np.ndarray, sr: int) -> np.ndarray:
    if wav.ndim > 1:
        wav = wav.mean(axis=1)
    if sr != SAMPLE_RATE:
        import soxr

        wav = soxr.resample(wav, sr, SAMPLE_RATE)
    return np.asarray(wav, dtype=np.float32)


# --------------------------------------------------------------------------------------
# Voice and emotion transforms


PSOLA_F0_LIMITS_HZ = (60.0, 480.0)


def change_voice(
    wav: np.ndarray, pitch_hz: float, pitch_range: float, formant_ratio: float, tempo: float
) -> np.ndarray:
    """Move formants, F0 level, F0 range and tempo (>1 faster) of a speech signal.

    What Praat's "Change gender" does, done in steps we control: (1) scale every frequency by
    `formant_ratio` by resampling (a shorter vocal tract); (2) PSOLA with an explicit pitch tier,
    f0' = pitch_hz * (f0 / median)^pitch_range (range scaled in the log domain, clamped to
    PSOLA_F0_LIMITS_HZ) and a duration tier that undoes step 1's speed-up and applies `tempo`.
    Change gender itself hangs on some inputs (its internal pitch analysis fed PSOLA values it
    loops on), so it is not used. `pitch_hz` <= 0 keeps the source's median F0.
    """
    import parselmouth
    from parselmouth.praat import call, run

    src = np.asarray(wav, dtype=np.float64)
    if formant_ratio != 1.0:
        import soxr

        # Samples played at rate*ratio sound ratio times higher; resample them back to 16 kHz.
        src = soxr.resample(src, SAMPLE_RATE * formant_ratio, SAMPLE_RATE)
    sound = parselmouth.Sound(src, sampling_frequency=SAMPLE_RATE)
    run("random_initializeWithSeedUnsafelyButPredictably (1)")  # bit-identical reruns
    manipulation = call(sound, "To Manipulation", 0.01, 60, 600)
    pitch_tier = call(manipulation, "Extract pitch tier")
    n_points = call(pitch_tier, "Get number of points")
    if n_points > 0:
        median = float(np.median([call(pitch_tier, "Get value at index", i + 1) for i in range(n_points)]))
        target = pitch_hz if pitch_hz > 0 else median
        lo, hi = PSOLA_F0_LIMITS_HZ
        call(pitch_tier, "Formula", f"min({hi}, max({lo}, {target} * (self / {median}) ^ {pitch_range}))")
        call([manipulation, pitch_tier], "Replace pitch tier")
    duration_tier = call("Create DurationTier", "tempo", 0, sound.duration)
    call(duration_tier, "Add point", 0, formant_ratio / tempo)
    call([manipulation, duration_tier], "Replace duration tier")
    out = call(manipulation, "Get resynthesis (overlap-add)")
    return np.asarray(out.values[0], dtype=np.float32)


def shelf(wav: np.ndarray, freq: float, gain_db: float, high: bool) -> np.ndarray:
    """RBJ-cookbook shelving filter (slope 1): tilts the spectrum above (high) or below `freq`."""
    if abs(gain_db) < 1e-3:
        return wav
    from scipy.signal import lfilter

    a_gain = 10 ** (gain_db / 40)
    w0 = 2 * math.pi * freq / SAMPLE_RATE
    alpha = math.sin(w0) / 2 * math.sqrt(2)
    cos_w0, sq = math.cos(w0), 2 * math.sqrt(a_gain) * alpha
    s = 1 if high else -1
    b = [
        a_gain * ((a_gain + 1) + s * (a_gain - 1) * cos_w0 + sq),
        -s * 2 * a_gain * ((a_gain - 1) + s * (a_gain + 1) * cos_w0),
        a_gain * ((a_gain + 1) + s * (a_gain - 1) * cos_w0 - sq),
    ]
    a = [
        (a_gain + 1) - s * (a_gain - 1) * cos_w0 + sq,
        s * 2 * ((a_gain - 1) - s * (a_gain + 1) * cos_w0),
        (a_gain + 1) - s * (a_gain - 1) * cos_w0 - sq,
    ]
    return lfilter(np.array(b) / a[0], np.array(a) / a[0], wav).astype(np.float32)


def set_level(wav: np.ndarray, level_dbfs: float) -> np.ndarray:
    """Scale so the active-speech RMS is `level_dbfs`; never clip (peak kept under 0.99)."""
    from prosody import active_rms_db

    gain = 10 ** ((level_dbfs - active_rms_db(wav)) / 20)
    peak = np.abs(wav).max() * gain
    if peak > 0.99:
        gain *= 0.99 / peak
    return (wav * gain).astype(np.float32)


def trim_silence(wav: np.ndarray, pad_s: float = 0.06, floor_db: float = 45.0) -> np.ndarray:
    """Cut leading and trailing silence (below loudest 10 ms frame - floor_db), keep `pad_s`."""
    hop = SAMPLE_RATE // 100
    n = len(wav) // hop
    if n < 3:
        return wav
    e = 10 * np.log10(np.mean(wav[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12)
    active = np.where(e > e.max() - floor_db)[0]
    pad = int(pad_s * SAMPLE_RATE)
    start = max(0, active[0] * hop - pad)
    end = min(len(wav), (active[-1] + 1) * hop + pad)
    return wav[start:end]


@dataclass(frozen=True)
class VoiceRecipe:
    """How one voice is made from a synthesizer: source, F0 median and range, formants, tempo, EQ."""

    source: str  # "festival" or "espeak:<variant>:<pitch>:<speed>"
    pitch_hz: float  # target median F0; 0 keeps the source's
    pitch_range: float = 1.0
    formant_ratio: float = 1.0
    tempo: float = 1.0
    bass_db: float = 0.0  # low shelf at 250 Hz
    treble_db: float = 0.0  # high shelf at 3 kHz
    level_dbfs: float = -26.0  # leaves room for the loudest emotion (+6 dB) and augmentation


# The agent's four voices, all from festival's NSK voice so they share its clarity, pushed apart in
# F0, formants (vocal-tract length), tempo and spectral tilt. Females need formant ratios over 1.1
# or they sound like a pitched-up man; Priya and Lakshmi differ in every dimension, because two
# derived female voices otherwise stay close for a speaker encoder (FACTS.md: cosine 0.90-0.93).
# festival reads Telugu slowly (about 11 characters/s, 1.5 words/s), so every agent voice is
# also AGENT_TEMPO faster: answers then take 1 to 4 s, as a voice agent's turn should.
AGENT_TEMPO = 1.25
AGENT_VOICES: dict[str, VoiceRecipe] = {
    "Arjun": VoiceRecipe("festival", pitch_hz=150, pitch_range=1.15, formant_ratio=1.05, tempo=AGENT_TEMPO * 1.08, treble_db=2),
    "Ravi": VoiceRecipe("festival", pitch_hz=98, pitch_range=0.8, formant_ratio=0.9, tempo=AGENT_TEMPO * 0.9, bass_db=3, treble_db=-4),
    "Priya": VoiceRecipe("festival", pitch_hz=250, pitch_range=1.3, formant_ratio=1.24, tempo=AGENT_TEMPO * 1.1, treble_db=4),
    "Lakshmi": VoiceRecipe("festival", pitch_hz=182, pitch_range=0.8, formant_ratio=1.12, tempo=AGENT_TEMPO * 0.9, bass_db=2, treble_db=-3),
}


@dataclass(frozen=True)
class EmotionProsody:
    """An emotion as a prosody transform relative to the voice's neutral speech."""

    pitch_semitones: float  # F0 level shift
    pitch_range: float  # F0 range factor
    tempo: float  # speaking-rate factor (>1 faster)
    gain_db: float  # energy
    treble_db: float = 0.0  # vocal effort brightens the spectrum


# Chosen so that every pair differs clearly in at least one of level, range, rate or energy
# (tests/test_make_telugu_speech.py checks the measured signatures, corpus_stats.json reports them).
EMOTION_PROSODY: dict[str, EmotionProsody] = {
    "neutral": EmotionProsody(0.0, 1.0, 1.0, 0.0),
    "happy": EmotionProsody(2.0, 1.35, 1.08, 2.0, 1.0),
    "sad": EmotionProsody(-3.0, 0.55, 0.82, -6.0, -3.0),
    "angry": EmotionProsody(1.0, 1.25, 1.15, 6.0, 4.0),
    "excited": EmotionProsody(4.0, 1.5, 1.2, 3.5, 2.0),
    "calm": EmotionProsody(-1.5, 0.65, 0.9, -3.0, -1.0),
    "surprised": EmotionProsody(5.0, 1.8, 0.96, 1.0, 1.0),
    "fearful": EmotionProsody(3.0, 0.6, 1.12, -3.5, -1.0),
    "empathetic": EmotionProsody(-1.0, 1.15, 0.84, -1.5, -1.0),
}
assert tuple(EMOTION_PROSODY) == EMOTIONS, "EMOTION_PROSODY must follow config.EMOTIONS"


@dataclass(frozen=True)
class UserVoice:
    recipe: VoiceRecipe
    split: str  # the only split this voice speaks in ("train", "val" or "test")


# Sixteen user voices: eight espeak-ng variants and eight transformed festival voices. Five are held
# out (val 2, test 3) so evaluation hears voices the models never trained on.
USER_VOICES: dict[str, UserVoice] = {
    "esp_m1": UserVoice(VoiceRecipe("espeak:m1:45:150", 0, level_dbfs=-22), "train"),
    "esp_m2": UserVoice(VoiceRecipe("espeak:m2:35:140", 0, formant_ratio=0.95), "train"),
    "esp_m3": UserVoice(VoiceRecipe("espeak:m3:55:165", 0), "train"),
    "esp_m5": UserVoice(VoiceRecipe("espeak:m5:30:135", 0, level_dbfs=-30), "train"),
    "esp_f1": UserVoice(VoiceRecipe("espeak:f1:60:150", 0), "train"),
    "esp_f2": UserVoice(VoiceRecipe("espeak:f2:70:160", 0, treble_db=-2), "train"),
    "esp_m7": UserVoice(VoiceRecipe("espeak:m7:50:145", 0), "val"),
    "esp_f4": UserVoice(VoiceRecipe("espeak:f4:75:155", 0), "test"),
    "fest_man": UserVoice(VoiceRecipe("festival", 125, 1.1, 0.98, 1.05), "train"),
    "fest_oldman": UserVoice(VoiceRecipe("festival", 92, 0.7, 0.88, 0.85, bass_db=2), "train"),
    "fest_woman": UserVoice(VoiceRecipe("festival", 205, 1.2, 1.16, 1.0), "train"),
    "fest_girl": UserVoice(VoiceRecipe("festival", 285, 1.3, 1.28, 1.12, treble_db=3), "train"),
    "fest_boy": UserVoice(VoiceRecipe("festival", 240, 1.25, 1.2, 1.15), "train"),
    "fest_youngman": UserVoice(VoiceRecipe("festival", 140, 1.4, 1.08, 1.2), "val"),
    "fest_lady": UserVoice(VoiceRecipe("festival", 175, 0.9, 1.1, 0.92, bass_db=1), "test"),
    "fest_deepman": UserVoice(VoiceRecipe("festival", 85, 0.9, 0.84, 1.0, treble_db=-3), "test"),
}


def apply_recipe(base: np.ndarray, recipe: VoiceRecipe, emotion: EmotionProsody | None = None,
                 jitter: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Turn a source rendering into a voice (and emotion). `jitter` = (semitones, tempo factor)."""
    emotion = emotion or EMOTION_PROSODY["neutral"]
    semis = emotion.pitch_semitones + jitter[0]
    if recipe.pitch_hz > 0:
        pitch_hz = recipe.pitch_hz * 2 ** (semis / 12)
    else:  # keep the source's own F0 level (espeak voices), shifted by the emotion
        from prosody import f0_track

        f0 = f0_track(base)
        pitch_hz = float(np.median(f0)) * 2 ** (semis / 12) if len(f0) else 0.0
    wav = change_voice(
        base,
        pitch_hz=pitch_hz,
        pitch_range=recipe.pitch_range * emotion.pitch_range,
        formant_ratio=recipe.formant_ratio,
        tempo=recipe.tempo * emotion.tempo * jitter[1],
    )
    wav = shelf(wav, 250, recipe.bass_db, high=False)
    wav = shelf(wav, 3000, recipe.treble_db + emotion.treble_db, high=True)
    return set_level(trim_silence(wav), recipe.level_dbfs + emotion.gain_db)


# --------------------------------------------------------------------------------------
# Augmentation (user speech only: the agent's voice is clean by design)


def augmentation_params(seed: int) -> dict:
    """Random room, microphone, noise and level, as a user's phone or laptop would give.

    Drawn from `seed` alone, so a resumed run can record them for files it does not re-render.
    """
    rng = np.random.default_rng(seed)
    params: dict = {}
    if rng.random() < 0.5:
        params["rt60_s"] = round(float(rng.uniform(0.15, 0.7)), 3)
        params["direct_gain"] = round(float(rng.uniform(1.6, 5.0)), 2)  # near-field: direct path dominates
    params["eq_db"] = [round(float(rng.uniform(-6, 6)), 1), round(float(rng.uniform(-8, 4)), 1)]  # bass, treble
    if rng.random() < 0.75:
        params["noise"] = str(rng.choice(["white", "pink", "brown", "hum"]))
        params["snr_db"] = round(float(rng.uniform(5, 35)), 1)
    params["level_dbfs"] = round(float(rng.uniform(-34, -14)), 1)
    return params


def augment(wav: np.ndarray, params: dict, seed: int) -> np.ndarray:
    """Apply `augmentation_params`; `seed` draws the room response and noise samples."""
    from prosody import active_rms_db

    rng = np.random.default_rng(seed + 1)
    if "rt60_s" in params:  # reverberation: exponentially decaying noise as a room response
        from scipy.signal import fftconvolve

        rt60 = params["rt60_s"]
        t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
        rir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)
        rir[0] = params["direct_gain"]
        rir /= np.sqrt(np.sum(rir**2))
        wav = fftconvolve(wav, rir)[: len(wav)].astype(np.float32)
    bass, treble = params["eq_db"]
    wav = shelf(shelf(wav, 200, bass, high=False), 3500, treble, high=True)
    if "noise" in params:
        noise = _noise(params["noise"], len(wav), rng)
        noise_db = 10 * np.log10(np.mean(noise**2) + 1e-12)
        wav = wav + noise * 10 ** ((active_rms_db(wav) - params["snr_db"] - noise_db) / 20)
    return set_level(wav.astype(np.float32), params["level_dbfs"])


def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "hum":  # mains hum with harmonics, plus a little hiss
        t = np.arange(n) / SAMPLE_RATE
        f = float(rng.choice([50.0, 60.0]))
        hum = sum(np.sin(2 * np.pi * f * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 6))
        return (hum + 0.05 * rng.standard_normal(n)).astype(np.float32)
    white = rng.standard_normal(n)
    if kind == "white":
        return white.astype(np.float32)
    spectrum = np.fft.rfft(white)
    freqs = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
    spectrum /= np.sqrt(freqs) if kind == "pink" else freqs
    return np.fft.irfft(spectrum, n).astype(np.float32)


# --------------------------------------------------------------------------------------
# Public one-shot API (tests, sample questions for the page)


def synthesize_agent(text: str, voice: str, emotion: str = "neutral") -> np.ndarray:
    """One utterance in an agent voice ("Arjun", "Ravi", "Priya", "Lakshmi") and emotion; (T,) float32."""
    name = voice_by_name(voice).name
    if emotion not in EMOTION_PROSODY:
        raise ValueError(f"unknown emotion {emotion!r}; choose one of: {', '.join(EMOTIONS)}")
    base = festival_batch([normalize_for_tts(text)])[0]
    return apply_recipe(base, AGENT_VOICES[name], EMOTION_PROSODY[emotion])


def synthesize_user(text: str, user_voice: str, seed: int = 0, augment_audio: bool = False) -> np.ndarray:
    """One utterance in a user voice (a key of USER_VOICES); (T,) float32."""
    if user_voice not in USER_VOICES:
        raise ValueError(f"unknown user voice {user_voice!r}; choose one of: {', '.join(USER_VOICES)}")
    recipe = USER_VOICES[user_voice].recipe
    text = normalize_for_tts(text)
    base = festival_batch([text])[0] if recipe.source == "festival" else _espeak_source(text, recipe)
    wav = apply_recipe(base, recipe)
    if augment_audio:
        wav = augment(wav, augmentation_params(seed), seed)
    return wav


def _espeak_source(text: str, recipe: VoiceRecipe) -> np.ndarray:
    _, variant, pitch, speed = recipe.source.split(":")
    return espeak(text, variant, int(pitch), int(speed))


# --------------------------------------------------------------------------------------
# The corpus plan: every utterance to render, decided up front in one process, so the result is
# the same whatever the number of workers and whatever was already rendered.


@dataclass
class Job:
    path: str  # relative to the output dir
    text: str
    voice: str
    emotion: str
    role: str  # "user" | "agent"
    split: str
    intent_id: str | None
    kind: str  # question | answer | recall | fallback | sentence
    seed: int
    augment: bool = False
    jitter: tuple[float, float] = (0.0, 1.0)

    @property
    def source(self) -> str:
        recipe = AGENT_VOICES[self.voice] if self.role == "agent" else USER_VOICES[self.voice].recipe
        return recipe.source


@dataclass
class Plan:
    jobs: dict[str, Job] = field(default_factory=dict)  # by path
    pairs: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})

    def add(self, job: Job) -> Job:
        if job.path in self.jobs:
            existing = self.jobs[job.path]
            if existing != job:
                raise AssertionError(f"two different renderings planned at {job.path}")
            return existing
        self.jobs[job.path] = job
        return job


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")


def question_split(index: int, n_questions: int) -> str:
    """Last paraphrase -> test, second to last -> val, the rest -> train."""
    if index == n_questions - 1:
        return "test"
    if index == n_questions - 2:
        return "val"
    return "train"


def plan_corpus(dialogs: Dialogs, sentences: list[str], seed: int = 1234,
                user_renders_per_question: int = 4, conversations_per_intent: int = 2) -> Plan:
    rng = np.random.default_rng(seed)
    plan = Plan()
    voices_by_split = {s: [n for n, v in USER_VOICES.items() if v.split == s] for s in SPLITS}
    agent_names = [v.name for v in VOICES]

    def user_job(intent_id: str, q_index: int, text: str, voice: str, split: str) -> Job:
        return plan.add(Job(f"wavs/{split}/user/q_{intent_id}_{q_index}_{voice}.wav", text, voice, "neutral",
                            "user", split, intent_id, "question", _seed(seed, intent_id, q_index, voice), True))

    def agent_job(kind: str, key: str, text: str, voice: str, emotion: str, split: str, intent_id: str) -> Job:
        s = _seed(seed, kind, key, voice, emotion, split)
        jitter = (0.0, 1.0) if split == "train" else (float(np.random.default_rng(s).uniform(-0.4, 0.4)),
                                                      float(np.random.default_rng(s + 1).uniform(0.97, 1.03)))
        return plan.add(Job(f"wavs/{split}/agent/{kind}_{key}_{voice}_{emotion}.wav", text, voice, emotion,
                            "agent", split, intent_id, kind, s, False, jitter))

    def questions_of(intent) -> dict[str, list[Job]]:
        """User renderings of an intent's questions, by split."""
        out = defaultdict(list)
        for qi, q in enumerate(intent.questions):
            split = question_split(qi, len(intent.questions))
            pool = voices_by_split[split]
            chosen = pool if split != "train" else list(
                rng.choice(pool, size=min(user_renders_per_question, len(pool)), replace=False))
            out[split] += [user_job(intent.id, qi, q, str(v), split) for v in chosen]
        return out

    def pair(user: Job, target: Job, conversation: str, turn: int, history: list[dict]) -> dict:
        return {
            "input_path": user.path, "target_path": target.path,
            "speaker_id": voice_by_name(target.voice).id, "emotion_id": EMOTIONS.index(target.emotion),
            "input_text": user.text, "target_text": target.text, "intent_id": user.intent_id,
            "voice": target.voice, "emotion": target.emotion, "user_voice": user.voice,
            "conversation_id": conversation, "turn_index": turn, "history": history,
        }

    # Ordinary intents: every answer in every voice; all nine emotions in train, neutral plus one
    # rotating emotion per voice in val/test (enough for references, a third of the audio).
    questions: dict[str, dict[str, list[Job]]] = {}
    answers: dict[tuple[str, str], dict[tuple[str, str], Job]] = {}  # (split, intent) -> (voice, emotion) -> job
    for n, intent in enumerate(dialogs.intents):
        questions[intent.id] = questions_of(intent)
        for split in SPLITS:
            combos = {}
            for vi, voice in enumerate(agent_names):
                emotions = EMOTIONS if split == "train" else ("neutral", EMOTIONS[1 + (n + vi) % 8])
                for emo in emotions:
                    combos[(voice, emo)] = agent_job("answer", intent.id, intent.answer, voice, emo, split, intent.id)
            answers[(split, intent.id)] = combos
            users = questions[intent.id][split]
            targets = list(combos.values())
            n_pairs = max(len(targets), 2 * len(users))
            u_order, t_order = rng.permutation(len(users)), rng.permutation(len(targets))
            for k in range(n_pairs):
                plan.pairs[split].append(pair(users[u_order[k % len(users)]], targets[t_order[k % len(targets)]],
                                              f"{split}_{intent.id}_{k}", 0, []))

    # Context intents: multi-turn conversations whose last answer depends on earlier turns.
    repeat = dialogs.context("repeat_previous_answer")
    recall = dialogs.context("recall_previous_question")
    ctx_questions = {c.id: questions_of(c) for c in (repeat, recall)}
    for split in SPLITS:
        conv_emotions = ("neutral", "happy", "calm") if split == "train" else ("neutral",)
        per_intent = conversations_per_intent if split == "train" else 1
        for c in (repeat, recall):  # no earlier turn: the agent says so
            for user in ctx_questions[c.id][split]:
                voice = agent_names[_seed(seed, user.path) % 4]
                target = agent_job("fallback", c.id, c.answer_without_context, voice, "neutral", split, c.id)
                plan.pairs[split].append(pair(user, target, f"{split}_{c.id}_alone_{user.voice}", 0, []))
        for intent in dialogs.intents:
            for k in range(per_intent):
                for c in (repeat, recall):
                    voice = agent_names[int(rng.integers(4))]
                    emo = str(rng.choice(conv_emotions))
                    conv_id = f"{split}_{c.id}_{intent.id}_{k}"
                    # 0-3 unrelated turns first, then the intent the context question refers to
                    n_before = int(rng.integers(0, 4))
                    others = [dialogs.intents[int(i)] for i in rng.choice(len(dialogs.intents), n_before)]
                    history: list[dict] = []
                    for turn, it in enumerate(others + [intent]):
                        user = questions[it.id][split][int(rng.integers(len(questions[it.id][split])))]
                        target = answers[(split, it.id)].get((voice, emo)) or answers[(split, it.id)][(voice, "neutral")]
                        plan.pairs[split].append(pair(user, target, conv_id, turn, list(history)))
                        history.append({"input_path": user.path, "target_path": target.path, "input_text": user.text,
                                        "target_text": target.text, "intent_id": it.id})
                    last_answer = answers[(split, intent.id)].get((voice, emo)) or answers[(split, intent.id)][(voice, "neutral")]
                    if c is repeat:
                        target = last_answer
                    else:
                        text = recall.answer_template.format(topic=intent.topic)
                        target = agent_job("recall", intent.id, text, voice, last_answer.emotion, split, c.id)
                    user = ctx_questions[c.id][split][int(rng.integers(len(ctx_questions[c.id][split])))]
                    plan.pairs[split].append(pair(user, target, conv_id, len(history), history))

    # General sentences for the codec: each once in an agent voice and once in a user voice.
    for i, text in enumerate(sentences):
        h = _seed(seed, "sentence", i)
        split = "test" if h % 20 == 0 else "val" if h % 20 == 1 else "train"
        voice, emo = agent_names[h % 4], EMOTIONS[(h // 4) % 9]
        agent_job("sentence", f"{i:04d}", text, voice, emo, split, None)
        pool = voices_by_split[split]
        uv = pool[(h // 64) % len(pool)]
        plan.add(Job(f"wavs/{split}/user/sentence_{i:04d}_{uv}.wav", text, uv, "neutral", "user", split,
                     None, "sentence", h, True))
    return plan


# --------------------------------------------------------------------------------------
# Rendering


def render_group(args: tuple[str, list[Job]]) -> tuple[list[dict], list[str]]:
    """Render jobs that share source texts: synthesize each text once, transform per job.

    Runs in a worker. Returns manifest rows and, for jobs that failed, messages naming them; one
    bad utterance never costs the rest of the batch.
    """
    out_dir, jobs = args
    out_dir = Path(out_dir)
    rows, failures = [], []
    todo = {j.path for j in jobs if not (out_dir / j.path).is_file()}
    bases: dict[tuple[str, str], np.ndarray] = {}
    fest_texts = sorted({j.text for j in jobs if j.path in todo and j.source == "festival"})
    if fest_texts:
        bases.update({("festival", t): w for t, w in zip(fest_texts, festival_batch(fest_texts))})
    for job in jobs:
        path = out_dir / job.path
        extra = {"augment": augmentation_params(job.seed)} if job.augment else {}
        try:
            if job.path in todo:
                wav = render_job(job, bases, extra.get("augment"))
                save_audio(path, wav)
                duration = len(wav) / SAMPLE_RATE
            else:
                duration = audio_duration(path)
        except Exception as e:  # noqa: BLE001 - reported with the job, the batch goes on
            failures.append(f"{job.path} ({job.text!r}): {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        rows.append({
            "path": job.path, "text": job.text, "voice": job.voice, "emotion": job.emotion, "role": job.role,
            "intent_id": job.intent_id, "duration": round(duration, 3), "split": job.split, "kind": job.kind,
            **extra,
        })
    return rows, failures


def render_job(job: Job, bases: dict[tuple[str, str], np.ndarray], augment_params: dict | None) -> np.ndarray:
    key = (job.source, job.text)
    if key not in bases:  # espeak voices: one process per text and variant
        bases[key] = _espeak_source(job.text, USER_VOICES[job.voice].recipe)
    if job.role == "agent":
        return apply_recipe(bases[key], AGENT_VOICES[job.voice], EMOTION_PROSODY[job.emotion], job.jitter)
    wav = apply_recipe(bases[key], USER_VOICES[job.voice].recipe)
    return augment(wav, augment_params, job.seed) if augment_params else wav


def group_jobs(jobs: list[Job], texts_per_group: int = 24) -> list[list[Job]]:
    """Batch jobs so each festival process renders many texts (its start-up costs ~0.3 s)."""
    by_text: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        by_text[job.text].append(job)
    texts = sorted(by_text)
    return [[j for t in texts[i:i + texts_per_group] for j in by_text[t]] for i in range(0, len(texts), texts_per_group)]


def render(plan: Plan, out_dir: Path, workers: int, group_timeout_s: float = 600.0) -> tuple[list[dict], list[str]]:
    """Render every job of the plan in `workers` processes.

    A group that runs past `group_timeout_s` (a synthesizer stuck in native code cannot be
    interrupted) fails with a message; its pool is killed and the groups still pending run in a
    fresh one. Finished files are skipped, so re-running a group is always safe.
    """
    from multiprocessing import TimeoutError as PoolTimeout

    from tqdm import tqdm

    pending = group_jobs(list(plan.jobs.values()))
    rows: list[dict] = []
    failures: list[str] = []
    with tqdm(total=len(plan.jobs), desc="render", unit="utt") as bar:
        while pending:
            pool = Pool(workers)
            results = [(g, pool.apply_async(render_group, ((str(out_dir), g),))) for g in pending]
            pending = []
            for i, (group, result) in enumerate(results):
                try:
                    group_rows, group_failures = result.get(timeout=group_timeout_s)
                except PoolTimeout:
                    failures += [f"{j.path} ({j.text!r}): timed out after {group_timeout_s:.0f} s" for j in group]
                    bar.update(len(group))
                    pending = [g for g, _ in results[i + 1:]]  # rerun in a fresh pool
                    pool.terminate()
                    break
                rows += group_rows
                failures += group_failures
                bar.update(len(group_rows) + len(group_failures))
            else:
                pool.close()
            pool.join()
    rows.sort(key=lambda r: r["path"])
    return rows, failures


# --------------------------------------------------------------------------------------
# Measurement


def measure_corpus(rows: list[dict], out_dir: Path, max_per_cell: int = 12) -> dict:
    """What the README reports: hours and counts, voice F0, emotion signatures, voice similarity."""
    from prosody import prosody_signature, semitones

    stats: dict = {"splits": {}}
    for split in SPLITS:
        for role in ("user", "agent"):
            sel = [r for r in rows if r["split"] == split and r["role"] == role]
            stats["splits"][f"{split}/{role}"] = {
                "utterances": len(sel), "hours": round(sum(r["duration"] for r in sel) / 3600, 3)}
    stats["total_hours"] = round(sum(r["duration"] for r in rows) / 3600, 3)
    for kind in ("question", "answer"):
        durations = [r["duration"] for r in rows if r["kind"] == kind]
        stats[f"{kind}_seconds_p10_p50_p90"] = [round(float(x), 2) for x in np.percentile(durations, [10, 50, 90])]

    # Signatures of train answers: same texts in every voice and emotion, so differences are prosody.
    answers = [r for r in rows if r["split"] == "train" and r["kind"] == "answer"]
    intents = sorted({r["intent_id"] for r in answers})[:max_per_cell]
    sig = {}
    for r in answers:
        if r["intent_id"] in intents:
            sig[(r["intent_id"], r["voice"], r["emotion"])] = prosody_signature(load_audio(out_dir / r["path"]))
    stats["voice_median_f0_hz"] = {
        v.name: round(float(np.median([s.f0_median_hz for (i, vv, e), s in sig.items() if vv == v.name and e == "neutral"])), 1)
        for v in VOICES}
    emo_table = {}
    for emo in EMOTIONS:
        d_pitch, ranges, rates, d_energy = [], [], [], []
        for (i, v, e), s in sig.items():
            if e != emo:
                continue
            ref = sig[(i, v, "neutral")]
            d_pitch.append(semitones(s.f0_median_hz, ref.f0_median_hz))
            ranges.append(s.f0_range_st)
            rates.append(ref.duration_s / s.duration_s)  # same text, both trimmed: the tempo ratio
            d_energy.append(s.energy_db - ref.energy_db)
        emo_table[emo] = {"pitch_shift_st": round(float(np.median(d_pitch)), 2),
                          "f0_range_st": round(float(np.median(ranges)), 2),
                          "rate_vs_neutral": round(float(np.median(rates)), 3),
                          "energy_vs_neutral_db": round(float(np.median(d_energy)), 2)}
    stats["emotion_signatures"] = emo_table
    stats["voice_similarity"] = voice_similarity(rows, out_dir)
    return stats


def voice_similarity(rows: list[dict], out_dir: Path, per_voice: int = 16) -> dict:
    """Resemblyzer cosine similarity between the four agent voices' centroids (neutral test answers),
    and how often an utterance's nearest centroid is its own voice."""
    from resemblyzer import VoiceEncoder

    encoder = VoiceEncoder("cpu", verbose=False)
    embeds = {}
    for v in VOICES:
        sel = [r for r in rows if r["role"] == "agent" and r["voice"] == v.name and r["emotion"] == "neutral"
               and r["split"] == "test"][:per_voice]
        embeds[v.name] = np.stack([encoder.embed_utterance(load_audio(out_dir / r["path"])) for r in sel])
    # Leave-one-out nearest centroid: each utterance against centroids built without it.
    centroids = {n: e.mean(0) / np.linalg.norm(e.mean(0)) for n, e in embeds.items()}
    correct = total = 0
    for name, e in embeds.items():
        for k in range(len(e)):
            own = np.delete(e, k, axis=0).mean(0)
            cands = {n: (own / np.linalg.norm(own) if n == name else c) for n, c in centroids.items()}
            best = max(cands, key=lambda n: float(e[k] @ cands[n]))
            correct += best == name
            total += 1
    names = list(centroids)
    matrix = {a: {b: round(float(centroids[a] @ centroids[b]), 3) for b in names} for a in names}
    return {"centroid_cosine": matrix, "nearest_centroid_accuracy": round(correct / max(total, 1), 3),
            "utterances_per_voice": per_voice}


# --------------------------------------------------------------------------------------


def check_tools() -> None:
    require_tool("festival", "festival festvox-te-nsk")
    require_tool("espeak-ng", "espeak-ng")
    festival_batch(["నమస్కారం."])  # proves the Telugu voice works, not only the binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workspace_arg(parser)
    parser.add_argument("--output_dir", default=None, help="corpus folder (default: <workspace>/telugu_synth)")
    parser.add_argument("--dialogs", default=str(DIALOGS_PATH), help="dialog intents YAML")
    parser.add_argument("--sentences", default=str(SENTENCES_PATH), help="general sentences, one per line")
    parser.add_argument("--limit", type=int, default=None,
                        help="quick subset: the first N intents and 4N sentences")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel render processes")
    parser.add_argument("--seed", type=int, default=1234, help="seed for every random choice")
    parser.add_argument("--user_renders_per_question", type=int, default=4,
                        help="train user voices that speak each training question")
    parser.add_argument("--conversations_per_intent", type=int, default=2,
                        help="multi-turn context conversations per intent and context kind (train)")
    parser.add_argument("--no_report", action="store_true", help="skip the measurements in corpus_stats.json")
    parser.add_argument("--check", action="store_true", help="only validate the texts and the synthesizers")
    args = parser.parse_args(argv)

    t0 = time.time()
    try:
        dialogs = load_dialogs(args.dialogs)
        sentences = load_sentences(args.sentences)
        check_tools()
    except (ValueError, FileNotFoundError, ToolMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        dialogs = Dialogs(dialogs.intents[: args.limit], dialogs.context_intents)
        sentences = sentences[: 4 * args.limit]
    print(f"{len(dialogs.intents)} intents, {len(dialogs.context_intents)} context intents, "
          f"{len(sentences)} sentences")
    if args.check:
        print("texts and synthesizers OK")
        return 0

    out_dir = Path(args.output_dir) if args.output_dir else workspace_from_args(args).synth_corpus
    plan = plan_corpus(dialogs, sentences, args.seed, args.user_renders_per_question, args.conversations_per_intent)
    print(f"{len(plan.jobs)} utterances to render into {out_dir} with {args.workers} workers")
    rows, failures = render(plan, out_dir, args.workers)
    if failures:
        print(f"error: {len(failures)} utterance(s) could not be rendered; the other "
              f"{len(rows)} are kept, so a rerun after fixing the text renders only these:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    for split in SPLITS:
        write_manifest(out_dir / "manifests" / f"{split}.jsonl", [r for r in rows if r["split"] == split])
        write_json(out_dir / "metadata" / PAIRS_FILES[split], plan.pairs[split], indent=None)
    render_s = time.time() - t0
    stats = {"intents": len(dialogs.intents), "sentences": len(sentences), "seed": args.seed,
             "render_wall_s": round(render_s, 1), "workers": args.workers, "cpu_count": os.cpu_count(),
             "pairs": {s: len(p) for s, p in plan.pairs.items()},
             "multi_turn_pairs": {s: sum(1 for p in ps if p["history"]) for s, ps in plan.pairs.items()}}
    if not args.no_report:
        stats.update(measure_corpus(rows, out_dir))
        stats["report_wall_s"] = round(time.time() - t0 - render_s, 1)
    write_json(out_dir / "corpus_stats.json", stats)
    print(yaml.safe_dump(stats, allow_unicode=True, sort_keys=False))
    print(f"done in {time.time() - t0:.0f} s: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
