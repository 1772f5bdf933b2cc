"""Real-time Telugu voice agent: a full-duplex WebSocket server with VAD, barge-in and 10-turn memory.

One WebSocket per conversation. The user's audio streams in (16 kHz mono), silero-vad finds the
turns, the codec and the S2S transformer turn the user's speech into the agent's spoken reply, and
the reply streams back paced at real time. Speaking over the agent interrupts it: generation stops,
the client is told to flush, and the agent's turn is remembered only as far as the user heard it.

Usage:
    python streaming_server_advanced.py                                  # checkpoints/demo, 127.0.0.1:8000
    python streaming_server_advanced.py --model_dir /workspace/models --host 0.0.0.0 --port 8000
    python streaming_server_advanced.py --build_samples                  # render the page's sample questions
    python streaming_server_advanced.py --allow-untrained --untrained_preset tiny   # tests only: random models
    then open http://localhost:8000 (the microphone needs a secure context: localhost or HTTPS)

Model folder (--model_dir): <model_dir>/codec and <model_dir>/s2s, each holding model.safetensors (or
its shards and model.safetensors.index.json) + config.json, or the training checkpoint best_codec.pt /
s2s_best.pt. Without them the server refuses
to start and says how to get them; it never answers with an untrained model unless told to.

Protocol (the README has the full description and an example client), on ws://HOST:PORT/ws/{session_id}:
    client -> server  binary frame: PCM16 little-endian mono 16 kHz, any whole number of samples
                      {"type": "audio", "audio": base64 float32 LE mono 16 kHz[, "sample_rate": 16000]}
                      {"type": "session", "voice", "emotion", "mode": "stream"|"turn", "pitch", "energy",
                       "rate", "accent", ...}  (any subset)
                      {"type": "playback", "response_id", "played_ms"}   what the listener has heard
                      {"type": "commit"}  end the user's turn now;  {"type": "cancel"}  stop the reply
                      {"type": "clear_context"};  {"type": "ping"}
    server -> client  session_created (first message), session_updated, speech_started, speech_stopped,
                      response_started, binary reply audio (8-byte header: uint32 response_id, uint32
                      sample offset; then PCM16), response_done, interrupted, latency, context, pong,
                      error {"code", "message"}
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import dataclasses
import heapq
import itertools
import json
import logging
import math
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

# silero_vad sets torch's thread count to 1 when imported: import it before choosing our own.
from silero_vad import load_silero_vad  # isort: skip
import torch

from config import (DEMO_MODEL_DIR, EMOTIONS, REPO_DIR, SAMPLE_RATE, VOICES, default_model_threads, emotion_id,
                    voice_by_name)

log = logging.getLogger("telugu_s2s.server")

STATIC_DIR = REPO_DIR / "static"
SAMPLES_DIR = STATIC_DIR / "samples"
VAD_CHUNK_SAMPLES = 512  # silero-vad takes exactly 512 samples at 16 kHz (32 ms)
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
REPLY_HEADER = struct.Struct("<II")  # response_id, sample offset of the chunk within the response


# --------------------------------------------------------------------------------------
# Configuration


@dataclass
class ServerConfig:
    """Turn-taking, reply pacing and limits. Every field is a command-line flag of the same name."""

    # turn taking
    end_of_turn_ms: int = field(default=250, metadata={"help": "silence that ends the user's turn (a session may set its own)"})
    min_speech_ms: int = field(default=64, metadata={"help": "speech needed to start a turn while the agent is silent"})
    barge_in_min_speech_ms: int = field(default=200, metadata={
        "help": "speech needed to interrupt the agent: the guard against its own echo"})
    vad_threshold: float = field(default=0.5, metadata={"help": "silero-vad speech probability that counts as speech"})
    barge_in_threshold: float = field(default=0.6, metadata={
        "help": "the same while the agent speaks (residual echo scores lower than a real voice)"})
    pre_roll_ms: int = field(default=100, metadata={"help": "audio kept before the detected speech onset"})
    end_pad_ms: int = field(default=60, metadata={
        "help": "audio kept after the last voiced chunk (the corpus trims with 60 ms)"})
    max_turn_s: float = field(default=30.0, metadata={"help": "a longer user turn is ended by force"})
    # reply
    lead_ms: int = field(default=150, metadata={"help": "reply audio is sent this far ahead of real time"})
    generate_ahead_ms: int = field(default=300, metadata={
        "help": "generation runs at most this far ahead of what has been sent (less work lost on barge-in)"})
    max_reply_s: float = field(default=15.0, metadata={"help": "longest reply"})
    min_reply_ms: int = field(default=0, metadata={
        "help": "the model's end-of-reply decision is ignored before this (tests, untrained models)"})
    prosody_segment_ms: int = field(default=400, metadata={
        "help": "pitch / rate / accent changes are applied per reply segment of this length (PSOLA needs context)"})
    playback_report_wait_ms: int = field(default=500, metadata={
        "help": "after an interruption, wait this long for the client's played_ms before storing the cut turn"})
    # limits
    max_sessions: int = field(default=32, metadata={"help": "concurrent sessions; one more gets server_full"})
    max_message_bytes: int = field(default=1 << 20, metadata={
        "help": "larger messages get a too_large error (4x this closes the connection)"})
    idle_timeout_s: float = field(default=60.0, metadata={"help": "close a session that sends nothing this long"})
    session_timeout_s: float = field(default=1800.0, metadata={"help": "close any session after this long"})
    rate_limit_messages: float = field(default=100.0, metadata={"help": "messages per second per session (bursts of 2x)"})
    rate_limit_audio: float = field(default=4.0, metadata={
        "help": "seconds of audio per second per session (bursts of 30 s)"})
    context_resume_s: float = field(default=600.0, metadata={
        "help": "a reconnecting session id gets its conversation back within this many seconds"})

    def __post_init__(self):
        for name in ("end_of_turn_ms", "min_speech_ms", "barge_in_min_speech_ms", "max_sessions", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vad_threshold", "barge_in_threshold"):
            if not 0.2 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name} must be in [0.2, 1), got {getattr(self, name)}")
        if self.max_reply_s <= 0 or self.min_reply_ms / 1000 > self.max_reply_s:
            raise ValueError("need 0 < --max_reply_s and --min_reply_ms <= 1000 * --max_reply_s")


@dataclass
class SessionSettings:
    """What a client may set with {"type": "session", ...}; see SETTING_RANGES for the limits."""

    voice: str = "Priya"
    voice_b: str | None = None  # a second voice to interpolate towards
    voice_weight: float = 0.0  # 0 = voice, 1 = voice_b
    emotion: str = "neutral"
    mode: str = "stream"  # "stream": encode while the user speaks; "turn": after the turn ends
    pitch: float = 0.0  # semitones
    energy: float = 0.0  # dB
    rate: float = 1.0  # speaking-rate factor
    accent: float = 1.0  # intonation depth (speaker_embeddings.ProsodyControls.accent_level)
    end_of_turn_ms: int = 250
    audio_format: str = "binary"  # reply audio as binary PCM16 frames, or "json" (base64 float32)
    temperature: float = 0.8
    top_k: int = 50


SETTING_RANGES = {
    "voice_weight": (0.0, 1.0), "pitch": (-12.0, 12.0), "energy": (-20.0, 20.0), "rate": (0.5, 2.0),
    "accent": (0.0, 3.0), "end_of_turn_ms": (100, 2000), "temperature": (0.0, 2.0), "top_k": (0, 1024),
}


class ProtocolError(Exception):
    """A message the server cannot use: answered with {"type": "error", "code", "message"}."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _pick(value, names: tuple[str, ...], lookup, what: str) -> str:
    """A voice or emotion given by id or name -> its canonical name."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    try:
        return lookup(value) if isinstance(value, str) else lookup("?")
    except ValueError:
        raise ProtocolError("bad_setting", f"unknown {what} {value!r}; choose one of: {', '.join(names)}") from None


def update_settings(current: SessionSettings, values: dict) -> SessionSettings:
    """A copy of `current` with `values` applied, all checked first: one bad value changes nothing."""
    fields = {f.name for f in dataclasses.fields(SessionSettings)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ProtocolError("bad_setting", f"unknown setting(s) {unknown}; valid: {sorted(fields)}")
    out = dataclasses.replace(current)
    voice_names = tuple(v.name for v in VOICES)
    for name, value in values.items():
        if name == "voice_b" and value is None:
            out.voice_b = None
        elif name in ("voice", "voice_b"):
            setattr(out, name, _pick(value, voice_names, lambda v: voice_by_name(v).name, name))
        elif name == "emotion":
            out.emotion = _pick(value, EMOTIONS, lambda e: EMOTIONS[emotion_id(e)], "emotion")
        elif name in ("mode", "audio_format"):
            allowed = ("stream", "turn") if name == "mode" else ("binary", "json")
            if value not in allowed:
                raise ProtocolError("bad_setting", f"{name} must be one of {allowed}, got {value!r}")
            setattr(out, name, value)
        else:
            lo, hi = SETTING_RANGES[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                raise ProtocolError("bad_setting", f"{name} must be a number in [{lo}, {hi}], got {value!r}")
            setattr(out, name, int(value) if isinstance(lo, int) else float(value))
    return out


# --------------------------------------------------------------------------------------
# Wire format


def decode_float32_audio(b64: object) -> np.ndarray:
    """The mission's JSON audio: base64 of float32 little-endian samples -> (T,) float32."""
    if not isinstance(b64, str):
        raise ProtocolError("bad_audio", f"'audio' must be a base64 string, got {type(b64).__name__}")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError("bad_audio", f"'audio' is not valid base64 ({e})") from None
    if len(raw) == 0 or len(raw) % 4:
        raise ProtocolError("bad_audio", f"'audio' holds {len(raw)} bytes: not a whole, non-zero number of "
                            "float32 samples (4 bytes each)")
    return check_pcm(np.frombuffer(raw, dtype="<f4").astype(np.float32))


def decode_pcm16(raw: bytes) -> np.ndarray:
    """A binary frame: int16 little-endian samples -> (T,) float32 in [-1, 1)."""
    if len(raw) == 0 or len(raw) % 2:
        raise ProtocolError("bad_audio", f"binary frame of {len(raw)} bytes: PCM16 needs a whole, non-zero "
                            "number of 2-byte samples")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def check_pcm(pcm: np.ndarray) -> np.ndarray:
    if not np.isfinite(pcm).all():
        raise ProtocolError("bad_audio", "audio contains NaN or infinite samples")
    return np.clip(pcm, -1.0, 1.0)


def encode_pcm16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def reply_frame(response_id: int, offset: int, pcm: np.ndarray) -> bytes:
    """Binary reply chunk: uint32 response_id, uint32 sample offset in the response, PCM16 samples."""
    return REPLY_HEADER.pack(response_id, offset) + encode_pcm16(pcm)


# --------------------------------------------------------------------------------------
# Turn taking


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class TurnDetector:
    """Speech onset and end of turn from one VAD probability per 512-sample chunk (32 ms).

    Pure logic, no audio. Speech starts after `min_speech_ms` of consecutive chunks scoring at least
    `vad_threshold`; while the agent is speaking it needs `barge_in_min_speech_ms` at
    `barge_in_threshold` instead (echo of the agent's own voice rarely lasts that long at that
    score). The turn ends after `end_of_turn_ms` of chunks below threshold - 0.15 (hysteresis),
    or by force after max_turn_s. Example at 32 ms chunks, 64 ms minimum, 250 ms end of turn:
    probabilities 0.1 0.9 0.9 ... -> "start" at the third chunk with onset chunk 1; then eight
    chunks below 0.35 -> "end".
    """

    def __init__(self, cfg: ServerConfig, chunk_ms: float):
        self.cfg, self.chunk_ms = cfg, chunk_ms
        self.index = 0  # chunks seen
        self.speaking = False
        self.run = 0  # consecutive speech chunks while silent
        self.silence = 0  # consecutive quiet chunks while speaking
        self.onset = 0  # first chunk of the current speech
        self.last_voiced = -1  # last chunk with speech

    def _chunks(self, ms: float) -> int:
        return max(1, math.ceil(ms / self.chunk_ms))

    def update(self, prob: float, agent_active: bool, end_of_turn_ms: int) -> str | None:
        """Feed one chunk's probability; returns "start", "end", "end_forced" or None."""
        cfg = self.cfg
        i = self.index
        self.index += 1
        if not self.speaking:
            threshold = cfg.barge_in_threshold if agent_active else cfg.vad_threshold
            needed = self._chunks(cfg.barge_in_min_speech_ms if agent_active else cfg.min_speech_ms)
            self.run = self.run + 1 if prob >= threshold else 0
            if self.run >= needed:
                self.speaking, self.silence = True, 0
                self.onset, self.last_voiced = i - self.run + 1, i
                self.run = 0
                return "start"
            return None
        if prob >= cfg.vad_threshold - 0.15:
            self.silence, self.last_voiced = 0, i
        else:
            self.silence += 1
        if self.silence >= self._chunks(end_of_turn_ms):
            self.speaking = False
            return "end"
        if (i - self.onset + 1) * self.chunk_ms >= 1000 * cfg.max_turn_s:
            self.speaking = False
            return "end_forced"
        return None

    def force_end(self) -> bool:
        """End the current turn now ({"type": "commit"}); False when there is none."""
        if not self.speaking:
            return False
        self.speaking = False
        return True


class VadPool:
    """silero-vad models, one per live session (the model keeps its recurrent state inside), reused
    across sessions after a reset. Loading one takes ~0.05 s; the wheel bundles the weights."""

    def __init__(self):
        self._free: list = []
        self._lock = threading.Lock()

    def acquire(self):
        with self._lock:
            if self._free:
                return self._free.pop()
        return load_silero_vad()

    def release(self, model) -> None:
        model.reset_states()
        with self._lock:
            self._free.append(model)


@torch.inference_mode()
def vad_probabilities(model, chunks: np.ndarray) -> list[float]:
    """(N, 512) float32 -> N speech probabilities, in order (the model carries state across calls)."""
    return [float(model(torch.from_numpy(c), SAMPLE_RATE)) for c in chunks]


class AudioBuffer:
    """The session's incoming audio addressed by absolute sample index (0 = first sample received);
    keeps [start, end) and drops what precedes `keep_from` on request."""

    def __init__(self):
        self.data = np.zeros(SAMPLE_RATE, dtype=np.float32)
        self.start = 0  # absolute index of data[0]
        self.end = 0  # absolute index one past the last sample

    def append(self, pcm: np.ndarray) -> None:
        n_old = self.end - self.start
        if n_old + len(pcm) > len(self.data):
            grown = np.zeros(max(2 * len(self.data), n_old + len(pcm)), dtype=np.float32)
            grown[:n_old] = self.data[:n_old]
            self.data = grown
        self.data[n_old : n_old + len(pcm)] = pcm
        self.end += len(pcm)

    def get(self, a: int, b: int) -> np.ndarray:
        """A copy of samples [a, b) (what was dropped or not yet received reads as silence)."""
        out = np.zeros(max(0, b - a), dtype=np.float32)
        lo, hi = max(a, self.start), min(b, self.end)
        if hi > lo:
            out[lo - a : hi - a] = self.data[lo - self.start : hi - self.start]
        return out

    def drop_before(self, keep_from: int) -> None:
        cut = min(max(0, keep_from - self.start), self.end - self.start)
        if cut > len(self.data) // 2:
            n = self.end - self.start - cut
            self.data[:n] = self.data[cut : cut + n].copy()
            self.start += cut


# --------------------------------------------------------------------------------------
# The engine: every model call of the server, run on one model thread


@dataclass
class TurnStream:
    """A user turn being encoded while it is spoken (stream mode): the codec encoder's streaming
    state (one object per streaming layer, this session's alone), the S2S EncoderStream, the codes,
    and an inbox of audio not yet encoded (filled by the event loop, drained on the model thread)."""

    codec_state: list
    encoder: object  # s2s_transformer.EncoderStream
    codes: list = field(default_factory=list)  # (K, f) int64 per encoded piece
    n_frames: int = 0  # codec frames encoded
    pushed: int = 0  # codec frames pushed into the S2S encoder
    inbox: list = field(default_factory=list)  # (T,) float32 pieces, each a multiple of the hop
    inbox_samples: int = 0
    push_until: int = 0  # codec frames that may go to the S2S encoder (the rest may be end-of-turn silence)
    job_pending: bool = False  # a drain job is queued: new audio joins it instead of queueing another
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class ReplyRequest:
    """Everything the engine needs to start one reply."""

    turn: TurnStream | np.ndarray  # stream mode: the turn's stream; turn mode: the turn's audio (T,)
    end_frame: int  # stream mode: codec frames in the turn (the rest is trailing silence)
    speaker: torch.Tensor  # (1,) id or (1, 4) mixing weights
    emotion: torch.Tensor  # (1,)
    controls: object  # speaker_embeddings.ProsodyControls
    segment_samples: int  # reply audio per prosody pass (1: no pitch/rate/accent change, per step)
    conversation: object  # context_manager.ContextManager, or None (no memory)
    max_steps: int
    min_steps: int
    temperature: float
    top_k: int


@dataclass
class ReplyStream:
    """One reply being generated: the S2S generator, the codec decoder's own streaming state, the
    prosody segment buffer, and the map from output samples to codec frames (for cutting the
    agent's turn where the listener stopped hearing it)."""

    generator: object
    codec_state: list
    controls: object
    segment_samples: int
    user_codes: torch.Tensor  # (K, F) the user's turn
    codes: list = field(default_factory=list)  # (K, f) per generated chunk
    pending: list = field(default_factory=list)  # decoded audio waiting for a prosody segment
    pending_frames: int = 0
    frame_map: list = field(default_factory=lambda: [(0, 0)])  # (output samples, codec frames) so far
    finished: bool = False
    text: str | None = None  # the words the model wrote before speaking (None without an inner monologue)


class AgentEngine:
    """The codec and the S2S model, shared by all sessions; per-session streaming state is explicit
    (TurnStream, ReplyStream, ContextManager), so sessions cannot disturb each other. Every method
    below runs on the server's single model thread (ModelWorker), one call at a time."""

    def __init__(self, codec, s2s, device: torch.device, untrained: bool, source: str):
        self.codec, self.s2s, self.device, self.untrained, self.source = codec, s2s, device, untrained, source
        cfg = s2s.config
        if (cfg.n_codebooks, cfg.codebook_size) != (codec.n_codebooks, codec.codebook_size) \
                or abs(cfg.codec_frame_rate - codec.frame_rate) > 1e-6:
            raise ValueError(
                f"the S2S model expects {cfg.n_codebooks} x {cfg.codebook_size} codes at {cfg.codec_frame_rate} Hz, "
                f"the codec gives {codec.n_codebooks} x {codec.codebook_size} at {codec.frame_rate:g} Hz: "
                "train the S2S model on this codec's tokens"
            )
        self.hop_length = codec.hop_length
        self.frames_per_step = cfg.frames_per_step
        self.step_samples = self.hop_length * self.frames_per_step  # reply audio per decoder step
        # The S2S encoder consumes the user's turn in chunks of this many samples (80 ms).
        self.encoder_chunk_samples = cfg.encoder_chunk_steps * self.step_samples
        self.step_ms = 1000.0 * self.step_samples / SAMPLE_RATE
        # The codec streams inside one block for good; each session holds its own encoder and
        # decoder state (codec.new_stream_state) and hands it over for each call.
        self._streaming = contextlib.ExitStack()
        self._streaming.enter_context(codec.streaming(1))

    # ----- loading

    @classmethod
    def load(cls, model_dir: Path, device: str = "cpu", allow_untrained: bool = False,
             untrained_preset: str = "tiny") -> AgentEngine:
        from s2s_transformer import CHECKPOINT_NAMES, S2SConfig, TeluguS2STransformer
        from telugu_codec import CodecConfig, TeluCodec

        dev = torch.device(device)
        codec_dir, s2s_dir = Path(model_dir) / "codec", Path(model_dir) / "s2s"
        found = has_weights(codec_dir, TeluCodec.CHECKPOINT_NAMES) and has_weights(s2s_dir, CHECKPOINT_NAMES)
        if found:
            codec = TeluCodec.from_pretrained(codec_dir, map_location=dev)
            s2s = TeluguS2STransformer.from_pretrained(s2s_dir, map_location=dev)
            return cls(codec, s2s.eval(), dev, untrained=False, source=str(model_dir))
        if not allow_untrained:
            raise SystemExit(missing_weights_message(Path(model_dir), codec_dir, s2s_dir))
        log.warning("NO TRAINED WEIGHTS in %s: serving RANDOM %r models (--allow-untrained, tests only); "
                    "replies are noise", model_dir, untrained_preset)
        torch.manual_seed(0)
        codec = TeluCodec(CodecConfig.preset(untrained_preset)).fold_weight_norm().eval().to(dev)
        s2s = TeluguS2STransformer(S2SConfig.preset(untrained_preset)).eval().to(dev)
        return cls(codec, s2s, dev, untrained=True, source=f"untrained:{untrained_preset}")

    def describe(self) -> dict:
        c, s = self.codec.config, self.s2s.config
        return {
            "source": self.source, "untrained": self.untrained, "device": str(self.device),
            "codec": {"hop_length": self.hop_length, "frame_rate": self.codec.frame_rate,
                      "n_codebooks": c.n_codebooks, "codebook_size": c.codebook_size},
            "s2s": {"hidden_dim": s.hidden_dim, "encoder_layers": s.num_encoder_layers,
                    "decoder_layers": s.num_decoder_layers, "frames_per_step": s.frames_per_step,
                    "parameters": self.s2s.num_parameters()},
        }

    # ----- codec state per session

    @torch.inference_mode()
    def _encode(self, state: list, audio: np.ndarray) -> torch.Tensor:
        """(T,) float32, T a multiple of the hop -> codes (K, T / hop), continuing `state`."""
        self.codec.set_stream_state("encoder", state)
        wav = torch.from_numpy(audio).to(self.device)[None, None]
        return self.codec.encode(wav)[0].cpu()

    @torch.inference_mode()
    def _decode(self, state: list, codes: torch.Tensor) -> np.ndarray:
        """codes (K, f) -> (f * hop,) float32, continuing `state`."""
        self.codec.set_stream_state("decoder", state)
        return self.codec.decode(codes[None].to(self.device))[0, 0].float().cpu().numpy()

    # ----- the user's turn

    def new_turn_stream(self) -> TurnStream:
        """Fresh streaming state for one user turn (allocates state only; safe on any thread)."""
        return TurnStream(self.codec.new_stream_state("encoder"), self.s2s.encoder_stream(1))

    def feed_turn(self, turn: TurnStream) -> None:
        """Stream mode, while the user speaks: encode the audio in the turn's inbox with the codec
        and push the codec frames before `push_until` into the S2S encoder (frames after the last
        voiced chunk wait: they may be the silence that ends the turn). Under load several
        pieces of audio wait in the inbox and are encoded in one call, which costs less."""
        with turn.lock:
            pieces, push_until = turn.inbox, turn.push_until
            turn.inbox, turn.inbox_samples, turn.job_pending = [], 0, False
        if pieces:
            codes = self._encode(turn.codec_state, np.concatenate(pieces))
            turn.codes.append(codes)
            turn.n_frames += codes.shape[-1]
        self._push(turn, min(push_until, turn.n_frames))

    def _push(self, turn: TurnStream, until: int) -> None:
        """Push codec frames [turn.pushed, until) into the S2S encoder (it encodes whole chunks)."""
        if until <= turn.pushed:
            return
        codes = torch.cat(turn.codes, dim=-1)[None, :, turn.pushed : until].to(self.device)  # (1, K, f)
        turn.encoder.push(codes)
        turn.pushed = until

    def _user_codes(self, request: ReplyRequest, timings: dict) -> tuple[object, torch.Tensor]:
        """The S2S input (stream mode: the finished EncoderStream; turn mode: codes (1, K, F))
        and the user's codes (K, F)."""
        t0 = time.perf_counter()
        if isinstance(request.turn, TurnStream):
            turn = request.turn
            self.feed_turn(turn)  # the last audio of the turn
            self._push(turn, request.end_frame)
            codes = torch.cat(turn.codes, dim=-1)[:, : request.end_frame]
            timings["codec_encode_ms"] = 0.0  # done while the user spoke
            t1 = time.perf_counter()
            turn.encoder.finish()
            timings["s2s_encode_ms"] = 1000 * (time.perf_counter() - t1)
            return turn.encoder, codes
        audio = request.turn
        audio = np.pad(audio, (0, -len(audio) % self.hop_length))
        codes = self._encode(self.codec.new_stream_state("encoder"), audio)
        timings["codec_encode_ms"] = 1000 * (time.perf_counter() - t0)
        # The whole turn at once: the model's full encoder pass (one masked pass, faster than
        # pushing the chunks through an EncoderStream) runs inside the first generation step.
        return codes[None].to(self.device), codes

    # ----- the reply

    def start_reply(self, request: ReplyRequest) -> tuple[ReplyStream, np.ndarray | None, dict]:
        """Encode the end of the turn, start generation and produce the first audio.
        Returns the reply, its first audio (None: the model ended the reply at once) and timings (ms)."""
        timings: dict[str, float] = {}
        s2s_input, user_codes = self._user_codes(request, timings)
        t0 = time.perf_counter()
        context = self.context_memory(request.conversation)
        timings["context_ms"] = 1000 * (time.perf_counter() - t0)
        written: list[list[str]] = []
        generator = self.s2s.generate_streaming(
            s2s_input, request.speaker.to(self.device), request.emotion.to(self.device),
            max_new_tokens=request.max_steps, context=context, temperature=request.temperature,
            top_k=request.top_k or None, min_new_tokens=max(1, request.min_steps), on_text=written.append,
        )
        reply = ReplyStream(generator, self.codec.new_stream_state("decoder"), request.controls,
                            request.segment_samples, user_codes)
        first = self.next_audio(reply, timings)  # the words, if any, are written before the first audio
        reply.text = written[0][0] if written else None
        return reply, first, timings

    def next_audio(self, reply: ReplyStream, timings: dict | None = None) -> np.ndarray | None:
        """The next piece of reply audio (T,) float32, or None when the reply is over. One decoder
        step per call without pitch/rate/accent changes; a whole prosody segment with them."""
        timings = timings if timings is not None else {}
        while True:
            t0 = time.perf_counter()
            codes = None if reply.finished else next(reply.generator, None)  # (1, K, f)
            t1 = time.perf_counter()
            timings["s2s_generate_ms"] = timings.get("s2s_generate_ms", 0.0) + 1000 * (t1 - t0)
            if codes is None:
                reply.finished = True
                if not reply.pending:
                    return None
                return self._emit(reply, timings)
            codes = codes[0].cpu()
            reply.codes.append(codes)
            audio = self._decode(reply.codec_state, codes)
            timings["codec_decode_ms"] = timings.get("codec_decode_ms", 0.0) + 1000 * (time.perf_counter() - t1)
            reply.pending.append(audio)
            reply.pending_frames += codes.shape[-1]
            if sum(len(a) for a in reply.pending) >= reply.segment_samples:
                return self._emit(reply, timings)

    def _emit(self, reply: ReplyStream, timings: dict) -> np.ndarray:
        from speaker_embeddings import apply_prosody

        audio = np.concatenate(reply.pending)
        t0 = time.perf_counter()
        controls = reply.controls
        if _needs_segments(controls):
            audio = apply_prosody(audio, controls)
        elif controls.energy_db:
            audio = np.clip(audio * np.float32(10 ** (controls.energy_db / 20)), -1.0, 1.0)
        timings["prosody_ms"] = timings.get("prosody_ms", 0.0) + 1000 * (time.perf_counter() - t0)
        samples, frames = reply.frame_map[-1]
        reply.frame_map.append((samples + len(audio), frames + reply.pending_frames))
        reply.pending, reply.pending_frames = [], 0
        return audio.astype(np.float32)

    def close_reply(self, reply: ReplyStream) -> None:
        reply.generator.close()
        reply.finished = True

    @staticmethod
    def heard_frames(reply: ReplyStream, heard_samples: int) -> int:
        """Codec frames of the reply the listener heard, after `heard_samples` of played audio
        (interpolating through the sample -> frame map, which differs from hop when rate != 1)."""
        for (s0, f0), (s1, f1) in zip(reply.frame_map, reply.frame_map[1:]):
            if heard_samples <= s1:
                return f0 + int((f1 - f0) * (heard_samples - s0) / max(1, s1 - s0))
        return reply.frame_map[-1][1]

    # ----- conversation memory (the only code that touches context_manager)

    def new_conversation(self, session_id: str, saved: dict | None = None):
        """A session's memory: a new ContextManager, or the saved one of a reconnecting session."""
        from context_manager import ContextManager

        if saved is not None:
            return ContextManager.from_dict(saved)
        return ContextManager(max_turns=self.s2s.config.max_context_turns, n_codebooks=self.codec.n_codebooks,
                              codebook_size=self.codec.codebook_size, frame_rate=self.codec.frame_rate,
                              session_id=session_id)

    def store_exchange(self, conv, user_codes: torch.Tensor, agent_codes: torch.Tensor | None, heard_frames: int | None,
                       user_end_ago_s: float, agent_start_ago_s: float | None, agent_text: str | None = None) -> list[dict]:
        """Remember one exchange: the user's turn (K, F) and the agent's generated codes (K, f)
        (None: nothing generated), cut to `heard_frames` when the user interrupted, with the words
        the agent wrote (inner monologue). Times are seconds before now. Then encode the new
        context at once, while the user has not spoken yet, so the next reply does not pay for it.
        Returns the memory's turns for the client."""
        now = conv.now()
        conv.add_user_turn(user_codes, end_s=now - user_end_ago_s)
        if agent_codes is not None and agent_start_ago_s is not None:  # it ends where the listener stopped
            conv.add_agent_turn(agent_codes, start_s=now - agent_start_ago_s, heard_frames=heard_frames, text=agent_text)
        self.context_memory(conv)
        return self.conversation_summary(conv)

    def conversation_summary(self, conv) -> list[dict]:
        return [{"role": t.role, "ms": round(1000 * t.n_frames / self.codec.frame_rate), "interrupted": t.interrupted}
                for t in conv.turns]

    def save_conversation(self, conv) -> dict:
        return conv.to_dict()

    def clear_conversation(self, conv) -> None:
        conv.clear()

    def context_memory(self, conv):
        """The S2S memory of the conversation so far (cached by the manager until it changes), or None."""
        return None if conv is None else conv.context_memory(self.s2s)

    # ----- warm-up

    def warmup(self) -> float:
        """One short reply end to end, so the first user does not pay for lazy initialisation."""
        from speaker_embeddings import ProsodyControls

        t0 = time.perf_counter()
        audio = (0.01 * np.random.default_rng(0).standard_normal(SAMPLE_RATE // 2)).astype(np.float32)
        request = ReplyRequest(audio, 0, torch.tensor([0]), torch.tensor([0]), ProsodyControls(), 1,
                               None, max_steps=3, min_steps=3, temperature=0.8, top_k=50)
        reply, _, _ = self.start_reply(request)
        while self.next_audio(reply) is not None:
            pass
        self.close_reply(reply)
        return time.perf_counter() - t0


def _needs_segments(controls) -> bool:
    """Pitch, rate and accent need PSOLA over a segment; energy alone is a gain on each chunk."""
    return (controls.pitch_semitones, controls.rate, controls.accent_level) != (0.0, 1.0, 1.0)


def has_weights(directory: Path, checkpoint_names: tuple[str, ...]) -> bool:
    if not directory.is_dir():
        return False
    from training import weight_files

    return bool(weight_files(directory)) or any((directory / n).is_file() for n in checkpoint_names)


def missing_weights_message(model_dir: Path, codec_dir: Path, s2s_dir: Path) -> str:
    return (
        f"streaming_server_advanced.py: no trained models in {model_dir}.\n"
        f"  expected {codec_dir}/ and {s2s_dir}/, each with model.safetensors + config.json "
        "(or best_codec.pt / s2s_best.pt).\n"
        "  Get them one of these ways:\n"
        f"    - use the demo models shipped in the repo: --model_dir {DEMO_MODEL_DIR} (git pull if missing)\n"
        f"    - train: python train_codec_dac.py --output_dir {codec_dir} ... then "
        f"python train_s2s.py --codec_path {codec_dir}/best_codec.pt --checkpoint_dir {s2s_dir} ...\n"
        "  (--allow-untrained serves random models for tests; its replies are noise.)"
    )


# --------------------------------------------------------------------------------------
# Server state: the models, the worker threads, the live sessions


class ModelWorker:
    """The one thread that runs every model call, most urgent first. Urgent jobs (encoding the
    user's turn, starting a reply, updating a memory) run in submission order before any
    generation step; generation steps run earliest deadline first, the deadline being when that
    reply's listener would run out of audio. So under load a new reply still starts at once, and
    the replies already playing share what is left fairly."""

    URGENT = float("-inf")

    def __init__(self):
        self._heap: list = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._stopped = False
        self.pending = 0  # submitted, not finished
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._thread.start()

    def submit(self, fn, *args, deadline: float | None = None) -> concurrent.futures.Future:
        """Run fn(*args) on the model thread; the future's result is (result, queued_ms, run_ms).
        deadline (time.perf_counter() seconds) marks a generation step; None an urgent job."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        key = (self.URGENT if deadline is None else deadline, next(self._seq))
        with self._cv:
            if self._stopped:
                raise RuntimeError("the model worker has stopped")
            self.pending += 1
            heapq.heappush(self._heap, (key, time.perf_counter(), fn, args, future))
            self._cv.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                _, submitted, fn, args, future = heapq.heappop(self._heap)
            start = time.perf_counter()
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args)
                    except BaseException as e:  # noqa: BLE001 - handed to the waiting coroutine
                        future.set_exception(e)
                    else:
                        future.set_result((result, 1000 * (start - submitted), 1000 * (time.perf_counter() - start)))
            finally:
                with self._cv:
                    self.pending -= 1

    def shutdown(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()


class ServerState:
    """Everything the server owns (Moshi-server style): config, engine, VAD pool, the two worker
    threads (one for the models, one for VAD, so a busy model never delays barge-in detection),
    the live sessions and the saved conversations of recently closed ones."""

    def __init__(self, cfg: ServerConfig, engine: AgentEngine, static_dir: Path = STATIC_DIR,
                 samples_dir: Path = SAMPLES_DIR):
        self.cfg, self.engine, self.static_dir, self.samples_dir = cfg, engine, static_dir, samples_dir
        self.vad_pool = VadPool()
        self.model_worker = ModelWorker()
        self.vad_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vad")
        self.sessions: dict[str, Session] = {}
        self.saved_conversations: collections.OrderedDict[str, tuple[float, dict]] = collections.OrderedDict()
        self.started = time.time()
        self.sessions_total = 0
        self.responses_total = 0

    def submit(self, fn, *args, deadline: float | None = None) -> concurrent.futures.Future:
        return self.model_worker.submit(fn, *args, deadline=deadline)

    def save_conversation(self, session_id: str, saved: dict) -> None:
        self.saved_conversations[session_id] = (time.monotonic(), saved)
        self.saved_conversations.move_to_end(session_id)
        while len(self.saved_conversations) > 4 * self.cfg.max_sessions:
            self.saved_conversations.popitem(last=False)

    def resume_conversation(self, session_id: str) -> dict | None:
        item = self.saved_conversations.pop(session_id, None)
        if item and time.monotonic() - item[0] <= self.cfg.context_resume_s:
            return item[1]
        return None

    def health(self) -> dict:
        return {
            "status": "ok", "active_sessions": len(self.sessions), "max_sessions": self.cfg.max_sessions,
            "sessions_total": self.sessions_total, "responses_total": self.responses_total,
            "model_jobs_queued": self.model_worker.pending, "uptime_s": round(time.time() - self.started, 1),
            "untrained": self.engine.untrained, "models": self.engine.describe(),
        }

    def shutdown(self) -> None:
        self.model_worker.shutdown()
        self.vad_thread.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------
# One conversation


@dataclass
class Response:
    """One agent reply as the session sees it."""

    id: int
    settings: SessionSettings
    mode: str  # the turn's mode, "stream" or "turn"
    turn_end_at: float  # perf_counter when the user's speech ended (last voiced audio arrived)
    decided_at: float  # perf_counter when the end of turn was decided
    task: asyncio.Task | None = None
    stream: ReplyStream | None = None
    sent_samples: int = 0
    first_sent_at: float | None = None
    played_ms: float | None = None  # last report from the client
    state: str = "starting"  # starting, speaking, done, interrupted
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    interrupted_at: float | None = None
    stored: bool = False


class Session:
    """One WebSocket conversation: input audio -> VAD -> turns -> replies, with its own state
    (VAD model, turn stream, reply, conversation); nothing here is shared with other sessions."""

    def __init__(self, state: ServerState, ws, session_id: str):
        self.state, self.ws, self.id = state, ws, session_id
        self.cfg, self.engine = state.cfg, state.engine
        self.settings = SessionSettings(end_of_turn_ms=self.cfg.end_of_turn_ms)
        self.audio = AudioBuffer()
        self.detector = TurnDetector(self.cfg, 1000 * VAD_CHUNK_SAMPLES / SAMPLE_RATE)
        self.vad_pending = np.zeros(0, dtype=np.float32)
        self.vad_model = None
        self.turn_start = 0  # absolute sample where the current turn's audio begins
        self.turn_mode = "stream"
        self.turn_stream: TurnStream | None = None
        self.turn_encoded = 0  # absolute sample up to which the turn has been sent to the codec
        self.last_voiced_at = time.perf_counter()
        self.response: Response | None = None
        self.last_response: Response | None = None
        self.next_response_id = 1
        self.conversation = None  # context_manager.ContextManager, owned by the model thread
        self.send_lock = asyncio.Lock()
        self.closed = False
        self.opened = time.monotonic()
        self.last_activity = time.monotonic()
        self.message_bucket = TokenBucket(self.cfg.rate_limit_messages, 2 * self.cfg.rate_limit_messages)
        self.audio_bucket = TokenBucket(self.cfg.rate_limit_audio, 30.0)
        self.last_rate_error = 0.0
        self.tasks: set[asyncio.Task] = set()

    # ----- sending (shielded: cancelling a task never cuts a frame in half)

    async def _send(self, text: str | None = None, data: bytes | None = None) -> None:
        async with self.send_lock:
            if self.closed:
                return
            try:
                if data is not None:
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_text(text)
            except Exception:  # the client went away: the receive loop ends and cleans up
                self.closed = True

    async def send_event(self, type_: str, **fields) -> None:
        await asyncio.shield(self._send(text=json.dumps({"type": type_, **fields}, ensure_ascii=False)))

    async def send_error(self, code: str, message: str) -> None:
        await self.send_event("error", code=code, message=message)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def model(self, fn, *args, deadline: float | None = None):
        """Run fn on the model thread; returns (result, queued_ms, run_ms). The job always completes
        even if this coroutine is cancelled (the model thread cannot be interrupted mid-call)."""
        return await asyncio.shield(asyncio.wrap_future(self.state.submit(fn, *args, deadline=deadline)))

    # ----- lifecycle

    async def run(self, saved: dict | None) -> None:
        loop = asyncio.get_running_loop()
        self.vad_model = await loop.run_in_executor(self.state.vad_thread, self.state.vad_pool.acquire)
        self.conversation, _, _ = await self.model(self.engine.new_conversation, self.id, saved)
        cfg, engine = self.cfg, self.engine
        await self.send_event(
            "session_created", session_id=self.id, resumed=saved is not None,
            settings=dataclasses.asdict(self.settings), sample_rate=SAMPLE_RATE,
            input={"binary": "PCM16 LE mono", "json": "base64 float32 LE mono", "vad_chunk_samples": VAD_CHUNK_SAMPLES},
            output={"chunk_samples": engine.step_samples, "codec_hop": engine.hop_length, "lead_ms": cfg.lead_ms,
                    "binary_header": "uint32 response_id, uint32 sample offset (little-endian)"},
            voices=[v.name for v in VOICES], emotions=list(EMOTIONS),
            limits={"max_message_bytes": cfg.max_message_bytes, "idle_timeout_s": cfg.idle_timeout_s,
                    "session_timeout_s": cfg.session_timeout_s, "rate_limit_messages": cfg.rate_limit_messages,
                    "rate_limit_audio": cfg.rate_limit_audio, "max_turn_s": cfg.max_turn_s},
            untrained=engine.untrained,
        )
        watchdog = self.spawn(self._watchdog())
        try:
            await self._receive_loop()
        finally:
            watchdog.cancel()
            await self._cleanup()

    async def _watchdog(self) -> None:
        while not self.closed:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            busy = self.response is not None
            if now - self.opened > self.cfg.session_timeout_s:
                await self._close("session_timeout", f"session longer than {self.cfg.session_timeout_s:g} s; reconnect")
            elif not busy and now - self.last_activity > self.cfg.idle_timeout_s:
                await self._close("idle_timeout", f"no message for {self.cfg.idle_timeout_s:g} s")

    async def _close(self, code: str, message: str) -> None:
        await self.send_error(code, message)
        self.closed = True
        with contextlib.suppress(Exception):
            await self.ws.close(code=1000 if code.endswith("timeout") else 1008)

    async def _receive_loop(self) -> None:
        while not self.closed:
            try:
                message = await self.ws.receive()
            except Exception:
                return
            if message["type"] == "websocket.disconnect":
                return
            self.last_activity = time.monotonic()
            try:
                await self._handle(message)
            except ProtocolError as e:
                await self.send_error(e.code, e.message)
            except Exception as e:  # a bug must not kill the conversation
                log.exception("session %s: error handling a message", self.id)
                await self.send_error("internal", f"{type(e).__name__}: {e}")

    async def _cleanup(self) -> None:
        """Free everything the session holds; its conversation is kept for a reconnect with the same id."""
        self.closed = True
        for task in list(self.tasks):
            task.cancel()
        if self.response is not None:
            self._stop_response(self.response)
        self._store_last_response()
        self.turn_stream = None
        if self.vad_model is not None:
            self.state.vad_thread.submit(self.state.vad_pool.release, self.vad_model)
        if self.conversation is not None:
            loop, state, session_id = asyncio.get_running_loop(), self.state, self.id
            saved = state.submit(self.engine.save_conversation, self.conversation)
            saved.add_done_callback(lambda f: f.exception() is None and loop.call_soon_threadsafe(
                state.save_conversation, session_id, f.result()[0]))

    # ----- messages

    async def _handle(self, message: dict) -> None:
        raw_bytes, text = message.get("bytes"), message.get("text")
        size = len(raw_bytes) if raw_bytes is not None else len(text or "")
        if size > self.cfg.max_message_bytes:
            raise ProtocolError("too_large", f"message of {size} bytes exceeds the {self.cfg.max_message_bytes}-byte "
                                "limit; send audio in smaller pieces (e.g. 20-100 ms each)")
        if not self.message_bucket.take():
            return await self._rate_limited("messages")
        if raw_bytes is not None:
            return await self._on_audio(decode_pcm16(raw_bytes))
        try:
            msg = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise ProtocolError("bad_json", f"message is not valid JSON ({e})") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ProtocolError("bad_message", "a JSON message must be an object with a string 'type'")
        kind = msg["type"]
        if kind == "audio":
            if msg.get("sample_rate", SAMPLE_RATE) != SAMPLE_RATE:
                raise ProtocolError("bad_sample_rate", f"audio must be {SAMPLE_RATE} Hz mono, got sample_rate "
                                    f"{msg.get('sample_rate')!r}; resample before sending")
            return await self._on_audio(decode_float32_audio(msg.get("audio")))
        if kind == "session":
            self.settings = update_settings(self.settings, {k: v for k, v in msg.items() if k != "type"})
            return await self.send_event("session_updated", settings=dataclasses.asdict(self.settings))
        if kind == "playback":
            return self._on_playback(msg)
        if kind == "commit":
            if not self.detector.force_end():
                raise ProtocolError("no_speech", "no user speech in progress: nothing to commit")
            return await self._on_turn_end(forced=True)
        if kind == "cancel":
            if self.response is not None:
                await self._interrupt(self.response, "client")
            return None
        if kind == "clear_context":
            self._store_last_response()
            await self.model(self.engine.clear_conversation, self.conversation)
            return await self.send_event("context", turns=[])
        if kind == "ping":
            return await self.send_event("pong", t=msg.get("t"))
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected one of: audio, session, "
                            "playback, commit, cancel, clear_context, ping (or binary PCM16 frames)")

    async def _rate_limited(self, what: str) -> None:
        now = time.monotonic()
        if now - self.last_rate_error > 0.5:  # one error per half second, not one per dropped message
            self.last_rate_error = now
            await self.send_error("rate_limited", f"too many {what}: limit {self.cfg.rate_limit_messages:g} "
                                  f"messages/s and {self.cfg.rate_limit_audio:g} s of audio per second; "
                                  "the message was dropped")

    def _on_playback(self, msg: dict) -> None:
        rid, played = msg.get("response_id"), msg.get("played_ms")
        if isinstance(rid, bool) or not isinstance(rid, int) or isinstance(played, bool) \
                or not isinstance(played, (int, float)) or not math.isfinite(played) or played < 0:
            raise ProtocolError("bad_message", "playback needs an integer 'response_id' and a number 'played_ms' >= 0")
        for r in (self.response, self.last_response):
            if r is not None and r.id == rid:
                r.played_ms = float(played)
                if r.state == "interrupted":
                    self._store_last_response()
                return
        if rid >= self.next_response_id:
            raise ProtocolError("bad_message", f"no response {rid} in this session")

    # ----- audio in

    async def _on_audio(self, pcm: np.ndarray) -> None:
        if not self.audio_bucket.take(len(pcm) / SAMPLE_RATE):
            return await self._rate_limited("audio")
        self.audio.append(pcm)
        self.vad_pending = np.concatenate([self.vad_pending, pcm])
        n = len(self.vad_pending) // VAD_CHUNK_SAMPLES
        if n == 0:
            return None
        chunks = self.vad_pending[: n * VAD_CHUNK_SAMPLES].reshape(n, VAD_CHUNK_SAMPLES)
        self.vad_pending = self.vad_pending[n * VAD_CHUNK_SAMPLES :]
        loop = asyncio.get_running_loop()
        probs = await loop.run_in_executor(self.state.vad_thread, vad_probabilities, self.vad_model, chunks)
        for prob in probs:
            agent_active = self.response is not None and self.response.state in ("starting", "speaking")
            event = self.detector.update(prob, agent_active, self.settings.end_of_turn_ms)
            if event == "start":
                await self._on_speech_started(agent_active)
            elif event is not None:
                await self._on_turn_end(forced=event == "end_forced")
            elif self.detector.speaking and self.detector.silence == 0:
                self.last_voiced_at = time.perf_counter()
        if self.detector.speaking:
            self._feed_turn()
        else:  # keep only what a future onset's pre-roll may need
            self.audio.drop_before(self.audio.end - 2 * SAMPLE_RATE)
        return None

    def _chunk_start(self, chunk: int) -> int:
        return chunk * VAD_CHUNK_SAMPLES

    async def _on_speech_started(self, agent_active: bool) -> None:
        d = self.detector
        self.last_voiced_at = time.perf_counter()
        if agent_active:
            await self._interrupt(self.response, "barge_in")
        self.turn_start = max(0, self._chunk_start(d.onset) - self.cfg.pre_roll_ms * SAMPLE_RATE // 1000)
        self.turn_mode = self.settings.mode
        self.turn_stream, self.turn_encoded = None, self.turn_start
        if self.turn_mode == "stream":  # fresh state objects only: no model call, no need to queue
            self.turn_stream = self.engine.new_turn_stream()
        await self.send_event("speech_started", audio_ms=round(1000 * self._chunk_start(d.onset) / SAMPLE_RATE),
                              barge_in=agent_active)

    def _voiced_end_sample(self) -> int:
        return self._chunk_start(self.detector.last_voiced + 1) + self.cfg.end_pad_ms * SAMPLE_RATE // 1000

    def _feed_turn(self, final: bool = False) -> None:
        """Stream mode: hand the turn's new audio (whole hops) to the model thread. A job is queued
        once an encoder chunk (80 ms) is waiting and none is queued yet; the reply's start job
        takes whatever is left (`final`), and the model thread runs jobs of a session in order."""
        turn = self.turn_stream
        if turn is None:
            return
        hop = self.engine.hop_length
        end = self.audio.end if final else self.turn_encoded + (self.audio.end - self.turn_encoded) // hop * hop
        audio = self.audio.get(self.turn_encoded, end)
        audio = np.pad(audio, (0, -len(audio) % hop))
        self.turn_encoded = end
        with turn.lock:
            if len(audio):
                turn.inbox.append(audio)
                turn.inbox_samples += len(audio)
            turn.push_until = -(-(self._voiced_end_sample() - self.turn_start) // hop)
            submit = not final and not turn.job_pending and turn.inbox_samples >= self.engine.encoder_chunk_samples
            turn.job_pending |= submit
        if submit:
            self.state.submit(self.engine.feed_turn, turn)

    async def _on_turn_end(self, forced: bool) -> None:
        decided = time.perf_counter()
        hop = self.engine.hop_length
        end = min(self._voiced_end_sample(), max(self.audio.end, self.turn_start + hop))
        if self.turn_stream is not None:  # the rest of the turn goes with the reply's start job
            self._feed_turn(final=True)
            end_frame = -(-(end - self.turn_start) // hop)
            turn, self.turn_stream = self.turn_stream, None
        else:
            turn, end_frame = self.audio.get(self.turn_start, end), 0
        duration_ms = round(1000 * (end - self.turn_start) / SAMPLE_RATE)
        voiced_end_ms = round(1000 * self._chunk_start(self.detector.last_voiced + 1) / SAMPLE_RATE)
        await self.send_event("speech_stopped", audio_ms=round(1000 * end / SAMPLE_RATE), duration_ms=duration_ms,
                              forced=forced, voiced_end_ms=voiced_end_ms)
        self._store_last_response()
        response = Response(self.next_response_id, dataclasses.replace(self.settings), self.turn_mode,
                            self.last_voiced_at, decided)
        self.next_response_id += 1
        self.response = response
        response.task = self.spawn(self._respond(response, turn, end_frame))

    # ----- replies

    def _request(self, response: Response, turn, end_frame: int) -> ReplyRequest:
        from speaker_embeddings import ProsodyControls, voice_mix

        s = response.settings
        if s.voice_b is not None and s.voice_weight > 0:
            speaker = voice_mix(s.voice, s.voice_b, s.voice_weight)[None]  # (1, 4) mixing weights
        else:
            speaker = torch.tensor([voice_by_name(s.voice).id])
        controls = ProsodyControls(pitch_semitones=s.pitch, energy_db=s.energy, rate=s.rate, accent_level=s.accent)
        segment = self.cfg.prosody_segment_ms * SAMPLE_RATE // 1000 if _needs_segments(controls) else 1
        step_ms = self.engine.step_ms
        return ReplyRequest(
            turn=turn, end_frame=end_frame, speaker=speaker, emotion=torch.tensor([emotion_id(s.emotion)]),
            controls=controls, segment_samples=segment, conversation=self.conversation,
            max_steps=max(1, round(1000 * self.cfg.max_reply_s / step_ms)),
            min_steps=round(self.cfg.min_reply_ms / step_ms), temperature=s.temperature, top_k=s.top_k,
        )

    async def _respond(self, response: Response, turn, end_frame: int) -> None:
        """Generate the reply on the model thread and stream it out, paced at real time plus a lead.
        Cancelled by _interrupt; the model thread's current job still completes, and the reply's
        generator is closed there afterwards."""
        state, engine = self.state, self.engine
        started = state.submit(engine.start_reply, self._request(response, turn, end_frame))
        queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, round(self.cfg.generate_ahead_ms / engine.step_ms)))
        sender = None
        try:
            (reply, audio, timings), queued_ms, _ = await asyncio.shield(asyncio.wrap_future(started))
            response.stream = reply
            timings["queue_ms"] = queued_ms
            await self.send_event("response_started", response_id=response.id, voice=response.settings.voice,
                                  emotion=response.settings.emotion, mode=response.mode, text=reply.text)
            state.responses_total += 1
            response.state = "speaking"
            sender = self.spawn(self._pace(response, queue, timings))
            generated = 0
            while audio is not None:
                await queue.put(audio)
                generated += len(audio)
                # Deadline: when the listener would run out of this reply's audio.
                deadline = (response.first_sent_at or time.perf_counter()) + generated / SAMPLE_RATE
                audio, _, _ = await self.model(engine.next_audio, response.stream, deadline=deadline)
            await queue.put(None)
            await sender
            response.state = "done"
            self.response, self.last_response = None, response
            await self.send_event("response_done", response_id=response.id,
                                  audio_ms=round(1000 * response.sent_samples / SAMPLE_RATE))
            self._store_last_response()
        except asyncio.CancelledError:
            if sender is not None:
                sender.cancel()
            raise
        except Exception as e:
            log.exception("session %s: reply %d failed", self.id, response.id)
            await self.send_error("internal", f"reply failed: {type(e).__name__}: {e}")
            if self.response is response:
                self.response = None
        finally:
            if response.stream is not None:
                state.submit(engine.close_reply, response.stream)
            else:  # cancelled while starting: close the reply once its start job is done
                started.add_done_callback(
                    lambda f: f.exception() is None and state.submit(engine.close_reply, f.result()[0][0]))
            self.last_activity = time.monotonic()

    async def _pace(self, response: Response, queue: asyncio.Queue, timings: dict) -> None:
        """Send reply audio no earlier than `lead_ms` before the listener needs it."""
        lead = self.cfg.lead_ms / 1000
        while True:
            audio = await queue.get()
            if audio is None or response.cancelled.is_set():
                return
            if response.first_sent_at is not None:
                delay = response.first_sent_at + response.sent_samples / SAMPLE_RATE - lead - time.perf_counter()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(response.cancelled.wait(), delay)
                    if response.cancelled.is_set():
                        return
            await asyncio.shield(self._send_audio(response, audio))
            if response.first_sent_at is None and response.sent_samples:
                response.first_sent_at = time.perf_counter()
                await self._report_latency(response, timings)

    async def _send_audio(self, response: Response, audio: np.ndarray) -> None:
        """One reply chunk, unless the reply was interrupted (checked under the send lock, so no
        chunk of a reply ever follows its `interrupted` event)."""
        async with self.send_lock:
            if self.closed or response.cancelled.is_set():
                return
            if response.settings.audio_format == "binary":
                frame = reply_frame(response.id, response.sent_samples, audio)
            else:
                frame = json.dumps({"type": "audio", "response_id": response.id, "offset": response.sent_samples,
                                    "audio": base64.b64encode(audio.astype("<f4").tobytes()).decode()})
            try:
                if isinstance(frame, bytes):
                    await self.ws.send_bytes(frame)
                else:
                    await self.ws.send_text(frame)
            except Exception:
                self.closed = True
                return
            response.sent_samples += len(audio)

    async def _report_latency(self, response: Response, timings: dict) -> None:
        latency = 1000 * (response.first_sent_at - response.turn_end_at)
        wait = 1000 * (response.decided_at - response.turn_end_at)
        breakdown = {"end_of_turn_wait_ms": wait, "processing_ms": latency - wait, **timings}
        breakdown = {k: round(v, 1) for k, v in breakdown.items()}
        await self.send_event("latency", response_id=response.id, latency_ms=round(latency, 1), mode=response.mode,
                              breakdown=breakdown)
        log.info("session %s response %d (%s mode): latency %.0f ms: %s", self.id, response.id, response.mode,
                 latency, ", ".join(f"{k} {v:g}" for k, v in breakdown.items()))

    def _stop_response(self, response: Response) -> None:
        response.cancelled.set()
        response.interrupted_at = time.perf_counter()
        response.state = "interrupted"
        if response.task is not None:
            response.task.cancel()
        if self.response is response:
            self.response, self.last_response = None, response

    async def _interrupt(self, response: Response, reason: str) -> None:
        """Barge-in or cancel: stop generating and sending at once, tell the client to flush, and
        remember the reply as far as the client reports it played (waiting playback_report_wait_ms
        for that report; without one, as far as real time says it can have played)."""
        detected = time.perf_counter()
        self._stop_response(response)
        await self.send_event("interrupted", response_id=response.id, reason=reason,
                              sent_ms=round(1000 * response.sent_samples / SAMPLE_RATE),
                              cancel_ms=round(1000 * (time.perf_counter() - detected), 2))
        asyncio.get_running_loop().call_later(self.cfg.playback_report_wait_ms / 1000, self._store_last_response)

    def _heard_samples(self, response: Response) -> int:
        """Reply samples the listener heard: all of a finished reply; of an interrupted one, what
        the client reported playing, else at most what real time allowed since the first chunk."""
        if response.state == "done":
            return response.sent_samples
        if response.played_ms is not None:
            return min(response.sent_samples, int(response.played_ms * SAMPLE_RATE / 1000))
        if response.first_sent_at is None:
            return 0
        # No report: the listener can have heard at most real time since the first chunk was sent.
        elapsed = response.interrupted_at - response.first_sent_at
        return min(response.sent_samples, max(0, int(elapsed * SAMPLE_RATE)))

    def _store_last_response(self) -> None:
        """Put the last finished or interrupted exchange into the conversation memory, once."""
        response = self.last_response
        if response is None or response.stored:
            return
        response.stored = True
        reply = response.stream
        if reply is None or self.conversation is None:  # interrupted while starting: nothing was generated
            return
        heard = self._heard_samples(response)
        interrupted = response.state == "interrupted"
        frames = self.engine.heard_frames(reply, heard)
        agent = torch.cat(reply.codes, dim=-1) if reply.codes else None
        now = time.perf_counter()
        agent_start_ago = None if response.first_sent_at is None else now - response.first_sent_at
        fut = self.state.submit(self.engine.store_exchange, self.conversation, reply.user_codes, agent,
                                frames if interrupted else None, now - response.turn_end_at, agent_start_ago, reply.text)
        loop = asyncio.get_running_loop()
        event = dict(response_id=response.id, heard_ms=round(1000 * heard / SAMPLE_RATE),
                     stored_agent_ms=round(1000 * (frames if agent is not None else 0) / self.engine.codec.frame_rate),
                     interrupted=interrupted)

        def stored(f: concurrent.futures.Future) -> None:
            if f.exception() is not None:
                log.error("session %s: storing response %d failed: %r", self.id, response.id, f.exception())
            elif not self.closed:
                turns = f.result()[0]
                loop.call_soon_threadsafe(lambda: self.spawn(self.send_event("context", turns=turns, **event)))

        fut.add_done_callback(stored)


# --------------------------------------------------------------------------------------
# The app


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="Telugu S2S voice agent")
    app.state.server = state

    @app.get("/")
    async def index():
        return FileResponse(state.static_dir / "index.html")

    @app.get("/health")
    async def health():
        return JSONResponse(state.health())

    @app.websocket("/ws/{session_id}")
    async def websocket(ws: WebSocket, session_id: str):
        await ws.accept()

        async def refuse(code: str, message: str, close_code: int):
            await ws.send_text(json.dumps({"type": "error", "code": code, "message": message}))
            await ws.close(code=close_code)

        if not SESSION_ID_RE.fullmatch(session_id):
            return await refuse("bad_session_id", "session id must be 1-64 characters from A-Z a-z 0-9 _ -", 1008)
        if session_id in state.sessions:
            return await refuse("session_in_use", f"session {session_id!r} is already connected; use another id", 1008)
        if len(state.sessions) >= state.cfg.max_sessions:
            return await refuse("server_full", f"the server is at its limit of {state.cfg.max_sessions} concurrent "
                                "sessions; try again later", 1013)
        session = Session(state, ws, session_id)
        state.sessions[session_id] = session
        state.sessions_total += 1
        log.info("session %s: connected (%d active)", session_id, len(state.sessions))
        try:
            await session.run(state.resume_conversation(session_id))
        finally:
            state.sessions.pop(session_id, None)
            log.info("session %s: closed (%d active)", session_id, len(state.sessions))

    app.mount("/static/samples", StaticFiles(directory=state.samples_dir, check_dir=False), name="samples")
    app.mount("/static", StaticFiles(directory=state.static_dir, check_dir=False), name="static")
    return app


# --------------------------------------------------------------------------------------
# Sample questions for the page


def build_samples(out_dir: Path = SAMPLES_DIR, count: int = 5, seed: int = 0) -> list[dict]:
    """Render `count` Telugu questions from data/dialogs_te.yaml (one per category, in a user voice
    the models never trained on) into out_dir/*.wav plus out_dir/index.json, which the page reads."""
    from audio_io import save_audio, write_json
    from make_telugu_speech import USER_VOICES, load_dialogs, synthesize_user

    if not 1 <= count <= 12:
        raise ValueError(f"--sample_count must be in 1..12, got {count}")
    dialogs = load_dialogs()
    seen, picked = set(), []
    for intent in dialogs.intents:
        if intent.category not in seen:
            seen.add(intent.category)
            picked.append(intent)
    picked = picked[:count]
    held_out = [name for name, v in USER_VOICES.items() if v.split == "test"]
    index = []
    for i, intent in enumerate(picked):
        text = intent.questions[0]
        voice = held_out[i % len(held_out)]
        wav = synthesize_user(text, voice, seed=seed + i, augment_audio=False)
        name = f"q{i + 1}_{intent.id}.wav"
        save_audio(out_dir / name, wav)
        index.append({"file": name, "text": text, "intent_id": intent.id, "category": intent.category,
                      "user_voice": voice, "duration_s": round(len(wav) / SAMPLE_RATE, 2)})
    write_json(out_dir / "index.json", index)
    return index


def ensure_samples(mode: str, out_dir: Path, count: int) -> None:
    if mode == "off" or (mode == "auto" and (out_dir / "index.json").is_file()):
        return
    try:
        index = build_samples(out_dir, count)
        log.info("rendered %d sample questions into %s", len(index), out_dir)
    except Exception as e:  # festival / espeak-ng missing: the page works without samples
        if mode == "build":
            raise
        log.warning("could not render the sample questions (%s); the page will have none. "
                    "Install festival festvox-te-nsk espeak-ng and run --build_samples", e)


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=str(DEMO_MODEL_DIR),
                        help="folder with codec/ and s2s/ (default: the shipped checkpoints/demo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads for the models (0: cores - 1, 1 to 4)")
    parser.add_argument("--allow-untrained", "--allow_untrained", dest="allow_untrained", action="store_true",
                        help="TESTS ONLY: without weights, serve random models (their replies are noise)")
    parser.add_argument("--untrained_preset", default="tiny", choices=("tiny", "demo"),
                        help="size of the random models of --allow-untrained")
    parser.add_argument("--samples", default="auto", choices=("auto", "build", "off"),
                        help="sample questions for the page: render at start-up when missing (auto), always (build), never (off)")
    parser.add_argument("--sample_count", type=int, default=5, help="how many sample questions to render")
    parser.add_argument("--samples_dir", default=str(SAMPLES_DIR),
                        help="where the sample questions live, served at /static/samples/ (generated, git-ignored)")
    parser.add_argument("--build_samples", action="store_true", help="render the sample questions and exit")
    parser.add_argument("--log_level", default="info", help="debug, info, warning")
    for f in dataclasses.fields(ServerConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                            help=f"{f.metadata['help']} (default {f.default})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.build_samples:
        samples_dir = Path(args.samples_dir)
        index = build_samples(samples_dir, args.sample_count)
        for item in index:
            print(f"{samples_dir / item['file']}  {item['duration_s']:.2f} s  {item['text']}")
        print(f"index: {samples_dir / 'index.json'}")
        return
    if not (1 <= args.port <= 65535):
        parser.error(f"--port must be in 1..65535, got {args.port}")
    cfg = ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available here; use --device cpu")
    torch.set_num_threads(args.threads or default_model_threads())

    engine = AgentEngine.load(Path(args.model_dir), device, args.allow_untrained, args.untrained_preset)
    log.info("models: %s", json.dumps(engine.describe()))
    log.info("warm-up reply in %.2f s; frame: codec hop %d samples, reply chunk %d samples, VAD chunk %d samples",
             engine.warmup(), engine.hop_length, engine.step_samples, VAD_CHUNK_SAMPLES)
    ensure_samples(args.samples, Path(args.samples_dir), args.sample_count)
    state = ServerState(cfg, engine, samples_dir=Path(args.samples_dir))
    app = create_app(state)

    import uvicorn

    log.info("serving on http://%s:%d (page at /, WebSocket at /ws/{session_id})", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, ws_max_size=4 * cfg.max_message_bytes,
                log_level=args.log_level.lower(), ws_per_message_deflate=False)
    state.shutdown()


if __name__ == "__main__":
    main()
