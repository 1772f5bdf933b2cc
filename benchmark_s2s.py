"""S2S latency and speed, measured the way the server runs the model.

For each model (a preset, optionally with field overrides, or a trained model folder), on CPU
with each --threads value and, on CUDA, in fp32, bf16 and bf16 + torch.compile:
  - streaming encoder: the user's turn arrives as codec chunks of 20 ms (4 frames) and is
    encoded chunk by chunk (every 80 ms) while it is spoken; cost per encoder chunk;
  - first-chunk latency: from the end of the turn (the last codec chunk pushed) to the first
    reply chunk (1, 8, 4), i.e. the rest of the turn encoded, the memory assembled with a
    --context_seconds context prepared beforehand, decoder step 0 and the codebook head;
  - generation speed: compute time per second of reply audio, decoder step and head separately.
A warm-up run comes first; CUDA is synchronised around every timer; medians over --repeats.
Targets: first chunk within 150 ms, generation at least 2x faster than real time.

Head comparison (--head_toy_steps, on by default): what the per-step output head can model. A
tiny model of each head kind learns replies whose codebook 0 is random (the model must sample
it) and whose codebooks 1..7 are a fixed function of codebook 0, as residual-VQ codes depend on
the coarser ones. Sampled replies are then scored: the fraction of frames whose fine codes agree
with their sampled coarse code. Parallel heads sample every codebook on its own and cannot
agree beyond chance; the depth head conditions codebook k on the sampled codebooks < k.

Usage:
    python benchmark_s2s.py                                   # demo and full, depth and parallel heads
    python benchmark_s2s.py --models demo --threads 1 2 --repeats 5
    python benchmark_s2s.py --models demo demo:depth_layers=2 runs/s2s_demo   # overrides, a trained model
    python benchmark_s2s.py --device cuda                     # on a GPU: fp32, bf16, bf16 + compile

Writes <out_dir>/benchmark_s2s.json and <out_dir>/benchmark_s2s.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from audio_io import atomic_write, write_json
from config import add_workspace_arg, config_to_dict, workspace_from_args
from s2s_transformer import PRESETS, ContextTurns, S2SConfig, TeluguS2STransformer

CODEC_CHUNK_FRAMES = 4  # the codec streams 20 ms = 4 frames at a time


def parse_model(spec: str) -> tuple[str, TeluguS2STransformer]:
    """'demo', 'full:depth_dim=0,hidden_dim=512' or a path to a trained model."""
    if Path(spec).exists():
        return spec, TeluguS2STransformer.from_pretrained(spec)
    name, _, overrides = spec.partition(":")
    if name not in PRESETS:
        raise SystemExit(f"--models: {spec!r} is neither a preset ({sorted(PRESETS)}) nor an existing path")
    values = {}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    torch.manual_seed(0)
    return spec, TeluguS2STransformer(S2SConfig.preset(name, **values))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def p90(xs):
    return sorted(xs)[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else float("nan")


def context_turns(cfg: S2SConfig, seconds: float, device) -> ContextTurns | None:
    """Earlier turns totalling `seconds`, alternating user / agent, 4 s each."""
    if seconds <= 0:
        return None
    frames = int(seconds * cfg.codec_frame_rate)
    per_turn = 4 * cfg.codec_frame_rate
    turns, role = [], 0
    while frames > 0:
        n = min(per_turn, frames)
        turns.append((role, torch.randint(0, cfg.codebook_size, (cfg.n_codebooks, n))))
        frames -= n
        role = 1 - role
    return ContextTurns.from_turns([turns[-cfg.max_context_turns :]]).to(device)


def run_once(model, turn, context_memory, reply_steps: int, device) -> dict:
    """One turn: streamed encoding, then the reply. Returns timings in ms."""
    cfg = model.config
    ids = torch.tensor([0], device=device)
    stream = model.encoder_stream(1)
    encoder_ms = []
    n_frames = turn.shape[-1]
    for start in range(0, n_frames, CODEC_CHUNK_FRAMES):
        before = stream.n_steps
        sync(device)
        t = time.perf_counter()
        stream.push(turn[..., start : start + CODEC_CHUNK_FRAMES])
        sync(device)
        if stream.n_steps > before:  # this push completed an encoder chunk
            encoder_ms.append(1000 * (time.perf_counter() - t))
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()  # the end of the user's turn
    written: list[list[str]] = []  # an inner monologue's words come before the first chunk, in its latency
    gen = model.generate_streaming(stream, ids, ids, max_new_tokens=reply_steps, context=context_memory,
                                   temperature=0.8, top_k=50, min_new_tokens=reply_steps, on_text=written.append)
    first = next(gen)
    sync(device)
    first_ms, first_cpu_ms = 1000 * (time.perf_counter() - t0), 1000 * (time.process_time() - c0)
    n = 1
    for _ in gen:
        n += 1
    sync(device)
    total_ms, total_cpu_ms = 1000 * (time.perf_counter() - t0), 1000 * (time.process_time() - c0)
    assert first.shape == (1, cfg.n_codebooks, cfg.frames_per_step)
    return {"first_chunk_ms": first_ms, "reply_ms": total_ms, "reply_steps": n, "encoder_chunk_ms": encoder_ms,
            "first_chunk_cpu_ms": first_cpu_ms, "reply_cpu_ms": total_cpu_ms,
            "reply_words": len(written[0][0].split()) if written else 0}


def step_breakdown(model, turn, reply_steps: int, device) -> tuple[float, float]:
    """Median ms of the decoder step and of the codebook head (depth loop or parallel heads + sampling)."""
    ids = torch.tensor([0], device=device)
    dec, head = [], []
    with torch.inference_mode():
        state = model._prepare(turn, ids, ids, None, reply_steps)
        prev = None
        for s in range(reply_steps):
            sync(device)
            t = time.perf_counter()
            h, _ = model.decode_step(state, prev, torch.tensor([s], device=device))
            sync(device)
            t1 = time.perf_counter()
            prev = model.sample_step(state, h, 0.8, 50)
            sync(device)
            dec.append(1000 * (t1 - t))
            head.append(1000 * (time.perf_counter() - t1))
    return median(dec[2:]), median(head[2:])


def bench(name, model, device, dtype, compile_mode, threads, args) -> dict:
    cfg = model.config
    model = model.to(device=device, dtype=dtype).eval()
    if compile_mode:
        model.decode_step = torch.compile(model.decode_step, mode=compile_mode, fullgraph=False)
        model.sample_step = torch.compile(model.sample_step, mode=compile_mode, fullgraph=False)
    g = torch.Generator().manual_seed(0)
    turn = torch.randint(0, cfg.codebook_size, (1, cfg.n_codebooks, int(args.turn_seconds * cfg.codec_frame_rate)),
                         generator=g).to(device)
    reply_steps = max(2, int(round(args.reply_seconds * 1000 / cfg.step_ms)))
    turns = context_turns(cfg, args.context_seconds, device)
    context_ms = []
    memory = None
    for _ in range(2 if turns is not None else 0):  # the first is the warm-up
        sync(device)
        t = time.perf_counter()
        memory = model.prepare_context(turns)
        sync(device)
        context_ms.append(1000 * (time.perf_counter() - t))
    run_once(model, turn, memory, reply_steps, device)  # warm-up (and compilation)
    runs = [run_once(model, turn, memory, reply_steps, device) for _ in range(args.repeats)]
    decoder_ms, head_ms = step_breakdown(model, turn, reply_steps, device)
    first = [r["first_chunk_ms"] for r in runs]
    # generation speed: everything after the first chunk, per second of reply audio
    gen_ms = [(r["reply_ms"] - r["first_chunk_ms"]) / (r["reply_steps"] - 1) for r in runs]
    rtf = median(gen_ms) / cfg.step_ms
    # CPU time of this process: what the work costs on a core of its own (on a shared machine the
    # wall time also holds the waits for other processes); with several threads it adds them up.
    gen_cpu_ms = [(r["reply_cpu_ms"] - r["first_chunk_cpu_ms"]) / (r["reply_steps"] - 1) for r in runs]
    encoder = [x for r in runs for x in r["encoder_chunk_ms"]]
    chunk_audio_ms = cfg.encoder_chunk_steps * cfg.step_ms
    return {
        "model": name, "parameters_m": round(model.num_parameters() / 1e6, 1), "hidden_dim": cfg.hidden_dim,
        "layers": f"{cfg.num_encoder_layers}+{cfg.num_decoder_layers}",
        "head": f"depth {cfg.depth_dim}x{cfg.depth_layers}" if cfg.depth_dim else "parallel",
        "device": device.type, "dtype": str(dtype).replace("torch.", ""), "compile": compile_mode or "none",
        "threads": threads if device.type == "cpu" else None,
        "first_chunk_ms_median": round(median(first), 1), "first_chunk_ms_p90": round(p90(first), 1),
        "generation_rtf": round(rtf, 3), "x_real_time": round(1 / rtf, 2),
        "ms_per_step": round(median(gen_ms), 2), "decoder_step_ms": round(decoder_ms, 2), "head_ms": round(head_ms, 2),
        "cpu_ms_per_step": round(median(gen_cpu_ms), 2) if device.type == "cpu" else None,
        "first_chunk_cpu_ms": round(median([r["first_chunk_cpu_ms"] for r in runs]), 1) if device.type == "cpu" else None,
        "encoder_chunk_ms_median": round(median(encoder), 2), "encoder_chunk_ms_p90": round(p90(encoder), 2),
        "encoder_chunk_audio_ms": chunk_audio_ms,
        "context_seconds": args.context_seconds, "context_prepare_ms": round(context_ms[-1], 1) if context_ms else 0.0,
        "turn_seconds": args.turn_seconds, "reply_steps": reply_steps,
        "reply_words_median": median([r["reply_words"] for r in runs]),
        "meets_first_chunk_150ms": median(first) <= 150, "meets_2x_real_time": rtf <= 0.5,
        "config": config_to_dict(cfg),
    }


def head_toy(depth_dim: int, steps: int, seed: int = 0) -> dict:
    """Train a tiny model of one head kind on the residual-VQ-like toy; score sampled replies."""
    cfg = S2SConfig.preset("tiny", codebook_size=16, depth_dim=depth_dim)
    torch.manual_seed(seed)
    model = TeluguS2STransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(cfg.n_codebooks)[None, :, None]

    def replies(n, frames):
        first = torch.randint(0, cfg.codebook_size, (n, 1, frames), generator=g)
        return (first * (2 * k + 1) + 3 * k) % cfg.codebook_size

    ids = torch.zeros(16, dtype=torch.long)
    start = time.perf_counter()
    for step in range(steps):
        codes = torch.randint(0, cfg.codebook_size, (16, cfg.n_codebooks, 24), generator=g)
        out = model(codes, replies(16, 24), ids, ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    train_s = time.perf_counter() - start
    model.eval()
    codes = torch.randint(0, cfg.codebook_size, (32, cfg.n_codebooks, 24), generator=g)
    ids = torch.zeros(32, dtype=torch.long)
    sampled = torch.stack(model.generate(codes, ids, ids, max_new_tokens=6, min_new_tokens=6, temperature=1.0,
                                         top_k=None))  # (32, K, 24)
    expected = (sampled[:, :1] * (2 * k + 1) + 3 * k) % cfg.codebook_size
    coherent = (sampled[:, 1:] == expected[:, 1:]).all(dim=1).float().mean().item()
    return {"head": f"depth {depth_dim}" if depth_dim else "parallel", "train_steps": steps,
            "train_seconds": round(train_s, 1), "coherent_frames": round(coherent, 3),
            "chance": round(cfg.codebook_size ** -(cfg.n_codebooks - 1), 9)}


def to_markdown(rows: list[dict], meta: dict, head_rows: list[dict]) -> str:
    lines = [
        "# S2S benchmark", "",
        f"{meta['machine']}; torch {meta['torch']}; load average at start {meta['load_average']}; "
        f"turn {meta['turn_seconds']} s streamed in 20 ms codec chunks, context {meta['context_seconds']} s prepared "
        f"beforehand, reply {meta['reply_seconds']} s; medians of {meta['repeats']} runs after a warm-up.", "",
        "| model | params (M) | head | device | dtype | compile | threads | first chunk ms (p90) | ms / 20 ms step "
        "(decoder + head) | x real time | CPU ms / step, first chunk | encoder ms / 80 ms chunk | context prep ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | {r['device']} | {r['dtype']} | {r['compile']} | {r.get('threads')} | "
                         f"failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['parameters_m']} | {r['head']} | {r['device']} | {r['dtype']} | {r['compile']} | "
            f"{r['threads'] or ''} | {r['first_chunk_ms_median']} ({r['first_chunk_ms_p90']}) | {r['ms_per_step']} "
            f"({r['decoder_step_ms']} + {r['head_ms']}) | {r['x_real_time']} | "
            f"{r['cpu_ms_per_step'] if r['cpu_ms_per_step'] is not None else ''}, {r['first_chunk_cpu_ms'] or ''} | "
            f"{r['encoder_chunk_ms_median']} | "
            f"{r['context_prepare_ms']} |")
    lines += ["", "Targets: first chunk <= 150 ms after the end of the turn; generation >= 2x real time "
              "(<= 10 ms per 20 ms step). Times are wall-clock; 'CPU ms' is this process's CPU time (the cost "
              "on a core of its own, without the waits a shared machine adds; summed over threads)."]
    if head_rows:
        lines += ["", "## Output head: codebook coherence on a residual-VQ-like toy", "",
                  "Sampled replies (temperature 1) of tiny models trained on replies whose codebook 0 is random "
                  "and codebooks 1-7 a fixed function of it: the fraction of frames whose 7 fine codes agree with "
                  "their coarse code.", "",
                  "| head | training steps | training s | coherent frames | chance |", "|---|---|---|---|---|"]
        lines += [f"| {r['head']} | {r['train_steps']} | {r['train_seconds']} | {r['coherent_frames']} | {r['chance']:.1e} |"
                  for r in head_rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workspace_arg(p)
    p.add_argument("--models", nargs="+", default=["demo", "demo:depth_dim=0", "full", "full:depth_dim=0"],
                   help="presets, preset:field=value,... overrides, or trained model paths")
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="CPU thread counts to measure")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda adds bf16 and torch.compile runs")
    p.add_argument("--turn_seconds", type=float, default=3.0, help="length of the user's turn")
    p.add_argument("--reply_seconds", type=float, default=2.0, help="length of the generated reply")
    p.add_argument("--context_seconds", type=float, default=12.0, help="earlier turns in the context (0: none)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (after one warm-up)")
    p.add_argument("--out_dir", default=None, help="where the JSON and Markdown go (default <workspace>/benchmarks)")
    p.add_argument("--head_toy_steps", type=int, default=200, help="training steps of the head comparison toy (0: skip)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    out_dir = Path(args.out_dir) if args.out_dir else workspace_from_args(args).root / "benchmarks"

    device = torch.device(args.device)
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
                   + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "torch": torch.__version__, "load_average": [round(x, 2) for x in os.getloadavg()],
        "turn_seconds": args.turn_seconds, "reply_seconds": args.reply_seconds,
        "context_seconds": args.context_seconds, "repeats": args.repeats,
    }
    if device.type == "cuda":
        settings = [(torch.float32, None, None), (torch.bfloat16, None, None), (torch.bfloat16, "default", None),
                    (torch.bfloat16, "reduce-overhead", None)]
    else:
        settings = [(torch.float32, None, t) for t in args.threads]
    rows = []
    for spec in args.models:
        for dtype, compile_mode, threads in settings:
            name, model = parse_model(spec)
            if threads:
                torch.set_num_threads(threads)
            try:
                row = bench(name, model, device, dtype, compile_mode, threads, args)
            except Exception as e:  # a compile mode missing on this machine is a result, not a crash
                row = {"model": name, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
                       "compile": compile_mode or "none", "threads": threads, "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            print({k: v for k, v in row.items() if k != "config"}, flush=True)
            del model
    head_rows = []
    if args.head_toy_steps:
        torch.set_num_threads(args.threads[0])
        head_rows = [head_toy(32, args.head_toy_steps), head_toy(0, args.head_toy_steps)]
        for r in head_rows:
            print(r, flush=True)
    write_json(out_dir / "benchmark_s2s.json", {"meta": meta, "rows": rows, "head_toy": head_rows})
    text = to_markdown(rows, meta, head_rows)
    with atomic_write(out_dir / "benchmark_s2s.md") as tmp:
        tmp.write_text(text)
    print(text)
    print(f"wrote {out_dir / 'benchmark_s2s.json'} and {out_dir / 'benchmark_s2s.md'}")


if __name__ == "__main__":
    main()
