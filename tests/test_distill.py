"""DistillationModule: losses against a naive re-computation, the frozen teacher, the students' EMA, fits,
export, exact resume, specification errors, and the tiny recipe through LightningCLI. Batches are real: chips
of ``shared/data/rasters/cogeo.tif`` through ``MultiCropAugmentation`` and ``collate_multicrop``; the teacher
is a tiny ``DINOv3Module`` exported with ``export_teacher``.

Reference: ``shared/notes/dinov3-official.md`` §3.9 (distillation), §3.5 (losses), §3.6 (optimiser);
official ``MultiDistillationMetaArch`` and ``SSLMetaArch.get_student_output`` / ``compute_losses``.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
import yaml
from conftest import shared_path
from lightning.pytorch.callbacks import ModelCheckpoint
from rasterio.windows import Window
from test_train_module import naive_ce, naive_sinkhorn  # the pretraining references, shared
from torch.utils.data import DataLoader

from geodino.models import CheckpointError, build_backbone
from geodino.models.checkpoint import read_state_dict
from geodino.models.presets import SAT_MEAN, SAT_STD
from geodino.train.augment import MultiCropAugmentation, collate_multicrop, masked_patch_index
from geodino.train.callbacks import ExportTeacher
from geodino.train.distill import DistillationModule
from geodino.train.masking import MaskingGenerator
from geodino.train.module import DINOv3Module

PRESET = "dinov3_vits16.lvd1689m"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
#: LayerScale 0.1 so that CLS tokens depend on the image already at initialisation; no RoPE rescaling, so
#: separate forward passes in the naive re-computation equal the module's list forward.
LS = {"layerscale_init": 0.1, "pos_embed_rope_rescale_coords": None}
TEACHER = {"depth": 2, "embed_dim": 64, "num_heads": 2, **LS}
HEADS = {
    f"{head}_head_{key}": value
    for head in ("dino", "ibot")
    for key, value in (("n_prototypes", 128), ("hidden_dim", 64), ("bottleneck_dim", 32))
}
STUDENTS = [
    {
        "name": "small",
        "backbone": PRESET,
        "backbone_overrides": {"depth": 1, "embed_dim": 32, "num_heads": 2, **LS},
    },
    {
        "name": "base",
        "backbone": PRESET,
        "backbone_overrides": {"depth": 2, "embed_dim": 48, "num_heads": 3, **LS},
        "dino_head_hidden_dim": 48,  # a student head of its own size (same prototypes)
    },
]
GLOBAL, LOCAL, N_LOCAL, BATCH = 48, 16, 2, 4


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A tiny DINOv3Module teacher (perturbed away from its initialisation, confident heads), exported."""
    with torch.random.fork_rng(devices=[]):  # module scope: set up before the per-test seeding
        torch.manual_seed(0)
        module = DINOv3Module(PRESET, backbone_overrides=TEACHER, drop_path_rate=0.0, **HEADS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.teacher.parameters():
            p.add_(torch.randn(p.shape, generator=gen), alpha=0.2)
        for head in ("dino_head", "ibot_head"):
            module.teacher[head].last_layer.weight.mul_(5.0)
    return module.export_teacher(tmp_path_factory.mktemp("teacher") / "teacher_checkpoint.pth")


def distiller(teacher_file: Path, **kwargs) -> DistillationModule:
    args = {
        "backbone": PRESET,
        "teacher_from": str(teacher_file),
        "students": STUDENTS,
        "backbone_overrides": TEACHER,
        "lr": {"peak": 1e-3},
        "momentum": {"peak": 0.9},
        "teacher_temp": {"peak": 0.05},
        **HEADS,
    }
    return DistillationModule(**{**args, **kwargs})


def fit(module: L.LightningModule, batches: list[dict], max_steps: int, **kwargs) -> None:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }
    trainer_kwargs = {**defaults, **kwargs.pop("trainer_kwargs", {})}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|litlogger).*")
        L.Trainer(max_steps=max_steps, **trainer_kwargs).fit(
            module, DataLoader(batches, batch_size=None), **kwargs
        )


class Recorder(L.Callback):
    """Keeps a copy of something after every training step."""

    def __init__(self, take) -> None:
        self.take = take
        self.values: list = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.values.append(self.take(module, outputs))


def losses_of(module, outputs) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in outputs.items()}


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.fixture(scope="module")
def chips() -> list[torch.Tensor]:
    """Eight 64 x 64 RGB chips of a real aerial image, float in [0, 1]."""
    with rasterio.open(shared_path("data", "rasters", "cogeo.tif")) as src:
        windows = [Window(96 * i, 64 + 80 * i, 64, 64) for i in range(8)]
        return [torch.from_numpy(src.read(window=w)).float() / 255 for w in windows]


def make_batches(
    chips: list[torch.Tensor], n: int, *, size: tuple[int, int, int] = (GLOBAL, LOCAL, N_LOCAL), seed: int = 0
) -> list[dict]:
    """``n`` multi-crop batches of ``BATCH`` chips (real augmentation and collate), reproducible."""
    global_size, local_size, n_local = size
    aug = MultiCropAugmentation(
        SAT_MEAN,
        SAT_STD,
        global_crops_size=global_size,
        local_crops_size=local_size,
        local_crops_number=n_local,
    )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    masking = MaskingGenerator(global_size // 16)
    batches = []
    for i in range(n):
        samples = [aug(chips[(i * BATCH + j) % len(chips)]) for j in range(BATCH)]
        batches.append(collate_multicrop(samples, masking, rng, mask_sample_probability=1.0))
    return batches


# ---------------------------------------------------------------- naive references (float64, loops)


def naive_koleo(x: torch.Tensor) -> float:
    x = F.normalize(x.double(), dim=-1)
    terms = []
    for i in range(len(x)):
        j = max((j for j in range(len(x)) if j != i), key=lambda j: float(x[i] @ x[j]))
        terms.append(-math.log(float((x[i] - x[j] + 1e-8).norm()) + 1e-8))
    return float(np.mean(terms))


def naive_student(student, batch: dict, t_cls: torch.Tensor, t_ibot: torch.Tensor) -> dict[str, float]:
    """Official distillation terms of one student, crop by crop; its global crops are NOT masked."""
    g, loc, masks = batch["collated_global_crops"], batch["collated_local_crops"], batch["collated_masks"]
    with torch.no_grad():
        s_glob = student["backbone"].forward_features(g)
        s_loc = student["backbone"].forward_features(loc)
        s_g_logits = student["dino_head"](s_glob["x_norm_clstoken"]).view(2, BATCH, -1)
        s_l_logits = student["dino_head"](s_loc["x_norm_clstoken"]).view(N_LOCAL, BATCH, -1)
        s_ibot = student["ibot_head"](s_glob["x_norm_patchtokens"][masks])
    pairs = [(s, t, b) for s in range(N_LOCAL) for t in range(2) for b in range(BATCH)]
    local = np.mean([naive_ce(s_l_logits[s, b], t_cls[t, b]) for s, t, b in pairs])
    glob = np.mean([naive_ce(s_g_logits[s, b], t_cls[1 - s, b]) for s in range(2) for b in range(BATCH)])
    koleo = np.mean([naive_koleo(c) for c in s_glob["x_norm_clstoken"].view(2, BATCH, -1)])
    rows = iter(range(int(masks.sum())))
    ibot = 0.0
    for image_mask in masks:  # masked patches in image-major, then patch order
        for _ in range(int(image_mask.sum())):
            r = next(rows)
            ibot += naive_ce(s_ibot[r], t_ibot[r]) / int(image_mask.sum())
    ibot /= 2 * BATCH
    return {
        "dino_local_crops_loss": local,
        "dino_global_crops_loss": glob,
        "koleo_loss": koleo,
        "ibot_loss": ibot,
    }


# ---------------------------------------------------------------- one step


def test_losses_match_naive_recomputation(teacher_file, chips) -> None:
    """Every student's terms and the summed total against the official formulas evaluated crop by crop."""
    module = distiller(
        teacher_file,
        dino_loss_weight=1.3,
        koleo_loss_weight=0.3,
        ibot_loss_weight=0.7,
        teacher_temp={"start": 0.04, "peak": 0.07, "warmup": 10},
    )
    batch = make_batches(chips, 1)[0]
    masks = batch["collated_masks"]
    assert masks.any() and not masks.all()
    with torch.no_grad():
        for student in module.students.values():
            student["backbone"].mask_token.fill_(3.0)  # far from any patch embedding: masking would show
            for head in ("dino_head", "ibot_head"):  # larger logits: the losses depend more on the input
                student[head].last_layer.weight.mul_(30.0)
    step = 3
    got = module.compute_losses(batch, step)

    temp = 0.04 + 0.03 * step / 10
    with torch.no_grad():
        t_out = module.teacher["backbone"].forward_features(batch["collated_global_crops"])
        t_cls = naive_sinkhorn(module.teacher["dino_head"](t_out["x_norm_clstoken"]), temp).view(2, BATCH, -1)
        t_ibot = naive_sinkhorn(module.teacher["ibot_head"](t_out["x_norm_patchtokens"][masks]), temp)
    expected = {}
    for name, student in module.students.items():
        terms = naive_student(student, batch, t_cls, t_ibot)
        n_local_pairs, n_global_pairs = 2 * N_LOCAL, 2
        dino = (
            n_local_pairs * terms["dino_local_crops_loss"] + n_global_pairs * terms["dino_global_crops_loss"]
        ) / (n_local_pairs + n_global_pairs)
        terms["loss"] = 1.3 * dino + 0.3 * 2 * terms["koleo_loss"] + 0.7 * terms["ibot_loss"]
        expected.update({f"{name}/{term}": value for term, value in terms.items()})
    expected["loss"] = expected["small/loss"] + expected["base/loss"]

    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.isfinite(got[name]), name
        assert float(got[name].detach()) == pytest.approx(value, rel=2e-5, abs=1e-6), name
    assert got["loss"].requires_grad

    # the students see unmasked global crops: with the mask tokens in their input, iBOT would differ
    student = module.students["base"]
    with torch.no_grad():
        masked_input = student["backbone"].forward_features(batch["collated_global_crops"], masks=masks)
        _, weights = masked_patch_index(masks)
        masked_logits = student["ibot_head"](masked_input["x_norm_patchtokens"][masks])
        masked_ibot = module.ibot_patch_loss(masked_logits, t_ibot.float(), weights, masks.shape[0])
    assert abs(float(masked_ibot) - expected["base/ibot_loss"]) > 1e-2


def test_teacher_frozen_and_students_learn(teacher_file, chips) -> None:
    """Overfitting one batch lowers each student's DINO loss; the teacher gets no gradient, never changes."""
    batch = make_batches(chips, 1)[0]
    module = distiller(teacher_file, lr={"peak": 5e-3})
    initial_teacher = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    exported = torch.load(teacher_file, weights_only=True)["teacher"]
    assert initial_teacher.keys() == exported.keys()
    assert all(torch.equal(initial_teacher[k], exported[k]) for k in exported)
    modes = Recorder(lambda m, _: (m.students.training, m.teacher.training, m.students_ema.training))
    losses = Recorder(losses_of)
    fit(module, [batch] * 8, 8, trainer_kwargs={"callbacks": [modes, losses]})

    assert len(losses.values) == 8
    for name in ("small", "base"):
        dino = [
            (4 * v[f"{name}/dino_local_crops_loss"] + 2 * v[f"{name}/dino_global_crops_loss"]) / 6
            for v in losses.values
        ]
        assert all(math.isfinite(d) for d in dino)
        assert dino[-1] < dino[0] - 0.1, (name, dino)
    assert modes.values == [(True, False, False)] * 8
    final = module.teacher.state_dict()
    assert all(torch.equal(final[k], initial_teacher[k]) for k in final)
    assert all(not p.requires_grad and p.grad is None for p in module.teacher.parameters())


def test_ema_follows_formula_with_cosine_momentum(teacher_file, chips) -> None:
    """θ_ema ← m·θ_ema + (1 − m)·θ for every student, m a half-cosine 0.5 → 1 over 3 steps."""
    module = distiller(teacher_file, momentum={"peak": 0.5, "end": 1.0, "cosine": 3})
    momentum = [1.0 + 0.5 * (0.5 - 1.0) * (1 + math.cos(math.pi * t / 2)) for t in range(2)]  # 0.5, 0.75
    before = params_of(module.students_ema)
    assert all(torch.equal(before[k], v) for k, v in params_of(module.students).items())
    states = Recorder(lambda m, _: (params_of(m.students), params_of(m.students_ema)))
    fit(module, make_batches(chips, 2), 2, trainer_kwargs={"callbacks": [states]})
    (student0, ema0), (student1, ema1) = states.values
    assert before.keys() == ema0.keys() and any(k.startswith("small.") for k in before)
    for name in before:
        torch.testing.assert_close(
            ema0[name], momentum[0] * before[name] + (1 - momentum[0]) * student0[name], rtol=1e-6, atol=1e-7
        )
        torch.testing.assert_close(
            ema1[name], momentum[1] * ema0[name] + (1 - momentum[1]) * student1[name], rtol=1e-6, atol=1e-7
        )
    assert not torch.equal(ema1["base.backbone.cls_token"], student1["base.backbone.cls_token"])
    assert all(not p.requires_grad for p in module.students_ema.parameters())


def test_a_nonfinite_step_leaves_students_and_their_ema_unchanged(teacher_file, chips) -> None:
    """Step 1 sees a NaN pixel (NaN teacher targets, so every student's loss is NaN) and changes no student
    and no EMA copy."""
    batches = make_batches(chips, 2)
    crops = batches[1]["collated_global_crops"].clone()
    crops[0, 0, 0, 0] = float("nan")
    batches[1] = {**batches[1], "collated_global_crops": crops}
    states = Recorder(lambda m, out: (float(out["loss"]), params_of(m.students), params_of(m.students_ema)))
    fit(distiller(teacher_file), batches, 2, trainer_kwargs={"callbacks": [states]})
    (loss0, *after0), (loss1, *after1) = states.values
    assert math.isfinite(loss0) and math.isnan(loss1)
    for before, after in zip(after0, after1, strict=True):
        assert all(torch.equal(before[k], after[k]) for k in before)


def expected_lr_multiplier(name: str, n_blocks: int, decay: float, patch_embed: float) -> float:
    """Official layer-wise decay, written independently: embeddings 0, block i → i + 1, the rest L + 1."""
    block = re.search(r"\.blocks\.(\d+)\.", name)
    if block:
        layer = int(block.group(1)) + 1
    elif any(t in name for t in ("patch_embed", "cls_token", "storage_tokens", "mask_token")):
        layer = 0
    else:
        layer = n_blocks + 1
    return decay ** (n_blocks + 1 - layer) * (patch_embed if "patch_embed" in name else 1.0)


def test_optimizer_groups_per_student_and_clipping(teacher_file, chips) -> None:
    """Layer decay over each student's own depth; each student's sub-modules are clipped separately."""
    max_norm = 1e-3
    clipped: list[dict[str, float]] = []
    seen: list[list[tuple[list[str], float, float]]] = []

    class Probe(DistillationModule):
        def configure_gradient_clipping(
            self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
        ):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            clipped.append(
                {
                    f"{name}.{part}": float(
                        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()]))
                    )
                    for name, student in self.students.items()
                    for part, m in student.items()
                }
            )

    class Groups(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            seen.append([(g["names"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups])

    args = {
        **distiller(teacher_file).hparams,
        "clip_grad": max_norm,
        "layer_decay": 0.5,
        "patch_embed_lr_mult": 0.2,
    }
    args.update(
        lr={"start": 0.0, "peak": 1e-3, "warmup": 2}, weight_decay={"peak": 0.05}, freeze_last_layer=1
    )
    module = Probe(**args)
    fit(module, make_batches(chips, 2), 2, trainer_kwargs={"callbacks": [Groups()]})

    assert len(clipped) == 2 and len(clipped[0]) == 6
    for step in clipped:
        assert step == pytest.approx(dict.fromkeys(step, max_norm), rel=1e-4)
    depth = {"small": 1, "base": 2}
    for step, groups in enumerate(seen):
        names = [n for group_names, _, _ in groups for n in group_names]
        assert sorted(names) == sorted(f"students.{k}" for k, _ in module.students.named_parameters())
        for group_names, group_lr, group_wd in groups:
            for name in group_names:
                student = name.split(".")[1]
                mult = expected_lr_multiplier(name, depth[student], 0.5, 0.2)
                frozen = name.endswith("last_layer.weight") and step < 1
                assert group_lr == pytest.approx(0.0 if frozen else 1e-3 * step / 2 * mult, abs=1e-15), name
                no_wd = name.endswith("bias") or "norm" in name or "gamma" in name
                assert group_wd == pytest.approx(0.0 if no_wd else 0.05, abs=1e-15), name
    with pytest.raises(ValueError, match="clip_grad"):
        fit(distiller(teacher_file), make_batches(chips, 1), 1, trainer_kwargs={"gradient_clip_val": 1.0})


# ---------------------------------------------------------------- export, resume, specification errors


def test_export_students_load_strictly_into_backbones(teacher_file, tmp_path: Path) -> None:
    module = distiller(teacher_file)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.students.parameters():
            p.add_(torch.randn(p.shape, generator=gen), alpha=0.01)
    module.update_ema(0.5)  # the EMA now differs from both the student and the initialisation
    paths = module.export_students(tmp_path / "out")
    assert paths == {s["name"]: tmp_path / "out" / f"{s['name']}_teacher_checkpoint.pth" for s in STUDENTS}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())
    assert module.export_teacher(tmp_path / "cb" / "last.pth") == [
        tmp_path / "cb" / f"{s['name']}_last.pth" for s in STUDENTS
    ]
    x = torch.randn(2, 3, 48, 32)
    for spec in STUDENTS:
        raw = torch.load(paths[spec["name"]], weights_only=True)
        ema = module.students_ema[spec["name"]].state_dict()
        assert list(raw) == ["teacher"] and raw["teacher"].keys() == ema.keys()
        assert all(torch.equal(raw["teacher"][k], ema[k]) for k in ema)
        backbone = build_backbone(spec["backbone"], **spec["backbone_overrides"]).eval()
        backbone.load_state_dict(read_state_dict(paths[spec["name"]]), strict=True)
        want = module.students_ema[spec["name"]]["backbone"].forward_features(x)["x_norm_clstoken"]
        assert torch.equal(backbone.forward_features(x)["x_norm_clstoken"], want)
        student = module.students[spec["name"]]["backbone"].eval().forward_features(x)["x_norm_clstoken"]
        assert not torch.equal(student, want)


def test_resume_reproduces_losses_exactly_without_teacher_in_checkpoint(
    teacher_file, chips, tmp_path
) -> None:
    """Drop-path and RoPE rescaling on: steps 3-4 after resuming at step 2 equal the uninterrupted run."""
    random_students = [
        {
            **s,
            "drop_path_rate": 0.3,
            "backbone_overrides": {**s["backbone_overrides"], "pos_embed_rope_rescale_coords": 2},
        }
        for s in STUDENTS
    ]
    batches = make_batches(chips, 2)
    full = distiller(teacher_file, students=random_students)
    losses = Recorder(losses_of)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    fit(full, batches, 4, trainer_kwargs={"callbacks": [losses, ckpt], "enable_checkpointing": True})

    path = tmp_path / "step=2.ckpt"
    saved = torch.load(path, weights_only=True)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    assert any(k.startswith("students_ema.base.") for k in saved["state_dict"])
    torch.manual_seed(99)
    resumed = distiller(teacher_file, students=random_students)
    losses_resumed = Recorder(losses_of)
    fit(
        resumed, batches, 4, ckpt_path=path, weights_only=True, trainer_kwargs={"callbacks": [losses_resumed]}
    )

    assert len(losses.values) == 4
    assert losses_resumed.values == losses.values[2:]
    final, final_resumed = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(final[k], final_resumed[k]) for k in final)
    # load_from_checkpoint reads the teacher again from the file named in the hyper-parameters
    loaded = DistillationModule.load_from_checkpoint(path, weights_only=True).state_dict()
    saved_students = {k: v for k, v in saved["state_dict"].items() if k.startswith("students")}
    assert all(torch.equal(loaded[k], v) for k, v in saved_students.items())
    assert all(torch.equal(loaded[k], v) for k, v in final.items() if k.startswith("teacher."))
    # only the teacher may be missing: a state without one EMA key fails the strict load
    lacking = {k: v for k, v in saved["state_dict"].items() if k != "students_ema.base.backbone.norm.weight"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*students_ema\.base\.backbone\.norm\.weight"):
        resumed.load_state_dict(lacking)


def test_specification_errors(teacher_file, tmp_path: Path) -> None:
    small = STUDENTS[0]
    with pytest.raises(ValueError, match="dino_head_n_prototypes 64 differs from the teacher's 128"):
        distiller(teacher_file, students=[{**small, "dino_head_n_prototypes": 64}])
    with pytest.raises(ValueError, match="ibot_head_n_prototypes 256 differs from the teacher's 128"):
        distiller(teacher_file, students=[{**small, "ibot_head_n_prototypes": 256}])
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        distiller(teacher_file, students=[{**small, "depth": 3}])
    with pytest.raises(ValueError, match="repeated names"):
        distiller(teacher_file, students=[small, small])
    with pytest.raises(ValueError, match="'backbone' is required"):
        distiller(teacher_file, students=[{"name": "x"}])
    with pytest.raises(ValueError, match="at least one"):
        distiller(teacher_file, students=[])
    patch8 = {**small, "backbone_overrides": {**small["backbone_overrides"], "patch_size": 8}}
    with pytest.raises(ValueError, match="patch size 8"):
        distiller(teacher_file, students=[patch8])
    with pytest.raises(CheckpointError, match="shape mismatches"):
        distiller(teacher_file, dino_head_hidden_dim=32)  # does not fit the teacher file
    with pytest.raises(CheckpointError, match="no such"):
        distiller(tmp_path / "missing.pth")


# ---------------------------------------------------------------- the tiny recipe


def test_distill_tiny_recipe_runs_through_lightning_cli(chips, tmp_path: Path, monkeypatch) -> None:
    """``recipes/distill_tiny.yaml`` parses onto DistillationModule + PretrainDataModule + Trainer; a short
    fit from a teacher shaped as ``highres_tiny.yaml``'s exports one strictly loadable file per student."""
    from lightning.pytorch.cli import LightningCLI

    from geodino.train.data import PretrainDataModule

    recipe = yaml.safe_load((RECIPES / "distill_tiny.yaml").read_text())
    previous = yaml.safe_load((RECIPES / "highres_tiny.yaml").read_text())["model"]
    assert recipe["model"]["teacher_from"] == "runs/highres_tiny/teacher_checkpoint.pth"
    head_args = {k: v for k, v in previous.items() if k.startswith(("dino_head_", "ibot_head_"))}
    assert {k: recipe["model"][k] for k in head_args} == head_args
    monkeypatch.chdir(tmp_path)
    teacher = DINOv3Module(
        previous["backbone"], backbone_overrides=previous["backbone_overrides"], **head_args
    )
    teacher.export_teacher(recipe["model"]["teacher_from"])

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|litlogger).*")
        cli = LightningCLI(
            DistillationModule,
            PretrainDataModule,
            args=[
                "--config",
                str(RECIPES / "distill_tiny.yaml"),
                "--trainer.max_steps=2",
                "--trainer.logger=false",
            ],
            run=False,
            trainer_defaults={"use_distributed_sampler": False, "enable_progress_bar": False},
        )
        data = recipe["data"]
        sizes = (data["global_crops_size"], data["local_crops_size"], data["local_crops_number"])
        cli.trainer.fit(cli.model, DataLoader(make_batches(chips, 2, size=sizes), batch_size=None))

    assert isinstance(cli.model, DistillationModule) and cli.trainer.global_step == 2
    assert any(isinstance(c, ExportTeacher) for c in cli.trainer.callbacks)
    students = recipe["model"]["students"]
    assert [s["backbone_overrides"]["depth"] for s in students] == [1, 2]
    for spec in students:
        path = tmp_path / "runs" / "distill_tiny" / f"{spec['name']}_teacher_checkpoint.pth"
        backbone = build_backbone(spec["backbone"], **spec["backbone_overrides"])
        backbone.load_state_dict(read_state_dict(path), strict=True)
        assert backbone.embed_dim == spec["backbone_overrides"]["embed_dim"]
