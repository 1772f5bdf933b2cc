"""Train TeluCodec the DAC way: multi-scale mel + VQ losses, then adversarial + feature matching.

Mission, Phase 3 (GPU):
    python train_codec_dac.py --data_dir /workspace/speaker_data --output_dir /workspace/models/codec \\
        --batch_size 16 --num_epochs 100 --learning_rate 1e-4 --use_discriminators \\
        --discriminator_start_epoch 5 --wandb_project telugu-codec
Several GPUs:      torchrun --nproc_per_node 8 train_codec_dac.py ...same flags...
Demo size on CPU:  nice python train_codec_dac.py --preset demo --data_dir workspace/telugu_synth \\
                       --output_dir runs/codec_demo --batch_size 8 --max_steps 400 --val_every 100
Resume:            python train_codec_dac.py --resume runs/codec_demo/last.pt --output_dir runs/codec_demo ...
                   (configs and the schedule flags --num_epochs, --use_discriminators,
                   --discriminator_start_epoch and --seed come from the checkpoint unless given)

--data_dir, the first layout that matches:
    manifests/train.jsonl + manifests/val.jsonl    (make_telugu_speech.py, prepare_speaker_data.py)
    train/ and val/ folders of WAVs
    any folder of WAVs                              95/5 train/val split by a hash of each file name
Unusable files (corrupt, empty, wrong sample rate, stereo, NaN) are skipped, counted and reported
at start; training never stops for one.

Writes into --output_dir:
    last.pt           every --save_every steps and at the end (model, discriminator, both optimizers
                      and schedulers, step, epoch, RNG, configs); --resume continues exactly
    best_codec.pt     the same, at the lowest validation mel distance so far
    model.safetensors + config.json    the best model in shipped form (weight norm folded)
    metrics.csv / metrics.jsonl        training losses every --log_every steps, validation rows
                      (SNR, SI-SDR, mel distance, PESQ-WB, STOI, codebook usage) every --val_every

--max_steps stops early without changing the LR schedule, which always spans --num_epochs, so a
run cut into pieces and resumed matches an uninterrupted one step for step.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import audio_metrics
from audio_io import AudioError, load_audio, read_json, read_manifest
from config import SAMPLE_RATE, add_workspace_arg, config_from_dict, config_to_dict, workspace_from_args
from discriminator_dac import Discriminator, DiscriminatorConfig, GANLoss
from telugu_codec import CodecConfig, TeluCodec
from training import (
    MetricsLog,
    all_reduce_mean,
    cleanup_distributed,
    init_distributed,
    load_checkpoint,
    lr_at,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)

LOSS_NAMES = ("mel_loss", "commitment_loss", "codebook_loss", "adversarial_loss", "feature_loss")


@dataclass
class TrainConfig:
    batch_size: int = 16  # per process
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.8, 0.99)  # DAC
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    segment_seconds: float = 0.5  # random crop per utterance (DAC: 0.38 s)
    grad_clip: float = 1000.0  # DAC's generator clip; the discriminator's is tighter
    discriminator_grad_clip: float = 10.0
    dead_code_every: int = 10  # steps between dead-code restarts (CodecConfig.usage_decay); 0 = never
    val_files: int = 24  # validation utterances scored each time
    val_seconds: float = 4.0  # each cut to this length
    # Loss weights, named exactly as the losses are returned (DAC's values).
    mel_loss: float = 15.0
    commitment_loss: float = 0.25
    codebook_loss: float = 1.0
    adversarial_loss: float = 1.0
    feature_loss: float = 2.0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.batch_size < 1 or self.segment_seconds <= 0 or self.learning_rate <= 0:
            raise ValueError("batch_size, segment_seconds and learning_rate must be positive")

    def loss_weights(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in LOSS_NAMES}


# The codec preset plus a discriminator sized to match (DAC's full widths need a GPU).
PRESETS: dict[str, dict] = {
    "default": {},
    "demo": {"discriminator": {"period_channels": [16, 64, 128, 256, 256], "stft_channels": 16}},
    "tiny": {"discriminator": {"periods": [2, 3], "period_channels": [4, 8], "stft_windows": [256, 128], "stft_channels": 4}},
}


# --------------------------------------------------------------------------------------
# Data


def find_audio(data_dir: Path) -> tuple[list[Path], list[Path], str]:
    """(train files, val files, description of the layout found)."""
    if not data_dir.is_dir():
        raise SystemExit(f"--data_dir {data_dir} is not a folder; build the corpus (python make_telugu_speech.py) or fix the path")
    manifests = data_dir / "manifests"
    if (manifests / "train.jsonl").is_file():
        train = [Path(r["path"]) for r in read_manifest(manifests / "train.jsonl")]
        val_manifest = manifests / "val.jsonl"
        val = [Path(r["path"]) for r in read_manifest(val_manifest)] if val_manifest.is_file() else []
        return train, val, f"manifests in {manifests}"
    if (data_dir / "train").is_dir() and (data_dir / "val").is_dir():
        return sorted((data_dir / "train").rglob("*.wav")), sorted((data_dir / "val").rglob("*.wav")), "train/ and val/ folders"
    files = sorted(data_dir.rglob("*.wav"))
    if not files:
        raise SystemExit(f"no manifests/train.jsonl, train/ + val/ folders or .wav files under {data_dir}")

    def is_val(path: Path) -> bool:  # stable across runs and machines, unlike hash()
        digest = hashlib.md5(str(path.relative_to(data_dir)).encode()).digest()
        return digest[0] * 256 + digest[1] < 0.05 * 65536

    val = [f for f in files if is_val(f)]
    if not val and len(files) > 1:
        val = files[-1:]
    train = [f for f in files if f not in set(val)]
    return train, val, f"a folder of WAVs ({len(files)} files, 95/5 split by file-name hash)"


SKIP_REASONS = {  # substring of audio_io's AudioError message -> short reason
    "cannot decode": "corrupt",
    "sample rate": "wrong sample rate",
    "channels": "not mono",
    "no samples": "empty",
    "NaN": "NaN/inf samples",
    "not found": "missing",
    "long, at least": "too short",
}


def check_files(paths: list[Path], min_seconds: float = 0.05) -> tuple[list[Path], list[tuple[Path, str, str]]]:
    """Decode every file once: (usable files, [(file, reason, message)] for the rest)."""
    good, skipped = [], []
    for path in paths:
        try:
            load_audio(path, min_seconds=min_seconds)
            good.append(path)
        except AudioError as e:
            reason = next((r for key, r in SKIP_REASONS.items() if key in str(e)), "unreadable")
            skipped.append((path, reason, str(e)))
    return good, skipped


def report_skipped(split: str, total: int, skipped: list[tuple[Path, str, str]]) -> str:
    if not skipped:
        return f"{split}: all {total} files usable"
    counts = Counter(reason for _, reason, _ in skipped)
    lines = [f"{split}: skipped {len(skipped)} of {total} files: " + ", ".join(f"{n} {r}" for r, n in counts.most_common())]
    lines += [f"    {message}" for _, _, message in skipped[:5]]
    if len(skipped) > 5:
        lines.append(f"    ... and {len(skipped) - 5} more")
    return "\n".join(lines)


class SegmentDataset(Dataset):
    """Item (file index, crop seed) -> (1, segment_samples) float32 random crop, zero-padded if short.
    The crop comes from the seed, not from a global RNG, so worker count and resume cannot change it."""

    def __init__(self, paths: list[Path], segment_samples: int):
        self.paths = paths
        self.segment_samples = segment_samples

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, crop_seed = item
        wav = load_audio(self.paths[index])
        n = self.segment_samples
        if len(wav) > n:
            start = int(np.random.default_rng(crop_seed).integers(0, len(wav) - n + 1))
            wav = wav[start : start + n]
        elif len(wav) < n:
            wav = np.pad(wav, (0, n - len(wav)))
        return torch.from_numpy(np.ascontiguousarray(wav))[None]


def epoch_batches(n_files: int, epoch: int, seed: int, batch_size: int, rank: int, world: int) -> list[list[tuple[int, int]]]:
    """This rank's batches for one epoch: [[(file index, crop seed), ...], ...], full batches only."""
    sampler = DistributedSampler(range(n_files), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    items = [(i, seed * 1_000_003 + epoch * 65_537 + i) for i in sampler]
    return [items[j : j + batch_size] for j in range(0, len(items) - batch_size + 1, batch_size)]


# --------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validate(codec: TeluCodec, paths: list[Path], max_seconds: float, device) -> dict[str, float]:
    """Mean metrics over `paths` (each cut to max_seconds), coded with all codebooks."""
    was_training = codec.training
    codec.eval()
    rows, usage = [], torch.zeros(codec.n_codebooks, codec.codebook_size)
    for path in paths:
        wav = load_audio(path)[: int(max_seconds * SAMPLE_RATE)]
        x = torch.from_numpy(wav)[None, None].to(device)
        out = codec(x)
        rows.append(audio_metrics.all_metrics(wav, out["audio"][0, 0].float().cpu().numpy()))
        for k in range(codec.n_codebooks):
            usage[k] += torch.bincount(out["codes"][0, k].cpu(), minlength=codec.codebook_size).float()
    codec.train(was_training)
    result = {}
    for key in rows[0]:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        result[key] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    p = usage / usage.sum(dim=1, keepdim=True)
    result["codebook_usage"] = float((usage > 0).float().mean())  # fraction of entries used at least once
    result["codebook_perplexity"] = float(torch.exp(-(p * p.clamp_min(1e-10).log()).sum(dim=1)).mean())
    return result


# --------------------------------------------------------------------------------------
# Configs


def build_configs(args) -> tuple[CodecConfig, DiscriminatorConfig, TrainConfig]:
    """Preset, then --config JSON ({"codec": {...}, "discriminator": {...}, "train": {...}}),
    then the explicit command-line flags."""
    if args.preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {sorted(PRESETS)}")
    codec_cfg = CodecConfig.preset(args.preset)
    disc_cfg = config_from_dict(DiscriminatorConfig, PRESETS[args.preset].get("discriminator", {}))
    train_cfg = TrainConfig()
    if args.config:
        overrides = read_json(args.config)
        unknown = set(overrides) - {"codec", "discriminator", "train"}
        if unknown:
            raise SystemExit(f"--config {args.config}: unknown sections {sorted(unknown)}; use codec, discriminator, train")
        try:
            codec_cfg = config_from_dict(CodecConfig, overrides.get("codec", {}), base=codec_cfg)
            disc_cfg = config_from_dict(DiscriminatorConfig, overrides.get("discriminator", {}), base=disc_cfg)
            train_cfg = config_from_dict(TrainConfig, overrides.get("train", {}), base=train_cfg)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--config {args.config}: {e}") from e
    flags = {k: getattr(args, k) for k in ("batch_size", "learning_rate", "segment_seconds") if getattr(args, k) is not None}
    train_cfg = config_from_dict(TrainConfig, flags, base=train_cfg)
    return codec_cfg, disc_cfg, train_cfg


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workspace_arg(p)
    p.add_argument("--data_dir", default=None, help="dataset root (manifests/, train/+val/, or WAVs); default <workspace>/telugu_synth")
    p.add_argument("--output_dir", default=None, help="checkpoints and logs; default <workspace>/models/codec")
    p.add_argument("--batch_size", type=int, default=None, help=f"clips per process per step (default {TrainConfig.batch_size})")
    p.add_argument("--num_epochs", type=int, default=None, help="epochs; the LR schedule spans them (default 100)")
    p.add_argument("--learning_rate", type=float, default=None, help=f"peak Adam LR, both networks (default {TrainConfig.learning_rate})")
    p.add_argument("--use_discriminators", action=argparse.BooleanOptionalAction, default=None,
                   help="add adversarial + feature-matching losses (--no-use_discriminators turns them off on resume)")
    p.add_argument("--discriminator_start_epoch", type=int, default=None, help="first epoch with the GAN losses (default 0)")
    p.add_argument("--wandb_project", default=None, help="log to this Weights & Biases project (off by default; needs `pip install wandb`)")
    p.add_argument("--resume", default=None, help="a last.pt / best_codec.pt to continue from (configs come from it)")
    p.add_argument("--config", default=None, help='JSON overrides: {"codec": {...}, "discriminator": {...}, "train": {...}}')
    p.add_argument("--preset", default="default", help=f"codec + discriminator size: {', '.join(PRESETS)} (default: the mission's codec)")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many steps in total (the LR schedule is unchanged)")
    p.add_argument("--val_every", type=int, default=500, help="steps between validations (default 500)")
    p.add_argument("--save_every", type=int, default=500, help="steps between last.pt saves (default 500)")
    p.add_argument("--log_every", type=int, default=10, help="steps between training-loss log rows (default 10)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--num_workers", type=int, default=2, help="data loader processes per training process (default 2)")
    p.add_argument("--segment_seconds", type=float, default=None, help=f"training crop length (default {TrainConfig.segment_seconds})")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    args = p.parse_args(argv)
    for name in ("num_epochs", "val_every", "save_every", "log_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max_steps must be >= 1")
    return args


# The flags that shape a run's schedule: a resumed run takes them from its checkpoint unless they
# are given again, so "--resume last.pt" alone continues the run it came from step for step.
SCHEDULE_FLAGS = {"num_epochs": 100, "use_discriminators": False, "discriminator_start_epoch": 0, "seed": 0}


def resolve_schedule_flags(args, saved: dict | None, log=print) -> None:
    """Fill the schedule flags left unset: from the checkpoint's args when resuming, else defaults."""
    changed = []
    for name, default in SCHEDULE_FLAGS.items():
        given = getattr(args, name)
        raw = (saved or {}).get(name)
        before = default if raw is None else (raw == "True" if isinstance(default, bool) else type(default)(raw))
        if given is None:
            setattr(args, name, before if saved is not None else default)
        elif saved is not None and given != before:
            changed.append(f"--{name} {before} -> {given}")
    if changed:
        log(f"note: resuming with changed schedule flags ({', '.join(changed)}): the run will not match an "
            "uninterrupted one; drop these flags to keep the checkpoint's")


# --------------------------------------------------------------------------------------
# Training


def main(argv=None) -> dict:
    args = parse_args(argv)
    ws = workspace_from_args(args)
    data_dir = Path(args.data_dir) if args.data_dir else ws.synth_corpus
    out_dir = Path(args.output_dir) if args.output_dir else ws.codec_dir
    ctx = init_distributed(args.device)
    device = ctx.device
    log = print if ctx.is_main else (lambda *a, **k: None)

    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:  # the run's identity comes from the checkpoint, never from flags
        codec_cfg = config_from_dict(CodecConfig, resume["config"])
        disc_cfg = config_from_dict(DiscriminatorConfig, resume["discriminator_config"])
        train_cfg = config_from_dict(TrainConfig, resume["train_config"])
        ignored = [f"--{k}" for k in ("config", "batch_size", "learning_rate", "segment_seconds") if getattr(args, k) is not None]
        ignored += ["--preset"] if args.preset != "default" else []
        if ignored:
            log(f"note: resuming, so {' '.join(ignored)} are ignored: the codec, discriminator and training configs come from the checkpoint")
    else:
        codec_cfg, disc_cfg, train_cfg = build_configs(args)
    resolve_schedule_flags(args, resume.get("args", {}) if resume is not None else None, log)

    # Data: every rank scans the same files and gets the same lists.
    train_files, val_files, layout = find_audio(data_dir)
    train_ok, train_skipped = check_files(train_files)
    val_ok, val_skipped = check_files(val_files)
    log(f"data: {data_dir} ({layout})")
    log(report_skipped("train", len(train_files), train_skipped))
    log(report_skipped("val", len(val_files), val_skipped))
    if not val_ok and len(train_ok) > 1:
        val_ok, train_ok = train_ok[-1:], train_ok[:-1]
        log(f"warning: no usable validation file; holding out {val_ok[0].name} from training instead")
    val_ok = val_ok[: train_cfg.val_files]
    batches_per_epoch = len(train_ok) // ctx.world_size // train_cfg.batch_size
    if batches_per_epoch < 1:
        raise SystemExit(
            f"{len(train_ok)} usable training files cannot fill one batch of {train_cfg.batch_size} "
            f"on {ctx.world_size} process(es); lower --batch_size or add data"
        )
    total_steps = args.num_epochs * batches_per_epoch
    last_step = min(total_steps, args.max_steps or total_steps)
    segment = int(round(train_cfg.segment_seconds * SAMPLE_RATE / codec_cfg.hop_length)) * codec_cfg.hop_length

    seed_everything(args.seed)  # the same on every rank: identical initial weights
    codec = TeluCodec(codec_cfg).to(device)
    disc = Discriminator(disc_cfg).to(device)
    opt_g = torch.optim.AdamW(codec.parameters(), lr=train_cfg.learning_rate, betas=train_cfg.betas, weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=train_cfg.learning_rate, betas=train_cfg.betas, weight_decay=0.0)

    def schedule(step):
        return lr_at(step, 1.0, train_cfg.warmup_steps, total_steps, train_cfg.min_lr_ratio)

    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, schedule)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, schedule)
    step, best_mel = 0, math.inf
    if resume is not None:
        codec.load_state_dict(resume["model_state"])
        disc.load_state_dict(resume["discriminator_state"])
        opt_g.load_state_dict(resume["optimizer_g"])
        opt_d.load_state_dict(resume["optimizer_d"])
        sched_g.load_state_dict(resume["scheduler_g"])
        sched_d.load_state_dict(resume["scheduler_d"])
        step, best_mel = int(resume["step"]), float(resume["best_mel_distance"])
        if resume.get("batches_per_epoch") != batches_per_epoch:
            log(f"warning: {batches_per_epoch} batches per epoch now, {resume.get('batches_per_epoch')} in the checkpoint; "
                "the data order will differ from an uninterrupted run")
        set_rng_state(resume["rng"])
        if device.type == "cuda" and "cuda_rng" in resume:
            torch.cuda.set_rng_state(resume["cuda_rng"], device)
        log(f"resumed from {args.resume} at step {step}")
        del resume

    model = DDP(codec, device_ids=[device.index] if device.type == "cuda" else None) if ctx.enabled else codec
    disc_model = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None) if ctx.enabled else disc
    gan = GANLoss(disc_model)
    mel_loss = audio_metrics.MultiScaleMelLoss().to(device)
    weights = train_cfg.loss_weights()
    dataset = SegmentDataset(train_ok, segment)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    metrics = MetricsLog(out_dir) if ctx.is_main else None
    if metrics is not None:
        metrics.truncate_after(step)
    wandb_run = start_wandb(args, codec_cfg, disc_cfg, train_cfg) if ctx.is_main and args.wandb_project else None
    n_params = sum(p.numel() for p in codec.parameters())
    log(f"codec {n_params / 1e6:.2f}M parameters, {codec.calculate_bitrate():.1f} kbps; discriminator "
        f"{sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M; {ctx.world_size} process(es) on {device}")
    log(f"train {len(train_ok)} files, val {len(val_ok)} scored; {batches_per_epoch} steps/epoch, "
        f"schedule {total_steps} steps, this run to step {last_step}")

    def checkpoint_state(epoch: int) -> dict:
        state = {
            "model_state": codec.state_dict(),
            "config": config_to_dict(codec_cfg),
            "discriminator_state": disc.state_dict(),
            "discriminator_config": config_to_dict(disc_cfg),
            "train_config": config_to_dict(train_cfg),
            "optimizer_g": opt_g.state_dict(),
            "optimizer_d": opt_d.state_dict(),
            "scheduler_g": sched_g.state_dict(),
            "scheduler_d": sched_d.state_dict(),
            "step": step,
            "epoch": epoch,
            "batches_per_epoch": batches_per_epoch,
            "best_mel_distance": best_mel,
            "rng": rng_state(),
            "args": {k: (str(v) if v is not None else None) for k, v in vars(args).items()},
        }
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        return state

    def run_validation(epoch: int) -> None:
        nonlocal best_mel
        if ctx.is_main and val_ok:
            t0 = time.time()
            row = validate(codec, val_ok, train_cfg.val_seconds, device)
            row = {"step": step, "epoch": epoch, "split": "val", **row, "seconds": round(time.time() - t0, 1)}
            metrics.log(row)
            if wandb_run is not None:
                wandb_run.log({f"val/{k}": v for k, v in row.items() if k not in ("step", "split")}, step=step)
            tqdm_write(f"val step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
            if row["mel_distance"] < best_mel:
                best_mel = row["mel_distance"]
                save_checkpoint(out_dir / "best_codec.pt", checkpoint_state(epoch))
        if ctx.enabled:
            dist.barrier()

    def broadcast_codebooks() -> None:
        """Each rank changed its codebooks from its own batch; keep rank 0's everywhere."""
        if ctx.enabled:
            for q in codec.quantizer.quantizers:
                dist.broadcast(q.codebook.weight.data, 0)
            dist.broadcast(codec.quantizer.code_usage, 0)

    from tqdm import tqdm

    bar = tqdm(total=last_step, initial=step, disable=not ctx.is_main, dynamic_ncols=True, mininterval=2.0)
    tqdm_write = bar.write if ctx.is_main else (lambda s: None)
    codec.train()
    disc.train()
    epoch = step // batches_per_epoch
    t_last, step_last = time.time(), step
    while step < last_step:
        batches = epoch_batches(len(train_ok), epoch, args.seed, train_cfg.batch_size, ctx.rank, ctx.world_size)
        loader = DataLoader(
            dataset, batch_sampler=batches[step - epoch * batches_per_epoch :], num_workers=args.num_workers,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(args.seed),
            persistent_workers=False,
        )
        for wav in loader:
            wav = wav.to(device, non_blocking=True)  # (B, 1, T)
            if step == 0:  # codebooks start on the first batch's latents (see init_from_latents)
                with torch.no_grad():
                    codec.quantizer.init_from_latents(codec.encoder(wav), torch.Generator().manual_seed(args.seed))
                broadcast_codebooks()
            adversarial = args.use_discriminators and epoch >= args.discriminator_start_epoch
            with amp:
                out = model(wav)
            recon = out["audio"]
            losses = {
                "mel_loss": mel_loss(recon, wav),
                "commitment_loss": out["commitment_loss"],
                "codebook_loss": out["codebook_loss"],
            }
            loss_d = None
            if adversarial:
                with amp:
                    loss_d = gan.discriminator_loss(wav, recon)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                torch.nn.utils.clip_grad_norm_(disc.parameters(), train_cfg.discriminator_grad_clip)
                opt_d.step()
                sched_d.step()
                with amp:
                    losses.update(gan.generator_loss(wav, recon))
            total = sum(weights[k] * v for k, v in losses.items())
            opt_g.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(codec.parameters(), train_cfg.grad_clip)
            opt_g.step()
            sched_g.step()
            step += 1

            restarted = 0
            if train_cfg.dead_code_every and step % train_cfg.dead_code_every == 0:
                restarted = codec.quantizer.restart_dead_codes(torch.Generator().manual_seed(args.seed * 7919 + step))
                broadcast_codebooks()

            if step % args.log_every == 0 or step == last_step:
                row = {k: float(v.detach()) for k, v in losses.items()}
                row.update(loss=float(total.detach()), snr=float(out["snr"]), codebook_perplexity=float(out["codebook_perplexity"]),
                           grad_norm=float(grad_norm))
                if loss_d is not None:
                    row["discriminator_loss"] = float(loss_d.detach())
                row = all_reduce_mean(row, ctx)
                now = time.time()
                per_step = (now - t_last) / max(step - step_last, 1)  # the last row may cover fewer steps
                row = {"step": step, "epoch": epoch, "split": "train", "lr": sched_g.get_last_lr()[0], **row,
                       "dead_codes_restarted": restarted, "seconds_per_step": round(per_step, 3)}
                t_last, step_last = now, step
                if ctx.is_main:
                    metrics.log(row)
                    if wandb_run is not None:
                        wandb_run.log({f"train/{k}": v for k, v in row.items() if k not in ("step", "split")}, step=step)
                    bar.set_postfix(mel=f"{row['mel_loss']:.3f}", snr=f"{row['snr']:.1f}", ppl=f"{row['codebook_perplexity']:.0f}")
            bar.update(1)
            if step % args.val_every == 0 or step == last_step:
                run_validation(epoch)
            if ctx.is_main and (step % args.save_every == 0 or step == last_step):
                save_checkpoint(out_dir / "last.pt", checkpoint_state(epoch))
            if step >= last_step:
                break
        else:
            epoch += 1
    bar.close()

    if ctx.is_main:
        best = out_dir / "best_codec.pt" if (out_dir / "best_codec.pt").is_file() else out_dir / "last.pt"
        shipped = TeluCodec.from_pretrained(best)
        shipped.save(out_dir)
        log(f"done at step {step}: {out_dir / 'last.pt'}, {out_dir / 'best_codec.pt'} "
            f"(best val mel distance {best_mel:.3f}), shipped model {out_dir / 'model.safetensors'}")
    if wandb_run is not None:
        wandb_run.finish()
    if ctx.enabled:
        dist.barrier()
    cleanup_distributed()
    return {
        "step": step,
        "best_mel_distance": best_mel,
        "skipped": {"train": [(str(p), r) for p, r, _ in train_skipped], "val": [(str(p), r) for p, r, _ in val_skipped]},
    }


def start_wandb(args, codec_cfg, disc_cfg, train_cfg):
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb_project needs wandb: `pip install wandb`, or drop the flag") from None
    return wandb.init(
        project=args.wandb_project,
        config={"codec": config_to_dict(codec_cfg), "discriminator": config_to_dict(disc_cfg),
                "train": config_to_dict(train_cfg), "args": vars(args)},
    )


if __name__ == "__main__":
    main()
