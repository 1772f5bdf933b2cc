"""evaluate_agent.py: the DTW answer matcher picks the right rendering, the emotion and voice
summaries compute what they say, and the whole evaluation runs on a small fake corpus."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import evaluate_agent as ev
from audio_io import save_audio, write_json, write_manifest

SR = 16000


def glide(f_start: float, f_end: float, seconds: float, rate: float = 1.0, seed: int = 0) -> np.ndarray:
    """A harmonic tone gliding from f_start to f_end (a stand-in for an utterance), played `rate`
    times slower, with a little noise."""
    n = int(seconds * rate * SR)
    f = np.linspace(f_start, f_end, n)
    phase = 2 * np.pi * np.cumsum(f) / SR
    wav = sum(0.2 / k * np.sin(k * phase) for k in range(1, 6))
    return (wav + 0.005 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def test_dtw_picks_the_same_utterance_spoken_slower():
    refs = {"rise": glide(150, 400, 1.0), "fall": glide(400, 150, 1.0), "flat": glide(250, 260, 1.0),
            "wave": np.concatenate([glide(150, 400, 0.5), glide(400, 150, 0.5)])}
    feats = {k: ev.log_mel(v) for k, v in refs.items()}
    for name, wav in refs.items():
        assert ev.rank_candidates(wav, feats)[0] == name
    slower_fall = glide(400, 150, 1.0, rate=1.3, seed=1)  # the tempo changes, the content does not
    assert ev.rank_candidates(slower_fall, feats)[0] == "fall"
    assert ev.dtw_cost(feats["rise"], feats["rise"]) == pytest.approx(0.0, abs=1e-6)
    assert ev.dtw_cost(feats["rise"], feats["rise"][:0]) == math.inf


def test_prosody_shift_against_the_same_text_spoken_neutrally():
    from prosody import ProsodySignature

    base = ProsodySignature(f0_median_hz=200.0, f0_range_st=2.0, energy_db=-20.0, voiced_seconds=2.0, duration_s=2.5)
    happy = ProsodySignature(f0_median_hz=200.0 * 2 ** (2 / 12), f0_range_st=3.0, energy_db=-18.0, voiced_seconds=1.8,
                             duration_s=2.2)
    shift = ev.prosody_shift(happy, base)
    assert shift["f0_st"] == pytest.approx(2.0) and shift["energy_db"] == pytest.approx(2.0)
    assert shift["voiced_ratio"] == pytest.approx(0.9)
    assert all(math.isnan(v) for v in ev.prosody_shift(happy, None).values())  # no neutral rendering: not measured


def test_emotion_table_removes_the_shift_every_reply_shares():
    """Replies all 1 st low and 3 dB quiet (a codec's bias, say) still show each emotion's own
    signature, and agree in sign with the design; replies that ignore emotion do not."""
    design = {"neutral": (0.0, 0.0, 1.0), "happy": (2.0, 2.0, 0.9), "sad": (-3.0, -6.0, 1.2)}
    rows, biased, flat = [], [], []
    for emo, (st, db, ratio) in design.items():
        for _ in range(3):
            rows.append({"emotion": emo, "f0_st": st, "energy_db": db, "voiced_ratio": ratio})
            biased.append({"emotion": emo, "f0_st": st - 1.0, "energy_db": db - 3.0, "voiced_ratio": ratio * 1.1})
            flat.append({"emotion": emo, "f0_st": -1.0, "energy_db": -3.0, "voiced_ratio": 1.1})
    ref, gen = ev.emotion_table(rows), ev.emotion_table(biased)
    assert ref["happy"] == {"n": 3, "f0_st": 2.0, "energy_db": 2.0, "voiced_ratio": 0.9}
    assert gen["sad"] == {"n": 3, "f0_st": -3.0, "energy_db": -6.0, "voiced_ratio": 1.2}
    assert gen["neutral"]["f0_st"] == 0.0 and gen["neutral"]["voiced_ratio"] == 1.0
    agree = ev.signature_agreement(gen, ref)
    assert agree["f0_st"] == {"correlation": 1.0, "same_sign": 2, "of": 2}
    ignored = ev.signature_agreement(ev.emotion_table(flat), ref)
    assert ignored["energy_db"]["same_sign"] == 0 and ignored["voiced_ratio"]["same_sign"] == 0


def test_voice_confusion_counts():
    predict = lambda e: "A" if e[0] > e[1] else "B"  # noqa: E731
    correct, confusion = ev.voice_confusion([("A", np.array([0.9, 0.1])), ("A", np.array([0.2, 0.8])),
                                               ("B", np.array([0.0, 1.0]))], predict)
    assert correct == 2 and confusion == {"A": {"A": 1, "B": 1}, "B": {"B": 1}}


class VectorEncoder:
    """A stand-in speaker encoder: the 'audio' is the embedding."""

    def embed_utterance(self, wav):
        return np.asarray(wav, dtype=np.float64)


def test_voice_classifier_answers_with_the_nearest_cells_voice():
    """Centroids per (voice, emotion) cell of the round-tripped references, at most per_cell each;
    an utterance gets its nearest cell's voice, where one centroid per voice would have missed."""
    audio = {"a_n1": [1.0, 0.0, 0.0], "a_n2": [1.0, 0.1, 0.0], "a_s": [0.0, 1.0, 0.0],
             "b_n": [0.0, 0.0, 1.0], "b_s": [0.7, 0.7, 0.1]}
    rows = [{"path": "a_n1", "voice": "A", "emotion": "neutral"}, {"path": "a_n2", "voice": "A", "emotion": "neutral"},
            {"path": "a_s", "voice": "A", "emotion": "sad"}, {"path": "b_n", "voice": "B", "emotion": "neutral"},
            {"path": "b_s", "voice": "B", "emotion": "sad"}]
    heard = []

    def round_trip(path):
        heard.append(path)
        return audio[path]

    clf = ev.VoiceClassifier.fit(VectorEncoder(), rows, round_trip, per_cell=1)
    assert sorted(clf.cells) == [("A", "neutral"), ("A", "sad"), ("B", "neutral"), ("B", "sad")]
    assert len(heard) == 4 and len([p for p in heard if p.startswith("a_n")]) == 1  # one per cell
    query = np.array([0.6, 0.75, 0.1])
    assert clf.predict(query) == "B"  # the sad-B cell; the voices' own centroids would say A
    voice_a, voice_b = ev.unit(np.add(audio["a_n1"], audio["a_s"])), ev.unit(np.add(audio["b_n"], audio["b_s"]))
    assert query @ voice_a > query @ voice_b
    assert clf.predict(np.array([0.0, 0.1, 2.0])) == "B" and clf.predict(np.array([0.9, 0.0, 0.0])) == "A"
    with pytest.raises(ValueError, match="no reference recordings"):
        ev.VoiceClassifier({})


def test_spread_is_even_and_deterministic():
    assert ev.spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert ev.spread([1, 2], 5) == [1, 2] and ev.spread([1, 2], 0) == [1, 2]


@pytest.fixture(scope="module")
def fake_corpus(tmp_path_factory):
    """Three answers and a recall line rendered as glides in two voices x two emotions, user
    questions, first-turn and context pairs, and tiny random models."""
    from s2s_transformer import S2SConfig, TeluguS2STransformer
    from telugu_codec import CodecConfig, TeluCodec

    root = tmp_path_factory.mktemp("corpus")
    answers = {"a1": (150, 400), "a2": (400, 150), "a3": (250, 260)}
    rows, pairs, train_rows = [], [], []
    for split, out in (("train", train_rows), ("test", rows)):  # the voice classifier fits on the train split's
        for voice, shift in (("Arjun", 1.0), ("Priya", 1.6)):
            for emotion, rate in (("neutral", 1.0), ("sad", 1.2)):
                for text, (f0, f1) in {**answers, "r1": (300, 200)}.items():
                    rel = f"wavs/{split}/agent/{text}_{voice}_{emotion}.wav"
                    save_audio(root / rel, glide(f0 * shift, f1 * shift, 0.6, rate))
                    out.append({"path": rel, "text": text, "voice": voice, "emotion": emotion, "role": "agent",
                                "kind": "recall" if text == "r1" else "answer", "split": split, "duration": 0.6,
                                "intent_id": text})
    for i, text in enumerate(answers):
        q = f"wavs/test/user/q{i}.wav"
        save_audio(root / q, glide(200 + 50 * i, 300, 0.5, seed=i))
        rows.append({"path": q, "text": f"q{i}", "role": "user", "split": "test", "duration": 0.5, "intent_id": f"i{i}",
                     "voice": "u", "emotion": "neutral", "kind": "question"})
        for voice, sid in (("Arjun", 0), ("Priya", 3)):
            pairs.append({"input_path": q, "target_path": f"wavs/test/agent/{text}_{voice}_neutral.wav", "speaker_id": sid,
                          "emotion_id": 0, "target_text": text, "intent_id": f"i{i}", "voice": voice, "emotion": "neutral",
                          "history": []})
    first = {"input_path": "wavs/test/user/q0.wav", "target_path": "wavs/test/agent/a1_Arjun_sad.wav"}
    pairs.append({"input_path": "wavs/test/user/q1.wav", "target_path": "wavs/test/agent/a1_Arjun_sad.wav", "speaker_id": 0,
                  "emotion_id": 2, "target_text": "a1", "intent_id": "ctx_repeat_that", "voice": "Arjun", "emotion": "sad",
                  "history": [first]})
    pairs.append({"input_path": "wavs/test/user/q2.wav", "target_path": "wavs/test/agent/r1_Arjun_sad.wav", "speaker_id": 0,
                  "emotion_id": 2, "target_text": "r1", "intent_id": "ctx_what_did_i_ask", "voice": "Arjun",
                  "emotion": "sad", "history": [first]})
    write_manifest(root / "manifests" / "test.jsonl", rows)
    write_manifest(root / "manifests" / "train.jsonl", train_rows)
    write_json(root / "metadata" / "test_pairs.json", pairs)
    torch.manual_seed(0)
    TeluCodec(CodecConfig.preset("tiny")).save(root / "models" / "codec")
    TeluguS2STransformer(S2SConfig.preset("tiny")).save(root / "models" / "s2s")
    return root


def run_eval(root, tmp_path, *extra):
    return ev.main(["--model_dir", str(root / "models"), "--data_dir", str(root), "--out", str(tmp_path),
                    "--max_reply_s", "0.5", "--codec_files", "2", "--threads", "1", *extra])


def test_evaluation_runs_on_a_fake_corpus(fake_corpus, tmp_path):
    report = run_eval(fake_corpus, tmp_path, "--save_wavs", "2")
    assert report["reply_source"] == "S2S"
    assert report["first_turn"]["n"] == 6 and report["repeat_that"]["n"] == 1 and report["what_did_i_ask"]["n"] == 1
    assert report["first_turn"]["chance"] == pytest.approx(1 / 3, abs=1e-3)  # three answers per voice and emotion
    for group in ("first_turn", "repeat_that", "what_did_i_ask"):
        assert 0.0 <= report[group]["accuracy"] <= report[group]["top5"] <= 1.0
    assert report["voices"]["n"] <= 6 and set(report["voices"]["confusion"]) <= {"Arjun", "Priya"}
    assert 0.0 < report["codec"]["n"] == 2
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert len(saved["replies"]["first_turn"]) == 6 and "wav" not in saved["replies"]["first_turn"][0]
    assert "reply accuracy" in (tmp_path / "evaluation.md").read_text()
    assert len(list((tmp_path / "replies").glob("*.wav"))) == 2


def test_a_killed_evaluation_continues_with_the_same_replies(fake_corpus, tmp_path, monkeypatch):
    first = run_eval(fake_corpus, tmp_path)
    cached = sorted((tmp_path / "replies_cache").glob("*/*.npy"))
    assert len(cached) == 8  # 6 first turns + 1 + 1 context turns, one file each

    # a run killed after 3 replies: the rest is made again, the 3 are not
    for path in cached[3:]:
        path.unlink()
    made = []
    real_reply = ev.Agent.reply
    monkeypatch.setattr(ev.Agent, "reply", lambda self, p, seed: made.append(seed) or real_reply(self, p, seed))
    again = run_eval(fake_corpus, tmp_path)
    assert len(made) == 5
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(again) == strip(first)  # the same replies, the same scores

    made.clear()
    run_eval(fake_corpus, tmp_path, "--temperature", "0.5")  # other settings: other replies
    assert len(made) == 8 and len(list((tmp_path / "replies_cache").iterdir())) == 2


def test_oracle_replies_score_the_metric_itself(fake_corpus, tmp_path, monkeypatch):
    """--oracle scores a reference instead of the S2S reply: with a "codec" that slows speech down
    by 15% (pitch kept) and adds noise (so no reply equals its reference), every reply must still
    be matched to its own answer, context turns included."""
    import librosa

    def distorted(self, path):
        slow = librosa.effects.time_stretch(ev.load_audio(path), rate=1 / 1.15)
        return slow + 0.01 * np.random.default_rng(0).standard_normal(len(slow)).astype(np.float32)

    monkeypatch.setattr(ev.Agent, "round_trip", distorted)
    report = run_eval(fake_corpus, tmp_path, "--oracle")
    assert report["reply_source"].startswith("codec round trip")
    assert report["first_turn"]["accuracy"] == report["repeat_that"]["accuracy"] == report["what_did_i_ask"]["accuracy"] == 1.0


def test_missing_models_and_corpus_say_what_to_do(fake_corpus, tmp_path):
    with pytest.raises(SystemExit, match="model.safetensors not found"):
        ev.main(["--model_dir", str(tmp_path), "--data_dir", str(fake_corpus), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="make_telugu_speech.py"):
        ev.main(["--model_dir", str(fake_corpus / "models"), "--data_dir", str(tmp_path), "--out", str(tmp_path / "o")])


def test_system_test_judges_reply_accuracy_on_a_corpus(fake_corpus, monkeypatch):
    """system_test.py's check 5 scores replies as evaluate_agent.py does: a model whose replies are
    the intended answers passes, random tiny models fail, no corpus means not checked."""
    import argparse

    import system_test
    from s2s_transformer import TeluguS2STransformer
    from telugu_codec import TeluCodec

    codec = TeluCodec.from_pretrained(fake_corpus / "models" / "codec")
    s2s = TeluguS2STransformer.from_pretrained(fake_corpus / "models" / "s2s")
    args = argparse.Namespace(data_dir=str(fake_corpus), quality_pairs=4, target_reply_accuracy=0.9)
    setup = system_test.Setup(codec, s2s, torch.device("cpu"), False, None, None, args)
    random_models = system_test.check_s2s_quality(setup)
    assert random_models.values["pairs"] == 4 and random_models.values["chance"] == pytest.approx(1 / 3, abs=1e-3)
    assert random_models.status == "FAIL" and random_models.values["accuracy"] < 0.9
    monkeypatch.setattr(ev.Agent, "reply", lambda self, pair, seed: (ev.load_audio(pair["target_path"]), None))
    perfect = system_test.check_s2s_quality(setup)
    assert perfect.status == "PASS" and perfect.values["accuracy"] == 1.0
    assert system_test.check_s2s_quality(system_test.Setup(codec, s2s, torch.device("cpu"), False, None, None,
                                                           argparse.Namespace(**{**vars(args), "data_dir": None}))
                                         ).status == "NOT_CHECKED"


def test_the_words_a_model_writes_are_scored_and_kept_with_its_replies(fake_corpus, tmp_path):
    """A model with an inner monologue: each reply's words are kept beside it in the replies
    cache (a rerun reads them back), scored against the intended answer's words, and reported."""
    import shutil

    from s2s_transformer import S2SConfig, TeluguS2STransformer

    models = tmp_path / "models"
    shutil.copytree(fake_corpus / "models" / "codec", models / "codec")
    torch.manual_seed(0)
    s2s = TeluguS2STransformer(S2SConfig.preset("tiny", reply_text_weight=1.0, reply_vocab=["అమ్మ", "నాన్న"],
                                                max_reply_words=2))
    with torch.no_grad():
        s2s.reply_head.bias[0] = -50.0  # writes both words it may: the checks below are not about empty texts
    s2s.save(models / "s2s")
    args = ["--model_dir", str(models), "--data_dir", str(fake_corpus), "--out", str(tmp_path / "eval"),
            "--max_reply_s", "0.5", "--codec_files", "2", "--threads", "1"]
    first = ev.main(args)
    words = sorted((tmp_path / "eval" / "replies_cache").glob("*/*.txt"))
    assert len(words) == 8 and all(len(w.read_text().split()) == 2 and set(w.read_text().split()) <= {"అమ్మ", "నాన్న"}
                                   for w in words)
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["replies"]["first_turn"]
    assert [r["reply_text"] for r in saved] == [w.read_text() for w in words if w.name.startswith("first_turn")]
    assert "text_accuracy" in first["first_turn"] and "by the words the model wrote" in (tmp_path / "eval" / "evaluation.md").read_text()
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(ev.main(args)) == strip(first)  # the cached replies come back with their words
    refs = ev.References(ev.load_split(fake_corpus, "test")[1], fake_corpus)
    pair = {"intent_id": "i", "voice": "Arjun", "emotion": "neutral", "target_text": "అమ్మ, నాన్న!"}
    assert ev.score_reply(np.zeros(0, np.float32), pair, refs, text="అమ్మ నాన్న")["text_match"] is True
    assert ev.score_reply(np.zeros(0, np.float32), pair, refs, text="అమ్మ")["text_match"] is False
    assert "text_match" not in ev.score_reply(np.zeros(0, np.float32), pair, refs)
    told = ev.main(args + ["--say_intended", "--out", str(tmp_path / "told")])  # the speech half alone
    assert "intended answer's words" in told["reply_source"] and "text_accuracy" not in told["first_turn"]
    with pytest.raises(SystemExit, match="inner monologue"):
        ev.main(args + ["--say_intended", "--model_dir", str(fake_corpus / "models"), "--out", str(tmp_path / "x")])


def test_new_voices_speak_the_training_questions_in_the_test_voices(fake_corpus, tmp_path, monkeypatch):
    """--split new_voices: training pairs whose questions are spoken again, once, by the test
    split's user voices (rendered into the output folder and reused); the rest as for a split."""
    import shutil

    import make_telugu_speech

    corpus = tmp_path / "corpus"
    shutil.copytree(fake_corpus, corpus)
    pairs = json.loads((corpus / "metadata" / "test_pairs.json").read_text())
    write_json(corpus / "metadata" / "train_pairs.json", [{**p, "input_text": f"ప్రశ్న {i}"} for i, p in enumerate(pairs)])
    spoken = []

    def fake_user(text, voice, seed=0, augment_audio=False):
        spoken.append((text, voice, augment_audio))
        return glide(220, 330, 0.5, seed=seed % 1000)

    monkeypatch.setattr(make_telugu_speech, "synthesize_user", fake_user)
    args = ["--model_dir", str(corpus / "models"), "--data_dir", str(corpus), "--out", str(tmp_path / "eval"),
            "--max_reply_s", "0.5", "--codec_files", "2", "--threads", "1", "--split", "new_voices"]
    report = ev.main(args)
    assert report["split"] == "new_voices" and report["first_turn"]["n"] == 6
    assert len(spoken) == 8 and {v for _, v, _ in spoken} == {"u"} and all(a for *_, a in spoken)  # the test voice
    assert len(list((tmp_path / "eval" / "new_voice_questions").glob("*.wav"))) == len({t for t, _, _ in spoken})
    rows = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["replies"]["first_turn"]
    assert {r["user_voice"] for r in rows} == {"u"}
    spoken.clear()
    ev.main(args)
    assert spoken == []  # rendered once
