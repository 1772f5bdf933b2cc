"""The whole system against the mission's success criteria, one line per criterion, in one command.

Checks, each printed with its measured number and its target (the seed plan's Phase 7 and
Success Criteria):
     1 Codec quality     SNR (and PESQ-WB, STOI) of the test audio coded and decoded        > 25 dB
     2 Codec bitrate                                                                        14-18 kbps
     3 Codec latency     streaming encode and decode per 20 ms chunk, median after warm-up  < 10 ms each
     4 S2S latency       first chunk: the turn fed to the encoder 20 ms at a time while
                         "spoken", with a 10-turn context prepared; end of turn -> first codes  < 150 ms
     5 S2S quality       reply accuracy on the test split of --data_dir (evaluate_agent.py's measure:
                         the reply's nearest answer rendering by DTW over log-mel is the intended
                         one), --quality_pairs questions; not checked without --data_dir     >= 90%
     6 Emotions          9 emotions loaded, and the reply changes with the emotion
     7 Speakers          4 voices loaded, and distinct in generated replies: resemblyzer nearest-centroid
                         against the corpus's agent recordings (--data_dir), else leave-one-out among
                         the replies themselves                                              >= 95% correct
     8 End-to-end        over a real WebSocket to a server started here on 127.0.0.1, speech at
                         real time in 20 ms frames, stream mode: last voiced sample sent -> first
                         reply audio received, median of --e2e_turns turns                   < 400 ms
     9 Full-duplex       speaking over the reply interrupts it, and no reply audio follows
    10 Context           ContextManager keeps exactly the last 10 turns, round-trips JSON, all 10
                         reach the model's memory, and the reply changes with the context
    11 Stability         1 hour without a crash: not checked here (a long benchmark_latency.py run is)

A failing check makes the exit status 1. With --allow-untrained and no weights in --model_dir the
models are random: latencies are still measured and judged, but the quality checks (1, 7) are
reported as "untrained: not judged" (reply accuracy is not even computed), and the run says so
loudly.

Usage:
    python system_test.py                                          # checkpoints/demo, a rendered test question
    python system_test.py --model_dir /workspace/models --test_audio question.wav --device cuda
    python system_test.py --data_dir workspace/telugu_synth        # a corpus test question, corpus voice references
    python system_test.py --allow-untrained --untrained_preset demo   # random models: latency only
    python system_test.py --checks codec_latency s2s_latency       # a subset

Writes the JSON report (--report): every number, the machine, the models' identities.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import audio_metrics
import benchmark_latency as bl
import evaluate_agent as ev
from evaluate_agent import unit, voice_encoder
import streaming_server_advanced  # silero-vad, which it imports, sets torch's thread count: before we choose ours
from audio_io import load_audio, read_manifest, write_json
from config import (DEMO_MODEL_DIR, EMOTIONS, SAMPLE_RATE, VOICES, add_workspace_arg, config_to_dict,
                    default_model_threads, workspace_from_args)
from benchmark_s2s import run_once, sync
from context_manager import ContextManager
from s2s_transformer import CHECKPOINT_NAMES, S2SConfig, TeluguS2STransformer
from telugu_codec import CodecConfig, TeluCodec, count_parameters, streaming_chunk_times

# --------------------------------------------------------------------------------------
# Results


SYMBOLS = {"PASS": "✓", "FAIL": "✗", "ERROR": "✗", "NOT_JUDGED": "?", "NOT_CHECKED": "–"}
CHECKS = {  # key: (number, name as printed), in the mission's order
    "codec_quality": (1, "Codec quality"), "codec_bitrate": (2, "Codec bitrate"), "codec_latency": (3, "Codec latency"),
    "s2s_latency": (4, "S2S Model"), "s2s_quality": (5, "S2S quality"), "emotions": (6, "Emotions"),
    "speakers": (7, "Speakers"), "e2e": (8, "End-to-end"), "full_duplex": (9, "Full-duplex"), "context": (10, "Context"),
    "stability": (11, "Stability"),
}


@dataclass
class Check:
    number: int
    key: str
    name: str  # as printed
    status: str  # PASS, FAIL, ERROR, NOT_JUDGED (untrained models), NOT_CHECKED
    summary: str  # the measured numbers, one line
    target: str
    values: dict = field(default_factory=dict)

    def line(self) -> str:
        verdict = {
            "PASS": f"PASS {self.target}", "FAIL": f"FAIL, target {self.target}", "ERROR": "ERROR",
            "NOT_JUDGED": f"untrained: not judged; target {self.target}", "NOT_CHECKED": "not checked",
        }[self.status]
        return f"{SYMBOLS[self.status]} {self.number:2d} {self.name}: {self.summary} ({verdict})"


def judged(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def result(key: str, status: str, summary: str, target: str = "", values: dict | None = None) -> Check:
    number, name = CHECKS[key]
    return Check(number, key, name, status, summary, target, values or {})


def run_check(key: str, fn, *args) -> Check:
    """fn(*args), or an ERROR result with the exception: one broken check must not hide the others."""
    try:
        return fn(*args)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - reported as the check's result
        traceback.print_exc()
        return result(key, "ERROR", f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------
# Models


@dataclass
class Setup:
    """What every check gets: the models, the test audio and its codes, the settings."""

    codec: TeluCodec
    s2s: TeluguS2STransformer
    device: torch.device
    untrained: bool
    utterance: bl.Utterance  # the test question
    codes: torch.Tensor  # (1, K, F) its codec codes, on the device
    args: argparse.Namespace


def file_identity(directory: Path, names: tuple[str, ...]) -> dict:
    """The weights file(s) a model folder is loaded from, their size and SHA-256 (of all of them,
    in order, for a sharded model)."""
    from training import weight_files

    files = weight_files(directory) or [p for p in (directory / n for n in names) if p.is_file()][:1]
    if files:
        digest = hashlib.sha256()
        for path in files:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        return {"file": ", ".join(str(p) for p in files), "bytes": sum(p.stat().st_size for p in files),
                "sha256": digest.hexdigest()}
    return {}


def load_models(model_dir: Path, device: torch.device, allow_untrained: bool, preset: str):
    """(codec, s2s, identity): trained models from <model_dir>/codec and /s2s, or, with
    allow_untrained and no weights there, random ones of `preset` seeded as the server seeds them
    (so they equal the server's)."""
    if bl.trained_models_present(model_dir):
        codec = TeluCodec.from_pretrained(model_dir / "codec", map_location=device)
        s2s = TeluguS2STransformer.from_pretrained(model_dir / "s2s", map_location=device)
        source, untrained = str(model_dir), False
        files = {"codec": file_identity(model_dir / "codec", TeluCodec.CHECKPOINT_NAMES),
                 "s2s": file_identity(model_dir / "s2s", CHECKPOINT_NAMES)}
    elif allow_untrained:
        torch.manual_seed(0)
        codec = TeluCodec(CodecConfig.preset(preset)).fold_weight_norm().eval().to(device)
        s2s = TeluguS2STransformer(S2SConfig.preset(preset)).eval().to(device)
        source, untrained = f"untrained:{preset}", True
        files = {"codec": {"random_seed": 0}, "s2s": {"random_seed": 0}}
    else:
        raise SystemExit(streaming_server_advanced.missing_weights_message(model_dir, model_dir / "codec", model_dir / "s2s")
                         .replace("streaming_server_advanced.py", "system_test.py"))
    identity = {
        "source": source, "untrained": untrained,
        "codec": {**files["codec"], "parameters": count_parameters(codec), "config": config_to_dict(codec.config)},
        "s2s": {**files["s2s"], "parameters": s2s.num_parameters(), "config": config_to_dict(s2s.config)},
    }
    return codec, s2s, identity


class SyncedCodec:
    """The codec with a device synchronisation after every encode and decode, so that
    streaming_chunk_times measures GPU work rather than kernel launches."""

    def __init__(self, codec: TeluCodec, device: torch.device):
        self.codec, self.device = codec, device

    def streaming(self, batch_size: int = 1):
        return self.codec.streaming(batch_size)

    def encode(self, wav):
        out = self.codec.encode(wav)
        sync(self.device)
        return out

    def decode(self, codes):
        out = self.codec.decode(codes)
        sync(self.device)
        return out


def reply_audio(setup: Setup, speaker: int, emotion: int, seed: int, temperature: float = 0.8) -> np.ndarray:
    """A reply to the test turn decoded to audio (T,). Random models get a fixed 1 s (their stop
    head is noise); trained ones stop on their own between 0.5 and 4 s."""
    steps_per_s = round(1000 / setup.s2s.config.step_ms)
    lo, hi = (steps_per_s, steps_per_s) if setup.untrained else (steps_per_s // 2, 4 * steps_per_s)
    torch.manual_seed(seed)
    codes = setup.s2s.generate(setup.codes, torch.tensor([speaker]), torch.tensor([emotion]), max_new_tokens=hi,
                               min_new_tokens=lo, temperature=temperature, top_k=50)[0]
    with torch.inference_mode():
        return setup.codec.decode(codes[None].to(setup.device))[0, 0].float().cpu().numpy()


def greedy_reply(setup: Setup, steps: int, speaker: int = 0, emotion: int = 0, context=None) -> torch.Tensor:
    """(K, steps * frames_per_step) greedy codes: the same inputs always give the same reply."""
    return setup.s2s.generate(setup.codes, torch.tensor([speaker]), torch.tensor([emotion]), max_new_tokens=steps,
                              min_new_tokens=steps, temperature=0.0, context=context)[0]


def filled_context(setup: Setup, n_turns: int, seed: int = 0) -> tuple[ContextManager, list[torch.Tensor]]:
    """A ContextManager as the server makes it, fed `n_turns` alternating turns of 1 to 2 s of
    random codes (one agent turn interrupted); returns it and the codes added, oldest first."""
    s2s, codec = setup.s2s, setup.codec
    ctx = ContextManager(max_turns=s2s.config.max_context_turns, n_codebooks=codec.n_codebooks,
                         codebook_size=codec.codebook_size, frame_rate=codec.frame_rate, session_id="system_test")
    g = torch.Generator().manual_seed(seed)
    added = []
    for i in range(n_turns):
        frames = int(torch.randint(int(codec.frame_rate), int(2 * codec.frame_rate), (1,), generator=g))
        codes = torch.randint(0, codec.codebook_size, (codec.n_codebooks, frames), generator=g)
        if i % 2 == 0:
            ctx.add_user_turn(codes)
        elif i == 5:
            ctx.add_agent_turn(codes, heard_frames=frames // 2)
            codes = codes[:, : frames // 2]
        else:
            ctx.add_agent_turn(codes)
        added.append(codes)
    return ctx, added


# --------------------------------------------------------------------------------------
# The checks


def check_codec_quality(setup: Setup) -> Check:
    wav = setup.utterance.audio
    with torch.inference_mode():
        x = torch.from_numpy(wav).to(setup.device)[None, None]
        decoded = setup.codec.decode(setup.codec.encode(x))[0, 0, : len(wav)].float().cpu().numpy()
    m = audio_metrics.all_metrics(wav, decoded)
    target = setup.args.target_snr_db
    status = "NOT_JUDGED" if setup.untrained else judged(m["snr"] > target)
    summary = (f"SNR={m['snr']:.1f} dB, SI-SDR {m['si_sdr']:.1f} dB, PESQ-WB {m['pesq_wb']:.2f}, "
               f"STOI {m['stoi']:.3f} on {len(wav) / SAMPLE_RATE:.1f} s")
    return result("codec_quality", status, summary, f">{target:g} dB SNR", m)


def check_codec_bitrate(setup: Setup) -> Check:
    kbps = setup.codec.calculate_bitrate()
    lo, hi = setup.args.target_kbps
    c = setup.codec
    summary = f"{kbps:.1f} kbps ({c.n_codebooks} codebooks x {math.log2(c.codebook_size):g} bits x {c.frame_rate:g} Hz)"
    return result("codec_bitrate", judged(lo <= kbps <= hi), summary, f"{lo:g}-{hi:g} kbps", {"kbps": kbps})


def check_codec_latency(setup: Setup) -> Check:
    args, device = setup.args, setup.device
    need = int(args.codec_timing_s * SAMPLE_RATE)
    audio = setup.utterance.audio
    wav = np.tile(audio, math.ceil(need / len(audio)))[:need]
    x = torch.from_numpy(wav).to(device)[None, None]
    codec = setup.codec if device.type == "cpu" else SyncedCodec(setup.codec, device)
    with torch.inference_mode():
        enc, dec = streaming_chunk_times(codec, x, chunk_samples=320, warmup=50)
    enc_ms, dec_ms = 1000 * np.asarray(enc), 1000 * np.asarray(dec)
    values = {
        "chunks": len(enc), "chunk_ms": 20.0, "encode_ms_median": float(np.median(enc_ms)),
        "decode_ms_median": float(np.median(dec_ms)), "encode_ms_p90": float(np.percentile(enc_ms, 90)),
        "decode_ms_p90": float(np.percentile(dec_ms, 90)),
        "real_time_factor": float(np.median(enc_ms + dec_ms) / 20.0),
        "algorithmic_latency_ms": setup.codec.algorithmic_latency_ms,
    }
    target = args.target_codec_ms
    ok = values["encode_ms_median"] < target and values["decode_ms_median"] < target
    summary = (f"Latency={values['encode_ms_median'] + values['decode_ms_median']:.2f}ms per 20 ms chunk: encode "
               f"{values['encode_ms_median']:.2f} ms + decode {values['decode_ms_median']:.2f} ms median (p90 "
               f"{values['encode_ms_p90']:.2f} + {values['decode_ms_p90']:.2f}), {len(enc)} chunks")
    return result("codec_latency", judged(ok), summary, f"<{target:g} ms encode and <{target:g} ms decode", values)


def check_s2s_latency(setup: Setup) -> Check:
    s2s, device, args = setup.s2s, setup.device, setup.args
    ctx, _ = filled_context(setup, n_turns=s2s.config.max_context_turns)
    memory = ctx.context_memory(s2s)  # prepared while the user speaks, as the server does
    times = {}
    for name, context in (("with_10_turn_context", memory), ("without_context", None)):
        run_once(s2s, setup.codes, context, 2, device)  # warm-up
        times[name] = [run_once(s2s, setup.codes, context, 2, device)["first_chunk_ms"] for _ in range(args.repeats)]
    first = statistics.median(times["with_10_turn_context"])
    bare = statistics.median(times["without_context"])
    values = {"first_chunk_ms_median": first, "first_chunk_ms_median_without_context": bare,
              "first_chunk_ms_runs": times, "context_frames": ctx.total_frames,
              "turn_seconds": setup.codes.shape[-1] / setup.codec.frame_rate, "repeats": args.repeats}
    target = args.target_first_chunk_ms
    summary = (f"Latency={first:.0f}ms to the first 20 ms chunk with a {len(ctx)}-turn context "
               f"({ctx.total_frames / setup.codec.frame_rate:.0f} s), {bare:.0f} ms without; median of {args.repeats}")
    return result("s2s_latency", judged(first < target), summary, f"<{target:g}ms first chunk", values)


def check_emotions(setup: Setup) -> Check:
    cfg = setup.s2s.config
    loaded = cfg.num_emotions == len(EMOTIONS) == 9
    steps = 10
    replies = [greedy_reply(setup, steps, emotion=e) for e in range(min(cfg.num_emotions, len(EMOTIONS)))]
    distinct = len({tuple(r.flatten().tolist()) for r in replies})
    values = {"num_emotions": cfg.num_emotions, "distinct_replies": distinct, "greedy_steps": steps}
    summary = (f"{cfg.num_emotions} emotions loaded; {distinct} of {len(replies)} greedy replies distinct "
               f"(the same turn and voice, {steps} steps)")
    return result("emotions", judged(loaded and distinct == len(EMOTIONS)), summary, "9 loaded, 9 distinct replies",
                  values)


def voices_told_apart(embeds: dict[str, np.ndarray], references: dict[str, np.ndarray] | None = None) -> int:
    """How many utterances (embeds: voice -> (n, D) unit embeddings) lie nearest, by cosine, to
    their own voice's centroid: the centroids of `references` (voice -> (m, D)) when given, else
    those of the utterances themselves, each utterance left out of its own voice's centroid."""
    if references is not None:
        centroids = {name: unit(r.mean(0)) for name, r in references.items()}
    else:
        centroids = {name: unit(e.mean(0)) for name, e in embeds.items()}
    correct = 0
    for name, es in embeds.items():
        for k, e in enumerate(es):
            cands = dict(centroids)
            if references is None:
                others = np.delete(es, k, axis=0)
                if len(others) == 0:
                    continue
                cands[name] = unit(others.mean(0))
            correct += max(cands, key=lambda m: float(e @ cands[m])) == name
    return correct


def check_s2s_quality(setup: Setup) -> Check:
    args = setup.args
    target = f">={100 * args.target_reply_accuracy:g}% nearest to the intended answer"
    if not args.data_dir:
        return result("s2s_quality", "NOT_CHECKED", "reply accuracy needs a labelled corpus: give --data_dir "
                      "(make_telugu_speech.py's), or run evaluate_agent.py", target)
    if setup.untrained:
        return result("s2s_quality", "NOT_JUDGED", "random models: reply accuracy not computed", target)
    pairs, agent_rows = ev.load_split(Path(args.data_dir), "test")
    chosen = ev.select_pairs(pairs, args.quality_pairs, 0)["first_turn"]
    agent = ev.Agent(setup.codec, setup.s2s, setup.device)  # the server's sampling settings
    refs = ev.References(agent_rows, Path(args.data_dir))
    rows = []
    for i, p in enumerate(chosen):
        wav, text = agent.reply(p, seed=i)
        rows.append(ev.score_reply(wav, p, refs, text=text))
    acc, top5 = ev.accuracy(rows), ev.accuracy(rows, 5)
    chance = 1 / rows[0]["candidates"]
    values = {"pairs": len(rows), "accuracy": acc, "top5": top5, "chance": chance,
              "median_reply_s": float(np.median([r["reply_s"] for r in rows]))}
    summary = (f"reply accuracy {100 * acc:.0f}% (top-5 {100 * top5:.0f}%) of {len(rows)} held-out questions, "
               f"chance {100 * chance:.1f}%")
    if "text_match" in rows[0]:  # the inner monologue: did it choose the right words before speaking?
        values["text_accuracy"] = float(np.mean([r["text_match"] for r in rows]))
        summary += f"; the words it wrote first are the intended answer's in {100 * values['text_accuracy']:.0f}%"
    return result("s2s_quality", judged(acc >= args.target_reply_accuracy), summary, target, values)


def check_speakers(setup: Setup) -> Check:
    s2s, args = setup.s2s, setup.args
    table = s2s.speaker.table.weight.detach().float().cpu()
    gaps = torch.cdist(table, table) + torch.eye(len(table)) * 1e9
    loaded = s2s.config.num_speakers == len(VOICES) == 4 and float(gaps.min()) > 0
    n = args.speaker_replies
    encoder = voice_encoder()
    embeds = {v.name: np.stack([encoder.embed_utterance(reply_audio(setup, v.id, 0, seed=1000 + r)) for r in range(n)])
              for v in VOICES[: s2s.config.num_speakers]}
    centroids = {name: unit(e.mean(0)) for name, e in embeds.items()}
    names = list(centroids)
    cosine = {a: {b: round(float(centroids[a] @ centroids[b]), 3) for b in names} for a in names}
    max_cross = max((cosine[a][b] for a in names for b in names if a != b), default=float("nan"))
    refs = None
    if args.data_dir:  # against the voices' own recordings in the corpus
        rows = [r for r in read_manifest(Path(args.data_dir) / "manifests" / "test.jsonl")
                if r.get("role") == "agent" and r.get("emotion") == "neutral"]
        refs = {}
        for name in names:
            mine = [r for r in rows if r.get("voice") == name][: args.speaker_refs]
            if not mine:
                raise SystemExit(f"--data_dir {args.data_dir}: no neutral agent recordings of {name} in the test manifest")
            refs[name] = np.stack([encoder.embed_utterance(load_audio(r["path"])) for r in mine])
        method = f"nearest corpus centroid ({args.speaker_refs} recordings per voice)"
    else:
        method = "leave-one-out nearest centroid among the replies"
    correct = voices_told_apart(embeds, refs)
    total = sum(len(e) for e in embeds.values())
    accuracy = correct / total
    values = {"num_speakers": s2s.config.num_speakers, "replies_per_voice": n, "method": method,
              "correct": int(correct), "total": total, "accuracy": accuracy, "centroid_cosine": cosine,
              "max_cross_voice_cosine": max_cross}
    target = args.target_speaker_accuracy
    status = "FAIL" if not loaded else "NOT_JUDGED" if setup.untrained else judged(accuracy >= target)
    summary = (f"{s2s.config.num_speakers} voices loaded; distinct: {correct}/{total} replies "
               f"= {100 * accuracy:.0f}% ({method}); closest two voices cosine {max_cross:.2f}")
    return result("speakers", status, summary, f"4 loaded, >={100 * target:g}% correct", values)


def check_context(setup: Setup) -> Check:
    s2s = setup.s2s
    max_turns = s2s.config.max_context_turns
    ctx, added = filled_context(setup, n_turns=max_turns + 2)
    problems = []
    if max_turns != 10:
        problems.append(f"the model keeps {max_turns} turns, not 10")
    kept_codes = [t.codes for t in ctx.turns]
    if len(ctx) != max_turns or not all(torch.equal(a, b) for a, b in zip(kept_codes, added[-max_turns:])):
        problems.append(f"kept {len(ctx)} turns, not the last {max_turns}")
    again = ContextManager.from_json(ctx.to_json())
    same = [(t.role, t.interrupted, t.turn_id) for t in ctx.turns] == [(t.role, t.interrupted, t.turn_id) for t in again.turns] \
        and all(torch.equal(a.codes, b.codes) for a, b in zip(ctx.turns, again.turns))
    if not same:
        problems.append("the JSON round trip changed the turns")
    memory = ctx.context_memory(s2s)
    slots = memory.slots[memory.valid].unique().numel()
    fps = s2s.config.frames_per_step
    steps = sum(-(-t.n_frames // fps) for t in ctx.turns)
    if slots != len(ctx) or int(memory.valid.sum()) != steps:
        problems.append(f"the model's memory holds {slots} turns / {int(memory.valid.sum())} steps, "
                        f"expected {len(ctx)} / {steps}")
    n = 10
    with_context = greedy_reply(setup, n, context=memory)
    without = greedy_reply(setup, n)
    from_json = greedy_reply(setup, n, context=again.context_memory(s2s))
    changes = not torch.equal(with_context, without)
    if not changes:
        problems.append("the reply is the same with and without the context")
    if not torch.equal(with_context, from_json):
        problems.append("the context read back from JSON gives another reply")
    values = {"max_context_turns": max_turns, "turns_added": len(added), "turns_kept": len(ctx),
              "dropped_turns": ctx.dropped_turns, "json_round_trip_equal": same, "memory_turns": slots,
              "memory_steps": int(memory.valid.sum()), "reply_changes_with_context": changes, "problems": problems}
    summary = (f"{len(ctx)}-turn memory working: kept the last {len(ctx)} of {len(added)} turns, JSON round trip "
               f"{'equal' if same else 'DIFFERENT'}, {slots} turns in the model's memory, reply "
               f"{'changes' if changes else 'does NOT change'} with context"
               if not problems else "; ".join(problems))
    return result("context", judged(not problems), summary, "10 turns kept and used", values)


def server_checks(setup: Setup, report_dir: Path) -> list[Check]:
    """End-to-end latency and barge-in, against a server started here."""
    args = setup.args
    wanted = [k for k in ("e2e", "full_duplex") if k in args.checks]
    # Replies last at least 1.5 s, so that the barge-in lands while the agent is still speaking.
    extra = ("--min_reply_ms", "1500", "--max_reply_s", "3")
    checks = []
    with bl.running_server(report_dir / "server.log", args.model_dir, str(setup.device),
                           args.untrained_preset if setup.untrained else None, args.threads, extra) as server:
        if "e2e" in wanted:
            checks.append(run_check("e2e", check_e2e, setup, server))
        if "full_duplex" in wanted:
            checks.append(run_check("full_duplex", check_full_duplex, setup, server))
    return checks


def check_e2e(setup: Setup, server: bl.ServerProcess) -> Check:
    args = setup.args
    results = asyncio.run(bl.run_turns(server.address, [setup.utterance], ("stream",), args.e2e_turns, warmup=1,
                                       listen_s=1.0))["stream"]
    e2e = [r.e2e_ms for r in results]
    median = statistics.median(e2e)
    stages = bl.summarize({"stream": results})["stream"]["stages"]
    values = {"e2e_ms_median": median, "e2e_ms": e2e, "turns": len(e2e), "mode": "stream",
              "stages_p50": {k: v["p50"] for k, v in stages.items()}, "server": server.address,
              "server_models": server.health.get("models")}
    target = args.target_e2e_ms
    p = values["stages_p50"]
    summary = (f"{median:.0f}ms median of {len(e2e)} turns (end-of-turn wait {p['end_of_turn_wait_ms']:.0f}, "
               f"server processing {p['server_processing_ms']:.0f}, transport {p['transport_ms']:.0f} ms p50)")
    return result("e2e", judged(median < target), summary, f"<{target:g}ms target", values)


async def barge_in(address: str, utterance: bl.Utterance) -> dict:
    """Ask, and once the reply's first audio arrives, speak again: the reply must be interrupted,
    and none of its audio may arrive after the `interrupted` event."""
    client = await bl.AgentClient.connect(address, f"barge-in-{os.getpid()}", mode="stream")
    try:
        client.say(np.concatenate([np.zeros(SAMPLE_RATE // 2, dtype=np.float32), utterance.audio]))
        frame = await client.until(lambda: next(iter(client.frames), None), 60, "reply audio")
        rid = frame[0]
        onset = client.say(utterance.audio)
        onset_sent = await client.sent_at(onset)
        event = await client.until(lambda: next(iter(client.find("interrupted", response_id=rid)
                                                     + client.find("response_done", response_id=rid)), None),
                                   30, f"the interruption of reply {rid}")
        if event["type"] == "response_done":
            return {"interrupted": False, "reply_ms": event.get("audio_ms")}
        await asyncio.sleep(0.5)  # any stray reply audio would arrive now
        late = [f for f in client.frames if f[0] == rid and f[3] > event["_t"]]
        return {"interrupted": True, "reason": event.get("reason"),
                "detect_ms": 1000 * (event["_t"] - onset_sent), "sent_ms": event.get("sent_ms"),
                "frames_after_interrupt": len(late)}
    finally:
        await client.close()


def check_full_duplex(setup: Setup, server: bl.ServerProcess) -> Check:
    r = asyncio.run(barge_in(server.address, setup.utterance))
    if not r["interrupted"]:
        return result("full_duplex", "FAIL",
                      f"the reply ended ({r['reply_ms']} ms) before the barge-in was detected", "barge-in interrupts", r)
    ok = r["reason"] == "barge_in" and r["frames_after_interrupt"] == 0
    summary = (f"barge-in stopped the reply {r['detect_ms']:.0f} ms after the user started speaking "
               f"({r['sent_ms']} ms of it sent), {r['frames_after_interrupt']} reply frames after the interruption")
    return result("full_duplex", judged(ok), summary, "interrupted, no audio after", r)


# --------------------------------------------------------------------------------------


def banner(text: str) -> str:
    bar = "!" * 100
    return f"{bar}\n!!! {text}\n{bar}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workspace_arg(p)
    p.add_argument("--model_dir", default=str(DEMO_MODEL_DIR), help="folder with codec/ and s2s/ (default checkpoints/demo)")
    p.add_argument("--test_audio", default=None, help="a WAV of a user question (default: a held-out question, rendered "
                   "now, or the first test question of --data_dir)")
    p.add_argument("--data_dir", default=None, help="corpus root (manifests/test.jsonl): the test question and the "
                   "voices' reference recordings for the speaker check")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models run, here and in the server")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads here and in the server (0: the server's default, cores - 1, 1 to 4)")
    p.add_argument("--report", default=None, help="JSON report path (default <workspace>/system_test/report.json)")
    p.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS, help="checks to run (default all)")
    p.add_argument("--allow-untrained", "--allow_untrained", dest="allow_untrained", action="store_true",
                   help="without weights in --model_dir, test random models: latency judged, quality not")
    p.add_argument("--untrained_preset", default="demo", choices=("tiny", "demo"), help="size of those random models")
    p.add_argument("--e2e_turns", type=int, default=5, help="timed WebSocket turns for the end-to-end median (default 5)")
    p.add_argument("--repeats", type=int, default=5, help="timed S2S first-chunk runs (default 5)")
    p.add_argument("--codec_timing_s", type=float, default=10.0, help="audio streamed for the codec timing (default 10)")
    p.add_argument("--speaker_replies", type=int, default=3, help="replies generated per voice (default 3)")
    p.add_argument("--quality_pairs", type=int, default=24, help="held-out questions for the reply accuracy (default 24)")
    p.add_argument("--speaker_refs", type=int, default=8, help="corpus recordings per voice for the centroids (default 8)")
    p.add_argument("--target_snr_db", type=float, default=25.0, help="codec SNR target (mission: >25 dB)")
    p.add_argument("--target_kbps", type=float, nargs=2, default=(14.0, 18.0), help="codec bitrate range (mission: 14 18)")
    p.add_argument("--target_codec_ms", type=float, default=10.0, help="codec encode and decode per 20 ms chunk (mission: <10)")
    p.add_argument("--target_first_chunk_ms", type=float, default=150.0, help="S2S first chunk (mission: <150)")
    p.add_argument("--target_speaker_accuracy", type=float, default=0.95, help="voices told apart (issue: >=0.95)")
    p.add_argument("--target_reply_accuracy", type=float, default=0.9, help="reply accuracy (issue: >=0.9)")
    p.add_argument("--target_e2e_ms", type=float, default=400.0, help="end-to-end median (mission: <400)")
    args = p.parse_args(argv)
    counts = (args.e2e_turns, args.repeats, args.speaker_replies, args.speaker_refs, args.quality_pairs)
    if min(counts) < 1 or args.codec_timing_s < 2:
        p.error("--e2e_turns, --repeats, --speaker_replies, --speaker_refs, --quality_pairs must be >= 1 "
                "and --codec_timing_s >= 2")
    if args.speaker_replies < 2 and not args.data_dir and "speakers" in args.checks:
        p.error("--speaker_replies must be >= 2 without --data_dir (leave-one-out needs two replies per voice)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here; use --device cpu")
    args.model_dir = Path(args.model_dir)
    report_path = Path(args.report) if args.report else workspace_from_args(args).root / "system_test" / "report.json"
    bl.stop_servers_on_sigterm()
    torch.set_num_threads(args.threads or default_model_threads())
    device = torch.device(args.device)
    started = time.perf_counter()

    codec, s2s, identity = load_models(args.model_dir, device, args.allow_untrained, args.untrained_preset)
    untrained = identity["untrained"]
    if untrained:
        print(banner(f"UNTRAINED MODELS ({identity['source']}, random weights): no trained models in {args.model_dir}.\n"
                     "!!! Quality checks are NOT judged; latencies are those of random weights of this size."))
    if args.test_audio:
        utterance = bl.load_utterance(args.test_audio)
    else:
        utterance = bl.test_utterances(1, args.data_dir)[0]
    with torch.inference_mode():
        codes = codec.encode(torch.from_numpy(utterance.audio).to(device)[None, None])  # (1, K, F)
    setup = Setup(codec, s2s, device, untrained, utterance, codes, args)
    machine = bl.machine_info(args.device, torch.get_num_threads())
    print(f"models: {identity['source']} (codec {identity['codec']['parameters'] / 1e6:.2f}M, S2S "
          f"{identity['s2s']['parameters'] / 1e6:.1f}M parameters); test audio {utterance.name} "
          f"({len(utterance.audio) / SAMPLE_RATE:.1f} s); {machine['cpu']}, {machine['cpu_count']} CPUs, "
          f"{torch.get_num_threads()} threads, torch {machine['torch']}, device {args.device}", flush=True)

    in_process = {"codec_quality": check_codec_quality, "codec_bitrate": check_codec_bitrate,
                  "codec_latency": check_codec_latency, "s2s_latency": check_s2s_latency,
                  "s2s_quality": check_s2s_quality, "emotions": check_emotions, "speakers": check_speakers,
                  "context": check_context}
    checks = []
    # The models run on one worker thread, as in the server (its ModelWorker). Measured here: with
    # 2 intra-op threads on the main thread, small ops slowed 100-300x while other work shared the
    # 2 cores; on a worker thread they did not.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model") as model_thread:
        for key in CHECKS:
            if key in args.checks and key in in_process:
                checks.append(model_thread.submit(run_check, key, in_process[key], setup).result())
                print(checks[-1].line(), flush=True)
    if "stability" in args.checks:
        checks.append(result("stability", "NOT_CHECKED", "an hour without a crash needs a long run, e.g. "
                             "benchmark_latency.py --num_iterations 400"))
    if {"e2e", "full_duplex"} & set(args.checks):
        try:
            server = server_checks(setup, report_path.parent)
        except RuntimeError as e:  # the server did not start
            server = [result(k, "ERROR", str(e)[-2000:]) for k in ("e2e", "full_duplex") if k in args.checks]
        checks += server
        for c in server:
            print(c.line(), flush=True)
    checks.sort(key=lambda c: c.number)

    failed = [c for c in checks if c.status in ("FAIL", "ERROR")]
    print("\nsummary:\n" + "\n".join(c.line() for c in checks))
    verdict = f"{len(failed)} of {len(checks)} checks failed" if failed else "all judged checks passed"
    report = {
        "passed": not failed, "verdict": verdict, "untrained": untrained,
        "checks": [asdict(c) for c in checks], "failed": [c.key for c in failed],
        "not_judged": [c.key for c in checks if c.status == "NOT_JUDGED"],
        "machine": machine, "models": identity, "model_dir": str(args.model_dir),
        "test_audio": {"name": utterance.name, "text": utterance.text, "seconds": len(utterance.audio) / SAMPLE_RATE,
                       "path": args.test_audio},
        "targets": {k: v for k, v in vars(args).items() if k.startswith("target_")},
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("target_") and k != "model_dir"},
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # other work on the machine inflates timings
    }
    write_json(report_path, report)
    if untrained:
        print(banner(f"UNTRAINED MODELS ({identity['source']}): {verdict}; quality NOT judged "
                     f"({', '.join(report['not_judged']) or 'none'})"))
    else:
        print(verdict)
    print(f"report: {report_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
