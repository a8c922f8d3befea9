"""Automatic data curation: hierarchical k-means over chip embeddings, then balanced sampling.

A raw pool of chips is dominated by a few kinds of scene (fields, forest, water) while rare ones
(quarries, harbours, glaciers) make up a tiny fraction. Vo et al. 2024, "Automatic Data Curation for
Self-Supervised Learning: A Clustering-Based Approach" (arXiv:2405.15613), the curation behind
DINOv2's and DINOv3's training sets, rebalances such a pool without labels:

1. :func:`embed_chips` embeds every chip with a backbone (any callable, e.g. pooled CLS features).
2. :func:`hierarchical_kmeans` clusters the L2-normalised embeddings into ``k1`` clusters, then the
   ``k1`` centroids into ``k2`` clusters, and so on. Plain k-means puts its centroids where the data
   is dense; each level up spreads them more evenly over the concepts, so the top level has about one
   cluster per concept whatever its frequency. An optional *resampling* step per level (re-running
   k-means on the few points closest to each centroid) spreads them further.
3. :func:`balanced_sample` splits the budget evenly among the top-level clusters, then recursively
   among each cluster's children, and finally draws points at random inside each level-1 cluster.
4. :func:`curate` does both on a chip table; save the result with :func:`geodino.io.write_geoparquet`.

We follow the authors' reference code, facebookresearch/ssl-data-curation (``src/kmeans_gpu.py``,
``src/hierarchical_kmeans_gpu.py``, ``src/hierarchical_sampling.py``,
``configs/4levels_web_based_images.yaml``), rewritten with batched torch operations.

Scale: the paper clustered 743M images with 4 levels of 10M, 500k, 50k and 10k clusters (about 74
images per level-1 cluster, then 20, 10 and 5 children per cluster). For a pool of about 10^5 chips the
default levels ``(1000, 100, 10)`` keep ~100 chips per level-1 cluster and 10 children per cluster;
in general take ``k1`` about N / 50 to N / 100 and each next level 5-20 times smaller.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from geodino.data.tiling import Chip

__all__ = [
    "HierarchicalClusters",
    "balanced_sample",
    "curate",
    "embed_chips",
    "hierarchical_kmeans",
]

# Columns every chip table has (the shared data contract); ``geometry`` is the footprint in EPSG:4326.
# ``crs`` (WKT) and ``geometry`` are null for chips of rasters without CRS (read in pixel coordinates).
_CHIP_COLUMNS = ("raster", "col_off", "row_off", "width", "height", "crs", "geometry")
# Point-to-centroid distances are computed in blocks of about this many float32 values (64 MB).
_BLOCK_ELEMENTS = 2**24
# k-means++ makes one pass over its points per seed (k * points * D multiply-adds, memory-bound), so it
# seeds from a random pool of about this many multiply-adds, and at least 2 points per cluster; the
# Lloyd iterations on all points then refine the seeds. Seeding k = 1000 from 16 000 x 384 points took
# 17 s on 2 busy CPU cores, longer than 10 Lloyd iterations on 10^5 points; from 2000, 0.2-0.4 s.
_SEED_WORK = 2**29
# Resampling steps per level when not given: none on level 1 (the most expensive), 10 above, as the
# reference configuration for web images.
_RESAMPLING_STEPS = 10


@dataclass(frozen=True)
class HierarchicalClusters:
    """Result of :func:`hierarchical_kmeans` with ``L`` levels; levels are numbered from 1 (finest).

    Attributes:
        labels: ``L`` int64 tensors. ``labels[0]`` is ``[N]``, the level-1 cluster of each point;
            ``labels[l]`` is ``[k_l]``, the level-``l + 1`` cluster of each level-``l`` cluster.
        centroids: ``L`` float32 tensors; ``centroids[l - 1]`` is ``[k_l, D]``, the level-``l``
            centroids in the space of the L2-normalised embeddings.
    """

    labels: tuple[Tensor, ...]
    centroids: tuple[Tensor, ...]

    @property
    def levels(self) -> tuple[int, ...]:
        """Number of clusters per level, ``(k_1, ..., k_L)``."""
        return tuple(len(c) for c in self.centroids)

    @property
    def n_points(self) -> int:
        """Number of clustered points ``N``."""
        return len(self.labels[0])

    def _check_level(self, level: int) -> None:
        if not 1 <= level <= len(self.levels):
            raise ValueError(f"level must be in 1..{len(self.levels)}, got {level}")

    def assignment(self, level: int) -> Tensor:
        """The level-``level`` cluster of each point, int64 ``[N]`` (labels composed through the levels)."""
        self._check_level(level)
        assignment = self.labels[0]
        for labels in self.labels[1:level]:
            assignment = labels[assignment]
        return assignment

    def sizes(self, level: int) -> Tensor:
        """Number of points in each level-``level`` cluster, int64 ``[k_level]`` (zero for empty ones)."""
        return torch.bincount(self.assignment(level), minlength=self.levels[level - 1])


# ------------------------------------------------------------------------------------------ k-means


def _assign(x: Tensor, centroids: Tensor, batch: int) -> Tensor:
    """Nearest centroid of each point, int64 ``[n]``, in blocks of ``batch`` points.

    ``argmin |x - c|^2 = argmin |c|^2 - 2 x.c``: one ``addmm`` per block, without the square root and
    ``|x|^2`` terms ``torch.cdist`` would compute.
    """
    c_sq = centroids.square().sum(1)
    labels = torch.empty(len(x), dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch):
        labels[i : i + batch] = torch.addmm(c_sq, x[i : i + batch], centroids.T, alpha=-2).argmin(1)
    return labels


def _kmeans_plusplus(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """``k`` seeds ``[k, D]`` by greedy k-means++ on a random pool of points (see ``_SEED_WORK``).

    Greedy k-means++ as in scikit-learn and the reference ``kmeans_plusplus``: each new seed is the best
    (lowest potential) of ``2 + ln k`` candidates drawn with probability proportional to the squared
    distance to the nearest seed so far.
    """
    pool = max(2 * k, _SEED_WORK // (k * x.shape[1]))
    if len(x) > pool:
        x = x[torch.randperm(len(x), generator=gen)[:pool].to(x.device)]
    trials = 2 + int(math.log(k))
    x_sq = x.square().sum(1)
    seeds = torch.empty(k, dtype=torch.int64)
    seeds[0] = torch.randint(len(x), (1,), generator=gen).item()
    d2 = torch.addmv(x_sq, x, x[seeds[0]], alpha=-2).add_(x_sq[seeds[0]]).clamp_(min=0)
    for i in range(1, k):
        cumulative = d2.cpu().cumsum(0, dtype=torch.float64)  # on the CPU: deterministic
        draws = torch.rand(trials, generator=gen, dtype=torch.float64) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, draws).clamp_(max=len(x) - 1).to(x.device)
        d2_new = torch.addmm(x_sq[candidates], x, x[candidates].T, alpha=-2).add_(x_sq[:, None])
        d2_new = torch.minimum(d2_new.clamp_(min=0), d2[:, None])
        best = d2_new.sum(0).argmin()
        seeds[i], d2 = candidates[best], d2_new[:, best]
    return x[seeds.to(x.device)]


def _reseed_empty(x: Tensor, labels: Tensor, centroids: Tensor) -> Tensor:
    """Give each empty cluster one of the points farthest from their centroid (scikit-learn's rule).

    Only points of clusters with more than one point move, so no move empties a cluster. Deterministic:
    the choice depends on the distances only.
    """
    counts = torch.bincount(labels, minlength=len(centroids))
    empty = (counts == 0).nonzero().squeeze(1)
    if len(empty) == 0:
        return labels
    d2 = (x - centroids[labels]).square().sum(1)
    movable = torch.where(counts[labels] > 1, d2, -1.0)
    far = movable.topk(min(len(empty), int((movable >= 0).sum()))).indices
    labels = labels.clone()
    labels[far] = empty[: len(far)]
    return labels


def _means(x: Tensor, labels: Tensor, previous: Tensor, batch: int) -> Tensor:
    """Mean ``[k, D]`` of the points of each cluster; ``previous`` for empty clusters.

    Block sums in float32 are accumulated in float64 (the reference sums in float64; converting all
    points to float64 took longer than the sums). ``index_add_`` adds with atomics on CUDA, which made
    two runs with one seed differ there; a one-hot matrix product is deterministic on GPUs but costs a
    second assignment on a CPU, where ``index_add_`` is deterministic.
    """
    sums = torch.zeros(previous.shape, dtype=torch.float64, device=x.device)
    for i in range(0, len(x), batch):
        xb, lb = x[i : i + batch], labels[i : i + batch]
        if x.device.type == "cpu":
            sums += torch.zeros_like(previous).index_add_(0, lb, xb).double()
        else:
            one_hot = torch.zeros(len(lb), len(previous), device=x.device).scatter_(1, lb[:, None], 1.0)
            sums += (one_hot.T @ xb).double()
    counts = torch.bincount(labels, minlength=len(previous))
    means = (sums / counts.clamp(min=1)[:, None]).to(x.dtype)
    return torch.where(counts[:, None] > 0, means, previous)


def _kmeans(x: Tensor, k: int, n_iter: int, gen: torch.Generator, batch: int) -> tuple[Tensor, Tensor]:
    """k-means++ then at most ``n_iter`` Lloyd iterations: centroids ``[k, D]`` and labels ``[n]``.

    Each iteration assigns then updates, so the returned centroids are the means of the points with the
    returned labels (for non-empty clusters). Stops early when no label changes.
    """
    centroids = _kmeans_plusplus(x, k, gen)
    labels = None
    for _ in range(n_iter):
        new = _assign(x, centroids, batch)
        if labels is not None and torch.equal(new, labels):
            break
        labels = _reseed_empty(x, new, centroids)
        centroids = _means(x, labels, centroids, batch)
    return centroids, labels


def _group_sort(group: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """Order sorting elements by ``(group, key)``, and each sorted element's 0-based rank in its group."""
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    sorted_group = group[order]
    rank = torch.arange(len(order), device=group.device) - torch.searchsorted(sorted_group, sorted_group)
    return order, rank


def _resampled_kmeans(
    x: Tensor, k: int, n_iter: int, steps: int, sample_size: int, gen: torch.Generator, bar: tqdm
) -> tuple[Tensor, Tensor]:
    """k-means, then ``steps`` rounds of the paper's resampling: centroids ``[k, D]``, labels ``[n]``.

    A round keeps the ``sample_size`` points closest to each centroid, runs k-means (fresh k-means++
    seeds) on them alone and assigns every point to the nearest new centroid, as the reference
    ``hierarchical_kmeans_with_resampling`` with its default "closest" strategy. Every cluster then
    weighs about the same in the next k-means, which moves centroids out of dense regions. The
    centroids are those of the last k-means on the resampled points, not the means of all members.
    """
    batch = max(1, _BLOCK_ELEMENTS // k)
    centroids, labels = _kmeans(x, k, n_iter, gen, batch)
    bar.update()
    for _ in range(steps):
        d2 = (x - centroids[labels]).square().sum(1)
        order, rank = _group_sort(labels, d2)
        centroids, _ = _kmeans(x[order[rank < sample_size]], k, n_iter, gen, batch)
        labels = _assign(x, centroids, batch)
        bar.update()
    return centroids, labels


def hierarchical_kmeans(
    embeddings: Tensor,
    levels: Sequence[int] = (1000, 100, 10),
    *,
    n_iter: int = 10,
    n_resampling: Sequence[int] | None = None,
    sample_size: Sequence[int] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> HierarchicalClusters:
    """Hierarchical k-means (Vo et al. 2024): k-means on the points, then on the centroids, level by level.

    Level 1 clusters the L2-normalised embeddings into ``levels[0]`` clusters; level ``l`` clusters the
    level-``l - 1`` centroids into ``levels[l - 1]`` clusters (squared Euclidean distance throughout).
    Each k-means is seeded by greedy k-means++ and refined by Lloyd iterations; an empty cluster takes
    the point farthest from its centroid.

    Args:
        embeddings: ``[N, D]`` float embeddings of the candidate pool, finite.
        levels: Clusters per level, strictly decreasing, ``levels[0] <= N``. The default suits ~10^5
            points (see the module docstring for scaling).
        n_iter: Maximum Lloyd iterations per k-means (the reference used 50 on GPUs; 10 is close to
            convergence: 10^5 x 384 embeddings with the default levels take 5-8 s on 2 CPU cores,
            1 s on an H200).
        n_resampling: Resampling steps per level; default 0 on level 1 and 10 above (the reference
            configuration). Resampling re-runs k-means on the ``sample_size`` points closest to each
            centroid, spreading centroids more evenly; the centroids are then not the cluster means.
        sample_size: Points kept per cluster when resampling, per level; default half the mean cluster
            size rounded up (the reference configuration). Levels with 1 skip resampling.
        seed: Seed of every random draw (k-means++ seeds, pools); equal seeds give equal results on the
            same device.
        device: Where to compute (e.g. ``"cuda"``); default the device of ``embeddings``. Results are
            returned on the CPU.
        progress: Show a progress bar over the k-means runs.

    Returns:
        The :class:`HierarchicalClusters`.

    Raises:
        ValueError: Embeddings not ``[N, D]`` or not finite, levels not strictly decreasing or above N,
            per-level arguments of the wrong length.
    """
    x = _check_embeddings(embeddings)
    levels = tuple(int(k) for k in levels)
    if not levels or levels[-1] < 1 or any(a <= b for a, b in itertools.pairwise(levels)):
        raise ValueError(f"levels must be a non-empty, strictly decreasing sequence of k >= 1, got {levels}")
    if levels[0] > len(x):
        raise ValueError(f"cannot make {levels[0]} level-1 clusters from {len(x)} points; lower levels[0]")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    inputs = (len(x), *levels[:-1])  # points clustered at each level
    if n_resampling is None:
        n_resampling = (0,) + (_RESAMPLING_STEPS,) * (len(levels) - 1)
    if sample_size is None:
        sample_size = [math.ceil(n / k / 2) for n, k in zip(inputs, levels, strict=True)]
    if not len(n_resampling) == len(sample_size) == len(levels):
        raise ValueError(
            f"n_resampling {tuple(n_resampling)} and sample_size {tuple(sample_size)} need one entry per "
            f"level of {levels}"
        )
    # keeping one point per cluster would only copy the centroids: no resampling then (as the reference)
    n_resampling = [r if size > 1 else 0 for r, size in zip(n_resampling, sample_size, strict=True)]
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(x.to(device=device or x.device, dtype=torch.float32), dim=1)
    labels, centroids = [], []
    with tqdm(
        total=len(levels) + sum(n_resampling), desc="hierarchical k-means", disable=not progress
    ) as bar:
        for k, steps, size in zip(levels, n_resampling, sample_size, strict=True):
            c, lab = _resampled_kmeans(x, k, n_iter, steps, size, gen, bar)
            labels.append(lab.cpu())
            centroids.append(c.cpu())
            x = c
    return HierarchicalClusters(tuple(labels), tuple(centroids))


def _check_embeddings(embeddings: Tensor) -> Tensor:
    if embeddings.ndim != 2 or len(embeddings) == 0 or not embeddings.is_floating_point():
        raise ValueError(
            f"embeddings must be a non-empty float [N, D] tensor, got {embeddings.dtype} "
            f"{tuple(embeddings.shape)}"
        )
    bad = (~torch.isfinite(embeddings).all(1)).nonzero().squeeze(1)
    if len(bad):
        raise ValueError(
            f"{len(bad)} of {len(embeddings)} embeddings contain NaN or inf (first at row {bad[0].item()}); "
            "drop those chips (e.g. all-nodata chips) before clustering"
        )
    return embeddings


# ------------------------------------------------------------------------------------------ sampling


def _water_fill(sizes: Tensor, group: Tensor, target: Tensor, gen: torch.Generator) -> Tensor:
    """Points to take from each of ``k`` members ``[k]``, splitting each group's target evenly.

    ``sizes [k]`` and ``group [k]`` (in ``0..G-1``) describe the members, ``target [G]`` (at most the
    group's points) what each group gives. Each member gets ``min(size, cut)`` with the largest ``cut``
    that keeps its group within target; the rest goes one point each to random members larger than the
    cut (the reference's ``find_subcluster_target_size``, in closed form for all groups at once).
    """
    order, rank = _group_sort(group, sizes)
    g, s = group[order], sizes[order]
    count = torch.bincount(g, minlength=len(target))[g]  # members in the group of each member
    start = torch.arange(len(g)) - rank  # sorted position of the group's first (smallest) member
    before = s.cumsum(0) - s
    before = before - before[start]  # points in the group's members smaller than this one
    # Filling every member of the group up to this one's size takes `before + s * (count - rank)`; the
    # first member for which that exceeds the target is where the cut lies (none: the target is all).
    t = target[g]
    first_over = torch.where(before + s * (count - rank) > t, rank, count)
    first = torch.full_like(target, len(g)).scatter_reduce_(0, g, first_over, "amin")[g]
    capped = first < count
    at = (start + first).clamp(max=len(g) - 1)
    cut = torch.where(capped, (t - before[at]) // (count - first).clamp(min=1), s)
    alloc = torch.minimum(s, cut)
    rest = target - torch.zeros_like(target).index_add_(0, g, alloc)
    key = torch.where(s > cut, torch.rand(len(g), generator=gen, dtype=torch.float64), 2.0)
    order2, rank2 = _group_sort(g, key)  # eligible members first, in random order
    alloc[order2] += (rank2 < rest[g[order2]]).long()
    out = torch.empty_like(alloc)
    out[order] = alloc
    return out


def balanced_sample(clusters: HierarchicalClusters, n: int, *, seed: int = 0) -> Tensor:
    """Draw ``n`` distinct points evenly over the cluster hierarchy (Vo et al. 2024's hierarchical sampling).

    ``n`` is split evenly among the top-level clusters; a cluster with fewer points than its share
    gives the rest to the others (water filling). Each cluster's share is split the same way among its
    children, down to level 1, where the points are drawn uniformly at random without replacement (the
    reference's "random" strategy). Vectorised: one pass per level.

    Args:
        clusters: From :func:`hierarchical_kmeans`.
        n: Number of points to draw, ``0 <= n <= N``.
        seed: Seed of the random draws; equal seeds give equal samples.

    Returns:
        int64 ``[n]``: indices of the drawn points, ascending.

    Raises:
        ValueError: ``n`` outside ``0..N``.
    """
    if not 0 <= n <= clusters.n_points:
        raise ValueError(f"cannot draw n={n} distinct points from a pool of {clusters.n_points}")
    gen = torch.Generator().manual_seed(seed)
    top = len(clusters.levels)
    target = torch.tensor([n])
    for level in range(top, 0, -1):
        parent = (
            clusters.labels[level] if level < top else torch.zeros(clusters.levels[-1], dtype=torch.int64)
        )
        target = _water_fill(clusters.sizes(level), parent, target, gen)
    leaf = clusters.labels[0]
    order, rank = _group_sort(leaf, torch.rand(len(leaf), generator=gen))
    return order[rank < target[leaf[order]]].sort().values


# ------------------------------------------------------------------------------------------ chips


def _collate(items: list[Chip | Tensor]) -> Tensor:
    """Stack chips (or ``[C, H, W]`` tensors) into a float32 batch ``[B, C, H, W]``."""
    images = [torch.from_numpy(i.image.astype(np.float32)) if isinstance(i, Chip) else i for i in items]
    return torch.stack(images).float()


def embed_chips(
    source: Sequence[Chip] | Sequence[Tensor],
    embed: Callable[[Tensor], Tensor],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> Tensor:
    """Embed every chip of a source with a user-given function, under ``torch.inference_mode()``.

    Args:
        source: Map-style sequence of :class:`~geodino.data.tiling.Chip` (e.g. a ``RasterTiler``) or
            of ``[C, H, W]`` tensors, all of one shape.
        embed: Maps a float32 batch ``[B, C, H, W]`` of raw pixel values (source units, fill value
            outside the raster) to ``[B, D]`` embeddings, e.g. a backbone's pooled features after the
            scaling it expects. It receives CPU tensors and moves them to its device itself.
        batch_size: Chips per call of ``embed``.
        num_workers: DataLoader worker processes reading chips.
        progress: Show a progress bar.

    Returns:
        float32 ``[N, D]`` on the CPU, in source order.

    Raises:
        ValueError: An empty source, or ``embed`` not returning ``[B, D]``.
    """
    if len(source) == 0:
        raise ValueError("cannot embed an empty chip source")
    loader = DataLoader(source, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    out = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc="embedding chips", disable=not progress):
            emb = embed(batch)
            if emb.ndim != 2 or len(emb) != len(batch):
                raise ValueError(
                    f"embed must map a batch {tuple(batch.shape)} to [{len(batch)}, D], "
                    f"got {tuple(emb.shape)}"
                )
            out.append(emb.float().cpu())
    return torch.cat(out)


def _check_chip_table(table: gpd.GeoDataFrame) -> None:
    missing = [c for c in _CHIP_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"chip table lacks the columns {missing} (needs {list(_CHIP_COLUMNS)})")


def curate(
    chips: gpd.GeoDataFrame,
    embeddings: Tensor,
    n: int,
    *,
    levels: Sequence[int] = (1000, 100, 10),
    n_resampling: Sequence[int] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> gpd.GeoDataFrame:
    """Select a balanced subset of ``n`` chips: :func:`hierarchical_kmeans` then :func:`balanced_sample`.

    Args:
        chips: Chip table (``raster``, ``col_off``, ``row_off``, ``width``, ``height``, ``crs``,
            ``geometry``; ``crs`` and ``geometry`` may be null: chips without CRS), one row per embedding.
        embeddings: ``[N, D]`` embeddings, row ``i`` for ``chips.iloc[i]``.
        n: Chips to select, at most N.
        levels, n_resampling, seed, device, progress: As for :func:`hierarchical_kmeans` (``seed``
            also seeds the sampling).

    Returns:
        The selected rows in table order (original index kept), with int64 columns ``cluster_l1`` ...
        ``cluster_lL``: each chip's cluster at each level.

    Raises:
        ValueError: Missing columns, a row count different from the embeddings', bad embeddings, levels
            or ``n`` (see :func:`hierarchical_kmeans`, :func:`balanced_sample`).
    """
    _check_chip_table(chips)
    if len(chips) != len(embeddings):
        raise ValueError(f"{len(chips)} chips but {len(embeddings)} embeddings; need one embedding per chip")
    clusters = hierarchical_kmeans(
        embeddings, levels, n_resampling=n_resampling, seed=seed, device=device, progress=progress
    )
    picked = balanced_sample(clusters, n, seed=seed)
    curated = chips.iloc[picked.numpy()].copy()
    for level in range(1, len(clusters.levels) + 1):
        curated[f"cluster_l{level}"] = clusters.assignment(level)[picked].numpy()
    return curated
