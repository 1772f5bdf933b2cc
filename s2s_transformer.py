"""Telugu speech-to-speech transformer: the user's codec codes in, the agent's codec codes out.

No ASR, LLM or TTS in between: a streaming Conformer encoder reads the user's turn as codec codes
(8 codebooks x 200 frames/s) while the user is still speaking; when the turn ends, a causal
transformer decoder, conditioned on a voice, an emotion and the earlier turns of the conversation,
writes the reply as codec codes, chunk by chunk, until it decides the reply is over.

Time axis. The codec gives 200 frames/s. The model works in steps of `frames_per_step` = 4 frames
(50 steps/s, 20 ms each): a step's input is the sum of its frames' 8 codebook embeddings, the four
frame vectors concatenated and projected (FrameEmbedding). One decoder step emits one step's 32
codes, so a second of reply costs 50 decoder steps.

Per-step output: a small depth transformer runs over the 8 codebooks, coarse first (RQ-Transformer /
Moshi's idea, applied per codebook rather than per token): at codebook k it sees its own projection
of the decoder state and the codes already chosen for codebooks < k in all 4 frames of the step,
and predicts codebook k for the 4 frames at once. Residual VQ codebooks depend on the coarser
ones, which parallel heads cannot model (benchmark_s2s.py's toy: sampled fine codes agree with
their coarse code in most frames with the depth head, in none with parallel heads); a depth over
all 32 tokens would cost 32 sequential passes per step, this one 8. `depth_dim=0` gives parallel
heads instead (one linear layer for all 32 codes), the speed baseline. A delay pattern was not
built: it makes the first complete frame wait n_codebooks - 1 = 7 decoder steps, which costs
first-chunk latency, the target that binds here. An end-of-reply head (one logit per step)
decides when to stop.

Encoder input: by default each code id has a learned embedding (FrameEmbedding), shared with
the decoder's input. With `encoder_input="codec"` the encoder reads the codes through the codec's
own vectors instead (CodecFrameEmbedding: the codec's latent for them, a frozen table copied from
the codec with load_codec_vectors): codes that sound alike stay close there whatever the voice,
where learned per-id embeddings of eleven training voices carry nothing to a new voice (measured
by probe_intent.py: README, "What the test split asks of a model").

Encoder: Conformer blocks (macaron FFN halves, RoPE self-attention, causal depthwise convolution,
LayerNorm) with chunked attention: a step sees every step of its own chunk (`encoder_chunk_steps`)
and of the `encoder_left_chunks` chunks before it. So the encoder can run chunk by chunk while the
user speaks (EncoderStream) and give exactly what the full forward gives under the same mask;
when the turn ends at most one chunk is left to encode.

Memory: the current turn's encoding plus the earlier turns' (context_manager.py gives their
codes; each is encoded on its own by the same encoder), each vector tagged with its turn's role
(user / agent) and age (0 = the current turn, 1 = the latest earlier one...) and kept with its
step within its turn. Cross-attention rotates queries by reply step and keys by that in-turn
step (RoPE), so time-aligned and copied answers ("repeat that") are natural, and adds a learned
score per head and turn slot, so a head can keep to one turn.

Decoder: pre-LN causal transformer layers with RoPE self-attention, cross-attention to the memory
and an FFN. For generation the self-attention K/V live in buffers preallocated once per reply and
written in place by position (gpt-fast), and the cross-attention K/V are computed once per reply
(the current turn's incrementally, chunk by chunk, while the user speaks; the context's while
the user speaks, by prepare_context): with ReplyState.static_shapes every step has fixed shapes,
for torch.compile / CUDA graphs on GPU; on CPU the filled part of the buffers is sliced instead.

Auxiliary losses (S2SConfig.encoder_ctc_weight, decoder_input_dropout), for training only: a
reply can be learned from voice, emotion and its own past codes alone, and then the decoder stops
reading the memory and the encoder collapses (measured: README). A CTC head reads the user turn's
text (Telugu graphemes, text_to_ids) off the encoder output, so the encoder must carry what was
said (Translatotron's auxiliary recognition targets); word dropout on the decoder's input hides
some of the reply's own past, so the decoder must take what comes next from the memory. The CTC
head also gives a transcript of the user's turn (transcribe).

Inner monologue (S2SConfig.reply_text_weight > 0; Moshi's idea, as a prefix rather than a time-
aligned stream): the decoder first writes the reply's words, one token per word of reply_vocab
(BOS, the words, EOT), then speaks. Which words to say is all the question decides, a small
target that the decoder can only predict by reading the memory; the speech after them reads its
content off them through self-attention, as a TTS model reads its text. The words cost a decoder
step each (no codebook head) before the first audio, a few ms on a CPU. A batch's prefixes are
left-padded (the padding hidden), so every row's speech starts at the same position and relative
positions are those of an unpadded reply; cross-attention queries are rotated by the speech step
(the words by how many were written: the k-th word can copy the k-th word of an earlier turn),
so reading the memory does not depend on how many words came first. Pairs
without a transcript train the speech after [BOS, EOT] and add no words' loss.

Conditioning: speaker and emotion vectors (speaker_embeddings.py; ids or mixing weights, so
voices interpolate) plus a summary of the user's turn are added to every decoder step.

Usage:
    config = S2SConfig()                       # the mission's 768-dim, 12 + 12 layer model
    config = S2SConfig.preset("demo")          # small enough for real time on 2 CPU cores
    model = TeluguS2STransformer(config)
    out = model(codes, target_codes, speaker_id, emotion_id)          # teacher forcing: out.loss
    for chunk in model.generate_streaming(codes, torch.tensor([0]), torch.tensor([0]), max_new_tokens=100):
        ...                                    # chunk: LongTensor (B, 8, 4) per 20 ms
    model.save("checkpoints/s2s"); TeluguS2STransformer.from_pretrained("checkpoints/s2s")
    python s2s_transformer.py --preset demo    # parameters, shapes, latency on this machine
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import config_from_dict, config_to_dict
from speaker_embeddings import EmotionEmbedding, SpeakerEmbedding

ROLE_USER, ROLE_AGENT = 0, 1
CHECKPOINT_NAMES = ("s2s_best.pt", "last.pt")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class S2SConfig:
    """Model hyper-parameters. Defaults are the mission's model; `S2SConfig.preset("demo")` is the
    CPU real-time one. Field names match train_s2s.py's flags."""

    # codec tokens
    n_codebooks: int = 8
    codebook_size: int = 1024
    codec_frame_rate: int = 200  # codec frames per second (hop 80 at 16 kHz)
    frames_per_step: int = 4  # codec frames per model step: 50 steps/s, 20 ms per decoder step
    # sizes
    hidden_dim: int = 768
    num_encoder_layers: int = 12
    num_decoder_layers: int = 12
    num_heads: int = 0  # 0: hidden_dim // 64
    ffn_multiplier: float = 4.0  # decoder FFN width; each encoder macaron half uses half of it
    conv_kernel_size: int = 15  # causal depthwise conv over steps: 15 steps = 300 ms
    # streaming encoder: 80 ms chunks, each step sees its chunk and 16 earlier ones (1.36 s) per layer
    encoder_chunk_steps: int = 4
    encoder_left_chunks: int = 16
    # per-step output head: depth transformer over codebooks; depth_dim 0 = parallel heads
    depth_dim: int = 256
    depth_layers: int = 2
    depth_heads: int = 0  # 0: depth_dim // 64
    # conditioning
    num_speakers: int = 4
    num_emotions: int = 9
    max_context_turns: int = 10
    # limits and training
    max_reply_steps: int = 750  # default max_new_tokens: 15 s of reply
    dropout: float = 0.1
    stop_loss_weight: float = 1.0
    # Auxiliary losses that keep the reply tied to the question. Without them the decoder learns
    # the reply from its own past codes, voice and emotion alone and the encoder collapses to a
    # constant (measured: README, "why the replies ignore the question").
    encoder_ctc_weight: float = 0.0  # CTC of the user turn's text (TEXT_VOCAB) on the encoder output
    # what the encoder reads: "embedding" (a learned vector per code id, shared with the decoder) or
    # "codec" (the codec's latent for the codes: a frozen (n_codebooks, codebook_size,
    # codec_latent_dim) table from the codec, see load_codec_vectors)
    encoder_input: str = "embedding"
    codec_latent_dim: int = 0  # the codec's latent width, for encoder_input "codec"
    decoder_input_dropout: float = 0.0  # training only: drop this share of the reply's input steps
    # Inner monologue (Moshi's, as a prefix): the decoder first writes the reply's words, then speaks.
    # Words are a small, content-only target, so predicting them forces the decoder to read the
    # question, and the speech after them reads its content off them (self-attention) instead of
    # out of the question's codes. 0: speech only. reply_vocab: the words (train_s2s.py builds it
    # from the training pairs' target_text); a reply is cut at max_reply_words.
    reply_text_weight: float = 0.0
    reply_vocab: list[str] = field(default_factory=list)
    max_reply_words: int = 24
    # The agent's earlier turns are remembered by their words too (the words it wrote before
    # speaking them), next to their encoded audio: "repeat that" is then a copy from the memory.
    context_words: bool = False
    rope_base: float = 10000.0
    use_flash_attn: bool = False  # flash_attn where it computes the same as SDPA; SDPA otherwise

    # derived in __post_init__
    n_heads: int = field(init=False)
    head_dim: int = field(init=False)
    ffn_dim: int = field(init=False)
    encoder_ffn_dim: int = field(init=False)
    n_depth_heads: int = field(init=False)
    n_turn_slots: int = field(init=False)  # memory turn slots: 2 roles x (max_context_turns + 1) ages
    n_reply_tokens: int = field(init=False)  # REPLY_FIRST + len(reply_vocab)
    step_ms: float = field(init=False)
    flash: bool = field(init=False)  # use_flash_attn and flash_attn importable

    def __post_init__(self):
        self.n_heads = self.num_heads or max(1, self.hidden_dim // 64)
        if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
            raise ValueError(
                f"hidden_dim {self.hidden_dim} must split into {self.n_heads} heads of even size; "
                "pick hidden_dim as a multiple of 64 or set num_heads"
            )
        self.head_dim = self.hidden_dim // self.n_heads
        self.ffn_dim = int(self.hidden_dim * self.ffn_multiplier)
        self.encoder_ffn_dim = self.ffn_dim // 2
        self.n_depth_heads = self.depth_heads or max(1, self.depth_dim // 64)
        if self.depth_dim and self.depth_dim % self.n_depth_heads:
            raise ValueError(f"depth_dim {self.depth_dim} must divide into {self.n_depth_heads} heads")
        if self.depth_dim and self.depth_layers < 1:
            raise ValueError("depth_layers must be >= 1 when depth_dim > 0 (depth_dim 0 = parallel heads)")
        for name in ("n_codebooks", "codebook_size", "frames_per_step", "num_encoder_layers", "num_decoder_layers",
                     "conv_kernel_size", "encoder_chunk_steps", "num_speakers", "num_emotions", "max_reply_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"S2SConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.encoder_left_chunks < 0:
            raise ValueError("encoder_left_chunks must be >= 0")
        if self.encoder_ctc_weight < 0:
            raise ValueError("encoder_ctc_weight must be >= 0 (0: no text head)")
        if self.encoder_input not in ("embedding", "codec"):
            raise ValueError(f"encoder_input must be 'embedding' or 'codec'; got {self.encoder_input!r}")
        if self.encoder_input == "codec" and self.codec_latent_dim < 1:
            raise ValueError("encoder_input 'codec' needs codec_latent_dim (the codec's latent_dim, e.g. 128 for "
                             "the demo codec)")
        if not 0.0 <= self.decoder_input_dropout < 1.0:
            raise ValueError("decoder_input_dropout must be in [0, 1)")
        if self.reply_text_weight < 0 or self.max_reply_words < 1:
            raise ValueError("reply_text_weight must be >= 0 (0: no inner monologue) and max_reply_words >= 1")
        if self.reply_text_weight > 0 and not self.reply_vocab:
            raise ValueError("reply_text_weight > 0 needs reply_vocab, the reply words: train_s2s.py builds it from "
                             "the training pairs' target_text (build_reply_vocab)")
        if len(set(self.reply_vocab)) != len(self.reply_vocab) or any(len(w.split()) != 1 for w in self.reply_vocab):
            raise ValueError("reply_vocab must hold distinct words without spaces (build_reply_vocab makes one)")
        if self.context_words and self.reply_text_weight <= 0:
            raise ValueError("context_words remembers the words of the agent's turns: it needs an inner monologue "
                             "(reply_text_weight > 0)")
        self.n_reply_tokens = REPLY_FIRST + len(self.reply_vocab)
        self.n_turn_slots = 2 * (self.max_context_turns + 1)
        self.step_ms = 1000.0 * self.frames_per_step / self.codec_frame_rate
        self.flash = self.use_flash_attn and flash_attn_available()
        if self.use_flash_attn and not self.flash:
            warnings.warn("use_flash_attn=True but flash_attn is not installed; using PyTorch SDPA (same result)")

    @classmethod
    def preset(cls, name: str, **overrides) -> S2SConfig:
        """A named configuration (PRESETS), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return config_from_dict(cls, {**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # The mission's model: ~25 ms per decoder step on 2 CPU threads, made for a GPU.
    "full": {},
    # Real time on one CPU thread (benchmark_s2s.py): 256 wide, 6 encoder layers (they run while the
    # user speaks, 10 ms per 80 ms chunk) and 4 decoder layers (per 20 ms step: ~3 ms decoder +
    # ~4.5 ms codebook head, with 6 decoder layers it was 10 ms, only just 2x real time).
    "demo": dict(hidden_dim=256, num_encoder_layers=6, num_decoder_layers=4, depth_dim=128, depth_layers=1),
    # For tests: seconds to train on a CPU.
    "tiny": dict(hidden_dim=64, num_encoder_layers=2, num_decoder_layers=2, num_heads=2, depth_dim=32,
                 depth_layers=1, depth_heads=2, conv_kernel_size=3, dropout=0.0),
}


# --------------------------------------------------------------------------------------
# Text of a turn, for the auxiliary CTC loss: Telugu graphemes (the Unicode block U+0C00..U+0C7F,
# each code point a token: consonants, vowel signs and virama spell the akshara) and a word
# break; punctuation, digits and other scripts are dropped. 0 is the CTC blank.

TEXT_BLANK, TEXT_SPACE, TEXT_FIRST = 0, 1, 2
TELUGU_BLOCK = range(0x0C00, 0x0C80)
TEXT_VOCAB_SIZE = TEXT_FIRST + len(TELUGU_BLOCK)


def text_to_ids(text: str) -> list[int]:
    """Telugu text -> CTC targets: one id per Telugu code point, one TEXT_SPACE per run of
    whitespace or punctuation between words, nothing else."""
    ids: list[int] = []
    for ch in text:
        if ord(ch) in TELUGU_BLOCK:
            ids.append(TEXT_FIRST + ord(ch) - TELUGU_BLOCK.start)
        elif ids and ids[-1] != TEXT_SPACE and not ch.isdigit():
            ids.append(TEXT_SPACE)
    while ids and ids[-1] == TEXT_SPACE:
        ids.pop()
    return ids


def ids_to_text(ids: list[int]) -> str:
    return "".join(" " if i == TEXT_SPACE else chr(TELUGU_BLOCK.start + i - TEXT_FIRST) for i in ids if i != TEXT_BLANK)


def ctc_best_path(logits: torch.Tensor, valid: torch.Tensor) -> list[list[int]]:
    """Best-path CTC decoding of the text head: logits (B, S, V), valid (B, S) -> B lists of ids
    (repeats merged, blanks and padding steps dropped)."""
    out = []
    for row, ok in zip(logits.argmax(-1).tolist(), valid.tolist()):
        ids, prev = [], TEXT_BLANK
        for i, keep in zip(row, ok):
            if keep and i != prev and i != TEXT_BLANK:
                ids.append(i)
            prev = i if keep else prev
        out.append(ids)
    return out


# Words of the reply, for the inner monologue: the same normalisation as text_to_ids (Telugu
# graphemes, punctuation and digits dropped), one token per word of reply_vocab. REPLY_EOT ends the
# text (the next step is speech); a word outside the vocabulary is REPLY_UNK.

REPLY_EOT, REPLY_UNK, REPLY_FIRST = 0, 1, 2


def reply_words(text: str) -> list[str]:
    """'నమస్కారం, బాగున్నారా?' -> ['నమస్కారం', 'బాగున్నారా']."""
    return ids_to_text(text_to_ids(text)).split()


def reply_index(vocab: list[str]) -> dict[str, int]:
    """word -> its token id, for reply_ids."""
    return {w: REPLY_FIRST + i for i, w in enumerate(vocab)}


def reply_ids(text: str, index: dict[str, int], max_words: int) -> list[int]:
    """A reply's text -> word tokens, index[word] (REPLY_UNK outside it), at most max_words."""
    return [index.get(w, REPLY_UNK) for w in reply_words(text)][:max_words]


def build_reply_vocab(texts, max_words: int = 8192) -> list[str]:
    """The reply vocabulary of a corpus: its words, most frequent first (ties alphabetically), at
    most max_words (the rest read as REPLY_UNK)."""
    counts: dict[str, int] = {}
    for text in texts:
        for w in reply_words(text):
            counts[w] = counts.get(w, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))[:max_words]


# --------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass
class ContextTurns:
    """Earlier turns of B conversations, flattened over the batch: the model's `context` input.

    codes (N, K, F) holds N turns padded at the end (any value) to the longest; lengths (N,) their
    frames; roles (N,) ROLE_USER / ROLE_AGENT; ages (N,) 1 for the latest earlier turn, 2 for the
    one before...; batch_index (N,) the conversation each turn belongs to; texts (N,) the words of
    an agent turn (what its inner monologue wrote) or None, read by models with context_words.
    """

    codes: torch.Tensor
    lengths: torch.Tensor
    roles: torch.Tensor
    ages: torch.Tensor
    batch_index: torch.Tensor
    batch_size: int
    texts: list | None = None

    @classmethod
    def from_turns(cls, conversations: list[list[tuple]]) -> ContextTurns:
        """From B lists (one per conversation, oldest first) of (role, codes (K, F)) or (role,
        codes, text) turns (text: the agent's words, or None)."""
        turns = [(b, i, turn[0], turn[1], turn[2] if len(turn) > 2 else None)
                 for b, conv in enumerate(conversations) for i, turn in enumerate(conv)]
        if not turns:
            raise ValueError("ContextTurns.from_turns: no turns; pass context=None for a first turn")
        n_frames = max(int(c.shape[-1]) for _, _, _, c, _ in turns)
        k = turns[0][3].shape[0]
        codes = torch.zeros(len(turns), k, n_frames, dtype=torch.long)
        for j, (_, _, _, c, _) in enumerate(turns):
            if c.dim() != 2 or c.shape[0] != k or c.shape[1] == 0:
                raise ValueError(f"context turn codes must be (n_codebooks={k}, frames>0); got {tuple(c.shape)}")
            codes[j, :, : c.shape[1]] = c
        texts = [t for *_, t in turns]
        return cls(
            codes=codes,
            lengths=torch.tensor([c.shape[1] for _, _, _, c, _ in turns]),
            roles=torch.tensor([r for _, _, r, _, _ in turns]),
            ages=torch.tensor([len(conversations[b]) - i for b, i, *_ in turns]),
            batch_index=torch.tensor([b for b, *_ in turns]),
            batch_size=len(conversations),
            texts=texts if any(t for t in texts) else None,
        )

    def to(self, device) -> ContextTurns:
        return ContextTurns(self.codes.to(device), self.lengths.to(device), self.roles.to(device),
                            self.ages.to(device), self.batch_index.to(device), self.batch_size, self.texts)


@dataclass
class Memory:
    """What the decoder cross-attends to: vectors (B, M, D), their step within their own turn
    `positions` (B, M) for RoPE, the turn slot each comes from `slots` (B, M) (role * (max turns
    + 1) + age), and `valid` (B, M) (False = padding)."""

    vectors: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor
    cross_kv: list | None = None  # per decoder layer (k, v) (B, H, M, Dh), filled once for generation

    @staticmethod
    def cat(parts: list[Memory]) -> Memory:
        return Memory(*(torch.cat([getattr(p, name) for p in parts], 1)
                        for name in ("vectors", "positions", "slots", "valid")))


@dataclass
class S2SOutput:
    """Teacher-forced output. logits (B, K, F, V) align with target_codes (B, K, F);
    stop_logits (B, S + 1): the end-of-reply logit at each decoder position."""

    logits: torch.Tensor
    stop_logits: torch.Tensor
    loss: torch.Tensor | None = None
    codebook_losses: torch.Tensor | None = None  # (K,) mean cross-entropy per codebook
    stop_loss: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)
    text_loss: torch.Tensor | None = None  # CTC of the user turn's text (encoder_ctc_weight > 0)
    text_logits: torch.Tensor | None = None  # (B, S_in, TEXT_VOCAB_SIZE) the text head over the user turn
    text_valid: torch.Tensor | None = None  # (B, S_in) the user turn's valid steps under text_logits
    reply_text_loss: torch.Tensor | None = None  # cross-entropy of the reply's words (reply_text_weight > 0)
    reply_text_logits: torch.Tensor | None = None  # (B, P - 1, n_reply_tokens) for each next text token
    reply_text_target: torch.Tensor | None = None  # (B, P - 1) the next text token, -100 where none


# --------------------------------------------------------------------------------------
# Small pure helpers


def steps_for(frames: torch.Tensor, frames_per_step: int) -> torch.Tensor:
    """Model steps covering each number of codec frames: 10 frames at 4 per step -> 3 steps."""
    return torch.div(frames + frames_per_step - 1, frames_per_step, rounding_mode="floor")


def pad_to_steps(codes: torch.Tensor, frames_per_step: int) -> torch.Tensor:
    """(B, K, F) -> (B, K, steps * frames_per_step), repeating the last frame into the partial step.

    Example: F = 10, frames_per_step = 4 -> frames 0..9 then frame 9 twice (12 frames, 3 steps).
    """
    pad = -codes.shape[-1] % frames_per_step
    if pad == 0:
        return codes
    return torch.cat([codes, codes[..., -1:].expand(*codes.shape[:-1], pad)], dim=-1)


def fill_after_end(codes: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Codes (B, K, F) of a padded batch with each item's frames past its length (B,) replaced by
    its last real frame, so a padded item's partial last step equals pad_to_steps of the item alone."""
    if lengths is None:
        return codes
    frames = torch.arange(codes.shape[-1], device=codes.device)
    last = (lengths.to(codes.device) - 1).clamp_min(0)
    idx = torch.minimum(frames[None], last[:, None])  # (B, F)
    return codes.gather(2, idx[:, None, :].expand_as(codes))


def chunk_attention_mask(n_steps: int, chunk: int, left_chunks: int, device=None) -> torch.Tensor:
    """(S, S) bool, True where step i may attend step j: j's chunk is i's or one of the
    `left_chunks` before it. Example: chunk 2, left 1, S 6 -> step 4 (chunk 2) sees steps 2..5."""
    c = torch.arange(n_steps, device=device) // chunk
    diff = c[:, None] - c[None, :]
    return (diff >= 0) & (diff <= left_chunks)


def hide_padding(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mask (T, T) bool (True = attend) and valid (B, T) -> (B, 1, T, T): padding keys hidden, and
    every position still sees itself (a padding row stays finite)."""
    t = valid.shape[1]
    return ((mask[None] & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=valid.device)[None])[:, None]


def causal_mask(t: int, device=None) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def pad_ids(seqs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Id sequences (lists or 1-D tensors) -> (B, max(1, L)) LongTensor padded with 0, and their
    lengths (B,)."""
    lengths = torch.tensor([len(x) for x in seqs], device=device)
    out = torch.zeros(len(seqs), max(1, int(lengths.max()) if len(seqs) else 0), dtype=torch.long, device=device)
    for i, x in enumerate(seqs):
        if len(x):
            out[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    return out, lengths


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (..., T) -> cos, sin (..., 1, T, head_dim) for (B, H, T, Dh) tensors; sin carries
    the rotation's signs, so apply_rope is x * cos + swap_halves(x) * sin (few ops per step)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., T, Dh/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1).unsqueeze(-3), torch.cat([-sin, sin], -1).unsqueeze(-3)


def apply_rope(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """Rotate (..., T, Dh) by position, half-split pairs (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin);
    cos None = no rotation."""
    if cos is None:
        return x
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


def attend(q, k, v, mask=None, is_causal=False, dropout_p=0.0, flash=False):
    """Scaled dot-product attention of (B, H, Tq, Dh) queries over (B, H, Tk, Dh) keys/values.

    `mask` is bool (True = attend), broadcastable to (B, H, Tq, Tk). flash_attn is used only where
    it computes the same thing as SDPA: no mask, fp16/bf16 on CUDA (its causal mask is
    bottom-right aligned, SDPA's top-left; they agree when Tq == Tk, the only causal use here).
    """
    if flash and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, causal=is_causal)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Dropout off for inference, whatever mode the caller left the model in (the mission's
    Phase 5 snippet never calls .eval()); the previous mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout that costs nothing at inference (no op call: generation is per-op-overhead bound)."""
    return F.dropout(x, p, True) if training and p > 0 else x


def sample_codes(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """(..., V) logits -> (...,) codes, sampled from the top_k at `temperature` (0 = greedy).
    Gumbel-max in its exponential form, argmax(logits / T - log E), E ~ Exp(1): no
    torch.multinomial, so no device sync and the step can be CUDA-graphed."""
    if temperature <= 0:
        return logits.argmax(-1)
    indices = None
    if top_k and top_k < logits.shape[-1]:
        logits, indices = logits.topk(top_k, dim=-1)
    if logits.dtype != torch.float32:
        logits = logits.float()
    noise = torch.empty_like(logits).exponential_().log_()
    choice = (logits / temperature - noise).argmax(-1, keepdim=True)
    return (indices.gather(-1, choice) if indices is not None else choice).squeeze(-1)


# --------------------------------------------------------------------------------------
# Layers


class FrameEmbedding(nn.Module):
    """Codec codes (B, K, S * fps) -> step vectors (B, S, D): per frame the sum of its K codebook
    embeddings, the step's fps frame vectors concatenated and projected. Shared by the encoder,
    the decoder input and the context, so all three see codes in one embedding space."""

    def __init__(self, cfg: S2SConfig):
        super().__init__()
        self.fps, self.dim = cfg.frames_per_step, cfg.hidden_dim
        self.codes = nn.EmbeddingBag(cfg.n_codebooks * cfg.codebook_size, cfg.hidden_dim, mode="sum")
        self.merge = nn.Linear(cfg.frames_per_step * cfg.hidden_dim, cfg.hidden_dim)
        self.register_buffer("offsets", torch.arange(cfg.n_codebooks) * cfg.codebook_size, persistent=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, k, n = codes.shape
        idx = (codes + self.offsets[:, None]).transpose(1, 2).reshape(b * n, k)
        frames = self.codes(idx)  # (B * F, D)
        return self.merge(frames.view(b, n // self.fps, self.fps * self.dim))


class CodecFrameEmbedding(nn.Module):
    """Codec codes (B, K, S * fps) -> step vectors (B, S, D) through the codec's own vectors: per
    frame the codec's latent for the codes (the sum over codebooks of the codec's decoded vector
    for each id: `table`, copied from the codec by load_codec_vectors and never trained), divided
    by one scale fixed with the table, the step's fps frames concatenated and projected."""

    def __init__(self, cfg: S2SConfig):
        super().__init__()
        self.fps, self.latent_dim = cfg.frames_per_step, cfg.codec_latent_dim
        self.register_buffer("table", torch.zeros(cfg.n_codebooks, cfg.codebook_size, cfg.codec_latent_dim))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("offsets", torch.arange(cfg.n_codebooks) * cfg.codebook_size, persistent=False)
        self.proj = nn.Linear(cfg.frames_per_step * cfg.codec_latent_dim, cfg.hidden_dim)
        self._checked = False

    @torch.no_grad()
    def load(self, table: torch.Tensor) -> None:
        """table (K, codebook_size, latent_dim): the codec's decoded vector for every code."""
        if tuple(table.shape) != tuple(self.table.shape):
            raise ValueError(f"codec vectors of shape {tuple(table.shape)}, the model expects {tuple(self.table.shape)} "
                             "(n_codebooks, codebook_size, codec_latent_dim): set codec_latent_dim to the codec's latent_dim")
        self.table.copy_(table)
        # the spread of a latent whose codes are drawn at random: sum over codebooks of each one's variance
        self.scale.copy_(table.float().var(dim=1).sum(0).mean().sqrt().clamp_min(1e-6))
        self._checked = True

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if not self._checked:
            if not bool(self.table.any()):
                raise RuntimeError("encoder_input 'codec' but the codec's vectors were never loaded: call "
                                   "model.load_codec_vectors(codec) before training (train_s2s.py does)")
            self._checked = True
        b, k, n = codes.shape
        z = F.embedding(codes + self.offsets[:, None], self.table.view(-1, self.latent_dim)).sum(1)  # (B, F, Dc)
        z = (z / self.scale).to(self.proj.weight.dtype)
        return self.proj(z.reshape(b, n // self.fps, self.fps * self.latent_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, p_drop: float):
        super().__init__()
        self.up, self.down, self.p_drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), p_drop

    def forward(self, x):
        h = dropout(F.silu(self.up(x)), self.p_drop, self.training)
        return dropout(self.down(h), self.p_drop, self.training)


class Attention(nn.Module):
    """Multi-head attention, self or cross, RoPE on queries and keys; the caller owns caches."""

    def __init__(self, dim: int, n_heads: int, dropout: float, flash: bool, cross_slots: int = 0):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout, self.flash = n_heads, dim // n_heads, dropout, flash
        if cross_slots:
            self.q, self.kv = nn.Linear(dim, dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
            # A learned score per head and turn slot (slot = role * (max turns + 1) + age). Half
            # the heads start on the current turn (+2), a quarter on the agent's last turn, the
            # rest look everywhere. Without this prior a tiny model with two earlier turns in
            # memory was still at chance on a copy-the-input task after 800 steps (every in-turn
            # position exists once per turn, and nothing told the turns apart before it had
            # learned to read them); with it, it learned the task in about 300.
            bias = torch.zeros(n_heads, cross_slots)
            n_current, n_agent = max(1, n_heads // 2), max(1, n_heads // 4) if n_heads > 1 else 0
            bias[:n_current, 0] = 2.0  # user, age 0: the current turn
            bias[n_current : n_current + n_agent, ROLE_AGENT * cross_slots // 2 + 1] = 2.0  # agent, age 1
            self.turn_bias = nn.Parameter(bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def heads(self, x):  # (B, T, D) -> (B, H, T, Dh)
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def self_qkv(self, x, cos, sin):
        """(B, T, D) -> q, k, v (B, H, T, Dh), q and k rotated together."""
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        q, k = apply_rope(qkv[:2], cos, sin).unbind(0)
        return q, k, qkv[2]

    def cross_kv(self, memory: Memory, rope_base: float):
        """Keys and values of the memory (B, H, M, Dh), keys rotated by their in-turn position."""
        k, v = self.kv(memory.vectors).chunk(2, dim=-1)
        cos, sin = rope_cos_sin(memory.positions, self.head_dim, rope_base)
        return apply_rope(self.heads(k), cos, sin), self.heads(v)

    def cross_q(self, x, cos, sin):
        return apply_rope(self.heads(self.q(x)), cos, sin)

    def cross_bias(self, memory: Memory, dtype) -> torch.Tensor:
        """Additive cross-attention scores (B, H, 1, M): the heads' turn-slot scores, -inf on padding."""
        bias = self.turn_bias[:, memory.slots].permute(1, 0, 2)[:, :, None, :]
        return bias.masked_fill(~memory.valid[:, None, None, :], float("-inf")).to(dtype)

    def merge(self, y):  # (B, H, T, Dh) -> (B, T, D)
        b, h, t, d = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, h * d))

    def attend(self, q, k, v, mask=None, is_causal=False):
        return attend(q, k, v, mask, is_causal, self.dropout if self.training else 0.0, self.flash)


class ConvModule(nn.Module):
    """Conformer convolution, causal: pointwise + GLU, depthwise conv over past steps only,
    LayerNorm (not BatchNorm: streaming and batch statistics do not mix), SiLU, pointwise."""

    def __init__(self, dim: int, kernel: int, dropout: float):
        super().__init__()
        self.kernel = kernel
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)
        self.p_drop = dropout

    def forward(self, x: torch.Tensor, history: torch.Tensor | None = None):
        """x (B, T, D); history (B, D, kernel - 1): the previous inputs of the depthwise conv
        (zeros at the start of a turn). Returns (y (B, T, D), new history)."""
        h = F.glu(self.pointwise_in(x), dim=-1).transpose(1, 2)  # (B, D, T)
        if history is None:
            history = h.new_zeros(h.shape[0], h.shape[1], self.kernel - 1)
        h = torch.cat([history, h], dim=-1)
        new_history = h[..., h.shape[-1] - (self.kernel - 1):]
        y = self.depthwise(h).transpose(1, 2)  # (B, T, D)
        return dropout(self.pointwise_out(F.silu(self.norm(y))), self.p_drop, self.training), new_history


@dataclass
class EncoderLayerState:
    """Streaming state of one Conformer block: the attention keys/values of the last
    left_chunks * chunk steps (B, H, <=L, Dh) and the conv history (B, D, kernel - 1)."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    conv: torch.Tensor | None = None


class ConformerBlock(nn.Module):
    def __init__(self, cfg: S2SConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.ffn1_norm, self.ffn1 = nn.LayerNorm(d), FeedForward(d, cfg.encoder_ffn_dim, cfg.dropout)
        self.attn_norm, self.attn = nn.LayerNorm(d), Attention(d, cfg.n_heads, cfg.dropout, cfg.flash)
        self.conv_norm, self.conv = nn.LayerNorm(d), ConvModule(d, cfg.conv_kernel_size, cfg.dropout)
        self.ffn2_norm, self.ffn2 = nn.LayerNorm(d), FeedForward(d, cfg.encoder_ffn_dim, cfg.dropout)
        self.out_norm = nn.LayerNorm(d)
        self.p_drop = cfg.dropout

    def forward(self, x, cos, sin, mask, state: EncoderLayerState | None = None, keep_steps: int = 0):
        """x (B, T, D). Offline: mask (B, 1, T, T). Streaming: `state` holds earlier steps'
        keys/values and conv history, mask is None (a chunk sees itself and the whole cache), and
        `keep_steps` of keys/values are kept for the next chunk."""
        x = x + 0.5 * self.ffn1(self.ffn1_norm(x))
        q, k, v = self.attn.self_qkv(self.attn_norm(x), cos, sin)
        if state is not None and state.k is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        x = x + dropout(self.attn.merge(self.attn.attend(q, k, v, mask)), self.p_drop, self.training)
        y, conv_history = self.conv(self.conv_norm(x), None if state is None else state.conv)
        x = x + y
        x = x + 0.5 * self.ffn2(self.ffn2_norm(x))
        if state is not None:
            start = max(0, k.shape[2] - keep_steps)  # fewer than keep_steps cached: keep them all
            state.k, state.v = k[:, :, start:], v[:, :, start:]
            state.conv = conv_history
        return self.out_norm(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: S2SConfig, dim: int, n_heads: int, ffn_dim: int, cross: bool = True):
        super().__init__()
        self.self_norm, self.self_attn = nn.LayerNorm(dim), Attention(dim, n_heads, cfg.dropout, cfg.flash)
        if cross:
            self.cross_norm = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, n_heads, cfg.dropout, cfg.flash, cross_slots=cfg.n_turn_slots)
        self.ffn_norm, self.ffn = nn.LayerNorm(dim), FeedForward(dim, ffn_dim, cfg.dropout)
        self.p_drop = cfg.dropout

    def forward(self, x, cos, sin, cross_kv=None, cross_bias=None, cache=None, input_pos=None, self_mask=None,
                kv_len: int | None = None, cross_rope=None):
        """x (B, T, D). Teacher forcing: cache None, causal self-attention over x, or `self_mask`
        (B, 1, T, T) when some positions are padding. Generation: `cache` = (k, v) buffers
        (B, H, capacity, Dh) written in place at `input_pos` (T,); then `kv_len` slices the filled
        part (eager CPU, cheaper) and `self_mask` (B or 1, 1, T, kv_len or capacity) says which of
        those positions exist (static shapes, for torch.compile / CUDA graphs, or padding).
        Cross-attention: cross_kv (k, v) (B, H, M, Dh) and cross_bias (B, H, 1, M) (Attention.cross_bias);
        its queries are rotated by `cross_rope` (cos, sin), the reply step (default: cos, sin)."""
        q, k, v = self.self_attn.self_qkv(self.self_norm(x), cos, sin)
        if cache is None:
            y = self.self_attn.attend(q, k, v, self_mask, is_causal=self_mask is None)
        else:
            cache[0].index_copy_(2, input_pos, k)
            cache[1].index_copy_(2, input_pos, v)
            if kv_len is None:
                y = self.self_attn.attend(q, cache[0], cache[1], self_mask)
            else:
                y = self.self_attn.attend(q, cache[0][:, :, :kv_len], cache[1][:, :, :kv_len], self_mask)
        x = x + dropout(self.self_attn.merge(y), self.p_drop, self.training)
        if cross_kv is not None:
            q = self.cross_attn.cross_q(self.cross_norm(x), *(cross_rope or (cos, sin)))
            y = self.cross_attn.attend(q, cross_kv[0], cross_kv[1], cross_bias)
            x = x + dropout(self.cross_attn.merge(y), self.p_drop, self.training)
        return x + self.ffn(self.ffn_norm(x))


class DepthHead(nn.Module):
    """Per decoder step, a small causal transformer over the K codebooks: position k gets its own
    projection of the decoder state plus the codes of codebook k - 1 in the step's fps frames and
    predicts codebook k for those frames, (N, K, fps, V) logits.

    One projection per codebook (Moshi's "multi-linear" depformer input): with a single shared
    d-dim projection, all K codebooks' information from the decoder squeezes through d numbers,
    and a tiny model took ~5x longer than parallel heads to learn a copy task.

    Output: a shared linear layer splits position k's output into one vector per frame, then
    codebook k's table (V, d) scores each frame. At batch 1 a step's cost is reading its weights
    from memory; per codebook this reads V * d + fps * d * d numbers instead of fps * V * d for
    a plain (fps * V, d) output layer (2.5x fewer at d = 128)."""

    def __init__(self, cfg: S2SConfig):
        super().__init__()
        k, v, fps, d = cfg.n_codebooks, cfg.codebook_size, cfg.frames_per_step, cfg.depth_dim
        self.n_codebooks, self.codebook_size, self.fps, self.dim = k, v, fps, d
        self.n_heads = cfg.n_depth_heads
        self.state_proj = nn.Linear(cfg.hidden_dim, k * d)  # codebook k reads rows k*d..(k+1)*d
        self.prev_codes = nn.Embedding(max(1, (k - 1) * v), d)  # codebooks 0..K-2 as inputs
        self.prev_merge = nn.Linear(fps * d, d)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, d, cfg.n_depth_heads, 4 * d, cross=False) for _ in range(cfg.depth_layers)
        )
        self.frame_proj = nn.Linear(d, fps * d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Parameter(torch.randn(k, v, d) * d**-0.5)  # per-codebook output tables
        self.register_buffer("offsets", torch.arange(max(1, k - 1)) * v, persistent=False)
        # generation: depth position k as an index and its causal mask row, made once
        self.register_buffer("positions", torch.arange(k), persistent=False)
        self.register_buffer("causal", torch.ones(k, k, dtype=torch.bool).tril(), persistent=False)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder states (N, D) -> each depth position's view of them (N, K, d), one matmul."""
        return self.state_proj(h).view(h.shape[0], self.n_codebooks, self.dim)

    def embed_previous(self, codes: torch.Tensor, first: int) -> torch.Tensor:
        """Codes (N, n, fps) of codebooks first..first+n-1 as inputs of the next positions (N, n, d)."""
        n, count = codes.shape[:2]
        idx = codes + self.offsets[first : first + count, None]
        return self.prev_merge(self.prev_codes(idx).view(n, count, self.fps * self.dim))

    def logits(self, y: torch.Tensor, first: int) -> torch.Tensor:
        """y (N, T, d) outputs of positions first.. -> (N, T, fps, V)."""
        n, t, _ = y.shape
        frames = self.norm(self.frame_proj(y).view(n, t, self.fps, self.dim))  # (N, T, fps, d)
        if t == 1:  # generation: a plain matrix product
            return F.linear(frames, self.out[first])  # (N, 1, fps, V)
        return torch.einsum("ntfd,tvd->ntfv", frames, self.out[first : first + t])

    def forward(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: h (N, D), codes (N, K, fps) -> logits (N, K, fps, V)."""
        x = self.project(h)
        if self.n_codebooks > 1:  # position 0 has no previous codebook
            x = x + F.pad(self.embed_previous(codes[:, :-1], 0), (0, 0, 1, 0))
        for layer in self.layers:  # positions are in the per-position projections: no RoPE
            x = layer(x, None, None)
        return self.logits(x, 0)


# --------------------------------------------------------------------------------------
# Generation state


@dataclass
class ReplyState:
    """Everything one reply needs between decoder steps: preallocated self-attention K/V buffers
    (B, H, capacity, Dh) per layer, the memory's cross-attention K/V (computed once), the
    speaker + emotion vector, the depth head's K/V buffers, and the next position."""

    self_kv: list
    cross_kv: list
    cross_bias: list  # per layer (B, H, 1, M): turn-slot scores, -inf on padding
    condition: torch.Tensor  # (B, 1, D)
    depth_kv: list
    capacity: int
    static_shapes: bool = False  # attend over the whole buffers with a mask (compile / CUDA graphs)
    # (B, capacity) False at padding positions of the self-attention buffers: only when a batch's
    # replies wrote different numbers of words (their text prefixes are left-padded, as in training)
    key_valid: torch.Tensor | None = None


class EncoderStream:
    """Incremental encoding of one user turn while it is being spoken (Moshi-style streaming state
    in one object). `push(codes)` takes codec frames as they arrive and encodes every complete
    chunk; `finish()` encodes the rest when the turn ends. The resulting memory equals
    `model.encode(all_codes)`; the decoder's cross-attention K/V are projected chunk by chunk too,
    so that little work is left at the end of the turn. One stream per turn: make a new one."""

    def __init__(self, model: TeluguS2STransformer, batch_size: int):
        cfg = model.config
        self.model, self.batch_size = model, batch_size
        self.chunk_frames = cfg.encoder_chunk_steps * cfg.frames_per_step
        self.keep_steps = cfg.encoder_left_chunks * cfg.encoder_chunk_steps
        self.layers = [EncoderLayerState() for _ in model.encoder]
        self.pending: torch.Tensor | None = None  # (B, K, f) frames not encoded yet
        self.outputs: list[torch.Tensor] = []  # (B, T, D) per encoded chunk
        self.cross_k: list[list] = [[] for _ in model.decoder]
        self.cross_v: list[list] = [[] for _ in model.decoder]
        self.n_steps = 0
        self.n_frames = 0
        self.finished = False

    @torch.inference_mode()
    def push(self, codes: torch.Tensor) -> int:
        """Add codec frames (B, K, f), f >= 0; returns the number of steps encoded so far."""
        if self.finished:
            raise RuntimeError("this EncoderStream has finished; start a new one per turn")
        self.model.check_codes(codes, "streamed codes", allow_empty=True)
        if codes.shape[0] != self.batch_size:
            raise ValueError(f"stream made for batch {self.batch_size}, got codes of batch {codes.shape[0]}")
        codes = codes.to(self.model.device)
        self.n_frames += codes.shape[-1]
        self.pending = codes if self.pending is None else torch.cat([self.pending, codes], dim=-1)
        with eval_mode(self.model):
            while self.pending.shape[-1] >= self.chunk_frames:
                self._encode(self.pending[..., : self.chunk_frames])
                self.pending = self.pending[..., self.chunk_frames :]
        return self.n_steps

    @torch.inference_mode()
    def finish(self) -> Memory:
        """Encode what is left (a partial chunk; a partial step repeats its last frame) and
        return the turn's memory (B, S, D)."""
        if not self.finished:
            if self.n_frames == 0:
                raise ValueError("empty turn: no codec frames were pushed into the EncoderStream")
            if self.pending is not None and self.pending.shape[-1]:
                with eval_mode(self.model):
                    self._encode(pad_to_steps(self.pending, self.model.config.frames_per_step))
            self.pending = None
            self.finished = True
        return self.memory

    @property
    def memory(self) -> Memory:
        x = torch.cat(self.outputs, dim=1)
        return self.model.turn_memory(x, torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1),
                                      torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))

    def cross_kv(self) -> list:
        return [(torch.cat(k, 2), torch.cat(v, 2)) for k, v in zip(self.cross_k, self.cross_v)]

    def _encode(self, codes: torch.Tensor) -> None:
        m, cfg = self.model, self.model.config
        x = m.embed_input(codes)  # (B, T, D)
        t = x.shape[1]
        positions = torch.arange(self.n_steps, self.n_steps + t, device=x.device)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_base)
        for block, state in zip(m.encoder, self.layers):
            x = block(x, cos, sin, None, state=state, keep_steps=self.keep_steps)
        self.outputs.append(x)
        chunk = m.turn_memory(x, positions.expand(x.shape[0], -1), torch.ones(x.shape[:2], dtype=torch.bool,
                                                                                device=x.device))
        for i, layer in enumerate(m.decoder):
            k, v = layer.cross_attn.cross_kv(chunk, cfg.rope_base)
            self.cross_k[i].append(k)
            self.cross_v[i].append(v)
        self.n_steps += t


# --------------------------------------------------------------------------------------
# The model


class TeluguS2STransformer(nn.Module):
    def __init__(self, config: S2SConfig | None = None):
        super().__init__()
        cfg = self.config = config or S2SConfig()
        d = cfg.hidden_dim
        self.embed = FrameEmbedding(cfg)
        self.codec_embed = CodecFrameEmbedding(cfg) if cfg.encoder_input == "codec" else None
        self.encoder = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_encoder_layers))
        self.role = nn.Embedding(2, d)
        self.age = nn.Embedding(cfg.max_context_turns + 1, d)  # 0 = the current turn
        self.speaker = SpeakerEmbedding(cfg.num_speakers, d)
        self.emotion = EmotionEmbedding(cfg.num_emotions, d)
        self.turn_summary = nn.Linear(d, d)
        self.bos = nn.Parameter(torch.randn(d))
        self.decoder = nn.ModuleList(
            DecoderLayer(cfg, d, cfg.n_heads, cfg.ffn_dim) for _ in range(cfg.num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.stop_head = nn.Linear(d, 1)
        # training aid: the user turn's text read off the encoder (CTC); also a transcript (transcribe)
        self.text_head = nn.Linear(d, TEXT_VOCAB_SIZE) if cfg.encoder_ctc_weight > 0 else None
        # inner monologue: the reply's words (input embedding and next-word head), before its speech
        self.reply_embed = self.reply_head = None
        if cfg.reply_text_weight > 0:
            self.reply_embed, self.reply_head = nn.Embedding(cfg.n_reply_tokens, d), nn.Linear(d, cfg.n_reply_tokens)
        self.reply_index = reply_index(cfg.reply_vocab)
        # tells the agent turns' words in the memory from encoded audio (context_words)
        self.context_word_tag = nn.Parameter(torch.randn(d)) if cfg.context_words else None
        n_out = cfg.n_codebooks * cfg.frames_per_step * cfg.codebook_size
        self.depth = DepthHead(cfg) if cfg.depth_dim else None
        self.parallel_head = None if cfg.depth_dim else nn.Linear(d, n_out)
        self.apply(self._init_weights)
        nn.init.normal_(self.embed.codes.weight, std=cfg.n_codebooks**-0.5)  # a sum of K: unit scale
        # A reply ends once in 50 to 500 steps: start the stop head at that prior, so an untrained
        # model speaks instead of stopping at once.
        nn.init.constant_(self.stop_head.bias, -4.0)

    @staticmethod
    def _init_weights(module):
        # Everything at unit scale: code embeddings (a sum of K), the speaker, emotion, role and
        # age vectors, 1/sqrt(fan_in) projections. With GPT-2's 0.02 the conditioning and turn
        # tags were tiny beside the LayerNorm'd content and a tiny model learned a copy task slower.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            nn.init.normal_(module.weight, std=1.0)

    @property
    def device(self) -> torch.device:
        return self.bos.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- input checks

    def check_codes(self, codes, what: str = "codes", allow_empty: bool = False) -> None:
        cfg = self.config
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"{what} must be a LongTensor (B, {cfg.n_codebooks}, F); got {type(codes).__name__}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"{what} must hold integer codec codes, got dtype {codes.dtype}; pass codec.encode(audio)")
        if codes.dim() != 3 or codes.shape[1] != cfg.n_codebooks:
            raise ValueError(
                f"{what} must have shape (B, {cfg.n_codebooks}, F) (batch, codebooks, frames); got "
                f"{tuple(codes.shape)}. Encode with all {cfg.n_codebooks} codebooks (codec.encode(wav))"
            )
        if codes.shape[0] == 0 or (codes.shape[-1] == 0 and not allow_empty):
            raise ValueError(f"{what} is empty (shape {tuple(codes.shape)}): at least one frame is needed")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cfg.codebook_size):
            raise ValueError(
                f"{what} hold ids in [{int(codes.min())}, {int(codes.max())}], outside 0..{cfg.codebook_size - 1}: "
                "they come from another codec or are corrupt"
            )

    def _check_conditions(self, batch_size: int, speaker_id, emotion_id) -> None:
        for name, x in (("speaker_id", speaker_id), ("emotion_id", emotion_id)):
            if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] != batch_size:
                raise ValueError(f"{name} has batch {x.shape[0]} but codes have batch {batch_size}")

    # ----- encoder and memory

    def load_codec_vectors(self, codec) -> None:
        """Copy the codec's decoded vector for every code (encoder_input "codec"): a TeluCodec."""
        if self.codec_embed is None:
            raise ValueError("this model reads learned code embeddings (encoder_input 'embedding'); "
                             "it takes no codec vectors")
        self.codec_embed.load(codec.quantizer.inference_tables()["decoded"].to(self.device))

    def embed_input(self, codes: torch.Tensor) -> torch.Tensor:
        """What the encoder reads: codes (B, K, S * fps) -> (B, S, D)."""
        return self.embed(codes) if self.codec_embed is None else self.codec_embed(codes)

    def encode(self, codes: torch.Tensor, lengths: torch.Tensor | None = None, role: int | torch.Tensor = ROLE_USER,
               age: int | torch.Tensor = 0) -> Memory:
        """Full (offline) encoding of turns under the chunked mask. codes (B, K, F), lengths (B,)
        frames (default all F); role and age (scalars or (B,)) tag the memory (default: the
        current user turn). Returns the memory (B, S, D), S = ceil(F / fps)."""
        cfg = self.config
        codes = pad_to_steps(fill_after_end(codes, lengths), cfg.frames_per_step)
        x = self.embed_input(codes)  # (B, S, D)
        b, s, _ = x.shape
        steps = torch.arange(s, device=x.device)
        valid = (steps[None] < steps_for(lengths, cfg.frames_per_step)[:, None]) if lengths is not None \
            else torch.ones(b, s, dtype=torch.bool, device=x.device)
        mask = hide_padding(chunk_attention_mask(s, cfg.encoder_chunk_steps, cfg.encoder_left_chunks, x.device),
                            valid)  # (B, 1, S, S)
        cos, sin = rope_cos_sin(steps, cfg.head_dim, cfg.rope_base)
        for block in self.encoder:
            x = block(x, cos, sin, mask)
        return self.turn_memory(x, steps.expand(b, -1), valid, role, age)

    def turn_memory(self, x, positions, valid, role: int | torch.Tensor = ROLE_USER,
                    age: int | torch.Tensor = 0) -> Memory:
        """Encoder output (B, S, D) tagged with its role and age (the current turn: user, 0)."""
        dev = x.device
        role = torch.as_tensor(role, device=dev)
        age = torch.as_tensor(age, device=dev)
        tag = self.role(role) + self.age(age)  # (D,) or (B, D)
        slot = role * (self.config.max_context_turns + 1) + age  # () or (B,)
        if tag.dim() == 2:
            tag, slot = tag[:, None], slot[:, None]
        return Memory(x + tag, positions, slot.expand(positions.shape).clone(), valid)

    def encoder_stream(self, batch_size: int = 1) -> EncoderStream:
        """A new incremental encoder for one turn (see EncoderStream)."""
        return EncoderStream(self, batch_size)

    def encode_context(self, context: ContextTurns) -> Memory:
        """Earlier turns -> memory (B, M, D): each turn encoded on its own (as when it was
        spoken), tagged with role and age, and the turns of a conversation concatenated oldest
        first; `valid` marks padding where conversations have fewer or shorter turns. With
        context_words, an agent turn's words (context.texts) follow its encoded audio in the
        memory: their reply_embed vectors plus a word tag, at positions 0, 1, ... in the turn."""
        cfg = self.config
        if int(context.ages.max()) > cfg.max_context_turns or int(context.ages.min()) < 1:
            raise ValueError(f"context ages must be 1..{cfg.max_context_turns}; keep at most "
                             f"{cfg.max_context_turns} earlier turns (ContextManager does)")
        self.check_codes(context.codes, "context codes")
        parts = [self.encode(context.codes, context.lengths, context.roles, context.ages)]  # (N, S, D)
        if cfg.context_words and context.texts is not None:
            words, n_words = pad_ids([self.reply_ids(t) if t else [] for t in context.texts], self.device)
            positions = torch.arange(words.shape[1], device=self.device)
            parts.append(self.turn_memory(self.reply_embed(words) + self.context_word_tag, positions.expand(len(words), -1),
                                          positions[None] < n_words[:, None], context.roles, context.ages))
        counts = [p.valid.sum(1).tolist() for p in parts]  # per part, the valid vectors of each turn (N,)
        b = context.batch_size
        per_item = [0] * b
        for j, i in enumerate(context.batch_index.tolist()):
            per_item[i] += sum(c[j] for c in counts)
        m = max(1, max(per_item))
        d = parts[0].vectors.shape[-1]
        vectors = parts[0].vectors.new_zeros(b, m, d)
        positions = torch.zeros(b, m, dtype=torch.long, device=self.device)
        slots = torch.zeros(b, m, dtype=torch.long, device=self.device)
        valid = torch.zeros(b, m, dtype=torch.bool, device=self.device)
        fill = [0] * b
        for j, i in enumerate(context.batch_index.tolist()):
            for part, count in zip(parts, counts):  # the turn's audio, then its words
                n, at = count[j], fill[i]
                vectors[i, at : at + n] = part.vectors[j, :n].to(vectors.dtype)
                positions[i, at : at + n] = part.positions[j, :n]
                slots[i, at : at + n] = part.slots[j, :n]
                valid[i, at : at + n] = True
                fill[i] += n
        return Memory(vectors, positions, slots, valid)

    def condition(self, speaker_id, emotion_id, turn: Memory) -> torch.Tensor:
        """What every decoder step is given (B, 1, D): speaker + emotion + a summary of the user's
        turn (the mean of its memory, projected). The summary lets the first decoder layer's
        queries already depend on what was asked (which answer to give, which turn to read)
        instead of learning that only in later layers."""
        valid = turn.valid[..., None].to(turn.vectors.dtype)
        summary = (turn.vectors * valid).sum(1) / valid.sum(1).clamp_min(1)  # (B, D)
        cond = self.speaker(speaker_id.to(self.device)) + self.emotion(emotion_id.to(self.device))
        return (cond + self.turn_summary(summary))[:, None]

    # ----- teacher forcing

    def forward(
        self,
        codes: torch.Tensor,
        target_codes: torch.Tensor,
        speaker_id: torch.Tensor,
        emotion_id: torch.Tensor,
        context: ContextTurns | Memory | None = None,
        input_lengths: torch.Tensor | None = None,
        target_lengths: torch.Tensor | None = None,
        input_text: torch.Tensor | None = None,
        input_text_lengths: torch.Tensor | None = None,
        target_text: torch.Tensor | None = None,
        target_text_lengths: torch.Tensor | None = None,
    ) -> S2SOutput:
        """codes (B, K, F_in) user turn; target_codes (B, K, F_out) the reply; speaker_id and
        emotion_id (B,) ids or (B, N) weights; lengths (B,) in frames for padded batches.
        Returns logits (B, K, F_out, V), stop logits and losses (mean cross-entropy per codebook
        over real frames, plus a binary end-of-reply loss at every real step and one past the end).
        With encoder_ctc_weight > 0, input_text (B, L) text_to_ids of the user turn, padded, and
        input_text_lengths (B,) (0 = no transcript for that pair) add the CTC loss. With
        reply_text_weight > 0, target_text (B, L) reply_ids of the reply, padded, and
        target_text_lengths (B,) (0 = no transcript) are the words the decoder writes before speaking."""
        cfg = self.config
        self.check_codes(codes, "codes")
        self.check_codes(target_codes, "target_codes")
        b = codes.shape[0]
        if target_codes.shape[0] != b:
            raise ValueError(f"codes have batch {b}, target_codes batch {target_codes.shape[0]}")
        self._check_conditions(b, speaker_id, emotion_id)
        turn = self.encode(codes, input_lengths)
        memory = turn
        if context is not None:
            if isinstance(context, ContextTurns):
                if context.batch_size != b:
                    raise ValueError(f"context is for {context.batch_size} conversations, codes for {b}")
                context = self.encode_context(context.to(self.device))
            memory = Memory.cat([context, turn])

        fps, k_books, v_size = cfg.frames_per_step, cfg.n_codebooks, cfg.codebook_size
        n_frames = target_codes.shape[-1]
        target = pad_to_steps(fill_after_end(target_codes, target_lengths), fps)  # (B, K, S * fps)
        s = target.shape[-1] // fps
        speech = self.embed(target)  # (B, S, D): step i's codes, the input that predicts step i + 1
        if self.training and cfg.decoder_input_dropout > 0:
            # Word dropout (Bowman et al. 2016): with some of its own past hidden, the decoder has to
            # read what comes next from the memory, i.e. from the question, instead of only continuing.
            drop = torch.rand(b, s + 1, device=speech.device) < cfg.decoder_input_dropout
            speech = speech.masked_fill(drop[:, 1:, None], 0.0)
        key_valid = text_target = None
        if self.reply_head is not None and target_text is not None and target_text_lengths is not None:
            n = target_text_lengths.to(self.device)
            if int(n.max()) > cfg.max_reply_words or target_text.shape[1] < int(n.max()) or (
                    target_text.numel() and not 0 <= int(target_text.min()) <= int(target_text.max()) < cfg.n_reply_tokens):
                raise ValueError(f"target_text must hold reply_ids (0..{cfg.n_reply_tokens - 1}), at most max_reply_words "
                                 f"= {cfg.max_reply_words} per reply (model.reply_ids(text) makes them)")
        if self.reply_head is not None:  # [padding, BOS, words, EOT] then speech; EOT predicts step 0
            prefix, key_valid, text_target, prefix_cross = self._reply_prefix(b, target_text, target_text_lengths)
        else:  # BOS predicts step 0
            prefix = self.bos.expand(b, 1, -1)
        p = prefix.shape[1]
        x = torch.cat([prefix.to(speech.dtype), speech], dim=1)  # (B, P + S, D)
        x = x + self.condition(speaker_id, emotion_id, turn)
        steps = torch.arange(p + s, device=x.device)
        cos, sin = rope_cos_sin(steps, cfg.head_dim, cfg.rope_base)
        # cross-attention queries are rotated by the reply's speech step (the words by how many were
        # written), so time-aligned reading of the memory does not depend on how many words came first
        cross_rope = None
        if p > 1:
            cross = torch.cat([prefix_cross, torch.arange(1, s + 1, device=x.device).expand(b, -1)], dim=1)  # (B, P + S)
            cross_rope = rope_cos_sin(cross, cfg.head_dim, cfg.rope_base)
        self_mask = None
        if key_valid is not None and not bool(key_valid.all()):
            valid = torch.cat([key_valid, key_valid.new_ones(b, s)], dim=1)  # (B, P + S)
            self_mask = hide_padding(causal_mask(p + s, x.device), valid)
        for layer in self.decoder:
            kv = layer.cross_attn.cross_kv(memory, cfg.rope_base)
            x = layer(x, cos, sin, cross_kv=kv, cross_bias=layer.cross_attn.cross_bias(memory, x.dtype),
                      self_mask=self_mask, cross_rope=cross_rope)
        h_all = self.decoder_norm(x)  # (B, P + S, D)
        h = h_all[:, p - 1 :]  # (B, S + 1, D): the states that predict speech steps 0..S-1 and the end
        stop_logits = self.stop_head(h).squeeze(-1)  # (B, S + 1)

        step_codes = target.view(b, k_books, s, fps).permute(0, 2, 1, 3)  # (B, S, K, fps)
        logits = self._step_logits(h[:, :s].reshape(b * s, -1), step_codes.reshape(b * s, k_books, fps))
        logits = logits.view(b, s, k_books, fps, v_size).permute(0, 2, 1, 3, 4).reshape(b, k_books, s * fps, v_size)
        logits = logits[:, :, :n_frames]  # (B, K, F_out, V)

        # losses over real frames / steps only
        out_len = target_lengths.to(x.device) if target_lengths is not None else torch.full((b,), n_frames, device=x.device)
        frame_ok = torch.arange(n_frames, device=x.device)[None] < out_len[:, None]  # (B, F_out)
        out_steps = steps_for(out_len, fps)
        pos = torch.arange(s + 1, device=x.device)[None]
        step_ok = pos <= out_steps[:, None]  # (B, S + 1): real steps and the one past the end
        stop_target = (pos == out_steps[:, None]).float()
        ce = F.cross_entropy(logits.float().reshape(-1, v_size), target_codes.reshape(-1), reduction="none")
        ce = ce.view(b, k_books, n_frames) * frame_ok[:, None]
        n_ok = frame_ok.sum().clamp_min(1)
        codebook_losses = ce.sum(dim=(0, 2)) / n_ok  # (K,)
        stop_loss = (F.binary_cross_entropy_with_logits(stop_logits.float(), stop_target, reduction="none")
                     * step_ok).sum() / step_ok.sum()
        loss = codebook_losses.mean() + cfg.stop_loss_weight * stop_loss
        text_loss = text_logits = text_valid = None
        if self.text_head is not None and input_text is not None:
            text_logits = self.text_head(turn.vectors).float()  # (B, S_in, TEXT_VOCAB_SIZE)
            text_valid = turn.valid
            text_loss = self.text_ctc_loss(text_logits, turn.valid, input_text, input_text_lengths)
            loss = loss + cfg.encoder_ctc_weight * text_loss
        reply_loss = reply_logits = None
        if text_target is not None:
            reply_logits = self.reply_head(h_all[:, : p - 1]).float()  # (B, P - 1, n_reply_tokens)
            n_words = (text_target >= 0).sum()
            reply_loss = (F.cross_entropy(reply_logits.reshape(-1, cfg.n_reply_tokens), text_target.reshape(-1),
                                          ignore_index=-100, reduction="sum") / n_words.clamp_min(1))
            loss = loss + cfg.reply_text_weight * reply_loss
        with torch.no_grad():
            correct = (logits.argmax(-1) == target_codes) & frame_ok[:, None]
            accuracy = correct.sum(dim=(0, 2)).float() / n_ok  # (K,)
            stop_correct = (((stop_logits > 0).float() == stop_target) & step_ok).sum() / step_ok.sum()
        metrics = {"accuracy": accuracy, "stop_accuracy": stop_correct, "frames": n_ok}
        if reply_logits is not None:
            ok = text_target >= 0
            metrics["reply_text_accuracy"] = ((reply_logits.argmax(-1) == text_target) & ok).sum() / ok.sum().clamp_min(1)
            metrics["reply_text_tokens"] = ok.sum()
        return S2SOutput(logits, stop_logits, loss, codebook_losses, stop_loss, metrics, text_loss, text_logits,
                         text_valid, reply_loss, reply_logits, text_target)

    def reply_ids(self, text: str) -> list[int]:
        """A reply's text -> its word tokens (reply_ids)."""
        return reply_ids(text, self.reply_index, self.config.max_reply_words)

    def reply_text(self, ids) -> str:
        """Word tokens -> text ('?' for REPLY_UNK); stops at REPLY_EOT."""
        words = []
        for i in ids:
            if i == REPLY_EOT:
                break
            words.append(self.config.reply_vocab[i - REPLY_FIRST] if i >= REPLY_FIRST else "?")
        return " ".join(words)

    def _reply_prefix(self, b: int, text: torch.Tensor | None, lengths: torch.Tensor | None):
        """The decoder's text prefix for a batch: per pair [padding, BOS, its words, EOT], left-padded
        to the longest, so that speech starts right after EOT at the same position P - 1 in every row
        and relative positions (RoPE) are those of an unpadded reply. text (B, L) reply_ids, padded;
        lengths (B,) (0: no transcript). Returns the inputs (B, P, D), key_valid (B, P) (False at
        padding), the next-token targets (B, P - 1): the words, then EOT, -100 at padding and for
        pairs without text (they still see BOS, EOT), and the cross-attention positions (B, P): the
        words written so far (so the k-th word can be read off the k-th word of a memory turn, as in
        "repeat that"), 0 at EOT, which predicts speech step 0."""
        dev = self.device
        if text is None or lengths is None:
            text, lengths = torch.zeros(b, 0, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.long, device=dev)
        text, lengths = text.to(dev), lengths.to(dev)
        n = int(lengths.max()) if b else 0
        idx = torch.arange(n + 2, device=dev)
        start = (n - lengths)[:, None]  # (B, 1): where BOS goes
        word = idx[None] - start - 1  # (B, P): index into the row's words
        is_word = (word >= 0) & (word < lengths[:, None])
        tokens = torch.full((b, n + 2), REPLY_EOT, dtype=torch.long, device=dev)
        if text.shape[1]:
            tokens = torch.where(is_word, text.gather(1, word.clamp(0, text.shape[1] - 1)), tokens)
        key_valid = idx[None] >= start
        x = torch.where((idx[None] == start)[..., None], self.bos, self.reply_embed(tokens)) * key_valid[..., None]
        target = tokens[:, 1:].masked_fill(~key_valid[:, :-1] | (lengths == 0)[:, None], -100)
        cross = (word + 1).clamp_min(0)
        cross[:, -1] = 0
        return x, key_valid, target, cross

    def text_ctc_loss(self, text_logits: torch.Tensor, valid: torch.Tensor, text: torch.Tensor,
                      text_lengths: torch.Tensor | None) -> torch.Tensor:
        """CTC of the user turn's text (B, L) on the text head's logits (B, S, V) over the turn's
        valid steps (B, S), in nats per character: the mean over the pairs that have a transcript
        that fits (0 when none has)."""
        if text_lengths is None:
            text_lengths = torch.full((text.shape[0],), text.shape[1], dtype=torch.long)
        text, text_lengths = text.to(self.device), text_lengths.to(self.device)
        # CTC needs a step per character plus one between repeated characters; a turn too short
        # for its text (or one with no text) adds nothing rather than an infinite or zeroed loss
        pos = torch.arange(text.shape[1] - 1, device=self.device)
        repeats = ((text[:, 1:] == text[:, :-1]) & (pos[None] < text_lengths[:, None] - 1)).sum(1)
        has = (text_lengths > 0) & (valid.sum(1) >= text_lengths + repeats)
        if not bool(has.any()):
            return text_logits.new_zeros(())
        log_probs = F.log_softmax(text_logits[has], dim=-1)  # (B', S, V)
        per_pair = F.ctc_loss(log_probs.transpose(0, 1), text[has], valid[has].sum(1),
                              text_lengths[has], blank=TEXT_BLANK, reduction="none", zero_infinity=True)
        return (per_pair / text_lengths[has]).mean()

    @torch.no_grad()
    def transcribe(self, turn: Memory) -> list[str]:
        """The text head's best-path reading of a user turn's memory (needs encoder_ctc_weight > 0)."""
        if self.text_head is None:
            raise ValueError("this model has no text head (trained with encoder_ctc_weight 0)")
        return [ids_to_text(ids) for ids in ctc_best_path(self.text_head(turn.vectors).float(), turn.valid)]

    def _step_logits(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """h (N, D) decoder states, codes (N, K, fps) the step's codes (teacher forcing for the
        depth head) -> logits (N, K, fps, V)."""
        cfg = self.config
        if self.depth is not None:
            return self.depth(h, codes)
        return self.parallel_head(h).view(h.shape[0], cfg.n_codebooks, cfg.frames_per_step, cfg.codebook_size)

    # ----- generation

    def start_reply(self, memory: Memory, condition: torch.Tensor, capacity: int,
                    memory_kv: list | None = None, dtype: torch.dtype | None = None,
                    static_shapes: bool | None = None) -> ReplyState:
        """Allocate the reply's buffers once and compute the cross-attention K/V. `memory_kv`
        (per layer (k, v)) skips the projection when it was done incrementally (EncoderStream).
        static_shapes (default: on CUDA) makes every step attend over the whole buffers with a
        mask, for torch.compile / CUDA graphs; on CPU slicing the filled part is cheaper."""
        cfg = self.config
        b = memory.vectors.shape[0]
        dtype = dtype or self.bos.dtype
        kv = memory_kv or [layer.cross_attn.cross_kv(memory, cfg.rope_base) for layer in self.decoder]
        shape = (b, cfg.n_heads, capacity, cfg.head_dim)
        self_kv = [(torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device))
                   for _ in self.decoder]
        depth_kv = []
        if self.depth is not None:
            dshape = (b, cfg.n_depth_heads, cfg.n_codebooks, cfg.depth_dim // cfg.n_depth_heads)
            depth_kv = [(torch.zeros(dshape, dtype=dtype, device=self.device), torch.zeros(dshape, dtype=dtype, device=self.device))
                        for _ in self.depth.layers]
        cross_bias = [layer.cross_attn.cross_bias(memory, dtype) for layer in self.decoder]
        if static_shapes is None:
            static_shapes = self.device.type == "cuda"
        return ReplyState(self_kv, kv, cross_bias, condition, depth_kv, capacity, static_shapes)

    def decode_step(self, state: ReplyState, prev_codes: torch.Tensor | None, input_pos: torch.Tensor,
                    reply_token: torch.Tensor | None = None, cross_pos: torch.Tensor | None = None):
        """One decoder step (the hot function: fixed buffers written in place, positions as a
        tensor; with state.static_shapes every shape is fixed for torch.compile / CUDA graphs).
        prev_codes (B, K, fps) the previous step's codes (None at position 0: BOS), or reply_token
        (B,) a word of the reply's text (inner monologue); input_pos (1,) the buffer position;
        cross_pos (1,) the speech step that rotates the cross-attention queries (default input_pos).
        Returns the decoder state h (B, D) and the end-of-reply logit (B,)."""
        cfg = self.config
        if reply_token is not None:
            x = self.reply_embed(reply_token)[:, None]  # (B, 1, D)
        elif prev_codes is None:
            x = self.bos.expand(state.condition.shape[0], 1, -1)
        else:
            x = self.embed(prev_codes)  # (B, 1, D)
        x = x + state.condition
        cos, sin = rope_cos_sin(input_pos, cfg.head_dim, cfg.rope_base)
        cross_rope = None if cross_pos is None else rope_cos_sin(cross_pos, cfg.head_dim, cfg.rope_base)
        self_mask = kv_len = None
        if state.static_shapes:
            self_mask = (torch.arange(state.capacity, device=x.device) <= input_pos)[None, None, None, :]
            if state.key_valid is not None:
                self_mask = self_mask & state.key_valid[:, None, None, :]
        else:
            kv_len = int(input_pos[-1]) + 1
            if state.key_valid is not None:
                self_mask = state.key_valid[:, None, None, :kv_len]
        for layer, cache, kv, bias in zip(self.decoder, state.self_kv, state.cross_kv, state.cross_bias):
            x = layer(x, cos, sin, cross_kv=kv, cross_bias=bias, cache=cache, input_pos=input_pos,
                      self_mask=self_mask, kv_len=kv_len, cross_rope=cross_rope)
        h = self.decoder_norm(x)[:, 0]
        return h, self.stop_head(h).squeeze(-1)

    @property
    def reply_text_slots(self) -> int:
        """Decoder positions a reply's text can take before its speech: BOS, the words, EOT."""
        return self.config.max_reply_words + 2 if self.reply_head is not None else 0

    def begin_reply(self, state: ReplyState, text_temperature: float = 0.0, words: list[list[int]] | None = None):
        """Run the decoder up to the reply's first speech step: BOS, and with an inner monologue
        the reply's words (sampled at text_temperature, 0 = greedy; or `words`, B lists of word ids
        to say instead) and EOT. Returns (h (B, D), stop logit (B,), offset: the buffer position of
        the state that predicts speech step 0 (the codes of step i go in at offset + 1 + i), the
        word ids of each row (None without text))."""
        if words is not None:
            if self.reply_head is None:
                raise ValueError("this model has no inner monologue (reply_text_weight 0): it takes no words to say")
            if len(words) != state.condition.shape[0] or any(len(w) > self.config.max_reply_words for w in words):
                raise ValueError(f"words: one list per batch row, at most max_reply_words = "
                                 f"{self.config.max_reply_words} each")
            h, stop_logit = self._prefill_reply_text(state, words)
            return h, stop_logit, max(len(w) for w in words) + 1, words
        h, stop_logit = self.decode_step(state, None, torch.tensor([0], device=self.device))
        if self.reply_head is None:
            return h, stop_logit, 0, None
        b = h.shape[0]
        written: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        for i in range(self.config.max_reply_words + 1):
            logits = self.reply_head(h)
            logits[:, REPLY_UNK] = float("-inf")  # it says only words it knows (UNK marks others in training data)
            token = sample_codes(logits, text_temperature, None)  # (B,)
            if i == self.config.max_reply_words:
                token = torch.full_like(token, REPLY_EOT)
            token = token.masked_fill(done, REPLY_EOT)
            for row, t in enumerate(token.tolist()):
                if t != REPLY_EOT:
                    written[row].append(t)
            done |= token == REPLY_EOT
            # cross-attention at the words written so far; EOT (every row's, else the rows are
            # written again below) at 0, as it predicts speech step 0
            cross = 0 if bool(done.all()) else i + 1
            h, stop_logit = self.decode_step(state, None, torch.tensor([i + 1], device=self.device), reply_token=token,
                                             cross_pos=torch.tensor([cross], device=self.device))
            if bool(done.all()):
                break
        lengths = [len(w) for w in written]
        if len(set(lengths)) > 1:
            # rows wrote different numbers of words: write the prefixes again, left-padded as in
            # training, so every row's speech starts at the same position right after its own EOT
            h, stop_logit = self._prefill_reply_text(state, written)
        return h, stop_logit, max(lengths) + 1, written

    def _prefill_reply_text(self, state: ReplyState, words: list[list[int]]):
        """Rewrite buffer positions 0..P-1 with each row's [padding, BOS, words, EOT] in one pass
        and mark the padding in state.key_valid; returns h, stop logit at EOT (position P - 1)."""
        cfg = self.config
        text, lengths = pad_ids(words, self.device)
        x, key_valid, _, cross = self._reply_prefix(len(words), text, lengths)
        x = x.to(state.condition.dtype) + state.condition
        p = x.shape[1]
        pos = torch.arange(p, device=self.device)
        cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_base)
        cross_rope = rope_cos_sin(cross, cfg.head_dim, cfg.rope_base)
        mask = hide_padding(causal_mask(key_valid.shape[1], self.device), key_valid)
        for layer, cache, kv, bias in zip(self.decoder, state.self_kv, state.cross_kv, state.cross_bias):
            x = layer(x, cos, sin, cross_kv=kv, cross_bias=bias, cache=cache, input_pos=pos, self_mask=mask, kv_len=p,
                      cross_rope=cross_rope)
        if not bool(key_valid.all()):
            state.key_valid = torch.ones(len(words), state.capacity, dtype=torch.bool, device=self.device)
            state.key_valid[:, :p] = key_valid
        h = self.decoder_norm(x)[:, -1]
        return h, self.stop_head(h).squeeze(-1)

    def step_logits_incremental(self, state: ReplyState, projected: torch.Tensor, k: int,
                                prev: torch.Tensor | None) -> torch.Tensor:
        """Depth head, one codebook at a time with its K/V buffers: logits (B, fps, V) of codebook k
        from the step's projected decoder state (B, K, d) (DepthHead.project) and the codes of
        codebook k - 1 (B, fps) (None for k = 0)."""
        depth = self.depth
        x = projected[:, k : k + 1]
        if prev is not None:
            x = x + depth.embed_previous(prev[:, None], k - 1)
        pos = depth.positions[k : k + 1]
        mask, kv_len = (depth.causal[k][None, None, None, :], None) if state.static_shapes else (None, k + 1)
        for layer, cache in zip(depth.layers, state.depth_kv):
            x = layer(x, None, None, cache=cache, input_pos=pos, self_mask=mask, kv_len=kv_len)
        return depth.logits(x, k)[:, 0]

    def sample_step(self, state: ReplyState, h: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
        """The step's codes (B, K, fps) from the decoder state h (B, D)."""
        cfg = self.config
        if self.depth is None:
            logits = self.parallel_head(h).view(h.shape[0], cfg.n_codebooks, cfg.frames_per_step, cfg.codebook_size)
            return sample_codes(logits, temperature, top_k)
        projected, codes, prev = self.depth.project(h), [], None
        for k in range(cfg.n_codebooks):
            prev = sample_codes(self.step_logits_incremental(state, projected, k, prev), temperature, top_k)  # (B, fps)
            codes.append(prev)
        return torch.stack(codes, dim=1)

    @torch.inference_mode()
    def prepare_context(self, context: ContextTurns | Memory) -> Memory:
        """Earlier turns ready for generation: encoded, with their cross-attention K/V computed
        and kept on the returned Memory. Costly for long contexts: call it while the user speaks
        (ContextManager.context_memory does) and pass the result as `context`."""
        with eval_mode(self):
            if isinstance(context, ContextTurns):
                context = self.encode_context(context.to(self.device))
            if context.cross_kv is None:
                context.cross_kv = [layer.cross_attn.cross_kv(context, self.config.rope_base) for layer in self.decoder]
        return context

    def _prepare(self, codes, speaker_id, emotion_id, context, capacity) -> ReplyState:
        """Memory (current turn + context) and the reply's buffers."""
        stream = codes if isinstance(codes, EncoderStream) else None
        if stream is not None:
            if stream.model is not self:
                raise ValueError("this EncoderStream belongs to another model")
            turn, turn_kv = stream.finish(), stream.cross_kv()
            b = stream.batch_size
        else:
            self.check_codes(codes, "codes")
            b = codes.shape[0]
            turn, turn_kv = self.encode(codes.to(self.device)), None
        self._check_conditions(b, speaker_id, emotion_id)
        condition = self.condition(speaker_id, emotion_id, turn)
        if context is None:
            return self.start_reply(turn, condition, capacity, turn_kv)
        n_conversations = context.batch_size if isinstance(context, ContextTurns) else context.vectors.shape[0]
        if n_conversations != b:
            raise ValueError(f"context is for {n_conversations} conversations, codes for {b}")
        context = self.prepare_context(context)
        turn_kv = turn_kv or [layer.cross_attn.cross_kv(turn, self.config.rope_base) for layer in self.decoder]
        kv = [(torch.cat([ck, tk], 2), torch.cat([cv, tv], 2)) for (ck, cv), (tk, tv) in zip(context.cross_kv, turn_kv)]
        return self.start_reply(Memory.cat([context, turn]), condition, capacity, kv)

    def _stream(self, codes, speaker_id, emotion_id, max_new_tokens, context, temperature, top_k,
                chunk_steps, stop_threshold, min_new_tokens, text_temperature=0.0, on_text=None, say=None):
        """Yields (codes (B, K, f), ended (B,) bool: which items have ended by now)."""
        cfg = self.config
        max_new_tokens = cfg.max_reply_steps if max_new_tokens is None else int(max_new_tokens)
        if max_new_tokens < 1 or chunk_steps < 1:
            raise ValueError("max_new_tokens and chunk_steps must be >= 1")
        with eval_mode(self):
            yield from self._stream_eval(codes, speaker_id, emotion_id, max_new_tokens, context, temperature, top_k,
                                         chunk_steps, stop_threshold, min_new_tokens, text_temperature, on_text, say)

    def _stream_eval(self, codes, speaker_id, emotion_id, max_new_tokens, context, temperature, top_k,
                     chunk_steps, stop_threshold, min_new_tokens, text_temperature, on_text, say):
        state = self._prepare(codes, speaker_id, emotion_id, context, max_new_tokens + self.reply_text_slots)
        if say is not None and (isinstance(say, str) or not all(isinstance(t, str) for t in say)):
            raise ValueError("say: a list of texts, one per batch row (say=[text] for one reply)")
        forced = None if say is None else [self.reply_ids(t) for t in say]
        h, stop_logit, offset, words = self.begin_reply(state, text_temperature, forced)
        if on_text is not None and words is not None:
            on_text([self.reply_text(w) for w in words])
        b = state.condition.shape[0]
        ended = torch.zeros(b, dtype=torch.bool, device=self.device)
        stop_logit_threshold = math.log(stop_threshold / (1 - stop_threshold))
        pending = []
        for step in range(max_new_tokens):
            if step:
                h, stop_logit = self.decode_step(state, prev, torch.tensor([offset + step], device=self.device),
                                                 cross_pos=torch.tensor([step], device=self.device) if offset else None)
            if step >= min_new_tokens:
                ended |= stop_logit > stop_logit_threshold
            if bool(ended.all()):
                break
            prev = self.sample_step(state, h, temperature, top_k)  # (B, K, fps)
            pending.append(prev)
            if len(pending) == chunk_steps:
                yield torch.cat(pending, dim=-1), ended.clone()
                pending = []
        if pending:
            yield torch.cat(pending, dim=-1), ended.clone()

    @torch.inference_mode()
    def generate_streaming(
        self,
        codes: torch.Tensor | EncoderStream,
        speaker_id: torch.Tensor,
        emotion_id: torch.Tensor,
        max_new_tokens: int | None = None,
        context: ContextTurns | Memory | None = None,
        temperature: float = 0.8,
        top_k: int | None = 50,
        chunk_steps: int = 1,
        stop_threshold: float = 0.5,
        min_new_tokens: int = 1,
        text_temperature: float = 0.0,
        on_text=None,
        say: list[str] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Generate the reply, yielding codes (B, K, chunk_steps * frames_per_step) as soon as
        each chunk exists; stops when the end-of-reply head fires (for every batch item) or after
        `max_new_tokens`.

        max_new_tokens counts decoder steps: one step = frames_per_step codec frames = 20 ms of
        audio = K * frames_per_step codes (default config.max_reply_steps). codes: the user's turn
        (B, K, F), or an EncoderStream that has consumed it (the low-latency path: only the last
        chunk is left to encode). speaker_id / emotion_id: (B,) ids or (B, N) mixing weights.
        context: earlier turns (ContextTurns, or the Memory from encode_context, which caches
        its cross-attention K/V for later replies). temperature 0 is greedy. With an inner monologue
        (reply_text_weight > 0) the reply's words come first (text_temperature, 0 = greedy), and
        on_text, if given, is called with their B texts before the first chunk; `say` (B texts) makes
        the model speak those words instead of its own (what it would say given the right words).
        """
        for chunk, _ in self._stream(codes, speaker_id, emotion_id, max_new_tokens, context, temperature, top_k,
                                     chunk_steps, stop_threshold, min_new_tokens, text_temperature, on_text, say):
            yield chunk

    @torch.inference_mode()
    def generate(self, codes, speaker_id, emotion_id, max_new_tokens=None, context=None, temperature=0.8,
                 top_k=50, stop_threshold=0.5, min_new_tokens=1, text_temperature=0.0, on_text=None,
                 say=None) -> list[torch.Tensor]:
        """The whole reply of each batch item: a list of B LongTensors (K, F_b), each cut where that
        item's end-of-reply head fired (on_text, say: as generate_streaming)."""
        chunks, ends = [], []
        for chunk, ended in self._stream(codes, speaker_id, emotion_id, max_new_tokens, context, temperature, top_k,
                                         1, stop_threshold, min_new_tokens, text_temperature, on_text, say):
            chunks.append(chunk)
            ends.append(ended)
        if not chunks:
            b = codes.batch_size if isinstance(codes, EncoderStream) else codes.shape[0]
            return [torch.zeros(self.config.n_codebooks, 0, dtype=torch.long) for _ in range(b)]
        all_codes = torch.cat(chunks, dim=-1).cpu()
        ended = torch.stack(ends).cpu()  # (steps, B): True once the item has ended before that step
        fps = self.config.frames_per_step
        return [all_codes[i, :, : int((~ended[:, i]).sum()) * fps] for i in range(all_codes.shape[0])]

    # ----- save / load

    def save(self, directory, dtype: torch.dtype | None = None, max_shard_mb: float | None = None) -> None:
        """Shipped form: model.safetensors + config.json (dtype=torch.float16 for weights in git;
        max_shard_mb splits them into shards of at most that size, for git's file limit)."""
        from training import save_pretrained

        save_pretrained(directory, self.state_dict(), config_to_dict(self.config), dtype=dtype, max_shard_mb=max_shard_mb)

    @classmethod
    def from_pretrained(cls, path, map_location="cpu") -> TeluguS2STransformer:
        """From a model folder (model.safetensors + config.json, or s2s_best.pt / last.pt), a
        .safetensors file, or a training checkpoint; the model is rebuilt from the stored config."""
        from training import load_pretrained_state

        state, config = load_pretrained_state(path, CHECKPOINT_NAMES)
        model = cls(config_from_dict(S2SConfig, config))
        model.load_state_dict(state)
        return model.to(map_location).eval()


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="Parameter count, shapes and latency of the S2S model.")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of the random input turn")
    parser.add_argument("--steps", type=int, default=50, help="decoder steps to time (50 = 1 s of reply)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = S2SConfig.preset(args.preset)
    model = TeluguS2STransformer(cfg).eval()
    print(f"preset {args.preset}: {model.num_parameters() / 1e6:.1f} M parameters; hidden {cfg.hidden_dim}, "
          f"{cfg.num_encoder_layers} + {cfg.num_decoder_layers} layers, {cfg.n_heads} heads, "
          f"{'depth head ' + str(cfg.depth_dim) if cfg.depth_dim else 'parallel heads'}")
    n_frames = int(args.seconds * cfg.codec_frame_rate)
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.n_codebooks, n_frames))
    target = torch.randint(0, cfg.codebook_size, (1, cfg.n_codebooks, n_frames))
    ids = torch.tensor([0])
    with torch.no_grad():
        out = model(codes, target, ids, ids)
    print(f"forward: codes {tuple(codes.shape)} + target {tuple(target.shape)} -> logits {tuple(out.logits.shape)}, "
          f"stop logits {tuple(out.stop_logits.shape)}, loss {out.loss.item():.2f} (ln V = {math.log(cfg.codebook_size):.2f})")
    stream = model.encoder_stream(1)
    start = time.perf_counter()
    stream.push(codes)
    encode_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    times = []
    for chunk in model.generate_streaming(stream, ids, ids, max_new_tokens=args.steps, min_new_tokens=args.steps):
        times.append(time.perf_counter() - start)
    gen = times[-1]
    print(f"encoder: {args.seconds:.1f} s turn in {encode_ms:.0f} ms; first chunk {tuple(chunk.shape)} after "
          f"{times[0] * 1000:.1f} ms; {len(times)} steps ({len(times) * cfg.step_ms / 1000:.2f} s of audio) in "
          f"{gen * 1000:.0f} ms = {gen / (len(times) * cfg.step_ms / 1000):.2f} x real time "
          f"({args.threads} threads; benchmark_s2s.py measures properly)")


if __name__ == "__main__":
    main()
