"""TeluCodec: a fully causal, streaming neural speech codec (16 kHz audio <-> 200 Hz discrete codes).

Architecture (DAC / SEANet, made causal for streaming):
    encoder   causal Conv1d stacks: residual units (dilations 1, 3, 9) + strided convs 2, 4, 5, 2
              (hop 80 samples = 5 ms, 200 frames/s) to a 1024-dim latent
    quantizer residual VQ, 8 codebooks x 1024 entries, factorised L2-normalised codes (DAC),
              quantizer dropout so the first k codebooks alone decode (k x 2 kbps)
    decoder   mirror image with causal transposed convs, tanh output

    8 codebooks x log2(1024) bits x 200 frames/s = 16.0 kbps.

Streaming (Moshi style): every layer with memory (causal convs: input history; transposed convs:
the overlap tail) holds one small state object, created by `with codec.streaming(batch_size):`,
cleared by `codec.reset_streaming()`. Inside, `encode(chunk)` / `decode(codes)` take any chunk
that is a multiple of the hop and return exactly what the offline call returns for the whole
signal. The algorithmic latency is one hop (5 ms): a frame is coded once its 80 samples are in.

Usage:
    python telugu_codec.py             # parameters, receptive field, latency, streaming speed

    from telugu_codec import TeluCodec, CodecConfig
    codec = TeluCodec.from_pretrained("checkpoints/demo/codec")    # folded, eval mode
    codes = codec.encode(wav)          # (B, 1, T) float -> (B, 8, ceil(T / 80)) int64
    audio = codec.decode(codes)        # -> (B, 1, F * 80)
    with codec.streaming(batch_size=1):
        for chunk in chunks:           # (1, 1, 320): 20 ms
            out = codec.decode(codec.encode(chunk))
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import audio_metrics
from config import SAMPLE_RATE, config_from_dict, config_to_dict

# --------------------------------------------------------------------------------------
# Config


ACTIVATIONS = ("snake", "elu", "leaky_relu")


@dataclass
class CodecConfig:
    """Defaults are the mission's codec. `CodecConfig.preset("demo")` is the real-time CPU size."""

    sample_rate: int = SAMPLE_RATE
    strides: tuple[int, ...] = (2, 4, 5, 2)  # encoder downsampling; the decoder mirrors it
    encoder_dim: int = 32  # channels after the input conv, doubled at each downsampling
    decoder_dim: int = 512  # channels into the first upsampling, halved at each
    latent_dim: int = 1024
    dilations: tuple[int, ...] = (1, 3, 9)  # one residual unit per dilation in every block
    kernel_size: int = 7
    activation: str = "snake"  # "snake" (DAC: periodic inductive bias), "elu" (SEANet) or "leaky_relu" (cheapest)
    n_codebooks: int = 8
    codebook_size: int = 1024
    codebook_dim: int = 8  # factorised lookup space (DAC): low-dim codes stay in use
    quantizer_dropout: float = 0.5  # fraction of a training batch coded with a random 1..K codebooks
    # Dead-code restart: an EMA of each code's use per batch; codes below dead_code_ratio of
    # uniform use move onto current latents. A short memory (~10 steps) matters early on, when
    # the latents move faster than unused codes can follow (measured: without it the codebooks
    # fell to perplexity ~3 of 1024 within 40 steps; with it they recover to 100+).
    usage_decay: float = 0.9
    dead_code_ratio: float = 0.03

    def __post_init__(self):
        self.strides = tuple(self.strides)
        self.dilations = tuple(self.dilations)
        if self.sample_rate != SAMPLE_RATE:
            raise ValueError(f"sample_rate must be {SAMPLE_RATE} (the repo's only rate), got {self.sample_rate}")
        if not self.strides or any(s < 1 for s in self.strides):
            raise ValueError(f"strides must be positive integers, got {self.strides}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.decoder_dim % 2 ** len(self.strides):
            raise ValueError(f"decoder_dim {self.decoder_dim} must be divisible by 2**{len(self.strides)}")
        if self.codebook_size < 2 or self.n_codebooks < 1:
            raise ValueError("need n_codebooks >= 1 and codebook_size >= 2")
        if not 0.0 <= self.quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must be in [0, 1], got {self.quantizer_dropout}")

    @property
    def hop_length(self) -> int:
        return math.prod(self.strides)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def bits_per_code(self) -> float:
        return math.log2(self.codebook_size)

    @classmethod
    def preset(cls, name: str) -> "CodecConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown codec preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])


# Every preset keeps the token interface the S2S model is built on (hop 80, 8 x 1024 codes).
PRESETS: dict[str, dict] = {
    "default": {},  # the mission's codec, ~11M parameters
    # Real time on one CPU thread: streaming encode + decode of 20 ms in under 2 ms (`python
    # telugu_codec.py` measures it). At 4 frames per call the cost is mostly per-op overhead, so
    # the layer count matters more than the width: 3 blocks (strides 4, 5, 4), one residual
    # unit each, LeakyReLU (ELU and Snake cost 3 to 5x more per call); the decoder gets the width.
    "demo": dict(
        strides=(4, 5, 4), encoder_dim=16, decoder_dim=192, latent_dim=128, dilations=(1,),
        activation="leaky_relu",
    ),
    # For tests: builds and runs in milliseconds.
    "tiny": dict(
        strides=(4, 5, 4), encoder_dim=4, decoder_dim=32, latent_dim=16, dilations=(1,),
        kernel_size=3, activation="leaky_relu", codebook_dim=4,
    ),
}


# --------------------------------------------------------------------------------------
# Causal padding arithmetic


def effective_kernel_size(kernel_size: int, dilation: int = 1) -> int:
    """Span in samples of a dilated kernel: kernel 7, dilation 3 -> 19."""
    return (kernel_size - 1) * dilation + 1


def causal_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """Zeros to put on the LEFT of a causal conv's input.

    With this padding and T a multiple of `stride`, the conv returns exactly T // stride frames,
    and frame j sees input samples up to (j + 1) * stride - 1: the end of its own stride block,
    never later. In streaming, the same number of past samples is kept as history instead.

    Worked example, kernel 4, stride 2 (a downsampling conv), T = 6 samples x0..x5:
        padding = 4 - 2 = 2;  padded input  0 0 x0 x1 x2 x3 x4 x5
        frame 0 sees 0 0 x0 x1,  frame 1 sees x0 x1 x2 x3,  frame 2 sees x2 x3 x4 x5  -> 3 frames
    Kernel 7, dilation 3, stride 1: effective kernel 19, padding 18 (sample t sees t-18..t).
    """
    k = effective_kernel_size(kernel_size, dilation)
    if k < stride:
        raise ValueError(f"kernel {k} shorter than stride {stride} would skip samples")
    return k - stride


def transposed_trim(kernel_size: int, stride: int) -> int:
    """Samples to cut from the RIGHT of a causal transposed conv's output.

    A transposed conv maps L frames to L * stride + (kernel - stride) samples; the last
    kernel - stride of them still wait for the next frame's contribution. Offline they are cut;
    in streaming they are kept as the overlap tail and added to the next chunk's first samples.

    Worked example, kernel 4, stride 2, L = 3 frames: 3 * 2 + 2 = 8 samples out, trim 2 -> 6,
    and output samples 2j, 2j + 1 depend on frames j and j - 1 only.
    """
    if not stride <= kernel_size <= 2 * stride:
        raise ValueError(f"transposed conv needs stride <= kernel <= 2 * stride, got kernel {kernel_size} stride {stride}")
    return kernel_size - stride


# --------------------------------------------------------------------------------------
# Convolutions as one matrix product for small CPU inputs
#
# For inputs this small (a 20 ms streaming chunk) PyTorch's CPU dispatcher skips oneDNN and runs
# its reference kernels, which are 2x to 10x slower than one GEMM here (dilated and transposed
# convs worst). Large inputs (training, offline coding) and CUDA keep F.conv1d.

_GEMM_MAX_NUMEL = 1 << 15


def _use_gemm(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() <= _GEMM_MAX_NUMEL


def conv1d(x, weight, bias, stride: int = 1, dilation: int = 1):
    """F.conv1d without padding. x (B, C, T), weight (O, C, k) -> (B, O, F)."""
    O, C, k = weight.shape
    n = (x.shape[-1] - (k - 1) * dilation - 1) // stride + 1  # output frames
    # The reference kernel is fine for plain convs over many frames; it is slow for dilated
    # ones and for few frames into many channels (measured 2x to 6x).
    if (dilation == 1 and n >= O) or not _use_gemm(x):
        return F.conv1d(x, weight, bias, stride, dilation=dilation)
    B = x.shape[0]
    w = weight.reshape(O, C * k)
    cols = x.unfold(2, effective_kernel_size(k, dilation), stride)[..., ::dilation]  # (B, C, F, k)
    if n < O:  # few frames: the frames-major product is the fast MKL shape
        cols = cols.permute(0, 2, 1, 3).reshape(B * n, C * k)
        return torch.addmm(bias, cols, w.t()).view(B, n, O).transpose(1, 2)
    cols = cols.permute(0, 1, 3, 2).reshape(B, C * k, n)
    return torch.baddbmm(bias[None, :, None], w.expand(B, O, C * k), cols)


def conv_transpose1d(x, weight, bias, stride: int):
    """F.conv_transpose1d, kernel <= 2 * stride. x (B, C, L), weight (C, O, k) -> (B, O, L * stride + k - stride)."""
    if not _use_gemm(x):
        return F.conv_transpose1d(x, weight, bias, stride)
    B, C, L = x.shape
    _, O, k = weight.shape
    r = k - stride
    taps = (x.transpose(1, 2).reshape(B * L, C) @ weight.reshape(C, O * k)).view(B, L, O, k)
    # Frame i writes taps [0, stride) to output block i and taps [stride, k) to block i + 1.
    y = F.pad(taps[..., :stride], (0, 0, 0, 0, 0, 1)) + F.pad(taps[..., stride:], (0, stride - r, 0, 0, 1, 0))
    y = y.permute(0, 2, 1, 3).reshape(B, O, (L + 1) * stride)[..., : L * stride + r]
    return y + bias[:, None]


# --------------------------------------------------------------------------------------
# Streaming layers


class StreamingLayer(nn.Module, abc.ABC):
    """A layer with memory across chunks. `_state` is None offline, a small object while streaming.

    The layers own `weight` and `bias` directly (weight-normed while training) rather than
    wrapping nn.Conv1d: at 4 frames per call, every attribute hop is a measurable cost."""

    def __init__(self):
        super().__init__()
        self._state = None

    @abc.abstractmethod
    def init_state(self, batch_size: int):
        """The state object this layer keeps across chunks, for a batch of `batch_size`."""


@dataclass
class ConvState:
    history: torch.Tensor  # (B, C_in, padding): the last input samples seen


@dataclass
class ConvTransposeState:
    tail: torch.Tensor  # (B, C_out, kernel - stride): partial output awaiting the next frame


class CausalConv1d(StreamingLayer):
    """Conv1d padded on the left only. (B, C_in, T) -> (B, C_out, T // stride), T a multiple of stride."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, gain=math.sqrt(2.0)):
        super().__init__()
        # He initialisation, zero bias: the signal keeps its scale through conv + ReLU-like
        # activation. PyTorch's default shrinks it ~2.5x per layer: the untrained demo encoder
        # turned speech at RMS 0.06 into latents of ~0.001, which biases and codebook vectors
        # swamped (codebook perplexity ~50 of 1024 at step 5, against ~360 with this init).
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size) * (gain / math.sqrt(in_channels * kernel_size)))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        weight_norm(self)
        self.in_channels, self.stride, self.dilation = in_channels, stride, dilation
        self.padding = causal_padding(kernel_size, stride, dilation)

    def init_state(self, batch_size):
        return ConvState(self.bias.new_zeros(batch_size, self.in_channels, self.padding))

    def forward(self, x):
        if self._state is None:
            x = F.pad(x, (self.padding, 0))
        elif self.padding:
            x = torch.cat([self._state.history, x], dim=-1)
            self._state.history = x[..., x.shape[-1] - self.padding :]
        return conv1d(x, self.weight, self.bias, self.stride, self.dilation)


class CausalConvTranspose1d(StreamingLayer):
    """ConvTranspose1d trimmed on the right. (B, C_in, L) -> (B, C_out, L * stride)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, gain=math.sqrt(2.0)):
        super().__init__()
        fan_in = in_channels * kernel_size // stride  # frames x channels summed into one output sample
        self.weight = nn.Parameter(torch.randn(in_channels, out_channels, kernel_size) * (gain / math.sqrt(fan_in)))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        weight_norm(self)
        self.out_channels, self.stride = out_channels, stride
        self.trim = transposed_trim(kernel_size, stride)

    def init_state(self, batch_size):
        return ConvTransposeState(self.bias.new_zeros(batch_size, self.out_channels, self.trim))

    def forward(self, x):
        y = conv_transpose1d(x, self.weight, self.bias, self.stride)
        n = y.shape[-1] - self.trim
        if self._state is None or not self.trim:
            return y[..., :n]
        y[..., : self.trim] += self._state.tail
        # The bias is in every output sample once; the tail will meet it again in the next chunk.
        self._state.tail = y[..., n:] - self.bias[:, None]
        return y[..., :n]


# --------------------------------------------------------------------------------------
# Encoder and decoder


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, one learned alpha per channel (DAC)."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


def activation(name: str, channels: int) -> nn.Module:
    if name == "snake":
        return Snake(channels)
    return nn.ELU() if name == "elu" else nn.LeakyReLU(0.1)


def init_gain(name: str) -> float:
    """He gain for weights that follow this activation: sqrt(2) after ReLU-like ones (they halve
    the variance), 1 after Snake (close to the identity)."""
    return 1.0 if name == "snake" else math.sqrt(2.0)


class ResidualUnit(nn.Module):
    """x + Conv1x1(act(CausalConv_k,dilation(act(x)))). (B, C, T) -> (B, C, T)."""

    def __init__(self, channels, dilation, kernel_size, act):
        super().__init__()
        self.act1 = activation(act, channels)
        self.conv1 = CausalConv1d(channels, channels, kernel_size, dilation=dilation, gain=init_gain(act))
        self.act2 = activation(act, channels)
        # The branch starts at half scale so that a stack of residual units does not blow up.
        self.conv2 = CausalConv1d(channels, channels, 1, gain=0.5 * init_gain(act))

    def forward(self, x):
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))


class Encoder(nn.Module):
    """(B, 1, T) -> (B, latent_dim, T // hop)."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        ch, gain = cfg.encoder_dim, init_gain(cfg.activation)
        layers = [CausalConv1d(1, ch, cfg.kernel_size, gain=1.0)]
        for stride in cfg.strides:
            layers += [ResidualUnit(ch, d, cfg.kernel_size, cfg.activation) for d in cfg.dilations]
            layers += [activation(cfg.activation, ch), CausalConv1d(ch, 2 * ch, 2 * stride, stride, gain=gain)]
            ch *= 2
        layers += [activation(cfg.activation, ch), CausalConv1d(ch, cfg.latent_dim, 3, gain=gain)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Decoder(nn.Module):
    """(B, latent_dim, F) -> (B, 1, F * hop) in [-1, 1]."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        ch, gain = cfg.decoder_dim, init_gain(cfg.activation)
        layers = [CausalConv1d(cfg.latent_dim, ch, cfg.kernel_size, gain=1.0)]
        for stride in reversed(cfg.strides):
            layers += [activation(cfg.activation, ch), CausalConvTranspose1d(ch, ch // 2, 2 * stride, stride, gain=gain)]
            ch //= 2
            layers += [ResidualUnit(ch, d, cfg.kernel_size, cfg.activation) for d in cfg.dilations]
        layers += [activation(cfg.activation, ch), CausalConv1d(ch, 1, cfg.kernel_size, gain=gain), nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        return self.layers(z)


# --------------------------------------------------------------------------------------
# Residual vector quantizer


class VectorQuantizer(nn.Module):
    """One codebook with factorised, L2-normalised lookup (DAC): a latent row is projected to
    `codebook_dim` dims, matched by cosine similarity, and projected back. Works on rows
    (N, D) = one row per frame, so the projections are plain matrix products."""

    def __init__(self, input_dim, codebook_size, codebook_dim):
        super().__init__()
        # No bias into the lookup space: the lookup sees only directions, and an offset shared
        # by every frame (which Adam grows by ~lr per step, whatever the latents' scale) turns
        # them all toward the same code.
        self.in_proj = weight_norm(nn.Linear(input_dim, codebook_dim, bias=False))
        self.out_proj = weight_norm(nn.Linear(codebook_dim, input_dim))
        nn.init.zeros_(self.out_proj.bias)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)
        self._unit_codebook = (None, None)  # (key, (d, codebook_size) normalised codebook)

    @torch.no_grad()
    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """(N, d) projected latents -> (N,) indices of the most similar codes (no gradient:
        the codebook learns through the codebook loss, the encoder through straight-through)."""
        # argmax of cosine similarity == argmin of distance between L2-normalised vectors;
        # scaling z_e by a positive number cannot change the argmax, so it stays unnormalised.
        return (z_e.detach().float() @ self.unit_codebook()).argmax(dim=1)

    def unit_codebook(self) -> torch.Tensor:
        """(d, codebook_size) L2-normalised codes, recomputed only when the weights change
        (normalising 1024 codes costs more than a whole streaming lookup)."""
        weight = self.codebook.weight
        key = (weight.data_ptr(), weight._version)
        if self._unit_codebook[0] != key:
            self._unit_codebook = (key, F.normalize(weight.detach().float(), dim=1).t().contiguous())
        return self._unit_codebook[1]

    def forward(self, rows):
        """(N, D) -> z_q (N, D) with straight-through gradient, codes (N,), commitment and
        codebook losses per row (N,), and the projected latents z_e (N, d)."""
        z_e = self.in_proj(rows)
        codes = self.nearest(z_e)
        z_q = self.codebook(codes)
        commitment = F.mse_loss(z_e, z_q.detach(), reduction="none").mean(dim=1)
        codebook = F.mse_loss(z_q, z_e.detach(), reduction="none").mean(dim=1)
        z_q = z_e + (z_q - z_e).detach()
        return self.out_proj(z_q), codes, commitment, codebook, z_e

    def decode(self, codes):
        """(...,) codes -> (..., D)."""
        return self.out_proj(self.codebook(codes))


class ResidualVectorQuantizer(nn.Module):
    """K codebooks, each coding what the previous ones left. Latents in and out are (B, D, F)."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        self.quantizers = nn.ModuleList(
            VectorQuantizer(cfg.latent_dim, cfg.codebook_size, cfg.codebook_dim) for _ in range(cfg.n_codebooks)
        )
        # EMA of how often each code is chosen per training batch; persistent so resume is exact.
        self.register_buffer("code_usage", torch.zeros(cfg.n_codebooks, cfg.codebook_size))
        self._restart_candidates: list[torch.Tensor | None] = [None] * cfg.n_codebooks

    def forward(self, z, n_codebooks: int | None = None) -> dict:
        B, D, n_frames = z.shape
        K = self.cfg.n_codebooks
        if self.training:
            # Quantizer dropout (DAC): part of the batch uses only its first k codebooks, so the
            # leading codebooks learn to carry the coarse signal alone (k x 2 kbps still decodes).
            n_q = torch.full((B,), K, device=z.device)
            dropped = torch.randint(1, K + 1, (B,), device=z.device)
            n_drop = int(B * self.cfg.quantizer_dropout)
            n_q[:n_drop] = dropped[:n_drop]
            used = K  # every codebook runs so every parameter gets a gradient (DDP needs that)
        else:
            used = n_codebooks or K
            n_q = torch.full((B,), used, device=z.device)
        residual = z.transpose(1, 2).reshape(B * n_frames, D)  # (N, D), row = (item, frame)
        z_q = torch.zeros_like(residual)
        codes, perplexity = [], []
        commitment, codebook_loss = z.new_zeros(()), z.new_zeros(())
        for i, quantizer in enumerate(self.quantizers[:used]):
            z_q_i, codes_i, commit_i, cb_i, z_e_i = quantizer(residual)
            mask = (n_q > i).to(z.dtype).repeat_interleave(n_frames)  # (N,)
            z_q = z_q + z_q_i * mask[:, None]
            residual = residual - z_q_i
            commitment = commitment + (commit_i * mask).mean()
            codebook_loss = codebook_loss + (cb_i * mask).mean()
            counts = torch.bincount(codes_i, minlength=self.cfg.codebook_size).float()
            perplexity.append(_perplexity(counts))
            codes.append(codes_i)
            if self.training:
                with torch.no_grad():
                    self.code_usage[i].mul_(self.cfg.usage_decay).add_(counts, alpha=1 - self.cfg.usage_decay)
                self._restart_candidates[i] = z_e_i.detach()
        return {
            "z_q": z_q.view(B, n_frames, D).transpose(1, 2),  # (B, D, F)
            "codes": torch.stack(codes, dim=1).view(B, n_frames, used).transpose(1, 2),  # (B, K, F)
            "commitment_loss": commitment,
            "codebook_loss": codebook_loss,
            "codebook_perplexity": torch.stack(perplexity).mean().detach(),
            "n_codebooks": n_q,  # (B,)
        }

    # Inference (encode/decode, no gradient) reads precomputed tables instead of running the
    # projections: out_proj(codebook) for every code, so decoding is one gather and a sum, and
    # encoding is 5 small ops per codebook. The tables are rebuilt when any quantizer weight
    # changes in place (optimizer step, load_state_dict, .to()); fold_weight_norm(), which
    # replaces the parameters themselves, calls forget_tables().

    _table_params: list | None = None
    _tables_key: tuple | None = None

    def forget_tables(self) -> None:
        self._table_params = None

    def _tables_version(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self._table_params)

    @torch.no_grad()
    def inference_tables(self) -> dict[str, torch.Tensor]:
        if self._table_params is None or self._tables_version() != self._tables_key:
            qs = self.quantizers
            self._tables = {
                "in_weight": torch.stack([q.in_proj.weight.t() for q in qs]).float(),  # (K, D, d)
                "unit_codebook": torch.stack([q.unit_codebook() for q in qs]),  # (K, d, codebook_size)
                "decoded": torch.stack([q.out_proj(q.codebook.weight) for q in qs]).float(),  # (K, codebook_size, D)
            }
            self._table_params = list(self.parameters())
            self._tables_key = self._tables_version()
        return self._tables

    @torch.no_grad()
    def encode(self, z, n_codebooks: int) -> torch.Tensor:
        """(B, D, F) -> (B, k, F) codes from the first k codebooks."""
        B, D, n_frames = z.shape
        t = self.inference_tables()
        residual = z.transpose(1, 2).reshape(B * n_frames, D).float()
        codes = []
        for i in range(n_codebooks):
            z_e = residual @ t["in_weight"][i]  # (N, d)
            codes_i = (z_e @ t["unit_codebook"][i]).argmax(dim=1)  # (N,)
            residual = residual - t["decoded"][i].index_select(0, codes_i)
            codes.append(codes_i)
        return torch.stack(codes, dim=1).view(B, n_frames, n_codebooks).transpose(1, 2)

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        """(B, k, F) -> (B, D, F), the sum of the first k codebooks' vectors."""
        decoded = self.inference_tables()["decoded"]  # (K, codebook_size, D)
        k = codes.shape[1]
        offsets = torch.arange(k, device=codes.device)[None, :, None] * self.cfg.codebook_size
        rows = decoded.view(-1, decoded.shape[-1])[codes + offsets]  # (B, k, F, D)
        return rows.sum(dim=1).transpose(1, 2)

    @torch.no_grad()
    def init_from_latents(self, z: torch.Tensor, generator: torch.Generator) -> None:
        """Data-dependent initialisation (SoundStream / EnCodec use k-means; random rows do
        nearly as well): each codebook in turn is set to projected residuals of a real batch
        z (B, D, F), so every code starts where latents are, at their scale. Without it the
        first codebook's random vectors dwarf the untrained encoder's small latents and every
        later residual points the same way (seen: perplexity ~1 after 10 steps). The trainer
        calls it once, on the first batch, before the first step."""
        B, D, n_frames = z.shape
        residual = z.transpose(1, 2).reshape(B * n_frames, D).float()
        for quantizer in self.quantizers:
            z_e = quantizer.in_proj(residual)  # (N, d)
            pick = torch.randint(0, z_e.shape[0], (self.cfg.codebook_size,), generator=generator).to(z_e.device)
            quantizer.codebook.weight.copy_(z_e[pick])
            residual = residual - quantizer.decode(quantizer.nearest(z_e))
        self.code_usage.zero_()

    @torch.no_grad()
    def restart_dead_codes(self, generator: torch.Generator) -> int:
        """Move codes that have fallen out of use onto latents of the last training batch.

        A code is dead when its usage EMA is below `dead_code_ratio` of uniform use. The draw
        has a fixed size whatever the number of dead codes, so every DDP rank consumes the same
        randomness (the trainer then broadcasts rank 0's codebooks). Returns codes restarted.
        """
        restarted = 0
        K = self.cfg.codebook_size
        for i, quantizer in enumerate(self.quantizers):
            candidates = self._restart_candidates[i]  # (N, d)
            if candidates is None:
                continue
            pick = torch.randint(0, candidates.shape[0], (K,), generator=generator).to(candidates.device)
            usage = self.code_usage[i]
            dead = usage < self.cfg.dead_code_ratio * usage.sum() / K
            if dead.any():
                weight = quantizer.codebook.weight
                weight[dead] = candidates[pick][dead].float().to(weight.dtype)
                usage[dead] = usage.sum() / K  # a grace period before it can be judged dead again
                restarted += int(dead.sum())
        return restarted


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: 1 = one code used, codebook_size = all used evenly."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())


# --------------------------------------------------------------------------------------
# Weight norm: train with it, fold it for inference, load either form.

_WN_G = ".parametrizations.weight.original0"  # magnitude, one per output slice
_WN_V = ".parametrizations.weight.original1"  # direction


def fold_weight_norm_state(state: dict) -> dict:
    """State dict with weight-norm pairs (g, v) replaced by plain `weight = g * v / |v|`."""
    out = {}
    for key, value in state.items():
        if key.endswith(_WN_G):
            prefix = key[: -len(_WN_G)]
            out[prefix + ".weight"] = _weight_from_norm(value, state[prefix + _WN_V])
        elif not key.endswith(_WN_V):
            out[key] = value
    return out


def unfold_weight_norm_state(state: dict, wanted_keys) -> dict:
    """Inverse of fold_weight_norm_state for the keys a weight-normed model expects."""
    out = dict(state)
    for key in wanted_keys:
        if key.endswith(_WN_G):
            prefix = key[: -len(_WN_G)]
            if prefix + ".weight" in out:
                w = out.pop(prefix + ".weight")
                out[prefix + _WN_G] = _norm_except_dim0(w)
                out[prefix + _WN_V] = w
    return out


def _norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    return v.norm(2, dim=tuple(range(1, v.dim())), keepdim=True)


def _weight_from_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v * (g / _norm_except_dim0(v))


# --------------------------------------------------------------------------------------
# The codec


class TeluCodec(nn.Module):
    """Streaming codec. encode (B, 1, T) -> (B, K, ceil(T / hop)); decode (B, K, F) -> (B, 1, F * hop)."""

    CHECKPOINT_NAMES = ("best_codec.pt", "last.pt")

    def __init__(self, cfg: CodecConfig | None = None):
        super().__init__()
        self.config = cfg if cfg is not None else CodecConfig()
        self.encoder = Encoder(self.config)
        self.quantizer = ResidualVectorQuantizer(self.config)
        self.decoder = Decoder(self.config)
        self._streaming_batch: int | None = None
        self._stream_parts: dict | None = None  # encoder / decoder streaming layers, within streaming()

    # --- sizes ---------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def n_codebooks(self) -> int:
        return self.config.n_codebooks

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def algorithmic_latency_ms(self) -> float:
        """A frame is coded once its last sample arrives, and decoded without look-ahead: one hop."""
        return 1000.0 * self.hop_length / self.sample_rate

    def calculate_bitrate(self, n_codebooks: int | None = None) -> float:
        """kbps for the first `n_codebooks` codebooks (all by default): 8 x 10 bits x 200 Hz = 16.0."""
        k = self._check_n_codebooks(n_codebooks)
        return k * self.config.bits_per_code * self.frame_rate / 1000.0

    # --- coding ----------------------------------------------------------------------------
    def forward(self, wav: torch.Tensor, n_codebooks: int | None = None, sample_rate: int | None = None) -> dict:
        """Offline encode + decode for training and evaluation. wav (B, 1, T) -> dict:
        audio (B, 1, T), codes (B, K, F), snr (0-dim, dB, mean over the batch), commitment_loss,
        codebook_loss, codebook_perplexity (0-dim), n_codebooks (B,), latents (B, D, F)."""
        if self.is_streaming:
            raise RuntimeError("forward() is offline only; inside codec.streaming() use encode()/decode()")
        self._check_wav(wav, sample_rate)
        if n_codebooks is not None:
            self._check_n_codebooks(n_codebooks)
        T = wav.shape[-1]
        latents = self.encoder(self._pad_to_hop(wav))
        # Distances and codebook losses in float32 even under bf16 autocast.
        with torch.autocast(device_type=wav.device.type, enabled=False):
            q = self.quantizer(latents.float(), n_codebooks)
        audio = self.decoder(q["z_q"])[..., :T]
        return {
            "audio": audio,
            "codes": q["codes"],
            "snr": audio_metrics.snr(wav.float(), audio.float()).mean().detach(),
            "commitment_loss": q["commitment_loss"],
            "codebook_loss": q["codebook_loss"],
            "codebook_perplexity": q["codebook_perplexity"],
            "n_codebooks": q["n_codebooks"],
            "latents": latents,
        }

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, n_codebooks: int | None = None, sample_rate: int | None = None) -> torch.Tensor:
        """(B, 1, T) float -> (B, k, ceil(T / hop)) int64 codes from the first k codebooks.

        Offline, T is zero-padded to a whole number of frames. While streaming, T must be a
        multiple of the hop and each call continues where the previous one stopped.
        Inference only (no gradient); train through forward()."""
        self._check_wav(wav, sample_rate)
        k = self._check_n_codebooks(n_codebooks)
        if self.is_streaming:
            self._check_streaming_batch(wav.shape[0])
            if wav.shape[-1] % self.hop_length:
                raise ValueError(
                    f"streaming encode needs chunks of a multiple of {self.hop_length} samples "
                    f"({1000 * self.hop_length / self.sample_rate:g} ms), got {wav.shape[-1]}; buffer the remainder"
                )
        latents = self.encoder(self._pad_to_hop(wav))
        return self.quantizer.encode(latents.float(), k)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, k, F) int codes, k <= n_codebooks -> (B, 1, F * hop) float audio. Inference only."""
        self._check_codes(codes)
        if self.is_streaming:
            self._check_streaming_batch(codes.shape[0])
        return self.decoder(self.quantizer.decode(codes.long()))

    # --- streaming -------------------------------------------------------------------------
    @property
    def is_streaming(self) -> bool:
        return self._streaming_batch is not None

    def _streaming_layers(self) -> list[StreamingLayer]:
        return [m for m in self.modules() if isinstance(m, StreamingLayer)]

    @contextlib.contextmanager
    def streaming(self, batch_size: int = 1):
        """Within this block encode()/decode() keep state between calls (one object per layer)."""
        if self.is_streaming:
            raise RuntimeError("codec is already streaming; leave the current `with codec.streaming()` block first")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._streaming_batch = batch_size
        self.reset_streaming()
        try:
            yield self
        finally:
            for layer in self._streaming_layers():
                layer._state = None
            self._streaming_batch = None
            self._stream_parts = None

    def reset_streaming(self) -> None:
        """Forget all history (a new utterance or connection), staying in streaming mode."""
        if not self.is_streaming:
            raise RuntimeError("reset_streaming() outside `with codec.streaming():`")
        for layer in self._streaming_layers():
            layer._state = layer.init_state(self._streaming_batch)

    # Per-stream state, for a caller that interleaves many streams on one codec (the server:
    # one encoder stream and one decoder stream per session, all inside one streaming block).
    def _part_layers(self, part: str) -> list[StreamingLayer]:
        if part not in ("encoder", "decoder"):
            raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
        if self._stream_parts is None:  # once per streaming block: this runs every 20 ms
            parts = {name: [m for m in getattr(self, name).modules() if isinstance(m, StreamingLayer)]
                     for name in ("encoder", "decoder")}
            if sum(map(len, parts.values())) != len(self._streaming_layers()):
                raise RuntimeError("the codec has streaming layers outside its encoder and decoder: per-stream "
                                   "state would leave them shared between streams")
            self._stream_parts = parts
        return self._stream_parts[part]

    def new_stream_state(self, part: str) -> list:
        """A fresh streaming state for the encoder or the decoder: one object per layer, for the
        batch of the current `streaming()` block. Hold it per stream, hand it to set_stream_state."""
        if not self.is_streaming:
            raise RuntimeError("new_stream_state() outside `with codec.streaming():`")
        return [layer.init_state(self._streaming_batch) for layer in self._part_layers(part)]

    def set_stream_state(self, part: str, state: list) -> None:
        """Make the next encode() (part='encoder') or decode() ('decoder') continue `state`, a list
        from new_stream_state; the call updates its objects in place, so the list stays current."""
        if not self.is_streaming:
            raise RuntimeError("set_stream_state() outside `with codec.streaming():`")
        layers = self._part_layers(part)
        if len(state) != len(layers):
            raise ValueError(f"a {part} state has {len(layers)} layer states, got {len(state)}")
        for layer, layer_state in zip(layers, state):
            layer._state = layer_state

    def _check_streaming_batch(self, batch: int) -> None:
        if batch != self._streaming_batch:
            raise ValueError(f"streaming was started for batch size {self._streaming_batch}, got {batch}")

    # --- weight norm, saving, loading ------------------------------------------------------
    @property
    def weight_norm_folded(self) -> bool:
        return not any(parametrize.is_parametrized(m) for m in self.modules())

    def fold_weight_norm(self) -> "TeluCodec":
        """Replace every weight-normed weight by its plain value (same outputs, faster, inference only)."""
        for m in self.modules():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        self.quantizer.forget_tables()
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads the training form (weight norm) or the folded form into either form of the model."""
        state = dict(state_dict)
        state_folded = not any(k.endswith(_WN_G) for k in state)
        if self.weight_norm_folded and not state_folded:
            state = fold_weight_norm_state(state)
        elif not self.weight_norm_folded and state_folded:
            state = unfold_weight_norm_state(state, self.state_dict().keys())
        try:
            return super().load_state_dict(state, strict=strict, assign=assign)
        except RuntimeError as e:
            if "size mismatch" in str(e) or "Missing key" in str(e):
                raise RuntimeError(
                    f"this state dict was saved from a codec of another size than {self.config}; "
                    "build the model from the checkpoint's own config: TeluCodec.from_pretrained(path), "
                    "or TeluCodec(config_from_dict(CodecConfig, checkpoint['config'])).\n" + str(e)
                ) from e
            raise

    def save(self, directory: str | os.PathLike, dtype: torch.dtype | None = None, max_shard_mb: float | None = None) -> None:
        """Write the shipped form: model.safetensors + config.json (fp16 with dtype=torch.float16;
        split into shards of at most max_shard_mb when given)."""
        from training import save_pretrained

        save_pretrained(directory, self.state_dict(), config_to_dict(self.config), dtype=dtype, max_shard_mb=max_shard_mb)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location="cpu") -> "TeluCodec":
        """A folded, eval-mode codec from a model folder, a .safetensors file or a .pt checkpoint,
        rebuilt from the config stored with the weights."""
        from training import load_pretrained_state

        state, config = load_pretrained_state(path, cls.CHECKPOINT_NAMES)
        model = cls(config_from_dict(CodecConfig, config)).fold_weight_norm()
        model.load_state_dict(state)
        return model.to(map_location).eval()

    # --- introspection ---------------------------------------------------------------------
    def receptive_field(self) -> dict[str, int]:
        """Measured by gradients: input samples that reach one latent frame (encoder) and
        latent frames that reach one output sample (decoder)."""
        was_training = self.training
        self.eval()
        n_frames = 64
        x = torch.randn(1, 1, n_frames * self.hop_length, requires_grad=True)
        self.encoder(x)[0, :, -1].sum().backward()
        nz = (x.grad[0, 0] != 0).nonzero()
        encoder_rf = int(x.shape[-1] - nz.min())
        z = torch.randn(1, self.config.latent_dim, n_frames, requires_grad=True)
        self.decoder(z)[0, 0, -1].backward()
        nz = (z.grad[0].abs().sum(0) != 0).nonzero()
        decoder_rf = int(n_frames - nz.min())
        self.zero_grad(set_to_none=True)
        self.train(was_training)
        return {"encoder_samples": encoder_rf, "decoder_frames": decoder_rf}

    # --- input checks ----------------------------------------------------------------------
    def _check_wav(self, wav, sample_rate: int | None) -> None:
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(
                f"audio at {sample_rate} Hz, the codec needs {self.sample_rate} Hz; resample first "
                f"(soxr.resample(wav, {sample_rate}, {self.sample_rate}))"
            )
        if not isinstance(wav, torch.Tensor):
            raise TypeError(f"wav must be a torch.Tensor of shape (B, 1, T), got {type(wav).__name__}")
        if wav.dim() != 3:
            raise ValueError(
                f"wav must have shape (B, 1, T), got {tuple(wav.shape)}; "
                "for a (T,) signal use wav[None, None], for (B, T) use wav[:, None]"
            )
        if wav.shape[1] != 1:
            raise ValueError(
                f"wav has {wav.shape[1]} channels, the codec takes mono (B, 1, T); "
                "mix down with wav.mean(dim=1, keepdim=True)"
            )
        if wav.shape[0] == 0 or wav.shape[-1] == 0:
            raise ValueError(f"wav is empty (shape {tuple(wav.shape)}); pass at least one sample")
        if not wav.is_floating_point():
            raise TypeError(f"wav must be float in [-1, 1], got {wav.dtype}; divide int16 PCM by 32768")
        if not torch.isfinite(wav).all():
            raise ValueError("wav contains NaN or infinite samples; check the audio source")

    def _check_codes(self, codes) -> None:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"codes must be a (B, K, F) integer tensor, got {shape}")
        if codes.is_floating_point():
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if not 1 <= codes.shape[1] <= self.n_codebooks:
            raise ValueError(f"codes have {codes.shape[1]} codebooks, this codec has 1..{self.n_codebooks}")
        if codes.shape[0] == 0 or codes.shape[2] == 0:
            raise ValueError(f"codes are empty (shape {tuple(codes.shape)})")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")

    def _check_n_codebooks(self, n_codebooks: int | None) -> int:
        if n_codebooks is None:
            return self.n_codebooks
        if not 1 <= n_codebooks <= self.n_codebooks:
            raise ValueError(f"n_codebooks must be in 1..{self.n_codebooks}, got {n_codebooks}")
        return n_codebooks

    def _pad_to_hop(self, wav):
        extra = (-wav.shape[-1]) % self.hop_length
        return F.pad(wav, (0, extra)) if extra else wav


# --------------------------------------------------------------------------------------
# Measurement


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.inference_mode()
def streaming_chunk_times(
    codec: TeluCodec, wav: torch.Tensor, chunk_samples: int = 320, warmup: int = 20
) -> tuple[list[float], list[float]]:
    """Seconds per chunk for streaming encode and decode of a (1, 1, T) signal, after `warmup`
    chunks. Used by `python telugu_codec.py` and benchmark_codec.py."""
    encode_s, decode_s = [], []
    with codec.streaming(1):
        for i, start in enumerate(range(0, wav.shape[-1] - chunk_samples + 1, chunk_samples)):
            chunk = wav[..., start : start + chunk_samples]
            t0 = time.perf_counter()
            codes = codec.encode(chunk)
            t1 = time.perf_counter()
            codec.decode(codes)
            t2 = time.perf_counter()
            if i >= warmup:
                encode_s.append(t1 - t0)
                decode_s.append(t2 - t1)
    return encode_s, decode_s


def main() -> None:
    import argparse
    import statistics

    parser = argparse.ArgumentParser(description="Print TeluCodec's size, receptive field and streaming speed.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the timing (default 1)")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio length streamed for the timing")
    parser.add_argument("--presets", nargs="+", default=["default", "demo"], help=f"presets to measure: {sorted(PRESETS)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wav = 0.1 * torch.randn(1, 1, int(args.seconds * SAMPLE_RATE))
    for name in args.presets:
        cfg = CodecConfig.preset(name)
        codec = TeluCodec(cfg)
        rf = codec.receptive_field()
        codec.fold_weight_norm().eval()
        with torch.inference_mode():
            codes = codec.encode(wav[..., :16000])
            audio = codec.decode(codes)
        enc, dec = streaming_chunk_times(codec, wav)
        both = [a + b for a, b in zip(enc, dec)]
        print(f"== preset {name!r}: {cfg}")
        print(f"parameters: {count_parameters(codec) / 1e6:.2f}M (encoder {count_parameters(codec.encoder) / 1e6:.2f}M, "
              f"quantizer {count_parameters(codec.quantizer) / 1e6:.2f}M, decoder {count_parameters(codec.decoder) / 1e6:.2f}M)")
        print(f"shapes: wav {tuple(wav[..., :16000].shape)} -> codes {tuple(codes.shape)} {codes.dtype} -> audio {tuple(audio.shape)}")
        print(f"bitrate: {codec.calculate_bitrate():.1f} kbps ({cfg.n_codebooks} x {cfg.bits_per_code:g} bits x {codec.frame_rate:g} Hz); "
              f"1 codebook: {codec.calculate_bitrate(1):.1f} kbps")
        print(f"receptive field: encoder {rf['encoder_samples']} samples ({1000 * rf['encoder_samples'] / SAMPLE_RATE:.1f} ms), "
              f"decoder {rf['decoder_frames']} frames ({1000 * rf['decoder_frames'] / codec.frame_rate:.0f} ms)")
        print(f"algorithmic latency: {codec.algorithmic_latency_ms:.1f} ms (one hop of {codec.hop_length} samples)")
        print(f"streaming, 20 ms chunks, {args.threads} thread(s): encode median {1000 * statistics.median(enc):.2f} ms, "
              f"decode median {1000 * statistics.median(dec):.2f} ms, encode+decode median {1000 * statistics.median(both):.2f} ms "
              f"p90 {1000 * sorted(both)[int(0.9 * len(both))]:.2f} ms (real-time factor {statistics.median(both) / 0.020:.3f})")


if __name__ == "__main__":
    main()
