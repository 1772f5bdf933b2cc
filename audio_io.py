"""Reading and writing audio, manifests and files safely.

Every script reads audio through `load_audio`, so a missing file, a corrupt WAV, a wrong sample
rate, stereo, silence-only or NaN audio all fail the same way: an `AudioError` whose message
says what was wrong and how to fix it. Every file a script produces is written through
`atomic_write`, so a killed run never leaves a half-written WAV, manifest or checkpoint behind.

Manifest format (JSONL, one utterance per line), shared by the synthetic corpus
(make_telugu_speech.py) and the real-data pipeline (prepare_speaker_data.py):
    {"path": "wavs/train/agent/....wav",   # relative to the manifest's dataset root
     "text": "...", "voice": "Priya", "emotion": "happy", "role": "agent" | "user",
     "intent_id": "greet_hello" | null, "duration": 2.31, "split": "train" | "val" | "test"}
Extra keys are allowed and kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

from config import SAMPLE_RATE

MANIFEST_KEYS = ("path", "text", "voice", "emotion", "role", "intent_id", "duration", "split")
SPLITS = ("train", "val", "test")
# S2S pairs per split, in <dataset root>/metadata/ (the file names of the mission's Phase 4)
PAIRS_FILES = {"train": "train_pairs.json", "val": "validation_pairs.json", "test": "test_pairs.json"}


class AudioError(ValueError):
    """Audio that cannot be used as it is; the message says how to fix it."""


# --------------------------------------------------------------------------------------
# Atomic files


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temp file keeps `path`'s suffix (or `suffix`) so libraries that pick a format from the
    extension (soundfile, torch) still work. A crash inside the block removes the temp file and
    leaves any previous `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=(suffix if suffix is not None else path.suffix) + ".tmp",
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete or regenerate it") from e


# --------------------------------------------------------------------------------------
# Audio


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = SAMPLE_RATE,
    *,
    resample: bool = False,
    mix_to_mono: bool = False,
    min_seconds: float = 0.0,
) -> np.ndarray:
    """Read a mono audio file as float32 in [-1, 1], shape (T,).

    Raises AudioError when the file is missing, cannot be decoded, has another sample rate
    (unless `resample`), has several channels (unless `mix_to_mono`), is shorter than
    `min_seconds`, or holds NaN/inf samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: file not found; check the path or regenerate the data")
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for truncated or foreign files
        raise AudioError(
            f"{path}: cannot decode audio ({e}); re-encode it with "
            f"`ffmpeg -i {path.name} -ar {sample_rate} -ac 1 fixed.wav` or delete it"
        ) from e
    if wav.shape[1] > 1:
        if not mix_to_mono:
            raise AudioError(
                f"{path}: {wav.shape[1]} channels, expected mono; convert with "
                f"`ffmpeg -i {path.name} -ac 1 -ar {sample_rate} mono.wav`"
            )
    wav = wav.mean(axis=1)
    if sr != sample_rate:
        if not resample:
            raise AudioError(
                f"{path}: sample rate {sr} Hz, expected {sample_rate} Hz; resample with "
                f"`ffmpeg -i {path.name} -ar {sample_rate} -ac 1 fixed.wav`"
            )
        import soxr

        wav = soxr.resample(wav, sr, sample_rate).astype(np.float32)
    check_audio(wav, str(path), min_seconds=min_seconds, sample_rate=sample_rate)
    return np.ascontiguousarray(wav, dtype=np.float32)


def check_audio(
    wav: np.ndarray, what: str = "audio", *, min_seconds: float = 0.0, sample_rate: int = SAMPLE_RATE
) -> None:
    """Raise AudioError if `wav` (T,) is empty, too short or not finite."""
    if wav.size == 0:
        raise AudioError(f"{what}: no samples; the file is empty")
    if not np.all(np.isfinite(wav)):
        raise AudioError(f"{what}: contains NaN or infinite samples; the producer is broken")
    if wav.size < min_seconds * sample_rate:
        raise AudioError(
            f"{what}: {wav.size / sample_rate:.3f} s long, at least {min_seconds} s needed"
        )


def save_audio(path: str | os.PathLike, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write (T,) float audio as 16-bit PCM WAV, atomically. Clips to [-1, 1]."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    check_audio(wav, str(path))
    with atomic_write(path) as tmp:
        sf.write(str(tmp), np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds, read from the header only."""
    return sf.info(str(path)).duration


# --------------------------------------------------------------------------------------
# Manifests


def write_manifest(path: str | os.PathLike, rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        missing = [k for k in MANIFEST_KEYS if k not in row]
        if missing:
            raise ValueError(f"manifest row {i} lacks {missing}: {row}")
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_manifest(path: str | os.PathLike, *, absolute_paths: bool = True) -> list[dict]:
    """Rows of a JSONL manifest; with `absolute_paths`, `path` is resolved against the
    dataset root (the manifest's parent's parent when the manifest sits in `manifests/`,
    else its own folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"manifest {path} not found; build the corpus first (python make_telugu_speech.py)"
        )
    root = dataset_root(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
            missing = [k for k in MANIFEST_KEYS if k not in row]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing keys {missing}")
            if absolute_paths:
                row["path"] = str((root / row["path"]).resolve())
            rows.append(row)
    return rows


def dataset_root(manifest_path: str | os.PathLike) -> Path:
    manifest_path = Path(manifest_path).resolve()
    parent = manifest_path.parent
    return parent.parent if parent.name == "manifests" else parent
