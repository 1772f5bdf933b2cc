"""Conversation memory of one session: the last 10 turns as codec codes, fed to the S2S model.

Each turn keeps who spoke (user / agent), the codec codes (K, F) of what was said, its start and
end on the session clock (seconds), and for agent turns whether the user interrupted: then only
what the user actually heard is kept (the first `heard` frames), since that is what the
conversation contains, and `generated_frames` remembers how much had been generated. An agent
turn also keeps the words its model wrote before speaking (`text`, inner monologue), whole.

Budget: at most `max_turns` turns (10; the model's S2SConfig.max_context_turns) and `max_frames`
codec frames over all kept turns (6000 = 30 s at 200 frames/s: the decoder cross-attends to all
of it at every step, so it is a compute budget). When over budget the oldest turns are dropped;
a single turn longer than the whole budget is cut to its first `max_frames` frames.

Serialisation: `to_json()` / `from_json()` (and `save(path)` / `load(path)`, atomic) hold
everything, codes as base64 int16, so a session resumes after a restart or a reconnect.

Model input: `model_context()` gives the ContextTurns the S2S model takes as `context` (None
before the first exchange); `context_memory(model)` gives it encoded, cached until the turns
change, so the encoding can happen while the user speaks rather than after the turn ends.

Usage:
    ctx = ContextManager()
    ctx.add_user_turn(user_codes)                           # (8, F) or (1, 8, F)
    ctx.add_agent_turn(reply_codes, interrupted=True, heard_s=1.2)
    for chunk in s2s.generate_streaming(codes, spk, emo, context=ctx.context_memory(s2s)): ...
    ctx.save("session.json"); ctx = ContextManager.load("session.json")
    python context_manager.py                               # a demo session, printed
"""

from __future__ import annotations

import argparse
import base64
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from audio_io import atomic_write, read_json

ROLES = ("user", "agent")  # index = the model's role id (s2s_transformer.ROLE_USER / ROLE_AGENT)
FORMAT_VERSION = 1


@dataclass
class Turn:
    """One turn: `codes` (K, F) int64 is what was said (for an interrupted agent turn, what was
    heard); times are seconds on the session clock."""

    role: str
    codes: torch.Tensor
    start_s: float
    end_s: float
    interrupted: bool = False
    generated_frames: int | None = None  # agent turns: frames generated (>= frames kept when interrupted)
    truncated: bool = False  # cut to the frame budget
    turn_id: int = 0
    # agent turns: the words the model wrote before speaking (its inner monologue), all of them even
    # when the user heard only part: what the agent meant to say, for "repeat that"; None: unknown
    text: str | None = None

    @property
    def n_frames(self) -> int:
        return int(self.codes.shape[-1])

    def to_dict(self) -> dict:
        codes = self.codes.to(torch.int16).numpy()
        return {
            "turn_id": self.turn_id, "role": self.role, "start_s": self.start_s, "end_s": self.end_s,
            "interrupted": self.interrupted, "generated_frames": self.generated_frames, "truncated": self.truncated,
            "shape": list(codes.shape), "codes": base64.b64encode(codes.astype("<i2").tobytes()).decode("ascii"),
            "text": self.text,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Turn:
        raw = np.frombuffer(base64.b64decode(d["codes"]), dtype="<i2").reshape(d["shape"])
        return cls(d["role"], torch.from_numpy(raw.astype(np.int64)), float(d["start_s"]), float(d["end_s"]),
                   bool(d["interrupted"]), d["generated_frames"], bool(d["truncated"]), int(d["turn_id"]), d.get("text"))


class ContextManager:
    """Per-session memory of the last `max_turns` turns within a `max_frames` budget."""

    def __init__(self, max_turns: int = 10, max_frames: int = 6000, n_codebooks: int = 8, codebook_size: int = 1024,
                 frame_rate: float = 200.0, session_id: str | None = None):
        if max_turns < 1 or max_frames < 1:
            raise ValueError("max_turns and max_frames must be >= 1")
        self.max_turns, self.max_frames = max_turns, max_frames
        self.n_codebooks, self.codebook_size, self.frame_rate = n_codebooks, codebook_size, frame_rate
        self.session_id = session_id or uuid.uuid4().hex[:12]
        self.turns: list[Turn] = []
        self.next_turn_id = 0
        self.dropped_turns = 0
        self._clock_origin = time.monotonic()
        self._clock_offset = 0.0  # session time already elapsed before a resume
        self._version = 0  # bumped on every change: invalidates the cached encoding
        self._memory_cache: tuple | None = None

    # ----- time

    def now(self) -> float:
        """Seconds since the session started (continues across save / load)."""
        return self._clock_offset + time.monotonic() - self._clock_origin

    # ----- adding turns

    def _codes(self, codes) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"turn codes must be a LongTensor ({self.n_codebooks}, F); got {type(codes).__name__}")
        if codes.dim() == 3 and codes.shape[0] == 1:
            codes = codes[0]
        if codes.dim() != 2 or codes.shape[0] != self.n_codebooks:
            raise ValueError(f"turn codes must have shape ({self.n_codebooks}, F) or (1, {self.n_codebooks}, F); "
                             f"got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"turn codes must be integer codec codes, got {codes.dtype}")
        if codes.shape[1] and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"turn codes outside 0..{self.codebook_size - 1}")
        return codes.detach().to("cpu", torch.long).clone()

    def _add(self, turn: Turn) -> Turn:
        if turn.n_frames == 0:
            return turn  # nothing was said (or nothing heard): not part of the conversation
        turn.turn_id = self.next_turn_id
        self.next_turn_id += 1
        self.turns.append(turn)
        self._enforce_budget()
        self._version += 1
        return turn

    def _times(self, codes: torch.Tensor, start_s, end_s) -> tuple[float, float]:
        """Missing times follow from the turn's duration; with neither, the turn has just ended."""
        duration = codes.shape[-1] / self.frame_rate
        if end_s is None:
            end = self.now() if start_s is None else float(start_s) + duration
        else:
            end = float(end_s)
        start = end - duration if start_s is None else float(start_s)
        if end < start:
            raise ValueError(f"turn ends ({end}) before it starts ({start})")
        return start, end

    def add_user_turn(self, codes: torch.Tensor, start_s: float | None = None, end_s: float | None = None) -> Turn:
        """Remember what the user said. Times default to 'it just ended' on the session clock."""
        codes = self._codes(codes)
        return self._add(Turn("user", codes, *self._times(codes, start_s, end_s)))

    def add_agent_turn(self, codes: torch.Tensor, start_s: float | None = None, end_s: float | None = None,
                       interrupted: bool = False, heard_frames: int | None = None,
                       heard_s: float | None = None, text: str | None = None) -> Turn:
        """Remember the agent's reply, and `text`, the words it wrote before speaking (if its model
        has an inner monologue). When the user interrupted, pass `heard_frames` (or `heard_s`,
        seconds of playback): only that much audio is kept."""
        codes = self._codes(codes)
        generated = codes.shape[-1]
        heard = self._heard(generated, heard_frames, heard_s)
        if heard is not None:
            interrupted = True
        elif interrupted:
            raise ValueError("an interrupted agent turn needs heard_frames or heard_s (how much the user heard)")
        kept = codes[:, :heard] if heard is not None else codes
        return self._add(Turn("agent", kept, *self._times(kept, start_s, end_s), interrupted, generated, text=text))

    def _heard(self, generated: int, heard_frames, heard_s) -> int | None:
        if heard_frames is None and heard_s is None:
            return None
        heard = int(heard_frames) if heard_frames is not None else int(round(float(heard_s) * self.frame_rate))
        if heard < 0:
            raise ValueError(f"heard must be >= 0, got {heard}")
        return min(heard, generated)

    def mark_interrupted(self, heard_frames: int | None = None, heard_s: float | None = None) -> Turn:
        """The user cut the latest agent turn off after hearing `heard_frames` (or `heard_s`)."""
        if not self.turns or self.turns[-1].role != "agent":
            raise ValueError("mark_interrupted: the latest turn is not an agent turn")
        turn = self.turns[-1]
        generated = turn.generated_frames if turn.generated_frames is not None else turn.n_frames
        heard = self._heard(turn.n_frames, heard_frames, heard_s)
        if heard is None:
            raise ValueError("mark_interrupted needs heard_frames or heard_s")
        turn.codes = turn.codes[:, :heard]
        turn.interrupted, turn.generated_frames = True, generated
        turn.end_s = turn.start_s + heard / self.frame_rate
        if heard == 0:
            self.turns.pop()
        self._version += 1
        return turn

    def _enforce_budget(self) -> None:
        while len(self.turns) > self.max_turns or (len(self.turns) > 1 and self.total_frames > self.max_frames):
            self.turns.pop(0)
            self.dropped_turns += 1
        if self.total_frames > self.max_frames:  # one turn longer than the whole budget
            turn = self.turns[0]
            turn.codes, turn.truncated = turn.codes[:, : self.max_frames], True

    def clear(self) -> None:
        self.turns.clear()
        self._version += 1

    @property
    def total_frames(self) -> int:
        return sum(t.n_frames for t in self.turns)

    def __len__(self) -> int:
        return len(self.turns)

    # ----- model input

    def model_context(self):
        """The turns as the S2S model's `context` (ContextTurns, one conversation), or None."""
        from s2s_transformer import ContextTurns

        if not self.turns:
            return None
        return ContextTurns.from_turns([[(ROLES.index(t.role), t.codes, t.text) for t in self.turns]])

    def context_memory(self, model):
        """model.prepare_context(model_context()): the turns encoded, cross-attention K/V included,
        cached until the turns change. Call it while the user is speaking: the reply then only
        concatenates it."""
        if not self.turns:
            return None
        key = (id(model), self._version)
        if self._memory_cache is None or self._memory_cache[0] != key:
            self._memory_cache = (key, model.prepare_context(self.model_context()))
        return self._memory_cache[1]

    # ----- serialisation

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION, "session_id": self.session_id, "max_turns": self.max_turns,
            "max_frames": self.max_frames, "n_codebooks": self.n_codebooks, "codebook_size": self.codebook_size,
            "frame_rate": self.frame_rate, "next_turn_id": self.next_turn_id, "dropped_turns": self.dropped_turns,
            "clock_s": self.now(), "turns": [t.to_dict() for t in self.turns],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ContextManager:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"context format {d.get('format_version')!r} is not {FORMAT_VERSION}; "
                             "it was written by another version of context_manager.py")
        ctx = cls(d["max_turns"], d["max_frames"], d["n_codebooks"], d["codebook_size"], d["frame_rate"], d["session_id"])
        ctx.turns = [Turn.from_dict(t) for t in d["turns"]]
        ctx.next_turn_id, ctx.dropped_turns = d["next_turn_id"], d["dropped_turns"]
        ctx._clock_offset = float(d["clock_s"])
        return ctx

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ContextManager:
        try:
            return cls.from_dict(json.loads(text))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a saved conversation context ({e!r})") from e

    def save(self, path) -> None:
        with atomic_write(path) as tmp:
            Path(tmp).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path) -> ContextManager:
        return cls.from_dict(read_json(path))

    def summary(self) -> str:
        lines = [f"session {self.session_id}: {len(self.turns)} turns, {self.total_frames} frames "
                 f"({self.total_frames / self.frame_rate:.1f} s), {self.dropped_turns} dropped"]
        for t in self.turns:
            flag = f" interrupted ({t.n_frames}/{t.generated_frames} frames heard)" if t.interrupted else ""
            lines.append(f"  #{t.turn_id} {t.role:5s} {t.start_s:7.2f}-{t.end_s:7.2f} s {t.n_frames:5d} frames{flag}")
        return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a demo session through the context manager and print it.")
    parser.add_argument("--turns", type=int, default=14, help="turns to add (more than max_turns shows dropping)")
    parser.add_argument("--max_turns", type=int, default=10, help="turns kept")
    parser.add_argument("--max_frames", type=int, default=6000, help="frame budget over all kept turns")
    parser.add_argument("--save", default=None, help="write the session JSON here")
    args = parser.parse_args()

    ctx = ContextManager(args.max_turns, args.max_frames)
    g = torch.Generator().manual_seed(0)
    clock = 0.0
    for i in range(args.turns):
        n = int(torch.randint(200, 800, (1,), generator=g))
        codes = torch.randint(0, 1024, (8, n), generator=g)
        if i % 2 == 0:
            ctx.add_user_turn(codes, clock, clock + n / 200)
        elif i % 6 == 5:
            ctx.add_agent_turn(codes, clock, None, heard_frames=n // 3)
        else:
            ctx.add_agent_turn(codes, clock, clock + n / 200)
        clock += n / 200 + 0.3
    print(ctx.summary())
    context = ctx.model_context()
    print(f"model context: codes {tuple(context.codes.shape)}, roles {context.roles.tolist()}, ages {context.ages.tolist()}")
    start = time.perf_counter()
    text = ctx.to_json()
    again = ContextManager.from_json(text)
    print(f"JSON: {len(text) / 1024:.0f} KiB, round trip {1000 * (time.perf_counter() - start):.1f} ms, "
          f"equal: {all(torch.equal(a.codes, b.codes) for a, b in zip(ctx.turns, again.turns))}")
    if args.save:
        ctx.save(args.save)
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
