"""streaming_server_advanced.py against a real uvicorn server on 127.0.0.1 and websockets clients.

The server runs tiny random models (--allow-untrained) with fixed 1 s replies, so every test knows
how long a reply lasts. Speech comes from make_telugu_speech (silero-vad ignores noise).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

websockets = pytest.importorskip("websockets")

from benchmark_latency import ServerProcess, SessionClient, get_json, pcm16, stop_server  # noqa: E402
from benchmark_latency import start_server as start_server_process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
REPLY_S = 1.0
MAX_MESSAGE_BYTES = 256 * 1024


# --------------------------------------------------------------------------------------
# Server and client helpers (the browser test imports these)

def start_server(log_path: Path, *extra: str) -> ServerProcess:
    """The server with random tiny models, once /health answers. The empty --model_dir keeps the
    tests on untrained models even where trained ones are shipped."""
    no_models = log_path.parent / "no_models"
    no_models.mkdir(exist_ok=True)
    return start_server_process(log_path, no_models, untrained_preset="tiny", threads=1,
                                extra=("--log_level", "warning", *extra), timeout_s=90)


def render_speech() -> dict[str, np.ndarray]:
    """Two Telugu utterances: a question and a short interjection (for barge-in)."""
    from make_telugu_speech import ToolMissingError, synthesize_user

    try:
        return {
            "question": synthesize_user("నమస్కారం అండి, ఈ రోజు వాతావరణం ఎలా ఉంది?", "fest_man", seed=1),
            "barge_in": synthesize_user("ఆగండి, ఒక్క నిమిషం ఆగండి.", "esp_f1", seed=2),
        }
    except ToolMissingError as e:
        pytest.skip(f"Telugu TTS not installed: {e}")


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


class Client(SessionClient):
    """The benchmark's session client, plus sending speech as fast as possible or at real time."""

    async def send_audio(self, audio: np.ndarray, realtime: bool = False) -> None:
        """PCM16 binary frames: 20 ms ones paced at real time, or 100 ms ones as fast as possible."""
        frame = 320 if realtime else 1600
        start = time.perf_counter()
        for i in range(0, len(audio), frame):
            await self.ws.send(pcm16(audio[i : i + frame]))
            if realtime:
                await asyncio.sleep(max(0.0, start + (i + frame) / SR - time.perf_counter()))


def turn_audio(speech: np.ndarray) -> np.ndarray:
    return np.concatenate([silence(0.3), speech, silence(0.6)])


# --------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = start_server(
        log, "--max_reply_s", str(REPLY_S), "--min_reply_ms", str(int(1000 * REPLY_S)), "--max_sessions", "24",
        "--idle_timeout_s", "3", "--max_message_bytes", str(MAX_MESSAGE_BYTES), "--playback_report_wait_ms", "400",
        "--rate_limit_messages", "100",
    )
    yield server.address
    stop_server(server)


@pytest.fixture(scope="module")
def speech():
    return render_speech()


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------------------
# The mission's client, turn and stream mode


def test_phase6_client_runs_unchanged(server):
    """The seed plan's Phase 6 snippet, only the URI changed: it gets a session event and finishes."""
    snippet = '''
import asyncio
import websockets
import json
import base64
import numpy as np

async def test_connection():
    uri = 'ws://localhost:8000/ws/test_session'

    async with websockets.connect(uri) as ws:
        # Send test audio
        audio = np.random.randn(16000).astype(np.float32)
        message = {
            'type': 'audio',
            'audio': base64.b64encode(audio.tobytes()).decode()
        }
        await ws.send(json.dumps(message))

        # Receive response
        response = await ws.recv()
        data = json.loads(response)
        print(f'Response type: {data["type"]}')

        if data['type'] == 'latency':
            print(f'Latency: {data["latency_ms"]}ms')

asyncio.run(test_connection())
'''.replace("localhost:8000", server)
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Response type: session_created"


def check_reply(client: Client, rid: int) -> None:
    """Reply audio: frames of this reply only, contiguous offsets, REPLY_S long, not silent."""
    frames = [f for f in client.frames if f[0] == rid]
    offsets = [f[1] for f in frames]
    assert offsets == list(np.cumsum([0] + [f[2] for f in frames[:-1]])), "reply frames out of order or missing"
    done = client.find("response_done", response_id=rid)[0]
    total = sum(f[2] for f in frames)
    assert done["audio_ms"] == round(1000 * total / SR) == round(1000 * REPLY_S)
    audio = np.concatenate(client.audio[rid])
    assert np.isfinite(audio).all() and audio.std() > 1e-4


@pytest.mark.parametrize("mode", ["turn", "stream"])
def test_one_turn(server, speech, mode):
    """Speech then silence -> speech_started, speech_stopped, a reply in the asked voice with its
    latency breakdown, and the exchange in the conversation memory."""

    async def main():
        c = await Client.connect(server, f"one_turn_{mode}", mode=mode, voice="Lakshmi", emotion="happy",
                                 voice_b="Ravi", voice_weight=0.3)
        # Real time, so that stream mode encodes while the user is speaking.
        await c.send_audio(turn_audio(speech["question"]), realtime=mode == "stream")
        started = await c.wait("response_started")
        assert (started["response_id"], started["voice"], started["emotion"], started["mode"]) == (1, "Lakshmi", "happy", mode)
        latency = await c.wait("latency", response_id=1)
        await c.wait("response_done", response_id=1)
        context = await c.wait("context", response_id=1)
        await c.close()
        return c, latency, context

    c, latency, context = run(main())
    order = [t for t in c.types() if t in ("speech_started", "speech_stopped", "response_started", "response_done", "context")]
    assert order == ["speech_started", "speech_stopped", "response_started", "response_done", "context"]
    stopped = c.find("speech_stopped")[0]
    assert abs(stopped["duration_ms"] - 1000 * len(speech["question"]) / SR) < 300  # VAD found the utterance
    # where speech ended: the end of a 32 ms VAD chunk, and the turn's audio runs at most 60 ms past it
    assert stopped["voiced_end_ms"] % 32 == 0 and 0 <= stopped["audio_ms"] - stopped["voiced_end_ms"] <= 60
    check_reply(c, 1)
    b = latency["breakdown"]
    assert latency["latency_ms"] == pytest.approx(b["end_of_turn_wait_ms"] + b["processing_ms"], abs=0.2)
    if mode == "turn":
        assert b["codec_encode_ms"] > 0 and "s2s_encode_ms" not in b  # everything after the turn
    else:
        assert b["codec_encode_ms"] == 0 and "s2s_encode_ms" in b  # the codec ran while the user spoke
        assert b["end_of_turn_wait_ms"] > 150  # real-time input: the end-of-turn silence was waited for
    assert [t["role"] for t in context["turns"]] == ["user", "agent"]
    assert context["turns"][1] == {"role": "agent", "ms": round(1000 * REPLY_S), "interrupted": False}
    assert context["turns"][0]["ms"] == pytest.approx(stopped["duration_ms"], abs=10)


def test_memory_grows_and_clears_with_json_audio(server, speech):
    """Two exchanges -> four remembered turns; clear_context empties the memory. Reply audio as
    JSON (audio_format "json": base64 float32 with response_id and sample offset) for clients
    that cannot take binary frames."""

    async def main():
        c = await Client.connect(server, "memory", audio_format="json")
        for rid in (1, 2):
            await c.send_audio(turn_audio(speech["question"]))
            await c.wait("context", response_id=rid)
        turns = c.find("context", response_id=2)[0]["turns"]
        await c.send_json({"type": "clear_context"})
        await c.wait("context", turns=[])
        await c.close()
        return c, turns

    c, turns = run(main())
    assert [t["role"] for t in turns] == ["user", "agent", "user", "agent"]
    assert not c.frames
    chunks = c.find("audio", response_id=1)
    sizes = [len(base64.b64decode(e["audio"])) // 4 for e in chunks]
    assert [e["offset"] for e in chunks] == list(np.cumsum([0] + sizes[:-1]))
    assert sum(sizes) == int(REPLY_S * SR)


# --------------------------------------------------------------------------------------
# Barge-in


def test_barge_in(server, speech):
    """Speech while the reply plays: `interrupted` at once, no more audio of that reply, the
    agent's turn stored cut to what the client reports it played, and the new speech answered."""

    async def main():
        c = await Client.connect(server, "barge_in", mode="stream")
        await c.send_audio(turn_audio(speech["question"]))
        await c.wait("response_started", response_id=1)
        await c.send_audio(speech["barge_in"][: int(0.5 * SR)], realtime=True)  # the user talks over the agent
        interrupted = await c.wait("interrupted", response_id=1, timeout=10)
        barge = await c.wait("speech_started", barge_in=True)
        sent_frames = len([f for f in c.frames if f[0] == 1])
        played_ms = max(0, interrupted["sent_ms"] - 150)  # what a client with a 150 ms buffer heard
        await c.ws.send(json.dumps({"type": "playback", "response_id": 1, "played_ms": played_ms}))
        context = await c.wait("context", response_id=1)
        await c.send_audio(np.concatenate([speech["barge_in"][int(0.5 * SR) :], silence(0.6)]), realtime=True)
        await c.wait("response_done", response_id=2, timeout=30)
        await c.close()
        return c, interrupted, barge, sent_frames, played_ms, context

    c, interrupted, barge, sent_frames, played_ms, context = run(main())
    assert interrupted["reason"] == "barge_in"
    assert interrupted["sent_ms"] < 1000 * REPLY_S  # cut before the reply ended
    assert not c.find("response_done", response_id=1)
    # No frame of reply 1 arrives after the interrupted event.
    assert len([f for f in c.frames if f[0] == 1]) == sent_frames
    assert all(t <= interrupted["_t"] for rid, _, _, t in c.frames if rid == 1)
    assert context["interrupted"] is True and context["heard_ms"] == played_ms
    assert context["stored_agent_ms"] == pytest.approx(played_ms, abs=5)  # cut to what was heard (5 ms frames)
    assert context["turns"][-1] == {"role": "agent", "ms": context["stored_agent_ms"], "interrupted": True}
    print(f"barge-in: speech_started -> interrupted {1000 * abs(barge['_t'] - interrupted['_t']):.1f} ms at the client, "
          f"server cancel {interrupted['cancel_ms']} ms, reply cut at {interrupted['sent_ms']} ms sent")


def test_short_noise_does_not_interrupt(server, speech):
    """A 100 ms burst of speech during the reply (an echo-like blip) is below the barge-in minimum."""

    async def main():
        c = await Client.connect(server, "echo_guard")
        await c.send_audio(turn_audio(speech["question"]))
        await c.wait("response_started", response_id=1)
        blip = speech["barge_in"][int(0.2 * SR) : int(0.3 * SR)]
        await c.send_audio(np.concatenate([blip, silence(0.4)]), realtime=True)
        await c.wait("response_done", response_id=1)
        await c.close()
        return c

    c = run(main())
    assert not c.find("interrupted")


# --------------------------------------------------------------------------------------
# Bad input


BAD_MESSAGES = [
    ("not json {", "bad_json"),
    ("[1, 2, 3]", "bad_message"),
    (json.dumps({"type": 7}), "bad_message"),
    (json.dumps({"type": "dance"}), "unknown_type"),
    (json.dumps({"type": "audio", "audio": "@@not base64@@"}), "bad_audio"),
    (json.dumps({"type": "audio", "audio": base64.b64encode(b"\x00" * 6).decode()}), "bad_audio"),  # 1.5 samples
    (json.dumps({"type": "audio", "audio": ""}), "bad_audio"),
    (json.dumps({"type": "audio", "audio": 5}), "bad_audio"),
    (json.dumps({"type": "audio", "audio": base64.b64encode(np.full(4, np.nan, "<f4").tobytes()).decode()}), "bad_audio"),
    (json.dumps({"type": "audio", "sample_rate": 44100,
                 "audio": base64.b64encode(np.zeros(441, "<f4").tobytes()).decode()}), "bad_sample_rate"),
    (b"\x01\x02\x03", "bad_audio"),  # binary of odd length
    (json.dumps({"type": "session", "voice": "Nobody"}), "bad_setting"),
    (json.dumps({"type": "session", "emotion": "bored"}), "bad_setting"),
    (json.dumps({"type": "session", "mode": "psychic"}), "bad_setting"),
    (json.dumps({"type": "session", "pitch": 40}), "bad_setting"),
    (json.dumps({"type": "session", "voice": "Ravi", "rate": "fast"}), "bad_setting"),  # nothing applied
    (json.dumps({"type": "session", "volume": 3}), "bad_setting"),
    (json.dumps({"type": "playback", "response_id": "x", "played_ms": 3}), "bad_message"),
    (json.dumps({"type": "playback", "response_id": 99, "played_ms": 3}), "bad_message"),
    (json.dumps({"type": "commit"}), "no_speech"),
    ("x" * (MAX_MESSAGE_BYTES + 1), "too_large"),
    (b"\x00" * (MAX_MESSAGE_BYTES + 2), "too_large"),
]


def test_bad_input_gets_an_error_and_the_session_lives_on(server):
    async def main():
        c = await Client.connect(server, "bad_input", voice="Arjun")
        codes = []
        for i, (message, _) in enumerate(BAD_MESSAGES):
            await c.ws.send(message)
            codes.append((await c.wait("error", count=i + 1, timeout=10))["code"])
        await c.send_json({"type": "ping", "t": 1})
        await c.wait("pong")
        await c.send_json({"type": "session", "energy": -3})
        updated = await c.wait("session_updated", count=2)
        await c.close()
        return codes, updated, c

    codes, updated, c = run(main())
    assert codes == [code for _, code in BAD_MESSAGES]
    assert all(e["message"] for e in c.find("error"))
    assert updated["settings"]["voice"] == "Arjun"  # the rejected {"voice": "Ravi", "rate": "fast"} changed nothing
    assert updated["settings"]["energy"] == -3


@pytest.mark.parametrize("session_id", ["bad.id", "x" * 65, "semi;colon"])
def test_bad_session_id_is_refused(server, session_id):
    async def main():
        ws = await websockets.connect(f"ws://{server}/ws/{session_id}")
        event = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        return event

    assert run(main())["code"] == "bad_session_id"


def test_same_session_id_twice_is_refused(server):
    async def main():
        first = await Client.connect(server, "twice")
        ws = await websockets.connect(f"ws://{server}/ws/twice")
        event = json.loads(await ws.recv())
        await first.send_json({"type": "ping"})
        await first.wait("pong")
        await first.close()
        return event

    assert run(main())["code"] == "session_in_use"


def test_rate_limit(server):
    """A flood of messages is cut to the limit with an error; the session keeps working."""

    async def main():
        c = await Client.connect(server, "flood")
        for _ in range(400):
            await c.ws.send(json.dumps({"type": "ping"}))
        await c.wait("error", code="rate_limited")
        await asyncio.sleep(1.0)  # the bucket refills
        n = len(c.find("pong"))
        await c.send_json({"type": "ping", "t": "after"})
        await c.wait("pong", t="after")
        await c.close()
        return n

    assert run(main()) < 400


def test_idle_session_is_closed(server):
    async def main():
        c = await Client.connect(server, "idle")
        await c.wait("error", code="idle_timeout", timeout=10)
        await c.reader
        return c

    assert run(main()).closed


# --------------------------------------------------------------------------------------
# Many sessions, full server, disconnects


def test_twenty_concurrent_sessions(server, speech):
    """20 conversations at once: each gets its own complete reply, and all are freed afterwards."""
    n = 20

    async def one(i: int, all_connected: asyncio.Event, clients: list):
        c = await Client.connect(server, f"many_{i}", voice=["Arjun", "Ravi", "Priya", "Lakshmi"][i % 4])
        clients.append(c)
        if len(clients) == n:
            all_connected.set()
        await all_connected.wait()
        await c.send_audio(turn_audio(speech["question"]), realtime=True)
        t0 = time.perf_counter()
        await c.wait("response_done", response_id=1, timeout=120)
        return c, time.perf_counter() - t0, c.find("latency")[0]

    async def main():
        all_connected, clients = asyncio.Event(), []
        tasks = [asyncio.create_task(one(i, all_connected, clients)) for i in range(n)]
        await all_connected.wait()
        active = get_json(f"http://{server}/health")["active_sessions"]
        results = await asyncio.gather(*tasks)
        for c, _, _ in results:
            await c.close()
        return active, results

    active, results = run(main())
    assert active == n
    for c, _, _ in results:
        assert {f[0] for f in c.frames} == {1}  # only its own reply
        check_reply(c, 1)
    health = wait_for_idle(server)
    assert health["active_sessions"] == 0 and health["model_jobs_queued"] == 0
    lat = sorted(r[2]["latency_ms"] for r in results)
    parts = {k: np.median([r[2]["breakdown"][k] for r in results]) for k in results[0][2]["breakdown"]}
    print(f"20 sessions: latency median {lat[n // 2]:.0f} ms, max {lat[-1]:.0f} ms (median breakdown "
          + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
          + f"); end of speech to reply done: max {max(r[1] for r in results):.1f} s for {REPLY_S:g} s replies")


def wait_for_idle(server: str, timeout: float = 15.0) -> dict:
    deadline = time.time() + timeout
    while True:
        health = get_json(f"http://{server}/health")
        if (health["active_sessions"] == 0 and health["model_jobs_queued"] == 0) or time.time() > deadline:
            return health
        time.sleep(0.1)


def test_server_full(server):
    """Beyond --max_sessions: an error event, then the connection closes; the others are unharmed."""

    async def main():
        clients = [await Client.connect(server, f"full_{i}") for i in range(24)]
        ws = await websockets.connect(f"ws://{server}/ws/one_too_many")
        event = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        await clients[0].send_json({"type": "ping"})
        await clients[0].wait("pong")
        for c in clients:
            await c.close()
        return event

    assert run(main())["code"] == "server_full"
    assert wait_for_idle(server)["active_sessions"] == 0


def test_disconnect_mid_reply_frees_everything(server, speech):
    async def main():
        c = await Client.connect(server, "vanish")
        await c.send_audio(turn_audio(speech["question"]))
        await c.wait("response_started")
        while not c.frames:
            await asyncio.sleep(0.01)
        c.ws.transport.abort()  # no close frame: the TCP connection just goes away
        await c.reader
        health = await asyncio.to_thread(wait_for_idle, server)
        # The server is healthy: a new conversation gets a full reply.
        d = await Client.connect(server, "after_vanish")
        await d.send_audio(turn_audio(speech["question"]))
        await d.wait("response_done", response_id=1)
        await d.close()
        return health, d

    health, d = run(main())
    assert health["active_sessions"] == 0 and health["model_jobs_queued"] == 0
    check_reply(d, 1)


# --------------------------------------------------------------------------------------
# Start-up


def test_refuses_to_start_without_weights(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "streaming_server_advanced.py"), "--model_dir", str(tmp_path),
                          "--samples", "off"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0
    for hint in ("no trained models", "train_codec_dac.py", "train_s2s.py", "checkpoints/demo", "--allow-untrained"):
        assert hint in out.stderr, out.stderr
