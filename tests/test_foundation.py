"""Shared modules: workspace resolution, strict configs, audio and manifest I/O, training helpers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import config
from audio_io import (AudioError, atomic_write, load_audio, read_manifest, save_audio, write_json,
                      write_manifest)
from training import MetricsLog, load_checkpoint, lr_at, save_checkpoint


def test_workspace_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(config.WORKSPACE_ENV, str(tmp_path / "env"))
    assert config.resolve_workspace(tmp_path / "cli") == (tmp_path / "cli").resolve()
    assert config.resolve_workspace() == (tmp_path / "env").resolve()
    monkeypatch.delenv(config.WORKSPACE_ENV)
    monkeypatch.chdir(tmp_path)
    expected = Path("/workspace") if Path("/workspace").is_dir() else tmp_path / "workspace"
    assert config.resolve_workspace() == expected.resolve()
    ws = config.Workspace(tmp_path)
    assert ws.codec_dir == tmp_path / "models" / "codec" and ws.synth_corpus == tmp_path / "telugu_synth"


def test_voices_and_emotions_lookup():
    assert [v.name for v in config.VOICES] == ["Arjun", "Ravi", "Priya", "Lakshmi"]
    assert config.voice_by_name("female_young").name == "Priya"
    assert config.voice_by_name(" lakshmi ").id == 3
    assert len(config.EMOTIONS) == 9 and config.emotion_id("happy") == 1
    with pytest.raises(ValueError, match="Arjun"):
        config.voice_by_name("Suresh")
    with pytest.raises(ValueError, match="neutral"):
        config.emotion_id("bored")


@dataclass
class _Cfg:
    dim: int = 8
    rate: float = 0.5
    strides: tuple[int, ...] = (2, 4)
    name: str | None = None
    derived: int = field(init=False, default=0)

    def __post_init__(self):
        self.derived = self.dim * 2


def test_model_threads_leave_a_core_for_the_event_loop():
    assert [config.default_model_threads(n) for n in (1, 2, 3, 4, 5, 16)] == [1, 1, 2, 3, 4, 4]


def test_config_overrides_are_strict():
    cfg = config.config_from_dict(_Cfg, {"dim": 16, "rate": 1, "strides": [5, 2]})
    assert cfg == _Cfg(dim=16, rate=1.0, strides=(5, 2)) and cfg.derived == 32
    based = config.config_from_dict(_Cfg, {"rate": 0.1}, base=cfg)
    assert based.dim == 16 and based.rate == 0.1
    assert config.config_to_dict(cfg) == {"dim": 16, "rate": 1.0, "strides": [5, 2], "name": None}
    with pytest.raises(ValueError, match="unknown _Cfg field.*dimm"):
        config.config_from_dict(_Cfg, {"dimm": 3})
    for bad in ({"dim": 2.5}, {"dim": True}, {"strides": "24"}, {"name": 3}):
        with pytest.raises(TypeError, match="_Cfg"):
            config.config_from_dict(_Cfg, bad)


def _write(path, wav, sr=16000):
    sf.write(str(path), wav, sr)
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "file not found"),
        ("corrupt", "cannot decode"),
        ("rate", "sample rate 8000 Hz, expected 16000.*ffmpeg"),
        ("stereo", "2 channels, expected mono"),
        ("empty", "no samples"),
        ("nan", "NaN"),
        ("short", "at least 0.5 s"),
    ],
)
def test_load_audio_rejects_bad_input_with_a_fix(tmp_path, case, match):
    path = tmp_path / f"{case}.wav"
    if case == "corrupt":
        path.write_bytes(b"RIFF\x00\x00garbage" * 10)
    elif case == "rate":
        _write(path, np.zeros(8000, np.float32), 8000)
    elif case == "stereo":
        _write(path, np.zeros((1600, 2), np.float32))
    elif case == "empty":
        _write(path, np.zeros(0, np.float32))
    elif case == "nan":
        sf.write(str(path), np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    elif case == "short":
        _write(path, np.zeros(1600, np.float32))
    with pytest.raises(AudioError, match=match):
        load_audio(path, min_seconds=0.5)


def test_load_audio_can_fix_rate_and_channels(tmp_path):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1).astype(np.float32) * 0.5
    wav = load_audio(_write(tmp_path / "x.wav", stereo, 44100), resample=True, mix_to_mono=True)
    assert wav.dtype == np.float32 and wav.ndim == 1 and abs(len(wav) - 16000) <= 1


def test_save_audio_roundtrip_and_atomicity(tmp_path):
    wav = (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    path = tmp_path / "a" / "x.wav"
    save_audio(path, wav)
    np.testing.assert_allclose(load_audio(path), wav, atol=1 / 32767)
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("killed")
    np.testing.assert_allclose(load_audio(path), wav, atol=1 / 32767)  # old file untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.wav"]  # no temp left behind
    assert path.stat().st_mode & 0o644 == 0o644  # readable by others, like any file


def test_manifest_paths_are_relative_to_the_dataset_root(tmp_path):
    row = {"path": "wavs/a.wav", "text": "నమస్కారం.", "voice": "Ravi", "emotion": "neutral", "role": "agent",
           "intent_id": None, "duration": 1.0, "split": "train", "extra": 1}
    write_manifest(tmp_path / "manifests" / "train.jsonl", [row])
    rows = read_manifest(tmp_path / "manifests" / "train.jsonl")
    assert rows[0]["path"] == str((tmp_path / "wavs" / "a.wav").resolve()) and rows[0]["extra"] == 1
    assert "నమస్కారం" in (tmp_path / "manifests" / "train.jsonl").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="lacks"):
        write_manifest(tmp_path / "bad.jsonl", [{"path": "x"}])
    with pytest.raises(FileNotFoundError, match="make_telugu_speech"):
        read_manifest(tmp_path / "nope.jsonl")


def test_checkpoint_loads_without_unpickling(tmp_path):
    import torch

    state = {"model_state": {"w": torch.randn(3)}, "config": {"dim": 3, "strides": [2, 4]}, "step": 7}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["step"] == 7 and torch.equal(loaded["model_state"]["w"], state["model_state"]["w"])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="--resume"):
        load_checkpoint(tmp_path / "missing.pt")


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 1e-3, warmup_steps=10, total_steps=100) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)


def test_metrics_log_truncates_to_resume_step(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step})
    log.log({"step": 5, "val_snr": 3.0})
    log.truncate_after(3)
    assert [r["step"] for r in log.rows()] == [1, 2, 3]
    log.log({"step": 4, "loss": 0.25})
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,loss" and len((tmp_path / "metrics.csv").read_text().splitlines()) == 5


def test_write_json_is_utf8(tmp_path):
    write_json(tmp_path / "x.json", {"te": "తెలుగు"})
    assert json.loads((tmp_path / "x.json").read_text(encoding="utf-8")) == {"te": "తెలుగు"}


def test_shipped_model_shards_round_trip_and_replace_each_other(tmp_path):
    """save_pretrained splits weights over max_shard_mb into shards + an index (tensors whole, in
    order); loading gives the same state in float32; saving again unsharded removes the shards."""
    from training import WEIGHTS_INDEX_NAME, load_pretrained_state, save_pretrained, weight_files

    torch.manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(256, 256) for i in range(6)}  # 128 KiB each in fp16
    state["steps"] = torch.arange(5)
    save_pretrained(tmp_path, state, {"width": 256}, dtype=torch.float16, max_shard_mb=0.3)
    files = weight_files(tmp_path)
    assert files[0].name == WEIGHTS_INDEX_NAME and len(files) >= 4
    assert all(p.stat().st_size <= 0.3 * 2**20 for p in files[1:])
    loaded, config = load_pretrained_state(tmp_path)
    assert config == {"width": 256} and sorted(loaded) == sorted(state)
    for k, v in state.items():
        expect = v.half().float() if v.is_floating_point() else v
        assert torch.equal(loaded[k], expect)
    files[-1].unlink()
    with pytest.raises(FileNotFoundError, match="copy the whole model folder"):
        load_pretrained_state(tmp_path)
    save_pretrained(tmp_path, state, {"width": 256})  # fits one file: the shards and index go
    assert [p.name for p in weight_files(tmp_path)] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
