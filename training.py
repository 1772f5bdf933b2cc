"""What the codec and S2S trainers share: checkpoints, DDP set-up, LR schedule, metric logs.

Checkpoint formats
    training checkpoint  `*.pt`: a dict of tensors and plain values only (`model_state`, `config`,
                         optimizer states, `step`, ...), written atomically, read back with
                         `torch.load(..., weights_only=True)` so nothing is ever unpickled.
    shipped model        a folder with `model.safetensors` + `config.json` (`save_pretrained`); a
                         model larger than `max_shard_mb` is split, as Hugging Face does, into
                         `model-00001-of-0000N.safetensors` ... + `model.safetensors.index.json`
                         (git takes files of at most 15 MB here).

Distributed training: launch with `torchrun --nproc_per_node N script.py ...`; `init_distributed`
reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and picks NCCL on CUDA, gloo on CPU.
A plain `python script.py` runs as a world of one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from audio_io import atomic_write, read_json, write_json

# --------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically write a training checkpoint (tensors, numbers, strings, lists, dicts only)."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; check --resume / --codec_path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(
            f"cannot read checkpoint {path} ({e}); it is corrupt or not a checkpoint of this repo. "
            "Delete it and resume from an earlier one, or retrain."
        ) from e


WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The files holding a shipped model's weights in `directory`: [model.safetensors], or the
    index followed by its shards; [] when the folder holds neither."""
    directory = Path(directory)
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [index] + [directory / name for name in shards]
    return []


def save_pretrained(
    directory: str | os.PathLike, state_dict: dict, config: dict, dtype: torch.dtype | None = None,
    max_shard_mb: float | None = None,
) -> None:
    """Write `model.safetensors` (+ `config.json`) into `directory`; `dtype` casts float tensors
    (fp16 for the weights shipped in git). With `max_shard_mb`, weights larger than that are split
    into shards of at most that size (tensors kept whole, in order) listed by an index file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    limit = None if max_shard_mb is None else int(max_shard_mb * 2**20) - 64 * 1024  # room for each header
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[dict] = [{}]
    if limit is not None and total > limit:
        size = 0
        for name, t in tensors.items():
            n = t.numel() * t.element_size()
            if shards[-1] and size + n > limit:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += n
    stale = weight_files(directory)
    written = []
    if len(shards) == 1:
        written.append(directory / WEIGHTS_NAME)
        with atomic_write(written[0]) as tmp:
            save_file(tensors, str(tmp))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            path = directory / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with atomic_write(path) as tmp:
                save_file(shard, str(tmp))
            weight_map.update({name: path.name for name in shard})
            written.append(path)
        written.append(directory / WEIGHTS_INDEX_NAME)
        write_json(written[-1], {"metadata": {"total_size": total}, "weight_map": weight_map})
    for path in stale:  # the previous save's files that this one did not overwrite
        if path not in written:
            path.unlink(missing_ok=True)
    write_json(directory / "config.json", config)


def load_pretrained_state(path: str | os.PathLike, checkpoint_names: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(state_dict in float32, config dict) from a model folder or a training checkpoint.

    `path` may be: a folder holding `model.safetensors` (or a sharded model's index and shards) +
    `config.json`; a folder holding one of `checkpoint_names` (e.g. "best_codec.pt"); a
    `.safetensors` file with `config.json` beside it; or a `.pt` training checkpoint with
    `model_state` and `config`.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        if weight_files(path):
            path = weight_files(path)[0]
        else:
            found = [path / n for n in checkpoint_names if (path / n).is_file()]
            if not found:
                wanted = ", ".join(("model.safetensors",) + checkpoint_names)
                raise FileNotFoundError(f"{path} holds none of: {wanted}")
            path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    if path.suffix == ".safetensors" or path.name == WEIGHTS_INDEX_NAME:
        config_path = path.with_name("config.json")
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} missing: a model needs its config beside it")
        if path.name == WEIGHTS_INDEX_NAME:
            state = {}
            for shard in weight_files(path.parent)[1:]:
                if not shard.is_file():
                    raise FileNotFoundError(f"{shard} missing: {path} lists it; copy the whole model folder")
                state.update(load_file(str(shard)))
        else:
            state = load_file(str(path))
        config = read_json(config_path)
    else:
        ckpt = load_checkpoint(path)
        if "model_state" not in ckpt or "config" not in ckpt:
            raise ValueError(f"{path} lacks 'model_state' or 'config'; not a checkpoint of this repo")
        state, config = ckpt["model_state"], ckpt["config"]
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    return state, config


# --------------------------------------------------------------------------------------
# Distributed


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Join the torchrun process group if launched by torchrun; pick the device.

    `device`: "cuda", "cpu" or None (CUDA when available)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but CUDA is not available; use --device cpu")
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return DistContext(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average scalar metrics over ranks (identity in a world of one)."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return {k: v / ctx.world_size for k, v in zip(keys, t.tolist())}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as plain lists and tensors (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# --------------------------------------------------------------------------------------
# Precision


def native_bf16(device: torch.device) -> bool:
    """bf16 matrix products run natively: CUDA, or a CPU with AMX or AVX512-BF16 (measured on a
    2-core Xeon with AMX: a 2048^2 bf16 matmul ~4.8x faster than fp32, a demo S2S training step on
    8 real pairs 1.1 s instead of 1.5 s, the rest of the step being memory-bound)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where native_bf16(device), else 'fp32'; 'bf16' / 'fp32' are kept."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32; got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


# --------------------------------------------------------------------------------------
# Schedule and logs


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to `base_lr`, then cosine decay to `min_ratio * base_lr` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class MetricsLog:
    """Append-only metric log written both as CSV and JSONL (`<stem>.csv`, `<stem>.jsonl`).

    On resume, `truncate_after(step)` drops rows logged after the checkpoint's step, so the
    log of a resumed run reads exactly like that of an uninterrupted one.
    """

    def __init__(self, directory: str | os.PathLike, stem: str = "metrics"):
        self.jsonl = Path(directory) / f"{stem}.jsonl"
        self.csv = Path(directory) / f"{stem}.csv"
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)

    def rows(self) -> list[dict]:
        if not self.jsonl.is_file():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        kept = [r for r in self.rows() if r.get("step", 0) <= step]
        with atomic_write(self.jsonl) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._write_csv(kept)

    def log(self, row: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv(self.rows())

    def _write_csv(self, rows: list[dict]) -> None:
        # Rewritten whole because validation rows add columns that training rows lack.
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        with atomic_write(self.csv) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
