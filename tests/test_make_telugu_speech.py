"""The synthetic Telugu corpus: text validity, rendering, voices, emotions, splits, bad input."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import make_telugu_speech as mts
from config import EMOTIONS, VOICES
from prosody import prosody_signature, semitones

REQUIRED_CATEGORIES = {"greetings", "farewells", "time_date", "weather", "numbers_prices", "directions", "food",
                       "health", "travel", "family", "small_talk", "help"}


# ---------------------------------------------------------------------------------------------- texts


@pytest.fixture(scope="module")
def dialogs():
    return mts.load_dialogs()


def test_dialogs_cover_the_agent_domain(dialogs):
    assert len(dialogs.intents) >= 150
    assert REQUIRED_CATEGORIES <= {i.category for i in dialogs.intents}
    for intent in dialogs.intents:
        assert len(intent.questions) >= 4, intent.id
        assert len(set(intent.questions)) == len(intent.questions), intent.id
        # festival reads ~11 characters/s; with AGENT_TEMPO this keeps answers within 1 to 4 s
        assert 2 <= len(intent.answer.split()) <= 7 and len(intent.answer) <= 45, (intent.id, intent.answer)
        assert intent.answer not in intent.questions
    answers = [i.answer for i in dialogs.intents]
    assert len(set(answers)) == len(answers), "two intents share an answer: the replies must be told apart"
    kinds = {c.context for c in dialogs.context_intents}
    assert kinds == set(mts.CONTEXT_KINDS)
    recall = dialogs.context("recall_previous_question")
    for intent in dialogs.intents:
        assert mts.invalid_chars(recall.answer_template.format(topic=intent.topic)) == []


def test_sentences_for_the_codec():
    sentences = mts.load_sentences()
    assert len(sentences) >= 1000
    lengths = [len(s.split()) for s in sentences]
    assert min(lengths) >= 2 and max(lengths) <= 25 and np.median(lengths) >= 6


@pytest.mark.parametrize("text, message", [
    ("Hello నమస్కారం.", "line 1"), ("నమస్కారం 🙏.", "line 1"), ("పది % తగ్గింపు.", "line 1"),
    ("నమస్కారం", "must end"), ("నమస్కారం.\nనమస్కారం.", "duplicated"),
])
def test_corpus_validation_names_the_problem(tmp_path, text, message):
    path = tmp_path / "s.txt"
    path.write_text(text.replace("line 1", ""), encoding="utf-8")
    with pytest.raises(ValueError) as err:
        mts.load_sentences(path)
    assert "s.txt:1" in str(err.value) or message in str(err.value)


def test_dialog_validation_reports_every_problem(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(
        "intents:\n"
        "  - {id: a, category: x, topic: ఒకటి, questions: ['ఏమిటి?', 'ఎలా?', 'ఎందుకు?'], answer: Hello.}\n"
        "  - {id: a, category: x, topic: రెండు, questions: ['ఏమిటి?', 'ఎక్కడ?', 'ఎప్పుడు?', 'ఎవరు?'], answer: సరే.}\n",
        encoding="utf-8")
    with pytest.raises(ValueError) as err:
        mts.load_dialogs(path)
    msg = str(err.value)
    path.write_text("intents: [unclosed", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid YAML"):
        mts.load_dialogs(path)
    for expected in ("3 questions, at least 4", "duplicate id", "also in a", "Telugu script",
                     "repeat_previous_answer", "recall_previous_question"):
        assert expected in msg


def test_normalize_for_tts_never_drops_words_silently():
    assert mts.normalize_for_tts("పది % తగ్గింపు!") == "పది శాతం తగ్గింపు!"
    assert mts.normalize_for_tts("“నమస్కారం” 🙏 (అండి)") == "నమస్కారం అండి"
    assert mts.normalize_for_tts("ధర 250 రూపాయలు।") == "ధర 250 రూపాయలు."
    with pytest.raises(ValueError, match="Latin letters.*Telugu script"):
        mts.normalize_for_tts("నాకు bus కావాలి")
    with pytest.raises(ValueError, match="nothing speakable"):
        mts.normalize_for_tts("🙏 !!")


# ---------------------------------------------------------------------------------------------- voices


SENTENCE = "ఈ రోజు వాతావరణం చాలా బాగుంది, మనం బయటకు వెళ్దాం."


@pytest.fixture(scope="module")
def emotion_renderings():
    base = mts.festival_batch([SENTENCE])[0]
    return {(v, e): mts.apply_recipe(base, mts.AGENT_VOICES[v], mts.EMOTION_PROSODY[e])
            for v in ("Ravi", "Priya") for e in EMOTIONS} | {
        (v, "neutral"): mts.apply_recipe(base, mts.AGENT_VOICES[v]) for v in ("Arjun", "Lakshmi")}


def test_agent_voices_f0_in_intended_order(emotion_renderings):
    f0 = {v.name: prosody_signature(emotion_renderings[(v.name, "neutral")]).f0_median_hz for v in VOICES}
    assert f0["Ravi"] < f0["Arjun"] < f0["Lakshmi"] < f0["Priya"], f0
    for name, recipe in mts.AGENT_VOICES.items():
        assert abs(semitones(f0[name], recipe.pitch_hz)) < 1.0, (name, f0[name])


def _signature(wav, ref):
    s, r = prosody_signature(wav), prosody_signature(ref)
    return np.array([semitones(s.f0_median_hz, r.f0_median_hz), s.f0_range_st - r.f0_range_st,
                     100 * np.log(r.duration_s / s.duration_s), s.energy_db - r.energy_db])


@pytest.mark.parametrize("voice", ["Ravi", "Priya"])
def test_emotion_signatures_measurable_and_distinct(emotion_renderings, voice):
    ref = emotion_renderings[(voice, "neutral")]
    sig = {e: _signature(emotion_renderings[(voice, e)], ref) for e in EMOTIONS}
    # Measured signatures follow the design: pitch level, tempo (log-%), energy.
    for e, p in mts.EMOTION_PROSODY.items():
        assert sig[e][0] == pytest.approx(p.pitch_semitones, abs=0.6), e
        assert sig[e][2] == pytest.approx(100 * np.log(p.tempo), abs=4), e
        assert sig[e][3] == pytest.approx(p.gain_db, abs=1.0), e
    assert sig["sad"][1] < -0.3 and sig["surprised"][1] > 0.5  # narrow vs wide pitch range
    # Every pair of emotions differs clearly in at least one dimension
    # (1 semitone, 0.5 semitone of range, 5 % of rate, 1.5 dB).
    scale = np.array([1.0, 0.5, 5.0, 1.5])
    for i, a in enumerate(EMOTIONS):
        for b in EMOTIONS[i + 1:]:
            assert np.max(np.abs(sig[a] - sig[b]) / scale) >= 1.0, (a, b, sig[a], sig[b])


def test_user_voice_and_augmentation_are_deterministic():
    a = mts.synthesize_user("మీరు ఎలా ఉన్నారు?", "esp_f2", seed=5, augment_audio=True)
    b = mts.synthesize_user("మీరు ఎలా ఉన్నారు?", "esp_f2", seed=5, augment_audio=True)
    c = mts.synthesize_user("మీరు ఎలా ఉన్నారు?", "esp_f2", seed=6, augment_audio=True)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(np.abs(a) <= 1.0) and len(a) > 8000


def test_bad_voice_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="Arjun.*Ravi.*Priya.*Lakshmi"):
        mts.synthesize_agent("నమస్కారం.", "Suresh")
    with pytest.raises(ValueError, match="neutral.*happy"):
        mts.synthesize_agent("నమస్కారం.", "Priya", "bored")
    with pytest.raises(ValueError, match="esp_m1"):
        mts.synthesize_user("నమస్కారం.", "nobody")


def test_missing_festival_names_the_package(monkeypatch, capsys):
    monkeypatch.setattr(mts.shutil, "which", lambda name: None)
    with pytest.raises(mts.ToolMissingError, match="apt-get install -y festival festvox-te-nsk"):
        mts.festival_batch(["నమస్కారం."])
    assert mts.main(["--check"]) == 2
    assert "apt-get install" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    assert mts.main(["--limit", "3", "--output_dir", str(out), "--workers", "2", "--no_report"]) == 0
    return out


def _manifest(corpus, split):
    return [json.loads(line) for line in (corpus / "manifests" / f"{split}.jsonl").read_text().splitlines()]


def test_corpus_files_match_manifests(corpus):
    for split in ("train", "val", "test"):
        rows = _manifest(corpus, split)
        assert rows and {r["role"] for r in rows} == {"user", "agent"}
        for r in rows:
            info = sf.info(str(corpus / r["path"]))
            assert info.samplerate == 16000 and info.channels == 1 and r["split"] == split
            assert abs(info.duration - r["duration"]) < 0.01 and r["path"].startswith(f"wavs/{split}/")


def test_splits_are_disjoint_and_test_is_unseen(corpus):
    rows = {s: _manifest(corpus, s) for s in ("train", "val", "test")}
    paths = [r["path"] for rs in rows.values() for r in rs]
    assert len(paths) == len(set(paths))
    user_voices = {s: {r["voice"] for r in rs if r["role"] == "user"} for s, rs in rows.items()}
    assert not user_voices["test"] & (user_voices["train"] | user_voices["val"])
    assert not user_voices["val"] & user_voices["train"]
    questions = {s: {r["text"] for r in rs if r["kind"] == "question"} for s, rs in rows.items()}
    assert not questions["test"] & (questions["train"] | questions["val"])
    assert not questions["val"] & questions["train"]
    # every ordinary answer exists in every agent voice in every split; all 9 emotions in train
    answers = defaultdict(set)
    for s, rs in rows.items():
        for r in rs:
            if r["kind"] == "answer":
                answers[(s, r["intent_id"])].add((r["voice"], r["emotion"]))
    for (s, intent), combos in answers.items():
        assert {v for v, _ in combos} == {v.name for v in VOICES}
        if s == "train":
            assert len(combos) == 36


def test_pairs_and_conversations(corpus, dialogs):
    recall_template = dialogs.context("recall_previous_question").answer_template
    topics = {i.id: i.topic for i in dialogs.intents}
    for split, name in mts.PAIRS_FILES.items():
        pairs = json.loads((corpus / "metadata" / name).read_text())
        manifest = {r["path"]: r for r in _manifest(corpus, split)}
        assert any(p["history"] for p in pairs)
        for p in pairs:
            assert p["input_path"] in manifest and p["target_path"] in manifest  # same split only
            target = manifest[p["target_path"]]
            assert VOICES[p["speaker_id"]].name == target["voice"] and EMOTIONS[p["emotion_id"]] == target["emotion"]
            for h in p["history"]:
                assert h["input_path"] in manifest and h["target_path"] in manifest
            if p["intent_id"] == "ctx_repeat_that" and p["history"]:
                assert p["target_path"] == p["history"][-1]["target_path"]
            if p["intent_id"] == "ctx_what_did_i_ask" and p["history"]:
                last = p["history"][-1]["intent_id"]
                assert p["target_text"] == recall_template.format(topic=topics[last])


def test_rerun_skips_finished_files_and_rebuilds_missing_ones(corpus):
    rows = _manifest(corpus, "train")
    victim = corpus / rows[0]["path"]
    keep = corpus / rows[1]["path"]
    before = victim.read_bytes()
    keep_mtime = keep.stat().st_mtime_ns
    victim.unlink()
    assert mts.main(["--limit", "3", "--output_dir", str(corpus), "--workers", "1", "--no_report"]) == 0
    assert victim.read_bytes() == before  # deterministic: the same audio again
    assert keep.stat().st_mtime_ns == keep_mtime  # untouched
    assert _manifest(corpus, "train") == rows
