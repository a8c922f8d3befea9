"""`geodino fit` end to end: chips sharded over 2 DDP ranks, on 2 nodes, and exact resume after ``kill -9``.

All tests run the real CLI (``python -m geodino fit --config recipes/pretrain_tiny.yaml`` with command-line
overrides) in subprocesses, on a corpus indexed from the shared rasters. To see what each process trains on
without touching library code, the runs get the callback :class:`RecordSteps` from this module (importable in
the subprocess through ``PYTHONPATH``): after every training step it appends one JSON line per rank with the
step, the total loss and a fingerprint of each image of the batch (per-channel means of its two global crops).
The test recomputes the fingerprints of the epoch's global chip sequence (``RandomChipSampler.epoch_refs``,
augmented in this process by the same ``MultiCropDataset``) and so finds which chip every image came from.

1. DDP (CPU, gloo, 2 processes; Lightning starts the second one by re-running ``python -m geodino``): the run
   completes with finite losses, the two ranks never see the same chip, rank ``r`` trains on the chips
   ``r, r + 2, ...`` of the global sequence in order, and together they cover exactly its prefix.
2. Multi-node: 2 nodes x 1 process on this host, launched as ``torchrun --nnodes=2 --node-rank=i`` and as
   SLURM's ``srun --nodes=2 --ntasks-per-node=1`` would (its environment variables), ``num_nodes=2``:
   Lightning detects the cluster environment, the processes see node ranks 0 and 1, shard the chips as in 1,
   and rank 0 exports a teacher the backbone loads.
3. Resume: run A trains 8 steps uninterrupted; run B (same configuration, ``max_steps=100``, checkpoint every
   2 steps) is killed with SIGKILL after its step-4 checkpoint is written, then resumed from ``last.ckpt`` to
   step 8. The epoch has 6 batches, so the resumed run also crosses an epoch boundary. Every step of B, before
   and after the kill, must train on the same chips and give bit-identical losses as A's; with the colour
   operations in the workers and after the transfer (``photometric_on``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from conftest import shared_path

from geodino.models import build_backbone
from geodino.models.checkpoint import read_state_dict
from geodino.train.data import MultiCropDataset, PretrainDataModule, SizedRef

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pretrain_tiny.yaml"
RASTERS = ("RGB.byte.tif", "cogeo.tif", "rgbn.tif")
BATCH = 4
#: The tiny recipe's backbone overrides.
TINY = yaml.safe_load(RECIPE.read_text())["model"]["backbone_overrides"]
#: Largest difference between a batch image's fingerprint and its chip's, recomputed in this process.
FINGERPRINT_TOL = 1e-4

pytestmark = pytest.mark.slow  # about 1.5 minutes on 2 loaded cores


class RecordSteps(L.Callback):
    """Appends one JSON line per training step to ``<folder>/rank<global rank>.jsonl``.

    Each line holds ``step`` (the step index, 0-based), ``world_size``, ``node_rank`` and ``local_rank`` as
    Lightning sees them, ``epoch``, ``batch_idx``, ``loss`` (the total loss) and ``images``: per image of the
    batch, the per-channel means of its two global crops (``2·C`` floats, crop-major as :func:`fingerprint`).
    Lines are written as each step ends, so a killed run keeps them.

    Args:
        folder: Output folder (created).
        hold_after_step: After writing this step's line, sleep (up to 10 minutes) before the step's later
            callbacks (ModelCheckpoint comes last) run, so that a test can kill the process at a known point.
    """

    def __init__(self, folder: str, hold_after_step: int | None = None) -> None:
        self.folder = Path(folder)
        self.hold_after_step = hold_after_step
        self._start: dict[str, Any] = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Any], batch_idx: int
    ) -> None:
        crops = batch["collated_global_crops"]  # [2B, C, H, W], crop-major
        means = crops.unflatten(0, (2, -1)).flatten(3).mean(-1)  # [2, B, C]
        self._start = {"step": trainer.global_step, "images": means.transpose(0, 1).flatten(1).tolist()}

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: dict[str, torch.Tensor],
        batch: dict[str, Any],
        batch_idx: int,
    ) -> None:
        line = {
            **self._start,
            "world_size": trainer.world_size,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "loss": float(outputs["loss"]),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if line["step"] == self.hold_after_step:
            time.sleep(600)


def fingerprint(sample: dict[str, Any]) -> torch.Tensor:
    """Per-channel means of a sample's two global crops, ``[2·C]`` (what :class:`RecordSteps` records)."""
    return torch.stack(sample["global_crops"]).flatten(2).mean(-1).flatten()


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The lines written by :class:`RecordSteps`."""
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe's corpus: the 4 RGB shared rasters, bands 1-3."""
    rasters = shared_path("data", "rasters")
    out = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    files = [str(rasters / name) for name in RASTERS]
    subprocess.run(
        [sys.executable, "-m", "geodino", "index", *files, "--bands", "1", "2", "3", "--out", str(out)],
        check=True,
        capture_output=True,
        env=_env(),
    )
    return out


def _env() -> dict[str, str]:
    """Subprocess environment: one thread per process, this folder importable (for :class:`RecordSteps`)."""
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def fit_command(
    corpus: Path, root: Path, probe: Path, *overrides: str, hold_after_step: int | None = None
) -> list[str]:
    """``python -m geodino fit``: tiny recipe, small batches, in-process loading, :class:`RecordSteps`."""
    probe_callback = {
        "class_path": f"{__name__}.RecordSteps",
        "init_args": {"folder": str(probe), "hold_after_step": hold_after_step},
    }
    return [
        sys.executable,
        "-m",
        "geodino",
        "fit",
        "--config",
        str(RECIPE),
        f"--data.corpus={corpus}",
        "--data.num_workers=0",
        f"--data.batch_size={BATCH}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.callbacks.init_args.dirpath={root}/checkpoints",  # the recipe's ModelCheckpoint (last)
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *overrides,
        f"--trainer.callbacks+={json.dumps(probe_callback)}",
    ]


def run_fit(command: list[str], timeout: float = 150) -> None:
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


def chip_fingerprints(corpus: Path, chips_per_epoch: int, n: int) -> tuple[torch.Tensor, list]:
    """Fingerprints ``[n, 2·C]`` of the first ``n`` chips of epoch 0's global sequence, and those chips.

    Built here from the recipe's data settings (one process, so the sampler's sequence is unsharded).
    """
    data = yaml.safe_load(RECIPE.read_text())["data"]
    data.update(corpus=str(corpus), batch_size=BATCH, num_workers=0, chips_per_epoch=chips_per_epoch)
    datamodule = PretrainDataModule(**data)
    datamodule.setup("fit")
    refs = datamodule.sampler.epoch_refs(0)[:n]
    dataset = MultiCropDataset(datamodule.corpus, datamodule.augmentations, seed=datamodule.hparams.seed)
    return torch.stack([fingerprint(dataset[SizedRef(0, ref, 0)]) for ref in refs]), refs


def chip_indices(steps: list[dict[str, Any]], expected: torch.Tensor) -> list[int]:
    """Index in ``expected`` of every image of the recorded steps, in training order (-1: no match)."""
    indices = []
    for step in steps:
        for image in step["images"]:
            distance = (expected - torch.tensor(image, dtype=expected.dtype)).abs().amax(dim=1)
            best = int(distance.argmin())
            indices.append(best if distance[best] < FINGERPRINT_TOL else -1)
    return indices


def assert_sharded(corpus: Path, probe: Path, steps: int, world: int) -> list[dict[str, Any]]:
    """Checks the records of a ``world``-process run of ``steps`` steps: every rank trained every step with a
    finite loss on its own shard of the global chip sequence (rank ``r``: chips ``r, r + world, ...``, in
    order) and the ranks together covered exactly the sequence's prefix. Returns each rank's first record."""
    per_rank = steps * BATCH
    chips_per_epoch = yaml.safe_load(RECIPE.read_text())["data"]["chips_per_epoch"]
    expected, refs = chip_fingerprints(corpus, chips_per_epoch, world * per_rank)
    assert len({(r.raster, r.window.col_off, r.window.row_off) for r in refs}) == len(refs)  # distinct chips
    seen, first = [], []
    for rank in range(world):
        records = read_steps(probe / f"rank{rank}.jsonl")
        assert [r["step"] for r in records] == list(range(steps))
        assert all(math.isfinite(r["loss"]) for r in records)
        indices = chip_indices(records, expected)
        assert indices == list(range(rank, world * per_rank, world)), rank
        seen += indices
        first.append(records[0])
    assert sorted(seen) == list(range(world * per_rank))
    return first


def test_ddp_ranks_train_on_disjoint_shards_of_the_global_sequence(corpus: Path, tmp_path: Path) -> None:
    """With the colour operations after the transfer (``photometric_on=device``) each rank still trains on
    the images that the workers' augmentation makes of its chips (the fingerprints are taken with it)."""
    steps, world = 3, 2
    probe = tmp_path / "probe"
    command = fit_command(
        corpus,
        tmp_path / "run",
        probe,
        f"--trainer.max_steps={steps}",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={world}",
        "--trainer.strategy=ddp",
        "--data.photometric_on=device",
    )
    run_fit(command)
    first = assert_sharded(corpus, probe, steps, world)
    assert [(r["world_size"], r["node_rank"], r["local_rank"]) for r in first] == [(2, 0, 0), (2, 0, 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_launch(launcher: str, node: int, port: int, fit: list[str]) -> tuple[list[str], dict[str, str]]:
    """Command and environment of node ``node`` (of 2, one process each) as the cluster launcher starts it.

    ``torchrun``: the real launcher with a static rendezvous on this host (``--node-rank``), which sets the
    ``torchelastic`` variables Lightning's ``TorchElasticEnvironment`` reads. ``slurm``: the variables that
    ``srun --nodes=2 --ntasks-per-node=1`` gives each task (``SLURMEnvironment``); no ``srun`` binary needed.
    """
    if launcher == "torchrun":
        rendezvous = ["--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}"]
        address = ["--master-addr=127.0.0.1", f"--master-port={port}"]
        return [sys.executable, "-m", "torch.distributed.run", *rendezvous, *address, *fit[1:]], _env()
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "geodino-pretrain",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0",
        "MASTER_PORT": str(port),
    }
    return fit, {**_env(), **slurm}


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_node_run_under_cluster_launchers(corpus: Path, tmp_path: Path, launcher: str) -> None:
    """2 nodes x 1 process on this host, started as torchrun or SLURM would (Lightning detects the cluster
    environment; ``--trainer.num_nodes=2``): both nodes join one gloo group and shard the chips like DDP."""
    steps = 2
    probe = tmp_path / "probe"
    fit = fit_command(
        corpus,
        tmp_path / "run",
        probe,
        f"--trainer.max_steps={steps}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=2",
        "--trainer.strategy=ddp",
    )
    port = free_port()
    logs = [tmp_path / f"node{node}.log" for node in range(2)]
    processes = []
    for node, log_path in enumerate(logs):
        command, env = node_launch(launcher, node, port, fit)
        with open(log_path, "w") as log:
            processes.append(
                subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    try:
        for process, log_path in zip(processes, logs, strict=True):
            assert process.wait(timeout=240) == 0, log_path.read_text()[-4000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    first = assert_sharded(corpus, probe, steps, world=2)
    assert [(r["world_size"], r["node_rank"], r["local_rank"]) for r in first] == [(2, 0, 0), (2, 1, 0)]
    # the exported teacher (rank 0 writes, after the collective gather) is a backbone load_backbone reads
    teacher = build_backbone("dinov3_vits16.lvd1689m", **TINY)
    teacher.load_state_dict(read_state_dict(tmp_path / "run" / "teacher_checkpoint.pth"))
    assert all(torch.isfinite(p).all() for p in teacher.parameters())


@pytest.mark.parametrize("photometric_on", ["workers", "device"])
def test_killed_run_resumes_exactly(corpus: Path, tmp_path: Path, photometric_on: str) -> None:
    total, chips_per_epoch = 8, 6 * BATCH  # 6 steps per epoch: the resumed run crosses an epoch boundary
    common = [
        f"--data.chips_per_epoch={chips_per_epoch}",
        f"--data.photometric_on={photometric_on}",
        # the recipe's ModelCheckpoint (last callback): every 2 steps, into a known folder
        "--trainer.callbacks.init_args.every_n_train_steps=2",
    ]

    probe_a = tmp_path / "probe_a"
    run_fit(fit_command(corpus, tmp_path / "a", probe_a, f"--trainer.max_steps={total}", *common))
    reference = read_steps(probe_a / "rank0.jsonl")
    assert [r["step"] for r in reference] == list(range(total))
    assert [r["epoch"] for r in reference] == [0] * 6 + [1] * 2

    # Run B holds after step 4 (0-based): the checkpoint after 4 steps is written, the next one (after 6) is
    # not. It is killed there, then resumed from last.ckpt.
    checkpoints = tmp_path / "b_ckpt"
    command_b = fit_command(
        corpus,
        tmp_path / "b",
        tmp_path / "probe_b",
        "--trainer.max_steps=100",
        *common,
        f"--trainer.callbacks.init_args.dirpath={checkpoints}",
        hold_after_step=4,
    )
    records_b = tmp_path / "probe_b" / "rank0.jsonl"
    log_b = tmp_path / "b.log"
    with open(log_b, "w") as log:
        process = subprocess.Popen(command_b, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (records_b.exists() and '{"step": 4,' in records_b.read_text()):
            assert process.poll() is None, log_b.read_text()[-4000:]
            assert time.monotonic() < deadline, "run B never reached step 4"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    killed = read_steps(records_b)
    assert [r["step"] for r in killed] == list(range(5))
    last = checkpoints / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4

    resume = tmp_path / "probe_resumed"
    run_fit(
        fit_command(
            corpus,
            tmp_path / "b",
            resume,
            f"--trainer.max_steps={total}",
            *common,
            f"--trainer.callbacks.init_args.dirpath={checkpoints}",
            f"--ckpt_path={last}",
        )
    )
    resumed = read_steps(resume / "rank0.jsonl")
    assert [r["step"] for r in resumed] == list(range(4, total))
    for got in killed + resumed:
        want = reference[got["step"]]
        assert (got["epoch"], got["batch_idx"]) == (want["epoch"], want["batch_idx"]), got["step"]
        torch.testing.assert_close(torch.tensor(got["images"]), torch.tensor(want["images"]), rtol=0, atol=0)
        assert got["loss"] == want["loss"], (got["step"], got["loss"], want["loss"])
