"""The default models shipped in checkpoints/demo: inside git's limits, the presets they claim,
described by their model card, and a working agent, offline and behind the real server."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import benchmark_latency as bl
import make_demo_models
from config import DEMO_MODEL_DIR, config_to_dict
from s2s_transformer import S2SConfig, TeluguS2STransformer
from telugu_codec import CodecConfig, TeluCodec
from training import weight_files

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / DEMO_MODEL_DIR
torch.set_num_threads(2)


@pytest.mark.parametrize("name", ["codec", "s2s"])
def test_shipped_weights_fit_git_and_are_fp16(name):
    files = weight_files(DEMO / name)
    assert files, f"{DEMO / name} holds no weights: the demo models are part of the repo (python make_demo_models.py)"
    card = (DEMO / "MODEL_CARD.md").read_text()
    dtypes = set()
    for path in files:
        assert path.stat().st_size <= make_demo_models.MAX_FILE_BYTES, f"{path} is too large for git"
        assert hashlib.sha256(path.read_bytes()).hexdigest() in card, "MODEL_CARD.md describes other weights"
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F16" in dtypes and not dtypes & {"F32", "BF16", "F64"}


def test_shipped_models_are_the_demo_presets():
    codec = TeluCodec.from_pretrained(DEMO / "codec")
    assert config_to_dict(codec.config) == config_to_dict(CodecConfig.preset("demo"))
    s2s = TeluguS2STransformer.from_pretrained(DEMO / "s2s")
    info = json.loads((DEMO / "training.json").read_text())
    shipped_overrides = make_demo_models.s2s_stages(info)[-1]["overrides"]  # the recipe of the stage shipped
    if s2s.config.reply_text_weight > 0:  # an inner monologue's words are the corpus's own
        from make_telugu_speech import DIALOGS_PATH
        from s2s_transformer import reply_words

        assert s2s.config.reply_vocab and set(s2s.config.reply_vocab) <= set(reply_words(Path(DIALOGS_PATH).read_text()))
        shipped_overrides = {**shipped_overrides, "reply_vocab": s2s.config.reply_vocab}
    assert config_to_dict(s2s.config) == config_to_dict(S2SConfig.preset("demo", **shipped_overrides))
    assert s2s.config.n_codebooks == codec.n_codebooks and s2s.config.codebook_size == codec.codebook_size
    assert info["codec"]["sha256"] == make_demo_models.folder_sha256(DEMO / "codec")
    assert info["s2s"]["sha256"] == make_demo_models.folder_sha256(DEMO / "s2s")


@pytest.fixture(scope="module")
def question():
    from make_telugu_speech import ToolMissingError

    try:
        return bl.test_utterances(1)[0]  # a test-split paraphrase in a test-split user voice
    except ToolMissingError as e:
        pytest.skip(f"Telugu TTS not installed: {e}")


def test_the_agent_answers_a_held_out_question(question):
    """A held-out question gets, in each voice, a reply of answer length (the end-of-reply head
    fires) that is not silence, and the voice changes the reply. Whether the reply is the right
    answer, and how far apart the voices are, is measured by evaluate_agent.py (README Results):
    these weights are far from right answers yet, so no test claims them."""
    codec = TeluCodec.from_pretrained(DEMO / "codec")
    s2s = TeluguS2STransformer.from_pretrained(DEMO / "s2s")
    with torch.inference_mode():
        codes = codec.encode(torch.from_numpy(question.audio)[None, None])
    replies = {}
    for voice, sid in (("Ravi", 1), ("Priya", 2)):
        torch.manual_seed(0)
        replies[voice] = s2s.generate(codes, torch.tensor([sid]), torch.tensor([0]), max_new_tokens=300)[0]
        with torch.inference_mode():
            wav = codec.decode(replies[voice][None])[0, 0].numpy()
        assert 0.5 <= len(wav) / 16000 < 6.0, f"{voice}: a {len(wav) / 16000:.2f} s reply"
        assert np.isfinite(wav).all() and np.sqrt(np.mean(wav**2)) > 1e-3
    n = min(r.shape[1] for r in replies.values())
    assert not torch.equal(replies["Ravi"][:, :n], replies["Priya"][:, :n])


def test_the_server_serves_the_shipped_models(tmp_path, question):
    with bl.running_server(tmp_path / "server.log", DEMO, "cpu", threads=2) as server:
        health = bl.get_json(f"http://{server.address}/health")
        assert health["untrained"] is False
        results = asyncio.run(bl.run_turns(server.address, [question], ("turn",), iterations=1, warmup=0, listen_s=0.5))
    (r,) = results["turn"]
    assert r.reply_ms_received >= 500 and r.e2e_ms > 0


def test_wall_seconds_and_the_codec_guard(tmp_path):
    log = tmp_path / "m.jsonl"
    rows = [{"step": 10, "split": "train", "seconds_per_step": 0.5}, {"step": 20, "split": "train", "seconds_per_step": 1.0},
            {"step": 20, "split": "val", "seconds_per_step": 9.0}, {"step": 15, "split": "train", "seconds_per_step": 7.0}]
    log.write_text("\n".join(json.dumps(r) for r in rows))
    assert make_demo_models.wall_seconds(log, "seconds_per_step") == 10 * 0.5 + 10 * 1.0  # resumed rows not counted twice
    run = tmp_path / "s2s_demo"
    run.mkdir()
    (run / "s2s_best.pt").write_bytes(b"stale")
    recipe = {"dropout": 0.0}
    make_demo_models.claim_s2s_run(run, "a" * 64, 8, recipe)
    assert not (run / "s2s_best.pt").exists()  # a best model without its run must not be shipped
    torch.save({"step": 100, "args": {"batch_size": 8}}, run / "last.pt")
    (run / "overrides.json").write_text(json.dumps(recipe))
    make_demo_models.claim_s2s_run(run, "a" * 64, 8, recipe)  # the same codec, batch and overrides: fine
    with pytest.raises(SystemExit, match="another codec"):
        make_demo_models.claim_s2s_run(run, "b" * 64, 8, recipe)
    with pytest.raises(SystemExit, match="--s2s_batch_size 8"):
        make_demo_models.claim_s2s_run(run, "a" * 64, 16, recipe)
    with pytest.raises(SystemExit, match="would not apply"):  # the recipe changed since the run began
        make_demo_models.claim_s2s_run(run, "a" * 64, 8, {"dropout": 0.1})


def test_export_refuses_files_git_should_not_hold(tmp_path, monkeypatch):
    torch.manual_seed(0)
    TeluCodec(CodecConfig.preset("tiny")).save(tmp_path / "src")
    make_demo_models.export(TeluCodec, tmp_path / "src", tmp_path / "ok")
    assert TeluCodec.from_pretrained(tmp_path / "ok").config == CodecConfig.preset("tiny")
    before = (tmp_path / "ok" / "model.safetensors").read_bytes()
    monkeypatch.setattr(make_demo_models, "MAX_FILE_BYTES", 1000)
    with pytest.raises(SystemExit, match="over the"):
        make_demo_models.export(TeluCodec, tmp_path / "src", tmp_path / "ok")
    assert (tmp_path / "ok" / "model.safetensors").read_bytes() == before  # the shipped files are untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "src"]  # nothing left behind


def test_model_card_is_written_from_training_json_and_lists_every_stage():
    info = json.loads((DEMO / "training.json").read_text())
    stages = make_demo_models.s2s_stages(info)
    assert stages and stages[0]["trained_steps"] >= stages[0]["step"] > 0
    card = make_demo_models.model_card(info)
    for i, stage in enumerate(stages):
        assert make_demo_models.stage_line(i, stage) in card
    assert (DEMO / "MODEL_CARD.md").read_text() == card  # the card says what training.json records
    # stages trained since val_input_gain / val_cer exist show them; older records read as before
    later = {**stages[-1], "val_input_gain": 0.00005, "val_cer": 0.787}
    assert "input gain 0.00005 nats, question text CER 79%" in make_demo_models.stage_line(3, later)
    seen = {**later, "train_input_gain": 0.25, "train_cer": 0.3}
    assert "; on training pairs: input gain 0.25000 nats, question text CER 30%" in make_demo_models.stage_line(3, seen)
    older = {k: v for k, v in stages[0].items() if k not in ("val_input_gain", "val_cer")}
    assert "input gain" not in make_demo_models.stage_line(0, older)


@pytest.mark.parametrize("flag", ["--continue_shipped", "--evaluate_only"])
def test_refuses_shipped_weights_the_card_does_not_describe(tmp_path, flag):
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(DEMO, out)
    info = json.loads((out / "training.json").read_text())
    info["s2s"]["sha256"] = {name: "0" * 64 for name in info["s2s"]["sha256"]}  # other weights than these
    (out / "training.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit, match="does not describe"):
        make_demo_models.main([flag, "--out", str(out), "--runs", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()  # refused before any work


class Stop(Exception):
    """Raised by a fake phase script: make_demo_models got as far as training the S2S model."""


@pytest.fixture
def stage_calls(tmp_path, monkeypatch):
    """A copy of the shipped models in tmp_path/demo, and the phase-script commands make_demo_models
    runs (recorded; the S2S training raises Stop), with the corpus taken as built."""
    import shutil

    shutil.copytree(DEMO, tmp_path / "demo")
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        if "train_s2s.py" in cmd[1]:
            raise Stop

    monkeypatch.setattr(make_demo_models, "run", fake_run)
    monkeypatch.setattr(make_demo_models, "corpus_complete", lambda corpus: True)
    return calls


def test_new_s2s_trains_from_scratch_on_the_shipped_codec(tmp_path, stage_calls):
    """--new_s2s: no codec stage, a run named after the shipped codec, the recipe's own flags (no
    --init_from), and nothing shipped until training returns."""
    out, calls = tmp_path / "demo", stage_calls
    with pytest.raises(Stop):
        make_demo_models.main(["--new_s2s", "--s2s_steps", "50", "--out", str(out), "--runs", str(tmp_path / "runs")])
    assert len(calls) == 1, "only the S2S stage runs: the codec is the shipped one"
    cmd = calls[0]
    codec_sha = hashlib.sha256(weight_files(out / "codec")[0].read_bytes()).hexdigest()
    run_dir = tmp_path / "runs" / f"s2s_demo_on_{codec_sha[:12]}"
    assert cmd[cmd.index("--checkpoint_dir") + 1] == str(run_dir)
    assert cmd[cmd.index("--codec_path") + 1] == str(out / "codec")
    assert "--init_from" not in cmd and "--resume" not in cmd
    assert " ".join(make_demo_models.S2S_FLAGS) in " ".join(cmd)
    assert cmd[cmd.index("--max_steps") + 1] == "50"
    assert (run_dir / "codec.sha256").read_text().strip() == codec_sha
    assert json.loads((run_dir / "overrides.json").read_text()) == make_demo_models.S2S_OVERRIDES
    assert make_demo_models.folder_sha256(out / "s2s") == make_demo_models.folder_sha256(DEMO / "s2s")  # not shipped yet

    info = json.loads((out / "training.json").read_text())
    info["codec"]["sha256"] = {name: "0" * 64 for name in info["codec"]["sha256"]}
    (out / "training.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit, match="does not describe"):
        make_demo_models.main(["--new_s2s", "--out", str(out), "--runs", str(tmp_path / "runs2")])
    with pytest.raises(SystemExit, match="leave out --continue_shipped"):
        make_demo_models.main(["--new_s2s", "--continue_shipped", "--out", str(out), "--runs", str(tmp_path / "runs2")])


def test_continue_shipped_can_adopt_the_recipe(tmp_path, stage_calls):
    """--continue_shipped --adopt_recipe: a stage from the shipped weights under the current
    recipe's overrides (not those the card records), with the named parts fresh and the recipe's
    input augmentation for a codec-vector encoder; without --continue_shipped it is refused."""
    out, calls = tmp_path / "demo", stage_calls
    with pytest.raises(Stop):
        make_demo_models.main(["--continue_shipped", "--adopt_recipe", "--s2s_init_exclude", "encoder.", "--s2s_steps",
                               "40", "--out", str(out), "--runs", str(tmp_path / "runs")])
    cmd = calls[0]
    run_dir = Path(cmd[cmd.index("--checkpoint_dir") + 1])
    assert json.loads((run_dir / "overrides.json").read_text()) == make_demo_models.S2S_OVERRIDES
    assert cmd[cmd.index("--init_from") + 1] == str(out / "s2s") and cmd[cmd.index("--init_exclude") + 1] == "encoder."
    assert cmd[cmd.index("--schedule_steps") + 1] == "40"
    assert " ".join(make_demo_models.AUGMENT_FLAGS) in " ".join(cmd)
    with pytest.raises(SystemExit, match="add --continue_shipped"):
        make_demo_models.main(["--adopt_recipe", "--out", str(out), "--runs", str(tmp_path / "runs2")])
