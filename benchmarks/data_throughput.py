"""Chip-loading throughput: geodino vs raw rasterio windowed reads vs torchgeo, on one generated raster.

Every method delivers the same thing: ``float32`` torch batches ``[8, 4, chip, chip]`` of a 4-band uint16
GeoTIFF (tiled 512 x 512, DEFLATE + predictor 2, nodata collar), pixels outside the raster = 0. geodino also
delivers the ``valid`` masks and per-chip metadata. Workloads:

- ``grid224`` / ``grid512``: every chip of a grid from the origin, stride = chip (edge chips padded);
- ``random512``: ``--n`` random 512 px windows (uniform integer offsets, seed ``--seed``), the same windows
  for the raw and geodino methods; torchgeo's ``RandomGeoSampler`` draws its own.

Methods (the ``parallelism`` column says what runs at once):

- ``raw loop``: one rasterio handle, ``src.read(window=...)`` into a uint16 buffer, ``astype(float32)``,
  ``torch.from_numpy`` (the loop of ``shared/bench/bench_read.py --method raw``);
- ``raw DataLoader``: a Dataset opening its own handle per worker, default collate (``torch.stack``);
- ``torchgeo``: ``RasterDataset`` + ``GridGeoSampler`` / ``RandomGeoSampler`` + ``DataLoader(collate_fn=
  stack_samples)``;
- ``geodino ChipLoader``: :class:`geodino.data.loader.ChipLoader`, N reading threads in one process;
- ``geodino DataLoader``: ``RasterTiler`` + ``DataLoader(collate_fn=collate_chips)``, with
  :class:`~geodino.data.loader.WorkerBatchSampler` for 2 workers (and the default sampler for comparison).

Every measurement runs in a fresh process (imports, dataset/tiler construction outside the timing; handle
opening, DataLoader start-up and the whole iteration inside), so each starts with a cold GDAL block cache and
a fresh allocator, whatever ran before. Configurations are interleaved over ``--repeats`` rounds to spread
machine noise. The table gives the median chips/s with min-max, delivered Mpx/s, CPU ms per chip (the
process and its DataLoader workers), and geodino's ratios to the fastest raw and torchgeo rows of the same
run. "Foreign load" is the CPU other processes used during the measurements (from ``/proc/stat``).

    python benchmarks/data_throughput.py --quick     # 2048 px raster, 1 run each: a smoke run (~4 min)
    python benchmarks/data_throughput.py --markdown  # 8192 px (~15 min; raster generated once: ~2-3 min,
                                                     # 5.6 GB RAM)

The raster is cached in ``--data-dir`` (default ``$GEODINO_BENCH_DATA``, else
``<system temp>/geodino-bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from results_md import RESULTS, markdown_table, write_section

BATCH = 8
BLOCK = 512
WORKLOADS = ("grid224", "grid512", "random512")


# ----------------------------------------------------------------------------------------- raster


def data_dir(arg: str | None) -> Path:
    """``--data-dir``, else ``$GEODINO_BENCH_DATA``, else ``<system temp>/geodino-bench``."""
    d = arg or os.environ.get("GEODINO_BENCH_DATA") or Path(tempfile.gettempdir()) / "geodino-bench"
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_raster(folder: Path, size: int) -> Path:
    """The cached test raster of ``size`` x ``size`` px, generated (atomically) if absent."""
    from geodino.data.synthetic import make_scene

    path = folder / f"geodino_scene_{size}_b{BLOCK}.tif"
    if path.exists():
        return path
    print(f"generating {path} (once; 8192 px takes ~2 min and ~5.6 GB RAM) ...", file=sys.stderr, flush=True)
    partial = path.with_suffix(".partial.tif")
    make_scene(partial, size=size, block_size=BLOCK)
    os.replace(partial, path)  # a half-written file never has the final name
    return path


# ---------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A configuration, in a table row: ``key`` selects it in a measuring process."""

    key: str
    name: str
    parallelism: str
    family: str  # raw | torchgeo | geodino
    grid_only: bool = False


METHODS = (
    Method("raw", "raw loop", "1 process", "raw"),
    Method("raw-dl", "raw DataLoader", "2 workers", "raw"),
    Method("torchgeo-w0", "torchgeo RasterDataset + {sampler}", "0 workers", "torchgeo"),
    Method("torchgeo-w2", "torchgeo RasterDataset + {sampler}", "2 workers", "torchgeo"),
    Method("chiploader-t1", "geodino ChipLoader", "1 thread", "geodino"),
    Method("chiploader-t2", "geodino ChipLoader", "2 threads", "geodino"),
    Method("tiler-dl-w0", "geodino RasterTiler + DataLoader", "0 workers", "geodino", grid_only=True),
    Method(
        "tiler-dl-w2",
        "geodino RasterTiler + DataLoader, WorkerBatchSampler",
        "2 workers",
        "geodino",
        grid_only=True,
    ),
    Method(
        "tiler-dl-w2-default",
        "geodino RasterTiler + DataLoader, default sampler",
        "2 workers",
        "geodino",
        grid_only=True,
    ),
)


def chip_size(workload: str) -> int:
    return 224 if workload == "grid224" else 512


def offsets_for(path: Path, workload: str, n: int, seed: int) -> list[tuple[int, int]]:
    """``(row_off, col_off)`` of the workload's chips, pixels."""
    import numpy as np
    import rasterio

    from geodino.data.tiling import grid_windows

    chip = chip_size(workload)
    with rasterio.open(path) as src:
        height, width = src.height, src.width
    if workload == "random512":
        rng = np.random.default_rng(seed)
        rows, cols = rng.integers(0, height - chip + 1, n), rng.integers(0, width - chip + 1, n)
        return list(zip(rows.tolist(), cols.tolist(), strict=True))
    return [(int(w.row_off), int(w.col_off)) for w in grid_windows(height, width, size=chip)]


def read_padded(src, r: int, c: int, chip: int, out) -> None:
    """Read the chip at ``(r, c)`` into ``out [bands, chip, chip]`` (uint16); zero outside the raster."""
    from rasterio.windows import Window

    r1, c1 = min(r + chip, src.height), min(c + chip, src.width)
    if r1 - r == chip and c1 - c == chip:
        src.read(window=Window(c, r, chip, chip), out=out)
    else:
        out[:] = 0
        out[:, : r1 - r, : c1 - c] = src.read(window=Window(c, r, c1 - c, r1 - r))


def batches_for(path: Path, workload: str, key: str, n: int, seed: int) -> Callable[[], Iterator]:
    """Set up ``key`` (untimed) and return the function that iterates its float32 batches (timed)."""
    import numpy as np
    import rasterio
    import torch
    from rasterio.windows import Window
    from torch.utils.data import DataLoader, Dataset

    from geodino.data.loader import ChipLoader, WorkerBatchSampler, collate_chips
    from geodino.data.tiling import ChipRef, RasterTiler

    chip = chip_size(workload)
    offsets = offsets_for(path, workload, n, seed)

    if key == "raw":

        def raw_loop() -> Iterator:
            with rasterio.open(path) as src:
                buf = np.empty((BATCH, src.count, chip, chip), np.uint16)
                for b0 in range(0, len(offsets), BATCH):
                    part = offsets[b0 : b0 + BATCH]
                    for i, (r, c) in enumerate(part):
                        read_padded(src, r, c, chip, buf[i])
                    yield torch.from_numpy(buf[: len(part)].astype(np.float32))

        return raw_loop

    if key == "raw-dl":

        class RawChips(Dataset):
            """Map-style dataset over the offsets; one rasterio handle per process, opened lazily."""

            def __init__(self) -> None:
                self.src = None

            def __len__(self) -> int:
                return len(offsets)

            def __getitem__(self, i: int) -> torch.Tensor:
                if self.src is None:
                    self.src = rasterio.open(path)
                out = np.empty((self.src.count, chip, chip), np.uint16)
                read_padded(self.src, *offsets[i], chip, out)
                return torch.from_numpy(out.astype(np.float32))

        ds = RawChips()
        return lambda: iter(DataLoader(ds, batch_size=BATCH, num_workers=2))

    if key.startswith("torchgeo"):
        from torchgeo.datasets import RasterDataset, stack_samples
        from torchgeo.samplers import GridGeoSampler, RandomGeoSampler

        tg = RasterDataset(paths=[str(path)])
        if workload == "random512":
            sampler = RandomGeoSampler(tg, size=chip, length=n, generator=torch.Generator().manual_seed(seed))
        else:
            sampler = GridGeoSampler(tg, size=chip, stride=chip)
        workers = int(key[-1])
        return lambda: (
            b["image"]
            for b in DataLoader(
                tg, sampler=sampler, batch_size=BATCH, num_workers=workers, collate_fn=stack_samples
            )
        )

    if key.startswith("chiploader"):
        refs = [ChipRef(0, Window(c, r, chip, chip)) for r, c in offsets]
        threads = int(key[-1])
        return lambda: (b.image for b in ChipLoader([path], refs, BATCH, threads=threads))

    if key.startswith("tiler-dl"):
        tiler = RasterTiler(path, size=chip)
        workers = 0 if key == "tiler-dl-w0" else 2
        if key == "tiler-dl-w2":
            kw: dict = {"batch_sampler": WorkerBatchSampler(tiler.windows, BATCH, num_workers=workers)}
        else:
            kw = {"batch_size": BATCH}
        return lambda: (
            b.image for b in DataLoader(tiler, num_workers=workers, collate_fn=collate_chips, **kw)
        )

    raise ValueError(f"unknown method {key!r}")


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers), seconds."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(path: Path, workload: str, key: str, n: int, seed: int, check: bool) -> dict:
    """Time one pass of ``key`` over ``workload`` in this process (the ``--one`` entry point)."""
    import torch

    batches = batches_for(path, workload, key, n, seed)
    chip = chip_size(workload)
    t0, c0 = time.perf_counter(), cpu_seconds()
    chips, total = 0, 0.0
    for x in batches():
        if x.dtype != torch.float32 or x.shape[-2:] != (chip, chip):
            raise AssertionError(f"{key}: got a {x.dtype} batch of shape {tuple(x.shape)}")
        chips += x.shape[0]
        if check:
            total += float(x.sum(dtype=torch.float64))
    return {
        "chips": chips,
        "seconds": time.perf_counter() - t0,
        "cpu": cpu_seconds() - c0,
        "checksum": total if check else None,
    }


# ---------------------------------------------------------------------------------------- running


def busy_jiffies() -> int:
    """Non-idle CPU time of the whole machine since boot, in clock ticks (``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait


@dataclass
class Row:
    method: Method
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    chips: int = 0
    checksum: float | None = None


def run_one(args: list[str]) -> tuple[dict, float, float]:
    """Measure in a fresh process; returns its result, its wall time and the CPU others used meanwhile."""
    before_busy, before_cpu, t0 = busy_jiffies(), cpu_seconds(), time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"measurement {args} failed:\n{proc.stderr[-3000:]}")
    ticks = os.sysconf("SC_CLK_TCK")
    foreign = (busy_jiffies() - before_busy) / ticks - (cpu_seconds() - before_cpu)
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, max(foreign, 0.0)


def torchgeo_status() -> str | None:
    """None when torchgeo's datasets import, else why not (checked in a subprocess: the import is slow)."""
    code = "import torchgeo, torchgeo.datasets, torchgeo.samplers; print(torchgeo.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode:  # 0.8.1 imports `requests` unconditionally (declared only in its `datasets` extra)
        return "`import torchgeo.datasets` fails: " + proc.stderr.strip().splitlines()[-1]
    return None


def versions() -> dict[str, str]:
    """Versions of the libraries measured, and torch's intra-op thread count."""
    from importlib.metadata import PackageNotFoundError, version

    import rasterio
    import torch

    v = {"threads": str(torch.get_num_threads()), "gdal": rasterio.__gdal_version__}
    for name in ("torch", "rasterio", "numpy", "torchgeo"):
        try:
            v[name] = version(name)
        except PackageNotFoundError:
            v[name] = "not installed"
    return v


def fmt_rate(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{med:.1f}"


def table(workload: str, rows: list[Row]) -> tuple[list[str], list[str]]:
    """Markdown rows of one workload and its summary line."""
    chip = chip_size(workload)
    rate = {id(r): [r.chips / t for t in r.times] for r in rows}
    med = {id(r): statistics.median(rate[id(r)]) for r in rows}

    def best(family: str) -> Row | None:
        cands = [r for r in rows if r.method.family == family]
        return max(cands, key=lambda r: med[id(r)]) if cands else None

    sampler = "RandomGeoSampler" if workload == "random512" else "GridGeoSampler"
    lines = []
    for r in rows:
        m = r.method
        ratios = [
            f"{med[id(r)] / med[id(ref)]:.2f}" if m.family == "geodino" and (ref := best(f)) else ""
            for f in ("raw", "torchgeo")
        ]
        check = "" if r.checksum is None else f" {r.checksum:.6e} |"
        lines.append(
            f"| {workload} | {m.name.format(sampler=sampler)} | {m.parallelism} | {fmt_rate(rate[id(r)])} | "
            f"{med[id(r)] * chip * chip / 1e6:.1f} | {statistics.median(r.cpu) / r.chips * 1e3:.2f} | "
            f"{ratios[0]} | {ratios[1]} |{check}"
        )
    g, rw, t = best("geodino"), best("raw"), best("torchgeo")
    summary = (
        f"- {workload}: best geodino ({g.method.name}, {g.method.parallelism}) {med[id(g)]:.1f} chips/s = "
        f"**{med[id(g)] / med[id(rw)]:.2f}x** the best raw ({rw.method.name}, {rw.method.parallelism}, "
        f"{med[id(rw)]:.1f})"
    )
    summary += (
        f", **{med[id(g)] / med[id(t)]:.2f}x** the best torchgeo ({t.method.parallelism}, {med[id(t)]:.1f})"
        if t
        else ", torchgeo not measured"
    )
    return lines, [summary]


def machine_lines(v: dict[str, str], torchgeo_problem: str | None) -> list[str]:
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.M)
        cpu = models[0] if models else cpu
    mem = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo.read_text()).group(1))
        mem = f", {kib / 2**20:.0f} GiB RAM"
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical CPUs{mem}; Python {platform.python_version()}",
        f"- torch {v['torch']} ({v['threads']} intra-op threads), rasterio {v['rasterio']} "
        f"(GDAL {v['gdal']}), numpy {v['numpy']}, torchgeo {v['torchgeo']}"
        + (f" ({torchgeo_problem})" if torchgeo_problem else ""),
        f"- GDAL_CACHEMAX: {os.environ.get('GDAL_CACHEMAX', 'default (5 % of RAM)')}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192, help="raster side, pixels (default 8192)")
    ap.add_argument("--quick", action="store_true", help="2048 px raster, 1 run each: a smoke run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default 3)")
    ap.add_argument("--n", type=int, default=256, help="random windows (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--check", action="store_true", help="one more run of each: float64 sum of all pixels")
    ap.add_argument("--data-dir", default=None, help="raster cache (default $GEODINO_BENCH_DATA or temp)")
    ap.add_argument("--markdown", action="store_true", help=f"write the section for this size into {RESULTS}")
    ap.add_argument("--one", nargs=3, metavar=("RASTER", "WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.one:  # a measuring process: one JSON line on stdout
        raster, workload, key = a.one
        print(json.dumps(measure(Path(raster), workload, key, a.n, a.seed, a.check)))
        return

    size, repeats = (2048, 1) if a.quick else (a.size, a.repeats)
    path = ensure_raster(data_dir(a.data_dir), size)
    torchgeo_problem = torchgeo_status()
    if torchgeo_problem:
        print(f"torchgeo rows skipped: {torchgeo_problem}", file=sys.stderr)
    rows = {w: [Row(m) for m in METHODS if not (m.grid_only and w == "random512")] for w in a.workloads}
    for rs in rows.values():
        rs[:] = [r for r in rs if not (torchgeo_problem and r.method.family == "torchgeo")]
    started = time.strftime("%Y-%m-%d %H:%M")
    loads, foreign_cpu, wall_total = [], 0.0, 0.0
    common = ["--n", str(a.n), "--seed", str(a.seed)]
    for rnd in range(repeats + (1 if a.check else 0)):
        check = a.check and rnd == repeats  # the checksum pass is untimed: summing costs time
        for workload, rs in rows.items():
            for r in rs:
                loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
                res, wall, foreign = run_one(
                    ["--one", str(path), workload, r.method.key, *common, *(["--check"] if check else [])]
                )
                foreign_cpu, wall_total = foreign_cpu + foreign, wall_total + wall
                r.chips = res["chips"]
                if check:
                    r.checksum = res["checksum"]
                    continue
                r.times.append(res["seconds"])
                r.cpu.append(res["cpu"])
                print(
                    f"  {workload:9s} {r.method.key:20s} {res['chips'] / res['seconds']:8.1f} chips/s  "
                    f"(others used {foreign / wall:.2f} cores)",
                    file=sys.stderr,
                    flush=True,
                )

    foreign_cores = foreign_cpu / wall_total
    # The load average counts this benchmark's own busy threads and workers (up to ~2 on its own), so the
    # machine counts as busy from the CPU time other processes used.
    busy = foreign_cores > 0.25
    table_lines, summary = [], []
    for workload, rs in rows.items():
        t, s = table(workload, rs)
        table_lines += t
        summary += s
    lines = [
        f"## Data throughput, {size} x {size} px raster ({started})",
        "",
        f"`python benchmarks/data_throughput.py {' '.join(sys.argv[1:])}`: 4-band uint16, tiled {BLOCK}², "
        f"DEFLATE + predictor 2, nodata collar; float32 batches of {BATCH}; median (min-max) of {repeats} "
        f"run(s) per configuration, each in a fresh process; {a.n} random windows.",
        "",
        *machine_lines(versions(), torchgeo_problem),
        f"- load average (1 min, sampled before each measurement, includes this benchmark): "
        f"{min(loads):.2f}-{max(loads):.2f}; other processes used {foreign_cores:.2f} cores on average "
        f"(/proc/stat)"
        + (" — **preliminary: the machine was busy, rerun on a quiet machine**" if busy else ""),
        "",
        *markdown_table(
            ["workload", "method", "parallelism", "chips/s", "Mpx/s", "CPU ms/chip", "geodino / raw"]
            + ["geodino / torchgeo"]
            + (["checksum"] if a.check else []),
            [],
        ),
        *table_lines,
        "",
        "Ratios: each geodino row against the fastest raw / torchgeo row of this run. CPU ms/chip: CPU time "
        "of the measuring process and its DataLoader workers per delivered chip.",
        "",
        *summary,
        "",
    ]
    print("\n".join(lines))
    if a.markdown:
        write_section(f"data_throughput size={size}", lines)
        print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
