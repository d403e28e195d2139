"""NumPy reimplementation of transformers' `Phi4MultimodalFeatureExtractor` (log-mel filter-bank features).

Per 25 ms frame (400 samples, hop 160, no centring): pre-emphasis 0.97 with the first sample as its own predecessor,
x 32768, symmetric Hamming window, rFFT n=512 (float64, then complex64 as upstream), power spectrum, 80 Kaldi-mel
triangles (triangularised in mel space, 0-7690 Hz), `log(max(., 1))`. Batches are zero-padded to the longest waveform;
like upstream, frames of a shorter waveform from its last full frame up to `len // hop - 1` are zeroed (so they give
log(1) = 0), while later frames over the zero padding are computed as they fall.
"""

from __future__ import annotations

import numpy as np


def _hertz_to_mel_kaldi(freq):
    return 1127.0 * np.log(1.0 + (freq / 700.0))


def kaldi_mel_filters(num_frequency_bins: int, num_mel_filters: int, min_frequency: float, max_frequency: float,
                      sampling_rate: int) -> np.ndarray:
    """`transformers.audio_utils.mel_filter_bank(..., triangularize_in_mel_space=True, mel_scale="kaldi")`, [bins, mels]
    float64."""
    mel_freqs = np.linspace(_hertz_to_mel_kaldi(min_frequency), _hertz_to_mel_kaldi(max_frequency), num_mel_filters + 2)
    fft_bin_width = sampling_rate / ((num_frequency_bins - 1) * 2)
    fft_freqs = _hertz_to_mel_kaldi(fft_bin_width * np.arange(num_frequency_bins))
    filter_diff = np.diff(mel_freqs)
    slopes = np.expand_dims(mel_freqs, 0) - np.expand_dims(fft_freqs, 1)
    down_slopes = -slopes[:, :-2] / filter_diff[:-1]
    up_slopes = slopes[:, 2:] / filter_diff[1:]
    return np.maximum(np.zeros(1), np.minimum(down_slopes, up_slopes))


def fbank_features(waveforms: list[np.ndarray], mel_filters: np.ndarray, *, win_length: int, hop_length: int,
                   n_fft: int, preemphasis: float, padding_value: float) -> np.ndarray:
    """Batched log-mel features [B, frames_of_longest, n_mels] float32 for 1-D float32 waveforms."""
    lengths = np.array([len(w) for w in waveforms], dtype=np.int64)
    batch, max_len = len(waveforms), int(lengths.max())
    padded = np.full((batch, max_len), padding_value, dtype=np.float32)
    for i, w in enumerate(waveforms):
        padded[i, : len(w)] = w
    n_frames = (max_len - win_length) // hop_length + 1
    idx = np.arange(n_frames)[:, None] * hop_length + np.arange(win_length)[None, :]
    frames = padded[:, idx]  # [B, F, win]

    if batch > 1:  # upstream's masking of partial frames of shorter waveforms
        short = np.nonzero(lengths != lengths.max())[0]
        if short.size:
            down = (lengths[short] - win_length) // hop_length + 1
            up = lengths[short] // hop_length - 1
            offset, stop = int(down.min()), int(up.max())
            cols = np.arange(offset, min(stop, n_frames))
            mask = (down[:, None] <= cols[None, :]) & (cols[None, :] < up[:, None])
            sub = frames[short[:, None], cols[None, :]]
            sub[mask] = 0.0
            frames[short[:, None], cols[None, :]] = sub

    prev = np.roll(frames, 1, axis=-1)
    prev[:, :, 0] = prev[:, :, 1]
    frames = (frames - np.float32(preemphasis) * prev) * np.float32(32768)

    window = np.hamming(win_length)  # symmetric, float64 (== torch.hamming_window(periodic=False))
    spec = np.fft.rfft(window * frames.astype(np.float64), n=n_fft, axis=-1).astype(np.complex64)
    power = np.abs(spec) ** 2  # float32
    mel = power @ mel_filters.astype(np.float32)
    return np.log(np.maximum(mel, np.float32(1.0))).astype(np.float32)


def audio_embed_sizes(feature_lengths: np.ndarray, compression_rate: int, downsample_rate: int) -> np.ndarray:
    """Number of audio tokens per waveform: ceil(ceil(frames / compression_rate) / downsample_rate)."""
    result = feature_lengths // compression_rate + (feature_lengths % compression_rate > 0)
    return (result // downsample_rate + (result % downsample_rate > 0)).astype(np.int64)
