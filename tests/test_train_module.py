"""DINOv3Module: losses against a naive re-computation, Lightning fits (EMA, schedules, clipping, Gram
refresh), teacher export / init, and exact resume. Batches are real: chips of
``shared/data/rasters/cogeo.tif`` through ``MultiCropAugmentation`` and ``collate_multicrop``.

Reference: ``shared/notes/dinov3-official.md`` §3.1 (meta-architecture), §3.5 (losses), §3.6 (schedules,
param groups, clipping), §3.8 (Gram); official ``SSLMetaArch`` and ``train.py``.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from conftest import shared_path
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from rasterio.windows import Window
from torch.utils.data import DataLoader

from geodino.models import CheckpointError, load_backbone
from geodino.models.presets import SAT_MEAN, SAT_STD
from geodino.train import ExportTeacher, TrainingDiverged
from geodino.train.augment import MultiCropAugmentation, collate_multicrop
from geodino.train.masking import MaskingGenerator
from geodino.train.module import DINOv3Module

PRESET = "dinov3_vits16.lvd1689m"
#: Tiny ViT (patch 16, width 64, 2 blocks, 2 heads); LayerScale 0.1 so that CLS tokens depend on the image
#: already at initialisation (with the official 1e-5 every crop's CLS is the same at step 0).
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "layerscale_init": 0.1}
HEADS = {
    f"{head}_head_{key}": value
    for head in ("dino", "ibot")
    for key, value in (("n_prototypes", 128), ("hidden_dim", 64), ("bottleneck_dim", 32))
}
GLOBAL, LOCAL, GRAM, N_LOCAL, BATCH = 32, 16, 64, 2, 4


def tiny_module(**kwargs) -> DINOv3Module:
    args = {
        "backbone": PRESET,
        "backbone_overrides": TINY,
        "drop_path_rate": 0.0,
        "lr": {"peak": 1e-3},
        "momentum": {"peak": 0.9},
        "teacher_temp": {"peak": 0.04},
        "freeze_last_layer": 0,
        "clip_grad": 3.0,
        **HEADS,
    }
    return DINOv3Module(**{**args, **kwargs})


def trainer(max_steps: int, **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }
    return L.Trainer(max_steps=max_steps, **{**defaults, **kwargs})


def fit(module: DINOv3Module, batches: list[dict], max_steps: int, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|litlogger).*")
        trainer(max_steps, **kwargs.pop("trainer_kwargs", {})).fit(
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


def make_batches(chips: list[torch.Tensor], n: int, *, gram: bool = False, seed: int = 0) -> list[dict]:
    """``n`` multi-crop batches of ``BATCH`` chips (real augmentation and collate), reproducible."""
    aug = MultiCropAugmentation(
        SAT_MEAN,
        SAT_STD,
        global_crops_size=GLOBAL,
        local_crops_size=LOCAL,
        local_crops_number=N_LOCAL,
        gram_crops_size=GRAM if gram else None,
    )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    masking = MaskingGenerator(GLOBAL // 16)
    batches = []
    for i in range(n):
        samples = [aug(chips[(i * BATCH + j) % len(chips)]) for j in range(BATCH)]
        batches.append(collate_multicrop(samples, masking, rng, mask_sample_probability=1.0))
    return batches


# ---------------------------------------------------------------- naive references (float64, loops)


def naive_sinkhorn(logits: torch.Tensor, temp: float) -> torch.Tensor:
    q = torch.exp(logits.double() / temp).T  # [K, N]
    q = q / q.sum()
    k, n = q.shape
    for _ in range(3):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).T


def naive_ce(student_logit: torch.Tensor, teacher_prob: torch.Tensor) -> float:
    return -float((teacher_prob * torch.log_softmax(student_logit.double() / 0.1, dim=-1)).sum())


def naive_koleo(x: torch.Tensor) -> float:
    x = F.normalize(x.double(), dim=-1)
    terms = []
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        j = max(others, key=lambda j: float(x[i] @ x[j]))
        terms.append(-math.log(float((x[i] - x[j] + 1e-8).norm()) + 1e-8))
    return float(np.mean(terms))


def naive_gram(student: torch.Tensor, teacher: torch.Tensor) -> float:
    total = 0.0
    for s, t in zip(student.double(), teacher.double(), strict=True):
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        total += float(((s @ s.T - t @ t.T) ** 2).sum())
    return total / (student.shape[0] * student.shape[1] ** 2)


# ---------------------------------------------------------------- one step


def test_losses_match_naive_recomputation(chips) -> None:
    """Every term and the weighted total against the official formulas evaluated crop by crop."""
    # no drop-path / RoPE rescaling, so separate forward passes here equal the module's list forward
    module = tiny_module(
        backbone_overrides={**TINY, "pos_embed_rope_rescale_coords": None},
        gram=True,
        koleo_loss_weight=0.3,
        ibot_loss_weight=0.7,
        dino_loss_weight=1.3,
        dino_local_loss_weight={"peak": 0.5},
        gram_loss_weight={"start": 0.0, "peak": 2.0, "warmup": 4},
        teacher_temp={"start": 0.04, "peak": 0.07, "warmup": 10},
    )
    batch = make_batches(chips, 1, gram=True)[0]
    step = 3
    got = module.compute_losses(batch, step)

    g, loc, masks = batch["collated_global_crops"], batch["collated_local_crops"], batch["collated_masks"]
    assert masks.any()
    temp = 0.04 + 0.03 * step / 10
    with torch.no_grad():
        t_out = module.teacher["backbone"].forward_features(g)
        t_cls = naive_sinkhorn(module.teacher["dino_head"](t_out["x_norm_clstoken"]), temp).view(2, BATCH, -1)
        t_ibot = naive_sinkhorn(module.teacher["ibot_head"](t_out["x_norm_patchtokens"][masks]), temp)
        s_glob = module.student["backbone"].forward_features(g, masks=masks)
        s_loc = module.student["backbone"].forward_features(loc)
        s_g_logits = module.student["dino_head"](s_glob["x_norm_clstoken"]).view(2, BATCH, -1)
        s_l_logits = module.student["dino_head"](s_loc["x_norm_clstoken"]).view(N_LOCAL, BATCH, -1)
        s_ibot = module.student["ibot_head"](s_glob["x_norm_patchtokens"][masks])
        gram_t = module.gram_teacher["backbone"].forward_features(batch["collated_gram_crops"])
        gram_maps = (
            gram_t["x_norm_patchtokens"].transpose(1, 2).reshape(2 * BATCH, -1, GRAM // 16, GRAM // 16)
        )
        gram_maps = F.interpolate(gram_maps, size=(GLOBAL // 16,) * 2, mode="bicubic", align_corners=False)
        gram_targets = gram_maps.flatten(2).transpose(1, 2)

    local = np.mean(
        [
            naive_ce(s_l_logits[s, b], t_cls[t, b])
            for s in range(N_LOCAL)
            for t in range(2)
            for b in range(BATCH)
        ]
    )
    glob = np.mean([naive_ce(s_g_logits[s, b], t_cls[1 - s, b]) for s in range(2) for b in range(BATCH)])
    koleo = np.mean([naive_koleo(c) for c in s_glob["x_norm_clstoken"].view(2, BATCH, -1)])
    rows = iter(range(int(masks.sum())))
    ibot = 0.0
    for image_mask in masks:  # masked patches in image-major, then patch order
        for _ in range(int(image_mask.sum())):
            r = next(rows)
            ibot += naive_ce(s_ibot[r], t_ibot[r]) / int(image_mask.sum())
    ibot /= 2 * BATCH
    gram = naive_gram(s_glob["x_norm_patchtokens"], gram_targets)
    n_local_pairs, n_global_pairs = 2 * N_LOCAL, 2
    dino = (n_local_pairs * 0.5 * local + n_global_pairs * glob) / (n_local_pairs + n_global_pairs)
    total = 1.3 * dino + 0.3 * 2 * koleo + 0.7 * ibot + 2.0 * (step / 4) * gram

    expected = {
        "dino_local_crops_loss": local,
        "dino_global_crops_loss": glob,
        "koleo_loss": koleo,
        "ibot_loss": ibot,
        "gram_loss": gram,
        "loss": total,
    }
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.isfinite(got[name]), name
        assert float(got[name].detach()) == pytest.approx(value, rel=2e-5, abs=1e-6), name
    assert got["loss"].requires_grad


def test_gram_needs_gram_crops(chips) -> None:
    module = tiny_module(gram=True)
    with pytest.raises(KeyError, match="gram_crops_size"):
        module.compute_losses(make_batches(chips, 1)[0], 0)


# ---------------------------------------------------------------- Lightning fits


def test_fit_lowers_loss_teacher_stays_eval(chips) -> None:
    """Overfitting one fixed batch lowers the total loss; the teacher stays in eval mode and lags."""
    batch = make_batches(chips, 1)[0]
    module = tiny_module()
    modes = Recorder(lambda m, _: (m.student.training, m.teacher.training))
    losses = Recorder(losses_of)
    fit(module, [batch] * 8, 8, trainer_kwargs={"callbacks": [modes, losses]})
    totals = [v["loss"] for v in losses.values]
    assert len(totals) == 8 and all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.95 * totals[0]
    assert modes.values == [(True, False)] * 8
    assert not module.teacher.training
    student, teacher = params_of(module.student), params_of(module.teacher)
    assert not all(torch.equal(student[k], teacher[k]) for k in student)
    assert all(not p.requires_grad for p in module.teacher.parameters())


def test_eval_mode_warning_only_for_trained_modules(chips) -> None:
    """The teachers are in eval mode by design: Lightning's warning about eval-mode modules stays quiet for
    them, but a student block left in eval mode is still reported."""
    batches = make_batches(chips, 1)
    for leave_in_eval, expected in ((None, 0), ("0", 1)):
        module = tiny_module()
        module.train()
        if leave_in_eval is not None:
            module.student["backbone"].blocks[int(leave_in_eval)].eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(1).fit(module, DataLoader(batches, batch_size=None))
        assert sum("in eval mode at the start of training" in str(w.message) for w in caught) == expected


def test_optimizer_is_fused_adamw_over_the_student_only() -> None:
    """The fastest AdamW kernel (the benchmarks' "fused AdamW") on every device, over trainable student
    parameters."""
    module = tiny_module()
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert params == {id(p) for p in module.student.parameters()}


def test_progress_bar_loss_refreshes_with_the_logs_only(chips) -> None:
    """The progress bar shows a CPU copy of the loss taken on the steps that write the logs (every
    ``log_every_n_steps``): Lightning converts progress-bar values to numbers at every step, which for a
    GPU tensor is a host sync per step. ``train/total_loss`` is still logged at every step."""
    batches = make_batches(chips, 6)
    seen = Recorder(lambda m, out: (m.trainer.progress_bar_metrics.get("loss"), float(out["loss"])))
    logged = Recorder(lambda m, _: float(m.trainer.callback_metrics["train/total_loss"]))
    fit(tiny_module(), batches, 6, trainer_kwargs={"callbacks": [seen, logged], "log_every_n_steps": 3})
    bar = [shown for shown, _ in seen.values]
    losses = [loss for _, loss in seen.values]
    assert bar[:2] == [None, None]
    assert bar[2] == bar[3] == bar[4] == pytest.approx(losses[2], rel=1e-6)
    assert bar[5] == pytest.approx(losses[5], rel=1e-6) and losses[5] != losses[2]
    assert logged.values == pytest.approx(losses, rel=1e-6)


def test_ema_follows_formula_with_momentum_schedule(chips) -> None:
    batches = make_batches(chips, 2)
    module = tiny_module(momentum={"start": 0.5, "peak": 0.9, "warmup": 2})  # m = 0.5, then 0.7
    before = params_of(module.teacher)
    assert all(torch.equal(before[k], v) for k, v in params_of(module.student).items())
    states = Recorder(lambda m, _: (params_of(m.student), params_of(m.teacher)))
    fit(module, batches, 2, trainer_kwargs={"callbacks": [states]})
    (student0, teacher0), (student1, teacher1) = states.values
    for name in before:
        torch.testing.assert_close(
            teacher0[name], 0.5 * before[name] + 0.5 * student0[name], rtol=1e-6, atol=1e-7
        )
        torch.testing.assert_close(
            teacher1[name], 0.7 * teacher0[name] + 0.3 * student1[name], rtol=1e-6, atol=1e-7
        )
    assert not torch.equal(teacher1["backbone.cls_token"], student1["backbone.cls_token"])


def poisoned(batch: dict) -> dict:
    """The batch with one NaN pixel in its first global crop: every loss of the step becomes NaN."""
    crops = batch["collated_global_crops"].clone()
    crops[0, 0, 0, 0] = float("nan")
    return {**batch, "collated_global_crops": crops}


def optimizer_state(module: DINOv3Module) -> list[dict[str, torch.Tensor]]:
    """AdamW's step count and moments of every parameter, copied."""
    return [{k: v.clone() for k, v in s.items()} for s in module.trainer.optimizers[0].state.values()]


@pytest.mark.parametrize("clip_grad", [3.0, None])
def test_a_nonfinite_step_changes_nothing_and_training_goes_on(chips, clip_grad) -> None:
    """Step 1 sees a NaN pixel: its loss and gradients are NaN, and it leaves the student, the EMA teacher
    and AdamW's moments and step count as step 0 left them (with or without clipping, whose norms decide).
    Step 2 trains on from there."""
    batches = make_batches(chips, 3)
    batches[1] = poisoned(batches[1])
    module = tiny_module(clip_grad=clip_grad)
    states = Recorder(
        lambda m, out: (float(out["loss"]), params_of(m.student), params_of(m.teacher), optimizer_state(m))
    )
    fit(module, batches, 3, trainer_kwargs={"callbacks": [states]})
    (loss0, *after0), (loss1, *after1), (loss2, student2, _, adamw2) = states.values
    assert math.isnan(loss1) and math.isfinite(loss0) and math.isfinite(loss2)
    student0, teacher0, adamw0 = after0
    student1, teacher1, adamw1 = after1
    for before, after in [(student0, student1), (teacher0, teacher1)]:
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(adamw0, adamw1, strict=True) for k in a)
    assert {float(s["step"]) for s in adamw0} == {float(s["step"]) for s in adamw1} == {1.0}
    assert {float(s["step"]) for s in adamw2} == {2.0}
    assert all(torch.isfinite(v).all() for v in student2.values())
    assert not torch.equal(student2["backbone.cls_token"], student1["backbone.cls_token"])
    assert float(module.trainer.callback_metrics["train/skipped_steps"]) == 1.0


@pytest.mark.parametrize(
    ("log_every", "message"),
    [(1, "2 optimizer steps in a row before step 2"), (50, "4 optimizer steps in a row before step 4")],
)
def test_skipped_steps_in_a_row_stop_the_run_before_the_export(chips, tmp_path, log_every, message) -> None:
    """Every step NaN: the run stops at the first log after two skipped steps, or at the end of the epoch
    when no log came, with the weights of the start and without exporting a teacher."""
    batches = [poisoned(b) for b in make_batches(chips, 4)]
    module = tiny_module(max_skipped_steps=2)
    start = params_of(module.student)
    export = ExportTeacher(tmp_path / "teacher_checkpoint.pth")
    with pytest.raises(TrainingDiverged, match=f"DINOv3Module: {message}"):
        fit(module, batches, 4, trainer_kwargs={"callbacks": [export], "log_every_n_steps": log_every})
    assert all(torch.equal(start[k], v) for k, v in params_of(module.student).items())
    assert not (tmp_path / "teacher_checkpoint.pth").exists()


def grad_scaler(init_scale: float) -> MixedPrecision:
    """``16-mixed`` with a ``GradScaler`` on the CPU (Lightning makes one only for CUDA)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_16_mixed_clips_unscaled_gradients(chips) -> None:
    """Lightning leaves a fused optimizer's gradients scaled until its step; the norms (and so the clipping)
    are those of the unscaled gradients, as in float32 (scaled, they would be 1024 times larger)."""
    batches = make_batches(chips, 1)
    norms = {}
    for name, plugins in (("float32", []), ("16-mixed", [grad_scaler(2.0**10)])):
        module = tiny_module()
        fit(module, batches, 1, trainer_kwargs={"plugins": plugins})
        norms[name] = {k: float(v) for k, v in module.trainer.callback_metrics.items() if "grad_norm" in k}
    assert len(norms["float32"]) == 3
    # float16 rounding moves them by up to ~12 % here (the heads' norms); scaled, they would be x1024
    assert norms["16-mixed"] == pytest.approx(norms["float32"], rel=0.25)


@pytest.mark.parametrize(("init_scale", "stops"), [(2.0**16, False), (4.0, True)])
def test_16_mixed_stops_only_once_the_scale_is_below_one(chips, init_scale, stops) -> None:
    """Every step NaN under a GradScaler: each is skipped and halves the scale. From 2^16 the scale stays
    above 1 over these 5 steps (overflows that scaling may explain); from 4 it is 0.5 after step 2, and the
    run stops at the next check."""
    batches = [poisoned(b) for b in make_batches(chips, 5)]
    module = tiny_module(max_skipped_steps=2)
    start = params_of(module.student)
    run = partial(fit, module, batches, 5, trainer_kwargs={"plugins": [grad_scaler(init_scale)]})
    if stops:
        with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row before step 3"):
            run()
    else:
        run()
    assert all(torch.equal(start[k], v) for k, v in params_of(module.student).items())


def test_an_optimizer_that_cannot_skip_is_refused(chips) -> None:
    class Unfused(DINOv3Module):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.student.parameters(), foreach=True)

    with pytest.raises(TypeError, match=r"fused=True"):
        fit(Unfused(**tiny_module().hparams), make_batches(chips, 1), 1)


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


def test_param_group_lr_and_wd_follow_schedules(chips) -> None:
    module = tiny_module(
        lr={"start": 0.0, "peak": 1e-3, "warmup": 4},
        weight_decay={"peak": 0.04, "end": 0.4, "cosine": 4},
        freeze_last_layer=2,
        layer_decay=0.5,
        patch_embed_lr_mult=0.2,
    )
    seen: list[list[tuple[list[str], float, float]]] = []

    class Groups(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            seen.append([(g["names"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups])

    last_layer = Recorder(lambda m, _: m.student["dino_head"].last_layer.weight.detach().clone())
    initial_last_layer = module.student["dino_head"].last_layer.weight.detach().clone()
    fit(module, make_batches(chips, 5), 5, trainer_kwargs={"callbacks": [Groups(), last_layer]})

    assert len(seen) == 5
    for step, groups in enumerate(seen):
        lr = 1e-3 * step / 4 if step < 4 else 1e-3
        wd = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * min(step, 3) / 3))  # official linspace
        names = [n for group_names, _, _ in groups for n in group_names]
        assert len(names) == len(set(names)) == sum(1 for _ in module.student.parameters())
        for group_names, group_lr, group_wd in groups:
            for name in group_names:
                mult = expected_lr_multiplier(name, 2, 0.5, 0.2)
                frozen = name.endswith("last_layer.weight") and step < 2
                assert group_lr == pytest.approx(0.0 if frozen else lr * mult, abs=1e-15), (step, name)
                no_wd = name.endswith("bias") or "norm" in name or "gamma" in name
                assert group_wd == pytest.approx(0.0 if no_wd else wd, abs=1e-15), (step, name)
    # LR 0 keeps the last layer fixed for 2 steps (step 0 also has warmup LR 0), then it moves
    assert torch.equal(last_layer.values[1], initial_last_layer)
    assert not torch.equal(last_layer.values[2], initial_last_layer)


def test_gradient_clipping_per_submodule(chips) -> None:
    max_norm = 1e-3
    after: list[dict[str, float]] = []

    class Probe(DINOv3Module):
        def configure_gradient_clipping(
            self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
        ):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            after.append(
                {
                    name: float(
                        torch.linalg.vector_norm(
                            torch.stack([p.grad.norm() for p in m.parameters() if p.grad is not None])
                        )
                    )
                    for name, m in self.student.items()
                }
            )

    args = {**tiny_module().hparams, "clip_grad": max_norm}
    module = Probe(**args)
    fit(module, make_batches(chips, 2), 2)
    assert len(after) == 2
    for step in after:
        # each sub-module is clipped to max_norm on its own (one global clip would leave their
        # squared norms summing to max_norm²)
        assert step == pytest.approx(dict.fromkeys(step, max_norm), rel=1e-4)
    module = tiny_module()
    with pytest.raises(ValueError, match="clip_grad"):
        fit(module, make_batches(chips, 1), 1, trainer_kwargs={"gradient_clip_val": 1.0})


def test_gram_snapshot_and_refresh_schedule(chips) -> None:
    """Refresh after steps it with (it + 1) in {4, 6} (first 4, every 2, at most 2; 8 is over the cap)."""
    module = tiny_module(gram=True, gram_update_frequency=2, gram_first_update=4, gram_max_updates=2)
    init_teacher = params_of(module.teacher["backbone"])
    init_gram = params_of(module.gram_teacher["backbone"])
    assert all(torch.equal(init_gram[k], v) for k, v in init_teacher.items())
    states = Recorder(
        lambda m, out: (
            params_of(m.teacher["backbone"]),
            params_of(m.gram_teacher["backbone"]),
            int(m.gram_updates),
            float(out["gram_loss"]),
            m.gram_teacher.training,
        )
    )
    fit(module, make_batches(chips, 8, gram=True), 8, trainer_kwargs={"callbacks": [states]})
    teachers = [s[0] for s in states.values]
    source = {0: init_gram, 1: init_gram, 2: init_gram, 3: teachers[3], 4: teachers[3]}
    source.update(dict.fromkeys((5, 6, 7), teachers[5]))
    for step, (_, gram, count, loss, training) in enumerate(states.values):
        assert all(torch.equal(gram[k], source[step][k]) for k in gram), step
        assert count == (0 if step < 3 else 1 if step < 5 else 2)
        assert math.isfinite(loss) and not training
    assert not torch.equal(teachers[7]["cls_token"], teachers[5]["cls_token"])
    assert all(not p.requires_grad for p in module.gram_teacher.parameters())
    assert int(module.state_dict()["gram_updates"]) == 2


# ---------------------------------------------------------------- export and stage initialisation


def perturb_teacher(module: DINOv3Module, seed: int) -> None:
    """Moves the student away from its initialisation and the teacher towards it (one EMA step)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(torch.randn(p.shape, generator=gen), alpha=0.01)
    module.update_ema(0.5)


def test_export_teacher_reads_with_load_backbone(tmp_path: Path) -> None:
    """A full ViT-S/16 preset: the exported file loads with the ordinary backbone loader."""
    module = DINOv3Module(PRESET, drop_path_rate=0.0, **HEADS)
    perturb_teacher(module, 0)
    path = module.export_teacher(tmp_path / "stage1" / "teacher.pth")
    assert sorted(p.name for p in path.parent.iterdir()) == ["teacher.pth"]  # no temporary left behind
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["teacher"]
    assert {k.split(".")[0] for k in raw["teacher"]} == {"backbone", "dino_head", "ibot_head"}
    backbone = load_backbone(PRESET, weights=path)
    x = torch.randn(2, 3, 48, 64)
    want = module.teacher["backbone"].forward_features(x)
    have = backbone.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_storage_tokens"):
        assert torch.equal(have[key], want[key])
    assert not torch.equal(
        want["x_norm_clstoken"], module.student["backbone"].eval().forward_features(x)["x_norm_clstoken"]
    )


def test_export_of_an_overridden_architecture_loads_with_its_overrides(tmp_path: Path) -> None:
    """A tiny recipe's export (``backbone_overrides``) loads with ``load_backbone``'s same keywords."""
    module = tiny_module()
    perturb_teacher(module, 0)
    path = module.export_teacher(tmp_path / "teacher.pth")
    with pytest.raises(CheckpointError, match="does not fit preset"):
        load_backbone(PRESET, weights=path)
    backbone = load_backbone(PRESET, weights=path, **TINY)
    x = torch.randn(2, 3, 32, 48)
    want = module.teacher["backbone"].forward_features(x)["x_norm_patchtokens"]
    assert torch.equal(backbone.forward_features(x)["x_norm_patchtokens"], want)


def test_init_from_and_gram_from_load_previous_stage(tmp_path: Path) -> None:
    previous = tiny_module()
    perturb_teacher(previous, 1)
    path = previous.export_teacher(tmp_path / "teacher.pth")
    exported = previous.teacher.state_dict()

    torch.manual_seed(123)  # a different random initialisation, entirely replaced
    module = tiny_module(init_from=str(path), gram=True)
    for networks in (module.student, module.teacher):
        state = networks.state_dict()
        assert state.keys() == exported.keys()
        assert all(torch.equal(state[k], exported[k]) for k in state)
    gram = module.gram_teacher["backbone"].state_dict()
    assert all(torch.equal(v, exported[f"backbone.{k}"]) for k, v in gram.items())

    other = tiny_module(gram=True, gram_from=str(path))  # Gram teacher from the file, networks fresh
    gram = other.gram_teacher["backbone"].state_dict()
    assert all(torch.equal(v, exported[f"backbone.{k}"]) for k, v in gram.items())
    assert not torch.equal(other.teacher["backbone"].cls_token, gram["cls_token"])

    wrong = tmp_path / "wrong.pth"
    torch.save({"teacher": {k: v for k, v in exported.items() if not k.startswith("ibot_head")}}, wrong)
    with pytest.raises(CheckpointError, match="missing keys"):
        tiny_module(init_from=str(wrong))
    (tmp_path / "broken.pth").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read"):
        tiny_module(init_from=str(tmp_path / "broken.pth"))


class OptimizerAtStart(L.Callback):
    """A copy of the optimizer's state dict when training starts (after any restore or continuation)."""

    def on_train_start(self, trainer, module) -> None:
        self.state = copy.deepcopy(trainer.optimizers[0].state_dict())


def ids_by_name(optimizer_state: dict) -> dict[str, int]:
    """Parameter name -> id in an optimizer state dict of the module's named parameter groups."""
    groups = optimizer_state["param_groups"]
    return {name: pid for g in groups for name, pid in zip(g["names"], g["params"], strict=True)}


def test_continue_from_carries_networks_and_adamw_state_into_the_gram_stage(chips, tmp_path: Path) -> None:
    """The Gram stage continues a pretraining run's Lightning checkpoint, as the official stage continues its
    run: student, EMA teacher and AdamW moments exactly, the Gram teacher is that EMA teacher, this stage's
    own group hyper-parameters apply and the AdamW step count goes on. Resuming the continued stage from its
    own checkpoint keeps its own optimizer state."""
    checkpoints = {"enable_checkpointing": True}
    pretrain = ModelCheckpoint(dirpath=tmp_path / "pretrain", save_last=True)
    fit(tiny_module(), make_batches(chips, 2), 2, trainer_kwargs={"callbacks": [pretrain], **checkpoints})
    path = tmp_path / "pretrain" / "last.ckpt"
    saved = torch.load(path, weights_only=True)

    torch.manual_seed(5)  # a different random initialisation, entirely replaced
    stage = {"gram": True, "continue_from": str(path), "layer_decay": 0.9}
    module = tiny_module(**stage)
    state = module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved["state_dict"].items())
    gram = module.gram_teacher["backbone"].state_dict()
    assert all(torch.equal(v, saved["state_dict"][f"teacher.backbone.{k}"]) for k, v in gram.items())

    start = OptimizerAtStart()
    gram_ckpt = ModelCheckpoint(dirpath=tmp_path / "gram", save_last=True)
    fit(
        module,
        make_batches(chips, 2, gram=True),
        2,
        trainer_kwargs={"callbacks": [start, gram_ckpt], **checkpoints},
    )
    moments = saved["optimizer_states"][0]["state"]
    saved_ids, start_ids = ids_by_name(saved["optimizer_states"][0]), ids_by_name(start.state)
    assert saved_ids.keys() == start_ids.keys() and len(moments) == len(saved_ids)
    for name, pid in saved_ids.items():
        values = moments[pid]
        assert all(torch.equal(start.state["state"][start_ids[name]][key], values[key]) for key in values)
    groups = tiny_module(layer_decay=0.9).configure_optimizers().param_groups
    assert [g["lr_multiplier"] for g in start.state["param_groups"]] == [g["lr_multiplier"] for g in groups]
    assert {float(v["step"]) for v in module.trainer.optimizers[0].state.values()} == {4.0}  # 2 + 2 steps

    resumed = tiny_module(**stage)
    at_resume = OptimizerAtStart()
    fit(
        resumed,
        make_batches(chips, 2, gram=True),
        3,
        ckpt_path=tmp_path / "gram" / "last.ckpt",
        weights_only=True,
        trainer_kwargs={"callbacks": [at_resume]},
    )
    assert {float(v["step"]) for v in at_resume.state["state"].values()} == {4.0}

    with pytest.raises(ValueError, match="not both"):
        tiny_module(continue_from=str(path), init_from=str(path))
    with pytest.raises(CheckpointError, match=r"no such Lightning checkpoint.*run that stage first"):
        tiny_module(continue_from=str(tmp_path / "missing" / "last.ckpt"))
    with pytest.raises(CheckpointError, match="not a Lightning training checkpoint"):
        tiny_module(continue_from=str(module.export_teacher(tmp_path / "teacher.pth")))
    with pytest.raises(CheckpointError, match="does not fit"):
        tiny_module(continue_from=str(path), backbone_overrides={**TINY, "depth": 3})
    # Lightning's FSDP checkpoints number the parameters in the model's order: the moments move by name,
    # also into other parameter groups (a single group without layer decay)
    model_order = tmp_path / "fsdp.ckpt"
    groups = saved["optimizer_states"][0]["param_groups"]
    ids = sorted(pid for g in groups for pid in g["params"])
    renumber = dict(zip(ids, reversed(ids), strict=True))
    for group in groups:
        group["params"] = [renumber[pid] for pid in group["params"]]
    saved["optimizer_states"][0]["state"] = {renumber[pid]: state for pid, state in moments.items()}
    torch.save(saved, model_order)
    flat = tiny_module(continue_from=str(model_order), layer_decay=1.0)
    at_start = OptimizerAtStart()
    fit(flat, make_batches(chips, 1), 1, trainer_kwargs={"callbacks": [at_start]})
    assert len(at_start.state["param_groups"]) < len(start.state["param_groups"])
    start_ids = ids_by_name(start.state)
    for name, pid in ids_by_name(at_start.state).items():
        want = start.state["state"][start_ids[name]]
        assert all(torch.equal(at_start.state["state"][pid][key], want[key]) for key in want), name
    groups[0]["names"] = ["backbone.renamed", *groups[0]["names"][1:]]
    torch.save(saved, model_order)
    with pytest.raises(CheckpointError, match="other student parameters than this stage's"):
        fit(tiny_module(continue_from=str(model_order)), make_batches(chips, 1), 1)


# ---------------------------------------------------------------- exact resume


def test_resume_reproduces_losses_exactly(chips, tmp_path: Path) -> None:
    """Drop-path and RoPE rescaling on: steps 4-6 after resuming at step 3 equal the uninterrupted run."""
    batches = make_batches(chips, 3)  # one epoch = 3 steps, the same batches every epoch
    args = {"drop_path_rate": 0.3, "backbone_overrides": {**TINY, "pos_embed_rope_rescale_coords": 2}}
    full = tiny_module(**args)
    losses = Recorder(losses_of)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    fit(full, batches, 6, trainer_kwargs={"callbacks": [losses, ckpt], "enable_checkpointing": True})

    path = tmp_path / "step=3.ckpt"
    saved = torch.load(path, weights_only=True)  # plain hyper-parameters and optimizer groups
    assert saved["hyper_parameters"]["drop_path_rate"] == 0.3
    torch.manual_seed(99)
    resumed = tiny_module(**args)
    losses_resumed = Recorder(losses_of)
    fit(
        resumed, batches, 6, ckpt_path=path, weights_only=True, trainer_kwargs={"callbacks": [losses_resumed]}
    )

    assert len(losses.values) == 6
    assert losses_resumed.values == losses.values[3:]
    final, final_resumed = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(final[k], final_resumed[k]) for k in final)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_step_randomness_comes_from_seed_step_and_batch(chips) -> None:
    """Drop-path / RoPE draws are random, fixed by (seed, step, batch_idx), and leave the global RNG alone."""
    batch = make_batches(chips, 1)[0]
    module = tiny_module(drop_path_rate=0.3, backbone_overrides={**TINY, "pos_embed_rope_rescale_coords": 2})
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = losses_of(None, module.training_step(batch, 0))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(6)
    assert losses_of(None, module.training_step(batch, 0)) == first
    assert losses_of(None, module.training_step(batch, 1)) != first  # another micro-batch of the step
    module.hparams.seed = 1
    assert losses_of(None, module.training_step(batch, 0)) != first


def test_koleo_group_size_reaches_the_loss(chips) -> None:
    """One process, group = its batch: the per-batch KoLeo; a group that does not fit is refused."""
    batch = make_batches(chips, 1)[0]
    torch.manual_seed(0)
    plain = tiny_module().compute_losses(batch, 0)
    torch.manual_seed(0)
    grouped = tiny_module(koleo_group_size=BATCH).compute_losses(batch, 0)
    assert grouped["koleo_loss"].item() == pytest.approx(plain["koleo_loss"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="koleo_group_size"):
        tiny_module(koleo_group_size=2 * BATCH).compute_losses(batch, 0)
