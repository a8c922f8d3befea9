"""The tiny recipes chain through the CLI: pretrain -> Gram -> high-res -> distillation, each exporting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import shared_path
from rasterio.windows import Window

from geodino.cli import main
from geodino.data import ChipListSampler, ChipRef
from geodino.models import load_backbone
from geodino.train import AtomicCheckpointIO, DINOv3Module, Schedule
from geodino.train.data import ResolutionBatchSampler

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture
def cogeo_corpus(tmp_path: Path, monkeypatch) -> Path:
    """``tmp_path`` as the working folder, holding the tiny recipe's ``runs/corpus.parquet`` of one shared
    raster (bands 1-3)."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs")
    cogeo = str(shared_path("data", "rasters", "cogeo.tif"))
    assert main(["index", cogeo, "--bands", "1", "2", "3", "--out", "runs/corpus.parquet"]) == 0
    return tmp_path / "runs" / "corpus.parquet"


def test_recipes_are_valid_yaml_for_the_cli() -> None:
    for recipe in RECIPES.glob("*.yaml"):
        config = yaml.safe_load(recipe.read_text())
        assert {"trainer", "model", "data"} <= set(config), recipe
        assert config["model"]["backbone"] == config["data"]["preset"], recipe
        # a restarted job passes --ckpt_path last: the checkpoint must be in one folder for every run (without
        # a dirpath, each run writes to a new lightning_logs/version_N and a restart starts from step 0)
        (checkpoints,) = [
            c["init_args"]
            for c in config["trainer"]["callbacks"]
            if c["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"
        ]
        assert checkpoints["save_last"] is True, recipe
        assert checkpoints["dirpath"] == f"{config['trainer']['default_root_dir']}/checkpoints", recipe


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipes_match_the_module_and_data_signatures(recipe: str, capsys: pytest.CaptureFixture) -> None:
    """LightningCLI parses every recipe against the classes' signatures (a misspelt key fails) without
    building anything; the full-size recipes are checked here only."""
    command = "distill" if recipe.startswith("distill") else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(RECIPES / recipe), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["backbone"] == yaml.safe_load((RECIPES / recipe).read_text())["model"]["backbone"]


def test_a_stage_without_its_previous_stage_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    """The Gram recipe run before the pretraining: one line naming the missing checkpoint and the fix."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(RECIPES / "gram_tiny.yaml")]) == 2
    err = capsys.readouterr().err
    assert "geodino: error: runs/pretrain_tiny/checkpoints/last.ckpt: no such Lightning checkpoint" in err
    assert "run that stage first" in err and "Traceback" not in err


def test_a_diverging_run_stops_with_one_line_and_exports_nothing(
    tmp_path: Path, cogeo_corpus, capsys
) -> None:
    """The tiny pretraining at a learning rate of 1e10: after the first step every loss is NaN, those steps
    are skipped, and the run stops at the first log (step 4) with the fix, without a traceback and
    without a teacher export that a next stage could take for a finished one."""
    too_high = ['--model.lr={"start": 1e10, "peak": 1e10}', "--trainer.max_steps=8", "--data.num_workers=0"]
    assert main(["fit", "--config", str(RECIPES / "pretrain_tiny.yaml"), *too_high]) == 2
    err = capsys.readouterr().err
    assert "geodino: error: DINOv3Module: 3 optimizer steps in a row before step 4 had NaN" in err
    assert "lower lr" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "pretrain_tiny" / "teacher_checkpoint.pth").exists()


def test_a_missing_or_mismatched_corpus_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    """No corpus yet, then a corpus of 4 bands for a 3-band preset: one line each, naming the fix."""
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(RECIPES / "pretrain_tiny.yaml"), "--data.num_workers=0"]
    assert main(fit) == 2
    err = capsys.readouterr().err
    assert "geodino: error: runs/corpus.parquet: no such corpus; write one with `geodino index`" in err
    rgbn = str(shared_path("data", "rasters", "rgbn.tif"))
    assert main(["index", rgbn, "--out", "runs/corpus.parquet"]) == 0
    capsys.readouterr()
    assert main(fit) == 2
    err = capsys.readouterr().err
    assert "runs/corpus.parquet reads 4 bands but the normalisation has 3 values" in err
    assert "geodino index --bands" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_recipe_without_a_gpu_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(RECIPES / "pretrain_vitl16_sat.yaml")]) == 2
    err = capsys.readouterr().err
    assert "geodino: error: No supported gpu backend found!; the recipe asks for GPUs" in err
    assert "--trainer.accelerator=cpu" in err and "Traceback" not in err


def test_out_of_memory_says_what_to_lower(cogeo_corpus, monkeypatch, capsys) -> None:
    """A GPU out of memory (raised here by the training step, as CUDA's allocator raises it) ends in one line
    with torch's first line and the settings that need less memory."""

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")

    monkeypatch.setattr(DINOv3Module, "training_step", out_of_memory)
    assert main(["fit", "--config", str(RECIPES / "pretrain_tiny.yaml"), "--data.num_workers=0"]) == 2
    err = capsys.readouterr().err
    assert "geodino: error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB.)" in err
    assert "--data.batch_size" in err and "activation_checkpointing=selective" in err
    assert "Traceback" not in err


def test_resume_keeps_the_command_line_settings_and_refuses_a_cut_checkpoint(
    tmp_path: Path, cogeo_corpus, capsys
) -> None:
    """``--ckpt_path`` resumes the run's state with the settings of the recipe and the command line: a lower
    lr given to resume takes effect (LightningCLI alone would put the checkpoint's back). Network settings
    that do not fit the checkpoint, and a missing or cut short ``ckpt_path``, get one line naming the file
    and what differs."""
    fit = ["fit", "--config", str(RECIPES / "pretrain_tiny.yaml"), "--data.num_workers=0"]
    last = tmp_path / "runs" / "pretrain_tiny" / "checkpoints" / "last.ckpt"
    # a job that may be restarted passes ckpt_path=last: the first run starts from step 0 (no checkpoint
    # yet), a restarted one continues from the newest last.ckpt
    assert main([*fit, "--trainer.max_steps=2", "--ckpt_path=last"]) == 0
    lower = {"start": 0.0, "peak": 5e-4, "warmup": 10}  # the recipe's peak is 1e-3
    resume = ["--ckpt_path=last", f"--model.lr={json.dumps(lower)}"]
    assert main([*fit, "--trainer.max_steps=3", *resume]) == 0
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 3 and resumed["hyper_parameters"]["lr"] == lower
    for group in resumed["optimizer_states"][0]["param_groups"]:
        if not group["is_last_layer"]:  # the heads' last layers are frozen for the first steps
            assert group["lr"] == pytest.approx(Schedule(**lower)(2) * group["lr_multiplier"])
    capsys.readouterr()
    # other network settings than the checkpoint's: the keys that do not fit and the settings that differ
    deeper = '--model.backbone_overrides={"depth": 3, "embed_dim": 64, "num_heads": 2}'
    assert main([*fit, f"--ckpt_path={last}", deeper]) == 2
    err = capsys.readouterr().err
    assert f"geodino: error: {last}: its networks do not fit this run's settings" in err
    assert "missing keys (30): student.backbone.blocks.2." in err and "backbone_overrides: {'depth': 2" in err
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    teacher = tmp_path / "runs" / "pretrain_tiny" / "teacher_checkpoint.pth"  # the run's export, not a run
    refused = {
        tmp_path / "gone.ckpt": "no such file",
        cut: "not a whole checkpoint",
        teacher: "not a Lightning checkpoint of a run (a teacher export?",
    }
    for path, message in refused.items():
        assert main([*fit, f"--ckpt_path={path}"]) == 2
        err = capsys.readouterr().err
        assert f"geodino: error: ckpt_path {path}: {message}" in err and "Traceback" not in err
    # ckpt_path=last is checked too: the newest last*.ckpt of the recipe's checkpoint folder, cut short
    older = last.with_name("last-v1.ckpt")
    last.rename(older)
    os.utime(older, (1, 1))
    last.write_bytes(cut.read_bytes())
    assert main([*fit, "--ckpt_path=last"]) == 2
    err = capsys.readouterr().err
    named = "ckpt_path runs/pretrain_tiny/checkpoints/last.ckpt"  # the recipe's folder, as Lightning finds it
    assert f"geodino: error: {named}: not a whole checkpoint" in err and "Traceback" not in err


def test_tiny_stages_chain(tmp_path: Path, monkeypatch) -> None:
    rasters = shared_path("data", "rasters")
    monkeypatch.chdir(tmp_path)
    files = [str(rasters / f) for f in ("RGB.byte.tif", "cogeo.tif", "rgbn.tif")]
    os.makedirs("runs")
    assert main(["index", *files, "--bands", "1", "2", "3", "--out", "runs/corpus.parquet"]) == 0
    quick = ["--trainer.max_steps=3", "--trainer.enable_progress_bar=false", "--data.num_workers=0"]
    # the high-res stage's 3 steps run both of its crop resolutions (draws of data seed 0, shares 0.5 / 0.5)
    highres = ResolutionBatchSampler(
        ChipListSampler([ChipRef(0, Window(0, 0, 8, 8))]), batch_size=8, shares=[0.5, 0.5], seed=0
    )
    assert {highres.resolution(epoch=0, batch=b) for b in range(3)} == {0, 1}
    for stage in ("pretrain_tiny", "gram_tiny", "highres_tiny"):
        assert main(["fit", "--config", str(RECIPES / f"{stage}.yaml"), *quick]) == 0
        exported = tmp_path / "runs" / stage / "teacher_checkpoint.pth"
        assert exported.is_file(), stage
        assert (tmp_path / "runs" / stage / "checkpoints" / "last.ckpt").is_file(), stage  # --ckpt_path last
    # the Gram stage continued stage 1's AdamW state: 3 + 3 steps
    gram_run = torch.load(tmp_path / "runs" / "gram_tiny" / "checkpoints" / "last.ckpt", weights_only=True)
    assert {float(s["step"]) for s in gram_run["optimizer_states"][0]["state"].values()} == {6.0}
    # the last stage's teacher is an official-layout checkpoint that the backbone loader reads strictly,
    # given the recipe's backbone_overrides
    state = torch.load(exported, weights_only=True)["teacher"]
    assert any(k.startswith("backbone.blocks.1.") for k in state)
    vit = load_backbone("dinov3_vits16.lvd1689m", exported, depth=2, embed_dim=64, num_heads=2)
    torch.testing.assert_close(vit.state_dict()["norm.weight"], state["backbone.norm.weight"])
    # distillation of that teacher into two smaller students, each exported in the same layout
    assert main(["distill", "--config", str(RECIPES / "distill_tiny.yaml"), *quick]) == 0
    assert (tmp_path / "runs" / "distill_tiny" / "checkpoints" / "last.ckpt").is_file()
    students = {
        "vit_d1_e32": {"depth": 1, "embed_dim": 32, "num_heads": 2},
        "vit_d2_e48": {"depth": 2, "embed_dim": 48, "num_heads": 3},
    }
    for name, dims in students.items():
        path = tmp_path / "runs" / "distill_tiny" / f"{name}_teacher_checkpoint.pth"
        assert len(load_backbone("dinov3_vits16.lvd1689m", path, **dims).blocks) == dims["depth"]


def test_checkpoints_are_whole_or_absent(tmp_path: Path, cogeo_corpus, monkeypatch) -> None:
    """``geodino fit`` writes its checkpoints through :class:`AtomicCheckpointIO`: a save that fails half-way
    (a job killed, a full disk) leaves the previous ``last.ckpt`` whole and no file beside it."""
    saved, save = [], AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint: dict, path: Path, storage_options=None) -> None:
        saved.append(Path(path).name)
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    fit = ["fit", "--config", str(RECIPES / "pretrain_tiny.yaml"), "--data.num_workers=0"]
    assert main([*fit, "--trainer.max_steps=2"]) == 0
    assert saved == ["last.ckpt"]
    folder = tmp_path / "runs" / "pretrain_tiny" / "checkpoints"
    first = (folder / "last.ckpt").read_bytes()

    def cut_short(checkpoint: dict, path: Path) -> None:
        Path(path).write_bytes(b"PK half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 4}, folder / "last.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert (folder / "last.ckpt").read_bytes() == first


def test_last_checkpoint_holds_the_exported_step(tmp_path: Path, cogeo_corpus) -> None:
    """A run whose max_steps is no multiple of the checkpoint interval: ``last.ckpt``, which the Gram stage
    continues, holds the final step, the step of the teacher export (Lightning's stays at step 4)."""
    every_2 = "--trainer.callbacks.init_args.every_n_train_steps=2"
    fit = ["fit", "--config", str(RECIPES / "pretrain_tiny.yaml"), "--data.num_workers=0", every_2]
    assert main([*fit, "--trainer.max_steps=5"]) == 0
    run = tmp_path / "runs" / "pretrain_tiny"
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    exported = torch.load(run / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    state = last["state_dict"]
    teacher = {k.removeprefix("teacher."): v for k, v in state.items() if k.startswith("teacher.")}
    assert exported.keys() == teacher.keys()
    assert all(torch.equal(exported[k], teacher[k]) for k in exported)
