"""Data curation: hierarchical k-means, balanced sampling, chip embedding and the curated GeoParquet."""

from __future__ import annotations

import math

import geopandas as gpd
import pytest
import torch
import torch.nn.functional as F
from affine import Affine
from geopandas.testing import assert_geodataframe_equal
from rasterio.windows import Window
from shapely.geometry import Polygon, box

from geodino.data.curation import (
    HierarchicalClusters,
    balanced_sample,
    curate,
    embed_chips,
    hierarchical_kmeans,
)
from geodino.data.synthetic import make_scene
from geodino.data.tiling import RasterTiler
from geodino.io import write_geoparquet

N_TRUE = 20  # true clusters of the mixture


@pytest.fixture(scope="module")
def mixture() -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian clusters in 32-D, 20 to 2000 points each: ``x [N, 32]``, truth ``[N]``."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.round(20 * 100 ** (torch.arange(N_TRUE) / (N_TRUE - 1))).long()
    centres = F.normalize(torch.randn(N_TRUE, 32, generator=g), dim=1)
    truth = torch.repeat_interleave(torch.arange(N_TRUE), sizes)
    x = centres[truth] + 0.05 * torch.randn(len(truth), 32, generator=g)
    # scale each point: clustering works on directions (the embeddings are L2-normalised first)
    x = x * torch.empty(len(x), 1).uniform_(0.5, 3, generator=g)
    return x, truth


@pytest.fixture(scope="module")
def clusters(mixture: tuple[torch.Tensor, torch.Tensor]) -> HierarchicalClusters:
    return hierarchical_kmeans(mixture[0], (100, N_TRUE), seed=0)


def contingency(assignment: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Points per (cluster, true cluster) pair."""
    table = torch.zeros(int(assignment.max()) + 1, int(truth.max()) + 1, dtype=torch.int64)
    return table.index_put_((assignment, truth), torch.ones_like(truth), accumulate=True)


def entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


# ---------------------------------------------------------------------------------- hierarchical k-means


def test_hierarchical_kmeans_recovers_true_clusters(clusters: HierarchicalClusters, mixture) -> None:
    _, truth = mixture
    assert clusters.levels == (100, N_TRUE)
    table = contingency(clusters.assignment(2), truth)
    # one-to-one: each top-level cluster holds exactly one true cluster, whole
    assert ((table > 0).sum(0) == 1).all() and ((table > 0).sum(1) == 1).all()
    # every level-1 cluster is pure too (an over-segmentation of the truth)
    assert ((contingency(clusters.assignment(1), truth) > 0).sum(1) <= 1).all()


def test_levels_nest_and_centroids_are_member_means(mixture) -> None:
    x, _ = mixture
    hc = hierarchical_kmeans(x, (60, 12, 4), n_resampling=(0, 0, 0), seed=1)
    a1, a2, a3 = (hc.assignment(level) for level in (1, 2, 3))
    for fine, coarse, k in ((a1, a2, 60), (a2, a3, 12)):
        pairs = torch.unique(fine * 1000 + coarse)  # points of one fine cluster share one coarse cluster
        assert len(pairs) == len(torch.unique(fine)) <= k
    for level, k in enumerate(hc.levels, start=1):
        assert torch.equal(hc.sizes(level), torch.bincount(hc.assignment(level), minlength=k))
        assert int(hc.sizes(level).sum()) == len(x)
    # after the last Lloyd step, each centroid is the mean of its members (points, then centroids below)
    members = (F.normalize(x, dim=1), *hc.centroids[:-1])
    for labels, points, centroids in zip(hc.labels, members, hc.centroids, strict=True):
        counts = torch.bincount(labels, minlength=len(centroids))
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        full = counts > 0
        assert full.sum() >= len(centroids) - 1
        torch.testing.assert_close(sums[full] / counts[full, None], centroids[full], atol=1e-5, rtol=1e-4)


def test_hierarchical_kmeans_is_deterministic_by_seed(mixture) -> None:
    x, _ = mixture
    runs = [hierarchical_kmeans(x[::3], (40, 10), seed=s) for s in (5, 5, 6)]
    for a, b in zip(runs[0].labels + runs[0].centroids, runs[1].labels + runs[1].centroids, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0].centroids[0], runs[2].centroids[0])


def rings(scale: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's toy data set: 5 rings of 20000, 200, 1000, 500, 8000 points (divided by ``scale``).

    A constant third coordinate keeps the 2-D layout after L2 normalisation (a central projection).
    """
    g = torch.Generator().manual_seed(0)
    spec = [(20000, -2.2, 1.0), (200, 0.0, 1.0), (1000, 2.2, 1.0), (500, -1.2, 0.2), (8000, 1.2, 0.2)]
    points, truth = [], []
    for i, (n, cx, cy) in enumerate(spec):
        r = torch.rand(n // scale, generator=g) * 0.3 + 0.7
        angle = torch.rand(n // scale, generator=g) * 2 * math.pi
        points.append(torch.stack([r * angle.cos() + cx, r * angle.sin() + cy, torch.full_like(r, 10)], 1))
        truth.append(torch.full_like(r, i, dtype=torch.int64))
    return torch.cat(points), torch.cat(truth)


def test_resampling_moves_top_clusters_out_of_the_dense_ring() -> None:
    x, truth = rings()

    def clusters_on_largest_ring(n_resampling: tuple[int, int], seed: int) -> int:
        hc = hierarchical_kmeans(x, (150, 30), n_resampling=n_resampling, seed=seed)
        ring = contingency(hc.assignment(2), truth).argmax(1)  # majority ring of each top cluster
        return int(((ring == 0) & (hc.sizes(2) > 0)).sum())

    plain = sum(clusters_on_largest_ring((0, 0), seed) for seed in range(3))
    resampled = sum(clusters_on_largest_ring((0, 10), seed) for seed in range(3))
    # the largest ring has 67 % of the points; plain k-means gives it about a third of the top clusters
    assert resampled < plain


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"levels": (50, 50)}, "strictly decreasing"),
        ({"levels": (10, 20)}, "strictly decreasing"),
        ({"levels": ()}, "strictly decreasing"),
        ({"levels": (500, 10)}, "cannot make 500 level-1 clusters from 300 points"),
        ({"levels": (30, 10), "n_resampling": (0,)}, "one entry per level"),
        ({"levels": (30, 10), "n_iter": 0}, "n_iter"),
    ],
)
def test_hierarchical_kmeans_rejects_bad_levels(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hierarchical_kmeans(torch.randn(300, 8), **kwargs)


def test_hierarchical_kmeans_rejects_bad_embeddings() -> None:
    x = torch.randn(300, 8)
    x[17, 3] = float("nan")
    with pytest.raises(ValueError, match=r"1 of 300 embeddings contain NaN or inf \(first at row 17\)"):
        hierarchical_kmeans(x, (30, 10))
    with pytest.raises(ValueError, match=r"float \[N, D\]"):
        hierarchical_kmeans(torch.randn(300), (30, 10))
    with pytest.raises(ValueError, match=r"float \[N, D\]"):
        hierarchical_kmeans(torch.ones(300, 8, dtype=torch.int64), (30, 10))


# ---------------------------------------------------------------------------------- balanced sampling


def test_balanced_sample_is_far_more_even_than_uniform(clusters: HierarchicalClusters, mixture) -> None:
    _, truth = mixture
    picked = balanced_sample(clusters, 1000, seed=0)
    assert len(picked) == 1000 and len(torch.unique(picked)) == 1000
    assert torch.equal(picked, picked.sort().values)
    balanced = torch.bincount(truth[picked], minlength=N_TRUE)
    uniform_pick = torch.randperm(len(truth), generator=torch.Generator().manual_seed(0))[:1000]
    uniform = torch.bincount(truth[uniform_pick], minlength=N_TRUE)
    # 1000 / 20 = 50 each; the 4 smallest clusters (20-41 points) give all they have, the rest ~56 each
    assert balanced.min() == 20 and balanced.max() <= 57
    assert uniform.min() <= 5 and uniform.max() >= 180
    assert entropy(balanced) > 0.99 * math.log(N_TRUE) > entropy(uniform) + 0.3


def test_balanced_sample_is_deterministic_by_seed(clusters: HierarchicalClusters) -> None:
    a, b, c = (balanced_sample(clusters, 500, seed=s) for s in (3, 3, 4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def nested(level1_sizes: list[int], parents: list[int]) -> HierarchicalClusters:
    """Two-level clusters with the given level-1 cluster sizes and level-2 parent of each level-1 cluster."""
    labels = torch.repeat_interleave(torch.arange(len(level1_sizes)), torch.tensor(level1_sizes))
    k2 = max(parents) + 1
    return HierarchicalClusters(
        labels=(
            labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))],
            torch.tensor(parents),
        ),
        centroids=(torch.zeros(len(level1_sizes), 2), torch.zeros(k2, 2)),
    )


def test_balanced_sample_water_fills_each_level() -> None:
    hc = nested([2, 10, 30, 6, 6], parents=[0, 0, 0, 1, 1])  # top clusters of 42 and 12 points
    counts = torch.bincount(hc.labels[0][balanced_sample(hc, 20)], minlength=5)
    # 10 per top cluster; in the first, the 2-point child gives its 2, the others 4 each
    assert counts.tolist() == [2, 4, 4, 5, 5]
    # 23 = 11 + 12 or 12 + 11; the one left over after an even split goes to a random child
    outcomes = {
        tuple(torch.bincount(hc.labels[0][balanced_sample(hc, 23, seed=s)]).tolist()) for s in range(6)
    }
    assert len(outcomes) > 1
    assert outcomes <= {(2, 5, 4, 6, 6), (2, 4, 5, 6, 6), (2, 5, 5, 5, 6), (2, 5, 5, 6, 5)}
    assert torch.equal(balanced_sample(hc, 54), torch.arange(54))
    assert len(balanced_sample(hc, 0)) == 0


def test_balanced_sample_rejects_more_points_than_the_pool(clusters: HierarchicalClusters) -> None:
    with pytest.raises(ValueError, match=r"cannot draw n=9221 distinct points from a pool of 9220"):
        balanced_sample(clusters, 9221)
    with pytest.raises(ValueError, match="n=-1"):
        balanced_sample(clusters, -1)


# ---------------------------------------------------------------------------------- chips


@pytest.fixture(scope="module")
def tiler(tmp_path_factory: pytest.TempPathFactory) -> RasterTiler:
    path = tmp_path_factory.mktemp("curation") / "scene.tif"
    make_scene(path, size=256, seed=3)
    return RasterTiler(path, size=32)  # 64 chips of 19 m, some in the nodata collar


def band_stats(batch: torch.Tensor) -> torch.Tensor:
    """A stand-in backbone: per-band mean and standard deviation of reflectance, ``[B, 2C]``."""
    reflectance = batch / 10_000
    return torch.cat([reflectance.mean((2, 3)), reflectance.std((2, 3))], 1)


def footprint(transform: Affine, window: Window) -> Polygon:
    """Footprint of a window in the raster CRS (north-up raster)."""
    x0, y0 = transform.c + window.col_off * transform.a, transform.f + window.row_off * transform.e
    x1, y1 = x0 + window.width * transform.a, y0 + window.height * transform.e
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def chip_table(tiler: RasterTiler) -> gpd.GeoDataFrame:
    """The contract's chip table of a tiler's windows, footprints in EPSG:4326."""
    windows = tiler.windows
    return gpd.GeoDataFrame(
        {
            "raster": str(tiler.path),
            "col_off": [int(w.col_off) for w in windows],
            "row_off": [int(w.row_off) for w in windows],
            "width": [int(w.width) for w in windows],
            "height": [int(w.height) for w in windows],
            "crs": tiler.crs.to_wkt(),
        },
        geometry=[footprint(tiler.transform, w) for w in windows],
        crs=tiler.crs,
    ).to_crs("EPSG:4326")


def test_embed_chips_runs_the_callable_over_every_chip(tiler: RasterTiler) -> None:
    def embed(batch: torch.Tensor) -> torch.Tensor:
        assert torch.is_inference_mode_enabled() and batch.dtype == torch.float32
        return band_stats(batch)

    emb = embed_chips(tiler, embed, batch_size=7, progress=False)
    assert emb.shape == (64, 8) and emb.dtype == torch.float32
    for i in (0, 37, 63):
        image = torch.from_numpy(tiler[i].image.astype("float32"))[None]
        torch.testing.assert_close(emb[i], band_stats(image)[0])
    tensors = [torch.from_numpy(tiler[i].image.astype("int32")) for i in range(len(tiler))]
    torch.testing.assert_close(embed_chips(tensors, band_stats, batch_size=64, progress=False), emb)
    torch.testing.assert_close(embed_chips(tiler, band_stats, num_workers=1, progress=False), emb)
    with pytest.raises(ValueError, match=r"to \[7, D\], got \(7, 4, 32, 32\)"):
        embed_chips(tiler, lambda b: b, batch_size=7, progress=False)


def test_curate_selects_balanced_chips_and_roundtrips(tiler: RasterTiler, tmp_path) -> None:
    table = chip_table(tiler)
    emb = embed_chips(tiler, band_stats, progress=False)
    curated = curate(table, emb, 16, levels=(12, 4), seed=0)
    assert len(curated) == 16 and curated.index.is_unique and set(curated.index) <= set(table.index)
    assert list(curated.columns) == [*table.columns, "cluster_l1", "cluster_l2"]
    assert_geodataframe_equal(curated[table.columns], table.loc[curated.index])
    # the same selection as the two steps by hand; every top-level cluster is represented
    hc = hierarchical_kmeans(emb, (12, 4), seed=0)
    picked = balanced_sample(hc, 16, seed=0)
    assert curated.index.tolist() == picked.tolist()
    assert curated["cluster_l2"].tolist() == hc.assignment(2)[picked].tolist()
    assert curated["cluster_l2"].nunique() == int((hc.sizes(2) > 0).sum())

    path = write_geoparquet(curated, tmp_path / "curated.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["curated.parquet"]  # no temporary file left
    back = gpd.read_parquet(path)
    assert back.crs.to_epsg() == 4326
    assert_geodataframe_equal(back, curated)


def test_curate_rejects_mismatched_tables(tiler: RasterTiler) -> None:
    table = chip_table(tiler)
    emb = embed_chips(tiler, band_stats, progress=False)
    with pytest.raises(ValueError, match="64 chips but 63 embeddings"):
        curate(table, emb[:63], 8, levels=(8, 2))
    with pytest.raises(ValueError, match=r"lacks the columns \['crs'\]"):
        curate(table.drop(columns="crs"), emb, 8, levels=(8, 2))
    with pytest.raises(ValueError, match="cannot draw n=65"):
        curate(table, emb, 65, levels=(8, 2))
