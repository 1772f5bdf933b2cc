"""How much of the question the corpus teaches a model to read: intent probes of the user's turn.

    python probe_intent.py --features text --split test                    # perfect-transcript ceiling
    python probe_intent.py --features mel --split voices --steps 1500      # seen questions, new voices
    python probe_intent.py --features codes --split test --steps 1500      # what the S2S encoder sees

Reply accuracy (evaluate_agent.py) asks the S2S model to answer a question paraphrase it never
heard, spoken by a user voice it never heard. To answer it, a model has to know which of the
corpus's intents (172 answers, plus the two context questions) the question means. This script
measures how much of that is within reach of what the corpus teaches, one factor at a time, by
classifying each question's intent:

  text     the question's exact transcript, read two ways: the intent of its nearest training
           paraphrase (TF-IDF over character 3-grams within words, cosine), and a linear SVM over
           TF-IDF character 2- to 4-grams within words (the best of a few text classifiers on the
           val split). What a perfect recogniser gets that knows only the training paraphrases'
           words: a yardstick for the paraphrase half of the task. No audio.
  mel      80-band log-mel at 100 frames/s, normalised per utterance and band (CMVN)
  codes    the codec's token ids (8 x 1024, 200 frames/s), one learned embedding per id,
           summed over codebooks: the S2S encoder's own input
  latent   the codec's continuous latent for the same tokens (the codebook vectors' sum)

--augment perturbs the training questions: log-mel directly (augment_mel); codes and latent in
the audio, before the codec (perturb_voice: --augment_copies new pseudo-voices of each question,
cached).

The audio features go through one small classifier (`IntentProbe`: a strided input layer to
50 steps/s, four residual convolutions, attention pooling; 0.8M parameters on log-mel,
2.5M with the codes' embedding table), trained from scratch with AdamW on the training questions.

Splits (what is new at test time):
  test, val   that split's questions: paraphrases and user voices never trained on (what reply
              accuracy is measured on); trained on every training question
  voices      the training questions spoken by --held_out_voices: the paraphrases were trained on
              (by other voices), the voices are new; trained on the other voices' questions

Writes <out>/<features>_<split>.json (the accuracy curve, chance, counts, flags) and prints one
line per evaluation. Accuracy is reported at every --eval_every steps and at the end; the figure
to quote is the last one (no early stopping on the test questions).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from audio_io import load_audio, read_manifest, write_json
from config import DEMO_MODEL_DIR, SAMPLE_RATE, add_workspace_arg, workspace_from_args

FEATURES = ("text", "mel", "codes", "latent")
SPLITS = ("test", "val", "voices")
DEFAULT_HELD_OUT = ("fest_boy", "esp_m5", "esp_f2")
MEL_BANDS = 80
MEL_HOP = 160  # 10 ms
PROBE_STEP_HZ = 50  # the classifier's time resolution, the S2S model's step rate


# --------------------------------------------------------------------------------------
# Questions


def question_rows(data_dir: Path, split: str) -> list[dict]:
    """User questions (rows with an intent) of manifests/<split>.jsonl, paths absolute."""
    rows = read_manifest(data_dir / "manifests" / f"{split}.jsonl")
    return [r for r in rows if r["role"] == "user" and r.get("intent_id")]


def probe_split(data_dir: Path, split: str, held_out_voices=DEFAULT_HELD_OUT, max_train_voices: int = 0,
                seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) for one of SPLITS; test intents outside training are dropped.

    `max_train_voices` > 0 trains on that many of the training user voices (a seeded choice among
    those not held out): how accuracy grows with the number of voices."""
    train = question_rows(data_dir, "train")
    if split == "voices":
        voices = {r["voice"] for r in train}
        unknown = sorted(set(held_out_voices) - voices)
        if unknown:
            raise ValueError(f"--held_out_voices {unknown} speak no training question; "
                             f"the training voices are {sorted(voices)}")
        test = [r for r in train if r["voice"] in held_out_voices]
        train = [r for r in train if r["voice"] not in held_out_voices]
    else:
        test = question_rows(data_dir, split)
    if max_train_voices:
        voices = sorted({r["voice"] for r in train})
        if max_train_voices > len(voices):
            raise ValueError(f"--max_train_voices {max_train_voices}: only {len(voices)} training voices are left")
        keep = set(np.random.default_rng(seed).permutation(voices)[:max_train_voices].tolist())
        train = [r for r in train if r["voice"] in keep]
    known = {r["intent_id"] for r in train}
    test = [r for r in test if r["intent_id"] in known]
    if not train or not test:
        raise ValueError(f"no questions to probe: {len(train)} training and {len(test)} {split} questions "
                         "with an intent; build the corpus first (python make_telugu_speech.py)")
    return train, test


# --------------------------------------------------------------------------------------
# Text readers: what the exact words give


def nearest_paraphrase_intents(train: list[tuple[str, str]], queries: list[str]) -> list[str]:
    """Intent of each query's nearest training sentence (TF-IDF cosine, character 3-grams within words).

    `train`: (sentence, intent) pairs; sentences spoken by several voices count once."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    sentences = dict(train)
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3))  # rows L2-normalised: dot = cosine
    known = vectorizer.fit_transform(list(sentences))
    nearest = (vectorizer.transform(queries) @ known.T).toarray().argmax(1)
    intents = list(sentences.values())
    return [intents[i] for i in nearest]


def svm_intents(train: list[tuple[str, str]], queries: list[str]) -> list[str]:
    """Intent of each query by a linear SVM over TF-IDF character 2- to 4-grams (within words),
    trained on the distinct training sentences."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    sentences = dict(train)
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)
    svm = LinearSVC(C=1.0, random_state=0).fit(vectorizer.fit_transform(list(sentences)), list(sentences.values()))
    return [str(k) for k in svm.predict(vectorizer.transform(queries))]


# --------------------------------------------------------------------------------------
# Audio features


def log_mel_cmvn(wav: np.ndarray) -> torch.Tensor:
    """(T,) 16 kHz audio -> (80, frames) log-mel, each band mean- and variance-normalised over the
    utterance (removes the microphone EQ and level the corpus augments with)."""
    import librosa

    mel = librosa.feature.melspectrogram(y=wav.astype(np.float32), sr=SAMPLE_RATE, n_fft=400, hop_length=MEL_HOP,
                                         n_mels=MEL_BANDS)
    x = torch.from_numpy(np.log(mel + 1e-5)).float()
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)


def augment_mel(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Voice and rate perturbation of one (80, frames) log-mel for training (VTLP-like band warp by
    0.85-1.15, tempo 0.85-1.15, SpecAugment: two band masks of up to 10, two time masks of up to 20)."""

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    bands, frames = x.shape
    warp = uniform(0.85, 1.15)  # > 1 moves formants up, as a shorter vocal tract does
    src = (torch.arange(bands, dtype=torch.float32) / warp).clamp(max=bands - 1)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=bands - 1)
    frac = (src - lo)[:, None]
    x = x[lo] * (1 - frac) + x[hi] * frac
    new_frames = max(2, round(frames / uniform(0.85, 1.15)))
    x = F.interpolate(x[None], size=new_frames, mode="linear", align_corners=False)[0]
    for size, width in ((bands, 10), (new_frames, 20)):
        for _ in range(2):
            w = int(torch.randint(0, width + 1, (), generator=gen))
            start = int(torch.randint(0, max(1, size - w), (), generator=gen))
            if size == bands:
                x[start : start + w] = 0.0
            else:
                x[:, start : start + w] = 0.0
    return x


def load_features(rows: list[dict], features: str, args, data_dir: Path, log=print) -> list[torch.Tensor]:
    """One (C, frames) tensor per row: float log-mel for mel, int64 token ids for codes and latent
    (latents_of turns those into the codec's latent)."""
    if features == "mel":
        return [log_mel_cmvn(load_audio(r["path"])) for r in rows]
    from train_s2s import build_token_cache, codec_identity
    from training import DistContext

    codec_path = Path(args.codec_path)
    cache_root = Path(args.token_cache) if args.token_cache else data_dir / "token_cache"

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    codes = build_token_cache([r["path"] for r in rows], cache_root / codec_identity(codec_path), codec_path, ctx, log)
    return [codes[r["path"]].long() for r in rows]


@torch.no_grad()
def latents_of(codes: list[torch.Tensor], variants: list[list[torch.Tensor]] | None, codec_path: Path):
    """Token ids (K, F) -> the codec's latent for them (D, F), the codebook vectors' sum, divided
    by one global scale taken over `codes` (keeps relative levels); `variants` go through the same."""
    from telugu_codec import TeluCodec

    codec = TeluCodec.from_pretrained(codec_path)

    def latent(c):
        return codec.quantizer.decode(c.long()[None])[0]

    latents = [latent(c) for c in codes]
    scale = torch.cat(latents, dim=1).std().item() or 1.0
    if variants is not None:
        variants = [[latent(c) / scale for c in v] for v in variants]
    return [z / scale for z in latents], variants


# --------------------------------------------------------------------------------------
# The classifier


class IntentProbe(nn.Module):
    """(B, C, frames) features -> (B, n_intents) logits.

    `in_kind`: "codes" (int ids, C codebooks of `codebook_size`), else float channels."""

    def __init__(self, in_kind: str, in_channels: int, n_intents: int, stride: int, dim: int = 192,
                 layers: int = 4, codebook_size: int = 1024, dropout: float = 0.3):
        super().__init__()
        self.in_kind, self.stride, self.codebook_size, self.dropout = in_kind, stride, codebook_size, dropout
        if in_kind == "codes":
            self.embed = nn.Embedding(in_channels * codebook_size, dim)
            in_channels = dim
        self.front = nn.Conv1d(in_channels, dim, stride, stride=stride)
        self.convs = nn.ModuleList([nn.Conv1d(dim, dim, 5, padding=2) for _ in range(layers)])
        self.norms = nn.ModuleList([nn.GroupNorm(1, dim) for _ in range(layers)])
        self.attend = nn.Linear(dim, 1)
        self.out = nn.Linear(dim, n_intents)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.in_kind == "codes":  # (B, K, F) ids -> (B, dim, F)
            offsets = torch.arange(x.shape[1], device=x.device)[None, :, None] * self.codebook_size
            x = self.embed(x + offsets).sum(1).transpose(1, 2)
        h = self.front(x)  # (B, dim, steps)
        for conv, norm in zip(self.convs, self.norms):
            h = h + F.dropout(F.gelu(norm(conv(h))), self.dropout, self.training)
        h = h.transpose(1, 2)  # (B, steps, dim)
        valid = torch.arange(h.shape[1], device=h.device)[None] < (lengths[:, None] // self.stride).clamp(min=1)
        weights = self.attend(h).squeeze(-1).masked_fill(~valid, float("-inf")).softmax(-1)
        return self.out((weights[..., None] * h).sum(1))


def pad_batch(xs: list[torch.Tensor], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([xs[i].shape[1] for i in ids])
    out = torch.zeros(len(ids), xs[ids[0]].shape[0], int(lengths.max()), dtype=xs[ids[0]].dtype)
    for j, i in enumerate(ids):
        out[j, :, : xs[i].shape[1]] = xs[i]
    return out, lengths


@torch.no_grad()
def accuracy(model: IntentProbe, xs: list[torch.Tensor], labels: torch.Tensor, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(xs), batch_size):
        ids = list(range(start, min(start + batch_size, len(xs))))
        x, lengths = pad_batch(xs, ids)
        correct += int((model(x, lengths).argmax(-1) == labels[ids]).sum())
    model.train()
    return correct / len(xs)


def train_probe(model: IntentProbe, train_x, train_y, test_x, test_y, steps: int, batch_size: int = 32,
                lr: float = 1e-3, eval_every: int = 250, seed: int = 0, augment=None, variants=None,
                log=print) -> list[dict]:
    """AdamW on random batches, each training input passed through `augment(x, generator)` when
    given. `variants[i]`: other renderings of training question i; each time the question is
    drawn, one of train_x[i] and its variants is (uniformly). Returns the curve
    [{step, loss, train_acc, test_acc, seconds}]."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    curve, losses, start = [], [], time.time()
    for step in range(1, steps + 1):
        ids = torch.randint(len(train_x), (batch_size,), generator=gen).tolist()
        xs = [train_x[i] for i in ids]
        if variants is not None:
            xs = [([x] + variants[i])[int(torch.randint(1 + len(variants[i]), (), generator=gen))] for x, i in zip(xs, ids)]
        if augment is not None:
            xs = [augment(x.clone(), gen) for x in xs]
        x, lengths = pad_batch(xs, list(range(len(ids))))
        loss = F.cross_entropy(model(x, lengths), train_y[ids])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            # training accuracy on a fixed sample as large as the test set: shows memorising
            sample = list(range(0, len(train_x), max(1, len(train_x) // max(1, len(test_x)))))
            row = {"step": step, "loss": float(np.mean(losses)), "seconds": round(time.time() - start, 1),
                   "train_acc": accuracy(model, [train_x[i] for i in sample], train_y[sample]),
                   "test_acc": accuracy(model, test_x, test_y)}
            losses = []
            curve.append(row)
            log(f"step {step}: loss {row['loss']:.3f}, training questions {row['train_acc']:.1%}, "
                f"probe questions {row['test_acc']:.1%} ({row['seconds']:.0f} s)")
    return curve


# --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workspace_arg(p)
    p.add_argument("--data_dir", default=None, help="corpus root with manifests/ (default: <workspace>/telugu_synth)")
    p.add_argument("--features", default="text", choices=FEATURES, help="what the probe reads (see above)")
    p.add_argument("--split", default="test", choices=SPLITS, help="which questions to probe (see above)")
    p.add_argument("--held_out_voices", default=",".join(DEFAULT_HELD_OUT),
                   help="with --split voices: comma-separated training user voices to test on")
    p.add_argument("--max_train_voices", type=int, default=0,
                   help="train on only this many user voices (a seeded choice; 0: all)")
    p.add_argument("--codec_path", default=str(DEMO_MODEL_DIR / "codec" / "model.safetensors"),
                   help="codec for --features codes / latent (default: the shipped one)")
    p.add_argument("--token_cache", default=None, help="token cache folder (default: <data_dir>/token_cache, "
                   "shared with train_s2s.py)")
    p.add_argument("--steps", type=int, default=1500, help="classifier training steps")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.3, help="dropout after each convolution")
    p.add_argument("--augment", action="store_true",
                   help="perturb training questions: with --features mel on the log-mel (band warp, tempo, SpecAugment "
                        "masks); with codes / latent in the audio, --augment_copies renderings each (perturb_voice), "
                        "encoded by the codec")
    p.add_argument("--augment_copies", type=int, default=3,
                   help="with --features codes / latent --augment: perturbed renderings per training question (cached)")
    p.add_argument("--workers", type=int, default=2, help="processes rendering the perturbed copies")
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", default="runs/probe_intent", help="folder for <features>_<split>.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    data_dir = Path(args.data_dir) if args.data_dir else workspace_from_args(args).synth_corpus
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.augment and args.features == "text":
        raise SystemExit("--augment perturbs audio features: use it with --features mel, codes or latent")
    held_out = tuple(v for v in args.held_out_voices.split(",") if v)
    train, test = probe_split(data_dir, args.split, held_out, args.max_train_voices, args.seed)
    intents = sorted({r["intent_id"] for r in train})
    report = {"features": args.features, "split": args.split, "data_dir": str(data_dir),
              "train_voices": sorted({r["voice"] for r in train}), "train_questions": len(train),
              "probe_questions": len(test), "intents": len(intents),
              "chance": 1 / len(intents), "train_sentences": len({r["text"] for r in train}),
              "probe_sentences": len({r["text"] for r in test}),
              "held_out_voices": list(held_out) if args.split == "voices" else None}
    print(f"{args.features} / {args.split}: {len(train)} training questions ({report['train_sentences']} sentences), "
          f"{len(test)} to probe ({report['probe_sentences']} sentences), {len(intents)} intents, "
          f"chance {report['chance']:.1%}")

    if args.features == "text":
        # every distinct probe sentence once: the voices reading it do not matter to a transcript
        sentences = {r["text"]: r["intent_id"] for r in test}
        known = [(r["text"], r["intent_id"]) for r in train]
        for name, read in (("nearest_paraphrase", nearest_paraphrase_intents), ("svm", svm_intents)):
            guesses = read(known, list(sentences))
            report[f"accuracy_{name}"] = float(np.mean([g == sentences[s] for g, s in zip(guesses, sentences)]))
            print(f"text / {args.split}: {name}: {report[f'accuracy_{name}']:.1%}")
        report["accuracy"] = max(report["accuracy_nearest_paraphrase"], report["accuracy_svm"])
        report["method"] = ("the better of: nearest training paraphrase (TF-IDF character 3-grams within words), "
                            "linear SVM (TF-IDF character 2-4-grams within words)")
    else:
        torch.manual_seed(args.seed)
        start = time.time()
        features = load_features(train + test, args.features, args, data_dir)
        train_x, test_x = features[: len(train)], features[len(train) :]
        variants = None
        if args.augment and args.features != "mel":
            from train_s2s import codec_identity, perturbed_code_copies

            cache = Path(args.out) / f"perturbed_codes_{codec_identity(Path(args.codec_path))}.pt"
            variants = [[c.long() for c in v] for v in perturbed_code_copies(
                [r["path"] for r in train], args.augment_copies, Path(args.codec_path), cache, args.workers)]
            report["augment_copies"] = args.augment_copies
        ids = args.features == "codes"
        if args.features == "latent":  # one latent scale for train and test
            features, variants = latents_of(features, variants, Path(args.codec_path))
            train_x, test_x = features[: len(train)], features[len(train) :]
        report["feature_seconds"] = round(time.time() - start, 1)
        index = {k: i for i, k in enumerate(intents)}
        train_y = torch.tensor([index[r["intent_id"]] for r in train])
        test_y = torch.tensor([index[r["intent_id"]] for r in test])
        stride = 2 if args.features == "mel" else 4  # to 50 steps/s from 100 / 200 frames/s
        n_ids = 1 + max(int(x.max()) for x in itertools.chain(features, *(variants or []))) if ids else 0
        model = IntentProbe("codes" if ids else "float", train_x[0].shape[0], len(intents), stride,
                            dropout=args.dropout, codebook_size=n_ids)
        report["parameters"] = sum(p.numel() for p in model.parameters())
        report["curve"] = train_probe(model, train_x, train_y, test_x, test_y, args.steps, args.batch_size,
                                      args.learning_rate, args.eval_every, args.seed,
                                      augment_mel if args.features == "mel" and args.augment else None, variants)
        report["accuracy"] = report["curve"][-1]["test_acc"]
        report["method"] = (f"IntentProbe on {args.features}, {args.steps} steps of {args.batch_size}"
                            + ("" if not args.augment else ", augmented" if args.features == "mel" else
                               f", augmented ({args.augment_copies} perturbed renderings of each training question)"))
    print(f"{args.features} / {args.split}: intent accuracy {report['accuracy']:.1%} (chance {report['chance']:.1%})")
    name = (args.features + ("_augmented" if args.augment else "")
            + (f"_{args.max_train_voices}voices" if args.max_train_voices else ""))
    out = Path(args.out) / f"{name}_{args.split}.json"
    write_json(out, {**report, "flags": vars(args)})
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
