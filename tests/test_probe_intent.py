"""probe_intent.py: the splits, the text ceiling, the augmentation and a classifier that learns."""

import json
import os

import numpy as np
import pytest
import torch

import probe_intent
from audio_io import save_audio
from config import SAMPLE_RATE, config_to_dict
from telugu_codec import CodecConfig, TeluCodec
from training import save_checkpoint

# two intents, two paraphrases each for training, a third (reworded) one in test
TEXTS = {
    "weather": ["what is the weather today", "will it rain today", "is the weather going to be hot"],
    "time": ["what time is it now", "tell me the hour", "do you know the time"],
}
TONES = {"weather": 300.0, "time": 900.0}


def row(split, intent, text, voice, path):
    return {"path": path, "text": text, "voice": voice, "emotion": "neutral", "role": "user",
            "intent_id": intent, "duration": 0.5, "split": split, "kind": "question"}


def write_corpus(root, audio=False):
    """A corpus of tone 'questions': each intent its own pitch, each voice its own level."""
    (root / "manifests").mkdir(parents=True)
    rows = {"train": [], "test": []}
    for intent, texts in TEXTS.items():
        for p, text in enumerate(texts):
            split = "test" if p == 2 else "train"
            voices = ["v_test"] if split == "test" else ["v1", "v2", "v3"]
            for v, voice in enumerate(voices):
                rel = f"wavs/{split}/user/q_{intent}_{p}_{voice}.wav"
                if audio:
                    t = np.arange(int(SAMPLE_RATE * (0.4 + 0.1 * p))) / SAMPLE_RATE
                    wav = (0.1 + 0.05 * v) * np.sin(2 * np.pi * TONES[intent] * (1 + 0.02 * v) * t)
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    save_audio(root / rel, wav)
                rows[split].append(row(split, intent, text, voice, rel))
    # an agent answer and a follow-up without an intent: not questions to probe
    rows["train"].append({**row("train", "weather", "it is sunny", "Arjun", "a.wav"), "role": "agent"})
    rows["train"].append(row("train", None, "repeat that", "v1", "r.wav"))
    rows["test"].append(row("test", "unknown_intent", "something new", "v_test", "u.wav"))
    for split, rs in rows.items():
        with open(root / "manifests" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rs)
    return rows


def test_splits(tmp_path):
    write_corpus(tmp_path)
    train, test = probe_intent.probe_split(tmp_path, "test")
    assert len(train) == 12 and {r["role"] for r in train} == {"user"}
    assert [r["intent_id"] for r in test] == ["weather", "time"]  # the unknown intent is dropped
    train, test = probe_intent.probe_split(tmp_path, "voices", ("v3",))
    assert {r["voice"] for r in test} == {"v3"} and "v3" not in {r["voice"] for r in train}
    train, _ = probe_intent.probe_split(tmp_path, "voices", ("v3",), max_train_voices=1, seed=5)
    assert len({r["voice"] for r in train}) == 1 and len(train) == 4
    with pytest.raises(ValueError, match="only 2 training voices"):
        probe_intent.probe_split(tmp_path, "voices", ("v3",), max_train_voices=3)
    with pytest.raises(ValueError, match="v9.*speak no training question"):
        probe_intent.probe_split(tmp_path, "voices", ("v9",))


@pytest.mark.parametrize("read", [probe_intent.nearest_paraphrase_intents, probe_intent.svm_intents])
def test_text_readers_use_shared_words(read):
    train = [(t, k) for k, ts in TEXTS.items() for t in ts[:2]]
    assert read(train, ["is the weather fine", "what hour is it now"]) == ["weather", "time"]


def test_augment_mel_keeps_bands_and_is_seeded():
    x = torch.randn(80, 200)
    a = probe_intent.augment_mel(x.clone(), torch.Generator().manual_seed(3))
    b = probe_intent.augment_mel(x.clone(), torch.Generator().manual_seed(3))
    assert a.shape[0] == 80 and 170 <= a.shape[1] <= 236
    assert torch.equal(a, b) and not torch.equal(a[:, :170], x[:, :170])


@pytest.mark.parametrize("kind", ["float", "codes"])
def test_probe_learns_a_separable_toy(kind):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def example(label):
        frames = int(torch.randint(40, 80, (), generator=gen))
        if kind == "codes":  # class k uses ids from its own half of the codebook
            return torch.randint(0, 32, (2, frames), generator=gen) + 32 * label
        x = torch.randn(3, frames, generator=gen)
        x[label] += 2.0
        return x

    labels = [i % 2 for i in range(64)]
    xs = [example(k) for k in labels]
    model = probe_intent.IntentProbe(kind, 2 if kind == "codes" else 3, 2, stride=4, dim=32, layers=2,
                                     codebook_size=64)
    curve = probe_intent.train_probe(model, xs[:48], torch.tensor(labels[:48]), xs[48:], torch.tensor(labels[48:]),
                                     steps=60, batch_size=16, eval_every=30, log=lambda *_: None)
    assert [r["step"] for r in curve] == [30, 60]
    assert curve[-1]["test_acc"] >= 0.9


def test_train_probe_draws_from_variants():
    """With variants, a training question is sometimes one of its other renderings: here only the
    variants carry the class, so the probe learns only if it draws them."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    labels = [i % 2 for i in range(48)]
    blank = [torch.zeros(3, 40) for _ in labels]

    def informative(label):
        x = torch.randn(3, 40, generator=gen)
        x[label] += 2.0
        return x

    variants = [[informative(k), informative(k)] for k in labels]
    test = [informative(k) for k in labels[:16]]
    model = probe_intent.IntentProbe("float", 3, 2, stride=4, dim=32, layers=2)
    curve = probe_intent.train_probe(model, blank, torch.tensor(labels), test, torch.tensor(labels[:16]), steps=60,
                                     batch_size=16, eval_every=60, variants=variants, log=lambda *_: None)
    assert curve[-1]["test_acc"] >= 0.9


def test_main_text_and_mel(tmp_path):
    write_corpus(tmp_path, audio=True)
    out = tmp_path / "out"
    report = probe_intent.main(["--data_dir", str(tmp_path), "--features", "text", "--out", str(out)])
    assert report["probe_sentences"] == 2 and report["intents"] == 2
    assert report["accuracy_nearest_paraphrase"] == report["accuracy_svm"] == report["accuracy"] == 1.0
    report = probe_intent.main(["--data_dir", str(tmp_path), "--features", "mel", "--augment", "--steps", "20",
                                "--eval_every", "10", "--out", str(out)])
    saved = json.loads((out / "mel_augmented_test.json").read_text())
    assert [r["step"] for r in saved["curve"]] == [10, 20] and saved["accuracy"] == report["accuracy"]
    assert saved["flags"]["augment"] is True
    with pytest.raises(SystemExit, match="use it with --features mel, codes or latent"):
        probe_intent.main(["--data_dir", str(tmp_path), "--features", "text", "--augment"])


@pytest.mark.parametrize("features", ["codes", "latent"])
def test_main_codec_features(tmp_path, features):
    """Codes come from the token cache (built on first use, shared with train_s2s.py); the latent is
    the codec's codebook vectors for them."""
    write_corpus(tmp_path, audio=True)
    torch.manual_seed(0)
    codec = TeluCodec(CodecConfig.preset("tiny"))
    codec_path = tmp_path / "codec.pt"
    save_checkpoint(codec_path, {"model_state": codec.state_dict(), "config": config_to_dict(codec.config)})
    args = ["--data_dir", str(tmp_path), "--features", features, "--codec_path", str(codec_path), "--steps", "4",
            "--eval_every", "2", "--out", str(tmp_path / "out")]
    report = probe_intent.main(args)
    assert report["train_questions"] == 12 and [r["step"] for r in report["curve"]] == [2, 4]
    assert len(list((tmp_path / "token_cache").rglob("shard-*.pt"))) >= 1
    assert (tmp_path / "out" / f"{features}_test.json").is_file()


def test_main_codes_augmented_renders_cached_copies(tmp_path, capsys):
    """--features codes --augment: perturb_voice renderings of each training question through the
    codec, cached, so a rerun (or --features latent) encodes nothing; perturb_voice is seeded."""
    rows = write_corpus(tmp_path, audio=True)
    torch.manual_seed(0)
    codec_path = tmp_path / "codec.pt"
    codec = TeluCodec(CodecConfig.preset("tiny"))
    save_checkpoint(codec_path, {"model_state": codec.state_dict(), "config": config_to_dict(codec.config)})
    args = ["--data_dir", str(tmp_path), "--features", "codes", "--augment", "--augment_copies", "2", "--workers", "1",
            "--codec_path", str(codec_path), "--steps", "4", "--eval_every", "2", "--out", str(tmp_path / "out")]
    report = probe_intent.main(args)
    assert report["augment_copies"] == 2 and "2 perturbed renderings" in report["method"]
    assert "rendering 24 perturbed copies" in capsys.readouterr().out  # 12 training questions x 2
    cache = list((tmp_path / "out").glob("perturbed_codes_*.pt"))
    assert len(cache) == 1
    copies = torch.load(cache[0])
    assert len(copies) == 24 and all(c.shape[0] == codec.n_codebooks for c in copies.values())
    train = [r for r in rows["train"] if r["role"] == "user" and r["intent_id"]]
    paths = {str(tmp_path / r["path"]) for r in train}
    assert {key.split("|")[0] for key, _ in copies} == paths  # keyed like the token cache: path|size|mtime
    probe_intent.main(args)
    assert "rendering" not in capsys.readouterr().out
    changed = tmp_path / train[0]["path"]
    os.utime(changed, ns=(changed.stat().st_mtime_ns + 10**9,) * 2)  # a rebuilt file: rendered again
    probe_intent.main(args)
    assert "rendering 2 perturbed copies" in capsys.readouterr().out
    # the latent reads the same cached copies, through the codec's codebooks
    report = probe_intent.main([a if a != "codes" else "latent" for a in args])
    assert "rendering" not in capsys.readouterr().out and report["augment_copies"] == 2
    assert (tmp_path / "out" / "latent_augmented_test.json").is_file()
    wav = np.sin(2 * np.pi * 220 * np.arange(SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32) * 0.3
    from train_s2s import perturb_voice

    a, b = perturb_voice(wav, 3), perturb_voice(wav, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, perturb_voice(wav, 4))
