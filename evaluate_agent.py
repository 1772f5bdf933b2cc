"""How well the trained agent answers: reply accuracy, voices, emotions and context on a held-out split.

    python evaluate_agent.py --model_dir checkpoints/demo --data_dir workspace/telugu_synth --split test

The test split holds question paraphrases and user voices that training never saw (--split
new_voices: the training paraphrases, spoken now by the test split's voices). For each pair,
the user's question (a WAV) goes through the codec and the S2S model as the server runs them
(offline encode, the server's sampling settings, one conversation at a time), and the reply is
decoded to audio. Then:

  reply accuracy   the reply is scored against the reference rendering of every answer in the
                   requested voice and emotion, by DTW over log-mel frames (cost per path step);
                   it is correct when the nearest rendering is the intended answer. Chance is
                   1 / (number of answers), 1/172 on the shipped corpus. Top-5 is given too.
                   Replies run until the model's end-of-reply head fires or --max_reply_s
                   (default 6 s; answers are at most ~4 s, the server allows 15 s): the
                   report counts those cut at the cap.
  repeat that      "repeat that" turns with the previous exchange as context: correct when the
                   nearest rendering is the previous answer.
  what did I ask   "what did I ask" turns: nearest among the recall renderings of that voice and
                   emotion in the corpus (85 to 96 of them; chance is reported per turn's set).
  voices           resemblyzer embeddings of the replies, each given the voice of its nearest
                   (voice, emotion) centroid of train-split answers heard through the codec
                   (VoiceClassifier): the share that lands on its own voice.
  emotions         each reply's median F0 (semitones), active energy (dB) and voiced time (ratio)
                   against the intended answer spoken neutrally in the same voice, averaged per
                   emotion and taken relative to the neutral replies (so a shift every reply
                   shares, the model's or the codec's, cancels); next to the same figures for
                   the intended reference renderings (the design).
  codec            PESQ-WB, STOI, SNR of the split's recordings through the codec alone.
  words            with a model that writes its reply's words before speaking (inner
                   monologue): the share of replies whose words are exactly the intended
                   answer's (punctuation aside); which answer it chose, apart from how well it
                   then says it. --say_intended measures the other half: the model speaks the
                   intended answer's words, and reply accuracy then says how well it says them.

Writes <out>/evaluation.json, <out>/evaluation.md and a few replies as WAVs to listen to. Each
reply is also kept in <out>/replies_cache/<key>/ as it is made (key: the weights, the split and the
sampling settings), so a killed evaluation run again continues where it stopped and scores the
very same replies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
import warnings
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import audio_metrics
from audio_io import PAIRS_FILES, SPLITS, atomic_write, load_audio, read_json, read_manifest, save_audio, write_json
from config import DEMO_MODEL_DIR, EMOTIONS, SAMPLE_RATE, add_workspace_arg, workspace_from_args
from prosody import prosody_signature, semitones
from s2s_transformer import ROLE_AGENT, ROLE_USER, ContextTurns, TeluguS2STransformer, reply_words
from telugu_codec import TeluCodec
from training import weight_files

MEL_HOP = 160  # 10 ms frames for the DTW


# --------------------------------------------------------------------------------------
# Scoring


def log_mel(wav: np.ndarray) -> np.ndarray:
    """(T,) audio -> (frames, 80) log-mel, each frame mean-removed (so loudness does not count)."""
    import librosa

    mel = librosa.feature.melspectrogram(y=wav.astype(np.float32), sr=SAMPLE_RATE, n_fft=512, hop_length=MEL_HOP,
                                         n_mels=80, fmin=50, fmax=7600)
    x = np.log(mel + 1e-5).T
    return x - x.mean(axis=1, keepdims=True)


def dtw_cost(a: np.ndarray, b: np.ndarray) -> float:
    """DTW alignment cost between two (frames, D) sequences, Euclidean frame distance, divided by
    the path length: comparable across answers of different lengths."""
    import librosa

    if len(a) == 0 or len(b) == 0:
        return math.inf
    cost, path = librosa.sequence.dtw(X=a.T, Y=b.T, metric="euclidean", backtrack=True)
    return float(cost[-1, -1] / len(path))


def rank_candidates(reply: np.ndarray, candidates: dict[str, np.ndarray]) -> list[str]:
    """Candidate keys (e.g. answer texts) sorted nearest first by DTW over log-mel; `candidates`
    maps key -> log-mel features of its reference rendering."""
    feats = log_mel(reply)
    costs = {k: dtw_cost(feats, ref) for k, ref in candidates.items()}
    return sorted(costs, key=costs.get)


def voice_encoder():
    """resemblyzer's speaker encoder (its weights ship in the package: nothing is downloaded)."""
    with warnings.catch_warnings():  # resemblyzer's webrtcvad imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        from resemblyzer import VoiceEncoder
    return VoiceEncoder("cpu", verbose=False)


def unit(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.linalg.norm(x)), 1e-9)


class VoiceClassifier:
    """Which agent voice an utterance is in: its speaker embedding's nearest centroid, by cosine,
    among the (voice, emotion) cells of reference recordings heard through the codec; the cell's
    voice is the answer.

    Per cell, because emotions move the embedding; through the codec, because the replies come out
    of it. Chosen (in an ad-hoc comparison, not a repo script) on the codec round trip of 216
    validation-split answers (6 per cell), fitted on the train split's: the nearest neutral-voice
    centroid gets 87.5% of them right, one centroid per voice 94.0%, one per cell 97.2% (logistic
    regression 96.8%); on clean recordings, 89.8% / 84.3% / 91.7%. The test split's answers through
    the codec: 98.6%, the ceiling of the replies' figure.
    """

    def __init__(self, centroids: dict[tuple[str, str], np.ndarray]):
        if not centroids:
            raise ValueError("no reference recordings to fit the voice classifier on")
        self.cells = list(centroids)
        self.matrix = np.stack([unit(centroids[c]) for c in self.cells])  # (cells, D)

    @classmethod
    def fit(cls, encoder, rows: list[dict], round_trip, per_cell: int = 6, seed: int = 0) -> VoiceClassifier:
        """rows: agent recordings ({"path", "voice", "emotion"}); round_trip: path -> the audio
        through the codec. Up to `per_cell` recordings per (voice, emotion), drawn at random."""
        cells: dict[tuple[str, str], list[str]] = defaultdict(list)
        for r in rows:
            cells[(r["voice"], r["emotion"])].append(r["path"])
        rng = np.random.default_rng(seed)
        centroids = {}
        for cell, paths in sorted(cells.items()):
            chosen = rng.choice(len(paths), min(per_cell, len(paths)), replace=False)
            centroids[cell] = np.mean([unit(encoder.embed_utterance(round_trip(paths[i]))) for i in chosen], axis=0)
        return cls(centroids)

    def predict(self, embedding: np.ndarray) -> str:
        return self.cells[int(np.argmax(self.matrix @ unit(embedding)))][0]


def voice_confusion(embeds: list[tuple[str, np.ndarray]], predict) -> tuple[int, dict]:
    """How many (voice, embedding) pairs `predict` (embedding -> voice) assigns to their own voice;
    and the confusion counts {true: {predicted: n}}."""
    confusion: dict = defaultdict(lambda: defaultdict(int))
    correct = 0
    for voice, e in embeds:
        guess = predict(e)
        confusion[voice][guess] += 1
        correct += guess == voice
    return correct, {k: dict(v) for k, v in confusion.items()}


def prosody_shift(wav_sig, base_sig) -> dict:
    """One utterance's prosody against a base (the same answer, same voice, spoken neutrally):
    F0 shift in semitones, energy shift in dB, voiced time as a ratio. NaN where unmeasurable."""
    ok = wav_sig is not None and base_sig is not None
    f0 = (semitones(wav_sig.f0_median_hz, base_sig.f0_median_hz)
          if ok and np.isfinite(wav_sig.f0_median_hz) and np.isfinite(base_sig.f0_median_hz) else math.nan)
    return {"f0_st": f0, "energy_db": wav_sig.energy_db - base_sig.energy_db if ok else math.nan,
            "voiced_ratio": wav_sig.voiced_seconds / max(base_sig.voiced_seconds, 1e-3) if ok else math.nan}


def emotion_table(rows: list[dict]) -> dict:
    """Per emotion, the mean prosody_shift of its rows ({"emotion", "f0_st", "energy_db",
    "voiced_ratio"}), then taken relative to the neutral rows' mean: what is left is the emotion's
    own signature, with any shift shared by every reply (a model's or the codec's bias) removed."""
    table = {}
    for emo in EMOTIONS:
        mine = [r for r in rows if r["emotion"] == emo]
        if not mine:
            continue
        entry = {"n": len(mine)}
        for feat in ("f0_st", "energy_db", "voiced_ratio"):
            vals = [r[feat] for r in mine if np.isfinite(r[feat]) and (feat != "voiced_ratio" or r[feat] > 0)]
            entry[feat] = float(np.exp(np.mean(np.log(vals))) if feat == "voiced_ratio" else np.mean(vals)) if vals else None
        table[emo] = entry
    base = dict(table.get("neutral", {}))  # a copy: the neutral entry itself is rewritten below
    for emo, entry in table.items():
        for feat in ("f0_st", "energy_db", "voiced_ratio"):
            if entry[feat] is None or base.get(feat) is None or (feat == "voiced_ratio" and base[feat] <= 0):
                continue
            rel = entry[feat] / base[feat] if feat == "voiced_ratio" else entry[feat] - base[feat]
            entry[feat] = round(rel, 3 if feat == "voiced_ratio" else 2)
    return table


def signature_agreement(generated: dict, reference: dict) -> dict:
    """Per feature, over the non-neutral emotions: the correlation of the generated shifts with the
    reference shifts, and how many have the same sign (shifts under a small dead band count as 0)."""
    out = {}
    dead = {"f0_st": 0.5, "energy_db": 0.5, "voiced_ratio": 0.03}
    for feat, band in dead.items():
        centre = 1.0 if feat == "voiced_ratio" else 0.0
        pairs = [(generated[e][feat], reference[e][feat]) for e in reference
                 if e != "neutral" and e in generated and generated[e][feat] is not None and reference[e][feat] is not None]
        if len(pairs) < 2:
            continue
        g, r = np.array(pairs).T
        sign = lambda x: np.where(np.abs(x - centre) < band, 0, np.sign(x - centre))  # noqa: E731
        corr = float(np.corrcoef(g, r)[0, 1]) if g.std() > 0 and r.std() > 0 else math.nan
        out[feat] = {"correlation": round(corr, 3), "same_sign": int((sign(g) == sign(r)).sum()), "of": len(pairs)}
    return out


# --------------------------------------------------------------------------------------
# Data


def load_split(data_dir: Path, split: str) -> tuple[list[dict], list[dict]]:
    """(pairs, agent manifest rows of every split) with absolute paths."""
    pairs_path = data_dir / "metadata" / PAIRS_FILES[split]
    if not pairs_path.is_file():
        raise SystemExit(f"{pairs_path} not found: --data_dir must be a corpus from make_telugu_speech.py "
                         "(python make_telugu_speech.py --workers 2 builds it)")
    pairs = read_json(pairs_path)
    for p in pairs:
        for key in ("target_text", "intent_id", "voice", "emotion"):
            if key not in p:
                raise SystemExit(f"{pairs_path}: pairs lack {key!r}; this evaluation needs the synthetic corpus's "
                                 "labelled pairs (make_telugu_speech.py), not prepare_speaker_data.py's")
    agent = []
    for s in SPLITS:
        path = data_dir / "manifests" / f"{s}.jsonl"
        if path.is_file():
            agent += [r for r in read_manifest(path) if r.get("role") == "agent"]
    if not agent:
        raise SystemExit(f"{data_dir}/manifests holds no agent recordings: rebuild the corpus")
    fix = lambda p: str(Path(p) if Path(p).is_absolute() else data_dir / p)  # noqa: E731
    for p in pairs:
        p["input_path"], p["target_path"] = fix(p["input_path"]), fix(p["target_path"])
        for h in p.get("history") or []:
            h["input_path"], h["target_path"] = fix(h["input_path"]), fix(h["target_path"])
    for r in agent:
        r["path"] = fix(r["path"])
    return pairs, agent


NEW_VOICES = "new_voices"  # --split: the training questions spoken by the test split's user voices


def with_new_voices(chosen: dict[str, list[dict]], data_dir: Path, out: Path) -> dict[str, list[dict]]:
    """The chosen training pairs with each question spoken again by one of the test split's user
    voices (in turn), rendered as the corpus renders user turns (synthesize_user, seeded
    augmentation) into <out>/new_voice_questions/ once: the paraphrases were trained on, the
    voices never. What a model can learn from this corpus, next to the test split's new wording."""
    from make_telugu_speech import synthesize_user

    voices = sorted({r["voice"] for r in read_manifest(data_dir / "manifests" / "test.jsonl") if r.get("role") == "user"})
    if not voices:
        raise SystemExit(f"{data_dir}/manifests/test.jsonl lists no user voices: rebuild the corpus")
    n = 0
    renamed = {}
    for group, pairs in chosen.items():
        renamed[group] = []
        for p in pairs:
            voice = voices[n % len(voices)]
            n += 1
            seed = zlib.crc32(f"{p['input_text']}|{voice}".encode())
            path = out / "new_voice_questions" / f"{seed:08x}_{voice}.wav"
            if not path.is_file():
                save_audio(path, synthesize_user(p["input_text"], voice, seed=seed, augment_audio=True))
            renamed[group].append({**p, "input_path": str(path), "user_voice": voice})
    return renamed


def accuracy(rows: list[dict], k: int = 1) -> float:
    """The share of scored replies whose intended text ranks within the first k."""
    return sum(r["rank"] is not None and r["rank"] <= k for r in rows) / max(len(rows), 1)


def spread(items: list, n: int) -> list:
    """n items evenly spaced through the list (deterministic, covers every intent block)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def select_pairs(pairs: list[dict], n_first: int, n_context: int) -> dict[str, list[dict]]:
    first = [p for p in pairs if not p.get("history") and not p["intent_id"].startswith("ctx_")]
    repeat = [p for p in pairs if p["intent_id"] == "ctx_repeat_that" and p.get("history")]
    recall = [p for p in pairs if p["intent_id"] == "ctx_what_did_i_ask" and p.get("history")]
    return {"first_turn": spread(first, n_first), "repeat_that": spread(repeat, n_context),
            "what_did_i_ask": spread(recall, n_context)}


class References:
    """The corpus's agent renderings by (voice, emotion, kind), as log-mel features loaded when
    first asked for: the candidates a reply is matched against."""

    def __init__(self, agent_rows: list[dict], data_dir: Path):
        self.data_dir = data_dir
        self.by_cell: dict[tuple, dict[str, str]] = defaultdict(dict)
        for r in agent_rows:
            self.by_cell[(r["voice"], r["emotion"], r.get("kind", "answer"))].setdefault(r["text"], r["path"])
        self._feats: dict[str, np.ndarray] = {}
        self._sigs: dict = {}

    def candidates(self, voice: str, emotion: str, kind: str) -> dict[str, np.ndarray]:
        cell = self.by_cell.get((voice, emotion, kind))
        if not cell:
            raise SystemExit(f"no {kind} renderings of {voice}/{emotion} in {self.data_dir}/manifests: rebuild the corpus")
        for path in cell.values():
            if path not in self._feats:
                self._feats[path] = log_mel(load_audio(path))
        return {text: self._feats[path] for text, path in cell.items()}

    def neutral_signature(self, voice: str, text: str, kind: str = "answer"):
        """The prosody of `text` rendered neutrally in `voice` (None if the corpus lacks it)."""
        path = self.by_cell.get((voice, "neutral", kind), {}).get(text)
        if path is None:
            return None
        if path not in self._sigs:
            self._sigs[path] = prosody_signature(load_audio(path))
        return self._sigs[path]


def score_reply(wav: np.ndarray, pair: dict, refs: References, kind: str = "answer", text: str | None = None) -> dict:
    """One reply's row: where the intended text ranks among the candidates, length, and its
    prosody against the intended text spoken neutrally in the same voice (prosody_shift); with
    the words the model wrote before speaking (`text`), whether they are the intended answer's."""
    cands = refs.candidates(pair["voice"], pair["emotion"], kind)
    ranked = rank_candidates(wav, cands) if len(wav) else []
    sig = prosody_signature(wav) if len(wav) > SAMPLE_RATE // 10 else None
    return {"intent_id": pair["intent_id"], "voice": pair["voice"], "emotion": pair["emotion"],
            "user_voice": pair.get("user_voice"), "target_text": pair["target_text"],
            "nearest_text": ranked[0] if ranked else None,
            "rank": ranked.index(pair["target_text"]) + 1 if pair["target_text"] in ranked else None,
            "candidates": len(cands), "reply_s": round(len(wav) / SAMPLE_RATE, 3),
            "f0_hz": sig.f0_median_hz if sig else math.nan,
            **prosody_shift(sig, refs.neutral_signature(pair["voice"], pair["target_text"], kind)),
            **({} if text is None else {"reply_text": text,
                                        "text_match": reply_words(text) == reply_words(pair["target_text"])})}


# --------------------------------------------------------------------------------------
# Running the models


class Agent:
    """Codec + S2S as the server runs them, offline: question WAV -> reply audio."""

    def __init__(self, codec: TeluCodec, s2s: TeluguS2STransformer | None, device: torch.device,
                 temperature: float = 0.8, top_k: int = 50, max_reply_s: float = 6.0, say_intended: bool = False):
        self.codec, self.s2s = codec, s2s
        self.device, self.temperature, self.top_k = device, temperature, top_k
        self.say_intended = say_intended  # the model speaks the intended answer's words, not its own
        self.max_steps = 0 if s2s is None else int(max_reply_s * 1000 / s2s.config.step_ms)
        self._codes: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, model_dir: Path, device: torch.device, *args, codec_only: bool = False) -> Agent:
        for sub in ("codec",) if codec_only else ("codec", "s2s"):
            if not weight_files(model_dir / sub):
                raise SystemExit(f"{model_dir / sub}/model.safetensors not found: --model_dir needs codec/ and s2s/ "
                                 f"model folders (the shipped ones are in {DEMO_MODEL_DIR})")
        codec = TeluCodec.from_pretrained(model_dir / "codec", map_location=device)
        s2s = None if codec_only else TeluguS2STransformer.from_pretrained(model_dir / "s2s", map_location=device).eval()
        return cls(codec, s2s, device, *args)

    @torch.inference_mode()
    def codes(self, path: str) -> torch.Tensor:
        if path not in self._codes:
            wav = torch.from_numpy(load_audio(path)).to(self.device)
            self._codes[path] = self.codec.encode(wav[None, None])[0].cpu()
        return self._codes[path]

    def context(self, pairs: list[dict]) -> ContextTurns | None:
        convs = []
        for p in pairs:
            turns = [t for h in p.get("history") or [] for t in ((ROLE_USER, self.codes(h["input_path"]), None),
                                                                 (ROLE_AGENT, self.codes(h["target_path"]),
                                                                  h.get("target_text") or None))]
            convs.append(turns[-self.s2s.config.max_context_turns:])
        if not any(convs):
            return None
        return ContextTurns.from_turns(convs).to(self.device)

    @torch.inference_mode()
    def round_trip(self, path: str) -> np.ndarray:
        return self.codec.decode(self.codes(path)[None].to(self.device))[0, 0].float().cpu().numpy()

    @torch.inference_mode()
    def reply(self, pair: dict, seed: int) -> tuple[np.ndarray, str | None]:
        """The decoded reply (T,) to one pair, one conversation at a time as in the server, and
        the words the model wrote before speaking (None without an inner monologue)."""
        torch.manual_seed(seed)
        codes = self.codes(pair["input_path"])[None].to(self.device)
        texts: list[list[str]] = []
        out = self.s2s.generate(codes, torch.tensor([pair["speaker_id"]], device=self.device),
                                torch.tensor([pair["emotion_id"]], device=self.device), max_new_tokens=self.max_steps,
                                context=self.context([pair]), temperature=self.temperature, top_k=self.top_k or None,
                                on_text=texts.append, say=[pair["target_text"]] if self.say_intended else None)[0]
        text = texts[0][0] if texts and not self.say_intended else None  # forced words say nothing of its choice
        if out.shape[1] == 0:
            return np.zeros(0, np.float32), text
        return self.codec.decode(out[None].to(self.device))[0, 0].float().cpu().numpy(), text


def cache_key(model_dir: Path, args) -> str:
    """What the replies depend on: the weights (their bytes), the split and the sampling settings."""
    h = hashlib.sha256()
    for sub in ("codec",) if args.oracle else ("codec", "s2s"):
        for f in weight_files(model_dir / sub):
            h.update(f.read_bytes())
    h.update(repr((args.split, args.temperature, args.top_k, args.max_reply_s, args.seed, args.oracle)
                  + ((True,) if args.say_intended else ())).encode())
    return h.hexdigest()[:16]


def cached_reply(path: Path, make) -> tuple[np.ndarray, str | None, bool]:
    """The reply stored at `path` (.npy, float32 as made; its words, if any, beside it in .txt),
    else make() -> (wav, text) and store it atomically, the words first (the .npy marks a finished
    reply). Returns (reply, text, whether it came from the cache)."""
    words = path.with_suffix(".txt")
    if path.is_file():
        return np.load(path), (words.read_text(encoding="utf-8") if words.is_file() else None), True
    wav, text = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is not None:
        with atomic_write(words) as tmp:
            tmp.write_text(text, encoding="utf-8")
    tmp = path.with_name(path.stem + ".partial.npy")
    np.save(tmp, wav)
    os.replace(tmp, path)
    return wav, text, False


# --------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workspace_arg(p)
    p.add_argument("--model_dir", default=str(DEMO_MODEL_DIR), help=f"codec/ + s2s/ model folders (default {DEMO_MODEL_DIR})")
    p.add_argument("--data_dir", default=None, help="the corpus (default <workspace>/telugu_synth)")
    p.add_argument("--split", default="test", choices=sorted(PAIRS_FILES) + [NEW_VOICES],
                   help="pairs to evaluate (default test); new_voices: the training questions spoken by the test "
                        "split's user voices (rendered now: the paraphrases were trained on, the voices never)")
    p.add_argument("--num_pairs", type=int, default=288, help="first-turn pairs, spread over the split (0: all)")
    p.add_argument("--num_context", type=int, default=48, help="'repeat that' and 'what did I ask' pairs each (0: all)")
    p.add_argument("--codec_files", type=int, default=48, help="recordings for the codec-only figures")
    p.add_argument("--print_every", type=int, default=24, help="progress line every N replies")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (the server's default 0.8; 0 greedy)")
    p.add_argument("--top_k", type=int, default=50, help="top-k sampling (the server's default 50; 0 off)")
    p.add_argument("--max_reply_s", type=float, default=6.0, help="longest reply (answers are at most ~4 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oracle", action="store_true",
                   help="calibration: score the codec round trip of each intended reference instead of the S2S "
                        "reply (the best this codec and metric allow)")
    p.add_argument("--say_intended", action="store_true",
                   help="a model with an inner monologue speaks the intended answer's words instead of its own: "
                        "how well it says an answer once chosen right (the speech half alone)")
    p.add_argument("--voice_refs", type=int, default=6,
                   help="train-split answers per voice and emotion for the voice classifier (default 6)")
    p.add_argument("--save_wavs", type=int, default=12, help="replies written as WAVs for listening")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/evaluation", help="output folder (default runs/evaluation)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir) if args.data_dir else workspace_from_args(args).synth_corpus
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    t0 = time.perf_counter()

    pairs, agent_rows = load_split(data_dir, "train" if args.split == NEW_VOICES else args.split)
    chosen = select_pairs(pairs, args.num_pairs, args.num_context)
    if args.split == NEW_VOICES:
        chosen = with_new_voices(chosen, data_dir, out)
    agent = Agent.load(Path(args.model_dir), device, args.temperature, args.top_k, args.max_reply_s, args.say_intended,
                       codec_only=args.oracle)
    if args.say_intended and (agent.s2s is None or agent.s2s.reply_head is None):
        raise SystemExit("--say_intended needs an S2S model with an inner monologue (reply_text_weight > 0)")

    refs = References(agent_rows, data_dir)
    cache = out / "replies_cache" / cache_key(Path(args.model_dir), args)
    results: dict[str, list[dict]] = {}
    saved = reused = 0
    for group, items in chosen.items():
        kind = "recall" if group == "what_did_i_ask" else "answer"
        rows = []
        for i, p in enumerate(items):
            pair_id = hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:12]
            wav, text, hit = cached_reply(
                cache / f"{group}_{i:04d}_{pair_id}.npy",
                lambda: (agent.round_trip(p["target_path"]), None) if args.oracle else agent.reply(p, seed=args.seed + i))
            reused += hit
            rows.append({**score_reply(wav, p, refs, kind, text), "wav": wav})
            if saved < args.save_wavs:
                name = f"{group}_{len(rows):03d}_{p['intent_id']}_{p['voice']}_{p['emotion']}.wav"
                save_audio(out / "replies" / name, wav if len(wav) else np.zeros(160, np.float32))
                saved += 1
            if len(rows) % args.print_every == 0 or len(rows) == len(items):
                done = sum(r["rank"] == 1 for r in rows)
                print(f"  {group}: {len(rows)}/{len(items)} replies, {done} nearest to the intended reply "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        results[group] = rows
    if reused:
        print(f"  {reused} replies reused from {cache} (an earlier run of the same weights and settings)", flush=True)

    first = results["first_turn"]
    report: dict = {"model_dir": str(args.model_dir), "data_dir": str(data_dir), "split": args.split,
                    "reply_source": "codec round trip of the intended reference (--oracle)" if args.oracle else
                    "S2S, speaking the intended answer's words (--say_intended)" if args.say_intended else "S2S",
                    "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
                    "max_reply_s": args.max_reply_s}
    for group, rows in results.items():
        report[group] = {"n": len(rows), "accuracy": round(accuracy(rows), 4), "top5": round(accuracy(rows, 5), 4),
                         "chance": round(float(np.mean([1 / max(r["candidates"], 1) for r in rows])), 4) if rows else None,
                         "capped": sum(r["reply_s"] >= args.max_reply_s - 0.02 for r in rows),
                         "median_reply_s": round(float(np.median([r["reply_s"] for r in rows])), 3) if rows else None}
        if rows and "text_match" in rows[0]:
            report[group]["text_accuracy"] = round(float(np.mean([r["text_match"] for r in rows])), 4)
    by_voice = defaultdict(list)
    for r in first:
        by_voice[r["voice"]].append(r)
    report["first_turn"]["by_voice"] = {v: round(accuracy(rs), 4) for v, rs in sorted(by_voice.items())}

    # Voices: the replies' speaker embeddings, classified against the train split's answers.
    encoder = voice_encoder()
    fit_rows = [r for r in agent_rows if r.get("split") == "train" and r.get("kind", "answer") == "answer"]
    if not fit_rows:
        raise SystemExit(f"{data_dir}/manifests/train.jsonl lists no agent answers to fit the voice classifier on: "
                         "rebuild the corpus (python make_telugu_speech.py --workers 2)")
    classifier = VoiceClassifier.fit(encoder, fit_rows, agent.round_trip, per_cell=args.voice_refs)
    embeds = [(r["voice"], encoder.embed_utterance(r["wav"])) for r in first if r["reply_s"] >= 0.3]
    correct, confusion = voice_confusion(embeds, classifier.predict)
    report["voices"] = {"n": len(embeds), "accuracy": round(correct / max(len(embeds), 1), 4), "confusion": confusion,
                        "reference": f"nearest (voice, emotion) centroid of {args.voice_refs} train-split answers "
                                     "per cell, through the codec"}

    # Emotions: shifts in the replies next to the shifts in the intended reference renderings.
    gen_rows = [r for r in first if r["reply_s"] >= 0.3]
    ref_rows = [{"emotion": p["emotion"], **prosody_shift(prosody_signature(load_audio(p["target_path"])),
                                                          refs.neutral_signature(p["voice"], p["target_text"]))}
                for p in chosen["first_turn"]]
    gen_table, ref_table = emotion_table(gen_rows), emotion_table(ref_rows)
    report["emotions"] = {"generated": gen_table, "reference": ref_table,
                          "agreement": signature_agreement(gen_table, ref_table)}

    # The codec alone on the split's recordings (user and agent).
    rows = read_manifest(data_dir / "manifests" / f"{'test' if args.split == NEW_VOICES else args.split}.jsonl")
    codec_rows = spread(rows, args.codec_files)
    metrics = defaultdict(list)
    with torch.inference_mode():
        for r in codec_rows:
            path = r["path"] if Path(r["path"]).is_absolute() else str(data_dir / r["path"])
            wav = load_audio(path)
            rec = agent.codec.decode(agent.codec.encode(torch.from_numpy(wav)[None, None].to(device)))[0, 0].cpu().numpy()
            for k, v in audio_metrics.all_metrics(wav, rec[: len(wav)]).items():
                metrics[k].append(v)
    report["codec"] = {k: round(float(np.mean(v)), 3) for k, v in metrics.items()} | {"n": len(codec_rows)}
    report["seconds"] = round(time.perf_counter() - t0, 1)

    for rows in results.values():
        for r in rows:
            r.pop("wav")
            for k in ("f0_hz", "f0_st", "energy_db", "voiced_ratio"):
                r[k] = None if not np.isfinite(r[k]) else round(float(r[k]), 3)
    write_json(out / "evaluation.json", {**report, "replies": results})
    md = markdown(report)
    (out / "evaluation.md").write_text(md)
    print(md)
    return report


def shown(path: str) -> str:
    """A path as the reader should see it: relative to the working folder when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def markdown(r: dict) -> str:
    lines = [f"Evaluation on the {r['split']} split ({shown(r['model_dir'])}; sampling T={r['temperature']}, "
             f"top-k {r['top_k']}" + ("" if r["reply_source"] == "S2S" else f"; replies: {r['reply_source']}") + ")", "",
             "| measure | result | chance / target |", "|---|---|---|"]
    for group, label, target in (("first_turn", "reply accuracy (nearest answer by DTW)", ">= 90%"),
                                 ("repeat_that", "'repeat that' reproduces the previous answer", "-"),
                                 ("what_did_i_ask", "'what did I ask' recalls the question", "-")):
        g = r[group]
        if g["n"]:
            capped = f"; {g['capped']} cut at {r['max_reply_s']:g} s" if g.get("capped") else ""
            lines.append(f"| {label} | {100 * g['accuracy']:.1f}% (top-5 {100 * g['top5']:.1f}%) of {g['n']}{capped} | "
                         f"chance {100 * g['chance']:.1f}%; {target} |")
            if "text_accuracy" in g:
                lines.append(f"| the same, by the words the model wrote before speaking (inner monologue) | "
                             f"{100 * g['text_accuracy']:.1f}% of {g['n']} | - |")
    lines.append(f"| voices told apart in replies | {100 * r['voices']['accuracy']:.1f}% of {r['voices']['n']} | >= 95% |")
    c = r["codec"]
    lines.append(f"| codec PESQ-WB / STOI / SNR | {c.get('pesq_wb', float('nan')):.2f} / {c.get('stoi', float('nan')):.3f} / "
                 f"{c.get('snr', float('nan')):.1f} dB ({c['n']} recordings) | - |")
    lines += ["", "Emotion signatures (shift against the same voice's neutral; generated / reference):", "",
              "| emotion | n | F0 (st) | energy (dB) | voiced time (x) |", "|---|---|---|---|---|"]
    gen, ref = r["emotions"]["generated"], r["emotions"]["reference"]
    for emo in EMOTIONS:
        if emo in gen and emo in ref:
            g, f = gen[emo], ref[emo]
            lines.append(f"| {emo} | {g['n']} | {g['f0_st']} / {f['f0_st']} | {g['energy_db']} / {f['energy_db']} | "
                         f"{g['voiced_ratio']} / {f['voiced_ratio']} |")
    agree = r["emotions"]["agreement"]
    if agree:
        lines += ["", "Agreement over the non-neutral emotions measured: " + "; ".join(
            f"{k} correlation {v['correlation']}, same sign {v['same_sign']}/{v['of']}" for k, v in agree.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
