"""Collect Telugu speech with yt-dlp into 16 kHz mono WAVs, a manifest and a download archive.

Usage (the mission's Phase 2):
    python data_collection.py --config data_sources.yaml --output_dir /workspace/telugu_data \
        --max_videos 500 --download_mode full
    python data_collection.py --download_mode metadata --max_videos 20   # check the sources first
    python data_collection.py --config local.yaml --enable_file_urls     # file:///abs/x.mp4 sources

Download modes:
    audio      the best audio-only stream, converted to audio/<id>.wav (16 kHz mono, by ffmpeg)
    full       the video (<= 720p) kept in raw/<id>.<ext>, plus the same audio/<id>.wav
    metadata   no media: info/<id>.info.json and subtitles only (to check sources and licences)

Output folder (default <workspace>/telugu_data):
    audio/<id>.wav             16 kHz mono PCM WAV            (audio, full)
    raw/<id>.<ext>             the downloaded video           (full)
    subtitles/<id>.<lang>.vtt  Telugu subtitles when the uploader offers them
    info/<id>.info.json        yt-dlp's metadata
    manifest.jsonl             one row per finished item (metadata_manifest.jsonl in metadata mode)
    download_archive.txt       "<extractor> <id>" per finished item (metadata_archive.txt), the
                               format of `yt-dlp --download-archive`, so a rerun skips them
    collection_summary.json    this run: counts ok / skipped / failed, with the reasons

Dependability on a long unattended run:
    * one item at a time; any error in an item is recorded and the batch goes on
    * transient errors are retried with exponential backoff; permanent ones are not
    * a pause between items (rate limit) and a free-disk check before each item
    * files are renamed into place only when complete, then the manifest row is appended, then
      the archive line, each append a single fsync'ed write. A run killed at any point loses at
      most the item in progress: the next run repairs a torn last line, re-adds an archive line
      the kill prevented, and skips everything finished, so nothing is lost or duplicated.
    * the summary is rewritten after every item, so even a killed run leaves an up-to-date one
    * a lock file stops two runs from sharing one output folder
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
import yaml
import yt_dlp

from audio_io import write_json
from config import REPO_DIR, SAMPLE_RATE, add_workspace_arg, config_from_dict, workspace_from_args

DEFAULT_CONFIG = REPO_DIR / "data_sources.yaml"
DOWNLOAD_MODES = ("audio", "full", "metadata")
SOURCE_KINDS = ("channel", "playlist", "search", "video", "file")

# Phrases of yt-dlp errors that another attempt cannot fix (lower case).
PERMANENT_ERRORS = (
    "unsupported url", "private video", "video unavailable", "not available", "members-only",
    "sign in to confirm your age", "has been removed", "copyright", "postprocessing",
    "no such file or directory", "is a playlist", "not 16 khz mono",
)


# --------------------------------------------------------------------------------------
# Configuration: data_sources.yaml (its schema is documented at the top of that file)


class ConfigError(ValueError):
    """data_sources.yaml is invalid; the message names the file, the line and the entry."""


@dataclass
class Settings:
    sleep_seconds: float = 5.0
    retries: int = 3
    backoff_seconds: float = 10.0
    min_free_gb: float = 5.0
    min_duration_s: float = 60.0
    max_duration_s: float = 10800.0
    subtitle_langs: list[str] = field(default_factory=lambda: ["te"])
    auto_subtitles: bool = False


@dataclass
class Source:
    name: str
    kind: str
    licence: str
    speaker_type: str
    max_items: int
    enabled: bool
    url: str | None = None
    query: str | None = None
    notes: str = ""
    line: int = 0  # where the entry starts in the config file, for messages

    def target(self) -> str:
        """What yt-dlp is asked to extract: the URL, or a ytsearchN: query."""
        if self.url:
            return self.url
        if re.match(r"^ytsearch(\d+|all)?:", self.query):
            return self.query
        return f"ytsearch{self.max_items}:{self.query}"


SOURCE_REQUIRED = ("name", "kind", "licence", "speaker_type", "max_items", "enabled")
SOURCE_OPTIONAL = ("url", "query", "notes")
TOP_LEVEL_KEYS = ("version", "settings", "sources")


def _mapping_lines(node: yaml.MappingNode, where: str, path: Path) -> dict[str, int]:
    """Line of each key in a YAML mapping node; duplicate keys raise (PyYAML keeps the last)."""
    lines: dict[str, int] = {}
    for key_node, _ in node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in lines:
            raise ConfigError(f"{path}:{line}: {where}: key {key!r} appears twice (first on line {lines[key]})")
        lines[key] = line
    return lines


def load_sources(path: str | os.PathLike) -> tuple[Settings, list[Source]]:
    """Read and strictly validate a sources file. Raises ConfigError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config not found; pass --config (the default is {DEFAULT_CONFIG})")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from e
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}: expected a mapping with keys {list(TOP_LEVEL_KEYS)}")
    top_lines = _mapping_lines(root, "top level", path)
    nodes = {k.value: v for k, v in root.value}

    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(
            f"{path}:{top_lines[str(unknown[0])]}: unknown top-level key {unknown[0]!r}; "
            f"valid keys: {list(TOP_LEVEL_KEYS)}"
        )
    if data.get("version") != 1:
        line = top_lines.get("version", 1)
        raise ConfigError(f"{path}:{line}: `version: 1` is required (got {data.get('version')!r})")

    settings_data = data.get("settings") or {}
    if not isinstance(settings_data, dict):
        raise ConfigError(f"{path}:{top_lines['settings']}: `settings` must be a mapping")
    if settings_data:
        setting_lines = _mapping_lines(nodes["settings"], "settings", path)
        valid = [f.name for f in Settings.__dataclass_fields__.values()]
        for key in settings_data:
            if key not in valid:
                raise ConfigError(
                    f"{path}:{setting_lines[str(key)]}: settings: unknown key {key!r}; valid keys: {valid}"
                )
    try:
        settings = config_from_dict(Settings, settings_data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}:{top_lines.get('settings', 1)}: settings: {e}") from e
    for name in ("retries", "sleep_seconds", "backoff_seconds", "min_free_gb", "min_duration_s"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{path}: settings.{name} must be >= 0 (got {getattr(settings, name)})")

    raw_sources = data.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        line = top_lines.get("sources", 1)
        raise ConfigError(f"{path}:{line}: `sources` must be a non-empty list of entries")
    sources, seen = [], {}
    for i, (entry, node) in enumerate(zip(raw_sources, nodes["sources"].value)):
        line = node.start_mark.line + 1
        label = f"sources[{i}]" + (f" ({entry.get('name')!r})" if isinstance(entry, dict) and "name" in entry else "")
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}:{line}: {label}: each source must be a mapping")
        key_lines = _mapping_lines(node, label, path)
        for key in entry:
            if key not in SOURCE_REQUIRED + SOURCE_OPTIONAL:
                raise ConfigError(
                    f"{path}:{key_lines[str(key)]}: {label}: unknown key {key!r}; "
                    f"valid keys: {list(SOURCE_REQUIRED + SOURCE_OPTIONAL)}"
                )
        missing = [k for k in SOURCE_REQUIRED if k not in entry]
        if missing:
            raise ConfigError(f"{path}:{line}: {label}: missing required field(s) {missing}")
        try:
            source = config_from_dict(Source, {**entry, "notes": entry.get("notes") or ""})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}:{line}: {label}: {e}") from e
        source.line = line
        if not re.fullmatch(r"[A-Za-z0-9_-]+", source.name):
            raise ConfigError(f"{path}:{line}: {label}: name may hold only letters, digits, _ and -")
        if source.name in seen:
            raise ConfigError(f"{path}:{line}: {label}: name already used on line {seen[source.name]}")
        seen[source.name] = line
        if source.kind not in SOURCE_KINDS:
            raise ConfigError(f"{path}:{line}: {label}: kind {source.kind!r} is not one of {list(SOURCE_KINDS)}")
        if source.max_items <= 0:
            raise ConfigError(f"{path}:{line}: {label}: max_items must be > 0")
        if not source.licence.strip():
            raise ConfigError(f"{path}:{line}: {label}: licence must say under what terms the audio is used")
        has_url, has_query = bool(source.url), bool(source.query)
        if source.kind == "search":
            if has_url == has_query:
                raise ConfigError(f"{path}:{line}: {label}: a search needs exactly one of `query` or `url`")
        elif not has_url or has_query:
            raise ConfigError(f"{path}:{line}: {label}: kind {source.kind} needs `url` (and no `query`)")
        if source.kind == "file" and not source.url.startswith("file:///"):
            raise ConfigError(f"{path}:{line}: {label}: kind file needs a file:///absolute/path URL")
        sources.append(source)
    return settings, sources


# --------------------------------------------------------------------------------------
# Append-only logs (manifest and archive): one fsync'ed write per line, torn tails repaired


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write + fsync, so a kill leaves it whole or absent."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines_repairing(path: Path) -> tuple[list[str], bool]:
    """Complete lines of an append-only file; a torn last line (no newline) is cut off the
    file. Returns (lines, repaired)."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    repaired = False
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        data, repaired = data[:keep], True
    return [line for line in data.decode("utf-8").splitlines() if line.strip()], repaired


def read_collection_manifest(path: str | os.PathLike, lines: list[str] | None = None) -> list[dict]:
    """Rows of a collection manifest (manifest.jsonl); a torn last line is repaired away.
    `lines`: the file's lines when already read."""
    path = Path(path)
    if lines is None:
        lines, _ = read_lines_repairing(path)
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e}); fix or delete that line") from e
    return rows


# --------------------------------------------------------------------------------------
# yt-dlp


class _YtdlpLog:
    """Routes yt-dlp's messages: warnings are printed, errors come back as exceptions."""

    def debug(self, msg):
        pass

    def info(self, msg):
        pass

    def warning(self, msg):
        print(f"    yt-dlp: {msg}", file=sys.stderr)

    def error(self, msg):
        pass


def ydl_options(mode: str, settings: Settings, work_dir: Path, enable_file_urls: bool) -> dict:
    """yt-dlp options for downloading one item into `work_dir` as item.<ext> (+ item.wav)."""
    opts = {
        "quiet": True, "no_warnings": False, "noprogress": True, "logger": _YtdlpLog(),
        "enable_file_urls": enable_file_urls,
        "paths": {"home": str(work_dir)}, "outtmpl": {"default": "item.%(ext)s"},
        "retries": 3, "fragment_retries": 3, "extractor_retries": 2, "socket_timeout": 30,
        "noplaylist": True,
    }
    if mode == "metadata":
        opts["skip_download"] = True
        return opts
    opts["format"] = "bestaudio/best" if mode == "audio" else "bv*[height<=?720]+ba/b[height<=?720]/b"
    opts["keepvideo"] = mode == "full"
    opts["merge_output_format"] = "mp4/mkv"
    # ExtractAudio's ffmpeg call gets -ar/-ac, so the WAV comes out 16 kHz mono directly.
    opts["postprocessors"] = [{"key": "FFmpegExtractAudio", "preferredcodec": "wav"}]
    opts["postprocessor_args"] = {"extractaudio": ["-ar", str(SAMPLE_RATE), "-ac", "1"]}
    return opts


def subtitle_options(settings: Settings, work_dir: Path, enable_file_urls: bool) -> dict:
    return {
        "quiet": True, "noprogress": True, "logger": _YtdlpLog(), "enable_file_urls": enable_file_urls,
        "paths": {"home": str(work_dir)}, "outtmpl": {"default": "item.%(ext)s"},
        "skip_download": True, "writesubtitles": True, "writeautomaticsub": settings.auto_subtitles,
        "subtitleslangs": list(settings.subtitle_langs), "subtitlesformat": "vtt/srt/best",
    }


def archive_key(info: dict) -> str | None:
    """'<extractor> <id>', as `yt-dlp --download-archive` writes it; None when unknown."""
    extractor = info.get("extractor_key") or info.get("ie_key")
    if not extractor or not info.get("id"):
        return None
    return f"{extractor.lower()} {info['id']}"


@dataclass
class Item:
    source: Source
    url: str
    key: str | None
    title: str | None
    info: dict | None  # the full info when enumeration already extracted it


def enumerate_source(flat_opts: dict, source: Source) -> list[Item]:
    """List a source's items cheaply (flat extraction: ids and URLs, not formats)."""
    with yt_dlp.YoutubeDL({**flat_opts, "playlistend": source.max_items}) as ydl:
        info = ydl.extract_info(source.target(), download=False)
    if info.get("_type") in ("playlist", "multi_video"):
        items = []
        for entry in info.get("entries") or []:
            if not entry:
                continue
            url = entry.get("url") or entry.get("webpage_url")
            if url:
                items.append(Item(source, url, archive_key(entry), entry.get("title"), None))
            if len(items) >= source.max_items:
                break
        return items
    return [Item(source, info.get("webpage_url") or source.target(), archive_key(info), info.get("title"), info)]


def interleave(lists: list[list[Item]]) -> list[Item]:
    """Round-robin over sources, so --max_videos spreads over all of them."""
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def is_permanent(error: Exception) -> bool:
    msg = str(error).lower()
    return any(p in msg for p in PERMANENT_ERRORS)


def error_reason(error: Exception) -> str:
    return str(error).removeprefix("ERROR: ").strip()[:300]


def with_retries(fn, settings: Settings, on_error=None):
    """Call `fn` until it succeeds, at most 1 + settings.retries times, waiting backoff_seconds,
    then twice that, ... between attempts; permanent errors are not retried.
    Returns (result, last error or None, attempts)."""
    attempts = 0
    while True:
        attempts += 1
        try:
            return fn(), None, attempts
        except Exception as e:  # noqa: BLE001 (the caller records the error and goes on)
            if on_error:
                on_error()
            if attempts > settings.retries or is_permanent(e):
                return None, e, attempts
            time.sleep(settings.backoff_seconds * 2 ** (attempts - 1))


def safe_name(item_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item_id).strip("._")
    return name[:120] or "item"


# --------------------------------------------------------------------------------------
# The collection run


class LowDisk(RuntimeError):
    pass


@dataclass
class Collection:
    """State of one output folder: the manifest and archive of one mode group."""

    root: Path
    mode: str

    def __post_init__(self):
        prefix = "metadata_" if self.mode == "metadata" else ""
        self.manifest_path = self.root / f"{prefix}manifest.jsonl"
        self.archive_path = self.root / ("metadata_archive.txt" if self.mode == "metadata" else "download_archive.txt")
        self.summary_path = self.root / "collection_summary.json"
        self.work_dir = self.root / ".work"

    def open(self) -> list[str]:
        """Load the archive, repairing what a kill can leave; returns notes on what was repaired."""
        notes = []
        lines, torn = read_lines_repairing(self.manifest_path)
        if torn:
            notes.append(f"cut a torn last line off {self.manifest_path.name} (a kill mid-write)")
        self.rows = read_collection_manifest(self.manifest_path, lines)
        archive_lines, torn = read_lines_repairing(self.archive_path)
        if torn:
            notes.append(f"cut a torn last line off {self.archive_path.name}")
        self.archive = set(archive_lines)
        # The manifest row is appended before the archive line; a kill between the two leaves
        # a finished item the archive lacks.
        for row in self.rows:
            if row["key"] not in self.archive:
                append_line(self.archive_path, row["key"])
                self.archive.add(row["key"])
                notes.append(f"re-added {row['key']!r} to the archive (a kill after its manifest row)")
        orphans = len(self.archive - {r["key"] for r in self.rows})
        if orphans:
            notes.append(f"{orphans} archive entries have no manifest row (added by another tool); they are skipped")
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
        return notes

    def finish(self, row: dict) -> None:
        append_line(self.manifest_path, json.dumps(row, ensure_ascii=False))
        append_line(self.archive_path, row["key"])
        self.rows.append(row)
        self.archive.add(row["key"])


def check_disk(root: Path, min_free_gb: float) -> None:
    free_gb = shutil.disk_usage(root).free / 1e9
    if free_gb < min_free_gb:
        raise LowDisk(
            f"only {free_gb:.1f} GB free on the disk holding {root} (need {min_free_gb:g} GB); "
            "free some space or lower --min_free_gb, then rerun: finished items are kept"
        )


def collect_item(item: Item, col: Collection, settings: Settings, enable_file_urls: bool) -> dict:
    """Download one item and return its manifest row; raises on failure. Files are moved into
    place only when complete; the caller appends the row."""
    work = col.work_dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    mode = col.mode
    with yt_dlp.YoutubeDL(ydl_options(mode, settings, work, enable_file_urls)) as ydl:
        info = ydl.process_ie_result(copy.deepcopy(item.info), download=True)

    item_id = safe_name(str(info["id"]))
    row = {
        "key": item.key, "id": info["id"], "extractor": info.get("extractor_key"),
        "url": info.get("webpage_url") or item.url, "title": info.get("title"),
        "channel": info.get("channel") or info.get("uploader"),
        "channel_url": info.get("channel_url") or info.get("uploader_url"),
        "upload_date": info.get("upload_date"), "duration": info.get("duration"),
        "language": info.get("language"), "licence": item.source.licence,
        "licence_reported": info.get("license"), "source": item.source.name,
        "source_kind": item.source.kind, "speaker_type": item.source.speaker_type,
        "subtitles": None, "subtitles_lang": None, "subtitles_auto": None,
        "wav": None, "media": None, "info": None, "sample_rate": None,
        "status": "metadata" if mode == "metadata" else "ok", "mode": mode,
        "collected_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }

    # Subtitles are optional: a failure (often HTTP 429) is noted, never fatal.
    langs = [lang for lang in settings.subtitle_langs
             if lang in (info.get("subtitles") or {})
             or (settings.auto_subtitles and lang in (info.get("automatic_captions") or {}))]
    if langs:
        try:
            with yt_dlp.YoutubeDL(subtitle_options(settings, work, enable_file_urls)) as ydl:
                done = ydl.process_ie_result(copy.deepcopy(info), download=True)
            for lang, sub in (done.get("requested_subtitles") or {}).items():
                src = Path(sub.get("filepath") or "")
                if src.is_file():
                    dst = col.root / "subtitles" / f"{item_id}.{lang}.{sub.get('ext', 'vtt')}"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
                    row.update(subtitles=str(dst.relative_to(col.root)), subtitles_lang=lang,
                               subtitles_auto=lang not in (info.get("subtitles") or {}))
                    break
        except Exception as e:  # noqa: BLE001 (any subtitle error is only a note)
            row["subtitles_error"] = str(e)[:300]

    info_path = col.root / "info" / f"{item_id}.info.json"
    write_json(info_path, yt_dlp.YoutubeDL.sanitize_info(info, remove_private_keys=True), indent=None)
    row["info"] = str(info_path.relative_to(col.root))
    if mode == "metadata":
        return row

    wav = work / "item.wav"
    if not wav.is_file():
        raise RuntimeError(f"yt-dlp finished but produced no WAV for {item.url}")
    meta = sf.info(str(wav))
    if meta.samplerate != SAMPLE_RATE or meta.channels != 1 or meta.frames == 0:
        raise RuntimeError(
            f"extracted audio is not 16 kHz mono ({meta.samplerate} Hz, {meta.channels} ch, "
            f"{meta.frames} samples); check that ffmpeg works"
        )
    if mode == "full":
        # item.<ext>, not the item.f137.mp4-style streams a merge leaves behind under keepvideo
        media = [p for p in work.glob("item.*") if p.name.count(".") == 1
                 and p.suffix not in (".wav", ".vtt", ".srt", ".part", ".ytdl", ".json")]
        if media:
            dst = col.root / "raw" / f"{item_id}{media[0].suffix}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(media[0], dst)
            row["media"] = str(dst.relative_to(col.root))
    dst = col.root / "audio" / f"{item_id}.wav"
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(wav, dst)
    row.update(wav=str(dst.relative_to(col.root)), sample_rate=SAMPLE_RATE,
               duration=round(meta.frames / SAMPLE_RATE, 3))
    return row


def process_item(item: Item, col: Collection, settings: Settings, flat_opts: dict, enable_file_urls: bool):
    """One attempt at an item: its manifest row when collected, or the reason (a str) to skip it."""
    if item.info is None:  # full metadata, to filter before downloading
        with yt_dlp.YoutubeDL({**flat_opts, "extract_flat": False, "noplaylist": True}) as ydl:
            item.info = ydl.extract_info(item.url, download=False, process=False)
    if item.info.get("_type") in ("playlist", "multi_video"):
        raise RuntimeError(f"{item.url} is a playlist; list it as a source of kind playlist")
    item.key = archive_key(item.info) or item.key
    if item.key in col.archive:
        return "in archive"
    info = item.info
    duration = info.get("duration")
    if info.get("is_live") or info.get("live_status") in ("is_live", "is_upcoming"):
        return "live stream"
    if duration is not None and duration < settings.min_duration_s:
        return f"shorter than {settings.min_duration_s:g} s"
    if duration is not None and duration > settings.max_duration_s:
        return f"longer than {settings.max_duration_s:g} s"
    return collect_item(item, col, settings, enable_file_urls)


def run_collection(
    sources: list[Source], settings: Settings, output_dir: Path, mode: str, max_videos: int,
    enable_file_urls: bool, config_path: str = "",
) -> dict:
    """Collect up to `max_videos` finished items from `sources` into `output_dir`; returns the
    summary (also written to collection_summary.json after every item)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = open(output_dir / ".collection.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another data_collection.py run is using {output_dir}; wait for it or pick another --output_dir")

    col = Collection(output_dir, mode)
    t0 = time.time()
    summary = {
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "finished": False,
        "config": str(config_path), "output_dir": str(output_dir), "mode": mode, "max_videos": max_videos,
        "counts": {"ok": 0, "skipped": 0, "failed": 0}, "skipped_by_reason": {},
        "failed": [], "skipped": [], "source_errors": [], "repairs": [], "stopped": None,
    }

    def save_summary():
        summary["collection_items"] = len(col.rows)
        summary["collection_audio_hours"] = round(sum(r.get("duration") or 0 for r in col.rows if r.get("wav")) / 3600, 4)
        summary["wall_s"] = round(time.time() - t0, 2)
        write_json(col.summary_path, summary)

    def skip(item_key, url, source, reason):
        summary["counts"]["skipped"] += 1
        summary["skipped_by_reason"][reason] = summary["skipped_by_reason"].get(reason, 0) + 1
        if reason != "in archive":
            summary["skipped"].append({"key": item_key, "url": url, "source": source, "reason": reason})

    summary["repairs"] = col.open()
    for note in summary["repairs"]:
        print(f"repaired: {note}")
    print(f"collecting into {output_dir} (mode {mode}); {len(col.rows)} items already finished, "
          f"stopping at {max_videos}")

    flat_opts = {
        "quiet": True, "logger": _YtdlpLog(), "enable_file_urls": enable_file_urls,
        "extract_flat": "in_playlist", "socket_timeout": 30, "extractor_retries": 2,
    }
    per_source = []
    try:
        for source in sources:
            if len(col.rows) >= max_videos:
                break
            items, error, _ = with_retries(lambda: enumerate_source(flat_opts, source), settings)
            if error is None:
                print(f"  source {source.name}: {len(items)} items")
                per_source.append(items)
            else:  # a dead source must not stop the others
                reason = error_reason(error)
                summary["source_errors"].append({"source": source.name, "line": source.line, "reason": reason})
                print(f"  source {source.name}: FAILED to list ({reason})")
        queue = interleave(per_source)

        touched_network = False
        for n, item in enumerate(queue, 1):
            if len(col.rows) >= max_videos:
                break
            tag = f"[{n}/{len(queue)}]"
            if item.key and item.key in col.archive:
                skip(item.key, item.url, item.source.name, "in archive")
                continue
            check_disk(output_dir, settings.min_free_gb)
            if touched_network and settings.sleep_seconds > 0:
                time.sleep(settings.sleep_seconds)  # rate limit
            touched_network = True

            result, error, attempts = with_retries(
                lambda: process_item(item, col, settings, flat_opts, enable_file_urls), settings,
                on_error=lambda: setattr(item, "info", None),  # re-extract on retry: media URLs expire
            )
            if error is not None:
                reason = error_reason(error)
                summary["counts"]["failed"] += 1
                summary["failed"].append({"key": item.key, "url": item.url, "source": item.source.name,
                                          "reason": reason, "attempts": attempts})
                print(f"{tag} FAILED  {item.key or item.url}  {reason}")
            elif isinstance(result, str):
                skip(item.key, item.url, item.source.name, result)
                if result != "in archive":
                    print(f"{tag} skip    {item.key}  {result}")
            else:
                col.finish(result)
                summary["counts"]["ok"] += 1
                minutes = (result.get("duration") or 0) / 60
                print(f"{tag} ok      {result['key']}  {minutes:.1f} min  {(result.get('title') or '')[:60]}")
            if col.work_dir.exists():
                shutil.rmtree(col.work_dir)
            save_summary()
        if summary["stopped"] is None and len(col.rows) >= max_videos:
            summary["stopped"] = f"reached --max_videos {max_videos}"
    except LowDisk as e:
        summary["stopped"] = str(e)
    except KeyboardInterrupt:  # the item in progress is dropped; everything finished is kept
        summary["stopped"] = "interrupted (Ctrl-C); rerun to continue"
    finally:
        if col.work_dir.exists():
            shutil.rmtree(col.work_dir, ignore_errors=True)
    summary["finished"] = True
    save_summary()
    lock.close()
    return summary


def print_summary(summary: dict) -> None:
    c = summary["counts"]
    by_reason = ", ".join(f"{k}: {v}" for k, v in summary["skipped_by_reason"].items())
    print(f"done in {summary['wall_s']:.1f} s: {c['ok']} ok, {c['skipped']} skipped"
          f"{f' ({by_reason})' if by_reason else ''}, {c['failed']} failed")
    for f in summary["failed"]:
        print(f"  failed  {f['key'] or f['url']}  ({f['source']}, {f['attempts']} attempts): {f['reason']}")
    for f in summary["source_errors"]:
        print(f"  source  {f['source']} (line {f['line']}) could not be listed: {f['reason']}")
    if summary["stopped"]:
        print(f"stopped: {summary['stopped']}")
    print(f"collection: {summary['collection_items']} items, {summary['collection_audio_hours']:.2f} h of "
          f"audio in {summary['output_dir']}; summary in {Path(summary['output_dir']) / 'collection_summary.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="sources YAML (schema at the top of data_sources.yaml)")
    parser.add_argument("--output_dir", default=None, help="output folder (default: <workspace>/telugu_data)")
    add_workspace_arg(parser)
    parser.add_argument("--max_videos", type=int, default=500,
                        help="stop once the collection holds this many finished items (earlier runs count)")
    parser.add_argument("--download_mode", choices=DOWNLOAD_MODES, default="audio",
                        help="audio: audio-only to 16 kHz WAV; full: also keep the video; metadata: no media")
    parser.add_argument("--sources", nargs="+", default=None,
                        help="collect only these source names (disabled ones included)")
    parser.add_argument("--sleep_seconds", type=float, default=None, help="pause between items (overrides settings)")
    parser.add_argument("--retries", type=int, default=None, help="retries per item (overrides settings)")
    parser.add_argument("--backoff_seconds", type=float, default=None, help="first retry delay, doubled each time (overrides settings)")
    parser.add_argument("--min_free_gb", type=float, default=None, help="stop below this much free disk (overrides settings)")
    parser.add_argument("--enable_file_urls", action="store_true",
                        help="allow file:// URLs (on automatically when a selected source uses one)")
    args = parser.parse_args(argv)

    try:
        settings, sources = load_sources(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in ("sleep_seconds", "retries", "backoff_seconds", "min_free_gb"):
        value = getattr(args, name)
        if value is not None:
            if value < 0:
                parser.error(f"--{name} must be >= 0")
            setattr(settings, name, value)
    if args.max_videos <= 0:
        parser.error("--max_videos must be > 0")
    if args.sources:
        names = {s.name for s in sources}
        unknown = [n for n in args.sources if n not in names]
        if unknown:
            parser.error(f"--sources: unknown name(s) {unknown}; the config has {sorted(names)}")
        sources = [s for s in sources if s.name in args.sources]
    else:
        sources = [s for s in sources if s.enabled]
    if not sources:
        parser.error(f"no enabled sources in {args.config}; set `enabled: true` on one or pass --sources")
    enable_file_urls = args.enable_file_urls or any((s.url or "").startswith("file://") for s in sources)
    output_dir = Path(args.output_dir) if args.output_dir else workspace_from_args(args).telugu_data

    summary = run_collection(sources, settings, output_dir.resolve(), args.download_mode, args.max_videos,
                             enable_file_urls, args.config)
    print_summary(summary)
    stopped = summary["stopped"] or ""
    return 3 if "free on the disk" in stopped else 130 if stopped.startswith("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
