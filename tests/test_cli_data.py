"""`geodino index` and `geodino sample` on real rasters: files written, errors named, nothing partial."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import shared_path
from rasterio.windows import Window

from geodino.cli import main
from geodino.data import RasterCorpus

RGB_RASTERS = ("RGB.byte.tif", "cogeo.tif", "rgb16.tif")


def _rasters() -> list[str]:
    folder = shared_path("data", "rasters")
    return [str(folder / name) for name in RGB_RASTERS]


def test_index_then_sample_writes_a_chip_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus_path, chips_path = tmp_path / "corpus.parquet", tmp_path / "chips.parquet"
    assert main(["index", *_rasters(), "--out", str(corpus_path)]) == 0
    corpus = RasterCorpus.load(corpus_path)
    assert sorted(Path(p).name for p in corpus.index["raster"]) == sorted(RGB_RASTERS)

    assert main(["sample", str(corpus_path), "--n", "60", "--size", "128", "--out", str(chips_path)]) == 0
    assert "60 chips of 128 px" in capsys.readouterr().out
    table = gpd.read_parquet(chips_path)
    assert len(table) == 60
    assert table.crs.to_epsg() == 4326
    assert (table[["width", "height"]] == 128).all().all()
    # every chip is a real window of its raster with at most half nodata (the default)
    for row in table.itertuples():
        with rasterio.open(row.raster) as src:
            window = Window(row.col_off, row.row_off, row.width, row.height)
            assert row.col_off >= 0 and row.col_off + row.width <= max(src.width, row.width)
            mask = src.read_masks(1, window=window, boundless=True) > 0
            assert mask.mean() >= 0.5 - 0.05  # coarse-map tolerance
    # same seed, same chips
    again = tmp_path / "again.parquet"
    assert main(["sample", str(corpus_path), "--n", "60", "--size", "128", "--out", str(again)]) == 0
    np.testing.assert_array_equal(
        gpd.read_parquet(again)[["col_off", "row_off"]], table[["col_off", "row_off"]]
    )
    # mixed-up files get one line each, and nothing overwrites an input
    capsys.readouterr()
    corpus_, chips_, out = str(corpus_path), str(chips_path), str(tmp_path / "c.parquet")
    sample = ["--n", "5", "--size", "128", "--out"]
    store_file = tmp_path / "file.zarr"
    store_file.touch()
    mixups = {
        ("sample", chips_, *sample, out): "not a RasterCorpus file",
        ("sample", corpus_, *sample, corpus_): "is an input of this command",
        ("curate", chips_, "--candidates", "8", "--keep", "2", "--out", out): "not a RasterCorpus file",
        ("chips", corpus_, "--corpus", chips_, "--out", str(tmp_path / "s.zarr")): "not a RasterCorpus file",
        (
            "chips",
            chips_,
            "--corpus",
            corpus_,
            "--out",
            str(store_file),
        ): "is a file; a chip store is a folder",
    }
    for command, message in mixups.items():
        assert main(list(command)) == 2, command
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, command
    with pytest.raises(SystemExit):  # argparse: usage and the reason
        main(["index", _rasters()[0], "--gsd", "0", "--out", out])
    assert "must be a number above 0" in capsys.readouterr().err
    assert RasterCorpus.load(corpus_path).index.equals(corpus.index)


def test_index_reports_mixed_band_counts_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = shared_path("data", "rasters")
    out = tmp_path / "corpus.parquet"
    assert main(["index", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bands" in err and "select common bands" in err
    assert not out.exists()


def test_bad_outputs_and_inputs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rasters = _rasters()
    assert main(["index", rasters[0], "--out", str(tmp_path / "corpus.csv")]) == 2
    assert main(["index", rasters[0], "--out", str(tmp_path / "missing" / "c.parquet")]) == 2
    assert (
        main(["sample", str(tmp_path / "nope.parquet"), "--n", "5", "--out", str(tmp_path / "c.parquet")])
        == 2
    )
    bad = tmp_path / "broken.tif"
    bad.write_bytes(Path(rasters[0]).read_bytes()[:3000])
    assert main(["index", str(bad), "--out", str(tmp_path / "c.parquet")]) == 2
    err = capsys.readouterr().err
    assert ".parquet file name" in err and "does not exist" in err and "geodino index" in err
    assert str(bad) in err
    assert not list(tmp_path.glob("*.parquet"))


def test_curate_then_chips_materialises_a_balanced_store(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from geodino.data import ChipStore

    corpus_path = tmp_path / "corpus.parquet"
    curated_path, store_path = tmp_path / "curated.parquet", tmp_path / "chips.zarr"
    assert main(["index", *_rasters(), "--out", str(corpus_path)]) == 0
    args = ["--candidates", "40", "--keep", "12", "--levels", "6", "3", "--size", "64", "--embed-size", "32"]
    assert main(["curate", str(corpus_path), *args, "--batch-size", "20", "--out", str(curated_path)]) == 0
    curated = gpd.read_parquet(curated_path)
    assert len(curated) == 12
    assert {"cluster_l1", "cluster_l2"} <= set(curated.columns)
    assert curated["cluster_l2"].nunique() == 3  # balanced: every top-level cluster contributes

    assert main(["chips", str(curated_path), "--corpus", str(corpus_path), "--out", str(store_path)]) == 0
    store = ChipStore(store_path)
    assert len(store) == 12
    corpus = RasterCorpus.load(corpus_path)
    for i, ref in enumerate(corpus.refs(curated)):
        chip, source = store[i], corpus.read(ref)
        np.testing.assert_array_equal(chip.image, source.image.astype(chip.image.dtype))
        np.testing.assert_array_equal(chip.valid, source.valid)
        assert chip.transform == source.transform
    assert "12 chips" in capsys.readouterr().out
    # a store name that is not .zarr is refused before anything is written
    assert (
        main(["chips", str(curated_path), "--corpus", str(corpus_path), "--out", str(tmp_path / "x.tif")])
        == 2
    )
