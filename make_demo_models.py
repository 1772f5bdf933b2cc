"""Rebuild the default models shipped in checkpoints/demo/, end to end, with the repo's own scripts.

    python make_demo_models.py                      # corpus -> codec -> S2S -> evaluation -> model card
    python make_demo_models.py --s2s_steps 20000    # train further: every stage resumes where it stopped
    python make_demo_models.py --evaluate_only      # measure the shipped weights again, rewrite the card

Stages, each skipped or resumed when its work is already done (so a killed run, or a later session
with more time or a GPU, continues instead of starting over):

  1. corpus   make_telugu_speech.py into <workspace>/telugu_synth (itself resumable)
  2. codec    train_codec_dac.py --preset demo, to --codec_steps, in <runs>/codec_demo
  3. export   the codec in fp16 -> <runs>/codec_demo/export (staged: <out> is not touched yet)
  4. s2s      train_s2s.py --preset demo on that codec's tokens, to --s2s_steps, in <runs>/s2s_demo
  5. ship     the S2S model (lowest validation loss) in fp16 -> <out>/s2s, the codec -> <out>/codec
  6. card     evaluate_agent.py on the test split (unless these weights were evaluated already),
              then <out>/MODEL_CARD.md and <out>/training.json

Training across sessions: runs/ is scratch space that a new machine does not have, so the shipped
fp16 weights are what carries over. `--continue_shipped --s2s_steps N` trains the shipped S2S model
for N more steps on the shipped codec's tokens (stages 2-3 skipped; a stage of its own with a fresh
optimizer, warm-up and a cosine decay ending at step N, in runs/s2s_demo_from_<sha of the weights>,
resumable like any run), ships the result and appends the stage to training.json, so the model card
lists every stage the weights went through, and replaying them reproduces the weights. A continued
stage keeps the overrides the card records; `--adopt_recipe` trains it under the current recipe's
(S2S_OVERRIDES: parts the recipe adds start fresh, and `--s2s_init_exclude` names others to re-initialise).
`--new_s2s --s2s_steps N` trains a new S2S model from scratch with the current recipe on the shipped
codec's tokens (stages 2-3 skipped), in runs/s2s_demo_on_<sha of the codec>, to step N of the full
recipe's schedule: rerun it with a larger N to continue, in this session or a later one that kept
runs/. It ships like stage 5 and starts training.json's stage list over; if the new model measures
worse, `git checkout checkpoints/demo` brings the previous one back.

The S2S model learns the codes of the exported (fp16) codec, the very weights the server loads, so
its tokens match at serving time. Changing the codec (more codec steps) re-encodes the token cache
and means training the S2S model again: the script refuses to resume an S2S run on another codec
(or with another batch size), and ships nothing until both models fit each other.

The learning-rate schedules span the recipe's full runs (--num_epochs in the flags below), so
--codec_steps / --s2s_steps only say where to stop: training further later continues the same
schedule step for step, and the shipped weights of a short run come from near the peak rate.

The flags of each phase script are written out below (CODEC_FLAGS, S2S_FLAGS): they are the
recipe. On a GPU the same command runs there (the phase scripts pick CUDA); `--s2s_batch_size`
and the learning rate may then be raised.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from audio_io import read_json, write_json
import evaluate_agent
from config import DEMO_MODEL_DIR, add_workspace_arg, workspace_from_args
from telugu_codec import CodecConfig
from training import load_checkpoint, weight_files

PY = sys.executable
MAX_FILE_BYTES = 15_000_000  # what git takes here: 15 MB a file
SHARD_MB = 14.0  # shards of at most 14 MiB (14.7 MB), under that limit

# The recipe. Codec: DAC-style losses, the GAN from epoch 4 (~6,100 steps) on.
CODEC_FLAGS = ["--preset", "demo", "--batch_size", "8", "--learning_rate", "1e-3", "--num_epochs", "40",
               "--use_discriminators", "--discriminator_start_epoch", "4", "--val_every", "1500",
               "--save_every", "300", "--num_workers", "1"]
# S2S: the demo preset without dropout (the corpus is small next to the steps a CPU gives it), with
# the auxiliary losses that tie the reply to the question: CTC of the question's text on the encoder,
# 30% of the reply's own past hidden from the decoder (see S2SConfig); and, so that the question is
# read in voices training never heard, the encoder reading the codes through the codec's own vectors
# and every training question also rendered in 3 new pseudo-voices (README: a 10-intent run reads
# held-out voices with CER 46% this way at 600 steps, 87% with learned code embeddings).
# And the inner monologue: the decoder writes the reply's words before it speaks them (README: the
# words are what the question decides, and the speech after them reads its content off them), and
# remembers the words of its earlier turns (so "repeat that" is a copy from the memory).
S2S_OVERRIDES = {"dropout": 0.0, "encoder_ctc_weight": 0.5, "decoder_input_dropout": 0.3,
                 "encoder_input": "codec", "codec_latent_dim": CodecConfig.preset("demo").latent_dim,
                 "reply_text_weight": 1.0, "context_words": True}
AUGMENT_FLAGS = ["--input_augment_copies", "3"]  # for a model whose encoder reads the codec's vectors
S2S_FLAGS = ["--preset", "demo", "--num_epochs", "30", "--learning_rate", "5e-4", "--warmup_steps", "200",
             "--eval_every", "500", "--save_every", "100", "--max_val_batches", "25", "--experiment_name", "s2s_demo",
             *AUGMENT_FLAGS]
# Continuing the shipped S2S model (--continue_shipped): a stage of its own, --s2s_steps long, with a
# fresh optimizer, a short warm-up and a cosine decay that ends with the stage (a warm restart);
# --schedule_steps and --max_steps set its length, --num_epochs only bounds the data loop.
CONTINUE_FLAGS = ["--learning_rate", "5e-4", "--warmup_steps", "200", "--num_epochs", "1000", "--eval_every", "500",
                  "--save_every", "100", "--max_val_batches", "25", "--experiment_name", "s2s_demo"]


def log(msg: str) -> None:
    print(f"[make_demo_models] {msg}", flush=True)


def run(cmd: list[str]) -> None:
    log(" ".join(cmd))
    t = time.time()
    res = subprocess.run(cmd)
    if res.returncode != 0:
        raise SystemExit(f"make_demo_models: `{' '.join(cmd)}` failed with exit code {res.returncode}; "
                         "fix what it reported and run make_demo_models.py again: finished stages are kept")
    log(f"done in {time.time() - t:.0f} s")


def checkpoint_step(path: Path) -> int:
    if not path.is_file():
        return 0
    return int(load_checkpoint(path)["step"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_sha256(directory: Path) -> dict[str, str]:
    """SHA-256 of each weights file of a shipped model folder (one file, or an index and shards)."""
    return {p.name: sha256(p) for p in weight_files(directory)}


def export(model_cls, checkpoint: Path, out_dir: Path) -> None:
    """A training checkpoint (or model folder) -> out_dir/model.safetensors (fp16) + config.json.
    Written beside out_dir first and size-checked, so a refused export leaves out_dir as it was."""
    model = model_cls.from_pretrained(checkpoint)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save(staging, dtype=torch.float16, max_shard_mb=SHARD_MB)
    sizes = {p.name: p.stat().st_size / 1e6 for p in weight_files(staging)}
    if max(sizes.values()) > MAX_FILE_BYTES / 1e6:
        shutil.rmtree(staging)
        raise SystemExit(f"{checkpoint} exports a {max(sizes.values()):.1f} MB file (one tensor too large to shard), "
                         f"over the {MAX_FILE_BYTES / 1e6:g} MB a file may take in git; ship a smaller preset "
                         f"({out_dir} left as it was)")
    install(staging, out_dir)
    log(f"exported {checkpoint} -> {out_dir} ({sum(sizes.values()):.2f} MB fp16 in {len(sizes)} file(s))")


def install(src: Path, out_dir: Path) -> None:
    """Move a finished model folder into place, replacing out_dir's files one by one (os.replace)
    and removing weights files of an earlier layout (single file vs shards) that src lacks."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old = {p.name for p in weight_files(out_dir)}
    for f in src.iterdir():
        os.replace(f, out_dir / f.name)
        old.discard(f.name)
    for name in old:
        (out_dir / name).unlink()
    src.rmdir()


def claim_s2s_run(s2s_run: Path, codec_sha: str, batch_size: int, overrides: dict) -> None:
    """Tie the S2S run to the codec whose tokens it learns, its batch size and its model overrides;
    refuse to continue it on another codec's tokens, with another batch (resume would not be
    exact) or after the recipe's overrides changed (a resumed run keeps its own config)."""
    trained_on = s2s_run / "codec.sha256"
    last = s2s_run / "last.pt"
    if last.is_file():
        if trained_on.is_file() and trained_on.read_text().strip() != codec_sha:
            raise SystemExit(f"{s2s_run} was trained on the tokens of another codec (sha256 "
                             f"{trained_on.read_text().strip()[:12]}, now {codec_sha[:12]}): they no longer match. "
                             f"Move {s2s_run} away to train the S2S model again on this codec")
        saved = load_checkpoint(last).get("args", {}).get("batch_size")
        if saved is not None and int(saved) != batch_size:
            raise SystemExit(f"{s2s_run} trains with batch size {saved}; --s2s_batch_size {batch_size} would not "
                             f"continue it exactly. Pass --s2s_batch_size {saved}, or move {s2s_run} away")
        recorded = s2s_run / "overrides.json"
        if recorded.is_file() and read_json(recorded) != overrides:
            raise SystemExit(f"{s2s_run} trains a model with overrides {read_json(recorded)}; the recipe now says "
                             f"{overrides}, which a resumed run would not apply. Move {s2s_run} away to train anew")
    else:
        (s2s_run / "s2s_best.pt").unlink(missing_ok=True)  # a stale best from an earlier run must not ship
    s2s_run.mkdir(parents=True, exist_ok=True)
    trained_on.write_text(codec_sha + "\n")


def wall_seconds(metrics_jsonl: Path, key: str) -> float:
    """Training wall time summed from a metrics log (per-row step time x rows' step gaps)."""
    total, prev = 0.0, 0
    if not metrics_jsonl.is_file():
        return 0.0
    for line in metrics_jsonl.read_text().splitlines():
        row = json.loads(line)
        if row.get("split", "train") != "train" or key not in row:
            continue
        step = int(row["step"])
        gap = step - prev
        if gap > 0:
            total += float(row[key]) * (gap if key == "seconds_per_step" else 1)
        prev = step
    return total


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workspace_arg(p)
    p.add_argument("--out", default=str(DEMO_MODEL_DIR), help=f"where the shipped models go (default {DEMO_MODEL_DIR})")
    p.add_argument("--runs", default="runs", help="training runs (checkpoints, logs; git-ignored), default runs/")
    p.add_argument("--codec_steps", type=int, default=6900, help="codec optimizer steps in all (default 6900)")
    p.add_argument("--s2s_steps", type=int, default=2000, help="S2S optimizer steps in all (default 2000)")
    p.add_argument("--continue_shipped", action="store_true",
                   help="train the shipped S2S model in --out for --s2s_steps more steps on the shipped codec's tokens "
                        "(a new stage: fresh optimizer, warm-up, cosine decay to the stage's end)")
    p.add_argument("--s2s_init_exclude", default="",
                   help="with --continue_shipped: parameter-name prefixes left at a fresh init (train_s2s.py "
                        "--init_exclude), e.g. 'encoder.' to retrain a collapsed encoder")
    p.add_argument("--adopt_recipe", action="store_true",
                   help="with --continue_shipped: train the stage under the current recipe's S2S_OVERRIDES instead of "
                        "those the card records (parts the recipe adds, such as the inner monologue's word head, "
                        "start fresh; name others with --s2s_init_exclude)")
    p.add_argument("--new_s2s", action="store_true",
                   help="train a new S2S model from scratch (the current recipe) on the shipped codec's tokens, "
                        "to --s2s_steps of the recipe's schedule; resumes its run (runs/s2s_demo_on_<codec sha>)")
    p.add_argument("--s2s_batch_size", type=int, default=8, help="S2S pairs per step (default 8)")
    p.add_argument("--workers", type=int, default=2, help="corpus rendering processes")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the S2S training (0: torch's default)")
    p.add_argument("--eval_pairs", type=int, default=96, help="first-turn test pairs to evaluate (default 96)")
    p.add_argument("--eval_context", type=int, default=24, help="'repeat that' / 'what did I ask' pairs each (default 24)")
    p.add_argument("--skip_eval", action="store_true", help="export without evaluating (no model card figures)")
    p.add_argument("--evaluate_only", action="store_true",
                   help="train nothing: evaluate the shipped weights again (after a change to evaluate_agent.py) "
                        "and rewrite training.json's figures and MODEL_CARD.md")
    return p.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def corpus_complete(corpus: Path) -> bool:
    """The whole corpus is there (not a --limit subset): its stats list every intent of data/."""
    from make_telugu_speech import load_dialogs

    stats = corpus / "corpus_stats.json"
    return ((corpus / "metadata" / "test_pairs.json").is_file() and stats.is_file()
            and read_json(stats).get("intents") == len(load_dialogs().intents))


def evaluate(out: Path, corpus: Path, runs: Path, args) -> dict:
    """evaluate_agent.py on the test split with the card's settings; its report without the replies."""
    eval_dir = runs / "evaluation_demo"
    run([PY, "evaluate_agent.py", "--model_dir", evaluate_agent.shown(str(out)), "--data_dir", str(corpus),
         "--out", str(eval_dir), "--num_pairs", str(args.eval_pairs), "--num_context", str(args.eval_context)])
    return {k: v for k, v in read_json(eval_dir / "evaluation.json").items() if k != "replies"}


def card_describes(out: Path, card: dict) -> bool:
    """Whether a training.json (`card`) describes the codec and S2S weights in `out` (by sha256)."""
    return (card.get("codec", {}).get("sha256") == folder_sha256(out / "codec")
            and card.get("s2s", {}).get("sha256") == folder_sha256(out / "s2s"))


def main(argv=None) -> None:
    args = parse_args(argv)
    ws = workspace_from_args(args)
    corpus, runs, out = ws.synth_corpus, Path(args.runs), Path(args.out)
    codec_run, s2s_run = runs / "codec_demo", runs / "s2s_demo"
    codec_export = codec_run / "export"  # the fp16 codec the S2S model learns from, shipped with it
    t0 = time.time()
    card_path = out / "training.json"
    previous = read_json(card_path) if card_path.is_file() else {}
    if args.new_s2s and (args.continue_shipped or args.evaluate_only):
        raise SystemExit("--new_s2s trains a new S2S model from scratch: leave out --continue_shipped / --evaluate_only")
    if (args.adopt_recipe or args.s2s_init_exclude) and not args.continue_shipped:
        raise SystemExit("--adopt_recipe and --s2s_init_exclude change a --continue_shipped stage: add --continue_shipped")
    if (args.continue_shipped or args.evaluate_only) and not card_describes(out, previous):
        flag, instead = (("--continue_shipped", "train from scratch without --continue_shipped") if args.continue_shipped
                         else ("--evaluate_only", "run the full recipe, which evaluates what it ships"))
        raise SystemExit(f"{flag}: {out} holds weights that {card_path} does not describe; restore them "
                         f"(git checkout {out}) or {instead}")
    if args.new_s2s and previous.get("codec", {}).get("sha256") != folder_sha256(out / "codec"):
        raise SystemExit(f"--new_s2s: {out}/codec holds a codec that {card_path} does not describe; restore it "
                         f"(git checkout {out}) or run the full recipe without --new_s2s")
    if args.continue_shipped or args.new_s2s:
        codec_run = None
        codec_export = out / "codec"
    if args.new_s2s:
        s2s_run = runs / f"s2s_demo_on_{sha256(weight_files(codec_export)[0])[:12]}"
    if args.continue_shipped:
        init_sha = hashlib.sha256("".join(previous["s2s"]["sha256"].values()).encode()).hexdigest()
        s2s_run = runs / f"s2s_demo_from_{init_sha[:12]}"
    if args.evaluate_only:
        if not corpus_complete(corpus):
            raise SystemExit(f"--evaluate_only needs the whole corpus in {corpus}: "
                             "python make_telugu_speech.py --workers 2 builds it")
        info = {**previous, "evaluation": evaluate(out, corpus, runs, args)}
        write_json(card_path, info)
        (out / "MODEL_CARD.md").write_text(model_card(info))
        log(f"evaluated in {time.time() - t0:.0f} s; {card_path} and {out}/MODEL_CARD.md rewritten")
        return

    # 1. corpus
    if not corpus_complete(corpus):
        run([PY, "make_telugu_speech.py", "--output_dir", str(corpus), "--workers", str(args.workers)])
    else:
        log(f"corpus: {corpus} is complete")

    # 2. codec
    done = checkpoint_step(codec_run / "last.pt") if codec_run else 0
    if codec_run is None:
        log(f"codec: the shipped one ({codec_export})")
    elif done < args.codec_steps:
        resume = ["--resume", str(codec_run / "last.pt")] if done else []
        run([PY, "train_codec_dac.py", "--data_dir", str(corpus), "--output_dir", str(codec_run), *CODEC_FLAGS,
             "--max_steps", str(args.codec_steps), *resume])
    else:
        log(f"codec: {codec_run / 'last.pt'} is at step {done} (>= {args.codec_steps})")

    # 3. export the codec to the run's staging folder (out/ is only touched once the S2S model fits it)
    from s2s_transformer import TeluguS2STransformer
    from telugu_codec import TeluCodec

    if codec_run is not None:
        codec_step = checkpoint_step(codec_run / "last.pt")
        stamp = codec_export / "step.txt"
        if not stamp.is_file() or stamp.read_text().strip() != str(codec_step):
            export(TeluCodec, codec_run / "last.pt", codec_export)
            stamp.write_text(f"{codec_step}\n")
    codec_sha = sha256(weight_files(codec_export)[0])  # the S2S run is tied to it

    # 4. S2S on the exported codec's tokens
    s2s_last = s2s_run / "last.pt"
    # a continued model keeps the overrides it was trained with (unless it adopts the recipe's); a new
    # one takes the recipe's
    keep = args.continue_shipped and not args.adopt_recipe
    overrides = s2s_stages(previous)[-1]["overrides"] if keep else S2S_OVERRIDES
    claim_s2s_run(s2s_run, codec_sha, args.s2s_batch_size, overrides)
    write_json(s2s_run / "overrides.json", overrides)
    done = checkpoint_step(s2s_last)
    stage_flags = S2S_FLAGS if not args.continue_shipped else \
        CONTINUE_FLAGS + ["--schedule_steps", str(args.s2s_steps), "--init_from", evaluate_agent.shown(str(out / "s2s"))] \
        + (["--init_exclude", args.s2s_init_exclude] if args.s2s_init_exclude else []) \
        + (AUGMENT_FLAGS if overrides.get("encoder_input") == "codec" else [])
    if done < args.s2s_steps:
        resume = ["--resume", str(s2s_last)] if done else []
        threads = ["--threads", str(args.threads)] if args.threads else []
        run([PY, "train_s2s.py", "--data_dir", str(corpus), "--codec_path", str(codec_export),
             "--checkpoint_dir", str(s2s_run), "--config", str(s2s_run / "overrides.json"),
             "--batch_size", str(args.s2s_batch_size), *stage_flags, "--max_steps", str(args.s2s_steps), *threads, *resume])
    else:
        log(f"s2s: {s2s_last} is at step {done} (>= {args.s2s_steps})")

    # 5. ship both together: the codec as exported, the S2S model with the lowest validation loss
    best = s2s_run / "s2s_best.pt" if (s2s_run / "s2s_best.pt").is_file() else s2s_last
    best_ckpt = load_checkpoint(best)
    export(TeluguS2STransformer, best, out / "s2s")
    if codec_run is not None:
        export(TeluCodec, codec_export, out / "codec")  # fp16 -> fp16: the very bytes the S2S model learned from

    # 6. evaluation (skipped when these very weights were evaluated already) and model card
    s2s_sha = folder_sha256(out / "s2s")
    machine = (f"{cpu_name()}, {os.cpu_count()} CPU threads, torch {torch.__version__}"
               + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    stage = {"step": int(best_ckpt["step"]), "trained_steps": checkpoint_step(s2s_last), "run": str(s2s_run),
             "flags": stage_flags + ["--batch_size", str(args.s2s_batch_size)], "overrides": overrides,
             "precision": load_checkpoint(s2s_last).get("precision", "fp32"),
             "val_loss": float(best_ckpt.get("val_loss", float("nan"))),
             "val_accuracy": float(best_ckpt.get("metrics", {}).get("val_accuracy", float("nan"))),
             **{k: float(v) for k, v in best_ckpt.get("metrics", {}).items()
                if k in ("val_input_gain", "val_cer", "train_input_gain", "train_cer", "val_reply_text_exact",
                         "train_reply_text_exact", "val_text_input_gain")},
             "train_seconds": round(wall_seconds(s2s_run / "s2s_demo.jsonl", "seconds")), "machine": machine}
    stages = s2s_stages(previous) + [stage] if args.continue_shipped else [stage]
    if codec_run is None:
        codec_info = previous["codec"]
    else:
        codec_info = {"step": codec_step, "run": str(codec_run), "flags": CODEC_FLAGS,
                      "parameters": sum(p.numel() for p in TeluCodec.from_pretrained(out / "codec").parameters()),
                      "train_seconds": round(wall_seconds(codec_run / "metrics.jsonl", "seconds_per_step")),
                      "sha256": folder_sha256(out / "codec"), "machine": machine}
    info = {
        "codec": codec_info,
        "s2s": {"stages": stages, "steps": sum(st["step"] for st in stages),
                "parameters": TeluguS2STransformer.from_pretrained(out / "s2s").num_parameters(),
                "val_loss": stage["val_loss"], "val_accuracy": stage["val_accuracy"],
                "train_seconds": sum(st["train_seconds"] for st in stages), "sha256": s2s_sha},
        "corpus": evaluate_agent.shown(str(corpus)),
        "machine": machine,
    }
    if card_describes(out, previous) and "evaluation" in previous:
        log("evaluation: these weights were evaluated already (training.json); kept")
        info["evaluation"] = previous["evaluation"]
    elif not args.skip_eval:
        info["evaluation"] = evaluate(out, corpus, runs, args)
    write_json(card_path, info)
    (out / "MODEL_CARD.md").write_text(model_card(info))
    log(f"all stages done in {time.time() - t0:.0f} s; {out}/MODEL_CARD.md written")


def s2s_stages(info: dict) -> list[dict]:
    """The S2S training stages of a training.json, oldest first (cards before stages had one,
    described at the top level of "s2s", trained on the card's machine)."""
    s = info["s2s"]
    if "stages" in s:
        return s["stages"]
    keys = ("step", "trained_steps", "run", "flags", "overrides", "val_loss", "val_accuracy", "train_seconds")
    return [{**{k: s[k] for k in keys}, "precision": "fp32", "machine": info["machine"]}]


def stage_line(i: int, st: dict) -> str:
    start = "from scratch" if i == 0 else "from the previous stage's shipped fp16 weights"
    return (f"- S2S stage {i + 1} ({start}): weights from step {st['step']} of {st['trained_steps']} (lowest "
            f"validation loss {st['val_loss']:.3f}, validation token accuracy {100 * st['val_accuracy']:.1f}%"
            + (f", input gain {st['val_input_gain']:.5f} nats" if "val_input_gain" in st else "")
            + (f", question text CER {100 * st['val_cer']:.0f}%" if "val_cer" in st else "")
            + (f"; on training pairs: input gain {st['train_input_gain']:.5f} nats" if "train_input_gain" in st else "")
            + (f", question text CER {100 * st['train_cer']:.0f}%" if "train_cer" in st else "")
            + (f"; reply words all right (teacher forced) in {100 * st['val_reply_text_exact']:.0f}% of validation pairs"
               if "val_reply_text_exact" in st else "")
            + (f" and {100 * st['train_reply_text_exact']:.0f}% of training pairs" if "train_reply_text_exact" in st else "")
            + ") of "
            f"`train_s2s.py {' '.join(st['flags'])}` with overrides {st['overrides']}, {st['precision']}, "
            f"~{st['train_seconds'] / 3600:.1f} h on {st['machine']}.")


def model_card(info: dict) -> str:
    c, s = info["codec"], info["s2s"]
    stages = s2s_stages(info)
    lines = [
        "# Demo models: TeluCodec (demo) + Telugu S2S transformer (demo)",
        "",
        "Written by `make_demo_models.py` (rerun it to reproduce or to train further; every stage resumes).",
        "Only these weights are in git; the corpus, the runs and the token cache are rebuilt by script.",
        "",
        "## What they are",
        "",
        f"- `codec/`: TeluCodec, preset `demo` ({c['parameters'] / 1e6:.2f}M parameters): 16 kHz audio <-> "
        "200 Hz x 8 x 1024 codes, 16 kbps, causal, 5 ms algorithmic latency. fp16 safetensors.",
        f"- `s2s/`: TeluguS2STransformer, preset `demo` ({s['parameters'] / 1e6:.1f}M parameters: 256 wide, "
        "6 Conformer encoder layers, 4 decoder layers, a depth transformer over the 8 codebooks), 4 voices, "
        "9 emotions, 10-turn context. fp16 safetensors.",
        "",
        "## Data",
        "",
        f"The synthetic Telugu corpus of `make_telugu_speech.py` ({info['corpus']}): festival and espeak-ng voices "
        "transformed into 4 agent voices x 9 emotions and 16 augmented user voices; 172 intents, 6 question "
        "paraphrases each, plus 'repeat that' / 'what did I ask' conversations. The test split holds question "
        "paraphrases and user voices that training never saw.",
        "",
        "## Training",
        "",
        f"- codec: {c['step']} steps of `train_codec_dac.py {' '.join(c['flags'])}` "
        f"(~{c['train_seconds'] / 3600:.1f} h of training time).",
        *[stage_line(i, st) for i, st in enumerate(stages)],
        "- The S2S model learns the tokens of the shipped fp16 codec. The first stage's schedule spans the "
        "recipe's full run (30 epochs) and stopped early, near the peak rate; each later stage "
        "(`make_demo_models.py --continue_shipped --s2s_steps N`) warms up again and decays to its own end.",
        "",
        "## Measured",
        "",
        evaluate_agent.markdown(info["evaluation"]) if "evaluation" in info else "(not evaluated: run without --skip_eval)",
        "## Files",
        "",
        *[f"- codec/{name} sha256 {digest}" for name, digest in c["sha256"].items()],
        *[f"- s2s/{name} sha256 {digest}" for name, digest in s["sha256"].items()],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
