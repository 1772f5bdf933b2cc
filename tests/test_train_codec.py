"""Codec training: discriminator shapes, GAN losses, a fake WAV tree with bad files, exact resume,
and a 2-process gloo DDP run. CPU only, tiny configs, generated audio (no corpus needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_codec_dac  # noqa: E402
from discriminator_dac import Discriminator, DiscriminatorConfig, GANLoss  # noqa: E402
from telugu_codec import CodecConfig, TeluCodec  # noqa: E402

torch.set_num_threads(1)
SR = 16000


def write_tree(root: Path, n_good: int = 12, bad: bool = True) -> Path:
    """A flat folder of tones, chirps and noise bursts, plus (optionally) four unusable files."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        t = np.arange(int(SR * rng.uniform(0.3, 0.6))) / SR
        kind = i % 3
        if kind == 0:
            wav = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t)
        elif kind == 1:
            wav = 0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
        else:
            wav = 0.1 * rng.standard_normal(t.shape) * np.hanning(len(t))
        sf.write(root / f"clip_{i:02d}.wav", wav.astype(np.float32), SR, subtype="PCM_16")
    if bad:
        (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" + bytes(rng.integers(0, 255, 300, dtype=np.uint8)))
        sf.write(root / "wrong_rate.wav", np.zeros(4000, np.float32) + 0.1, 8000)
        sf.write(root / "stereo.wav", np.full((4000, 2), 0.1, np.float32), SR)
        sf.write(root / "empty.wav", np.zeros(0, np.float32), SR)
    return root


def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({
        "train": {"segment_seconds": 0.25, "val_files": 2, "val_seconds": 0.5, "warmup_steps": 2, "dead_code_every": 2},
    }))
    return path


def train_args(data: Path, out: Path, cfg: Path, *extra: str) -> list[str]:
    return [
        "--data_dir", str(data), "--output_dir", str(out), "--config", str(cfg), "--preset", "tiny",
        "--batch_size", "4", "--num_epochs", "50", "--learning_rate", "3e-3", "--log_every", "1",
        "--val_every", "100", "--save_every", "100", "--device", "cpu", "--num_workers", "0", *extra,
    ]


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


# --- discriminators -----------------------------------------------------------------------


def test_discriminator_output_shapes_and_gan_losses():
    torch.manual_seed(0)
    cfg = DiscriminatorConfig()
    d = Discriminator(cfg)
    T = 4000
    real = 0.3 * torch.randn(2, 1, T)
    fake = (real + 0.1 * torch.randn_like(real)).requires_grad_(True)
    outs = d(real)
    assert len(outs) == len(cfg.periods) + len(cfg.stft_windows)
    for p, fmaps in zip(cfg.periods, outs):
        assert len(fmaps) == len(cfg.period_channels) + 1
        assert [f.shape[1] for f in fmaps] == list(cfg.period_channels) + [1]
        assert fmaps[-1].shape[0] == 2 and fmaps[-1].shape[-1] == p  # the period axis is kept
    for w, fmaps in zip(cfg.stft_windows, outs[len(cfg.periods):]):
        assert len(fmaps) == 5 * len(cfg.bands) + 1
        score = fmaps[-1]
        assert score.shape[:3] == (2, 1, T // (w // 4) + 1)  # one score per STFT frame and band bin

    gan = GANLoss(d)
    loss_d = gan.discriminator_loss(real, fake)
    assert loss_d.dim() == 0 and loss_d > 0
    loss_d.backward()
    assert fake.grad is None  # the discriminator step never reaches the generator
    g = gan.generator_loss(real, fake)
    assert set(g) == {"adversarial_loss", "feature_loss"}
    (g["adversarial_loss"] + g["feature_loss"]).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    # Feature matching is zero when the fake is the real clip.
    with torch.no_grad():
        assert float(gan.generator_loss(real, real.clone())["feature_loss"]) == 0.0


def test_loss_weights_name_the_losses_the_models_return():
    codec = TeluCodec(CodecConfig.preset("tiny"))
    out = codec(0.1 * torch.randn(1, 1, 800))
    gan_keys = {"adversarial_loss", "feature_loss"}
    produced = {k for k in out if k.endswith("_loss")} | gan_keys | {"mel_loss"}
    assert set(train_codec_dac.TrainConfig().loss_weights()) == produced


# --- the trainer ------------------------------------------------------------------------------


def test_trainer_skips_bad_files_and_writes_every_output(tmp_path, capsys):
    data = write_tree(tmp_path / "wavs")
    out = tmp_path / "run"
    result = train_codec_dac.main(train_args(data, out, tiny_config(tmp_path), "--max_steps", "2"))
    printed = capsys.readouterr().out
    skipped = dict((Path(p).name, reason) for split in result["skipped"].values() for p, reason in split)
    assert skipped == {"corrupt.wav": "corrupt", "wrong_rate.wav": "wrong sample rate",
                       "stereo.wav": "not mono", "empty.wav": "empty"}
    assert "skipped" in printed and "wrong sample rate" in printed
    assert result["step"] == 2
    for name in ("last.pt", "best_codec.pt", "model.safetensors", "config.json", "metrics.csv", "metrics.jsonl"):
        assert (out / name).is_file(), name

    # The checkpoint loads without unpickling and carries everything resume needs.
    ckpt = torch.load(out / "last.pt", weights_only=True)
    for key in ("model_state", "config", "optimizer_g", "optimizer_d", "scheduler_g", "scheduler_d", "step", "epoch", "rng"):
        assert key in ckpt
    assert ckpt["step"] == 2
    # The mission's Phase 3 snippet, with the checkpoint's (tiny) config.
    codec = TeluCodec(CodecConfig.preset("tiny"))
    codec.load_state_dict(torch.load(out / "best_codec.pt")["model_state"])
    codec.eval()
    output = codec(torch.randn(1, 1, 16000))
    assert f"{output['snr']:.2f}" and codec.calculate_bitrate() == pytest.approx(16.0)
    # The shipped form is the best checkpoint, folded.
    shipped = TeluCodec.from_pretrained(out)
    wav = 0.2 * torch.randn(1, 1, 1600)
    assert torch.equal(shipped.encode(wav), codec.encode(wav))
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert val and {"snr", "si_sdr", "mel_distance", "pesq_wb", "stoi", "codebook_usage"} <= set(val[0])


def test_find_audio_reads_all_three_layouts(tmp_path):
    from audio_io import write_manifest

    flat = write_tree(tmp_path / "flat", n_good=40, bad=False)
    train, val, layout = train_codec_dac.find_audio(flat)
    assert "hash" in layout and len(train) + len(val) == 40 and 0 < len(val) < 8 and not set(train) & set(val)
    assert train_codec_dac.find_audio(flat)[1] == val  # the split is stable

    split = tmp_path / "split"
    write_tree(split / "train", n_good=3, bad=False)
    write_tree(split / "val", n_good=2, bad=False)
    train, val, layout = train_codec_dac.find_audio(split)
    assert (len(train), len(val)) == (3, 2) and "folders" in layout

    root = tmp_path / "corpus"
    write_tree(root / "wavs", n_good=4, bad=False)
    rows = [{"path": f"wavs/clip_{i:02d}.wav", "text": "x", "voice": "Ravi", "emotion": "calm", "role": "user",
             "intent_id": None, "duration": 0.5, "split": "train" if i < 3 else "val"} for i in range(4)]
    write_manifest(root / "manifests" / "train.jsonl", rows[:3])
    write_manifest(root / "manifests" / "val.jsonl", rows[3:])
    train, val, layout = train_codec_dac.find_audio(root)
    assert [p.name for p in train] == ["clip_00.wav", "clip_01.wav", "clip_02.wav"] and val[0].is_file()
    assert "manifests" in layout


def test_resume_continues_the_loss_curve_exactly(tmp_path):
    """6 steps in one run == 3 steps, stop, resume to 6. With 2 steps per epoch the GAN starts
    at step 3, so the discriminator, both optimizers, schedulers and the RNG must all be restored.
    The resumed run is not given the GAN flags: the schedule flags come from the checkpoint."""
    data = write_tree(tmp_path / "wavs", n_good=10, bad=False)
    cfg = tiny_config(tmp_path)
    gan = ["--use_discriminators", "--discriminator_start_epoch", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    train_codec_dac.main(train_args(data, full, cfg, "--max_steps", "6", *gan))
    train_codec_dac.main(train_args(data, part, cfg, "--max_steps", "3", *gan))
    assert torch.load(part / "last.pt")["step"] == 3
    train_codec_dac.main(train_args(data, part, cfg, "--max_steps", "6", "--resume", str(part / "last.pt")))

    a, b = train_rows(full), train_rows(part)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert any("discriminator_loss" in r for r in a[3:])  # the GAN part is covered
    keys = ("mel_loss", "commitment_loss", "codebook_loss", "adversarial_loss", "feature_loss", "lr", "snr", "discriminator_loss")
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)
    sa = torch.load(full / "last.pt")["model_state"]
    sb = torch.load(part / "last.pt")["model_state"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_bad_arguments_fail_early(tmp_path):
    data = write_tree(tmp_path / "wavs", n_good=3, bad=False)
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text(json.dumps({"codec": {"n_codebook": 4}}))
    with pytest.raises(SystemExit, match="n_codebook"):
        train_codec_dac.main(["--data_dir", str(data), "--output_dir", str(tmp_path / "o"), "--config", str(bad_cfg), "--device", "cpu"])
    with pytest.raises(SystemExit, match="not a folder"):
        train_codec_dac.main(["--data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="cannot fill one batch"):
        train_codec_dac.main(["--data_dir", str(data), "--output_dir", str(tmp_path / "o"), "--batch_size", "64",
                              "--preset", "tiny", "--device", "cpu", "--num_workers", "0"])


def test_wandb_is_optional_and_explained(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    data = write_tree(tmp_path / "wavs", n_good=6, bad=False)
    with pytest.raises(SystemExit, match="pip install wandb"):
        train_codec_dac.main(train_args(data, tmp_path / "o", tiny_config(tmp_path), "--max_steps", "1", "--wandb_project", "x"))


def test_ddp_two_processes_with_gloo(tmp_path):
    data = write_tree(tmp_path / "wavs", n_good=12, bad=False)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_codec_dac.py"), *train_args(data, out, tiny_config(tmp_path), "--max_steps", "2", "--batch_size", "2",
                                                  "--use_discriminators")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(out / "last.pt")
    assert ckpt["step"] == 2
    # 11 training files over 2 ranks x 2 clips: 2 steps per epoch (a world of one would have 5).
    assert ckpt["batches_per_epoch"] == len(train_codec_dac.find_audio(data)[0]) // 2 // 2
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all("discriminator_loss" in r for r in rows)


def test_resume_schedule_flags_come_from_the_checkpoint_unless_given():
    saved = {"num_epochs": "40", "use_discriminators": "True", "discriminator_start_epoch": "4", "seed": "0"}
    args = train_codec_dac.parse_args(["--resume", "x.pt"])
    train_codec_dac.resolve_schedule_flags(args, saved)
    assert (args.num_epochs, args.use_discriminators, args.discriminator_start_epoch, args.seed) == (40, True, 4, 0)
    notes = []
    args = train_codec_dac.parse_args(["--resume", "x.pt", "--num_epochs", "100"])
    train_codec_dac.resolve_schedule_flags(args, saved, notes.append)
    assert args.num_epochs == 100 and "--num_epochs 40 -> 100" in notes[0]
    args = train_codec_dac.parse_args([])  # a fresh run: the documented defaults
    train_codec_dac.resolve_schedule_flags(args, None)
    assert (args.num_epochs, args.use_discriminators, args.discriminator_start_epoch, args.seed) == (100, False, 0, 0)
