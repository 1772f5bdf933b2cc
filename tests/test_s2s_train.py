"""train_s2s.py on a tiny corpus with a tiny real codec: the token cache is built once and reused,
a resumed run equals an uninterrupted one, checkpoints and the shipped model load, two gloo
processes train under torchrun, bad input fails early."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_s2s
from audio_io import save_audio, write_json
from config import config_to_dict
from s2s_transformer import TeluguS2STransformer
from training import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 train + 2 validation pairs over 12 short WAVs (some pairs with 1 or 2 earlier exchanges),
    a tiny codec checkpoint, and an S2S config override with dropout (so resume must restore RNG)."""
    from telugu_codec import CodecConfig, TeluCodec

    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    wavs = []
    for i in range(12):
        n = int(rng.integers(1200, 3200))
        wav = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t[:n]) + 0.02 * rng.standard_normal(n)
        rel = f"wavs/{'user' if i % 2 == 0 else 'agent'}/{i:02d}.wav"
        save_audio(root / rel, wav.astype(np.float32))
        wavs.append(rel)

    def pair(i, history=()):
        return {"input_path": wavs[2 * (i % 6)], "target_path": wavs[2 * (i % 6) + 1], "speaker_id": i % 4,
                "emotion_id": i % 9, "history": [{"input_path": wavs[2 * h], "target_path": wavs[2 * h + 1],
                                                  **({"target_text": "నాన్న"} if h % 2 else {})} for h in history],
                **({"input_text": ["అ", "నా!", "ఇ ల"][i % 3]} if i % 2 == 0 else {}),  # some (short) transcripts
                **({"target_text": ["అమ్మ బాగుంది.", "ఇల్లు పెద్దది, అమ్మ"][i % 3]} if i % 3 != 2 else {})}

    write_json(root / "metadata" / "train_pairs.json", [pair(i, [(i + 1) % 6] * (i % 3)) for i in range(8)])
    write_json(root / "metadata" / "validation_pairs.json", [pair(4), pair(5, [0])])
    torch.manual_seed(0)
    codec = TeluCodec(CodecConfig.preset("tiny"))
    save_checkpoint(root / "codec" / "best_codec.pt", {"model_state": codec.state_dict(), "config": config_to_dict(codec.config)})
    write_json(root / "s2s_config.json", {"dropout": 0.1})
    return root


def args_for(corpus: Path, out: Path, *extra: str, data_dir: Path | None = None) -> list[str]:
    return ["--data_dir", str(data_dir or corpus), "--codec_path", str(corpus / "codec" / "best_codec.pt"),
            "--checkpoint_dir", str(out), "--batch_size", "2", "--learning_rate", "2e-3", "--preset", "tiny",
            "--config", str(corpus / "s2s_config.json"), "--warmup_steps", "2", "--log_every", "1",
            "--experiment_name", "test", *extra]


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "test.jsonl").read_text().splitlines()]


def test_resume_equals_uninterrupted(corpus, tmp_path):
    train_s2s.main(args_for(corpus, tmp_path / "a", "--num_epochs", "2"))
    train_s2s.main(args_for(corpus, tmp_path / "b", "--num_epochs", "2", "--max_steps", "5"))  # stops mid-epoch 2
    stopped = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert (stopped["step"], stopped["epoch"], stopped["step_in_epoch"]) == (5, 1, 1)
    train_s2s.main(args_for(corpus, tmp_path / "b", "--num_epochs", "2", "--resume"))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for name, tensor in a["model_state"].items():
        assert torch.equal(tensor, b["model_state"][name]), name
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    assert rows(tmp_path / "a") == rows(tmp_path / "b")  # the log reads as if never interrupted
    assert a["model_state"]["bos"].ne(stopped["model_state"]["bos"]).any()  # and it did train on


def test_codec_input_and_augmented_turns_resume_exactly(corpus, tmp_path, capsys):
    """encoder_input "codec" (the table comes from the run's codec) with --input_augment_copies:
    each training user turn is rendered once more (cached beside the token cache), the steps draw
    renderings reproducibly, so a resumed run still equals an uninterrupted one."""
    from telugu_codec import TeluCodec

    write_json(tmp_path / "config.json", {"dropout": 0.1, "encoder_input": "codec", "codec_latent_dim": 16})
    extra = ["--config", str(tmp_path / "config.json"), "--token_cache", str(tmp_path / "tc"),
             "--input_augment_copies", "1", "--augment_workers", "1", "--num_epochs", "2"]
    train_s2s.main(args_for(corpus, tmp_path / "a", *extra))
    assert "rendering 6 perturbed copies" in capsys.readouterr().out  # 6 distinct training user turns
    train_s2s.main(args_for(corpus, tmp_path / "b", *extra, "--max_steps", "5"))
    assert "rendering" not in capsys.readouterr().out  # cached
    train_s2s.main(args_for(corpus, tmp_path / "b", *extra, "--resume"))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for name, tensor in a["model_state"].items():
        assert torch.equal(tensor, b["model_state"][name]), name
    codec = TeluCodec.from_pretrained(corpus / "codec" / "best_codec.pt")
    assert torch.equal(a["model_state"]["codec_embed.table"], codec.quantizer.inference_tables()["decoded"])
    assert len(list((tmp_path / "tc").rglob("perturbed.pt"))) == 1


def test_inner_monologue_learns_its_words_from_the_pairs_and_resumes_exactly(corpus, tmp_path, capsys):
    """reply_text_weight > 0: the vocabulary comes from the training pairs' target_text, the
    words' loss and validation figures are logged, a resumed run equals an uninterrupted one, and
    the shipped model writes words of that vocabulary before it speaks."""
    write_json(tmp_path / "config.json", {"dropout": 0.1, "reply_text_weight": 1.0, "max_reply_words": 3,
                                          "context_words": True})
    extra = ["--config", str(tmp_path / "config.json"), "--num_epochs", "2"]
    train_s2s.main(args_for(corpus, tmp_path / "a", *extra))
    assert "reply words" in capsys.readouterr().out
    train_s2s.main(args_for(corpus, tmp_path / "b", *extra, "--max_steps", "5"))
    train_s2s.main(args_for(corpus, tmp_path / "b", *extra, "--resume"))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for name, tensor in a["model_state"].items():
        assert torch.equal(tensor, b["model_state"][name]), name
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    # "అమ్మ" is in every reply with words, the rest in some: most frequent first
    assert a["config"]["reply_vocab"][0] == "అమ్మ" and set(a["config"]["reply_vocab"]) == {
        "అమ్మ", "బాగుంది", "ఇల్లు", "పెద్దది"}
    logged = rows(tmp_path / "a")
    assert any("reply_text_loss" in r for r in logged if r.get("split", "train") == "train")
    val = [r for r in logged if "val_reply_text_exact" in r]
    assert val and {"val_reply_text_accuracy", "val_text_input_gain", "train_reply_text_exact"} <= set(val[-1])
    model = TeluguS2STransformer.from_pretrained(tmp_path / "a")
    # the earlier agent turns' words reach the model's context (context_words)
    pairs = train_s2s.load_pairs(corpus, "train")
    codes = {w: torch.zeros(8, 40, dtype=torch.int16) for w in train_s2s.referenced_wavs(pairs)}
    examples, _ = train_s2s.make_examples(pairs, codes, model.config, 10**6, 10**6)
    batch = train_s2s.collate(examples, [i for i, e in enumerate(examples) if e.history], torch.device("cpu"))
    assert "నాన్న" in batch.context.texts and None in batch.context.texts  # agent turns said it; user turns say nothing
    assert model.reply_ids("నాన్న") == [1]  # a word no reply has: unknown (REPLY_UNK) in the memory
    written = []
    with torch.no_grad():
        model.generate(torch.zeros(1, 8, 40, dtype=torch.long), torch.tensor([0]), torch.tensor([0]), max_new_tokens=2,
                       on_text=written.append)
    assert all(w in model.config.reply_vocab for w in written[0][0].split())
    # the words need transcripts: a config that asks for them on pairs without any says so
    bare = tmp_path / "bare"
    (bare / "metadata").mkdir(parents=True)
    for name in ("train_pairs.json", "validation_pairs.json"):
        pairs = json.loads((corpus / "metadata" / name).read_text())
        write_json(bare / "metadata" / name, [{k: v for k, v in p.items() if k != "target_text"} for p in pairs])
    for rel in {p[k] for p in json.loads((corpus / "metadata" / "train_pairs.json").read_text())
                for k in ("input_path", "target_path")} | {"wavs"}:
        if rel != "wavs":
            (bare / rel).parent.mkdir(parents=True, exist_ok=True)
            (bare / rel).write_bytes((corpus / rel).read_bytes())
    with pytest.raises(ValueError, match="target_text"):
        train_s2s.main(args_for(corpus, tmp_path / "c", *extra, data_dir=bare))


def test_collate_draws_renderings_of_the_user_turn():
    k = 8
    original, other = torch.zeros(k, 5, dtype=torch.int16), torch.ones(k, 7, dtype=torch.int16)
    ex = train_s2s.Example(original, torch.zeros(k, 4, dtype=torch.int16), 0, 0, [], input_variants=[other])
    assert train_s2s.collate([ex], [0], "cpu").codes.sum() == 0  # validation: always the original
    pick = np.random.default_rng(0)
    drawn = [int(train_s2s.collate([ex], [0], "cpu", pick).input_lengths[0]) for _ in range(40)]
    assert set(drawn) == {5, 7}


def test_outputs_checkpoints_and_shipped_model(corpus, tmp_path):
    out = tmp_path / "run"
    train_s2s.main(args_for(corpus, out, "--num_epochs", "1"))
    best = torch.load(out / "s2s_best.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    assert {"model_state", "config", "step", "epoch", "val_loss"} <= set(best)
    assert {"model_state", "config", "optimizer", "step", "epoch", "rng"} <= set(last)
    shipped = TeluguS2STransformer.from_pretrained(out)  # model.safetensors + config.json
    assert shipped.config.dropout == 0.1 and shipped.config.hidden_dim == 64
    for name, tensor in shipped.state_dict().items():
        assert torch.equal(tensor, best["model_state"][name]), name
    val = [r for r in rows(out) if "val_loss" in r][-1]
    assert {f"val_acc_cb{i}" for i in range(8)} | {f"val_ppl_cb{i}" for i in range(8)} <= set(val)
    assert all(1.0 <= val[f"val_ppl_cb{i}"] <= 2000 for i in range(8))
    assert (out / "test.csv").read_text().startswith("step,")


def test_init_from_continues_the_weights_with_a_fresh_schedule(corpus, tmp_path):
    """--init_from (how the shipped model trains on in a later session): training starts from the
    given weights, not a fresh init, with a new optimizer and an LR schedule of --schedule_steps."""
    train_s2s.main(args_for(corpus, tmp_path / "first", "--num_epochs", "1"))
    shipped = TeluguS2STransformer.from_pretrained(tmp_path / "first")
    shipped.save(tmp_path / "fp16", dtype=torch.float16)  # as checkpoints/demo ships it
    start = TeluguS2STransformer.from_pretrained(tmp_path / "fp16").state_dict()
    out = tmp_path / "second"
    # a rate too small to move the weights: what the run ends with is what it started from
    train_s2s.main(args_for(corpus, out, "--num_epochs", "100", "--schedule_steps", "6", "--max_steps", "6",
                            "--init_from", str(tmp_path / "fp16"), "--learning_rate", "1e-12"))
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == 6 and last["init_from"] == str(tmp_path / "fp16")
    assert set(last["optimizer"]["state"]) and last["optimizer"]["state"][0]["step"] == 6  # a new optimizer
    for name, tensor in start.items():
        torch.testing.assert_close(last["model_state"][name], tensor, atol=1e-6, rtol=0, msg=name)
    fresh = TeluguS2STransformer(shipped.config).state_dict()
    assert not torch.allclose(fresh["bos"], last["model_state"]["bos"])
    lrs = [r["lr"] for r in rows(out) if "lr" in r]
    assert lrs == pytest.approx([train_s2s.lr_at(i, 1e-12, 0, 6) for i in range(6)], rel=1e-9)  # 6-step decay
    assert lrs[-1] < 0.2e-12
    with pytest.raises(ValueError, match="--init_from.*hidden_dim"):
        train_s2s.main(args_for(corpus, tmp_path / "third", "--init_from", str(tmp_path / "fp16"), "--hidden_dim", "128"))


def test_init_from_adds_the_text_head_and_leaves_excluded_parts_fresh(corpus, tmp_path):
    """Continuing a model under the auxiliary losses: the new text head starts fresh, --init_exclude
    leaves the named parts (here the encoder) at their fresh init, everything else is copied; the
    run logs the CTC loss and validates the transcripts (pairs without one are skipped)."""
    train_s2s.main(args_for(corpus, tmp_path / "first", "--num_epochs", "1"))
    start = TeluguS2STransformer.from_pretrained(tmp_path / "first").state_dict()
    assert not any(k.startswith("text_head.") for k in start)
    write_json(tmp_path / "aux.json", {"dropout": 0.1, "encoder_ctc_weight": 1.0, "decoder_input_dropout": 0.2})
    out = tmp_path / "aux"
    train_s2s.main(args_for(corpus, out, "--num_epochs", "100", "--schedule_steps", "2", "--max_steps", "2",
                            "--eval_every", "2", "--init_from", str(tmp_path / "first"), "--init_exclude", "encoder.",
                            "--config", str(tmp_path / "aux.json"), "--learning_rate", "1e-12"))
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["config"]["encoder_ctc_weight"] == 1.0 and "text_head.weight" in last["model_state"]
    for name, tensor in start.items():
        same = torch.allclose(last["model_state"][name], tensor, atol=1e-6, rtol=0)
        assert same != name.startswith("encoder."), name  # the encoder fresh, the rest as it was
    train_rows = [r for r in rows(out) if "lr" in r]
    assert all("text_loss" in r for r in train_rows) and any(r["text_loss"] > 0 for r in train_rows)
    val = [r for r in rows(out) if "val_loss" in r][-1]
    assert val["val_text_loss"] > 0 and val["val_cer"] > 0.0  # one val pair has a transcript; an untrained head errs
    for change in ({"depth_dim": 0}, {"depth_dim": 64}):  # other modules; other shapes
        write_json(tmp_path / "other.json", change)
        with pytest.raises(ValueError, match="do not fit this model"):
            train_s2s.main(args_for(corpus, tmp_path / "bad", "--init_from", str(tmp_path / "first"),
                                    "--config", str(tmp_path / "other.json")))


def test_edit_distance():
    assert train_s2s.edit_distance("kitten", "sitting") == 3
    assert train_s2s.edit_distance([], [1, 2]) == 2 and train_s2s.edit_distance([1, 2], [1, 2]) == 0


def test_a_run_validates_the_weights_it_ends_with(corpus, tmp_path):
    out = tmp_path / "run"
    train_s2s.main(args_for(corpus, out, "--num_epochs", "5", "--eval_every", "4", "--max_steps", "6"))
    assert [r["step"] for r in rows(out) if "val_loss" in r] == [4, 6]
    train_s2s.main(args_for(corpus, out, "--num_epochs", "5", "--eval_every", "4", "--max_steps", "6", "--resume"))
    assert [r["step"] for r in rows(out) if "val_loss" in r] == [4, 6]  # nothing trained, nothing validated again


def test_input_gain_says_whether_the_reply_depends_on_the_question():
    """val_input_gain: 0 for a model that cannot see the user's turn (its cross-attention and turn
    summary zeroed), clearly positive for one that was trained to answer from it."""
    from types import SimpleNamespace

    from s2s_transformer import S2SConfig
    from training import DistContext

    torch.manual_seed(0)
    cfg = S2SConfig.preset("tiny")
    # each reply is its question's codes, so the question is all that predicts the reply
    examples = []
    for _ in range(6):
        q = torch.randint(0, 16, (cfg.n_codebooks, 24), dtype=torch.int16)
        examples.append(train_s2s.Example(q, q.clone(), 0, 0, []))
    args = SimpleNamespace(batch_size=3, seed=0, max_val_batches=0)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    model = TeluguS2STransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = train_s2s.collate(examples, list(range(6)), ctx.device)
    for _ in range(150):  # learn to copy
        loss = train_s2s.run_model(model, batch, False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    gain = train_s2s.evaluate(model, examples, args, ctx, False)["val_input_gain"]
    assert gain > 0.5
    with torch.no_grad():
        for layer in model.decoder:
            layer.cross_attn.out.weight.zero_()
        model.turn_summary.weight.zero_()
    assert train_s2s.evaluate(model, examples, args, ctx, False)["val_input_gain"] == pytest.approx(0.0, abs=1e-5)
    on_train = train_s2s.evaluate(model, examples, args, ctx, False, "train", 1)  # one batch, named for training pairs
    assert on_train["train_input_gain"] == pytest.approx(0.0, abs=1e-5) and not any(k.startswith("val_") for k in on_train)


def test_precision_is_resolved_once_and_kept_on_resume(corpus, tmp_path):
    from training import native_bf16, resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        resolve_precision("fp16", torch.device("cpu"))
    # start in the precision that auto would not pick here, so keeping it on resume is what is tested
    other = "fp32" if resolve_precision("auto", torch.device("cpu")) == "bf16" else "bf16"
    out = tmp_path / other
    train_s2s.main(args_for(corpus, out, "--num_epochs", "1", "--max_steps", "2", "--precision", other))
    assert torch.load(out / "last.pt", weights_only=True)["precision"] == other
    train_s2s.main(args_for(corpus, out, "--num_epochs", "1", "--resume"))  # auto: keeps the run's own
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["precision"] == other and last["step"] == 4
    assert all(t.dtype == torch.float32 for t in last["model_state"].values() if t.is_floating_point())


def test_token_cache_is_built_once_and_follows_changes(corpus, tmp_path, capsys):
    train_s2s.main(args_for(corpus, tmp_path / "one", "--num_epochs", "1", "--max_steps", "1"))
    first = capsys.readouterr().out
    cache_dirs = list((corpus / "token_cache").iterdir())
    assert len(cache_dirs) == 1  # one codec, one cache
    train_s2s.main(args_for(corpus, tmp_path / "two", "--num_epochs", "1", "--max_steps", "1"))
    assert "12 of 12 WAVs cached, 0 to encode" in capsys.readouterr().out
    assert "to encode" in first
    wav = corpus / "wavs" / "user" / "00.wav"
    os.utime(wav, ns=(wav.stat().st_atime_ns, wav.stat().st_mtime_ns + 10**9))  # the file changed
    train_s2s.main(args_for(corpus, tmp_path / "three", "--num_epochs", "1", "--max_steps", "1"))
    assert "11 of 12 WAVs cached, 1 to encode" in capsys.readouterr().out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("augmented", [False, True])
def test_ddp_two_gloo_processes(corpus, tmp_path, augmented):
    """Two gloo processes; with codec input and perturbed renderings, rank 0 renders them and the
    other rank reads them from the cache (and the recipe's inner monologue trains under DDP)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    extra = []
    if augmented:
        # the recipe's shape: codec input, the inner monologue, and context words (a parameter that
        # batches without agent words in their context leave without a gradient)
        write_json(tmp_path / "config.json", {"dropout": 0.1, "encoder_input": "codec", "codec_latent_dim": 16,
                                              "reply_text_weight": 1.0, "context_words": True})
        extra = ["--config", str(tmp_path / "config.json"), "--token_cache", str(tmp_path / "tc"),
                 "--input_augment_copies", "1", "--augment_workers", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "train_s2s.py"), *args_for(corpus, out, "--num_epochs", "2", "--device", "cpu", *extra)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("rendering 6 perturbed copies") == (1 if augmented else 0)
    last = torch.load(out / "last.pt", weights_only=True)
    # 8 pairs, 2 per process, 2 processes: 2 steps per epoch (each rank its own half of every step)
    assert last["step"] == 4 and len(last["rng_per_rank"]) == 2
    assert "2 process(es)" in proc.stdout and "DDP replicas diverged" not in proc.stderr
    assert any("val_loss" in r for r in rows(out))


def test_bad_input_fails_early(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_pairs.json"):
        train_s2s.main(args_for(corpus, tmp_path / "x", data_dir=tmp_path))
    with pytest.raises(FileNotFoundError, match="codec"):
        train_s2s.main(args_for(corpus, tmp_path / "x", "--codec_path", str(tmp_path / "nothing.pt")))
    bad = tmp_path / "bad"
    (bad / "metadata").mkdir(parents=True)
    pairs = json.loads((corpus / "metadata" / "train_pairs.json").read_text())
    pairs[0]["speaker_id"] = 7
    write_json(bad / "metadata" / "train_pairs.json", pairs)
    write_json(bad / "metadata" / "validation_pairs.json", pairs)
    with pytest.raises(ValueError, match="speaker_id 7"):
        train_s2s.main(args_for(corpus, tmp_path / "x", data_dir=bad))
    out = tmp_path / "resume"
    train_s2s.main(args_for(corpus, out, "--num_epochs", "1", "--max_steps", "1"))
    with pytest.raises(ValueError, match="hidden_dim"):
        train_s2s.main(args_for(corpus, out, "--resume", "--hidden_dim", "128"))
