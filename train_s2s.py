"""Train the Telugu S2S transformer on speech pairs, as codec codes.

Usage (the mission's Phase 5 command, paths from the workspace by default):
    python train_s2s.py --data_dir /workspace/telugu_data --codec_path /workspace/models/codec/best_codec.pt \\
        --checkpoint_dir /workspace/models/s2s --batch_size 8 --num_epochs 200 --learning_rate 5e-5 \\
        --hidden_dim 768 --num_encoder_layers 12 --num_decoder_layers 12 --experiment_name telugu_s2s_production
    python train_s2s.py --preset demo --learning_rate 1e-3 ...   # the CPU real-time model
    python train_s2s.py ... --resume                               # continue from <checkpoint_dir>/last.pt
    python train_s2s.py ... --init_from checkpoints/demo/s2s       # fine-tune shipped weights (fresh optimizer)
    torchrun --nproc_per_node 2 train_s2s.py ...                   # DDP (NCCL on GPUs, gloo on CPUs)

Data: <data_dir>/metadata/{train,validation}_pairs.json, lists of {"input_path", "target_path",
"speaker_id", "emotion_id", "history": [{"input_path", "target_path", ...}, ...], "input_text"} with
paths relative to <data_dir> (or absolute). A pair with history trains the context path: its earlier
turns (user, agent, user, ...; the last S2SConfig.max_context_turns of them) become `context`.
"input_text" (optional: the user turn's transcript) feeds the encoder's CTC loss when the config has
encoder_ctc_weight > 0; pairs without it simply add no CTC loss. "target_text" (optional: the
reply's transcript) is what a model with reply_text_weight > 0 writes before it speaks (the inner
monologue); a new model's word vocabulary (reply_vocab) is built from the training pairs' target_text.

Token cache: every WAV the pairs refer to is encoded once with the codec and kept as int16 codes
in <token_cache>/<codec id>/shard-*.pt (default <data_dir>/token_cache). The codec id hashes the
codec's weights, a WAV's key is its path, size and mtime: a new codec or a changed file is
encoded again, anything else never. Shards are written every few hundred files, so a killed run
keeps what it encoded; under torchrun the ranks share the work.

Reading the question across voices (README, "What the test split asks of a model"): with
--input_augment_copies N each training user turn is also rendered N times as a new pseudo-voice
(perturb_voice: F0, formants, tempo, room, microphone, noise, the corpus's own transforms) and
encoded by the codec, cached in <token_cache>/<codec id>/perturbed.pt; every step reads one of a
turn's renderings at random (validation reads the originals). With --config '{"encoder_input":
"codec", "codec_latent_dim": <codec latent_dim>}' the encoder reads the codes through the codec's
own vectors (copied from --codec_path when the run starts) instead of learned embeddings.

Training: loss = mean over codebooks of cross-entropy + end-of-reply loss (+ encoder_ctc_weight x the
CTC of the user turn's text; + reply_text_weight x the cross-entropy of the reply's words;
decoder_input_dropout hides some of the reply's past); AdamW, linear warm-up
then cosine decay (training.lr_at, over --num_epochs or --schedule_steps), gradient clipping, bf16
autocast where bf16 is native (CUDA; CPUs with AMX / AVX512-BF16; --precision).
Validation (each epoch, or every --eval_every steps and at the run's last step): loss, token
accuracy and perplexity per codebook, end-of-reply accuracy, and val_input_gain (how much lower
the loss is with each reply's own question than with another's: near 0, the model ignores what
was asked), and with a text head the CTC loss and character error rate of its transcripts
(val_text_loss, val_cer), and with an inner monologue the reply words' loss, teacher-forced
accuracy, exact replies and input gain (val_reply_text_exact, val_text_input_gain, ...). The same
figures on the first --eval_train_batches batches of training
pairs (train_input_gain, train_cer, ...) tell whether the model reads even the questions it learns
from.

Outputs in --checkpoint_dir: last.pt (every evaluation, --save_every steps and at the end; exact
resume: model, optimizer, step, position in the epoch, every rank's RNG), s2s_best.pt (lowest
validation loss), the best model in shipped form (model.safetensors + config.json, what
TeluguS2STransformer.from_pretrained and the server load) and <experiment_name>.csv / .jsonl.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from audio_io import PAIRS_FILES, load_audio, read_json
from config import EMOTIONS, VOICES, add_workspace_arg, config_from_dict, config_to_dict, workspace_from_args
from s2s_transformer import (
    CHECKPOINT_NAMES,
    PRESETS,
    ROLE_AGENT,
    ROLE_USER,
    ContextTurns,
    S2SConfig,
    TeluguS2STransformer,
    build_reply_vocab,
    ctc_best_path,
    pad_ids,
    reply_ids,
    reply_index,
    text_to_ids,
)
from training import (
    MetricsLog,
    all_reduce_mean,
    cleanup_distributed,
    init_distributed,
    load_checkpoint,
    load_pretrained_state,
    lr_at,
    resolve_precision,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    weight_files,
)

SHARD_FILES = 256  # WAVs per token-cache shard


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workspace_arg(p)
    p.add_argument("--data_dir", default=None, help="dataset root with metadata/{train,validation}_pairs.json "
                   "(default: <workspace>/telugu_synth)")
    p.add_argument("--codec_path", default=None, help="codec: a .pt checkpoint, a .safetensors file or a model folder "
                   "(default: <workspace>/models/codec)")
    p.add_argument("--checkpoint_dir", default=None, help="where checkpoints and logs go (default: <workspace>/models/s2s)")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per optimizer step and per process")
    p.add_argument("--num_epochs", type=int, default=200, help="epochs; the LR schedule spans them")
    p.add_argument("--learning_rate", type=float, default=5e-5, help="peak learning rate (AdamW)")
    p.add_argument("--hidden_dim", type=int, default=None, help="model width (default: the preset's)")
    p.add_argument("--num_encoder_layers", type=int, default=None, help="Conformer encoder layers (default: the preset's)")
    p.add_argument("--num_decoder_layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--experiment_name", default="telugu_s2s", help="name of the run: metric files, wandb run")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS), help="base model size (full = the mission's)")
    p.add_argument("--config", default=None, help="JSON file of S2SConfig field overrides, applied after --preset")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue a run: a checkpoint path, or no value for <checkpoint_dir>/last.pt")
    p.add_argument("--max_steps", type=int, default=0,
                   help="stop after this many optimizer steps in all (0: run all epochs); the LR schedule "
                        "still follows --num_epochs, so a stopped run resumes exactly")
    p.add_argument("--schedule_steps", type=int, default=0,
                   help="length of the LR schedule in optimizer steps (0: --num_epochs of steps); a run "
                        "meant to stop at --max_steps decays its rate fully with --schedule_steps equal to it")
    p.add_argument("--init_from", default=None,
                   help="start from these weights (a model folder such as checkpoints/demo/s2s, a .safetensors "
                        "file or a checkpoint) with a fresh optimizer and schedule: the model config is theirs, "
                        "--config may still change non-shape fields (dropout); ignored when resuming")
    p.add_argument("--init_exclude", default="",
                   help="with --init_from: comma-separated parameter-name prefixes left at their fresh init "
                        "(e.g. 'encoder.' to retrain a collapsed encoder under a new loss)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype: auto = bf16 on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), "
                        "fp32 elsewhere; a resumed run keeps its own unless this names one")
    p.add_argument("--warmup_steps", type=int, default=1000, help="linear LR warm-up steps (capped at 10%% of the run)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay on matrices")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--eval_every", type=int, default=0, help="validate every N steps (0: at the end of each epoch)")
    p.add_argument("--save_every", type=int, default=500, help="also write last.pt every N steps (0: only at evaluations)")
    p.add_argument("--max_val_batches", type=int, default=0, help="validate on at most N batches per process (0: all)")
    p.add_argument("--eval_train_batches", type=int, default=4,
                   help="at each validation, also measure the first N batches of training pairs (train_input_gain, "
                        "train_cer, ...: can the model read the questions it learns from?); 0: off")
    p.add_argument("--log_every", type=int, default=10, help="write a training metrics row every N steps")
    p.add_argument("--input_augment_copies", type=int, default=0,
                   help="render each training user turn this many more times as a new pseudo-voice (perturb_voice: "
                        "F0, formants, tempo, room, microphone, noise), encoded by the codec and cached beside the "
                        "token cache; each step reads one rendering at random (0: off)")
    p.add_argument("--augment_workers", type=int, default=0,
                   help="processes rendering those copies (0: the CPU count, at most 16)")
    p.add_argument("--max_input_seconds", type=float, default=20.0, help="pairs with a longer user turn are skipped")
    p.add_argument("--max_reply_seconds", type=float, default=15.0, help="pairs with a longer reply are skipped")
    p.add_argument("--token_cache", default=None, help="token cache folder (default: <data_dir>/token_cache)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    p.add_argument("--seed", type=int, default=1234, help="seed for data order, init and dropout")
    p.add_argument("--wandb_project", default=None, help="log to Weights & Biases under this project (off by default)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------
# Data


def resolve(path: str, data_dir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else data_dir / p


def load_pairs(data_dir: Path, split: str) -> list[dict]:
    """The pairs of a split, validated, paths resolved to absolute."""
    path = data_dir / "metadata" / PAIRS_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --data_dir must hold metadata/{PAIRS_FILES[split]} "
                                "(python make_telugu_speech.py builds it)")
    pairs = read_json(path)
    if not isinstance(pairs, list) or not pairs:
        raise ValueError(f"{path}: expected a non-empty JSON list of pairs")
    out = []
    for i, pair in enumerate(pairs):
        where = f"{path.name}[{i}]"
        for key in ("input_path", "target_path", "speaker_id", "emotion_id"):
            if key not in pair:
                raise ValueError(f"{where}: missing {key!r}")
        if not 0 <= int(pair["speaker_id"]) < len(VOICES):
            raise ValueError(f"{where}: speaker_id {pair['speaker_id']} outside 0..{len(VOICES) - 1}")
        if not 0 <= int(pair["emotion_id"]) < len(EMOTIONS):
            raise ValueError(f"{where}: emotion_id {pair['emotion_id']} outside 0..{len(EMOTIONS) - 1}")
        history, history_texts = [], []
        for j, turn in enumerate(pair.get("history") or []):
            if "input_path" not in turn or "target_path" not in turn:
                raise ValueError(f"{where}.history[{j}]: needs input_path and target_path")
            history.append((str(resolve(turn["input_path"], data_dir)), str(resolve(turn["target_path"], data_dir))))
            history_texts.append(str(turn.get("target_text") or ""))  # what the agent said then (context_words)
        out.append({"input": str(resolve(pair["input_path"], data_dir)), "target": str(resolve(pair["target_path"], data_dir)),
                    "speaker_id": int(pair["speaker_id"]), "emotion_id": int(pair["emotion_id"]), "history": history,
                    "history_texts": history_texts, "input_text": str(pair.get("input_text") or ""),
                    "target_text": str(pair.get("target_text") or "")})
    return out


def referenced_wavs(pairs: list[dict]) -> list[str]:
    paths = {p for pair in pairs for p in [pair["input"], pair["target"], *[x for t in pair["history"] for x in t]]}
    missing = sorted(p for p in paths if not Path(p).is_file())
    if missing:
        raise FileNotFoundError(f"{len(missing)} WAVs named in the pairs do not exist, e.g. {missing[:3]}; "
                                "rebuild the corpus or fix --data_dir")
    return sorted(paths)


def _resolve_codec_files(codec_path: Path) -> list[Path]:
    """The files that define the codec, found the way TeluCodec.from_pretrained finds them."""
    from telugu_codec import TeluCodec

    if codec_path.is_dir():
        if weight_files(codec_path):
            return weight_files(codec_path) + [codec_path / "config.json"]
        for name in TeluCodec.CHECKPOINT_NAMES:
            if (codec_path / name).is_file():
                return [codec_path / name]
        raise FileNotFoundError(f"{codec_path} holds no codec (model.safetensors or {TeluCodec.CHECKPOINT_NAMES})")
    if not codec_path.is_file():
        raise FileNotFoundError(f"codec {codec_path} not found: pass --codec_path (train_codec_dac.py writes best_codec.pt)")
    if codec_path.suffix == ".safetensors":
        return [codec_path, codec_path.with_name("config.json")]
    return [codec_path]


def codec_identity(codec_path: Path) -> str:
    """16 hex digits of the SHA-256 of the codec's files: the token cache's key."""
    h = hashlib.sha256()
    for f in _resolve_codec_files(codec_path):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def wav_key(path: str) -> str:
    st = os.stat(path)
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def build_token_cache(wavs: list[str], cache_dir: Path, codec_path: Path, ctx, log=print) -> dict[str, torch.Tensor]:
    """Codes (K, F) int16 of every WAV, from the cache, encoding what is missing (split over ranks)."""
    cache_dir.mkdir(parents=True, exist_ok=True)

    def load_shards() -> dict[str, torch.Tensor]:
        cache: dict[str, torch.Tensor] = {}
        for shard in sorted(cache_dir.glob("shard-*.pt")):
            cache.update(load_checkpoint(shard))
        return cache

    cache = load_shards()
    keys = {w: wav_key(w) for w in wavs}
    missing = [w for w in wavs if keys[w] not in cache]
    if ctx.is_main:
        log(f"token cache {cache_dir}: {len(wavs) - len(missing)} of {len(wavs)} WAVs cached, {len(missing)} to encode")
    mine = missing[ctx.rank :: ctx.world_size]
    if mine:
        from telugu_codec import TeluCodec

        codec = TeluCodec.from_pretrained(codec_path, map_location=ctx.device)
        shard: dict[str, torch.Tensor] = {}
        start = time.time()
        for i, w in enumerate(mine, 1):
            wav = torch.from_numpy(load_audio(w)).to(ctx.device)[None, None]
            shard[keys[w]] = codec.encode(wav)[0].to("cpu", torch.int16)
            if len(shard) == SHARD_FILES or i == len(mine):
                save_checkpoint(cache_dir / f"shard-{ctx.rank}-{time.time_ns()}.pt", shard)
                shard = {}
            if ctx.is_main and (i % 200 == 0 or i == len(mine)):
                log(f"  encoded {i}/{len(mine)} WAVs on rank 0 ({time.time() - start:.0f} s)")
        del codec
    if ctx.enabled:
        dist.barrier()
    if missing:
        cache = load_shards()
    return {w: cache[keys[w]] for w in wavs}


def perturb_voice(wav: np.ndarray, seed: int) -> np.ndarray:
    """A new pseudo-speaker and channel for one user turn, in the audio domain, with the corpus's
    own transforms: change_voice (formant ratio 0.88-1.18, median F0 90-260 Hz, F0 range
    0.8-1.25, tempo 0.88-1.14), then a random room, microphone EQ, noise and level (augment)."""
    from make_telugu_speech import augment, augmentation_params, change_voice

    rng = np.random.default_rng(seed)
    wav = change_voice(wav, pitch_hz=float(rng.uniform(90, 260)), pitch_range=float(rng.uniform(0.8, 1.25)),
                       formant_ratio=float(rng.uniform(0.88, 1.18)), tempo=float(rng.uniform(0.88, 1.14)))
    return augment(wav, augmentation_params(seed), seed)


_WORKER_CODEC = None  # one codec per rendering process, loaded on its first job


def _perturbed_codes(job: tuple[str, int, str]) -> torch.Tensor:
    path, seed, codec_path = job
    from telugu_codec import TeluCodec

    global _WORKER_CODEC
    if _WORKER_CODEC is None:
        torch.set_num_threads(1)
        _WORKER_CODEC = TeluCodec.from_pretrained(codec_path).eval()
    wav = perturb_voice(load_audio(path), seed)
    with torch.no_grad():
        return _WORKER_CODEC.encode(torch.from_numpy(wav)[None, None])[0].short()  # (K, F)


def perturbed_code_copies(paths: list[str], copies: int, codec_path: Path, cache: Path, workers: int,
                          log=print) -> list[list[torch.Tensor]]:
    """`copies` perturb_voice renderings of each WAV, as codec token ids (K, F) int16: one list per
    path. Cached in `cache`, keyed like the token cache (path, size, mtime: a changed file is
    rendered again) and by the copy's seed (from the file name and the copy's number), so a rerun
    with the same files and codec renders nothing."""
    import multiprocessing as mp
    import zlib

    done: dict = torch.load(cache) if cache.is_file() else {}
    jobs = [(p, zlib.crc32(f"{Path(p).name}|{c}".encode()), str(codec_path)) for p in paths for c in range(copies)]
    keys = {p: wav_key(p) for p in paths}
    todo = [j for j in jobs if (keys[j[0]], j[1]) not in done]
    if todo:
        log(f"rendering {len(todo)} perturbed copies of user turns through the codec ({workers} processes)")
        start = time.time()
        with mp.get_context("spawn").Pool(workers) as pool:
            for n, (job, codes) in enumerate(zip(todo, pool.imap(_perturbed_codes, todo, chunksize=8)), 1):
                done[(keys[job[0]], job[1])] = codes
                if n % 5000 == 0 or n == len(todo):
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(done, cache.with_suffix(".partial"))
                    cache.with_suffix(".partial").replace(cache)
                    log(f"  {n} of {len(todo)} ({time.time() - start:.0f} s)")
    return [[done[(keys[j[0]], j[1])] for j in jobs[i * copies : (i + 1) * copies]] for i in range(len(paths))]


@dataclass
class Example:
    input: torch.Tensor  # (K, F_in) int16
    target: torch.Tensor  # (K, F_out) int16
    speaker_id: int
    emotion_id: int
    history: list  # [(role, codes (K, F), the agent's words or None), ...] oldest first
    # (L,) text_to_ids of the user turn; empty when the pair has no transcript
    input_text: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # other renderings of the user turn (--input_augment_copies): (K, F') int16 each
    input_variants: list = field(default_factory=list)
    # (L,) reply_ids of the reply's words (inner monologue); empty when there is none or no transcript
    target_text: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


def make_examples(pairs, codes, cfg: S2SConfig, max_input_frames: int, max_reply_frames: int,
                  variants: dict[str, list[torch.Tensor]] | None = None) -> tuple[list[Example], int]:
    """Pairs -> Examples of codes; `variants` maps a user turn's WAV to other renderings of it."""
    examples, skipped = [], 0
    index = reply_index(cfg.reply_vocab) if cfg.reply_text_weight > 0 else None
    for pair in pairs:
        x, y = codes[pair["input"]], codes[pair["target"]]
        if x.shape[1] > max_input_frames or y.shape[1] > max_reply_frames:
            skipped += 1
            continue
        turns = [t for (u, a), said in zip(pair["history"], pair.get("history_texts") or [""] * len(pair["history"]))
                 for t in ((ROLE_USER, codes[u], None), (ROLE_AGENT, codes[a], said or None))]
        text = torch.tensor(text_to_ids(pair.get("input_text", "")), dtype=torch.long)
        others = [v for v in (variants or {}).get(pair["input"], []) if v.shape[1] <= max_input_frames]
        words = reply_ids(pair.get("target_text", ""), index, cfg.max_reply_words) if index is not None else []
        examples.append(Example(x, y, pair["speaker_id"], pair["emotion_id"], turns[-cfg.max_context_turns :], text,
                                others, torch.tensor(words, dtype=torch.long)))
    return examples, skipped


def check_codes_fit(examples: list[Example], cfg: S2SConfig) -> None:
    ex = examples[0]
    if ex.input.shape[0] != cfg.n_codebooks:
        raise ValueError(f"the codec gives {ex.input.shape[0]} codebooks, the model expects {cfg.n_codebooks}")
    top = max(int(e.input.max()) for e in examples[:200])
    if top >= cfg.codebook_size:
        raise ValueError(f"codes reach {top}, the model's codebook_size is {cfg.codebook_size}")


def epoch_batches(examples: list[Example], batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded shuffle, similar lengths grouped (50 batches at a
    time, sorted by reply length) to waste little on padding, the same count on every rank."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples))
    per_step = batch_size * world
    n_steps = max(1, len(order) // per_step)
    order = np.resize(order, n_steps * per_step)  # drop (or, for tiny sets, repeat) to whole steps
    window = per_step * 50
    for s in range(0, len(order), window):
        part = order[s : s + window]
        order[s : s + window] = part[np.argsort([examples[i].target.shape[1] for i in part], kind="stable")]
    steps = [order[i * per_step : (i + 1) * per_step] for i in range(n_steps)]
    steps = [steps[i] for i in rng.permutation(n_steps)]
    return [step[rank::world].tolist() for step in steps]


@dataclass
class Batch:
    codes: torch.Tensor  # (B, K, F_in)
    input_lengths: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, K, F_out)
    target_lengths: torch.Tensor  # (B,)
    speaker_id: torch.Tensor  # (B,)
    emotion_id: torch.Tensor  # (B,)
    context: ContextTurns | None
    input_text: torch.Tensor | None  # (B, L) padded with 0; None: no CTC loss
    input_text_lengths: torch.Tensor  # (B,) 0 = no transcript
    target_text: torch.Tensor  # (B, W) the reply's word ids, padded with 0
    target_text_lengths: torch.Tensor  # (B,) 0 = no words (no transcript, or no inner monologue)


def pad_stack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([t.shape[1] for t in tensors])
    out = torch.zeros(len(tensors), tensors[0].shape[0], int(lengths.max()), dtype=torch.long)
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[1]] = t.long()
    return out, lengths


def collate(examples: list[Example], indices: list[int], device, pick: np.random.Generator | None = None) -> Batch:
    """A batch of examples; with `pick`, each user turn is one of its renderings (the original or
    an input_variant), drawn uniformly."""
    items = [examples[i] for i in indices]
    inputs = [e.input if pick is None or not e.input_variants
              else ([e.input] + e.input_variants)[int(pick.integers(1 + len(e.input_variants)))] for e in items]
    codes, in_len = pad_stack(inputs)
    target, out_len = pad_stack([e.target for e in items])
    context = None
    if any(e.history for e in items):
        context = ContextTurns.from_turns([[(r, c.long(), t) for r, c, t in e.history] for e in items]).to(device)
    text, text_len = pad_ids([e.input_text for e in items])
    words, words_len = pad_ids([e.target_text for e in items])
    return Batch(codes.to(device), in_len.to(device), target.to(device), out_len.to(device),
                 torch.tensor([e.speaker_id for e in items], device=device),
                 torch.tensor([e.emotion_id for e in items], device=device), context,
                 text.to(device), text_len.to(device), words.to(device), words_len.to(device))


# --------------------------------------------------------------------------------------
# Training


def run_model(model, batch: Batch, autocast: bool):
    with torch.autocast(batch.codes.device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(batch.codes, batch.target, batch.speaker_id, batch.emotion_id, context=batch.context,
                     input_lengths=batch.input_lengths, target_lengths=batch.target_lengths,
                     input_text=batch.input_text, input_text_lengths=batch.input_text_lengths,
                     target_text=batch.target_text, target_text_lengths=batch.target_text_lengths)


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@torch.no_grad()
def evaluate(model, examples, args, ctx, autocast: bool, prefix: str = "val",
             max_batches: int | None = None) -> dict[str, float]:
    """Validation metrics over this rank's share of the pairs, summed over ranks: loss, per-codebook
    accuracy and perplexity, end-of-reply accuracy (frame- and step-weighted), and val_input_gain:
    how much the user's turn is worth to the model, the code cross-entropy (nats per code) with
    each reply paired with another pair's user turn (the batch rolled by one) minus that with its
    own. Near 0, the model answers the same whatever was asked. With a text head: val_text_loss
    (CTC, nats per character) and val_cer, the character error rate of its best-path transcripts
    of the user turns (pairs with a transcript only). With an inner monologue: val_reply_text_loss
    (nats per word), val_reply_text_accuracy (teacher-forced words), val_reply_text_exact (replies
    whose every word and end of text are predicted right) and val_text_input_gain (as input_gain,
    for the words: the reply's content, where the codes' gain only shows what the speech adds);
    the validation loss then includes reply_text_weight x the words' loss.

    The same on training pairs (prefix "train", the first `max_batches` of a fixed order) tells a
    model that cannot use the question at all (train_input_gain ~ 0 too) from one that reads the
    questions it was trained on but not new voices and paraphrases (val_input_gain ~ 0 only)."""
    model.eval()
    batches = epoch_batches(examples, args.batch_size, 0, args.seed, ctx.rank, ctx.world_size)
    max_batches = args.max_val_batches if max_batches is None else max_batches
    if max_batches:
        batches = batches[:max_batches]
    cfg = (model.module if hasattr(model, "module") else model).config
    k = None
    totals = None
    text_totals = torch.zeros(4, device=ctx.device)  # CTC loss sum, pairs with text, char errors, chars
    # reply words: CE sum, tokens, correct tokens, rows, rows all correct, rolled-question CE sum, its tokens
    reply_totals = torch.zeros(7, device=ctx.device)
    for idx in batches:
        batch = collate(examples, idx, ctx.device)
        out = run_model(model, batch, autocast)
        if out.text_loss is not None:
            has = batch.input_text_lengths > 0
            heard = ctc_best_path(out.text_logits, out.text_valid)
            wanted = [batch.input_text[i, :n].tolist() for i, n in enumerate(batch.input_text_lengths.tolist())]
            errors = sum(edit_distance(h, w) for h, w, ok in zip(heard, wanted, has.tolist()) if ok)
            text_totals += torch.tensor([float(out.text_loss) * int(has.sum()), int(has.sum()), errors,
                                         int(batch.input_text_lengths.sum())], device=ctx.device)
        frames = out.metrics["frames"].float()
        k = out.codebook_losses.shape[0]
        swapped_ce, swapped_frames = frames.new_zeros(1), frames.new_zeros(1)
        swapped = None
        if len(idx) > 1:
            other = replace(batch, codes=batch.codes.roll(1, 0), input_lengths=batch.input_lengths.roll(1, 0),
                            input_text=None)  # the reply's codes (and words) only: no CTC
            swapped = run_model(model, other, autocast)
            swapped_ce = swapped.codebook_losses.float().mean()[None] * frames
            swapped_frames = frames[None]
        if out.reply_text_loss is not None:
            tokens = out.metrics["reply_text_tokens"].float()
            ok = out.reply_text_target >= 0
            right = (out.reply_text_logits.argmax(-1) == out.reply_text_target) | ~ok
            rows = ok.any(1)
            reply_totals += torch.stack([
                out.reply_text_loss.float() * tokens, tokens, out.metrics["reply_text_accuracy"].float() * tokens,
                rows.sum().float(), (right.all(1) & rows).sum().float(),
                swapped.reply_text_loss.float() * tokens if swapped is not None else tokens.new_zeros(()),
                tokens if swapped is not None else tokens.new_zeros(())])
        # frame-weighted sums: per-codebook CE (k), accuracy (k), stop loss, stop accuracy, then for
        # the rolled batch its mean CE, its frames and the own-question mean CE over those frames; frames
        row = torch.cat([out.codebook_losses.float() * frames, out.metrics["accuracy"].float() * frames,
                         (out.stop_loss.float() * frames)[None], (out.metrics["stop_accuracy"].float() * frames)[None],
                         swapped_ce, swapped_frames, (out.codebook_losses.float().mean() * swapped_frames),
                         frames[None]])
        totals = row if totals is None else totals + row
    if ctx.enabled:
        dist.all_reduce(totals)
        dist.all_reduce(text_totals)
        dist.all_reduce(reply_totals)
    model.train()
    n = totals[-1]
    swapped_n = totals[2 * k + 3].clamp_min(1)
    input_gain = float((totals[2 * k + 2] - totals[2 * k + 4]) / swapped_n)
    ce, acc = totals[:k] / n, totals[k : 2 * k] / n
    stop_loss, stop_acc = totals[2 * k] / n, totals[2 * k + 1] / n
    metrics = {"loss": float(ce.mean() + cfg.stop_loss_weight * stop_loss), "accuracy": float(acc.mean()),
               "input_gain": input_gain, "stop_accuracy": float(stop_acc), "stop_loss": float(stop_loss)}
    if reply_totals[1] > 0:  # the reply's words, teacher forced; exact: every word and the EOT right
        metrics["reply_text_loss"] = float(reply_totals[0] / reply_totals[1])
        metrics["loss"] += cfg.reply_text_weight * metrics["reply_text_loss"]
        metrics["reply_text_accuracy"] = float(reply_totals[2] / reply_totals[1])
        metrics["reply_text_exact"] = float(reply_totals[4] / reply_totals[3].clamp_min(1))
        if reply_totals[6] > 0:
            metrics["text_input_gain"] = float((reply_totals[5] - reply_totals[0]) / reply_totals[6])
    if text_totals[1] > 0:
        metrics["text_loss"] = float(text_totals[0] / text_totals[1])
        metrics["cer"] = float(text_totals[2] / text_totals[3].clamp_min(1))
    for i in range(k):
        metrics[f"acc_cb{i}"] = float(acc[i])
        metrics[f"ppl_cb{i}"] = float(torch.exp(ce[i]))
    return {f"{prefix}_{key}": v for key, v in metrics.items()}


def build_config(args, checkpoint: dict | None, init_config: dict | None = None,
                 reply_texts: list[str] = ()) -> S2SConfig:
    """The model config: from the checkpoint when resuming, from the --init_from weights' config
    (then --config) when starting from them (the size flags may contradict neither), else
    --preset, then --config, then the size flags. A config that turns the inner monologue on
    without a vocabulary gets the words of `reply_texts` (the training pairs' target_text: a
    history turn's words are some pair's reply in a corpus with transcripts; others read as UNK)."""
    flags = {k: getattr(args, k) for k in ("hidden_dim", "num_encoder_layers", "num_decoder_layers")
             if getattr(args, k) is not None}
    stored, what = (checkpoint["config"], "--resume") if checkpoint is not None else (init_config, "--init_from")
    if stored is not None:
        cfg = config_from_dict(S2SConfig, stored)
        clash = {k: (v, getattr(cfg, k)) for k, v in flags.items() if getattr(cfg, k) != v}
        if clash:
            raise ValueError(f"{what}: the stored model differs from the flags {clash} (flag, stored); "
                             "drop the flags or start a new --checkpoint_dir")
        if checkpoint is None and args.config:
            cfg = with_overrides(cfg, read_json(args.config), reply_texts)
        return cfg
    cfg = S2SConfig.preset(args.preset)
    if args.config:
        cfg = with_overrides(cfg, read_json(args.config), reply_texts)
    return config_from_dict(S2SConfig, flags, base=cfg) if flags else cfg


def with_overrides(base: S2SConfig, overrides: dict, reply_texts: list[str]) -> S2SConfig:
    """`base` with --config's fields; reply_vocab built from reply_texts where the result needs one."""
    if overrides.get("reply_text_weight", base.reply_text_weight) > 0 and not overrides.get("reply_vocab", base.reply_vocab):
        vocab = build_reply_vocab(reply_texts)
        if not vocab:
            raise ValueError("reply_text_weight > 0 but no training pair has a target_text to learn the reply words "
                             "from: set reply_text_weight 0 for data without transcripts")
        overrides = {**overrides, "reply_vocab": vocab}
    return config_from_dict(S2SConfig, overrides, base=base)


# Parts that only some configs have (text_head: encoder_ctc_weight > 0; reply_*: reply_text_weight > 0;
# codec_embed: encoder_input "codec", reloaded from the codec; context_word_tag: context_words):
# --init_from may add or drop them.
OPTIONAL_HEADS = ("text_head.", "codec_embed.", "reply_embed.", "reply_head.", "context_word_tag")


def load_init_state(model: TeluguS2STransformer, state: dict, exclude: list[str]) -> list[str]:
    """Copy --init_from weights into `model`, except parameters named by an `exclude` prefix; a
    head the new config adds starts fresh, one it drops is ignored. Returns the names left fresh."""
    state = {k: v for k, v in state.items() if not k.startswith(tuple(exclude))} if exclude else state
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise ValueError(f"--init_from weights do not fit this model ({str(e).splitlines()[-1].strip()}); "
                         "the stored config and --config must agree on every size") from e
    fresh_ok = tuple(exclude) + OPTIONAL_HEADS
    bad_missing = [k for k in missing if not k.startswith(fresh_ok)]
    bad_unexpected = [k for k in unexpected if not k.startswith(OPTIONAL_HEADS)]
    if bad_missing or bad_unexpected:
        raise ValueError(f"--init_from weights do not fit this model: missing {bad_missing[:5]}, unexpected "
                         f"{bad_unexpected[:5]}; the stored config and --config must agree on every size")
    return list(missing)


def make_optimizer(model, args) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95))


def gather_rng(ctx) -> list:
    """Every rank's RNG state (dropout masks differ per rank), for an exact resume under DDP."""
    state = rng_state()
    if not ctx.enabled:
        return [state]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def check_ranks_in_sync(model, ctx) -> None:
    """DDP keeps replicas identical; a mismatch means a rank diverged (e.g. different data)."""
    if not ctx.enabled:
        return
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(total) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, total)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"DDP replicas diverged: parameter sums {[g.item() for g in gathered]}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    ws = workspace_from_args(args)
    data_dir = Path(args.data_dir or ws.synth_corpus).expanduser().resolve()
    codec_path = Path(args.codec_path or ws.codec_dir).expanduser().resolve()
    ckpt_dir = Path(args.checkpoint_dir or ws.s2s_dir).expanduser().resolve()
    for name in ("batch_size", "num_epochs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    if args.learning_rate <= 0:
        raise SystemExit("--learning_rate must be > 0")

    ctx = init_distributed(args.device)
    log = print if ctx.is_main else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return train(args, ctx, log, data_dir, codec_path, ckpt_dir)
    finally:
        cleanup_distributed()


def train(args, ctx, log, data_dir: Path, codec_path: Path, ckpt_dir: Path) -> dict:
    resume_path = None
    if args.resume:
        resume_path = ckpt_dir / "last.pt" if args.resume == "auto" else Path(args.resume)
        if not resume_path.is_file():
            raise FileNotFoundError(f"--resume: {resume_path} not found")
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    init_state = init_config = None
    if checkpoint is None and args.init_from:
        init_state, init_config = load_pretrained_state(args.init_from, CHECKPOINT_NAMES)
    train_pairs, val_pairs = load_pairs(data_dir, "train"), load_pairs(data_dir, "val")
    cfg = build_config(args, checkpoint, init_config, [p["target_text"] for p in train_pairs])

    # data and token cache
    wavs = referenced_wavs(train_pairs + val_pairs)
    cache_root = Path(args.token_cache) if args.token_cache else data_dir / "token_cache"
    codes = build_token_cache(wavs, cache_root / codec_identity(codec_path), codec_path, ctx, log)
    max_in, max_out = int(args.max_input_seconds * cfg.codec_frame_rate), int(args.max_reply_seconds * cfg.codec_frame_rate)
    variants = None
    if args.input_augment_copies:
        turns = sorted({p["input"] for p in train_pairs})
        cache = cache_root / codec_identity(codec_path) / "perturbed.pt"
        workers = args.augment_workers or min(16, os.cpu_count() or 1)
        if ctx.is_main:  # renders what is missing; the other ranks then read the cache
            copies = perturbed_code_copies(turns, args.input_augment_copies, codec_path, cache, workers, log)
        if ctx.enabled:
            dist.barrier()
        if not ctx.is_main:
            copies = perturbed_code_copies(turns, args.input_augment_copies, codec_path, cache, workers, log)
        variants = dict(zip(turns, copies))
    train_set, skipped_train = make_examples(train_pairs, codes, cfg, max_in, max_out, variants)
    val_set, skipped_val = make_examples(val_pairs, codes, cfg, max_in, max_out)
    if not train_set or not val_set:
        raise ValueError(f"no pairs left after skipping those over --max_input_seconds / --max_reply_seconds "
                         f"({skipped_train} train, {skipped_val} validation skipped)")
    check_codes_fit(train_set, cfg)
    n_context = sum(1 for e in train_set if e.history)
    log(f"pairs: {len(train_set)} train ({n_context} with context), {len(val_set)} validation; "
        f"skipped as too long: {skipped_train} train, {skipped_val} validation")

    # model and optimizer
    seed_everything(args.seed)  # same init on every rank
    model = TeluguS2STransformer(cfg).to(ctx.device)
    optimizer = make_optimizer(model, args)
    steps_per_epoch = len(epoch_batches(train_set, args.batch_size, 0, args.seed, ctx.rank, ctx.world_size))
    total_steps = args.schedule_steps or steps_per_epoch * args.num_epochs
    warmup = min(args.warmup_steps, total_steps // 10)
    step, epoch, step_in_epoch, best_val = 0, 0, 0, math.inf
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, epoch, step_in_epoch = checkpoint["step"], checkpoint["epoch"], checkpoint["step_in_epoch"]
        best_val = checkpoint["best_val_loss"]
        rngs = checkpoint["rng_per_rank"]
        if len(rngs) != ctx.world_size:
            log(f"warning: resuming {len(rngs)} ranks' run with {ctx.world_size}; data order and dropout differ")
        set_rng_state(rngs[ctx.rank % len(rngs)])
        log(f"resumed {resume_path} at step {step} (epoch {epoch}, batch {step_in_epoch})")
    else:
        if init_state is not None:
            exclude = [x for x in args.init_exclude.split(",") if x]
            fresh = load_init_state(model, init_state, exclude)
            kept = f", {len(fresh)} tensors fresh ({', '.join(sorted({k.split('.')[0] for k in fresh}))})" if fresh else ""
            log(f"weights from {args.init_from}{kept}; fresh optimizer and schedule")
        if model.codec_embed is not None:  # the encoder reads the codes through this codec's own vectors
            from telugu_codec import TeluCodec

            model.load_codec_vectors(TeluCodec.from_pretrained(codec_path, map_location=ctx.device))
        seed_everything(args.seed + ctx.rank)  # different dropout per rank
    init_from = checkpoint.get("init_from") if checkpoint is not None else args.init_from
    if checkpoint is not None and args.precision == "auto":
        # a resumed run keeps the precision it trained in (checkpoints before --precision: bf16 on CUDA only)
        precision = checkpoint.get("precision", "bf16" if ctx.device.type == "cuda" else "fp32")
    else:
        precision = resolve_precision(args.precision, ctx.device)
    raw_model = model
    if ctx.enabled:
        # context_word_tag takes part only in batches whose context holds agent words: DDP must look
        # for parameters without a gradient then, or it waits for their reduction forever
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                                                          find_unused_parameters=cfg.context_words)
    autocast = precision == "bf16"
    log(f"model: {raw_model.num_parameters() / 1e6:.1f} M parameters, hidden {cfg.hidden_dim}, "
        f"{cfg.num_encoder_layers} + {cfg.num_decoder_layers} layers; {ctx.world_size} process(es) on {ctx.device}, "
        f"{precision}; "
        f"{steps_per_epoch} steps per epoch, {total_steps} in all")

    metrics_log = MetricsLog(ckpt_dir, stem=args.experiment_name) if ctx.is_main else None
    if metrics_log is not None:
        metrics_log.truncate_after(step)
    wandb = None
    if args.wandb_project and ctx.is_main:
        try:
            import wandb
        except ImportError as e:
            raise SystemExit("--wandb_project needs wandb: pip install wandb (or drop the flag)") from e
        wandb.init(project=args.wandb_project, name=args.experiment_name, id=args.experiment_name, resume="allow",
                   config={**vars(args), **config_to_dict(cfg)})

    def save_last():
        rngs = gather_rng(ctx)
        if ctx.is_main:
            save_checkpoint(ckpt_dir / "last.pt", {
                "model_state": raw_model.state_dict(), "config": config_to_dict(cfg), "optimizer": optimizer.state_dict(),
                "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "best_val_loss": best_val,
                "rng": rngs[0], "rng_per_rank": rngs, "experiment_name": args.experiment_name,
                "args": {k: v for k, v in vars(args).items()}, "precision": precision, "init_from": init_from,
            })

    def validate():
        nonlocal best_val
        metrics = evaluate(model, val_set, args, ctx, autocast)
        if args.eval_train_batches:
            metrics.update(evaluate(model, train_set, args, ctx, autocast, "train", args.eval_train_batches))
        improved = metrics["val_loss"] < best_val
        if improved:
            best_val = metrics["val_loss"]
        if ctx.is_main:
            row = {"step": step, "epoch": epoch, **{k: round(v, 5) for k, v in metrics.items()}}
            metrics_log.log(row)
            if wandb:
                wandb.log(row, step=step)
            log(f"step {step} epoch {epoch}: val loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.3f}, "
                f"input gain {metrics['val_input_gain']:.4f} nats"
                + (f" (training pairs: {metrics['train_input_gain']:.4f})" if "train_input_gain" in metrics else "")
                + ", "
                + (f"text CTC {metrics['val_text_loss']:.3f}, CER {metrics['val_cer']:.3f}, " if "val_cer" in metrics else "")
                + (f"reply words {metrics['val_reply_text_loss']:.3f} nats, exact {metrics['val_reply_text_exact']:.3f}"
                   f" (training pairs: {metrics.get('train_reply_text_exact', float('nan')):.3f}), "
                   if "val_reply_text_loss" in metrics else "")
                + f"ppl cb0 {metrics['val_ppl_cb0']:.1f}, end-of-reply accuracy {metrics['val_stop_accuracy']:.3f}"
                + (" (best)" if improved else ""))
            if improved:
                save_checkpoint(ckpt_dir / "s2s_best.pt", {
                    "model_state": raw_model.state_dict(), "config": config_to_dict(cfg), "step": step, "epoch": epoch,
                    "val_loss": best_val, "metrics": metrics, "experiment_name": args.experiment_name,
                })
        save_last()

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not ctx.is_main, desc=args.experiment_name, dynamic_ncols=True)
    max_steps = args.max_steps or total_steps
    first_step = step
    model.train()
    start, last_time, stopped = time.time(), time.time(), False
    while epoch < args.num_epochs and not stopped:
        batches = epoch_batches(train_set, args.batch_size, epoch, args.seed, ctx.rank, ctx.world_size)
        while step_in_epoch < len(batches):
            if step >= max_steps:
                stopped = True
                break
            lr = lr_at(step, args.learning_rate, warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # the renderings drawn depend on (seed, epoch, batch, rank) only: a resumed run draws the same
            pick = np.random.default_rng([args.seed, epoch, step_in_epoch, ctx.rank]) if variants else None
            out = run_model(model, collate(train_set, batches[step_in_epoch], ctx.device, pick), autocast)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
            optimizer.step()
            step += 1
            step_in_epoch += 1
            bar.update(1)
            if step % args.log_every == 0 or step == 1:
                row = {"loss": out.loss.item(), "stop_loss": out.stop_loss.item(),
                       "accuracy": out.metrics["accuracy"].mean().item(), "grad_norm": float(grad_norm)}
                if out.text_loss is not None:
                    row["text_loss"] = out.text_loss.item()
                if out.reply_text_loss is not None:
                    row["reply_text_loss"] = out.reply_text_loss.item()
                row = all_reduce_mean(row, ctx)
                now = time.time()
                row = {"step": step, "epoch": epoch, "lr": lr, **{k: round(v, 5) for k, v in row.items()},
                       "seconds": round(now - last_time, 3)}
                last_time = now
                if ctx.is_main:
                    metrics_log.log(row)
                    if wandb:
                        wandb.log(row, step=step)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}", lr=f"{lr:.2e}")
            if args.eval_every and step % args.eval_every == 0:
                validate()
            elif args.save_every and step % args.save_every == 0:
                save_last()
        if stopped:
            break
        epoch += 1
        step_in_epoch = 0
        if not args.eval_every:
            validate()
    if args.eval_every and step % args.eval_every and step > first_step:
        validate()  # the weights the run ends with (at its lowest rate) are candidates for the best too
    bar.close()
    save_last()
    check_ranks_in_sync(raw_model, ctx)

    result = {"step": step, "epoch": epoch, "best_val_loss": best_val, "seconds": time.time() - start}
    if ctx.is_main and (ckpt_dir / "s2s_best.pt").is_file():
        best = load_checkpoint(ckpt_dir / "s2s_best.pt")
        shipped = TeluguS2STransformer(config_from_dict(S2SConfig, best["config"]))
        shipped.load_state_dict(best["model_state"])
        shipped.save(ckpt_dir)
        log(f"best validation loss {best['val_loss']:.4f} at step {best['step']}; shipped model: "
            f"{ckpt_dir / 'model.safetensors'} (+ config.json)")
    if wandb:
        wandb.finish()
    log(f"done: {step} steps in {result['seconds']:.0f} s; checkpoints in {ckpt_dir}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
