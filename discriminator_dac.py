"""Discriminators for adversarial codec training (DAC / HiFi-GAN), and the GAN losses.

    MultiPeriodDiscriminator      waveform folded by periods 2, 3, 5, 7, 11: judges pitch periodicity
    MultiBandSTFTDiscriminator    complex STFTs at 3 window sizes, each split into 5 frequency
                                  bands with their own convs (DAC's MRD): judges spectral detail
    Discriminator                 both, behind one forward
    GANLoss                       least-squares GAN: discriminator_loss(real, fake) and
                                  generator_loss(real, fake) -> adversarial_loss + feature_loss

Every discriminator returns, per sub-discriminator, the list of its feature maps; the last one
is the real/fake score map. Waveforms are (B, 1, T) at 16 kHz.

Usage:
    python discriminator_dac.py       # parameter counts and output shapes for 1 s of audio
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


@dataclass
class DiscriminatorConfig:
    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    period_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)  # DAC / HiFi-GAN widths
    stft_windows: tuple[int, ...] = (1024, 512, 256)  # DAC's 2048/1024/512 at 44.1 kHz, rescaled to 16 kHz
    stft_channels: int = 32
    # Fractions of the STFT bins; each band gets its own conv stack (DAC).
    bands: tuple[tuple[float, float], ...] = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))

    def __post_init__(self):
        self.periods = tuple(self.periods)
        self.period_channels = tuple(self.period_channels)
        self.stft_windows = tuple(self.stft_windows)
        self.bands = tuple(tuple(b) for b in self.bands)
        if not self.periods and not self.stft_windows:
            raise ValueError("a discriminator needs at least one period or one STFT window")
        for lo, hi in self.bands:
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"band ({lo}, {hi}) must satisfy 0 <= lo < hi <= 1")


def _conv2d(*args, **kwargs) -> nn.Module:
    return weight_norm(nn.Conv2d(*args, **kwargs))


def _leaky(x):
    return F.leaky_relu(x, 0.1)


class PeriodDiscriminator(nn.Module):
    """(B, 1, T) folded to (B, 1, T / p, p), then convs along time only (kernel (5, 1))."""

    def __init__(self, period: int, channels: tuple[int, ...]):
        super().__init__()
        self.period = period
        layers, c_in = [], 1
        for i, c_out in enumerate(channels):
            stride = (3, 1) if i < len(channels) - 1 else (1, 1)
            layers.append(_conv2d(c_in, c_out, (5, 1), stride, padding=(2, 0)))
            c_in = c_out
        self.convs = nn.ModuleList(layers)
        self.conv_post = _conv2d(c_in, 1, (3, 1), padding=(1, 0))

    def forward(self, x) -> list[torch.Tensor]:
        T = x.shape[-1]
        x = F.pad(x, (0, (-T) % self.period), mode="reflect" if T > self.period else "constant")
        x = x.view(x.shape[0], 1, -1, self.period)  # (B, 1, T / p, p)
        fmap = []
        for conv in self.convs:
            x = _leaky(conv(x))
            fmap.append(x)
        fmap.append(self.conv_post(x))
        return fmap


class BandedSTFTDiscriminator(nn.Module):
    """Complex STFT (real and imaginary as 2 channels, (B, 2, frames, bins)), split into
    frequency bands, each through its own conv stack, then joined for the score map."""

    def __init__(self, window_length: int, bands, channels: int):
        super().__init__()
        self.window_length = window_length
        self.register_buffer("window", torch.hann_window(window_length), persistent=False)
        n_bins = window_length // 2 + 1
        self.bands = [(int(lo * n_bins), int(hi * n_bins)) for lo, hi in bands]

        def stack():
            return nn.ModuleList([
                _conv2d(2, channels, (3, 9), padding=(1, 4)),
                _conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4)),
                _conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4)),
                _conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4)),
                _conv2d(channels, channels, (3, 3), padding=(1, 1)),
            ])

        self.band_convs = nn.ModuleList(stack() for _ in self.bands)
        self.conv_post = _conv2d(channels, 1, (3, 3), padding=(1, 1))

    def spectrogram(self, x) -> torch.Tensor:
        """(B, 1, T) -> (B, 2, frames, bins), in float32 even under autocast."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.stft(
                x[:, 0].float(), self.window_length, self.window_length // 4, window=self.window,
                center=True, pad_mode="constant", return_complex=True,
            )
        return torch.view_as_real(spec).permute(0, 3, 2, 1)

    def forward(self, x) -> list[torch.Tensor]:
        spec = self.spectrogram(x)
        fmap, outs = [], []
        for (lo, hi), convs in zip(self.bands, self.band_convs):
            h = spec[..., lo:hi]
            for conv in convs:
                h = _leaky(conv(h))
                fmap.append(h)
            outs.append(h)
        fmap.append(self.conv_post(torch.cat(outs, dim=-1)))
        return fmap


class MultiPeriodDiscriminator(nn.Module):
    def __init__(self, periods=(2, 3, 5, 7, 11), channels=(32, 128, 512, 1024, 1024)):
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channels) for p in periods)

    def forward(self, x) -> list[list[torch.Tensor]]:
        return [d(x) for d in self.discriminators]


class MultiBandSTFTDiscriminator(nn.Module):
    def __init__(self, windows=(1024, 512, 256), bands=DiscriminatorConfig.bands, channels=32):
        super().__init__()
        self.discriminators = nn.ModuleList(BandedSTFTDiscriminator(w, bands, channels) for w in windows)

    def forward(self, x) -> list[list[torch.Tensor]]:
        return [d(x) for d in self.discriminators]


class Discriminator(nn.Module):
    """All sub-discriminators. (B, 1, T) -> list (one per sub-discriminator) of feature-map lists."""

    def __init__(self, cfg: DiscriminatorConfig | None = None):
        super().__init__()
        self.config = cfg = cfg if cfg is not None else DiscriminatorConfig()
        self.mpd = MultiPeriodDiscriminator(cfg.periods, cfg.period_channels)
        self.mrd = MultiBandSTFTDiscriminator(cfg.stft_windows, cfg.bands, cfg.stft_channels)

    def forward(self, x) -> list[list[torch.Tensor]]:
        # Judge shape, not level (DAC): remove DC and peak-normalise every clip.
        x = x - x.mean(dim=-1, keepdim=True)
        x = 0.8 * x / (x.abs().amax(dim=-1, keepdim=True) + 1e-9)
        return self.mpd(x) + self.mrd(x)


class GANLoss:
    """Least-squares GAN losses around one discriminator (plain or DDP-wrapped).

    Real and fake clips go through the discriminator as one batch, so each loss is one
    forward pass (what DDP expects between backward passes).
    """

    def __init__(self, discriminator: nn.Module):
        self.discriminator = discriminator

    def _judge(self, real, fake):
        n = real.shape[0]
        both = self.discriminator(torch.cat([real, fake], dim=0))
        d_real = [[f[:n] for f in fmaps] for fmaps in both]
        d_fake = [[f[n:] for f in fmaps] for fmaps in both]
        return d_real, d_fake

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Scores real toward 1 and fake toward 0. fake is detached here."""
        d_real, d_fake = self._judge(real, fake.detach())
        loss = real.new_zeros((), dtype=torch.float32)
        for r, f in zip(d_real, d_fake):
            loss = loss + (1 - r[-1].float()).pow(2).mean() + f[-1].float().pow(2).mean()
        return loss

    def generator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """adversarial_loss pushes fake scores toward 1; feature_loss is the L1 distance between
        the discriminator's inner feature maps for fake and (detached) real audio."""
        d_real, d_fake = self._judge(real, fake)
        adversarial = real.new_zeros((), dtype=torch.float32)
        feature = real.new_zeros((), dtype=torch.float32)
        for r, f in zip(d_real, d_fake):
            adversarial = adversarial + (1 - f[-1].float()).pow(2).mean()
            for fr, ff in zip(r[:-1], f[:-1]):
                feature = feature + F.l1_loss(ff.float(), fr.detach().float())
        return {"adversarial_loss": adversarial, "feature_loss": feature}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Print discriminator sizes and output shapes.")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of the test clip")
    args = parser.parse_args()
    d = Discriminator()
    x = torch.randn(2, 1, int(16000 * args.seconds))
    with torch.no_grad():
        outs = d(x)
    print(f"parameters: multi-period {sum(p.numel() for p in d.mpd.parameters()) / 1e6:.2f}M, "
          f"multi-band STFT {sum(p.numel() for p in d.mrd.parameters()) / 1e6:.2f}M")
    names = [f"period {p}" for p in d.config.periods] + [f"stft {w}" for w in d.config.stft_windows]
    for name, fmaps in zip(names, outs):
        print(f"{name:>10}: {len(fmaps) - 1} feature maps, score map {tuple(fmaps[-1].shape)}")
    with torch.no_grad():
        losses = GANLoss(d).generator_loss(x, x + 0.1 * torch.randn_like(x))
    print("generator losses, clean vs noisy clip:", {k: round(float(v), 3) for k, v in losses.items()})


if __name__ == "__main__":
    main()
