"""Shared configuration: the workspace layout, audio constants, the agent's voices and emotions.

Model configs live beside their models (`CodecConfig` in telugu_codec.py, `S2SConfig` in
s2s_transformer.py); this file holds only what several scripts must agree on.

Workspace resolution (first that applies):
    1. `--workspace DIR` on the command line
    2. the environment variable TELUGU_S2S_WORKSPACE
    3. /workspace, when it exists (the RunPod layout of the mission)
    4. ./workspace next to the current directory

Workspace layout (every script derives its default paths from here):
    <workspace>/telugu_synth/     synthetic Telugu corpus (make_telugu_speech.py)
    <workspace>/telugu_data/      collected real audio (data_collection.py)
    <workspace>/speaker_data/     segmented, speaker-labelled real audio (prepare_speaker_data.py)
    <workspace>/models/codec/     codec checkpoints (train_codec_dac.py)
    <workspace>/models/s2s/       S2S checkpoints (train_s2s.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path

SAMPLE_RATE = 16000  # Hz, mono: the only rate the codec, the models and the server use

REPO_DIR = Path(__file__).resolve().parent
DATA_DIR = REPO_DIR / "data"  # small text corpora, tracked in git
DEMO_MODEL_DIR = REPO_DIR / "checkpoints" / "demo"  # the default models shipped in git

WORKSPACE_ENV = "TELUGU_S2S_WORKSPACE"


# --------------------------------------------------------------------------------------
# Voices and emotions: one source of truth for the corpus, the models and the server.


@dataclass(frozen=True)
class Voice:
    """One of the agent's four voices. `id` is the speaker id the models are conditioned on."""

    id: int
    name: str
    style: str  # the mission's label
    gender: str
    description: str


VOICES: tuple[Voice, ...] = (
    Voice(0, "Arjun", "male_young", "male", "young man, bright and quick"),
    Voice(1, "Ravi", "male_mature", "male", "mature man, deep and unhurried"),
    Voice(2, "Priya", "female_young", "female", "young woman, high and lively"),
    Voice(3, "Lakshmi", "female_professional", "female", "professional woman, warm and measured"),
)

# Emotion ids are the indices in this tuple. Each has a prosody signature (pitch level and
# range, tempo, energy) defined in make_telugu_speech.EMOTION_PROSODY.
EMOTIONS: tuple[str, ...] = (
    "neutral",
    "happy",
    "sad",
    "angry",
    "excited",
    "calm",
    "surprised",
    "fearful",
    "empathetic",
)


def voice_by_name(name: str) -> Voice:
    """Look a voice up by name or style, case-insensitively ("priya", "female_young")."""
    key = name.strip().lower()
    for voice in VOICES:
        if key in (voice.name.lower(), voice.style):
            return voice
    valid = ", ".join(f"{v.name} ({v.style})" for v in VOICES)
    raise ValueError(f"unknown voice {name!r}; choose one of: {valid}")


def emotion_id(name: str) -> int:
    """Index of an emotion by name ("happy" -> 1)."""
    key = name.strip().lower()
    if key not in EMOTIONS:
        raise ValueError(f"unknown emotion {name!r}; choose one of: {', '.join(EMOTIONS)}")
    return EMOTIONS.index(key)


def default_model_threads(cores: int | None = None) -> int:
    """torch threads for the models when --threads is 0: all cores but one, at most 4. The event
    loop and the VAD thread need a core of their own: measured on a 2-core Xeon (20 turns per mode,
    benchmark_latency.py), 2 model threads left 39% of reply chunks later than the page's 60 ms
    jitter buffer and end to end at 399 / 311 ms (turn / stream p50); 1 thread, none late and
    350 / 298 ms."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(4, cores - 1))


# --------------------------------------------------------------------------------------
# Workspace


def resolve_workspace(cli_value: str | os.PathLike | None = None) -> Path:
    """The workspace root, by the rules in this module's docstring."""
    if cli_value:
        return Path(cli_value).expanduser().resolve()
    env = os.environ.get(WORKSPACE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if Path("/workspace").is_dir():
        return Path("/workspace")
    return (Path.cwd() / "workspace").resolve()


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def synth_corpus(self) -> Path:
        return self.root / "telugu_synth"

    @property
    def telugu_data(self) -> Path:
        return self.root / "telugu_data"

    @property
    def speaker_data(self) -> Path:
        return self.root / "speaker_data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def codec_dir(self) -> Path:
        return self.models / "codec"

    @property
    def s2s_dir(self) -> Path:
        return self.models / "s2s"


def add_workspace_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workspace",
        default=None,
        help=f"workspace root (default: ${WORKSPACE_ENV}, else /workspace if it exists, else ./workspace)",
    )


def workspace_from_args(args: argparse.Namespace) -> Workspace:
    return Workspace(resolve_workspace(getattr(args, "workspace", None)))


# --------------------------------------------------------------------------------------
# Dataclass configs from JSON / CLI overrides


def _check_type(value, annotation, where: str):
    """Return `value` coerced to `annotation` when that is lossless, else raise TypeError."""
    origin = typing.get_origin(annotation)
    if annotation is typing.Any:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        errors = []
        for arm in typing.get_args(annotation):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm, where)
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(f"{where}: {value!r} matches none of {annotation}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise TypeError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_type = args[0] if args else typing.Any
            items = [_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


T = typing.TypeVar("T")


def config_from_dict(cls: type[T], values: dict, *, base: T | None = None) -> T:
    """Build dataclass `cls` from `values` (e.g. a checkpoint's JSON config or --config overrides).

    Unknown keys and ill-typed values raise, naming the field, so a typo in a config file can
    never be silently ignored. With `base`, unspecified fields keep base's values; the result
    goes through `__post_init__` again so derived sizes are recomputed.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(fields)}"
        )
    checked = {k: _check_type(v, hints[k], f"{cls.__name__}.{k}") for k, v in values.items()}
    if base is not None:
        current = {name: getattr(base, name) for name in fields}
        current.update(checked)
        checked = current
    return cls(**checked)


def config_to_dict(cfg) -> dict:
    """JSON-ready dict of a dataclass config (tuples become lists), init fields only."""
    return {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
