"""Context manager: the 10-turn limit, the frame budget, interruption truncation, JSON round trip,
and the model input it produces."""

from __future__ import annotations

import pytest
import torch

from context_manager import ContextManager
from s2s_transformer import ROLE_AGENT, ROLE_USER, S2SConfig, TeluguS2STransformer


def codes(n_frames: int, value: int | None = None, seed: int = 0) -> torch.Tensor:
    if value is not None:
        return torch.full((8, n_frames), value, dtype=torch.long)
    return torch.randint(0, 1024, (8, n_frames), generator=torch.Generator().manual_seed(seed))


def test_keeps_the_last_ten_turns_in_order():
    ctx = ContextManager()
    for i in range(13):
        add = ctx.add_user_turn if i % 2 == 0 else ctx.add_agent_turn
        add(codes(10, value=i), start_s=float(i), end_s=i + 0.05)
    assert len(ctx) == 10 and ctx.dropped_turns == 3
    assert [int(t.codes[0, 0]) for t in ctx.turns] == list(range(3, 13))
    assert [t.turn_id for t in ctx.turns] == list(range(3, 13))
    context = ctx.model_context()
    assert context.ages.tolist() == list(range(10, 0, -1))  # the latest earlier turn has age 1
    assert context.roles.tolist() == [ROLE_AGENT if i % 2 else ROLE_USER for i in range(3, 13)]
    assert torch.equal(context.codes[-1, :, :10], codes(10, value=12))


def test_frame_budget_drops_oldest_turns_and_cuts_a_huge_one():
    ctx = ContextManager(max_frames=1000)
    ctx.add_user_turn(codes(400, value=1))
    ctx.add_agent_turn(codes(400, value=2))
    ctx.add_user_turn(codes(300, value=3))  # 1100 > 1000: the oldest goes
    assert [int(t.codes[0, 0]) for t in ctx.turns] == [2, 3] and ctx.total_frames == 700
    ctx.add_agent_turn(codes(2500, value=4))  # alone over budget: everything else goes, it is cut
    assert len(ctx) == 1 and ctx.turns[0].n_frames == 1000 and ctx.turns[0].truncated
    assert ctx.total_frames <= ctx.max_frames


def test_interrupted_agent_turn_keeps_only_what_was_heard():
    ctx = ContextManager()
    ctx.add_user_turn(codes(100, seed=1), start_s=0.0, end_s=0.5)
    reply = codes(600, seed=2)
    turn = ctx.add_agent_turn(reply, start_s=0.8, heard_s=1.25)  # 250 frames at 200 frames/s
    assert turn.interrupted and turn.generated_frames == 600 and turn.n_frames == 250
    assert torch.equal(turn.codes, reply[:, :250]) and turn.end_s == pytest.approx(0.8 + 1.25)
    # interruption known only after the turn was stored (the server learns it from playback)
    later = ctx.add_agent_turn(codes(400, seed=3), start_s=3.0)
    ctx.mark_interrupted(heard_frames=120)
    assert later.interrupted and later.n_frames == 120 and later.generated_frames == 400
    assert ctx.model_context().lengths.tolist() == [100, 250, 120]
    # nothing heard: the turn is not part of the conversation
    ctx.add_agent_turn(codes(50, seed=4), heard_frames=0)
    assert len(ctx) == 3
    with pytest.raises(ValueError, match="heard"):
        ctx.add_agent_turn(codes(50), interrupted=True)


def test_json_round_trip_resumes_the_session(tmp_path):
    ctx = ContextManager(max_turns=4, session_id="s1")
    for i in range(6):
        ctx.add_user_turn(codes(30 + i, seed=i), start_s=i, end_s=i + 0.2) if i % 2 == 0 else \
            ctx.add_agent_turn(codes(40, seed=i), start_s=i, heard_frames=25, text=f"మాట {i}" if i > 1 else None)
    ctx.save(tmp_path / "session.json")
    again = ContextManager.load(tmp_path / "session.json")
    # an agent turn keeps its words whole (heard or not); the model reads them with the codes
    assert [t.text for t in again.turns] == [None, "మాట 3", None, "మాట 5"]
    assert again.model_context().texts == [None, "మాట 3", None, "మాట 5"]
    assert again.session_id == "s1" and again.max_turns == 4 and again.dropped_turns == ctx.dropped_turns
    assert [t.to_dict() for t in again.turns] == [t.to_dict() for t in ctx.turns]
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(ctx.turns, again.turns))
    assert again.now() >= ctx.turns[-1].end_s - 10  # the clock continues from the saved time
    again.add_user_turn(codes(10))  # and the session goes on: ids continue, the limit holds
    assert again.turns[-1].turn_id == 6 and len(again) == 4
    with pytest.raises(ValueError, match="not a saved conversation"):
        ContextManager.from_json('{"format_version": 1}')


def test_bad_codes_are_rejected():
    ctx = ContextManager()
    with pytest.raises(ValueError, match=r"\(8, F\)"):
        ctx.add_user_turn(torch.zeros(4, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        ctx.add_user_turn(torch.full((8, 10), 1024))
    with pytest.raises(ValueError, match="integer"):
        ctx.add_user_turn(torch.zeros(8, 10))
    assert ctx.model_context() is None and ctx.context_memory(object()) is None


def test_context_memory_feeds_the_model_and_is_cached():
    torch.manual_seed(0)
    model = TeluguS2STransformer(S2SConfig.preset("tiny", codebook_size=1024)).eval()
    ctx = ContextManager()
    ctx.add_user_turn(codes(40, seed=1))
    ctx.add_agent_turn(codes(60, seed=2))
    memory = ctx.context_memory(model)
    assert memory is ctx.context_memory(model)  # unchanged turns: the cached encoding
    assert memory.vectors.shape == (1, 10 + 15, model.config.hidden_dim)  # 40 / 4 + 60 / 4 steps
    user, ids = codes(20, seed=3)[None], torch.tensor([0])
    with torch.no_grad():
        a = model.generate(user, ids, ids, max_new_tokens=3, min_new_tokens=3, temperature=0, context=memory)[0]
        b = model.generate(user, ids, ids, max_new_tokens=3, min_new_tokens=3, temperature=0,
                           context=ctx.model_context())[0]
    assert torch.equal(a, b)
    ctx.add_user_turn(codes(8, seed=4))
    assert ctx.context_memory(model) is not memory  # a new turn: encoded again
