"""TeluCodec against Opus at the same bitrate, on the same held-out audio, in one run.

For each file: TeluCodec (offline encode + decode) and Opus (ffmpeg libopus, VoIP mode, 20 ms
frames, encoded and decoded back, aligned by cross-correlation) are scored against the original:
SNR, SI-SDR, PESQ-WB, STOI, multi-scale mel distance. Then the codec's compute is timed the way
the server runs it: streaming 20 ms chunks on --threads CPU threads, after a warm-up, median and
p90 per chunk, and the real-time factor.

Usage:
    python benchmark_codec.py --model_path runs/codec_demo --data_dir workspace/telugu_synth \\
        --split test --num_files 20 --out_dir runs/codec_demo/benchmark --threads 1
    python benchmark_codec.py --model_path checkpoints/demo/codec --manifest my_test.jsonl
    python benchmark_codec.py --model_path runs/codec_demo --data_dir /usr/share/pocketsphinx/... (any WAV folder)

Writes <out_dir>/benchmark.json (summary + per-file rows) and <out_dir>/benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import audio_metrics
from audio_io import AudioError, load_audio, read_manifest, write_json
from config import SAMPLE_RATE, add_workspace_arg, config_to_dict, workspace_from_args
from telugu_codec import TeluCodec, count_parameters, streaming_chunk_times

METRICS = ("snr", "si_sdr", "pesq_wb", "stoi", "mel_distance")
OPUS_ALGORITHMIC_LATENCY_MS = 26.5  # 20 ms frame + 6.5 ms encoder look-ahead (RFC 6716)


def opus_round_trip(wav: np.ndarray, kbps: float, workdir: Path) -> tuple[np.ndarray, float]:
    """(decoded audio aligned to `wav`, kbps actually written incl. Ogg overhead)."""
    src, coded, decoded = workdir / "in.wav", workdir / "coded.opus", workdir / "decoded.wav"
    sf.write(src, wav, SAMPLE_RATE, subtype="FLOAT")
    encode = ["ffmpeg", "-v", "error", "-y", "-i", str(src), "-c:a", "libopus", "-application", "voip",
              "-frame_duration", "20", "-b:a", f"{kbps:g}k", str(coded)]
    decode = ["ffmpeg", "-v", "error", "-y", "-i", str(coded), "-ar", str(SAMPLE_RATE), "-ac", "1", "-c:a", "pcm_f32le", str(decoded)]
    for cmd in (encode, decode):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    out, _ = sf.read(decoded, dtype="float32")
    file_kbps = coded.stat().st_size * 8 / (len(wav) / SAMPLE_RATE) / 1000
    return align(wav, out), file_kbps


def align(ref: np.ndarray, est: np.ndarray, max_lag: int = 1600) -> np.ndarray:
    """`est` shifted by the delay (|lag| <= max_lag samples) that best correlates it with `ref`,
    then cut or zero-padded to len(ref)."""
    from scipy.signal import correlate, correlation_lags

    corr = correlate(est, ref, mode="full", method="fft")
    lags = correlation_lags(len(est), len(ref), mode="full")
    window = np.abs(lags) <= max_lag
    lag = int(lags[window][np.argmax(corr[window])])
    est = est[lag:] if lag >= 0 else np.concatenate([np.zeros(-lag, est.dtype), est])
    return np.pad(est, (0, max(0, len(ref) - len(est))))[: len(ref)].astype(np.float32)


def pick_files(args) -> tuple[list[Path], str]:
    if args.manifest:
        rows = read_manifest(args.manifest)
        source = str(args.manifest)
    else:
        data_dir = Path(args.data_dir) if args.data_dir else workspace_from_args(args).synth_corpus
        manifest = data_dir / "manifests" / f"{args.split}.jsonl"
        if manifest.is_file():
            rows, source = read_manifest(manifest), str(manifest)
        elif data_dir.is_dir():
            rows = [{"path": str(p)} for p in sorted(data_dir.rglob("*.wav"))]
            source = f"{data_dir} (all WAVs)"
        else:
            raise SystemExit(f"{data_dir} is neither a dataset root with manifests/{args.split}.jsonl nor a folder of WAVs")
    if not rows:
        raise SystemExit(f"no audio listed in {source}")
    # Evenly spaced, so a corpus sorted by voice or emotion is sampled across all of them.
    stride = max(1, len(rows) // args.num_files)
    return [Path(r["path"]) for r in rows[::stride][: args.num_files]], source


def summarize(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workspace_arg(p)
    p.add_argument("--model_path", default=None, help="codec folder (model.safetensors or best_codec.pt), .safetensors or .pt; default <workspace>/models/codec")
    p.add_argument("--data_dir", default=None, help="dataset root with manifests/<split>.jsonl, or any folder of WAVs; default <workspace>/telugu_synth")
    p.add_argument("--manifest", default=None, help="a JSONL manifest to read instead of --data_dir")
    p.add_argument("--split", default="test", help="manifest split under --data_dir (default test)")
    p.add_argument("--num_files", type=int, default=20, help="files to score, evenly spaced through the list (default 20)")
    p.add_argument("--max_seconds", type=float, default=10.0, help="cut each file to this length (default 10)")
    p.add_argument("--n_codebooks", type=int, default=None, help="codebooks to use (default all: 16 kbps for 8)")
    p.add_argument("--opus_kbps", type=float, default=None, help="Opus bitrate (default: the codec's bitrate)")
    p.add_argument("--out_dir", default=None, help="where benchmark.json and benchmark.md go (default <model dir>/benchmark)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for all codec compute (default 1)")
    p.add_argument("--timing_seconds", type=float, default=20.0, help="audio streamed for the per-chunk timing (default 20)")
    args = p.parse_args(argv)
    if args.num_files < 1 or args.threads < 1:
        p.error("--num_files and --threads must be >= 1")
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg not found; install it (apt-get install ffmpeg) for the Opus reference")

    model_path = Path(args.model_path) if args.model_path else workspace_from_args(args).codec_dir
    torch.set_num_threads(args.threads)
    codec = TeluCodec.from_pretrained(model_path)
    kbps = codec.calculate_bitrate(args.n_codebooks)  # also checks the value
    k = args.n_codebooks or codec.n_codebooks
    opus_kbps = args.opus_kbps or kbps
    out_dir = Path(args.out_dir) if args.out_dir else (model_path if model_path.is_dir() else model_path.parent) / "benchmark"

    files, source = pick_files(args)
    print(f"codec {model_path} ({count_parameters(codec) / 1e6:.2f}M parameters, {k} codebooks = {kbps:.1f} kbps) "
          f"vs Opus {opus_kbps:g} kbps on {len(files)} files from {source}")
    rows, skipped, stream_audio = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            try:
                wav = load_audio(path, resample=True, mix_to_mono=True, min_seconds=0.5)[: int(args.max_seconds * SAMPLE_RATE)]
            except AudioError as e:
                skipped.append(str(e))
                continue
            with torch.inference_mode():
                x = torch.from_numpy(wav)[None, None]
                codes = codec.encode(x, n_codebooks=k)
                decoded = codec.decode(codes)[0, 0, : len(wav)].numpy()
            opus, opus_file_kbps = opus_round_trip(wav, opus_kbps, Path(tmp))
            row = {"path": str(path), "seconds": len(wav) / SAMPLE_RATE, "opus_file_kbps": opus_file_kbps}
            row.update({f"codec_{m}": v for m, v in audio_metrics.all_metrics(wav, decoded).items()})
            row.update({f"opus_{m}": v for m, v in audio_metrics.all_metrics(wav, opus).items()})
            rows.append(row)
            stream_audio.append(wav)
            print(f"  {path.name}: codec PESQ {row['codec_pesq_wb']:.2f} STOI {row['codec_stoi']:.3f} SNR {row['codec_snr']:.1f} | "
                  f"opus PESQ {row['opus_pesq_wb']:.2f} STOI {row['opus_stoi']:.3f} SNR {row['opus_snr']:.1f}")
    if not rows:
        raise SystemExit(f"no usable audio among {len(files)} files: " + "; ".join(skipped[:3]))

    # Streaming compute, as the server runs it: 20 ms chunks, one stream, warm-up excluded.
    timing_wav = np.concatenate(stream_audio)
    need = int(args.timing_seconds * SAMPLE_RATE)
    timing_wav = np.tile(timing_wav, math.ceil(need / len(timing_wav)))[:need]
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    enc, dec = streaming_chunk_times(codec, torch.from_numpy(timing_wav)[None, None], chunk_samples=320, warmup=50)
    both = sorted(a + b for a, b in zip(enc, dec))
    chunk_ms = 20.0

    def ms(values, q):
        values = sorted(values)
        return 1000 * values[min(len(values) - 1, int(q * len(values)))]

    summary = {
        "model_path": str(model_path),
        "data": source,
        "files": len(rows),
        "skipped": skipped,
        "audio_seconds": sum(r["seconds"] for r in rows),
        "codec": {m: summarize([r[f"codec_{m}"] for r in rows]) for m in METRICS},
        "opus": {m: summarize([r[f"opus_{m}"] for r in rows]) for m in METRICS},
        "codec_kbps": kbps,
        "opus_kbps": opus_kbps,
        "opus_file_kbps": summarize([r["opus_file_kbps"] for r in rows]),
        "codec_algorithmic_latency_ms": codec.algorithmic_latency_ms,
        "opus_algorithmic_latency_ms": OPUS_ALGORITHMIC_LATENCY_MS,
        "threads": args.threads,
        "chunks_timed": len(both),
        "encode_ms_median": 1000 * statistics.median(enc),
        "decode_ms_median": 1000 * statistics.median(dec),
        "chunk_ms_median": ms(both, 0.5),
        "chunk_ms_p90": ms(both, 0.9),
        "real_time_factor": ms(both, 0.5) / chunk_ms,
        "timing_wall_seconds": time.perf_counter() - t0,
        "load_average_1min": [load_before, os.getloadavg()[0]],  # other work on the machine inflates the timing
        "parameters": count_parameters(codec),
        "config": config_to_dict(codec.config),
        "rows": rows,
    }
    write_json(out_dir / "benchmark.json", summary)
    (out_dir / "benchmark.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {out_dir / 'benchmark.json'} and {out_dir / 'benchmark.md'}")
    return summary


def markdown(s: dict) -> str:
    c, o = s["codec"], s["opus"]
    lines = [
        "# Codec benchmark: TeluCodec vs Opus",
        "",
        f"{s['files']} files ({s['audio_seconds']:.0f} s) from `{s['data']}`; model `{s['model_path']}` "
        f"({s['parameters'] / 1e6:.2f}M parameters).",
        "",
        "| | TeluCodec | Opus (libopus, voip, 20 ms) |",
        "|---|---|---|",
        f"| bitrate (kbps) | {s['codec_kbps']:.1f} | {s['opus_kbps']:g} nominal, {s['opus_file_kbps']:.1f} in the Ogg file |",
        f"| PESQ-WB | {c['pesq_wb']:.2f} | {o['pesq_wb']:.2f} |",
        f"| STOI | {c['stoi']:.3f} | {o['stoi']:.3f} |",
        f"| SNR (dB) | {c['snr']:.2f} | {o['snr']:.2f} |",
        f"| SI-SDR (dB) | {c['si_sdr']:.2f} | {o['si_sdr']:.2f} |",
        f"| mel distance (lower is better) | {c['mel_distance']:.3f} | {o['mel_distance']:.3f} |",
        f"| algorithmic latency (ms) | {s['codec_algorithmic_latency_ms']:.1f} | {s['opus_algorithmic_latency_ms']:.1f} |",
        "",
        f"Streaming compute, {s['threads']} CPU thread(s), 20 ms chunks ({s['chunks_timed']} timed after 50 warm-up): "
        f"encode {s['encode_ms_median']:.2f} ms + decode {s['decode_ms_median']:.2f} ms median; "
        f"encode+decode median {s['chunk_ms_median']:.2f} ms, p90 {s['chunk_ms_p90']:.2f} ms; "
        f"real-time factor {s['real_time_factor']:.3f}. Machine load average (1 min) before/after the timing: "
        f"{s['load_average_1min'][0]:.1f}/{s['load_average_1min'][1]:.1f} on {os.cpu_count()} cores.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
