"""The server's parts that need no network: per-session streaming state in the shared models,
turn detection, settings, wire format, the model thread's scheduling. Tiny random models."""

from __future__ import annotations

import base64
import struct
import threading
import time

import numpy as np
import pytest
import torch

import streaming_server_advanced as srv
from s2s_transformer import S2SConfig, TeluguS2STransformer
from speaker_embeddings import ProsodyControls
from telugu_codec import CodecConfig, TeluCodec

SR = 16000


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    codec = TeluCodec(CodecConfig.preset("tiny")).fold_weight_norm().eval()
    s2s = TeluguS2STransformer(S2SConfig.preset("tiny")).eval()
    return srv.AgentEngine(codec, s2s, torch.device("cpu"), untrained=True, source="test")


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def request(engine, turn, end_frame=0, speaker=0, controls=ProsodyControls(), steps=12, conversation=None):
    segment = 6400 if srv._needs_segments(controls) else 1
    return srv.ReplyRequest(turn, end_frame, torch.tensor([speaker]), torch.tensor([0]), controls, segment,
                            conversation, max_steps=steps, min_steps=steps, temperature=0.0, top_k=50)


def feed(engine, turn: srv.TurnStream, audio: np.ndarray, push_until: int) -> None:
    turn.inbox.append(audio)
    turn.push_until = push_until
    engine.feed_turn(turn)


def whole_reply(engine, reply, first) -> np.ndarray:
    parts = [first]
    while (audio := engine.next_audio(reply)) is not None:
        parts.append(audio)
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------
# Per-session state in shared models


def test_interleaved_turn_streams_equal_offline(engine):
    """Two sessions' turns encoded chunk by chunk, interleaved, give each exactly the codes and
    the encoder memory of its turn encoded alone, offline (the codec state is per session)."""
    hop = engine.hop_length
    audio = [noise(1.0, 1), noise(0.8, 2)]
    turns = [engine.new_turn_stream(), engine.new_turn_stream()]
    sizes = [hop * k for k in (3, 16, 7, 1, 40, 9)]
    pos = [0, 0]
    while any(p < len(a) for p, a in zip(pos, audio)):
        for i in (0, 1):
            n = min(sizes[(pos[i] // hop) % len(sizes)], len(audio[i]) - pos[i])
            if n > 0:
                feed(engine, turns[i], audio[i][pos[i] : pos[i] + n], push_until=10**9)
                pos[i] += n
    for a, turn in zip(audio, turns):
        with torch.inference_mode():
            offline = engine.codec.encode(torch.from_numpy(a)[None, None])  # state swapped out: fresh zeros
        codes = torch.cat(turn.codes, dim=-1)
        assert torch.equal(codes, engine._encode(engine.codec.new_stream_state("encoder"), a))
        memory = turn.encoder.finish()
        full = engine.s2s.encode(codes[None])
        assert torch.allclose(memory.vectors, full.vectors, atol=1e-5)
        assert offline.shape == codes[None].shape


def test_stream_and_turn_mode_give_the_same_reply(engine):
    """The same turn through stream mode (pushed while spoken) and turn mode (encoded at the end)
    gives the same user codes and, greedy, the same reply audio."""
    audio = noise(0.9, 3)
    turn = engine.new_turn_stream()
    for i in range(0, len(audio), 1280):
        feed(engine, turn, audio[i : i + 1280], push_until=10**9)
    end_frame = len(audio) // engine.hop_length
    stream_reply, stream_first, _ = engine.start_reply(request(engine, turn, end_frame))
    turn_reply, turn_first, timings = engine.start_reply(request(engine, audio))
    assert torch.equal(stream_reply.user_codes, turn_reply.user_codes)
    a, b = whole_reply(engine, stream_reply, stream_first), whole_reply(engine, turn_reply, turn_first)
    assert len(a) == 12 * engine.step_samples
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert timings["codec_encode_ms"] > 0


def test_a_reply_carries_the_words_its_model_wrote(engine):
    """A model with an inner monologue writes its words before the first audio; the reply keeps
    them (the server sends them in response_started) and its audio is what generate() makes."""
    assert engine.start_reply(request(engine, noise(0.4, 9)))[0].text is None  # speech only: no words
    torch.manual_seed(1)
    words = ["నమస్కారం", "బాగున్నారా", "మీరు"]
    s2s = TeluguS2STransformer(S2SConfig.preset("tiny", reply_text_weight=1.0, reply_vocab=words, max_reply_words=3,
                                                context_words=True)).eval()
    with torch.no_grad():
        s2s.reply_head.bias[0] = -50.0  # never ends its text early: it writes all 3 words
    codec = TeluCodec(CodecConfig.preset("tiny")).fold_weight_norm().eval()  # an engine streams its own codec
    talker = srv.AgentEngine(codec, s2s, torch.device("cpu"), untrained=True, source="test")
    audio = noise(0.6, 10)
    reply, first, _ = talker.start_reply(request(talker, audio, steps=4))
    whole_reply(talker, reply, first)
    written = []
    with torch.inference_mode():
        codes = talker.s2s.generate(reply.user_codes[None], torch.tensor([0]), torch.tensor([0]), max_new_tokens=4,
                                    min_new_tokens=4, temperature=0.0, on_text=written.append)[0]
    assert reply.text == written[0][0] and len(reply.text.split()) == 3 and set(reply.text.split()) <= set(words)
    assert torch.equal(torch.cat(reply.codes, -1), codes)
    conv = talker.new_conversation("words")
    talker.store_exchange(conv, reply.user_codes, codes, None, user_end_ago_s=1.0, agent_start_ago_s=0.5,
                          agent_text=reply.text)
    assert conv.turns[-1].text == reply.text and conv.model_context().texts == [None, reply.text]


def test_interleaved_replies_equal_replies_alone(engine):
    """Two sessions' replies generated step by step, interleaved, sound exactly as each alone
    (the codec decoder's streaming state is per reply)."""
    audio = noise(0.5, 4)
    alone = []
    for speaker in (0, 3):
        reply, first, _ = engine.start_reply(request(engine, audio, speaker=speaker))
        alone.append(whole_reply(engine, reply, first))
    replies = [engine.start_reply(request(engine, audio, speaker=s))[:2] for s in (0, 3)]
    parts = [[first] for _, first in replies]
    done = [False, False]
    while not all(done):
        for i, (reply, _) in enumerate(replies):
            if not done[i]:
                audio_i = engine.next_audio(reply)
                done[i] = audio_i is None
                if audio_i is not None:
                    parts[i].append(audio_i)
    for expected, got in zip(alone, parts):
        np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-5)
    assert not np.allclose(alone[0], alone[1])  # the speaker changes the reply


def test_energy_and_rate_controls(engine):
    """Energy is a gain on every chunk; rate (PSOLA per segment) shortens the audio, and the
    sample -> frame map still accounts for every generated frame."""
    audio = noise(0.5, 5)
    steps = 40
    base_reply, first, _ = engine.start_reply(request(engine, audio, steps=steps))
    base = whole_reply(engine, base_reply, first)
    quiet_reply, first, _ = engine.start_reply(request(engine, audio, steps=steps, controls=ProsodyControls(energy_db=-6.0)))
    quiet = whole_reply(engine, quiet_reply, first)
    np.testing.assert_allclose(quiet, np.clip(base, -1, 1) * 10 ** (-6 / 20), atol=1e-4)
    fast_reply, first, _ = engine.start_reply(request(engine, audio, steps=steps, controls=ProsodyControls(rate=1.25)))
    fast = whole_reply(engine, fast_reply, first)
    assert len(fast) == pytest.approx(len(base) / 1.25, rel=0.05)
    frames = steps * engine.frames_per_step
    assert engine.heard_frames(fast_reply, len(fast)) == frames
    assert engine.heard_frames(fast_reply, len(fast) // 2) == pytest.approx(frames / 2, abs=engine.frames_per_step * 2)
    assert engine.heard_frames(base_reply, 800) == 800 // engine.hop_length


def test_conversation_memory_is_used_and_cut(engine):
    """An interrupted exchange is stored cut to what was heard, and the next reply differs with
    the memory than without it."""
    conv = engine.new_conversation("mem")
    audio = noise(0.6, 6)
    reply, first, _ = engine.start_reply(request(engine, audio, conversation=conv))
    whole_reply(engine, reply, first)
    agent = torch.cat(reply.codes, dim=-1)
    turns = engine.store_exchange(conv, reply.user_codes, agent, heard_frames=20, user_end_ago_s=1.0, agent_start_ago_s=0.5)
    assert turns == [{"role": "user", "ms": 600, "interrupted": False}, {"role": "agent", "ms": 100, "interrupted": True}]
    assert torch.equal(conv.turns[1].codes, agent[:, :20])
    with_memory = whole_reply(engine, *engine.start_reply(request(engine, audio, conversation=conv))[:2])
    without = whole_reply(engine, *engine.start_reply(request(engine, audio))[:2])
    assert not np.allclose(with_memory, without)
    saved = engine.save_conversation(conv)
    assert engine.conversation_summary(engine.new_conversation("mem", saved)) == turns


# --------------------------------------------------------------------------------------
# Turn detection


def run_detector(probs, agent_active=False, end_of_turn_ms=250, **cfg):
    detector = srv.TurnDetector(srv.ServerConfig(**cfg), 32.0)
    return [(i, e) for i, p in enumerate(probs) if (e := detector.update(p, agent_active, end_of_turn_ms))], detector


def test_turn_detector_start_and_end():
    probs = [0.1, 0.9, 0.9, 0.9] + [0.6] * 5 + [0.1] * 7 + [0.9] + [0.1] * 8
    events, d = run_detector(probs)
    # Start after 2 chunks (64 ms); a pause of 7 quiet chunks (224 ms) does not end the turn;
    # 8 quiet chunks (256 ms >= 250 ms) do. 0.6 >= 0.35 counts as speech once started (hysteresis).
    assert events == [(2, "start"), (24, "end")]
    assert d.onset == 1 and d.last_voiced == 16


def test_turn_detector_barge_in_needs_more_speech():
    """While the agent speaks, 160 ms of speech (an echo-like blip) does not count; 224 ms does,
    and scores between vad_threshold and barge_in_threshold never do."""
    blip = [0.9] * 5 + [0.1] * 10
    assert run_detector(blip, agent_active=True)[0] == []
    assert run_detector(blip, agent_active=False)[0][0] == (1, "start")
    assert run_detector([0.55] * 20, agent_active=True)[0] == []
    assert run_detector([0.9] * 8, agent_active=True)[0] == [(6, "start")]  # ceil(200 / 32) = 7 chunks


def test_turn_detector_forced_end_and_commit():
    events, d = run_detector([0.9] * 40, max_turn_s=1.0)
    # Onset chunk 0; chunk 31 completes 32 x 32 ms >= 1 s; the speech goes on: a new turn.
    assert events == [(1, "start"), (31, "end_forced"), (33, "start")]
    d = srv.TurnDetector(srv.ServerConfig(), 32.0)
    assert not d.force_end()
    d.update(0.9, False, 250)
    d.update(0.9, False, 250)
    assert d.speaking and d.force_end() and not d.speaking


# --------------------------------------------------------------------------------------
# Settings and wire format


def test_update_settings_validates_everything_first():
    s = srv.SessionSettings()
    t = srv.update_settings(s, {"voice": "female_professional", "emotion": 2, "mode": "turn", "pitch": -3, "top_k": 10})
    assert (t.voice, t.emotion, t.mode, t.pitch, t.top_k) == ("Lakshmi", "sad", "turn", -3.0, 10)
    assert isinstance(t.pitch, float) and isinstance(t.top_k, int)
    assert srv.update_settings(t, {"voice": 1}).voice == "Ravi"
    for bad in ({"voice": "Nobody"}, {"voice": True}, {"emotion": "bored"}, {"emotion": 9}, {"mode": "x"},
                {"rate": 3}, {"rate": "1"}, {"pitch": float("nan")}, {"end_of_turn_ms": 50}, {"colour": "red"},
                {"voice": "Ravi", "energy": 99}):
        with pytest.raises(srv.ProtocolError) as e:
            srv.update_settings(t, bad)
        assert e.value.code == "bad_setting"
    assert t.voice == "Lakshmi"  # untouched by the failed updates


def test_wire_format():
    audio = np.array([0.0, 0.5, -0.5, 1.5], dtype=np.float32)
    b64 = base64.b64encode(audio.astype("<f4").tobytes()).decode()
    np.testing.assert_array_equal(srv.decode_float32_audio(b64), [0.0, 0.5, -0.5, 1.0])  # clipped
    np.testing.assert_allclose(srv.decode_pcm16(np.array([0, 16384, -32768], "<i2").tobytes()), [0, 0.5, -1.0])
    for bad in (b"\x00", b""):
        with pytest.raises(srv.ProtocolError):
            srv.decode_pcm16(bad)
    frame = srv.reply_frame(7, 640, np.array([0.0, 1.0, -1.0], np.float32))
    assert struct.unpack("<II", frame[:8]) == (7, 640)
    assert np.frombuffer(frame[8:], "<i2").tolist() == [0, 32767, -32767]


def test_audio_buffer_keeps_absolute_positions():
    buf = srv.AudioBuffer()
    chunks = [np.full(10_000, i, np.float32) for i in range(6)]
    for c in chunks:
        buf.append(c)
        buf.drop_before(buf.end - 12_000)
    assert buf.end == 60_000 and buf.start <= 48_000
    got = buf.get(47_000, 61_000)
    np.testing.assert_array_equal(got[:3000], 4)
    np.testing.assert_array_equal(got[3000:13_000], 5)
    np.testing.assert_array_equal(got[13_000:], 0)  # not received yet: silence


def test_model_worker_runs_urgent_first_then_earliest_deadline():
    worker = srv.ModelWorker()
    gate, order = threading.Event(), []
    worker.submit(gate.wait)  # occupies the thread while the others queue
    now = time.perf_counter()
    futures = [worker.submit(order.append, name, deadline=d) for name, d in
               (("late", now + 2), ("soon", now + 1), ("urgent1", None), ("soonest", now + 0.5), ("urgent2", None))]
    gate.set()
    for f in futures:
        f.result(5)
    assert order == ["urgent1", "urgent2", "soonest", "soon", "late"]
    failing = worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    assert worker.pending == 0
    worker.shutdown()


def test_missing_weights_message_says_how_to_get_them(tmp_path):
    with pytest.raises(SystemExit) as e:
        srv.AgentEngine.load(tmp_path)
    text = str(e.value)
    assert "train_codec_dac.py" in text and "train_s2s.py" in text and "--allow-untrained" in text
