"""Turn collected recordings into a speaker-labelled corpus of 2-15 s utterances and S2S pairs.

Usage (the mission's Phase 2, step 5):
    python prepare_speaker_data.py --data_dir /workspace/telugu_data/audio \
        --output_dir /workspace/speaker_data --num_speakers 4 --split_ratio 0.8 0.1 0.1
    python prepare_speaker_data.py --workers 8 --min_seconds 2 --max_seconds 15 --seed 1234

Per recording (in parallel, --workers processes; each recording's result is kept, so a killed
or repeated run redoes only the recordings it had not finished):
    1. read it (any rate or channel count: resampled to 16 kHz mono); corrupt and silent files
       are skipped and reported
    2. speech regions from silero-vad, their edges tightened to the speech energy (silero's
       decisions trail the speech by ~0.1 s)
    3. utterances: neighbouring regions closer than --merge_gap are merged; anything longer than
       --max_seconds is split at its longest pause (or its quietest point); shorter than
       --min_seconds is dropped
    4. quality filters, each counted: clipping, too quiet, estimated SNR, non-speech ratio
    5. loudness normalised to --target_dbfs (active-speech RMS, peak kept under 0.99), written
       as wavs/<recording>/<recording>_<k>.wav, and a resemblyzer speaker embedding each
Then for the whole corpus:
    6. embeddings clustered into --num_speakers (cosine; agglomerative, or k-means for large
       corpora), quality reported (silhouette, sizes); cluster k becomes voice "spk<k>",
       numbered by size
    7. whole recordings go to train/val/test by --split_ratio (by duration), so no recording's
       voice or content leaks across splits
    8. manifests/{train,val,test}.jsonl (the synthetic corpus's format: role "user", emotion
       "neutral", intent_id null, text "" as there are no transcripts; extra keys source,
       start, end, cluster, snr_db) and metadata/{train,validation,test}_pairs.json: turn i ->
       turn i+1 of a recording when the speakers differ, history = the earlier exchanges
    9. prepare_summary.json (also printed): counts per filter, cluster quality, splits, speed

Output (under --output_dir, default <workspace>/speaker_data):
    wavs/<recording>/*.wav, manifests/, metadata/, prepare_summary.json,
    work/<recording>.json + .npy   per-recording results (the resume markers) and embeddings
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from silero_vad import get_speech_timestamps, load_silero_vad
from tqdm import tqdm

from audio_io import PAIRS_FILES, SPLITS, AudioError, atomic_write, load_audio, read_json, save_audio, write_json, write_manifest
from config import SAMPLE_RATE, VOICES, add_workspace_arg, workspace_from_args
from data_collection import read_collection_manifest
from make_telugu_speech import set_level
from prosody import active_rms_db

with warnings.catch_warnings():  # resemblyzer's webrtcvad imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    from resemblyzer import VoiceEncoder, preprocess_wav

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
FRAME = SAMPLE_RATE // 100  # 10 ms energy frames
EDGE_PAD_S = 0.03  # kept around the speech at each segment edge
MARKER_VERSION = 1


@dataclass(frozen=True)
class PrepConfig:
    """Everything that decides a recording's segments; a change redoes the recordings."""

    min_seconds: float = 2.0
    max_seconds: float = 15.0
    merge_gap: float = 0.5  # s: closer speech regions join one utterance
    vad_threshold: float = 0.5
    target_dbfs: float = -23.0
    max_clipped: float = 0.001  # fraction of samples at full scale
    min_level_dbfs: float = -45.0  # active-speech RMS before normalisation
    min_snr_db: float = 10.0
    max_nonspeech: float = 0.5  # fraction of the utterance that is pause

    def key(self) -> str:
        text = json.dumps({**asdict(self), "version": MARKER_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------
# Segmentation (pure functions on sample indices; tested without audio)


def frame_db(wav: np.ndarray) -> np.ndarray:
    """Level of each 10 ms frame in dBFS, (T,) -> (T // FRAME,)."""
    n = len(wav) // FRAME
    frames = np.asarray(wav[: n * FRAME], dtype=np.float64).reshape(n, FRAME)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)


def noise_floor_db(db: np.ndarray, regions: list[tuple[int, int]]) -> float:
    """Median level of the frames outside speech (5th percentile of all when under 1 s is)."""
    speech = np.zeros(len(db), dtype=bool)
    for s, e in regions:
        speech[s // FRAME : e // FRAME + 1] = True
    quiet = db[~speech]
    return float(np.median(quiet) if quiet.size >= 100 else np.percentile(db, 5))


def refine_edges(regions: list[tuple[int, int]], db: np.ndarray, noise_db: float, n_samples: int,
                 pad: int = int(EDGE_PAD_S * SAMPLE_RATE)) -> list[tuple[int, int]]:
    """Move VAD region edges onto the speech energy: the first/last 10 ms frame within 25 dB of
    the region's peak (and 10 dB over the noise), searched 0.1 s before to 0.2 s after the
    start and in the last 0.25 s. Silero's end decisions trail the speech by ~0.1 s."""
    out: list[tuple[int, int]] = []
    for s, e in regions:
        fs = min(s // FRAME, len(db) - 1)
        fe = max(fs + 1, min(len(db), e // FRAME))
        threshold = max(noise_db + 10.0, db[fs:fe].max() - 25.0)
        lo, hi = max(0, fs - 10), min(fe, fs + 20)
        above = np.flatnonzero(db[lo:hi] >= threshold)
        start = (lo + above[0]) * FRAME if above.size else s
        lo = max(fs, fe - 25)
        above = np.flatnonzero(db[lo:fe] >= threshold)
        end = (lo + above[-1] + 1) * FRAME if above.size else e
        start, end = max(0, start - pad), min(n_samples, end + pad)
        if end <= start:
            continue
        if out and start <= out[-1][1]:  # padding made neighbours touch
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _quietest_cut(s: int, e: int, db: np.ndarray, min_len: int) -> int:
    """Sample index of the quietest 50 ms inside [s, e], keeping min_len on both sides if possible."""
    lo, hi = s + min_len, e - min_len
    if hi <= lo:
        lo, hi = s + (e - s) // 3, e - (e - s) // 3
    f_lo, f_hi = lo // FRAME, max(lo // FRAME + 1, hi // FRAME)
    smooth = np.convolve(db, np.ones(5) / 5, mode="same")[f_lo:f_hi]
    if smooth.size == 0:  # past the last whole frame
        return (s + e) // 2
    return (f_lo + int(np.argmin(smooth))) * FRAME + FRAME // 2


def split_long(group: list[tuple[int, int]], min_len: int, max_len: int, db: np.ndarray) -> list[list[tuple[int, int]]]:
    """Split a run of speech regions longer than max_len at its longest pause (preferring pauses
    that leave min_len on both sides); one unbroken region is cut at its quietest point."""
    if group[-1][1] - group[0][0] <= max_len:
        return [group]
    if len(group) == 1:
        s, e = group[0]
        cut = _quietest_cut(s, e, db, min_len)
        return split_long([(s, cut)], min_len, max_len, db) + split_long([(cut, e)], min_len, max_len, db)
    gaps = [(group[i + 1][0] - group[i][1], i) for i in range(len(group) - 1)]
    balanced = [(g, i) for g, i in gaps
                if group[i][1] - group[0][0] >= min_len and group[-1][1] - group[i + 1][0] >= min_len]
    _, i = max(balanced or gaps)
    return split_long(group[: i + 1], min_len, max_len, db) + split_long(group[i + 1 :], min_len, max_len, db)


def utterances(regions: list[tuple[int, int]], merge_gap: int, min_len: int, max_len: int,
               db: np.ndarray) -> list[list[tuple[int, int]]]:
    """Group speech regions (samples) into utterances: merge across pauses <= merge_gap, split
    what exceeds max_len. Each utterance is its list of regions; too-short ones are kept here
    (the caller counts and drops them) so turn order stays intact."""
    if not regions:
        return []
    groups, current = [], [regions[0]]
    for region in regions[1:]:
        if region[0] - current[-1][1] <= merge_gap:
            current.append(region)
        else:
            groups.append(current)
            current = [region]
    groups.append(current)
    return [piece for group in groups for piece in split_long(group, min_len, max_len, db)]


# --------------------------------------------------------------------------------------
# Per recording (runs in the worker processes)

_MODELS: dict = {}


def _models():
    if not _MODELS:
        torch.set_num_threads(1)
        _MODELS["vad"] = load_silero_vad()
        _MODELS["encoder"] = VoiceEncoder("cpu", verbose=False)
    return _MODELS["vad"], _MODELS["encoder"]


def speech_regions(wav: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Silero-vad speech regions in samples, on a loudness-normalised copy (silero misses
    very quiet speech)."""
    vad, _ = _models()
    level = set_level(wav, -23.0)
    stamps = get_speech_timestamps(torch.from_numpy(level), vad, threshold=threshold, sampling_rate=SAMPLE_RATE,
                                   min_silence_duration_ms=100, speech_pad_ms=30)
    return [(int(t["start"]), int(t["end"])) for t in stamps]


def speaker_embedding(wav: np.ndarray) -> np.ndarray:
    """Resemblyzer d-vector (256,), L2-normalised."""
    _, encoder = _models()
    trimmed = preprocess_wav(wav, source_sr=SAMPLE_RATE)
    if len(trimmed) < SAMPLE_RATE // 2:  # its own VAD removed nearly everything
        trimmed = wav
    return encoder.embed_utterance(trimmed).astype(np.float32)


def recording_id(path: Path, data_dir: Path) -> str:
    rel = path.relative_to(data_dir).with_suffix("")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "__".join(rel.parts)).strip("._") or "recording"


def process_recording(job: tuple) -> dict:
    """Segment, filter, normalise, write and embed one recording; write its marker last.
    Never raises: failures come back as {"status": "failed", "reason": ...}."""
    path, rec_id, out_dir, cfg = job
    path, out_dir = Path(path), Path(out_dir)
    marker = out_dir / "work" / f"{rec_id}.json"
    stat = path.stat()
    stamp = {"source_file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "config": cfg.key()}
    if marker.is_file():
        try:
            done = read_json(marker)
            if all(done.get(k) == v for k, v in stamp.items()) and all(
                    (out_dir / seg["path"]).is_file() for seg in done["segments"] if seg["path"]):
                return {"rec_id": rec_id, "status": "reused", "duration": done["duration"]}
        except (ValueError, KeyError):
            pass  # unreadable marker: redo the recording
        marker.unlink()  # outdated: the recording changed, or its files are gone
    t0 = time.time()
    try:
        try:
            wav = load_audio(path, resample=True, mix_to_mono=True)
        except AudioError as e:
            return {"rec_id": rec_id, "status": "failed", "reason": f"corrupt: {e}", "file": str(path)}
        duration = len(wav) / SAMPLE_RATE
        peak = float(np.abs(wav).max())
        result = {**stamp, "rec_id": rec_id, "duration": round(duration, 3), "segments": [],
                  "embeddings": None, "status": "ok"}
        if peak < 1e-4:
            result.update(status="silent", reason=f"silent (peak {20 * np.log10(peak + 1e-12):.0f} dBFS)")
        elif duration < cfg.min_seconds:
            result.update(status="silent", reason=f"shorter than --min_seconds ({duration:.2f} s)")
        else:
            _segment(wav, rec_id, out_dir, cfg, result)
            if not result["segments"]:
                result.update(status="silent", reason="no speech found by the VAD")
        result["seconds_spent"] = round(time.time() - t0, 3)
        write_json(marker, result)
        return {"rec_id": rec_id, "status": "processed", "duration": duration,
                "seconds_spent": result["seconds_spent"]}
    except Exception as e:  # noqa: BLE001 (one bad file never stops the corpus)
        return {"rec_id": rec_id, "status": "failed", "reason": f"{type(e).__name__}: {e}", "file": str(path)}


def _segment(wav: np.ndarray, rec_id: str, out_dir: Path, cfg: PrepConfig, result: dict) -> None:
    sr = SAMPLE_RATE
    db = frame_db(wav)
    raw_regions = speech_regions(wav, cfg.vad_threshold)
    noise_db = noise_floor_db(db, raw_regions)
    regions = refine_edges(raw_regions, db, noise_db, len(wav))
    groups = utterances(regions, int(cfg.merge_gap * sr), int(cfg.min_seconds * sr), int(cfg.max_seconds * sr), db)

    wav_dir = out_dir / "wavs" / rec_id
    if wav_dir.exists():  # leftovers of an interrupted or outdated run
        shutil.rmtree(wav_dir)
    embeddings = []
    noise_power = 10 ** (noise_db / 10)
    for index, group in enumerate(groups):
        s, e = group[0][0], group[-1][1]
        segment = wav[s:e]
        speech_samples = sum(b - a for a, b in group)
        speech_power = float(np.mean(np.concatenate([wav[a:b] for a, b in group]) ** 2))
        snr_db = min(100.0, 10 * np.log10(max(speech_power - noise_power, 1e-12) / max(noise_power, 1e-12)))
        info = {
            "index": index, "start": round(s / sr, 3), "end": round(e / sr, 3), "duration": round((e - s) / sr, 3),
            "level_dbfs": round(active_rms_db(segment), 2), "snr_db": round(float(snr_db), 2),
            "clipped": round(float(np.mean(np.abs(segment) >= 0.999)), 5),
            "nonspeech": round(1 - speech_samples / (e - s), 3), "status": "kept", "path": None,
        }
        if e - s < cfg.min_seconds * sr:
            info["status"] = "too_short"
        elif info["clipped"] > cfg.max_clipped:
            info["status"] = "clipping"
        elif info["level_dbfs"] < cfg.min_level_dbfs:
            info["status"] = "too_quiet"
        elif info["snr_db"] < cfg.min_snr_db:
            info["status"] = "low_snr"
        elif info["nonspeech"] > cfg.max_nonspeech:
            info["status"] = "non_speech"
        if info["status"] == "kept":
            normalised = set_level(segment, cfg.target_dbfs)
            rel = Path("wavs") / rec_id / f"{rec_id}_{index:04d}.wav"
            save_audio(out_dir / rel, normalised)
            info["path"] = rel.as_posix()
            embeddings.append(speaker_embedding(normalised))
        result["segments"].append(info)
    if embeddings:
        emb_path = out_dir / "work" / f"{rec_id}.npy"
        with atomic_write(emb_path) as tmp, open(tmp, "wb") as f:  # a path would get ".npy" appended
            np.save(f, np.stack(embeddings))
        result["embeddings"] = emb_path.name
    result["noise_db"] = round(noise_db, 2)


# --------------------------------------------------------------------------------------
# Corpus level: clustering, splits, manifests, pairs


def cluster_speakers(embeddings: np.ndarray, num_speakers: int, method: str, seed: int) -> tuple[np.ndarray, dict]:
    """Cluster L2-normalised embeddings (N, D) on cosine distance; clusters renumbered by size
    (0 = largest). Returns (labels (N,), quality report)."""
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.metrics import silhouette_score

    n = len(embeddings)
    if method == "auto":
        method = "agglomerative" if n <= 5000 else "kmeans"  # average linkage needs N^2 memory
    if num_speakers == 1:
        labels = np.zeros(n, dtype=int)
    elif method == "agglomerative":
        labels = AgglomerativeClustering(n_clusters=num_speakers, metric="cosine", linkage="average").fit_predict(embeddings)
    else:  # spherical k-means: unit vectors, so Euclidean distance orders like cosine
        labels = KMeans(num_speakers, n_init=10, random_state=seed).fit_predict(embeddings)
    order = [k for k, _ in Counter(labels.tolist()).most_common()]
    labels = np.array([order.index(k) for k in labels])
    silhouette = None
    if 1 < num_speakers < n:
        silhouette = float(silhouette_score(embeddings, labels, metric="cosine",
                                            sample_size=min(n, 10000), random_state=seed))
    cohesion = []
    for k in range(num_speakers):
        members = embeddings[labels == k]
        centroid = members.mean(axis=0)
        centroid /= np.linalg.norm(centroid) + 1e-9
        cohesion.append(round(float((members @ centroid).mean()), 3))
    return labels, {"method": method, "silhouette": None if silhouette is None else round(silhouette, 3),
                    "sizes": np.bincount(labels, minlength=num_speakers).tolist(),
                    "mean_cosine_to_centroid": cohesion}


def assign_splits(durations: dict[str, float], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Whole recordings to splits, matching `ratios` by duration. Each split with a share gets
    at least one recording when there are enough. Deterministic for a seed and recording set."""
    share = dict(zip(SPLITS, ratios))
    wanted = [s for s in SPLITS if share[s] > 0]
    ids = sorted(durations)
    random.Random(seed).shuffle(ids)
    assigned, out = {s: 0.0 for s in SPLITS}, {}
    if len(ids) >= len(wanted):
        for split in sorted(wanted, key=lambda s: share[s]):
            rec = ids.pop()
            out[rec], assigned[split] = split, assigned[split] + durations[rec]
    for rec in ids:
        total = sum(assigned.values()) + durations[rec]
        split = max(wanted, key=lambda s: share[s] * total - assigned[s])
        out[rec], assigned[split] = split, assigned[split] + durations[rec]
    return out


def build_pairs(segments: list[dict], max_gap: float, max_history: int) -> list[dict]:
    """S2S pairs of one recording: turn i -> turn i+1 when both were kept, are adjacent in the
    recording, are at most max_gap s apart and the speakers differ. History = earlier pairs of
    the recording that do not overlap it or each other (i-2 -> i-1, i-4 -> i-3, ... when every
    turn changes speaker), the latest max_history of them, oldest first."""
    by_index = {s["index"]: s for s in segments}
    valid = {}
    for i, a in by_index.items():
        b = by_index.get(i + 1)
        if b is not None and a["cluster"] != b["cluster"] and b["start"] - a["end"] <= max_gap:
            valid[i] = (a, b)
    pairs = []
    for i in sorted(valid):
        a, b = valid[i]
        history, last = [], i - 1  # earlier exchanges end by the turn before this input
        for k in sorted((k for k in valid if k < i), reverse=True):
            if len(history) == max_history:
                break
            if k + 1 <= last:
                ha, hb = valid[k]
                history.append({"input_path": ha["path"], "target_path": hb["path"], "input_text": "",
                                "target_text": "", "intent_id": None})
                last = k - 1
        pairs.append({
            "input_path": a["path"], "target_path": b["path"],
            "speaker_id": b["cluster"] % len(VOICES), "emotion_id": 0,
            "input_text": "", "target_text": "", "intent_id": None,
            "voice": f"spk{b['cluster']}", "emotion": "neutral", "user_voice": f"spk{a['cluster']}",
            "conversation_id": a["source"], "turn_index": i, "history": history[::-1],
        })
    return pairs


def find_recordings(data_dir: Path, out_dir: Path) -> list[Path]:
    out_dir = out_dir.resolve()
    files = []
    for p in sorted(data_dir.rglob("*")):
        if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file() and out_dir not in p.resolve().parents:
            files.append(p)
    return files


def collection_rows(data_dir: Path) -> dict[str, dict]:
    """data_collection.py's manifest rows by WAV file name, when the data dir came from it."""
    for manifest in (data_dir / "manifest.jsonl", data_dir.parent / "manifest.jsonl"):
        if manifest.is_file():
            try:
                return {Path(r["wav"]).name: r for r in read_collection_manifest(manifest) if r.get("wav")}
            except (ValueError, KeyError):
                return {}
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="folder of recordings, searched recursively (default: <workspace>/telugu_data/audio)")
    parser.add_argument("--output_dir", default=None, help="corpus folder to write (default: <workspace>/speaker_data)")
    add_workspace_arg(parser)
    parser.add_argument("--num_speakers", type=int, default=4, help="speaker clusters (voices spk0..spk<n-1>)")
    parser.add_argument("--split_ratio", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                        help="shares of audio per split, by whole recordings")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes (1 = in this process)")
    parser.add_argument("--min_seconds", type=float, default=2.0, help="shortest utterance kept")
    parser.add_argument("--max_seconds", type=float, default=15.0, help="longer speech is split at its longest pause")
    parser.add_argument("--merge_gap", type=float, default=0.5, help="speech regions closer than this (s) join one utterance")
    parser.add_argument("--target_dbfs", type=float, default=-23.0, help="loudness of the written utterances (active RMS, dBFS)")
    parser.add_argument("--vad_threshold", type=float, default=0.5, help="silero-vad speech probability threshold")
    parser.add_argument("--min_snr_db", type=float, default=10.0, help="drop utterances with a lower estimated SNR")
    parser.add_argument("--min_level_dbfs", type=float, default=-45.0, help="drop utterances quieter than this before normalising")
    parser.add_argument("--max_clipped", type=float, default=0.001, help="drop utterances with more clipped samples (fraction)")
    parser.add_argument("--max_nonspeech", type=float, default=0.5, help="drop utterances with more pause than this (fraction)")
    parser.add_argument("--cluster_method", choices=("auto", "agglomerative", "kmeans"), default="auto",
                        help="auto: agglomerative up to 5000 utterances, k-means above")
    parser.add_argument("--max_pair_gap", type=float, default=3.0, help="longest silence (s) between the two turns of a pair")
    parser.add_argument("--max_history", type=int, default=10, help="earlier exchanges kept in a pair's history")
    parser.add_argument("--seed", type=int, default=1234, help="seed for clustering and splits")
    args = parser.parse_args(argv)

    ws = workspace_from_args(args)
    data_dir = Path(args.data_dir) if args.data_dir else ws.telugu_data / "audio"
    out_dir = Path(args.output_dir) if args.output_dir else ws.speaker_data
    if not data_dir.is_dir():
        parser.error(f"--data_dir {data_dir} is not a folder; collect audio first (python data_collection.py)")
    ratios = tuple(args.split_ratio)
    if min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6 or ratios[0] == 0:
        parser.error(f"--split_ratio {ratios}: three shares >= 0 summing to 1, train > 0")
    if not 0 < args.min_seconds < args.max_seconds:
        parser.error("need 0 < --min_seconds < --max_seconds")
    if args.num_speakers < 1 or args.workers < 1:
        parser.error("--num_speakers and --workers must be >= 1")
    cfg = PrepConfig(args.min_seconds, args.max_seconds, args.merge_gap, args.vad_threshold, args.target_dbfs,
                     args.max_clipped, args.min_level_dbfs, args.min_snr_db, args.max_nonspeech)
    files = find_recordings(data_dir, out_dir)
    if not files:
        parser.error(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {data_dir}")
    ids = [recording_id(p, data_dir) for p in files]
    dupes = [k for k, n in Counter(ids).items() if n > 1]
    if dupes:
        parser.error(f"recordings map to the same id {dupes[:3]}: rename them (ids come from the relative path)")
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    jobs = [(str(p), rid, str(out_dir), cfg) for p, rid in zip(files, ids)]
    print(f"preparing {len(jobs)} recordings from {data_dir} into {out_dir} with {args.workers} worker(s)")
    results = run_recordings(jobs, args.workers)
    segmentation_s = time.time() - t0

    summary = {"data_dir": str(data_dir), "output_dir": str(out_dir), "config": asdict(cfg),
               "num_speakers": args.num_speakers, "split_ratio": list(ratios), "seed": args.seed}
    kept, embeddings = gather_utterances(results, out_dir, collection_rows(data_dir), summary)
    if len(kept) < max(2, args.num_speakers):
        write_json(out_dir / "prepare_summary.json", summary)
        print_summary(summary)
        print(f"error: only {len(kept)} usable utterances, need at least --num_speakers ({args.num_speakers}); "
              "add recordings or relax the filters", file=sys.stderr)
        return 1

    labels, quality = cluster_speakers(embeddings, args.num_speakers, args.cluster_method, args.seed)
    for seg, label in zip(kept, labels):
        seg["cluster"] = int(label)
    durations = Counter()
    for seg in kept:
        durations[seg["source"]] += seg["duration"]
    split_of = assign_splits(dict(durations), ratios, args.seed)
    rows, pairs = write_corpus(kept, split_of, out_dir, args.max_pair_gap, args.max_history)

    clusters = []
    for k in range(args.num_speakers):
        members = [s for s in kept if s["cluster"] == k]
        clusters.append({"voice": f"spk{k}", "utterances": len(members),
                         "minutes": round(sum(s["duration"] for s in members) / 60, 2),
                         "recordings": len({s["source"] for s in members}),
                         "mean_cosine_to_centroid": quality["mean_cosine_to_centroid"][k]})
    summary["clusters"] = {"method": quality["method"], "silhouette": quality["silhouette"], "per_cluster": clusters}
    summary["splits"] = {s: {"utterances": len(rows[s]), "minutes": round(sum(r["duration"] for r in rows[s]) / 60, 2),
                             "recordings": len({r["source"] for r in rows[s]}), "pairs": len(pairs[s])} for s in SPLITS}
    processed_s = sum(r["duration"] for r in results if r["status"] == "processed")
    summary["timing"] = {"wall_s": round(time.time() - t0, 2), "segmentation_s": round(segmentation_s, 2),
                         "processed_audio_minutes": round(processed_s / 60, 2),
                         "s_per_audio_minute": round(segmentation_s / (processed_s / 60), 2) if processed_s else None}
    write_json(out_dir / "prepare_summary.json", summary)
    print_summary(summary)
    return 0


def run_recordings(jobs: list[tuple], workers: int) -> list[dict]:
    """process_recording over all jobs, in `workers` processes, with a progress bar."""
    results = []
    with tqdm(total=len(jobs), desc="recordings", unit="rec", file=sys.stdout) as bar:
        if workers == 1:
            for job in jobs:
                results.append(process_recording(job))
                bar.update()
        else:  # spawn: no forked copies of torch's thread pools
            with mp.get_context("spawn").Pool(workers) as pool:
                for result in pool.imap_unordered(process_recording, jobs):
                    results.append(result)
                    bar.update()
    return sorted(results, key=lambda r: r["rec_id"])


def gather_utterances(results: list[dict], out_dir: Path, collected: dict[str, dict],
                      summary: dict) -> tuple[list[dict], np.ndarray]:
    """The kept utterances of every recording (with their source) and their embeddings (N, 256);
    fills the recording and utterance counts of `summary`."""
    counts = {"found": len(results), "processed": 0, "reused": 0}
    skipped = [{"file": r["file"], "reason": r["reason"]} for r in results if r["status"] == "failed"]
    found, kept, embeddings = Counter(), [], []
    for r in results:
        if r["status"] not in ("processed", "reused"):
            continue
        counts[r["status"]] += 1
        done = read_json(out_dir / "work" / f"{r['rec_id']}.json")
        if done["status"] != "ok":
            skipped.append({"file": done["source_file"], "reason": done["reason"]})
            continue
        emb = np.load(out_dir / "work" / done["embeddings"]) if done["embeddings"] else None
        name = Path(done["source_file"]).name
        meta = collected.get(name, {})
        n_kept = 0  # embeddings are stored for the kept utterances only, in order
        for seg in done["segments"]:
            found[seg["status"]] += 1
            if seg["status"] == "kept":
                row = {**seg, "source": r["rec_id"], "source_file": name}
                if meta:
                    row.update(url=meta.get("url"), licence=meta.get("licence"), collection_source=meta.get("source"))
                kept.append(row)
                embeddings.append(emb[n_kept])
                n_kept += 1
    summary["recordings"] = {**counts, "used": len({s["source"] for s in kept}), "skipped": len(skipped)}
    summary["skipped_recordings"] = skipped
    summary["segments"] = {"found": sum(found.values()), "kept": found["kept"],
                           "rejected": {k: v for k, v in sorted(found.items()) if k != "kept"},
                           "kept_hours": round(sum(s["duration"] for s in kept) / 3600, 4)}
    return kept, np.stack(embeddings) if embeddings else np.zeros((0, 256), np.float32)


def write_corpus(kept: list[dict], split_of: dict[str, str], out_dir: Path, max_pair_gap: float,
                 max_history: int) -> tuple[dict, dict]:
    """manifests/{split}.jsonl and metadata/*_pairs.json; returns (rows, pairs) per split."""
    rows = {s: [] for s in SPLITS}
    pairs = {s: [] for s in SPLITS}
    for seg in sorted(kept, key=lambda s: (s["source"], s["start"])):
        split = split_of[seg["source"]]
        rows[split].append({
            "path": seg["path"], "text": "", "voice": f"spk{seg['cluster']}", "emotion": "neutral", "role": "user",
            "intent_id": None, "duration": seg["duration"], "split": split, "source": seg["source"],
            "start": seg["start"], "end": seg["end"], "cluster": seg["cluster"], "snr_db": seg["snr_db"],
            **{k: seg[k] for k in ("source_file", "url", "licence", "collection_source") if k in seg},
        })
    for rec in sorted(split_of):
        segs = [s for s in kept if s["source"] == rec]
        pairs[split_of[rec]].extend(build_pairs(segs, max_pair_gap, max_history))
    for split in SPLITS:
        write_manifest(out_dir / "manifests" / f"{split}.jsonl", rows[split])
        write_json(out_dir / "metadata" / PAIRS_FILES[split], pairs[split], indent=None)
    return rows, pairs


def print_summary(summary: dict) -> None:
    rec, seg = summary["recordings"], summary["segments"]
    print(f"recordings: {rec['found']} found, {rec['processed']} processed, {rec['reused']} reused; "
          f"{rec['used']} used, {rec['skipped']} skipped")
    for s in summary["skipped_recordings"]:
        print(f"  skipped {s['file']}: {s['reason']}")
    rejected = ", ".join(f"{k} {v}" for k, v in seg["rejected"].items()) or "none"
    print(f"utterances: {seg['found']} found, {seg['kept']} kept ({seg['kept_hours'] * 60:.1f} min); rejected: {rejected}")
    if "clusters" not in summary:
        return
    cl = summary["clusters"]
    print(f"speakers: {len(cl['per_cluster'])} clusters ({cl['method']}), silhouette {cl['silhouette']}")
    for c in cl["per_cluster"]:
        print(f"  {c['voice']}: {c['utterances']} utterances, {c['minutes']} min, {c['recordings']} recordings, "
              f"cohesion {c['mean_cosine_to_centroid']}")
    print("splits: " + "; ".join(f"{s} {v['utterances']} utt / {v['minutes']} min / {v['recordings']} rec / {v['pairs']} pairs"
                                 for s, v in summary["splits"].items()))
    t = summary["timing"]
    speed = f", {t['s_per_audio_minute']} s per minute of audio" if t["s_per_audio_minute"] else ""
    print(f"time: {t['wall_s']} s ({t['processed_audio_minutes']} min of audio processed{speed})")
    print(f"wrote {summary['output_dir']}/manifests, metadata, prepare_summary.json")


if __name__ == "__main__":
    sys.exit(main())
