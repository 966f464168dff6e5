"""Speech Commands v2 from its wav folders -> 40x51 MFCC (or log-mel) features.

Layout (``speech_commands_v0.02/``): one folder per word (``yes/``, ``no/``, ... 35 words) of
``<speaker>_nohash_<n>.wav`` files (16 kHz, 16-bit PCM, mono, at most 1 s), a
``_background_noise_/`` folder (ignored: folders starting with ``_`` are not words), and the
official split lists ``testing_list.txt`` (required) and ``validation_list.txt`` (needed only
for ``validation="drop"``), one ``word/file.wav`` per line. Files in neither list are training.

Feature recipe (numpy/scipy only, every constant here):

1. samples ``int16 / 32768``; clips shorter than 1 s are zero-padded at the end to 16,000
   samples, longer ones cropped;
2. frames: periodic Hann window of 480 samples (30 ms), hop 320 samples (20 ms), centred
   frames (the clip is reflect-padded by 240 samples on each side) -> 1 + 16000 // 320 = 51
   frames; power spectrum ``|rfft(frame, 480)|**2`` (241 bins);
3. 40 triangular mel filters (HTK mel scale ``2595 log10(1 + f / 700)``, edges equally spaced
   in mel between 20 Hz and 8,000 Hz, peak 1, evaluated at the bin frequencies);
4. log-mel ``ln(mel_energy + 1e-6)``;
5. ``features="mfcc"`` (default): orthonormal DCT-II of the 40 log-mel values of each frame,
   all 40 coefficients kept; ``features="logmel"`` stops at step 4;
6. each coefficient (row) is standardised with the mean and std over all training clips and
   frames (``meta["mean"]``, ``meta["std"]``, 40 values each), applied to train and test.

Result: ``x`` of shape (N, 1, 40, 51), rows = coefficients, columns = time.
Wav headers are walked and checked (RIFF/WAVE, fmt: PCM, 1 channel, 16 kHz, 16 bit; chunk
sizes against the file size) before ``scipy.io.wavfile`` decodes the samples.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct

import numpy as np
from scipy import fft as scipy_fft

from .base import DataError, Dataset

SAMPLE_RATE = 16000
CLIP = 16000
N_FFT = 480
HOP = 320
N_MELS = 40
FMIN, FMAX = 20.0, 8000.0
LOG_EPS = 1e-6
FRAMES = 1 + CLIP // HOP
MAX_WAV_BYTES = 1 << 24  # 16 MiB; a 1-s clip is 32,044 bytes
_NAME = re.compile(r"^(.+)_nohash_\d+\.wav$")
LAYOUT = (
    "speech_commands_v0.02/ with one folder per word of <speaker>_nohash_<n>.wav files "
    "(16 kHz, 16-bit PCM mono) and testing_list.txt / validation_list.txt (word/file.wav lines)"
)


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SAMPLE_RATE,
    fmin: float = FMIN, fmax: float = FMAX,
) -> np.ndarray:
    """Triangular mel filters, shape (n_mels, n_fft // 2 + 1), peak 1 at each centre."""
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (freqs[None, :] - lo) / (mid - lo)
    fall = (hi - freqs[None, :]) / (hi - mid)
    return np.maximum(0.0, np.minimum(rise, fall))


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``D`` (n x n): ``D @ v`` is the DCT-II of ``v``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * k * (2 * i + 1) / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


def hann(n: int) -> np.ndarray:
    """Periodic Hann window of length n."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


_FB = mel_filterbank().astype(np.float32)
_DCT = dct_matrix(N_MELS).astype(np.float32)
_WIN = hann(N_FFT).astype(np.float32)


def features(clips: np.ndarray, kind: str = "mfcc") -> np.ndarray:
    """(N, 16000) float32 clips -> (N, 40, 51) float32 unstandardised MFCC or log-mel."""
    clips = np.asarray(clips, dtype=np.float32)
    if kind not in ("mfcc", "logmel"):
        raise ValueError(f"features must be 'mfcc' or 'logmel', got {kind!r}")
    pad = N_FFT // 2
    padded = np.pad(clips, ((0, 0), (pad, pad)), mode="reflect")
    idx = np.arange(FRAMES)[:, None] * HOP + np.arange(N_FFT)[None, :]
    frames = padded[:, idx] * _WIN  # (N, 51, 480) float32
    spec = scipy_fft.rfft(frames, n=N_FFT, axis=-1)  # complex64 for float32 input
    power = spec.real**2 + spec.imag**2
    logmel = np.log(power @ _FB.T + np.float32(LOG_EPS))  # (N, 51, 40)
    out = logmel @ _DCT.T if kind == "mfcc" else logmel
    return np.ascontiguousarray(out.transpose(0, 2, 1), dtype=np.float32)


def read_wav(path: str) -> np.ndarray:
    """Read a 16 kHz 16-bit PCM mono wav file after checking its header -> int16 samples."""
    from scipy.io import wavfile

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"wav file missing: {path}. Expected layout: {LAYOUT}") from e
    if size > MAX_WAV_BYTES:
        raise DataError(f"{path}: {size} bytes is too large for a 1-second clip")
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 12 or buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        raise DataError(f"{path}: not a RIFF/WAVE file")
    pos, fmt_ok, data_ok = 12, False, False
    while pos + 8 <= len(buf):
        cid, csize = buf[pos : pos + 4], struct.unpack("<I", buf[pos + 4 : pos + 8])[0]
        if pos + 8 + csize > len(buf):
            raise DataError(
                f"{path}: chunk {cid!r} declares {csize} bytes but only {len(buf) - pos - 8} "
                "remain; truncated file"
            )
        if cid == b"fmt ":
            if csize < 16:
                raise DataError(f"{path}: fmt chunk too short")
            tag, ch, sr, _, _, bits = struct.unpack("<HHIIHH", buf[pos + 8 : pos + 24])
            if (tag, ch, sr, bits) != (1, 1, SAMPLE_RATE, 16):
                raise DataError(
                    f"{path}: format tag={tag} channels={ch} rate={sr} bits={bits}; expected "
                    f"PCM (1), 1 channel, {SAMPLE_RATE} Hz, 16 bit"
                )
            fmt_ok = True
        elif cid == b"data":
            data_ok = True
        pos += 8 + csize + (csize & 1)
    if not (fmt_ok and data_ok):
        raise DataError(f"{path}: missing {'fmt ' if not fmt_ok else 'data'} chunk")
    try:
        sr, data = wavfile.read(io.BytesIO(buf))
    except (ValueError, struct.error) as e:
        raise DataError(f"{path}: corrupt wav ({e})") from e
    if data.dtype != np.int16 or data.ndim != 1:
        raise DataError(f"{path}: decoded {data.dtype} {data.shape}, expected int16 mono")
    return data


def _read_list(path: str, required: bool) -> set[str]:
    if not os.path.isfile(path):
        if required:
            raise DataError(f"speech_commands: missing file {path}. Expected layout: {LAYOUT}")
        return set()
    with open(path, encoding="utf-8") as f:
        return {ln.strip().replace("\\", "/") for ln in f if ln.strip()}


def _resolve(path: str) -> str:
    for d in (path, os.path.join(path, "speech_commands_v0.02")):
        if os.path.isfile(os.path.join(d, "testing_list.txt")):
            return d
    if not os.path.isdir(path):
        raise DataError(f"speech_commands: directory {path} does not exist. Layout: {LAYOUT}")
    return path


def _load_clips(root: str, rels: list[str], kind: str, batch: int = 2048) -> np.ndarray:
    out = np.empty((len(rels), N_MELS, FRAMES), dtype=np.float32)
    buf = np.zeros((min(batch, max(len(rels), 1)), CLIP), dtype=np.float32)
    for start in range(0, len(rels), batch):
        chunk = rels[start : start + batch]
        buf[:] = 0.0
        for i, rel in enumerate(chunk):
            s = read_wav(os.path.join(root, rel))[:CLIP]
            buf[i, : s.size] = s
        buf /= np.float32(32768.0)
        out[start : start + len(chunk)] = features(buf[: len(chunk)], kind)
    return out


def _cache_path(
    cache_dir: str | None, root: str, rels_tr: list[str], rels_te: list[str], kind: str
) -> str | None:
    if not cache_dir:
        return None
    h = hashlib.sha256()
    h.update(repr((N_FFT, HOP, N_MELS, FMIN, FMAX, LOG_EPS, CLIP, kind)).encode())
    for tag, rels in (("train", rels_tr), ("test", rels_te)):
        h.update(tag.encode())
        for rel in rels:
            st = os.stat(os.path.join(root, rel))
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return os.path.join(cache_dir, f"speech_commands_{h.hexdigest()[:20]}.npz")


def _read_cache(path: str, n_tr: int, n_te: int) -> tuple[np.ndarray, np.ndarray] | None:
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            x, xt = z["x"], z["x_test"]
    except (OSError, ValueError, KeyError, EOFError):
        return None
    want = (N_MELS, FRAMES)
    if x.shape != (n_tr, *want) or xt.shape != (n_te, *want) or x.dtype != np.float32 \
            or xt.dtype != np.float32:
        return None
    return x, xt


def _write_cache(path: str, x: np.ndarray, xt: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, x=x, x_test=xt)
    os.replace(tmp, path)


def load_speech_commands(
    path: str,
    *,
    words: list[str] | None = None,
    unknown: bool = False,
    features_kind: str = "mfcc",
    validation: str = "train",
    cache_dir: str | None = None,
) -> Dataset:
    """Load Speech Commands v2 as (N, 1, 40, 51) features with the official test split.

    ``words`` restricts the classes (default: every word folder, sorted); with ``unknown=True``
    the other words become one extra ``_unknown_`` class instead of being dropped.
    ``validation``: ``"train"`` puts validation_list.txt clips in the training split,
    ``"drop"`` leaves them out. ``groups`` holds each training clip's speaker.
    ``cache_dir``: keep the unstandardised features of this selection in
    ``<cache_dir>/speech_commands_<key>.npz`` (key: recipe + every clip's path, size and mtime),
    so a second load skips the wav decoding and FFTs; a stale or unreadable cache is rebuilt.
    """
    if validation not in ("train", "drop"):
        raise ValueError(f"validation must be 'train' or 'drop', got {validation!r}")
    if features_kind not in ("mfcc", "logmel"):
        raise ValueError(f"features_kind must be 'mfcc' or 'logmel', got {features_kind!r}")
    if words is not None and (len(set(words)) != len(words) or not words):
        raise ValueError(f"words must be a non-empty list of distinct words, got {words!r}")
    root = _resolve(path)
    test_list = _read_list(os.path.join(root, "testing_list.txt"), True)
    val_list = _read_list(os.path.join(root, "validation_list.txt"), validation == "drop")
    folders = sorted(
        d for d in os.listdir(root)
        if not d.startswith(("_", ".")) and os.path.isdir(os.path.join(root, d))
    )
    if not folders:
        raise DataError(f"speech_commands: no word folders in {root}. Expected layout: {LAYOUT}")
    if words is not None:
        missing = [w for w in words if w not in folders]
        if missing:
            raise DataError(f"speech_commands: word folders {missing} not found in {root}")
        classes = list(words) + (["_unknown_"] if unknown else [])
    else:
        classes = folders
    cid = {w: i for i, w in enumerate(classes)}
    tr, te = [], []
    for w in folders:
        label = cid.get(w, cid.get("_unknown_") if unknown else None)
        if label is None:
            continue
        for fn in sorted(os.listdir(os.path.join(root, w))):
            if not fn.endswith(".wav"):
                continue
            m = _NAME.match(fn)
            if m is None:
                raise DataError(
                    f"{os.path.join(root, w, fn)}: file name is not <speaker>_nohash_<n>.wav"
                )
            rel = f"{w}/{fn}"
            if rel in test_list:
                te.append((rel, label, m.group(1)))
            elif rel in val_list and validation == "drop":
                continue
            else:
                tr.append((rel, label, m.group(1)))
    used = set(classes) | (set(folders) if unknown else set())
    known = {r for r, _, _ in te}
    for rel in sorted(test_list):
        if rel.split("/")[0] in used and rel not in known:
            raise DataError(
                f"{os.path.join(root, 'testing_list.txt')} lists {rel}, which is not in {root}"
            )
    if not tr:
        raise DataError(f"speech_commands: no training wav files under {root}")
    speakers = sorted({s for _, _, s in tr})
    sid = {s: i for i, s in enumerate(speakers)}
    rels_tr, rels_te = [r for r, _, _ in tr], [r for r, _, _ in te]
    cache = _cache_path(cache_dir, root, rels_tr, rels_te, features_kind)
    cached = _read_cache(cache, len(rels_tr), len(rels_te)) if cache else None
    if cached is not None:
        x, xt = cached
    else:
        x = _load_clips(root, rels_tr, features_kind)
        xt = _load_clips(root, rels_te, features_kind)
        if cache:
            _write_cache(cache, x, xt)
    # per coefficient, so the float64 temporaries stay one coefficient wide
    mean = np.array([x[:, i].mean(dtype=np.float64) for i in range(N_MELS)])
    std = np.array([x[:, i].std(dtype=np.float64) for i in range(N_MELS)])
    std = np.where(std > 0, std, 1.0)
    for arr in (x, xt):
        arr -= mean.astype(np.float32)[None, :, None]
        arr /= std.astype(np.float32)[None, :, None]
    meta = {
        "normalize": "per-coefficient standardisation with training statistics",
        "mean": mean.tolist(), "std": std.tolist(), "features": features_kind,
        "source": os.path.abspath(root), "validation": validation,
        "recipe": f"hann {N_FFT}, hop {HOP}, centred, {N_MELS} HTK mel {FMIN}-{FMAX} Hz, "
                  f"ln(+{LOG_EPS}), {'DCT-II ortho' if features_kind == 'mfcc' else 'no DCT'}",
    }
    return Dataset(
        name="speech_commands", x=x[:, None], y=np.array([b for _, b, _ in tr], np.int64),
        x_test=xt[:, None], y_test=np.array([b for _, b, _ in te], np.int64),
        num_classes=len(classes), input_shape=(1, N_MELS, FRAMES),
        groups=np.array([sid[s] for _, _, s in tr], np.int64), group_names=tuple(speakers),
        class_names=tuple(classes), meta=meta,
    )
