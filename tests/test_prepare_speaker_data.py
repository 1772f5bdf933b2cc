"""prepare_speaker_data.py on synthetic conversations rendered in the agent's four voices.

Each conversation is turns of festival-rendered Telugu with 0.8-1.4 s of silence between them,
over -60 dBFS noise, at random levels; one turn is two sentences 0.25 s apart (must merge),
one is four sentences longer than 15 s (must split at its longest pause, 0.7 s). The true speech
edges are known by construction, so segment boundaries, clustering and splits can be checked.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import prepare_speaker_data as psd
from audio_io import SPLITS, read_manifest
from config import DATA_DIR, SAMPLE_RATE
from prosody import active_rms_db

ROOT = Path(__file__).resolve().parents[1]
SR = SAMPLE_RATE
VOICE_NAMES = ("Arjun", "Ravi", "Priya", "Lakshmi")
FALLBACK_SENTENCES = [
    "మా ఊరిలో ప్రతి ఉదయం కోడి కూతతో రోజు మొదలవుతుంది.",
    "అమ్మమ్మ ఇంటి ముందు పెద్ద వేప చెట్టు ఉంది.",
    "ఈ రోజు వాతావరణం చాలా చల్లగా ఉంది.",
    "మేము రేపు ఉదయం హైదరాబాద్ వెళ్తున్నాము.",
    "పిల్లలు బడిలో కొత్త పాటలు నేర్చుకున్నారు.",
    "రైతులు పొలంలో వరి నాట్లు వేస్తున్నారు.",
    "మా అన్నయ్య కొత్త పుస్తకం కొన్నాడు.",
    "సాయంత్రం మేమంతా కలిసి సినిమాకు వెళ్దాం.",
]
# Each turn: (voice, sentences in it). "long" = 4 sentences, "double" = 2.
CONVERSATIONS = {
    "conv_a": ["Arjun", "Priya", "Arjun", "Priya", "Arjun", "Priya"],
    "conv_b": ["Ravi", "Lakshmi", "Ravi", "Lakshmi", "Ravi", "Lakshmi"],
    "conv_c": ["Arjun", "Lakshmi", "Ravi", "Priya", "Lakshmi", "Ravi"],
}
LONG_TURN = ("conv_c", 2)  # (conversation, turn index): four sentences, pauses 0.3/0.7/0.3 s
DOUBLE_TURN = ("conv_a", 1)  # two sentences, 0.25 s apart
WORKERS = 1


def sentences() -> list[str]:
    path = DATA_DIR / "sentences_te.txt"
    lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
    short = [s for s in lines if 45 <= len(s) <= 75]
    return short if len(short) >= 30 else FALLBACK_SENTENCES


def speech_extent(wav: np.ndarray, floor_db: float = 20.0) -> tuple[int, int]:
    """First and last sample of sustained speech: 10 ms frames within floor_db of the loudest,
    in runs of at least 100 ms (the renderer's lead-in noise and clicks are not speech)."""
    db = psd.frame_db(wav)
    active = np.flatnonzero(db > db.max() - floor_db)
    runs, start, prev = [], active[0], active[0]
    for i in active[1:]:
        if i - prev > 5:
            runs.append((start, prev + 1))
            start = i
        prev = i
    runs.append((start, prev + 1))
    runs = [r for r in runs if r[1] - r[0] >= 10]
    return runs[0][0] * psd.FRAME, runs[-1][1] * psd.FRAME


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Render the conversations once; returns (data_dir, truth) with truth[conv] = list of turns
    {voice, start, end, sentences: [(start, end)]} in seconds."""
    mts = pytest.importorskip("make_telugu_speech")
    if shutil.which("text2wave") is None:
        pytest.skip("needs festival (apt-get install festival festvox-te-nsk)")
    texts = sentences()
    rng = np.random.default_rng(7)
    data_dir = tmp_path_factory.mktemp("recordings")
    truth, n_text = {}, 0
    for conv, voices in CONVERSATIONS.items():
        parts, turns, pos = [np.zeros(SR // 2, np.float32)], [], SR // 2
        for t, voice in enumerate(voices):
            count = 4 if (conv, t) == LONG_TURN else 2 if (conv, t) == DOUBLE_TURN else 1
            pauses = [0.3, 0.7, 0.3] if count == 4 else [0.25]
            gain = 10 ** (rng.uniform(-6, 4) / 20)
            spans = []
            for k in range(count):
                wav = mts.synthesize_agent(texts[n_text % len(texts)], voice)
                n_text += 1
                a, b = speech_extent(wav)
                wav = wav[a:b] * gain
                fade = SR // 200
                wav[:fade] *= np.linspace(0, 1, fade)
                wav[-fade:] *= np.linspace(1, 0, fade)
                spans.append((pos / SR, (pos + len(wav)) / SR))
                parts.append(wav.astype(np.float32))
                pos += len(wav)
                if k < count - 1:
                    gap = int(pauses[k] * SR)
                    parts.append(np.zeros(gap, np.float32))
                    pos += gap
            turns.append({"voice": voice, "start": spans[0][0], "end": spans[-1][1], "sentences": spans})
            gap = int(rng.uniform(0.8, 1.4) * SR)
            parts.append(np.zeros(gap, np.float32))
            pos += gap
        audio = np.concatenate(parts)
        audio += 10 ** (-60 / 20) * rng.standard_normal(len(audio)).astype(np.float32)
        if conv == "conv_c":  # a 44.1 kHz stereo file: read resampled and mixed down
            import soxr

            up = soxr.resample(audio, SR, 44100)
            sf.write(data_dir / f"{conv}.wav", np.stack([up, up], axis=1), 44100, subtype="PCM_16")
        else:
            sf.write(data_dir / f"{conv}.wav", audio, SR, subtype="PCM_16")
        truth[conv] = turns
    # One recording per quality filter, each two sentences 1 s apart: every utterance must go.
    for name, level_db, noise_db, clip_gain in (("clipped", -20, -60, 8.0), ("quiet", -58, -95, 1.0),
                                                ("noisy", -26, -31, 1.0)):
        parts = []
        for k in range(2):
            wav = mts.synthesize_agent(texts[(n_text + k) % len(texts)], "Ravi")
            a, b = speech_extent(wav)
            wav = wav[a:b] * 10 ** ((level_db - active_rms_db(wav[a:b])) / 20)
            parts += [np.zeros(SR, np.float32), np.clip(wav * clip_gain, -1, 1).astype(np.float32)]
        audio = np.concatenate(parts + [np.zeros(SR, np.float32)])
        audio += 10 ** (noise_db / 20) * rng.standard_normal(len(audio)).astype(np.float32)
        sf.write(data_dir / f"{name}.wav", np.clip(audio, -1, 1), SR, subtype="PCM_16")
    (data_dir / "corrupt.wav").write_bytes(b"RIFF" + os.urandom(3000))
    sf.write(data_dir / "silence.wav", np.zeros(5 * SR, np.float32), SR, subtype="PCM_16")
    return data_dir, truth


def run_prepare(data_dir: Path, out_dir: Path, *extra: str) -> tuple[int, dict]:
    rc = psd.main(["--data_dir", str(data_dir), "--output_dir", str(out_dir), "--num_speakers", "4",
                   "--split_ratio", "0.8", "0.1", "0.1", "--workers", str(WORKERS), "--seed", "3", *extra])
    summary = json.loads((out_dir / "prepare_summary.json").read_text())
    return rc, summary


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    data_dir, truth = corpus
    out_dir = tmp_path_factory.mktemp("speaker_data")
    t0 = time.time()
    rc, summary = run_prepare(data_dir, out_dir)
    wall = time.time() - t0
    assert rc == 0
    rows = [r for split in SPLITS for r in read_manifest(out_dir / "manifests" / f"{split}.jsonl", absolute_paths=False)]
    minutes = sum(t["end"] for turns in truth.values() for t in turns[-1:]) / 60
    print(f"\nprepare: {wall:.1f} s for {minutes:.2f} min of conversation ({wall / minutes:.1f} s per minute)")
    return out_dir, rows, summary


def true_voice(row: dict, truth: dict) -> str:
    """The voice of the turn that overlaps the segment most."""
    turns = truth[row["source"]]
    overlap = [min(row["end"], t["end"]) - max(row["start"], t["start"]) for t in turns]
    return turns[int(np.argmax(overlap))]["voice"]


def test_segment_edges_within_100_ms_of_the_true_speech_edges(prepared, corpus):
    _, truth = corpus
    _, rows, _ = prepared
    errors = []
    for conv, turns in truth.items():
        segs = sorted((r for r in rows if r["source"] == conv), key=lambda r: r["start"])
        starts = [s for t in turns for s, _ in t["sentences"]]
        ends = [e for t in turns for _, e in t["sentences"]]
        for seg in segs:  # every edge lies on a true speech edge
            errors.append(min(abs(seg["start"] - s) for s in starts))
            errors.append(min(abs(seg["end"] - e) for e in ends))
        for t, turn in enumerate(turns):  # every turn begins and ends a segment
            inside = [s for s in segs if s["start"] < turn["end"] and s["end"] > turn["start"]]
            assert inside, f"{conv} turn {t} has no segment"
            assert abs(inside[0]["start"] - turn["start"]) <= 0.1, (conv, t, inside[0]["start"], turn["start"])
            assert abs(inside[-1]["end"] - turn["end"]) <= 0.1, (conv, t, inside[-1]["end"], turn["end"])
            if (conv, t) == LONG_TURN:  # cut at the 0.7 s pause, after the second sentence
                assert len(inside) == 2
                assert abs(inside[0]["end"] - turn["sentences"][1][1]) <= 0.1
                assert abs(inside[1]["start"] - turn["sentences"][2][0]) <= 0.1
            else:  # one segment per turn; the two-sentence turn merged across its 0.25 s pause
                assert len(inside) == 1, (conv, t, [(s["start"], s["end"]) for s in inside])
    errors_ms = np.array(errors) * 1000
    print(f"\nboundary error: mean {errors_ms.mean():.0f} ms, max {errors_ms.max():.0f} ms over {len(errors)} edges")
    assert errors_ms.max() <= 100


def test_clusters_recover_the_voices(prepared, corpus):
    _, truth = corpus
    _, rows, summary = prepared
    pairs = Counter((r["cluster"], true_voice(r, truth)) for r in rows)
    majority = {}
    for (cluster, voice), n in pairs.items():
        if n > majority.get(cluster, (None, 0))[1]:
            majority[cluster] = (voice, n)
    purity = sum(n for _, n in majority.values()) / len(rows)
    silhouette = summary["clusters"]["silhouette"]
    print(f"\nclustering: purity {purity:.3f}, silhouette {silhouette}, sizes "
          f"{[c['utterances'] for c in summary['clusters']['per_cluster']]}")
    assert purity >= 0.9
    assert sorted(v for v, _ in majority.values()) == sorted(VOICE_NAMES)  # one cluster per voice
    assert all(r["voice"] == f"spk{r['cluster']}" for r in rows)
    sizes = [c["utterances"] for c in summary["clusters"]["per_cluster"]]
    assert sizes == sorted(sizes, reverse=True)  # spk0 is the largest


def test_splits_hold_whole_recordings_and_pairs_follow_turns(prepared):
    out_dir, rows, summary = prepared
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["source"], r["split"]) == r["split"], f"{r['source']} leaks across splits"
        assert (r["role"], r["emotion"], r["intent_id"], r["text"]) == ("user", "neutral", None, "")
    assert sorted(split_of.values()) == sorted(SPLITS)  # three recordings: one per split
    by_path = {r["path"]: r for r in rows}
    for split in SPLITS:
        name = {"train": "train_pairs.json", "val": "validation_pairs.json", "test": "test_pairs.json"}[split]
        pairs = json.loads((out_dir / "metadata" / name).read_text())
        assert len(pairs) == summary["splits"][split]["pairs"] > 0
        for p in pairs:
            a, b = by_path[p["input_path"]], by_path[p["target_path"]]
            assert a["split"] == b["split"] == split and a["source"] == b["source"] == p["conversation_id"]
            assert a["cluster"] != b["cluster"] and b["start"] > a["end"]
            assert p["speaker_id"] == b["cluster"] and p["voice"] == b["voice"] and p["user_voice"] == a["voice"]
            for h in p["history"]:
                assert by_path[h["input_path"]]["end"] <= by_path[h["target_path"]]["start"] <= a["start"]
                assert by_path[h["input_path"]]["split"] == split
        # every change of speaker between neighbouring utterances is a pair (the long turn's two
        # halves share a speaker and make none): 5 per six-turn conversation
        segs = sorted((r for r in rows if r["split"] == split), key=lambda r: r["start"])
        changes = sum(a["cluster"] != b["cluster"] for a, b in zip(segs, segs[1:]))
        assert len(pairs) == changes == 5
        assert [len(p["history"]) for p in pairs] == [0, 0, 1, 1, 2]  # earlier exchanges, none overlapping


def test_outputs_are_2_to_15_s_normalised_16k_mono(prepared):
    out_dir, rows, summary = prepared
    for r in rows:
        wav, sr = sf.read(out_dir / r["path"], dtype="float32")
        assert sr == SR and wav.ndim == 1
        assert 2.0 <= len(wav) / SR <= 15.0 and abs(len(wav) / SR - r["duration"]) < 1e-3
        assert abs(active_rms_db(wav) + 23.0) < 1.0 or np.abs(wav).max() > 0.95
        assert r["snr_db"] > 20  # speech over -60 dBFS noise


def test_corrupt_and_silent_files_are_skipped_and_reported(prepared):
    _, _, summary = prepared
    # the silent file is analysed (and remembered), the corrupt one cannot be
    assert summary["recordings"] == {"found": 8, "processed": 7, "reused": 0, "skipped": 2, "used": 3}
    reasons = {Path(s["file"]).name: s["reason"] for s in summary["skipped_recordings"]}
    assert reasons["corrupt.wav"].startswith("corrupt") and "silent" in reasons["silence.wav"]


def test_quality_filters_reject_and_count(prepared):
    out_dir, rows, summary = prepared
    rejected = summary["segments"]["rejected"]
    assert not any(r["source"] in ("clipped", "quiet", "noisy") for r in rows)
    for source, reason in (("clipped", "clipping"), ("quiet", "too_quiet"), ("noisy", "low_snr")):
        segs = json.loads((out_dir / "work" / f"{source}.json").read_text())["segments"]
        assert segs and all(s["status"] == reason for s in segs), (source, [s["status"] for s in segs])
        assert rejected[reason] == len(segs)
    assert summary["segments"]["found"] == summary["segments"]["kept"] + sum(rejected.values())


def test_rerun_reuses_everything_and_a_killed_run_resumes_to_the_same_corpus(prepared, corpus, tmp_path):
    data_dir, _ = corpus
    ref_dir, _, _ = prepared
    outputs = [f"manifests/{s}.jsonl" for s in SPLITS] + [f"metadata/{n}" for n in
                                                          ("train_pairs.json", "validation_pairs.json", "test_pairs.json")]
    reference = {name: (ref_dir / name).read_bytes() for name in outputs}
    rc, summary = run_prepare(data_dir, ref_dir)
    assert rc == 0 and summary["recordings"]["reused"] == 7 and summary["recordings"]["processed"] == 0
    assert all((ref_dir / name).read_bytes() == data for name, data in reference.items())

    out_dir = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "prepare_speaker_data.py"), "--data_dir", str(data_dir), "--output_dir",
           str(out_dir), "--num_speakers", "4", "--workers", "2", "--seed", "3"]
    # A new session, killed as a whole: SIGKILL to the parent alone would leave its pool workers
    # running and writing, which is not what a crash, an OOM kill or a lost SSH session does.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out_dir / "work").glob("conv_*.json")):
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    n_conversations = len(list((ref_dir / "work").glob("conv_*.json")))
    assert 1 <= len(list((out_dir / "work").glob("conv_*.json"))) < n_conversations, "the kill must land mid-run"
    done_before = len(list((out_dir / "work").glob("*.json")))  # the silent file's marker too
    rc, summary = run_prepare(data_dir, out_dir)
    assert rc == 0 and summary["recordings"]["reused"] == done_before
    assert summary["recordings"]["processed"] == 7 - done_before
    for name, data in reference.items():
        assert (out_dir / name).read_bytes() == data, f"{name} differs from the uninterrupted run"
    written = sorted(p.relative_to(out_dir).as_posix() for p in (out_dir / "wavs").rglob("*.wav"))
    assert written == sorted(p.relative_to(ref_dir).as_posix() for p in (ref_dir / "wavs").rglob("*.wav"))


# --------------------------------------------------------------------------------------
# Pure functions, no audio


def test_utterances_merge_close_regions_and_split_long_runs_at_the_longest_pause():
    s = SR
    db = np.full(200 * 100, -30.0)  # 200 s of flat "speech" energy
    regions = [(0, 1 * s), (int(1.2 * s), 3 * s),  # 0.2 s pause: merged
               (5 * s, 9 * s), (int(9.3 * s), 13 * s), (14 * s, 18 * s), (int(18.3 * s), 22 * s)]  # 1 s pause longest
    groups = psd.utterances(regions, merge_gap=int(0.5 * s), min_len=2 * s, max_len=15 * s, db=db)
    spans = [(g[0][0] / s, g[-1][1] / s) for g in groups]
    assert spans == [(0, 3), (5, 13), (14, 22)]
    # one unbroken 40 s region: cut at its quietest points into pieces of at most 15 s
    db[(20 * s // psd.FRAME): (20 * s // psd.FRAME) + 5] = -70.0
    groups = psd.utterances([(0, 40 * s)], int(0.5 * s), 2 * s, 15 * s, db)
    lengths = [(g[-1][1] - g[0][0]) / s for g in groups]
    assert all(2 <= n <= 15 for n in lengths) and abs(sum(lengths) - 40) < 1e-6
    assert any(abs(g[0][1] / s - 20.0) < 0.06 for g in groups)  # the quiet dip became a cut


def test_assign_splits_keeps_recordings_whole_and_follows_the_ratio():
    rng = np.random.default_rng(0)
    durations = {f"rec{i:03d}": float(rng.uniform(60, 3600)) for i in range(200)}
    split_of = psd.assign_splits(durations, (0.8, 0.1, 0.1), seed=1)
    assert split_of == psd.assign_splits(durations, (0.8, 0.1, 0.1), seed=1)
    total = sum(durations.values())
    for split, share in zip(SPLITS, (0.8, 0.1, 0.1)):
        got = sum(d for r, d in durations.items() if split_of[r] == split) / total
        assert abs(got - share) < 0.02
    assert set(psd.assign_splits({"a": 10.0, "b": 10.0, "c": 10.0}, (0.8, 0.1, 0.1), 0).values()) == set(SPLITS)


def test_bad_arguments_fail_early(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(SystemExit):
        psd.main(["--data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        psd.main(["--data_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                  "--split_ratio", "0.8", "0.3", "0.1"])
    with pytest.raises(SystemExit):  # no audio files
        psd.main(["--data_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out")])
