"""Where every millisecond of a reply goes: real WebSocket turns against a server started here.

Starts streaming_server_advanced.py on 127.0.0.1 (a free port), connects one session per mode and
talks to it the way the browser page does: a microphone that sends 20 ms PCM16 frames paced at
real time, all the time (silence between turns), a held-out Telugu question per turn. For each
turn it records, on the client, when the frame holding the last voiced sample was sent (voiced:
what the server's turn detector counts as speech, replayed offline on the utterance) and when
the first reply audio arrived (end-to-end, the issue's definition), and takes the server's own
`latency` event (from the arrival of the last voiced audio to sending the first reply audio, with
its per-stage breakdown). Replies are listened to for --listen_s, then cancelled, and the next
turn follows. Turn mode and stream mode alternate turn by turn, so both see the same machine load.

Stages (p50 / p90 / p99 per mode):
    end-of-turn wait     the silence the server waits before deciding the user has finished
    codec encode         the user's turn to codes after the end of turn (stream mode: 0, done while speaking)
    S2S encode           the last encoder chunk (stream mode; turn mode encodes inside the first chunk)
    S2S first chunk      memory assembly, the first decoder step and the codebook head (turn mode: + the encoder)
    codec decode         the first chunk's codes to audio
    server latency       what the server measures: last voiced audio in -> first reply audio out
    transport            client-measured minus server-measured, in two parts: how much later the
                         server's live VAD put the end of speech than the client's offline replay of
                         it (speech_stopped.voiced_end_ms; silero-vad's recurrent state carries over
                         from the session's earlier audio, so a borderline last chunk can differ),
                         and the rest: the WebSocket both ways on loopback and the server's VAD pass
    end-to-end           client: last voiced sample sent -> first reply audio received
Also: reply chunks that arrived later than a 60 ms jitter buffer (the page's) would play them.

Usage:
    python benchmark_latency.py                                     # checkpoints/demo, 100 turns per mode
    python benchmark_latency.py --model_dir /workspace/models --num_iterations 100 --device cuda
    python benchmark_latency.py --allow-untrained --untrained_preset demo --num_iterations 30   # random models
    python benchmark_latency.py --modes stream --data_dir workspace/telugu_synth               # corpus questions

Writes <out_dir>/latency.json, latency.md (tables, including the mission's breakdown with what was
measured and what is assumed) and latency_hist.png (end-to-end latency per mode).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from audio_io import atomic_write, load_audio, read_manifest, write_json
from config import DEMO_MODEL_DIR, REPO_DIR, SAMPLE_RATE, add_workspace_arg, default_model_threads, workspace_from_args

SERVER_SCRIPT = REPO_DIR / "streaming_server_advanced.py"
FRAME_SAMPLES = 320  # 20 ms capture frames, as the page's capture worklet sends them
PLAYER_PREBUFFER_MS = 60  # the page's jitter buffer (static/app.js: prebufferMs)
MODES = ("turn", "stream")
PERCENTILES = (50, 90, 99)


# --------------------------------------------------------------------------------------
# The machine and the test speech (system_test.py uses these too)


def machine_info(device: str, threads: int) -> dict:
    """CPU model, cores, the torch threads the models run with, torch version, the device, the load now."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads,
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": device, "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


@dataclass
class Utterance:
    name: str
    audio: np.ndarray  # (T,) float32, 16 kHz
    text: str
    voiced_end: int = field(init=False)  # one past the last voiced sample (last_voiced_sample)

    def __post_init__(self):
        self.voiced_end = last_voiced_sample(self.audio)


def test_utterances(count: int, data_dir: str | Path | None = None, seed: int = 0) -> list[Utterance]:
    """`count` held-out Telugu questions: from <data_dir>/manifests/test.jsonl (user rows, evenly
    spaced), or else rendered now with make_telugu_speech.synthesize_user: each intent's test-split
    paraphrase in a test-split user voice (neither was ever trained on)."""
    if count < 1:
        raise ValueError(f"need at least one test utterance, got {count}")
    if data_dir is not None:
        manifest = Path(data_dir) / "manifests" / "test.jsonl"
        if not manifest.is_file():
            raise SystemExit(f"--data_dir {data_dir}: no {manifest}; give a corpus root written by make_telugu_speech.py")
        rows = [r for r in read_manifest(manifest) if r.get("role") == "user"]
        if not rows:
            raise SystemExit(f"{manifest} lists no user questions (role 'user')")
        rows = rows[:: max(1, len(rows) // count)][:count]
        return [Utterance(Path(r["path"]).stem, load_audio(r["path"]), r.get("text", "")) for r in rows]

    from make_telugu_speech import USER_VOICES, load_dialogs, question_split, synthesize_user

    intents = load_dialogs().intents
    voices = [name for name, v in USER_VOICES.items() if v.split == "test"]
    out = []
    for i in range(count):
        intent = intents[(seed + i * 7) % len(intents)]  # spread over the categories
        n = len(intent.questions)
        text = next(q for j, q in enumerate(intent.questions) if question_split(j, n) == "test")
        voice = voices[(seed + i) % len(voices)]
        out.append(Utterance(f"{intent.id}_{voice}", synthesize_user(text, voice, seed=seed + i), text))
    return out


def load_utterance(path: str | Path) -> Utterance:
    """A user question from a sound file (any rate, mixed to mono), checked to hold speech."""
    from audio_io import AudioError

    try:
        return Utterance(Path(path).stem, load_audio(path, resample=True, mix_to_mono=True, min_seconds=0.3), "")
    except (AudioError, ValueError) as e:
        raise SystemExit(f"--test_audio {path}: {e}") from None


def last_voiced_sample(audio: np.ndarray) -> int:
    """One past the last voiced sample of an utterance, as the server's turn detector sees it: the
    end of the last 32 ms VAD chunk it counts as speech (silero-vad with the server's thresholds
    and hysteresis), the utterance heard after silence with its start on the VAD chunk grid (as
    AgentClient.turn sends it). Raises ValueError when there is no speech."""
    from silero_vad import load_silero_vad
    from streaming_server_advanced import VAD_CHUNK_SAMPLES, ServerConfig, TurnDetector, vad_probabilities

    cfg = ServerConfig()
    lead, tail = 16 * VAD_CHUNK_SAMPLES, SAMPLE_RATE + cfg.end_of_turn_ms * SAMPLE_RATE // 1000
    x = np.concatenate([np.zeros(lead, dtype=np.float32), audio.astype(np.float32), np.zeros(tail, dtype=np.float32)])
    x = np.pad(x, (0, -len(x) % VAD_CHUNK_SAMPLES))
    detector = TurnDetector(cfg, 1000 * VAD_CHUNK_SAMPLES / SAMPLE_RATE)
    last = None
    for prob in vad_probabilities(load_silero_vad(), x.reshape(-1, VAD_CHUNK_SAMPLES)):
        if detector.update(prob, False, cfg.end_of_turn_ms) in ("end", "end_forced"):
            last = detector.last_voiced
    if last is None:
        raise ValueError("the server's VAD finds no speech in the test audio; give a recording of a spoken question")
    return min(len(audio), (last + 1) * VAD_CHUNK_SAMPLES - lead)


# --------------------------------------------------------------------------------------
# The server, in a subprocess


def trained_models_present(model_dir: str | Path) -> bool:
    """Whether <model_dir>/codec and <model_dir>/s2s hold weights the server would load."""
    from s2s_transformer import CHECKPOINT_NAMES
    from streaming_server_advanced import has_weights
    from telugu_codec import TeluCodec

    model_dir = Path(model_dir)
    return has_weights(model_dir / "codec", TeluCodec.CHECKPOINT_NAMES) and has_weights(model_dir / "s2s", CHECKPOINT_NAMES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    address: str  # "127.0.0.1:port"
    log_path: Path
    health: dict  # GET /health once it answered: the models it serves

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def start_server(log_path: Path, model_dir: str | Path, device: str = "cpu", untrained_preset: str | None = None,
                 threads: int = 0, extra: tuple[str, ...] = (), timeout_s: float = 300.0) -> ServerProcess:
    """Run streaming_server_advanced.py on 127.0.0.1 at a free port; return once /health answers.
    untrained_preset: serve random models of that size (--allow-untrained) if model_dir has none."""
    port = free_port()
    cmd = [sys.executable, str(SERVER_SCRIPT), "--model_dir", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--device", device, "--samples", "off", "--log_level", "info", *extra]
    if untrained_preset:
        cmd += ["--allow-untrained", "--untrained_preset", untrained_preset]
    if threads:
        cmd += ["--threads", str(threads)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}; its log ({log_path}):\n"
                               + log_path.read_text(errors="replace")[-4000:])
        try:
            return ServerProcess(proc, address, log_path, get_json(f"http://{address}/health"))
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {timeout_s:g} s; its log: {log_path}")


def stop_server(server: ServerProcess) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def stop_servers_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit, so that `running_server` still stops the server it started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextlib.contextmanager
def running_server(*args, **kwargs):
    server = start_server(*args, **kwargs)
    try:
        yield server
    finally:
        stop_server(server)


# --------------------------------------------------------------------------------------
# The client: a real-time microphone and a recorder


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


@dataclass
class TurnResult:
    """One measured turn. Times in ms; breakdown is the server's `latency` event breakdown."""

    mode: str
    utterance: str
    response_id: int
    e2e_ms: float  # client: last voiced sample sent -> first reply audio received
    server_latency_ms: float  # server: last voiced audio in -> first reply audio out
    transport_ms: float  # e2e_ms - server_latency_ms
    vad_shift_ms: float  # when the frame holding the server's last voiced sample was sent, minus the client's
    breakdown: dict
    reply_ms_received: float  # reply audio received before the reply ended or was cancelled
    late_chunks: int  # reply chunks that arrived after a 60 ms jitter buffer would have played them
    chunks: int
    early_replies: int  # replies that started before the utterance ended (a pause taken as end of turn)


class SessionClient:
    """One WebSocket session: a reader task records every event and every reply frame (its PCM
    kept per response id) with its arrival time (time.perf_counter)."""

    def __init__(self, ws):
        self.ws = ws
        self.events: list[dict] = []
        self.frames: list[tuple[int, int, int, float]] = []  # (response_id, offset, samples, arrival)
        self.audio: dict[int, list[np.ndarray]] = {}  # response_id -> reply PCM chunks, float32
        self.changed = asyncio.Event()
        self.closed = False
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, address: str, session_id: str, **settings):
        import websockets

        client = cls(await websockets.connect(f"ws://{address}/ws/{session_id}", max_size=None))
        await client.wait("session_created")
        if settings:
            await client.send_json({"type": "session", **settings})
            await client.wait("session_updated")
        return client

    async def _read(self) -> None:
        import websockets

        try:
            async for message in self.ws:
                now = time.perf_counter()
                if isinstance(message, bytes):
                    rid, offset = (int(x) for x in np.frombuffer(message[:8], dtype="<u4"))
                    pcm = np.frombuffer(message[8:], dtype="<i2").astype(np.float32) / 32768
                    self.frames.append((rid, offset, len(pcm), now))
                    self.audio.setdefault(rid, []).append(pcm)
                else:
                    event = json.loads(message)
                    event["_t"] = now
                    self.events.append(event)
                self.changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed = True
            self.changed.set()

    def find(self, type_: str, **match) -> list[dict]:
        return [e for e in self.events if e["type"] == type_ and all(e.get(k) == v for k, v in match.items())]

    async def until(self, predicate, timeout: float, what: str):
        """Wait until predicate() returns something truthy (checked on every message); return it."""
        deadline = time.perf_counter() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if self.closed:
                raise RuntimeError(f"the connection closed while waiting for {what}; events: {self.types()[-12:]}")
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise RuntimeError(f"no {what} within {timeout:g} s; last events: {self.types()[-12:]}")
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def wait(self, type_: str, timeout: float = 30.0, count: int = 1, **match) -> dict:
        """The first event of this type (and fields); with count, the count-th."""
        def found():
            events = self.find(type_, **match)
            return events[count - 1] if len(events) >= count else None

        return await self.until(found, timeout, f"{type_} {match}")

    def types(self) -> list[str]:
        return [e["type"] if e["type"] != "error" else f"error:{e.get('code')}" for e in self.events]

    async def send_json(self, obj) -> None:
        await self.ws.send(json.dumps(obj))

    async def close(self) -> None:
        self.closed = True
        await self.ws.close()
        await self.reader


class AgentClient(SessionClient):
    """A session driven like the page: a microphone task sends 20 ms frames at real time for the
    whole session (queued speech, else silence)."""

    def __init__(self, ws):
        super().__init__(ws)
        self.queued = np.zeros(0, dtype=np.float32)  # speech waiting to be "captured"
        self.queued_from = 0  # absolute sample index of queued[0]
        self.send_times: list[float] = []  # perf_counter when frame i was sent
        self.microphone = asyncio.create_task(self._microphone())

    async def _microphone(self) -> None:
        """Frame i goes out when its last sample would have been captured: start + (i + 1) * 20 ms."""
        import websockets

        start = time.perf_counter()
        while not self.closed:
            i = len(self.send_times)
            delay = start + (i + 1) * FRAME_SAMPLES / SAMPLE_RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            a = i * FRAME_SAMPLES - self.queued_from  # this frame's first sample within `queued`
            frame = np.zeros(FRAME_SAMPLES, dtype=np.float32)
            take = self.queued[max(0, a) : a + FRAME_SAMPLES]
            frame[: len(take)] = take
            try:
                await self.ws.send(pcm16(frame))
            except websockets.ConnectionClosed:
                return
            self.send_times.append(time.perf_counter())
            if a + FRAME_SAMPLES >= len(self.queued) and len(self.queued):
                self.queued_from += len(self.queued)
                self.queued = np.zeros(0, dtype=np.float32)

    def next_sample(self) -> int:
        """The absolute sample index that audio queued now would start at."""
        if len(self.queued):
            return self.queued_from + len(self.queued)
        return len(self.send_times) * FRAME_SAMPLES

    def say(self, audio: np.ndarray) -> int:
        """Queue audio for the microphone; returns the absolute sample index it starts at."""
        start = self.next_sample()
        if len(self.queued) == 0:
            self.queued_from = start
        self.queued = np.concatenate([self.queued, audio.astype(np.float32)])
        return start

    async def sent_at(self, sample: int, timeout: float = 60.0) -> float:
        """perf_counter when the frame holding absolute sample `sample` was sent."""
        frame = sample // FRAME_SAMPLES
        deadline = time.perf_counter() + timeout
        while len(self.send_times) <= frame:
            if self.closed or time.perf_counter() > deadline:
                raise RuntimeError(f"the microphone stopped before sample {sample} was sent")
            await asyncio.sleep(0.01)
        return self.send_times[frame]

    def last_response_id(self) -> int:
        ids = [f[0] for f in self.frames] + [e["response_id"] for e in self.events if "response_id" in e]
        return max(ids, default=0)

    async def turn(self, utterance: Utterance, mode: str, lead_s: float = 0.5, listen_s: float = 1.0,
                   timeout: float = 60.0) -> TurnResult:
        """Say `utterance` after `lead_s` of silence, wait for the reply, listen to `listen_s` of it
        (or to its end), cancel the rest and wait until the server confirms."""
        errors_before = len(self.find("error"))
        events_before = len(self.events)
        previous = self.last_response_id()
        # The utterance starts on the server's VAD chunk grid (absolute sample 0 is the session's
        # first), as last_voiced_sample assumes, so both find the same last voiced chunk.
        from streaming_server_advanced import VAD_CHUNK_SAMPLES

        first = self.next_sample() + int(lead_s * SAMPLE_RATE)
        lead = first + -first % VAD_CHUNK_SAMPLES - self.next_sample()
        start = self.say(np.concatenate([np.zeros(lead, dtype=np.float32), utterance.audio]))
        voiced_end = start + lead + utterance.voiced_end
        voiced_sent = await self.sent_at(voiced_end - 1, timeout)
        # The reply to this utterance: the one started after the server's end of turn near the
        # utterance's end (speech_stopped.audio_ms is on the stream clock this client sends by).
        # A pause inside the utterance can end a turn early; that reply is not the one timed.
        end_ms = 1000 * voiced_end / SAMPLE_RATE - 150

        def reply():
            new = self.events[events_before:]
            errors = self.find("error")[errors_before:]
            if errors:
                raise RuntimeError(f"the server answered with an error: {errors[0]}")
            stop = next((i for i, e in enumerate(new) if e["type"] == "speech_stopped" and e["audio_ms"] >= end_ms), None)
            if stop is None:
                return None
            rid = next((e["response_id"] for e in new[stop:] if e["type"] == "response_started"), None)
            return None if rid is None else (rid, new[stop])

        rid, stopped = await self.until(reply, timeout, "the reply to the utterance")
        # Where the server's live VAD put the end of speech (a VAD chunk later or earlier than the
        # offline replay, at times), as the time between sending the two samples' frames.
        server_end = int(stopped["voiced_end_ms"]) * SAMPLE_RATE // 1000
        vad_shift = 1000 * (await self.sent_at(server_end - 1, timeout) - voiced_sent)
        _, _, _, first_at = await self.until(lambda: next((f for f in self.frames if f[0] == rid), None), timeout,
                                             f"audio of reply {rid}")
        latency = await self.wait("latency", timeout, response_id=rid)
        early = len([e for e in self.events[events_before:] if e["type"] == "response_started"
                     and previous < e["response_id"] < rid])

        def listened():
            done = self.find("response_done", response_id=rid) or self.find("interrupted", response_id=rid)
            received = sum(f[2] for f in self.frames if f[0] == rid)
            return done or received >= listen_s * SAMPLE_RATE

        await self.until(listened, timeout, f"{listen_s:g} s of reply {rid}")
        if not self.find("response_done", response_id=rid):
            await self.ws.send(json.dumps({"type": "cancel"}))
            await self.until(lambda: self.find("response_done", response_id=rid)
                             or self.find("interrupted", response_id=rid), timeout, f"the end of reply {rid}")
        frames = [f for f in self.frames if f[0] == rid]
        play_start = frames[0][3] + PLAYER_PREBUFFER_MS / 1000
        late = sum(1 for _, offset, _, t in frames if t > play_start + offset / SAMPLE_RATE)
        e2e = 1000 * (first_at - voiced_sent)
        return TurnResult(
            mode=mode, utterance=utterance.name, response_id=rid, e2e_ms=e2e,
            server_latency_ms=float(latency["latency_ms"]), transport_ms=e2e - float(latency["latency_ms"]),
            vad_shift_ms=vad_shift,
            breakdown=dict(latency["breakdown"]), reply_ms_received=1000 * sum(f[2] for f in frames) / SAMPLE_RATE,
            late_chunks=late, chunks=len(frames), early_replies=early,
        )

    async def close(self) -> None:
        await super().close()
        with contextlib.suppress(Exception):
            await self.microphone


async def run_turns(address: str, utterances: list[Utterance], modes: tuple[str, ...], iterations: int,
                    warmup: int = 2, listen_s: float = 1.0, progress=None) -> dict[str, list[TurnResult]]:
    """`warmup` + `iterations` turns per mode, one session per mode, modes alternating turn by turn.
    Returns the timed turns per mode."""
    clients = {}
    results: dict[str, list[TurnResult]] = {m: [] for m in modes}
    try:
        for mode in modes:
            clients[mode] = await AgentClient.connect(address, f"bench-{mode}-{uuid.uuid4().hex[:8]}", mode=mode)
        for i in range(warmup + iterations):
            for mode in modes:
                r = await clients[mode].turn(utterances[i % len(utterances)], mode, listen_s=listen_s)
                if i >= warmup:
                    results[mode].append(r)
                if progress:
                    progress(i - warmup, r)
    finally:
        for c in clients.values():
            with contextlib.suppress(Exception):
                await c.close()
    return results


# --------------------------------------------------------------------------------------
# Statistics and reports


def percentiles(values: list[float]) -> dict:
    """n, p50, p90, p99, mean, min, max of the finite values (NaN when there are none)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"n": 0, **{f"p{p}": math.nan for p in PERCENTILES}, "mean": math.nan, "min": math.nan, "max": math.nan}
    ps = np.percentile(v, PERCENTILES)
    return {"n": int(len(v)), **{f"p{p}": round(float(x), 2) for p, x in zip(PERCENTILES, ps)},
            "mean": round(float(v.mean()), 2), "min": round(float(v.min()), 2), "max": round(float(v.max()), 2)}


# (key, label, value of one turn); None = not measured in that mode
STAGES = (
    ("end_of_turn_wait_ms", "end-of-turn detection wait", lambda r: r.breakdown.get("end_of_turn_wait_ms")),
    ("codec_encode_ms", "codec encode (after the turn)", lambda r: r.breakdown.get("codec_encode_ms")),
    ("s2s_encode_ms", "S2S encode (last chunk)", lambda r: r.breakdown.get("s2s_encode_ms")),
    ("s2s_first_chunk_ms", "S2S first chunk", lambda r: r.breakdown.get("s2s_generate_ms")),
    ("codec_decode_ms", "codec decode (first chunk)", lambda r: r.breakdown.get("codec_decode_ms")),
    ("context_ms", "context memory lookup", lambda r: r.breakdown.get("context_ms")),
    ("queue_ms", "model-thread queue wait", lambda r: r.breakdown.get("queue_ms")),
    ("server_processing_ms", "server processing (decision -> first audio out)", lambda r: r.breakdown.get("processing_ms")),
    ("server_latency_ms", "server latency (last voiced audio in -> first audio out)", lambda r: r.server_latency_ms),
    ("transport_ms", "transport (client minus server)", lambda r: r.transport_ms),
    ("vad_shift_ms", "of which: server's end of speech later than the client's", lambda r: r.vad_shift_ms),
    ("wire_ms", "of which: the rest (loopback WebSocket, the VAD pass)", lambda r: r.transport_ms - r.vad_shift_ms),
    ("e2e_ms", "end-to-end, client (last voiced sample sent -> first audio received)", lambda r: r.e2e_ms),
)


def summarize(results: dict[str, list[TurnResult]]) -> dict:
    out = {}
    for mode, turns in results.items():
        stages = {}
        for key, _, get in STAGES:
            values = [get(r) for r in turns]
            stages[key] = percentiles([v for v in values if v is not None])
        out[mode] = {
            "turns": len(turns), "stages": stages,
            "late_chunks": sum(r.late_chunks for r in turns), "chunks": sum(r.chunks for r in turns),
            "early_replies": sum(r.early_replies for r in turns),
        }
    return out


def mission_breakdown(summary: dict, mode: str) -> list[dict]:
    """The seed plan's Phase 7 breakdown, filled with this run's p50 where measured."""
    s = summary[mode]["stages"]

    def p50(*keys):
        vals = [s[k]["p50"] for k in keys if s[k]["n"]]
        return round(sum(vals), 1) if vals else None

    rows = [
        {"stage": "audio capture", "mission_ms": 50, "ms": FRAME_SAMPLES * 1000 / SAMPLE_RATE, "source":
         "assumed: one 20 ms capture frame (the page's worklet and this client send 20 ms); the sound card's "
         "input buffer is not measured"},
        {"stage": "end-of-turn detection", "mission_ms": None, "ms": p50("end_of_turn_wait_ms"), "source":
         "measured (server): the silence waited for before the turn is over; not in the mission's table"},
        {"stage": "codec encode", "mission_ms": 8, "ms": p50("codec_encode_ms"), "source":
         "measured (server)" + ("; 0 in stream mode: encoded while the user speaks" if mode == "stream" else "")},
        {"stage": "S2S inference (to the first chunk)", "mission_ms": 140,
         "ms": p50("s2s_encode_ms", "s2s_first_chunk_ms", "context_ms"), "source": "measured (server)"},
        {"stage": "codec decode", "mission_ms": 8, "ms": p50("codec_decode_ms"), "source": "measured (server)"},
        {"stage": "audio playback", "mission_ms": 50, "ms": float(PLAYER_PREBUFFER_MS), "source":
         "assumed: the page's 60 ms jitter buffer; the sound card's output buffer is not measured"},
        {"stage": "network", "mission_ms": 50, "ms": p50("wire_ms"), "source":
         "measured on loopback (client minus server, less the VAD shift below; includes the VAD pass); "
         "a real network adds its round trip"},
        {"stage": "server's end of speech later than the client's", "mission_ms": None, "ms": p50("vad_shift_ms"),
         "source": "measured: the live VAD's last voiced chunk against the client's offline replay of it"},
    ]
    other = p50("server_latency_ms")
    accounted = p50("end_of_turn_wait_ms", "codec_encode_ms", "s2s_encode_ms", "s2s_first_chunk_ms", "context_ms",
                    "codec_decode_ms")
    if other is not None and accounted is not None:
        rows.append({"stage": "other server work (queueing, scheduling)", "mission_ms": None,
                     "ms": round(other - accounted, 1), "source": "measured: server latency minus the stages above"})
    rows.append({"stage": "TOTAL (mouth to ear)", "mission_ms": 306,
                 "ms": round(sum(r["ms"] for r in rows if r["ms"] is not None), 1),
                 "source": "sum of the rows (p50s do not add exactly)"})
    return rows


def fmt(x, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def to_markdown(report: dict) -> str:
    m, s = report["machine"], report["summary"]
    modes = list(s)
    models = report["models"]
    lines = [
        "# End-to-end latency benchmark", "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "") + f"; server torch threads {m['torch_threads']}; "
        f"load average (1, 5, 15 min) at start {m['load_average_1_5_15min']}, at end {report['load_average_at_end']}.",
        f"Models: {models.get('source')}" + ("  **UNTRAINED (random weights): latency only, replies are noise**"
                                              if models.get("untrained") else "") + ".",
        f"{report['iterations']} timed turns per mode after {report['warmup']} warm-up turns; held-out questions "
        f"({', '.join(report['utterances'])}), real-time 20 ms frames over ws://127.0.0.1; each reply listened to "
        f"for {report['listen_s']:g} s then cancelled.", "",
        "| stage | " + " | ".join(f"{mode} p50 / p90 / p99 ms" for mode in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for key, label, _ in STAGES:
        cells = []
        for mode in modes:
            st = s[mode]["stages"][key]
            cells.append(f"{fmt(st['p50'])} / {fmt(st['p90'])} / {fmt(st['p99'])}" if st["n"] else "–")
        bold = "**" if key == "e2e_ms" else ""
        lines.append(f"| {bold}{label}{bold} | " + " | ".join(cells) + " |")
    lines += ["", "Reply chunks later than a 60 ms jitter buffer: "
              + "; ".join(f"{mode} {s[mode]['late_chunks']} of {s[mode]['chunks']}" for mode in modes)
              + ". Replies that started inside an utterance (a pause taken for the end of the turn): "
              + "; ".join(f"{mode} {s[mode]['early_replies']}" for mode in modes) + ".", ""]
    target = report["target_e2e_ms"]
    for mode in modes:
        p50 = s[mode]["stages"]["e2e_ms"]["p50"]
        verdict = "meets" if p50 <= target else "misses"
        lines.append(f"- {mode} mode: end-to-end p50 {fmt(p50)} ms {verdict} the {target:g} ms target.")
    mode = "stream" if "stream" in s else modes[0]
    lines += ["", f"## The mission's breakdown ({mode} mode, p50)", "",
              "| stage | mission target ms | this run ms | measured or assumed |", "|---|---|---|---|"]
    for row in report["mission_breakdown"]:
        lines.append(f"| {row['stage']} | {fmt(row['mission_ms'], 0)} | {fmt(row['ms'])} | {row['source']} |")
    lines += ["", "The issue's end-to-end figure (last voiced sample sent -> first reply audio received) is the "
              "rows from end-of-turn detection to network; capture and playback come on top for a listener."]
    return "\n".join(lines) + "\n"


def plot_histogram(results: dict[str, list[TurnResult]], path: Path, target_ms: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    values = {mode: [r.e2e_ms for r in turns] for mode, turns in results.items() if turns}
    every = [v for vs in values.values() for v in vs]
    bins = np.linspace(0, max(every + [target_ms]) * 1.05, 40)
    for mode, vs in values.items():
        ax.hist(vs, bins=bins, alpha=0.6, label=f"{mode} mode (p50 {np.median(vs):.0f} ms, n={len(vs)})")
    ax.axvline(target_ms, color="k", linestyle="--", label=f"target {target_ms:g} ms")
    ax.set_xlabel("end-to-end latency (ms): last voiced sample sent -> first reply audio received")
    ax.set_ylabel("turns")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workspace_arg(p)
    p.add_argument("--model_dir", default=str(DEMO_MODEL_DIR), help="folder with codec/ and s2s/ (default checkpoints/demo)")
    p.add_argument("--num_iterations", type=int, default=100, help="timed turns per mode (default 100)")
    p.add_argument("--warmup", type=int, default=2, help="untimed turns per mode first (default 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the server runs the models")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="session modes to compare")
    p.add_argument("--out_dir", default=None, help="where latency.json/.md/_hist.png go (default <workspace>/benchmarks/latency)")
    p.add_argument("--test_audio", nargs="+", default=None, help="WAV file(s) to say, in turn (default: held-out questions)")
    p.add_argument("--data_dir", default=None, help="corpus root: take the questions from manifests/test.jsonl")
    p.add_argument("--num_utterances", type=int, default=4, help="held-out questions to render or pick (default 4)")
    p.add_argument("--listen_s", type=float, default=1.0, help="reply audio to receive before cancelling it (default 1)")
    p.add_argument("--threads", type=int, default=0, help="server torch threads (0: the server's default)")
    p.add_argument("--target_e2e_ms", type=float, default=400.0, help="end-to-end target shown in the report")
    p.add_argument("--allow-untrained", "--allow_untrained", dest="allow_untrained", action="store_true",
                   help="without weights in --model_dir, benchmark random models (latency only)")
    p.add_argument("--untrained_preset", default="demo", choices=("tiny", "demo"), help="size of those random models")
    p.add_argument("--server_args", default="", help="extra server flags, one string (e.g. \"--end_of_turn_ms 200\")")
    args = p.parse_args(argv)
    if args.num_iterations < 1 or args.warmup < 0 or args.listen_s <= 0:
        p.error("need --num_iterations >= 1, --warmup >= 0 and --listen_s > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    out_dir = Path(args.out_dir) if args.out_dir else workspace_from_args(args).root / "benchmarks" / "latency"
    stop_servers_on_sigterm()

    if args.test_audio:
        utterances = [load_utterance(f) for f in args.test_audio]
    else:
        utterances = test_utterances(args.num_utterances, args.data_dir)
    print(f"utterances: {', '.join(f'{u.name} ({len(u.audio) / SAMPLE_RATE:.1f} s)' for u in utterances)}")

    untrained = not trained_models_present(args.model_dir)
    if untrained and not args.allow_untrained:
        from streaming_server_advanced import missing_weights_message

        model_dir = Path(args.model_dir)
        raise SystemExit(missing_weights_message(model_dir, model_dir / "codec", model_dir / "s2s")
                         .replace("streaming_server_advanced.py", "benchmark_latency.py"))
    extra = tuple(args.server_args.split())
    if untrained:  # random replies end at random: keep them going for the whole listen window
        extra += ("--min_reply_ms", str(round(1000 * args.listen_s)), "--max_reply_s", str(args.listen_s + 1))
    machine = machine_info(args.device, args.threads or default_model_threads())  # the server's default
    started = time.perf_counter()
    with running_server(out_dir / "server.log", args.model_dir, args.device,
                        args.untrained_preset if untrained else None, args.threads, extra) as server:
        models = server.health["models"]
        if models.get("untrained"):
            print(f"!!! UNTRAINED models ({models['source']}): these are latencies of random weights; replies are noise")
        print(f"server {server.address} ({models['source']}); {args.warmup} warm-up + {args.num_iterations} turns "
              f"per mode, modes {' / '.join(args.modes)}")

        def progress(i, r):
            if i >= 0 and (i < 3 or (i + 1) % 10 == 0):
                print(f"  turn {i + 1} {r.mode}: e2e {r.e2e_ms:.0f} ms (server {r.server_latency_ms:.0f}, "
                      f"end-of-turn wait {r.breakdown.get('end_of_turn_wait_ms', 0):.0f})", flush=True)

        results = asyncio.run(run_turns(server.address, utterances, tuple(args.modes), args.num_iterations,
                                        args.warmup, args.listen_s, progress))
    summary = summarize(results)
    mode = "stream" if "stream" in summary else args.modes[0]
    report = {
        "machine": machine, "models": models, "model_dir": str(args.model_dir), "device": args.device,
        "server_args": list(extra), "iterations": args.num_iterations,
        "warmup": args.warmup, "listen_s": args.listen_s, "utterances": [u.name for u in utterances],
        "target_e2e_ms": args.target_e2e_ms, "wall_s": round(time.perf_counter() - started, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "summary": summary, "mission_breakdown": mission_breakdown(summary, mode),
        "turns": {m: [asdict(r) for r in rs] for m, rs in results.items()},
    }
    write_json(out_dir / "latency.json", report)
    text = to_markdown(report)
    with atomic_write(out_dir / "latency.md") as tmp:
        tmp.write_text(text)
    plot_histogram(results, out_dir / "latency_hist.png", args.target_e2e_ms,
                   f"{models['source']} on {machine['cpu']} ({machine['device']})")
    print(text)
    print(f"wrote {out_dir / 'latency.json'}, {out_dir / 'latency.md'}, {out_dir / 'latency_hist.png'}")
    return report


if __name__ == "__main__":
    main()
