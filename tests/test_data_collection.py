"""data_collection.py, offline: local media made by ffmpeg, served to yt-dlp as file:// URLs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

import data_collection as dc
from config import SAMPLE_RATE

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")

ROOT = Path(__file__).resolve().parents[1]

# name -> (ffmpeg arguments making it, duration in s); different containers, codecs, rates, channels.
MEDIA = {
    "tone_a.mp4": (["-f", "lavfi", "-i", "sine=frequency=220:duration=2.0", "-f", "lavfi", "-i",
                    "color=c=blue:s=32x32:d=2.0", "-shortest", "-c:v", "libx264", "-c:a", "aac",
                    "-ar", "44100", "-ac", "2"], 2.0),
    "noise_b.webm": (["-f", "lavfi", "-i", "anoisesrc=d=1.5:a=0.2", "-c:a", "libopus", "-ar", "48000"], 1.5),
    "tone_c.m4a": (["-f", "lavfi", "-i", "sine=frequency=330:duration=2.5", "-c:a", "aac", "-ar", "22050"], 2.5),
    "tone_d.mkv": (["-f", "lavfi", "-i", "sine=frequency=440:duration=1.0", "-c:a", "flac", "-ar", "8000"], 1.0),
}
GOOD_KEYS = ["generic tone_a", "generic noise_b", "generic tone_c", "generic tone_d"]
CORRUPT = "broken_x.mp4"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    for name, (args, _) in MEDIA.items():
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args, str(d / name)], check=True)
    (d / CORRUPT).write_bytes(os.urandom(4000))  # an .mp4 that is not one
    return d


def write_config(path: Path, media_dir: Path, names: list[str], **settings) -> Path:
    base = {"sleep_seconds": 0, "retries": 1, "backoff_seconds": 0, "min_free_gb": 0.01, "min_duration_s": 0}
    base.update(settings)
    lines = ["version: 1", "settings:"] + [f"  {k}: {v}" for k, v in base.items()] + ["sources:"]
    for name in names:
        lines += [f"  - name: {Path(name).stem}", "    kind: file",
                  f'    url: "file://{media_dir / name}"', '    licence: "test tone, no rights needed"',
                  "    speaker_type: test", "    max_items: 1", "    enabled: true"]
    path.write_text("\n".join(lines) + "\n")
    return path


# The corrupt file sits second, so good items come both before and after it.
ORDER = ["tone_a.mp4", CORRUPT, "noise_b.webm", "tone_c.m4a", "tone_d.mkv"]


def collect(cfg: Path, out: Path, *extra: str) -> tuple[int, dict]:
    rc = dc.main(["--config", str(cfg), "--output_dir", str(out), *extra])
    return rc, json.loads((out / "collection_summary.json").read_text())


def manifest_keys(out: Path, name: str = "manifest.jsonl") -> list[str]:
    return [json.loads(line)["key"] for line in (out / name).read_text().splitlines()]


def test_collects_16k_mono_wavs_one_corrupt_item_fails_alone_rerun_skips(media, tmp_path):
    cfg = write_config(tmp_path / "sources.yaml", media, ORDER)
    out = tmp_path / "data"
    rc, summary = collect(cfg, out)
    assert rc == 0
    assert summary["counts"] == {"ok": 4, "skipped": 0, "failed": 1}
    (failure,) = summary["failed"]
    assert failure["key"] == "generic broken_x" and failure["source"] == "broken_x"
    assert "ffprobe" in failure["reason"] or "Postprocessing" in failure["reason"]

    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == GOOD_KEYS  # the item after the corrupt one still came
    for row, (name, (_, seconds)) in zip(rows, MEDIA.items()):
        assert row["status"] == "ok" and row["licence"] == "test tone, no rights needed"
        assert row["url"] == f"file://{media / name}" and row["source"] == Path(name).stem
        info = sf.info(str(out / row["wav"]))
        assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1)
        assert abs(info.duration - seconds) < 0.06 and abs(row["duration"] - info.duration) < 1e-3
    assert (out / "download_archive.txt").read_text().splitlines() == GOOD_KEYS
    assert not (out / ".work").exists()

    before = {p: p.stat().st_mtime_ns for p in (out / "audio").iterdir()}
    manifest, archive = (out / "manifest.jsonl").read_bytes(), (out / "download_archive.txt").read_bytes()
    rc, summary = collect(cfg, out)
    assert summary["counts"] == {"ok": 0, "skipped": 4, "failed": 1}
    assert summary["skipped_by_reason"] == {"in archive": 4}
    assert (out / "manifest.jsonl").read_bytes() == manifest
    assert (out / "download_archive.txt").read_bytes() == archive
    assert {p: p.stat().st_mtime_ns for p in (out / "audio").iterdir()} == before  # nothing re-downloaded


def test_killed_mid_run_resumes_with_nothing_lost_or_duplicated(media, tmp_path):
    good = [n for n in ORDER if n != CORRUPT]
    cfg = write_config(tmp_path / "sources.yaml", media, good, sleep_seconds=1.5)
    out = tmp_path / "data"
    manifest = out / "manifest.jsonl"
    proc = subprocess.Popen([sys.executable, str(ROOT / "data_collection.py"), "--config", str(cfg),
                             "--output_dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (manifest.exists() and manifest.read_text().count("\n") >= 1):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # during the pause after the first item
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    first_rows = manifest.read_text().splitlines()
    assert 1 <= len(first_rows) < len(good), "the kill must land mid-run"
    first_wav = out / json.loads(first_rows[0])["wav"]
    first_mtime = first_wav.stat().st_mtime_ns

    rc, summary = collect(cfg, out, "--sleep_seconds", "0")
    assert rc == 0 and summary["counts"]["failed"] == 0
    assert summary["counts"]["ok"] == len(good) - len(first_rows)
    keys = manifest_keys(out)
    assert sorted(keys) == sorted(GOOD_KEYS) and len(set(keys)) == len(keys)
    assert manifest.read_text().splitlines()[: len(first_rows)] == first_rows
    archive = (out / "download_archive.txt").read_text().splitlines()
    assert sorted(archive) == sorted(GOOD_KEYS)
    assert first_wav.stat().st_mtime_ns == first_mtime
    assert all((out / json.loads(line)["wav"]).is_file() for line in manifest.read_text().splitlines())


def test_repairs_what_a_kill_between_writes_leaves(media, tmp_path):
    good = [n for n in ORDER if n != CORRUPT]
    cfg = write_config(tmp_path / "sources.yaml", media, good)
    out = tmp_path / "data"
    collect(cfg, out)
    # Killed after the last manifest row but before its archive line, and in a later item's
    # manifest append (a torn line).
    archive = out / "download_archive.txt"
    archive.write_text("\n".join(archive.read_text().splitlines()[:-1]) + "\n")
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"key": "generic tone_e", "id": "to')
    rc, summary = collect(cfg, out)
    assert summary["counts"] == {"ok": 0, "skipped": 4, "failed": 0}  # nothing downloaded again
    assert any("torn" in note for note in summary["repairs"])
    assert any("re-added 'generic tone_d'" in note for note in summary["repairs"])
    assert manifest_keys(out) == GOOD_KEYS
    assert archive.read_text().splitlines() == GOOD_KEYS


def test_max_videos_counts_earlier_runs_and_metadata_mode_downloads_nothing(media, tmp_path):
    good = [n for n in ORDER if n != CORRUPT]
    cfg = write_config(tmp_path / "sources.yaml", media, good)
    out = tmp_path / "data"
    _, summary = collect(cfg, out, "--max_videos", "2")
    assert summary["counts"]["ok"] == 2 and summary["stopped"] == "reached --max_videos 2"
    _, summary = collect(cfg, out, "--max_videos", "3")
    assert summary["counts"]["ok"] == 1 and manifest_keys(out) == GOOD_KEYS[:3]

    _, summary = collect(cfg, out, "--download_mode", "metadata")
    assert summary["counts"]["ok"] == 4  # a separate archive: metadata of every item
    rows = [json.loads(line) for line in (out / "metadata_manifest.jsonl").read_text().splitlines()]
    assert all(r["wav"] is None and r["status"] == "metadata" and (out / r["info"]).is_file() for r in rows)
    assert len(list((out / "audio").iterdir())) == 3


def test_full_mode_keeps_the_media_beside_the_wav(media, tmp_path):
    cfg = write_config(tmp_path / "sources.yaml", media, ["tone_a.mp4"])
    out = tmp_path / "data"
    _, summary = collect(cfg, out, "--download_mode", "full")
    (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["media"] == "raw/tone_a.mp4" and row["wav"] == "audio/tone_a.wav" and row["mode"] == "full"
    assert (out / row["media"]).read_bytes() == (media / "tone_a.mp4").read_bytes()
    assert sf.info(str(out / row["wav"])).samplerate == SAMPLE_RATE


def test_telugu_subtitles_are_kept_and_a_subtitle_failure_is_only_noted(media, tmp_path):
    (tmp_path / "te.vtt").write_text("WEBVTT\n\n00:00.000 --> 00:01.000\nనమస్కారం\n", encoding="utf-8")
    source = dc.Source("s", "file", "test", "test", 1, True, url=f"file://{media / 'tone_a.mp4'}")
    col = dc.Collection(tmp_path / "data", "audio")
    col.open()
    for vtt, expected in ((tmp_path / "te.vtt", "subtitles/tone_a.te.vtt"), (tmp_path / "missing.vtt", None)):
        with dc.yt_dlp.YoutubeDL({"enable_file_urls": True, "quiet": True}) as ydl:
            info = ydl.extract_info(source.url, download=False, process=False)
        info["subtitles"] = {"te": [{"url": f"file://{vtt}", "ext": "vtt"}], "en": [{"url": "file:///x.vtt", "ext": "vtt"}]}
        row = dc.collect_item(dc.Item(source, source.url, dc.archive_key(info), None, info), col, dc.Settings(), True)
        assert row["subtitles"] == expected and row["wav"] == "audio/tone_a.wav"
        if expected:
            assert "నమస్కారం" in (col.root / expected).read_text(encoding="utf-8") and row["subtitles_auto"] is False
        else:
            assert "missing.vtt" in row["subtitles_error"]


def test_low_disk_stops_before_any_download(media, tmp_path, capsys):
    cfg = write_config(tmp_path / "sources.yaml", media, ["tone_a.mp4"])
    out = tmp_path / "data"
    rc, summary = collect(cfg, out, "--min_free_gb", "1e9")
    assert rc == 3 and "GB free" in summary["stopped"] and "--min_free_gb" in summary["stopped"]
    assert not (out / "audio").exists() and summary["counts"]["ok"] == 0
    assert "stopped: only" in capsys.readouterr().out


def test_retries_back_off_on_transient_errors_only():
    settings = dc.Settings(retries=3, backoff_seconds=0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("HTTP Error 503: Service Unavailable")
        return "done"

    assert dc.with_retries(flaky, settings) == ("done", None, 3)

    def gone():
        calls.append(1)
        raise RuntimeError("ERROR: [youtube] abc: Private video. Sign in if you've been granted access")

    calls.clear()
    result, error, attempts = dc.with_retries(gone, settings)
    assert result is None and "Private video" in str(error) and attempts == 1 == len(calls)


GOOD_ENTRY = """  - name: news
    kind: search
    query: "ytsearch5:తెలుగు వార్తలు"
    licence: research only
    speaker_type: news_anchor
    max_items: 5
    enabled: true
"""


@pytest.mark.parametrize(
    "text, message",
    [
        ("version: 1\nsources:\n" + GOOD_ENTRY + "    licence_url: x\n", r":10: sources\[0\] \('news'\): unknown key 'licence_url'"),
        ("version: 1\nsources:\n" + GOOD_ENTRY.replace("    speaker_type: news_anchor\n", ""),
         r":3: sources\[0\] \('news'\): missing required field\(s\) \['speaker_type'\]"),
        ("version: 1\nsources:\n" + GOOD_ENTRY.replace("max_items: 5", "max_items: five"), r":3: .*expected an integer"),
        ("version: 1\nsources:\n" + GOOD_ENTRY.replace("enabled: true", "enabled: yes please"), r"expected true/false"),
        ("version: 1\nsources:\n" + GOOD_ENTRY + GOOD_ENTRY, r":10: sources\[1\] \('news'\): name already used on line 3"),
        ("version: 1\nsources:\n" + GOOD_ENTRY + '    url: "https://youtube.com/results?search_query=x"\n',
         r"exactly one of `query` or `url`"),
        ("version: 1\nsources:\n" + GOOD_ENTRY.replace("kind: search", "kind: podcast"), r"kind 'podcast' is not one of"),
        ("version: 1\nsources:\n" + GOOD_ENTRY.replace("kind: search", "kind: file"), r"kind file needs `url`"),
        ("version: 1\nsources:\n" + GOOD_ENTRY.replace("max_items: 5", "max_items: 0"), r"max_items must be > 0"),
        ("version: 1\nsources:\n" + GOOD_ENTRY.replace("enabled: true", "enabled: true\n    enabled: false"),
         r":10: sources\[0\] \('news'\): key 'enabled' appears twice \(first on line 9\)"),
        ("version: 1\nsetings:\n  retries: 2\nsources:\n" + GOOD_ENTRY, r":2: unknown top-level key 'setings'"),
        ("version: 1\nsettings:\n  retry: 2\nsources:\n" + GOOD_ENTRY, r":3: settings: unknown key 'retry'"),
        ("sources:\n" + GOOD_ENTRY, r"`version: 1` is required"),
        ("version: 1\nsources: []\n", r"non-empty list"),
        ("version: 1\nsources:\n  - name: [unclosed\n", r":\d+: not valid YAML"),
    ],
)
def test_config_errors_name_the_line_and_entry(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(dc.ConfigError, match=message):
        dc.load_sources(path)


def test_shipped_sources_validate_and_bad_config_exits_early(tmp_path, capsys):
    settings, sources = dc.load_sources(dc.DEFAULT_CONFIG)
    enabled = [s for s in sources if s.enabled]
    assert len(enabled) >= 8 and all(s.licence and s.speaker_type for s in enabled)
    assert {s.kind for s in sources} >= {"channel", "playlist", "search", "file"}
    query = next(s for s in enabled if s.name == "telugu_podcast_search")
    assert query.target() == f"ytsearch{query.max_items}:telugu podcast full episode"

    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 2\nsources: []\n")
    assert dc.main(["--config", str(bad), "--output_dir", str(tmp_path / "out")]) == 2
    assert "version: 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
