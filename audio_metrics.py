"""Audio quality metrics shared by the codec's forward pass, its trainer's validation and its benchmark.

    snr(ref, est)            waveform SNR in dB, per item               (torch, differentiable)
    si_sdr(ref, est)         scale-invariant SDR in dB, per item         (torch)
    MultiScaleMelLoss        DAC's multi-scale log-mel L1 distance        (torch nn.Module, the training loss)
    mel_distance(ref, est)   the same distance as a float, for validation and benchmarks
    pesq_wb(ref, est)        PESQ wide-band (ITU-T P.862.2), NaN when PESQ finds no speech
    stoi(ref, est)           short-time objective intelligibility

Tensors are (..., T) at 16 kHz; the numpy functions take 1-D float arrays.

Usage:
    python audio_metrics.py            # prints the metrics of a noisy tone against the clean tone
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import SAMPLE_RATE

EPS = 1e-8


def snr(ref: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """(..., T), (..., T) -> (...) SNR in dB of `est` against `ref`."""
    noise = (ref - est).pow(2).sum(-1)
    return 10 * torch.log10(ref.pow(2).sum(-1).clamp_min(EPS) / noise.clamp_min(EPS))


def si_sdr(ref: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """(..., T), (..., T) -> (...) scale-invariant SDR in dB (Le Roux et al. 2019), zero-mean inputs."""
    ref = ref - ref.mean(-1, keepdim=True)
    est = est - est.mean(-1, keepdim=True)
    scale = (est * ref).sum(-1, keepdim=True) / ref.pow(2).sum(-1, keepdim=True).clamp_min(EPS)
    target = scale * ref
    noise = est - target
    return 10 * torch.log10(target.pow(2).sum(-1).clamp_min(EPS) / noise.pow(2).sum(-1).clamp_min(EPS))


# --------------------------------------------------------------------------------------
# Multi-scale mel distance


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters on the HTK mel scale, each of unit area
    (Slaney normalisation), from 0 Hz to Nyquist. Written here so no audio library is needed."""

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    bin_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bin_hz[None] - lower) / (centre - lower)
    falling = (upper - bin_hz[None]) / (upper - centre)
    fb = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
    return torch.from_numpy(fb.astype(np.float32))


class MultiScaleMelLoss(nn.Module):
    """L1 distance between log10 mel spectrograms at several STFT sizes, summed over scales (DAC).

    Small windows judge timing, large ones pitch and harmonics, so no single resolution is
    gamed. DAC's 44.1 kHz sizes are kept: at 16 kHz the 2048 window still resolves 8 Hz.
    forward(est (..., T), ref (..., T)) -> scalar.
    """

    def __init__(
        self,
        window_lengths: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048),
        n_mels: tuple[int, ...] = (5, 10, 20, 40, 80, 160, 320),
        sample_rate: int = SAMPLE_RATE,
        clamp_eps: float = 1e-5,
    ):
        super().__init__()
        if len(window_lengths) != len(n_mels):
            raise ValueError("window_lengths and n_mels must have the same length")
        self.window_lengths = tuple(window_lengths)
        self.clamp_eps = clamp_eps
        for w, m in zip(window_lengths, n_mels):
            self.register_buffer(f"window_{w}", torch.hann_window(w), persistent=False)
            self.register_buffer(f"mel_{w}", mel_filterbank(w, m, sample_rate), persistent=False)

    def log_mel(self, wav: torch.Tensor, window_length: int) -> torch.Tensor:
        """(N, T) -> (N, n_mels, frames) log10 mel magnitude."""
        spec = torch.stft(
            wav, window_length, hop_length=window_length // 4,
            window=getattr(self, f"window_{window_length}"),
            center=True, pad_mode="constant", return_complex=True,
        ).abs()
        mel = getattr(self, f"mel_{window_length}") @ spec
        return mel.clamp_min(self.clamp_eps).log10()

    def forward(self, est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        # STFTs in float32 even under bf16 autocast: log of tiny magnitudes needs the range.
        with torch.autocast(device_type=est.device.type, enabled=False):
            est = est.float().reshape(-1, est.shape[-1])
            ref = ref.float().reshape(-1, ref.shape[-1])
            loss = est.new_zeros(())
            for w in self.window_lengths:
                loss = loss + F.l1_loss(self.log_mel(est, w), self.log_mel(ref, w))
        return loss


_MEL_DISTANCE: MultiScaleMelLoss | None = None


def mel_distance(ref: torch.Tensor | np.ndarray, est: torch.Tensor | np.ndarray) -> float:
    """The training mel loss as a plain number (lower is better)."""
    global _MEL_DISTANCE
    if _MEL_DISTANCE is None:
        _MEL_DISTANCE = MultiScaleMelLoss()
    ref_t = torch.as_tensor(np.asarray(ref, dtype=np.float32) if isinstance(ref, np.ndarray) else ref)
    est_t = torch.as_tensor(np.asarray(est, dtype=np.float32) if isinstance(est, np.ndarray) else est)
    with torch.no_grad():
        return float(_MEL_DISTANCE.to(est_t.device)(est_t.float(), ref_t.float()))


# --------------------------------------------------------------------------------------
# Perceptual metrics (numpy, CPU)


def pesq_wb(ref: np.ndarray, est: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """PESQ-WB MOS-LQO (1.0 to 4.6); NaN when PESQ cannot score the pair (e.g. no speech found)."""
    from pesq import pesq

    try:
        return float(pesq(sample_rate, _np(ref), _np(est), "wb"))
    except Exception:  # pesq raises NoUtterancesError and friends on tones or silence
        return math.nan


def stoi(ref: np.ndarray, est: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """STOI (0 to 1); NaN when the clip is too short to score."""
    from pystoi import stoi as _stoi

    try:
        return float(_stoi(_np(ref), _np(est), sample_rate, extended=False))
    except Exception:
        return math.nan


def all_metrics(ref: np.ndarray, est: np.ndarray, sample_rate: int = SAMPLE_RATE) -> dict[str, float]:
    """Every metric above for one (T,) pair, as plain floats."""
    ref, est = _np(ref), _np(est)
    ref_t, est_t = torch.from_numpy(ref), torch.from_numpy(est)
    return {
        "snr": float(snr(ref_t, est_t)),
        "si_sdr": float(si_sdr(ref_t, est_t)),
        "mel_distance": mel_distance(ref_t, est_t),
        "pesq_wb": pesq_wb(ref, est, sample_rate),
        "stoi": stoi(ref, est, sample_rate),
    }


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32).reshape(-1)


def main() -> None:
    t = np.arange(SAMPLE_RATE * 2) / SAMPLE_RATE
    clean = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    noisy = clean + np.random.default_rng(0).normal(0, 0.03, clean.shape).astype(np.float32)
    for name, value in all_metrics(clean, noisy).items():
        print(f"{name:>14}: {value:.3f}")


if __name__ == "__main__":
    main()
