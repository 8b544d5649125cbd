"""Cache files check themselves: each way a real file goes bad is caught, named and rebuilt.

Every case writes a corrupted file into a fresh cache dir, loads through the owner
(`encode_texts`, `fixed_prototypes`), and expects one CacheRebuiltWarning naming the file and
the reason, then a result equal to a freshly built one and a file that loads cleanly again.
"""
from __future__ import annotations

import json
import re
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xxhash

from hpn import cache_files, encode, prototypes
from hpn.cache_files import CacheRebuiltWarning
from hpn.config import EncoderConfig, load_config
from hpn.data import load_corpus
from hpn.errors import DataError
from hpn.prototypes import fixed_prototypes
from hpn.train import PreparedData, train

TEXTS = [
    "A marine biologist who studies coral reefs.",
    "A tax lawyer who writes about corporate law.",
    "A retired teacher who volunteers at the library.",
]
PROTOS = {"count": 5, "dim": 8, "seed": 1}  # a regular simplex: max cosine -1/4

Corrupt = Callable[[Path, np.ndarray], None]


def write_raw(path: Path, header: dict, array: np.ndarray) -> None:
    """Write the cache format by hand (a JSON line, then .npy bytes), checksum made to fit."""
    header = {**header, "shape": list(array.shape), "dtype": str(array.dtype),
              "xxh3_128": xxhash.xxh3_128_hexdigest(np.ascontiguousarray(array).data)}
    with open(path, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n")
        np.lib.format.write_array(f, array)


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.readline())


def truncated(path: Path, good: np.ndarray) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path, good: np.ndarray) -> None:
    path.write_bytes(b"")


def random_bytes(path: Path, good: np.ndarray) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def same_shape_random_values(path: Path, good: np.ndarray) -> None:
    header = read_header(path)  # the old header stays, so only the checksum can tell
    with open(path, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n")
        rng = np.random.default_rng(0)
        np.lib.format.write_array(f, rng.standard_normal(good.shape).astype(np.float32))


def fewer_columns(path: Path, good: np.ndarray) -> None:
    write_raw(path, read_header(path), np.ascontiguousarray(good[:, : good.shape[1] // 2]))


def nan_values(path: Path, good: np.ndarray) -> None:
    bad = good.copy()
    bad[1, 3] = np.nan
    write_raw(path, read_header(path), bad)


def all_ones(path: Path, good: np.ndarray) -> None:
    write_raw(path, read_header(path), np.ones_like(good))


def all_zeros(path: Path, good: np.ndarray) -> None:
    write_raw(path, read_header(path), np.zeros_like(good))


def all_the_same_unit_vector(path: Path, good: np.ndarray) -> None:
    write_raw(path, read_header(path), np.full_like(good, 1.0 / np.sqrt(good.shape[1])))


def old_cache_without_header(path: Path, good: np.ndarray) -> None:
    path.unlink()
    np.save(path.with_suffix(".npy"), np.ones_like(good))  # what the probe trained on


UNREADABLE = [(truncated, "unreadable"), (empty, "unreadable"), (random_bytes, "unreadable"),
              (old_cache_without_header, "old cache without a header")]


# -- embeddings -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built_embeddings(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A valid embedding cache file and the array it holds, built once for the module."""
    cfg = EncoderConfig(cache_dir=str(tmp_path_factory.mktemp("built")))
    return encode.cache_path(cfg, TEXTS), encode.encode_texts(TEXTS, cfg)


def refuse_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was loaded although a valid cache is there")

    monkeypatch.setattr(encode, "TextEncoder", refuse)


@pytest.mark.parametrize("corrupt, reason", UNREADABLE + [
    (same_shape_random_values, "checksum mismatch"),
    (fewer_columns, "shape 3x192 float32, expected 3x384"),
    (nan_values, "holds NaN or inf (1 of "),
], ids=lambda v: getattr(v, "__name__", None))
def test_a_bad_embedding_cache_is_named_rebuilt_and_then_reused(
        corrupt: Corrupt, reason: str, built_embeddings, tmp_path, monkeypatch):
    built, fresh = built_embeddings
    cfg = EncoderConfig(cache_dir=str(tmp_path))
    path = encode.cache_path(cfg, TEXTS)
    path.parent.mkdir(parents=True)
    shutil.copy(built, path)
    corrupt(path, fresh)
    named = path if path.exists() else path.with_suffix(".npy")

    with pytest.warns(CacheRebuiltWarning, match=re.escape(f"{named}: {reason}")):
        rebuilt = encode.encode_texts(TEXTS, cfg)
    np.testing.assert_array_equal(rebuilt, fresh)
    assert sorted(path.parent.iterdir()) == [path]  # old file gone, no temporary left

    refuse_encoder(monkeypatch)  # the rebuilt file is whole again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(encode.encode_texts(TEXTS, cfg), rebuilt)


def test_a_valid_embedding_cache_is_used_without_loading_the_encoder(
        built_embeddings, monkeypatch):
    built, fresh = built_embeddings
    cfg = EncoderConfig(cache_dir=str(built.parent.parent))
    refuse_encoder(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(encode.encode_texts(TEXTS, cfg), fresh)


def test_an_embedding_file_of_other_texts_is_not_taken_for_these(built_embeddings, tmp_path):
    built, fresh = built_embeddings
    cfg = EncoderConfig(cache_dir=str(tmp_path))
    other = encode.cache_path(cfg, TEXTS[:2] + ["A chef."])
    other.parent.mkdir(parents=True)
    shutil.copy(built, other)  # e.g. copied between cache dirs under the wrong name
    with pytest.warns(CacheRebuiltWarning, match="header key is"):
        assert encode.encode_texts(TEXTS[:2] + ["A chef."], cfg)[2].tolist() != fresh[2].tolist()


# -- prototypes -----------------------------------------------------------------------------

@pytest.mark.parametrize("corrupt, reason", UNREADABLE + [
    (same_shape_random_values, "checksum mismatch"),
    (all_ones, "rows are not unit vectors"),
    (all_zeros, "rows are not unit vectors"),
    (all_the_same_unit_vector, "max pairwise cosine 1.0000 is worse than the recorded -0.2500"),
    (nan_values, "holds NaN or inf (1 of "),
], ids=lambda v: getattr(v, "__name__", None))
def test_a_bad_prototype_cache_is_named_and_rebuilt(corrupt: Corrupt, reason: str, tmp_path):
    fresh = fixed_prototypes(**PROTOS)
    fixed_prototypes(**PROTOS, cache_dir=tmp_path)
    path = tmp_path / "prototypes" / "count5_dim8_seed1.npyh"
    corrupt(path, fresh)
    named = path if path.exists() else path.with_suffix(".npy")

    with pytest.warns(CacheRebuiltWarning, match=re.escape(f"{named}: {reason}")):
        np.testing.assert_array_equal(fixed_prototypes(**PROTOS, cache_dir=tmp_path), fresh)
    assert sorted(path.parent.iterdir()) == [path]
    np.testing.assert_array_equal(cache_files.load(path, (5, 8)), fresh)


def test_a_valid_prototype_cache_is_used_without_recomputing(tmp_path, monkeypatch):
    fresh = fixed_prototypes(**PROTOS, cache_dir=tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although the prototypes are cached")

    monkeypatch.setattr(prototypes, "_simplex", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(fixed_prototypes(**PROTOS, cache_dir=tmp_path), fresh)


# -- writing --------------------------------------------------------------------------------

def test_parallel_writers_never_leave_a_header_beside_another_array(tmp_path):
    path = tmp_path / "shared.npyh"
    arrays = [np.full((64, 16), v, dtype=np.float32) for v in (1.0, 2.0)]
    stop = threading.Event()

    def write(array: np.ndarray) -> None:
        while not stop.is_set():
            cache_files.save(path, array, tag=float(array[0, 0]))

    writers = [threading.Thread(target=write, args=(a,)) for a in arrays]
    for w in writers:
        w.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any mismatch would warn
            seen = {float(got[0, 0]) for _ in range(300)
                    if (got := cache_files.load(path, (64, 16))) is not None}
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert seen <= {1.0, 2.0} and seen
    assert list(tmp_path.iterdir()) == [path]


def test_a_non_finite_array_is_never_written(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        cache_files.save(tmp_path / "x.npyh", np.array([[np.inf, 0.0]], dtype=np.float32))
    assert list(tmp_path.iterdir()) == []


# -- training -------------------------------------------------------------------------------

def bad_features(kind: str, n: int) -> np.ndarray:
    features = np.random.default_rng(0).standard_normal((n, 384)).astype(np.float32)
    if kind == "nan":
        features[5, 7] = np.nan
    elif kind == "inf":
        features[0, 0] = np.inf
    elif kind == "narrow":
        features = np.ascontiguousarray(features[:, :100])
    elif kind == "missing rows":
        features = features[:-1]
    return features


@pytest.mark.parametrize("kind, message", [
    ("nan", "1 of 600 rows hold NaN or inf"),
    ("inf", "1 of 600 rows hold NaN or inf"),
    ("narrow", "width 100 does not match encoder.name"),
    ("missing rows", r"shape \(599, 384\) does not fit 600 texts"),
])
def test_training_refuses_embeddings_it_must_not_learn_from(kind, message, tmp_path):
    cfg = load_config(None, ["data.size=600", "train.epochs=1", f"encoder.cache_dir={tmp_path}"])
    corpus = load_corpus(cfg.data)
    split = corpus.split(cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)
    data = PreparedData(corpus, split, bad_features(kind, len(corpus.texts)))
    with pytest.raises(DataError, match=f"^embeddings: {message}"):
        train(cfg, data)


def test_the_cli_refuses_nan_embeddings_with_exit_2_and_one_line(capsys, tmp_path, monkeypatch):
    import hpn.train
    from tuning.cli import main

    def nan_encoder(texts, cfg, device=None, progress=False):  # as an encoder that overflowed
        return np.full((len(texts), 384), np.nan, dtype=np.float32)

    monkeypatch.setattr(hpn.train, "encode_texts", nan_encoder)
    code = main(["train", "--set", "data.size=300", "--set", f"encoder.cache_dir={tmp_path}",
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == ("hpn-tune train: error: embeddings: 300 of 300 rows hold NaN or inf values "
                       "from encoder.name 'sentence-transformers/all-MiniLM-L6-v2'; refusing to "
                       "train on them")
