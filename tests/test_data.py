"""fl_core.data loaders on fixture files generated here in the datasets' original formats.

Fixtures are written by small independent writers (struct-packed IDX headers, LEAF JSON,
CIFAR-10 binary records plane by plane, RIFF/WAVE via scipy.io.wavfile), never by the code
under test. Every kind of corruption must raise DataError naming the file.
"""

from __future__ import annotations

import gzip
import json
import os
import struct

import numpy as np
import pytest

from fl_core.data import DATASETS, DataError, Dataset, load_dataset
from fl_core.data.idx import read_idx

# ---------------------------------------------------------------- fixture writers


def write_idx(path, arr: np.ndarray, magic: int, gz: bool = True) -> str:
    """IDX: >I magic, >I per dimension, then the uint8 data in C order."""
    head = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    blob = head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    path = str(path)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        with open(path, "wb") as f:
            f.write(blob)
    return path


def make_idx_dir(root, n_train=40, n_test=12, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    data = {
        "xtr": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "ytr": np.arange(n_train, dtype=np.uint8) % 10,
        "xte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "yte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    sfx = ".gz" if gz else ""
    write_idx(os.path.join(root, "train-images-idx3-ubyte" + sfx), data["xtr"], 0x803, gz)
    write_idx(os.path.join(root, "train-labels-idx1-ubyte" + sfx), data["ytr"], 0x801, gz)
    write_idx(os.path.join(root, "t10k-images-idx3-ubyte" + sfx), data["xte"], 0x803, gz)
    write_idx(os.path.join(root, "t10k-labels-idx1-ubyte" + sfx), data["yte"], 0x801, gz)
    return data


def leaf_doc(writers: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    return {
        "users": list(writers),
        "num_samples": [int(len(y)) for _, y in writers.values()],
        "user_data": {w: {"x": x.tolist(), "y": [int(v) for v in y]} for w, (x, y) in
                      writers.items()},
    }


def make_leaf_dir(root, seed=0):
    """LEAF femnist data dir: train/ and test/ with 2 files, 3 writers."""
    rng = np.random.default_rng(seed)
    sizes = {"f0000_14": (7, 2), "f0001_41": (5, 1), "f0002_03": (9, 3)}
    writers_tr, writers_te = {}, {}
    for w, (ntr, nte) in sizes.items():
        writers_tr[w] = (rng.random((ntr, 784)).round(4), rng.integers(0, 62, ntr))
        writers_te[w] = (rng.random((nte, 784)).round(4), rng.integers(0, 62, nte))
    for split, ws in (("train", writers_tr), ("test", writers_te)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        names = list(ws)
        for i, chunk in enumerate((names[:2], names[2:])):
            with open(os.path.join(root, split, f"all_data_{i}_{split}.json"), "w") as f:
                json.dump(leaf_doc({w: ws[w] for w in chunk}), f)
    return writers_tr, writers_te


def cifar_record(label: int, r: np.ndarray, g: np.ndarray, b: np.ndarray) -> bytes:
    """One CIFAR-10 binary record: label byte, then the R, G, B 32x32 planes row by row."""
    out = bytes([label])
    for plane in (r, g, b):
        out += bytes(int(v) for v in plane.reshape(-1))
    return out


def make_cifar_dir(root, per_batch=3, seed=0):
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(d)
    planes = {}
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        recs = []
        for j in range(per_batch):
            r, g, b = (rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(3))
            label = int(rng.integers(0, 10))
            recs.append(cifar_record(label, r, g, b))
            planes[(name, j)] = (label, r, g, b)
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"".join(recs))
    with open(os.path.join(d, "batches.meta.txt"), "w") as f:
        f.write("\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                           "horse", "ship", "truck"]) + "\n")
    return d, planes


def tone(freq: float, n: int = 16000, amp: float = 0.5) -> np.ndarray:
    t = np.arange(n) / 16000.0
    return (amp * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def make_speech_dir(root):
    """Speech Commands v2 layout with 3 words, 3 speakers, official lists."""
    from scipy.io import wavfile

    words = {"yes": 300.0, "no": 1200.0, "up": 3000.0}
    speakers = ["0a7c2a8d", "1b4c9f00", "c50f55b8"]
    for w, f0 in words.items():
        os.makedirs(os.path.join(root, w))
        for s in speakers:
            for k in range(2):
                n = 16000 if k == 0 else 12000  # one short clip per speaker: zero-padded
                wavfile.write(os.path.join(root, w, f"{s}_nohash_{k}.wav"), 16000, tone(f0, n))
    os.makedirs(os.path.join(root, "_background_noise_"))
    wavfile.write(os.path.join(root, "_background_noise_", "white_noise.wav"), 16000,
                  np.zeros(48000, np.int16))
    with open(os.path.join(root, "testing_list.txt"), "w") as f:
        f.write("yes/c50f55b8_nohash_0.wav\nno/c50f55b8_nohash_0.wav\nup/c50f55b8_nohash_1.wav\n")
    with open(os.path.join(root, "validation_list.txt"), "w") as f:
        f.write("yes/1b4c9f00_nohash_1.wav\n")
    return words, speakers


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loads_values_labels_and_official_split(tmp_path, gz):
    data = make_idx_dir(tmp_path, gz=gz)
    ds = load_dataset("fashion_mnist", tmp_path, normalize="unit")
    assert isinstance(ds, Dataset)
    assert ds.x.shape == (40, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.x_test.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(ds.x[:, 0] * 255.0, data["xtr"].astype(np.float32))
    np.testing.assert_array_equal(ds.y, data["ytr"])
    np.testing.assert_array_equal(ds.y_test, data["yte"])
    assert ds.y.dtype == np.int64 and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.class_names[9] == "Ankle boot"


def test_idx_standard_normalisation_uses_train_statistics(tmp_path):
    data = make_idx_dir(tmp_path)
    ds = load_dataset("fashion_mnist", tmp_path)
    raw = data["xtr"].astype(np.float64) / 255.0
    assert ds.meta["mean"][0] == pytest.approx(raw.mean(), rel=1e-6)
    assert ds.meta["std"][0] == pytest.approx(raw.std(), rel=1e-6)
    assert abs(float(ds.x.mean())) < 1e-5 and float(ds.x.std()) == pytest.approx(1.0, abs=1e-4)
    expect_test = (data["xte"] / 255.0 - raw.mean()) / raw.std()
    np.testing.assert_allclose(ds.x_test[:, 0], expect_test, atol=1e-5)


def test_idx_wrong_magic_names_file(tmp_path):
    make_idx_dir(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(p, np.zeros((40, 28, 28), np.uint8), 0x801 + 0x100)  # not 0x803
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*magic"):
        load_dataset("fashion_mnist", tmp_path)


def test_idx_truncated_gzip_names_file(tmp_path):
    make_idx_dir(tmp_path)
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", tmp_path)


def test_idx_truncated_raw_file_names_file(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*declares"):
        load_dataset("fashion_mnist", tmp_path)


def test_idx_huge_declared_size_rejected_before_allocating(tmp_path):
    """A ~1 kB gzip whose header declares 10^9 images, even with a forged gzip footer."""
    p = str(tmp_path / "bad-images.gz")
    head = struct.pack(">IIII", 0x803, 10**9, 28, 28)
    with gzip.open(p, "wb") as f:
        f.write(head + bytes(1000))
    blob = bytearray(open(p, "rb").read())
    total = 16 + 10**9 * 784
    blob[-4:] = struct.pack("<I", total % (1 << 32))  # footer agrees with the header
    open(p, "wb").write(bytes(blob))
    assert os.path.getsize(p) < 1024
    with pytest.raises(DataError, match=r"bad-images.gz.*\(1000000000, 28, 28\).*at most"):
        read_idx(p, 0x803)
    raw = str(tmp_path / "bad-images")
    open(raw, "wb").write(head + bytes(1000))
    with pytest.raises(DataError, match=r"bad-images.*declares shape.*1016 bytes"):
        read_idx(raw, 0x803)


def test_idx_footer_size_mismatch(tmp_path):
    p = str(tmp_path / "x.gz")
    with gzip.open(p, "wb") as f:  # header says 5 labels, data has 3
        f.write(struct.pack(">II", 0x801, 5) + bytes(3))
    with pytest.raises(DataError, match="x.gz.*gzip footer"):
        read_idx(p, 0x801)


def test_idx_missing_file_and_count_mismatch(tmp_path):
    make_idx_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*Expected layout"):
        load_dataset("fashion_mnist", tmp_path)
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(11, np.uint8), 0x801)
    with pytest.raises(DataError, match="12 images.*11 labels"):
        load_dataset("fashion_mnist", tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(12, 10, np.uint8), 0x801)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: label 10"):
        load_dataset("fashion_mnist", tmp_path)


def test_fashion_mnist_missing_default_dir_mentions_package(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_dataset("fashion_mnist", tmp_path / "nowhere")


FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_debian_package():
    ds = load_dataset("fashion_mnist")
    assert (ds.num_train, ds.num_test) == (60000, 10000)
    assert ds.input_shape == (1, 28, 28)
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class
    np.testing.assert_array_equal(np.bincount(ds.y), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 1000))
    assert 0.27 < ds.meta["mean"][0] < 0.30  # the published mean pixel (0.286)
    assert abs(float(ds.x[:2000].mean())) < 0.1
    # independent reading, as the dataset's own mnist_reader does: skip the 8/16-byte header
    with gzip.open(os.path.join(FASHION, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    with gzip.open(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    np.testing.assert_array_equal(ds.y_test, labels)
    m, sd = ds.meta["mean"][0], ds.meta["std"][0]
    np.testing.assert_allclose(ds.x_test[:500, 0], (images[:500] / 255.0 - m) / sd, atol=1e-5)


# ---------------------------------------------------------------- bundled


def test_mnist_small_is_mlxtends_5000_images():
    ds = load_dataset("mnist_small", normalize="unit", seed=3)
    assert ds.num_train + ds.num_test == 5000
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    counts = np.bincount(ds.y, minlength=10) + np.bincount(ds.y_test, minlength=10)
    np.testing.assert_array_equal(counts, np.full(10, 500))
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 100))  # stratified 20 %
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    again = load_dataset("mnist_small", normalize="unit", seed=3)
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    other = load_dataset("mnist_small", normalize="unit", seed=4)
    assert not np.array_equal(ds.y_test, other.y_test) or not np.array_equal(ds.x_test,
                                                                              other.x_test)


def test_digits_loads():
    ds = load_dataset("digits", test_fraction=0.25)
    assert ds.num_train + ds.num_test == 1797 and ds.input_shape == (1, 8, 8)
    assert abs(float(ds.x.mean())) < 1e-5


# ---------------------------------------------------------------- LEAF / FEMNIST


def test_femnist_leaf_json_natural_groups(tmp_path):
    wtr, wte = make_leaf_dir(tmp_path)
    ds = load_dataset("femnist", tmp_path, normalize="unit")
    assert ds.num_train == 21 and ds.num_test == 6 and ds.num_classes == 62
    assert ds.group_names == ("f0000_14", "f0001_41", "f0002_03")
    for gi, w in enumerate(ds.group_names):
        sel = ds.groups == gi
        np.testing.assert_allclose(ds.x[sel].reshape(-1, 784), wtr[w][0], atol=1e-6)
        np.testing.assert_array_equal(ds.y[sel], wtr[w][1])
    np.testing.assert_array_equal(ds.y_test, np.concatenate([wte[w][1] for w in wte]))
    # row-major 28x28: pixel 30 of the flat vector is row 1, column 2
    assert ds.x[0, 0, 1, 2] == pytest.approx(wtr["f0000_14"][0][0, 30], abs=1e-6)
    assert ds.class_names[10] == "A" and ds.class_names[36] == "a"


def test_femnist_all_data_split_per_writer(tmp_path):
    rng = np.random.default_rng(1)
    os.makedirs(tmp_path / "all_data")
    ws = {f"w{i}": (rng.random((10, 784)), rng.integers(0, 62, 10)) for i in range(4)}
    (tmp_path / "all_data" / "all_data_0.json").write_text(json.dumps(leaf_doc(ws)))
    ds = load_dataset("femnist", tmp_path, test_fraction=0.2, seed=5)
    assert ds.num_train == 32 and ds.num_test == 8
    np.testing.assert_array_equal(np.bincount(ds.groups), [8, 8, 8, 8])


@pytest.mark.parametrize("corruption,pattern", [
    ("truncate", "not valid JSON"),
    ("num_samples", "declares num_samples=8"),
    ("row_length", "not 784 values"),
    ("label", "labels outside"),
    ("pixels", r"outside \[0, 1\]"),
])
def test_femnist_corruptions_name_the_file(tmp_path, corruption, pattern):
    make_leaf_dir(tmp_path)
    p = tmp_path / "train" / "all_data_0_train.json"
    if corruption == "truncate":
        p.write_bytes(p.read_bytes()[:-100])
    else:
        doc = json.loads(p.read_text())
        u = doc["users"][0]
        if corruption == "num_samples":
            doc["num_samples"][0] = 8
        elif corruption == "row_length":
            doc["user_data"][u]["x"][1] = doc["user_data"][u]["x"][1][:783]
        elif corruption == "label":
            doc["user_data"][u]["y"][0] = 62
        else:
            doc["user_data"][u]["x"][0][0] = 255.0
        p.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="all_data_0_train.json.*" + pattern):
        load_dataset("femnist", tmp_path)


def test_femnist_missing_parts(tmp_path):
    make_leaf_dir(tmp_path)
    for f in os.listdir(tmp_path / "test"):
        os.remove(tmp_path / "test" / f)
    os.rmdir(tmp_path / "test")
    with pytest.raises(DataError, match="missing directory .*test"):
        load_dataset("femnist", tmp_path)
    with pytest.raises(DataError, match="train/, test/ or all_data/"):
        load_dataset("femnist", tmp_path / "train")


# ---------------------------------------------------------------- CIFAR-10 binary


def test_cifar10_binary_records(tmp_path):
    d, planes = make_cifar_dir(tmp_path)
    ds = load_dataset("cifar10", tmp_path, normalize="unit")
    assert (ds.num_train, ds.num_test) == (15, 3) and ds.input_shape == (3, 32, 32)
    for i, name in enumerate(f"data_batch_{k}.bin" for k in range(1, 6)):
        for j in range(3):
            label, r, g, b = planes[(name, j)]
            n = i * 3 + j
            assert ds.y[n] == label
            for c, plane in enumerate((r, g, b)):
                np.testing.assert_array_equal(ds.x[n, c] * 255.0, plane.astype(np.float32))
    label, r, g, b = planes[("test_batch.bin", 2)]
    assert ds.y_test[2] == label
    np.testing.assert_array_equal(ds.x_test[2, 2] * 255.0, b.astype(np.float32))
    assert ds.class_names[0] == "airplane"
    # the directory itself works as the path too; standard normalisation per channel
    ds2 = load_dataset("cifar10", d)
    assert len(ds2.meta["mean"]) == 3
    np.testing.assert_allclose(ds2.x.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)


def test_cifar10_corruptions_name_the_file(tmp_path):
    d, _ = make_cifar_dir(tmp_path)
    p = os.path.join(d, "data_batch_3.bin")
    blob = open(p, "rb").read()
    open(p, "wb").write(blob[:-7])
    with pytest.raises(DataError, match="data_batch_3.bin.*whole number of 3073-byte records"):
        load_dataset("cifar10", tmp_path)
    open(p, "wb").write(bytes([10]) + blob[1:])
    with pytest.raises(DataError, match="data_batch_3.bin: record 0 has label 10"):
        load_dataset("cifar10", tmp_path)
    open(p, "wb").write(blob)
    os.remove(os.path.join(d, "test_batch.bin"))
    with pytest.raises(DataError, match="test_batch.bin.*3073-byte records"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_pickle_version_refused(tmp_path):
    os.makedirs(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04junk")
    with pytest.raises(DataError, match="pickle"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------- Speech Commands


def test_dct_matrix_matches_scipy():
    from scipy.fft import dct

    from fl_core.data.speech import dct_matrix

    v = np.random.default_rng(0).normal(size=(5, 40))
    np.testing.assert_allclose(v @ dct_matrix(40).T, dct(v, type=2, norm="ortho", axis=1),
                               atol=1e-12)


def test_mel_filterbank_places_tones_in_the_right_band():
    from fl_core.data.speech import mel_filterbank

    fb = mel_filterbank()
    assert fb.shape == (40, 241) and (fb.max(axis=1) > 0.3).all()  # no empty filter
    # HTK mel centres, derived here from the formula
    mel = np.linspace(2595 * np.log10(1 + 20 / 700), 2595 * np.log10(1 + 8000 / 700), 42)
    centres = 700 * (10 ** (mel[1:-1] / 2595) - 1)
    for m in (5, 17, 30):
        f = centres[m]
        spec = np.abs(np.fft.rfft(tone(f, 480).astype(float) * np.hanning(480)))
        assert int(np.argmax(fb @ spec**2)) in (m - 1, m, m + 1)


def test_speech_features_match_scipy_stft():
    from scipy.signal import get_window, stft

    from fl_core.data.speech import features, mel_filterbank

    rng = np.random.default_rng(0)
    clip = rng.normal(0, 0.1, 16000).astype(np.float32)
    win = get_window("hann", 480)  # periodic Hann
    _, _, z = stft(clip.astype(np.float64), window=win, nperseg=480, noverlap=160,
                   boundary="even", padded=False, scaling="spectrum")
    power = np.abs(z * win.sum()) ** 2  # undo scipy's 1/sum(window) scaling
    assert power.shape == (241, 51)
    expect = np.log(mel_filterbank() @ power + 1e-6)
    got = features(clip[None], "logmel")[0]
    assert got.shape == (40, 51)
    np.testing.assert_allclose(got, expect, rtol=1e-3, atol=1e-3)
    from scipy.fft import dct
    np.testing.assert_allclose(features(clip[None], "mfcc")[0],
                               dct(expect, norm="ortho", axis=0), rtol=1e-3, atol=2e-3)


def test_speech_time_axis():
    from fl_core.data.speech import features

    clip = np.zeros(16000, np.float32)
    clip[8000:] = tone(1000, 8000) / 32768.0
    f = features(clip[None], "logmel")[0]
    energy = f.max(axis=0)
    assert energy[:23].max() < energy[28:].min() - 5  # silence then tone, frame hop 20 ms


def test_speech_commands_folders_lists_and_speakers(tmp_path):
    words, speakers = make_speech_dir(tmp_path)
    ds = load_dataset("speech_commands", tmp_path)
    assert ds.class_names == ("no", "up", "yes")  # word folders, sorted; _background_ ignored
    assert ds.input_shape == (1, 40, 51) and ds.x.dtype == np.float32
    assert ds.num_test == 3 and ds.num_train == 15
    np.testing.assert_array_equal(np.sort(ds.y_test), [0, 1, 2])
    assert ds.group_names == tuple(sorted(speakers))
    np.testing.assert_array_equal(np.bincount(ds.groups), [6, 6, 3])
    np.testing.assert_allclose(ds.x.mean(axis=(0, 1, 3)), 0.0, atol=1e-4)  # per coefficient
    # each word is a different tone: a nearest-class-mean classifier separates test clips
    means = np.stack([ds.x[ds.y == c].mean(axis=0) for c in range(3)])
    pred = np.argmin(((ds.x_test[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4)), axis=1)
    np.testing.assert_array_equal(pred, ds.y_test)
    dropped = load_dataset("speech_commands", tmp_path, validation="drop", words=["yes", "up"])
    assert dropped.class_names == ("yes", "up") and dropped.num_train == 9
    unk = load_dataset("speech_commands", tmp_path, words=["yes"], unknown=True,
                       features_kind="logmel")
    assert unk.class_names == ("yes", "_unknown_")
    np.testing.assert_array_equal(np.bincount(unk.y), [5, 10])


def test_speech_commands_feature_cache(tmp_path):
    from scipy.io import wavfile

    root, cache = tmp_path / "sc", tmp_path / "cache"
    os.makedirs(root)
    make_speech_dir(root)
    first = load_speech_commands_cached(root, cache)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".npz")
    again = load_speech_commands_cached(root, cache)
    np.testing.assert_array_equal(first.x, again.x)
    np.testing.assert_array_equal(first.x_test, again.x_test)
    # a changed clip changes the key: features are recomputed, not served stale
    wavfile.write(root / "yes" / "0a7c2a8d_nohash_0.wav", 16000, tone(5000, 16000))
    changed = load_speech_commands_cached(root, cache)
    assert len(os.listdir(cache)) == 2
    assert not np.array_equal(changed.x, first.x)
    # an unreadable cache file is rebuilt
    for f in os.listdir(cache):
        (cache / f).write_bytes(b"garbage")
    rebuilt = load_speech_commands_cached(root, cache)
    np.testing.assert_array_equal(rebuilt.x, changed.x)


def load_speech_commands_cached(root, cache):
    return load_dataset("speech_commands", root, cache_dir=str(cache))


def test_speech_commands_corruptions_name_the_file(tmp_path):
    from scipy.io import wavfile

    make_speech_dir(tmp_path)
    bad = tmp_path / "no" / "1b4c9f00_nohash_0.wav"
    wavfile.write(bad, 8000, tone(100, 8000))
    with pytest.raises(DataError, match="1b4c9f00_nohash_0.wav.*rate=8000"):
        load_dataset("speech_commands", tmp_path)
    wavfile.write(bad, 16000, np.stack([tone(100), tone(100)], axis=1))
    with pytest.raises(DataError, match="1b4c9f00_nohash_0.wav.*channels=2"):
        load_dataset("speech_commands", tmp_path)
    wavfile.write(bad, 16000, tone(100))
    bad.write_bytes(bad.read_bytes()[:20000])
    with pytest.raises(DataError, match="1b4c9f00_nohash_0.wav.*truncated"):
        load_dataset("speech_commands", tmp_path)
    bad.write_bytes(b"not a wav at all")
    with pytest.raises(DataError, match="1b4c9f00_nohash_0.wav: not a RIFF/WAVE"):
        load_dataset("speech_commands", tmp_path)
    wavfile.write(bad, 16000, tone(100))
    os.rename(bad, tmp_path / "no" / "speaker1.wav")
    with pytest.raises(DataError, match="speaker1.wav.*<speaker>_nohash_<n>.wav"):
        load_dataset("speech_commands", tmp_path)
    os.rename(tmp_path / "no" / "speaker1.wav", bad)
    os.remove(tmp_path / "up" / "c50f55b8_nohash_1.wav")
    with pytest.raises(DataError, match="testing_list.txt lists up/c50f55b8_nohash_1.wav"):
        load_dataset("speech_commands", tmp_path)
    os.remove(tmp_path / "testing_list.txt")
    with pytest.raises(DataError, match="missing file .*testing_list.txt"):
        load_dataset("speech_commands", tmp_path)


# ---------------------------------------------------------------- synthetic


def test_synthetic_follows_fedprox_generator():
    a = load_dataset("synthetic", alpha=1.0, beta=1.0, seed=7)
    b = load_dataset("synthetic", alpha=1.0, beta=1.0, seed=7)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.input_shape == (60,) and a.num_classes == 10 and len(a.group_names) == 30
    sizes = np.bincount(a.groups)
    assert sizes.min() >= int(0.9 * 50)  # lognormal + 50 per device, 90 % train
    # iid: one W, b for every device and v = 0 -> x ~ N(0, diag(j^-1.2)), labels linear
    iid = load_dataset("synthetic", iid=True, seed=7, num_devices=40,
                       max_samples_per_device=400)
    xall = np.concatenate([iid.x, iid.x_test]).astype(np.float64)
    np.testing.assert_allclose(xall.var(axis=0), np.arange(1, 61) ** -1.2, rtol=0.2)
    assert abs(xall.mean(axis=0)).max() < 0.1
    def mean_device_label_entropy(ds):
        ent = []
        for g in range(len(ds.group_names)):
            c = np.bincount(ds.y[ds.groups == g], minlength=10)
            p = c[c > 0] / c.sum()
            ent.append(-(p * np.log(p)).sum())
        return float(np.mean(ent))

    # heterogeneous devices (alpha = beta = 1) each see a few classes; iid devices see many
    assert mean_device_label_entropy(a) < mean_device_label_entropy(iid) - 0.5


# ---------------------------------------------------------------- registry and record


def test_registry_errors():
    assert set(DATASETS) >= {"mnist_small", "digits", "fashion_mnist", "femnist", "cifar10",
                             "speech_commands", "synthetic"}
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*mnist_small"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown option.*colour.*allowed"):
        load_dataset("mnist_small", colour=True)
    with pytest.raises(DataError, match="cifar10.*needs a path"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="normalize"):
        load_dataset("digits", normalize="zscore")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", "/nonexistent/dir")


def test_dataset_record_validates():
    x = np.zeros((3, 1, 2, 2), np.float32)
    y = np.zeros(3, np.int64)
    with pytest.raises(TypeError, match="float32"):
        Dataset("t", x.astype(np.float64), y, x, y, 2, (1, 2, 2))
    with pytest.raises(ValueError, match="labels outside"):
        Dataset("t", x, y + 5, x, y, 2, (1, 2, 2))
    assert issubclass(DataError, ValueError)
