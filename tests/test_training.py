"""End-to-end trainer tests on CPU with a tiny FROM model and a generated identity folder (seconds, no data)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, free_port
from fromface.errors import ConfigError, DataError
from fromface.training import checkpoint as ckpt_io
from fromface.training.config import config_from_dict
from fromface.training.data import EpochBatches, make_pairs, split_by_identity
from fromface.training.optim import lr_factor
from fromface.training.pack import PackedFaces, open_faces, pack_folder, scan_identity_folder
from fromface.training.trainer import Trainer

TINY = "test_tiny_ir"


def register_tiny(name: str = TINY, size: int = 32, widths: tuple[int, int, int] = (8, 16, 16)) -> None:
    """A 3-stage iResNet (a few thousand parameters) and its FROM variant, for fast CPU tests."""
    from fromface.models import Preprocess, get_spec, register_from_variant, register_model
    from fromface.models.iresnet import IResNet, Recognizer

    try:
        get_spec(name)
        return
    except ConfigError:
        pass

    @register_model(name, Preprocess(template="arcface112", size=(size, size)), f"tiny test net at {size}x{size}")
    def tiny(embedding_dim: int = 16) -> Recognizer:
        return Recognizer(IResNet((1, 1, 1), widths), (size, size), embedding_dim)

    register_from_variant(name)


def make_faces(root: Path, identities: int = 8, per_id: int = 5, size: int = 40, seed: int = 0) -> Path:
    """Random-ish images: each identity is a smooth colour field plus per-image noise."""
    import cv2

    rng = np.random.default_rng(seed)
    for i in range(identities):
        base = cv2.resize(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8), (size, size))
        folder = root / f"person_{i:02d}"
        folder.mkdir(parents=True)
        for j in range(per_id):
            img = np.clip(base.astype(int) + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(folder / f"{j}.png"), img)
    return root


def tiny_config(train: Path, out: Path, **sections) -> object:
    cfg = {
        "name": "tiny", "output_dir": str(out), "seed": 3, "threads": 1,
        "model": {"name": f"from_{TINY}", "kwargs": {"grid": 3}},
        "data": {"train": str(train), "val_identities": 2, "val_pairs": 20, "batch_size": 6},
        "occlusion": {"enabled": True},
        "optim": {"lr": 0.05, "clip_grad_norm": 10.0},
        "schedule": {"epochs": 3, "max_steps": 6, "kind": "step", "milestones": [1], "warmup_epochs": 0.5},
        "checkpoint": {"every_steps": 3, "every_epochs": 0, "keep_last": 5},
        "eval": {"every_epochs": 1, "select": "val_mean"},
        "log": {"every_steps": 1, "progress": False, "tensorboard": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(cfg)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    register_tiny()
    return make_faces(tmp_path_factory.mktemp("faces") / "train")


def test_losses_finite_and_decrease_on_repeated_batch(faces, tmp_path):
    trainer = Trainer(tiny_config(faces, tmp_path), progress=False)
    batch = next(iter(trainer.loader(0, 0)))
    assert batch.images.shape == (6, 3, 32, 32) and batch.maps is None
    trainer.set_train_mode()
    history = [trainer.train_step(batch) for _ in range(8)]
    assert all(np.isfinite(h[k]) for h in history for k in h)
    assert {"margin", "pattern", "total"} <= set(history[0])
    assert history[-1]["total"] < history[0]["total"]
    assert history[-1]["margin"] < history[0]["margin"]
    assert trainer.step == 8


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_checkpoint_and_exact_resume(faces, tmp_path):
    full = Trainer(tiny_config(faces, tmp_path / "full"), progress=False)
    # 34 training images / batch 6 -> 5 steps per epoch: the resumed run crosses an epoch boundary mid-way
    assert full.steps_per_epoch == 5
    summary = full.fit()
    assert summary["step"] == 6
    ckpts = ckpt_io.step_checkpoints(tmp_path / "full" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000003.pt", "step_00000006.pt"]
    assert (tmp_path / "full" / "checkpoints" / "config.yaml").is_file()
    assert json.loads((tmp_path / "full" / "checkpoints" / "run.json").read_text())["world_size"] == 1
    assert (tmp_path / "full" / "checkpoints" / "best.pt").is_file()
    mid = ckpt_io.read_checkpoint(ckpts[0])
    for key in ("model_name", "model_kwargs", "state_dict", "config", "step", "epoch", "optimizer", "scheduler",
                "rng", "best_metric"):
        assert key in mid
    assert mid["step"] == 3 and mid["epoch"] == 0 and mid["batch_in_epoch"] == 3

    resumed = Trainer(tiny_config(faces, tmp_path / "resumed"), resume=str(ckpts[0]), progress=False)
    assert resumed.step == 3
    assert resumed.scheduler.last_epoch == 3
    resumed.fit()
    end_full = ckpt_io.read_checkpoint(ckpts[1])
    end_resumed = ckpt_io.read_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000006.pt")
    assert end_resumed["step"] == 6 and end_resumed["epoch"] == 1
    a, b = _tensors(end_full["state_dict"]), _tensors(end_resumed["state_dict"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    mom_a = [s["momentum_buffer"] for s in end_full["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in end_resumed["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))
    assert torch.equal(end_full["rng"]["torch"], end_resumed["rng"]["torch"])
    assert Trainer(tiny_config(faces, tmp_path / "full"), resume="auto", progress=False).step == 6

    from fromface.evaluation.embedders import load_embedder  # the evaluation engineer's loader reads our format

    embedder = load_embedder(str(tmp_path / "full" / "checkpoints" / "best.pt"))
    assert embedder.model.name == f"from_{TINY}"


def test_batches_do_not_depend_on_loader_workers(faces, tmp_path):
    trainer = Trainer(tiny_config(faces, tmp_path), progress=False)
    serial = list(trainer.loader(1, 0))
    trainer.cfg.data.num_workers = 2
    parallel = list(trainer.loader(1, 0))
    assert len(serial) == len(parallel) == trainer.steps_per_epoch
    for a, b in zip(serial, parallel):
        for name in ("images", "labels", "patterns"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


#: Every module in eval mode while its weights train: batch-norm uses its running statistics and dropout is off, so a
#: rank's 3 images give the same gradient terms as those 3 images inside one process's batch of 6.
#: Plain SGD without clipping: the step is proportional to the gradient, so a summed (doubled) gradient shows.
FROZEN_STATS = {"groups": [{"prefix": "", "frozen_stats": True}], "name": "sgd", "momentum": 0.0,
                "clip_grad_norm": None}


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str, optim: dict | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    register_tiny()
    cfg = tiny_config(Path(data), Path(out), schedule={"max_steps": 3}, checkpoint={"every_steps": 2},
                      optim=optim or {})
    trainer = Trainer(cfg, progress=False)
    assert trainer.rt.backend == "gloo" and trainer.rt.world_size == world
    try:
        trainer.fit()
        params = {n: p.detach().clone() for n, p in trainer.task.named_parameters()}
        torch.save({"params": params, "step": trainer.step}, Path(out) / f"rank{rank}.pt")
    finally:
        trainer.close()


def test_ddp_two_gloo_ranks_end_identical(faces, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(faces), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["step"] == r1["step"] == 3
    start = Trainer(tiny_config(faces, tmp_path / "fresh"), progress=False).task.state_dict()
    changed = 0
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), name
        changed += not torch.equal(value, start[name])
    assert changed > 0  # the ranks trained (identically), they did not just keep the initial weights
    assert ckpt_io.read_checkpoint(tmp_path / "checkpoints" / "step_00000003.pt")["world_size"] == 2


def test_pack_round_trip_and_training_from_pack(faces, tmp_path):
    src = tmp_path / "src"
    make_faces(src, identities=4, per_id=3, seed=1)
    (src / "person_00" / "broken.jpg").write_bytes(b"not an image")
    pack = PackedFaces(pack_folder(src, tmp_path / "pack", (32, 32), progress=False))
    assert pack.images.shape == (12, 32, 32, 3) and pack.images.dtype == np.uint8
    assert len(pack.skipped) == 1 and "broken.jpg" in pack.skipped[0][0]
    assert pack.identities == [f"person_{i:02d}" for i in range(4)]
    assert np.bincount(pack.labels).tolist() == [3, 3, 3, 3]
    parallel = PackedFaces(pack_folder(src, tmp_path / "pack2", (32, 32), progress=False, workers=2))
    assert np.array_equal(np.asarray(parallel.images), np.asarray(pack.images)) and parallel.skipped == pack.skipped
    blob = pickle.dumps(pack)  # what a spawned loader worker receives: the index, not the pixels
    assert len(blob) < pack.images.nbytes and np.array_equal(pickle.loads(blob).image(5), pack.image(5))
    folder = open_faces(src, fmt="folder", size=(32, 32), template="arcface112")
    for row in (1, 4, 11):  # the pack's rows are the folder's images, decoded and resized the same way
        assert np.array_equal(folder.image(folder.files.index(src / pack.files[row])), pack.image(row))
    assert open_faces(tmp_path / "pack", size=(32, 32), template="arcface112").__class__ is PackedFaces
    broken = folder.files.index(src / "person_00" / "broken.jpg")
    with pytest.raises(DataError, match="broken.jpg: not a recognised image format.*fromface pack"):
        folder.image(broken)
    with pytest.raises(DataError, match="64x64"):
        open_faces(tmp_path / "pack", size=(64, 64), template="arcface112")
    packed = pack_folder(faces, tmp_path / "train_pack", (32, 32), progress=False)
    trainer = Trainer(tiny_config(packed, tmp_path / "run", schedule={"max_steps": 2}), progress=False)
    assert trainer.fit()["step"] == 2


def test_heic_photos_are_listed_and_skipped_with_how_to_convert_them(tmp_path):
    src = make_faces(tmp_path / "src", identities=2, per_id=2)
    (src / "person_01" / "phone.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16))  # an iPhone photo
    assert "phone.HEIC" in {p.name for p in scan_identity_folder(src).files}  # listed like the other scans list it
    pack = PackedFaces(pack_folder(src, tmp_path / "pack", (32, 32), progress=False))
    assert len(pack) == 4 and pack.skipped[0][0] == "person_01/phone.HEIC"
    assert "convert it to JPEG" in pack.skipped[0][1]
    folder = open_faces(src, fmt="folder", size=(32, 32))
    with pytest.raises(DataError, match="HEIC/HEIF images are not supported.*fromface pack"):
        folder.image(folder.files.index(src / "person_01" / "phone.HEIC"))


def test_bad_datasets_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_identity_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no identity sub-folders"):
        scan_identity_folder(tmp_path / "empty")
    loose = tmp_path / "loose"
    make_faces(loose, identities=1, per_id=2)
    for p in (loose / "person_00").iterdir():
        p.rename(loose / p.name)
    with pytest.raises(DataError, match="directly in it"):
        scan_identity_folder(loose)
    bad_pack = tmp_path / "bad_pack"
    bad_pack.mkdir()
    (bad_pack / "index.json").write_text("{not json")
    np.save(bad_pack / "images.npy", np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(DataError, match="index.json: not valid JSON"):
        PackedFaces(bad_pack)


def test_checkpoint_of_another_architecture_is_refused(faces, tmp_path):
    from fromface.models import create_model

    other = create_model("iresnet18")
    foreign = tmp_path / "foreign.pt"
    ckpt_io.atomic_save({"model_name": "iresnet18", "model_kwargs": {}, "state_dict": other.state_dict()}, foreign)
    cfg = tiny_config(faces, tmp_path / "run")
    with pytest.raises(ConfigError, match="resume needs the same model"):
        Trainer(cfg, resume=str(foreign), progress=False)
    with pytest.raises(ConfigError, match="another architecture"):
        Trainer(tiny_config(faces, tmp_path / "run2", model={"init": str(foreign)}), progress=False)
    with pytest.raises(ConfigError, match="not a fromface checkpoint"):
        torch.save({"weights": 1}, tmp_path / "x.pt")
        ckpt_io.read_checkpoint(tmp_path / "x.pt")


def test_baseline_initialises_its_from_variant_and_freeze_groups(faces, tmp_path):
    base = Trainer(tiny_config(faces, tmp_path / "base", model={"name": TINY, "kwargs": {}},
                               occlusion={"enabled": False}, schedule={"max_steps": 1},
                               eval={"select": "val_acc"}), progress=False)
    base.fit()
    last = ckpt_io.step_checkpoints(tmp_path / "base" / "checkpoints")[-1]
    cfg = tiny_config(faces, tmp_path / "from", model={"init": str(last)},
                      optim={"groups": [{"prefix": "backbone.", "freeze": True}, {"prefix": "head.", "lr_mult": 0.1}]})
    trainer = Trainer(cfg, progress=False)
    for name, value in ckpt_io.read_checkpoint(last)["state_dict"].items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
    assert not any(p.requires_grad for p in trainer.model.backbone.parameters())
    mults = sorted(g["lr_mult"] for g in trainer.optimizer.param_groups)
    assert mults[0] == pytest.approx(0.1) and mults[-1] == 1.0
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    trainer.fit()
    for k, v in trainer.model.backbone.state_dict().items():  # weights and BN statistics untouched
        assert torch.equal(v, before[k]), k
    with pytest.raises(ConfigError, match="matches no parameter"):
        Trainer(tiny_config(faces, tmp_path / "x", optim={"groups": [{"prefix": "trunk."}]}), progress=False)


def test_schedules_split_sampler_and_pairs():
    from fromface.training.config import ScheduleConfig

    step = ScheduleConfig(epochs=40, kind="step", milestones=[10, 25], gamma=0.1, warmup_epochs=1, warmup_start=0.0)
    assert lr_factor(0, 100, 4000, step) == 0.0
    assert lr_factor(50, 100, 4000, step) == pytest.approx(0.5)
    assert lr_factor(999, 100, 4000, step) == 1.0
    assert lr_factor(1000, 100, 4000, step) == pytest.approx(0.1)
    assert lr_factor(2500, 100, 4000, step) == pytest.approx(0.01)
    cos = ScheduleConfig(epochs=10, kind="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 10, 100, cos) == pytest.approx(1.0)
    assert lr_factor(50, 10, 100, cos) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, cos) == pytest.approx(0.1)

    labels = np.repeat(np.arange(20), 3)
    split = split_by_identity(labels, 0.2, seed=0)
    assert not set(labels[split.train_rows]) & set(split.val_labels)
    assert split.num_classes == 16 and sorted(set(split.train_labels)) == list(range(16))
    pairs = make_pairs(split.val_rows, split.val_labels, 20, seed=0)
    assert len(pairs) == 20 and pairs[:, 2].sum() == 10
    capped = make_pairs(split.val_rows, split.val_labels, 30, seed=0)  # only 4 x 3 distinct positives exist
    assert len(capped) == 24 and capped[:, 2].sum() == 12
    assert all((labels[a] == labels[b]) == bool(s) for a, b, s in pairs)

    full = [i for batch in EpochBatches(60, batch_size=12, seed=0, epoch=2) for i, _ in batch]
    ranks = [[i for batch in EpochBatches(60, batch_size=12, seed=0, epoch=2, rank=r, world=2) for i, _ in batch]
             for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(full) and not set(ranks[0]) & set(ranks[1])
    assert [b for b in EpochBatches(60, batch_size=12, seed=0, epoch=2, start=3)] == list(
        EpochBatches(60, batch_size=12, seed=0, epoch=2))[3:]
    with pytest.raises(ConfigError, match="divisible"):
        EpochBatches(60, batch_size=12, seed=0, epoch=0, world=5)


def test_cli_train_print_config_and_errors(faces, tmp_path, capsys):
    from fromface.cli.main import main

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    assert main(["train", str(config), "optim.lr=0.5", f"data.train={faces}", "--print-config"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert main(["train", str(config), "optim.lrr=0.5"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert main(["train", str(config), f"data.train={tmp_path}/nothing"]) == 2
    assert "training folder not found" in capsys.readouterr().err


def test_consistency_term_pulls_toward_a_frozen_teacher(faces, tmp_path):
    from fromface.models.outputs import FaceOutput
    from fromface.training.loss import FromLoss

    loss = FromLoss(4, 3, consistency_weight=0.5)
    emb = torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 0, 1])
    same = loss(FaceOutput(emb), labels, None, emb.clone())
    assert same["consistency"].item() == pytest.approx(0.0, abs=1e-6)
    opposite = loss(FaceOutput(emb), labels, None, -emb)
    assert opposite["consistency"].item() == pytest.approx(2.0, abs=1e-5)
    assert opposite["total"].item() == pytest.approx(opposite["margin"].item() + 1.0, abs=1e-4)
    assert "consistency" not in FromLoss(4, 3)(FaceOutput(emb), labels, None, emb)

    trainer = Trainer(tiny_config(faces, tmp_path, loss={"consistency_weight": 1.0}), progress=False)
    teacher_before = {k: v.clone() for k, v in trainer.task.teacher.state_dict().items()}
    batch = next(iter(trainer.loader(0, 0)))
    assert batch.clean.shape == batch.images.shape and batch.keys.shape == (6,)  # every image's clean twin, its key
    trainer.set_train_mode()
    parts = [trainer.train_step(batch) for _ in range(3)]
    assert all(np.isfinite(p["consistency"]) for p in parts) and parts[0]["consistency"] > 0
    for k, v in trainer.task.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # frozen, BN statistics included

    cached = Trainer(tiny_config(faces, tmp_path / "cached", loss={"consistency_weight": 1.0,
                                                                   "consistency_cache": True}), progress=False)
    batch = next(iter(cached.loader(0, 0)))
    clean, keys = batch.clean, batch.keys
    direct = cached.task.targets(clean, None)
    first = cached.task.targets(clean, keys)
    assert int(cached.task.cached.sum()) == len(set(keys.tolist()))
    again = cached.task.targets(torch.zeros_like(clean), keys)  # served from the cache, not recomputed
    assert torch.allclose(first, direct, atol=1e-5) and torch.equal(again, first)


SHARED = SHARED_DATA


@pytest.mark.data
@pytest.mark.data("celeba299", "occluders", "lfw/pairs.txt", "lfw/images")
def test_real_faces_aligned_once_real_occluders_and_lfw_report(tmp_path):
    from fromface.training.logs import read_log

    register_tiny()
    folder = tmp_path / "celeba"
    folder.mkdir()
    for ident in sorted(p for p in (SHARED / "celeba299").iterdir() if p.is_dir())[:6]:
        (folder / ident.name).symlink_to(ident, target_is_directory=True)
    lfw = SHARED / "lfw"
    overrides = dict(
        data={"aligned": False, "cache_dir": str(tmp_path / "cache"), "val_identities": 2, "batch_size": 8},
        occlusion={"occluders": str(SHARED / "occluders"), "preset": "paper"},
        eval={"pair_sets": [{"name": "lfw", "pairs": str(lfw / "pairs.txt"), "root": str(lfw / "images"),
                             "limit": 20}]},
        schedule={"max_steps": 2},
    )
    trainer = Trainer(tiny_config(folder, tmp_path / "run", **overrides), progress=False)
    packs = list((tmp_path / "cache").iterdir())
    assert len(packs) == 1 and (packs[0] / "images.npy").is_file()
    assert trainer.source.images.shape[1:] == (32, 32, 3)
    labels = [trainer.dataset.sample(i, 0)[1] for i in range(24)]
    assert any(label > 0 for label in labels) and 0 in labels  # real occluders and ~1/3 clean
    trainer.fit()
    evals = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["kind"] == "eval"]
    assert 0.0 <= evals[-1]["lfw_acc"] <= 1.0 and "lfw_auc" in evals[-1] and "val_occ_acc" in evals[-1]
    stamp = (packs[0] / "images.npy").stat().st_mtime_ns
    Trainer(tiny_config(folder, tmp_path / "run2", **overrides), progress=False)  # reuses the cached pack
    assert (packs[0] / "images.npy").stat().st_mtime_ns == stamp


def test_run_log_writes_json_lines_and_optional_tensorboard(tmp_path):
    from fromface.training import load_model  # lazy public exports resolve
    from fromface.training.logs import RunLog, read_log

    assert callable(load_model)
    log = RunLog(tmp_path, enabled=True, tensorboard=True)
    log.write("train", 3, {"total": 1.5, "lr": 0.1, "note": "x"})
    log.close()
    assert read_log(tmp_path / "log.jsonl")[0] | {"time": 0} == {"kind": "train", "step": 3, "time": 0, "total": 1.5,
                                                                  "lr": 0.1, "note": "x"}
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert log.writer is None and not (tmp_path / "tensorboard").exists()
    else:  # the scalars read back through TensorBoard's own reader
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("train/total")] == [(3, 1.5)]
    RunLog(tmp_path / "rank1", enabled=False).write("train", 1, {"total": 1.0})
    assert not (tmp_path / "rank1").exists()


def test_channels_last_trains_the_same_model(faces, tmp_path):
    base = Trainer(tiny_config(faces, tmp_path / "a"), progress=False)
    nhwc = Trainer(tiny_config(faces, tmp_path / "b", channels_last=True), progress=False)
    assert nhwc.model.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    batch = next(iter(base.loader(0, 0)))
    for trainer in (base, nhwc):
        trainer.set_train_mode()
        for module in trainer.model.modules():  # dropout masks follow memory order: switch it off to compare
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    a, b = base.train_step(batch), nhwc.train_step(batch)
    assert a["total"] == pytest.approx(b["total"], rel=1e-4)  # same seed, same weights, other memory layout
    after_a, after_b = base.model.state_dict(), nhwc.model.state_dict()
    assert all(torch.allclose(after_a[k].float(), after_b[k].float(), atol=1e-4) for k in after_a)


def test_paper_from_config_builds_the_papers_trainer(tmp_path):
    """The shipped stage-2 config, pointed at a tiny pack, gives the paper's optimiser and schedule."""
    from fromface.training.config import load_config

    src = make_faces(tmp_path / "faces", identities=6, per_id=4, size=96)
    pack = pack_folder(src, tmp_path / "pack", (112, 96), progress=False)
    config = Path(__file__).resolve().parents[1] / "configs" / "paper" / "from_lresnet50e_ir.yaml"
    cfg = load_config(config, [f"data.train={pack}", "data.batch_size=4", "data.val_identities=2",
                               "data.val_pairs=10", "data.num_workers=0", "model.init=null",
                               "occlusion.occluders=null", f"output_dir={tmp_path / 'run'}", "log.progress=false"])
    trainer = Trainer(cfg, progress=False)
    assert trainer.model.model_name == "from_lresnet50e_ir" and trainer.model.grid == 5
    assert trainer.model.pattern_head.fc.out_features == 226
    assert all(p.requires_grad for p in trainer.model.parameters())  # nothing frozen
    sgd = trainer.optimizer
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    assert {g["weight_decay"] for g in sgd.param_groups} == {0.0, 5e-4}  # no decay on biases / norm weights
    spe = trainer.steps_per_epoch
    assert trainer.total_steps == 40 * spe
    lrs = [0.01 * trainer.scheduler.lr_lambdas[0](e * spe) for e in (0, 9, 10, 24, 25, 39)]
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])
    assert trainer.dataset.clean_prob == pytest.approx(1 / 3) and trainer.dataset.vocab is not None


def test_ddp_averages_gradients_like_one_process_on_the_global_batch(faces, tmp_path):
    """Two gloo ranks of 3 images each end where one process with the same 6 images per step ends: DDP averages
    the ranks' gradients (a sum would double every step)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(faces), str(tmp_path / "ddp"), FROZEN_STATS), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp" / "rank0.pt")["params"]
    single = Trainer(tiny_config(faces, tmp_path / "one", schedule={"max_steps": 3}, checkpoint={"every_steps": 2},
                                 optim=FROZEN_STATS), progress=False)
    start = {n: p.detach().clone() for n, p in single.task.named_parameters()}
    single.fit()
    moved = 0
    for name, value in single.task.named_parameters():
        torch.testing.assert_close(ddp[name], value.detach(), rtol=1e-4, atol=1e-5, msg=name)
        moved += not torch.allclose(value.detach(), start[name])
    assert moved > 0


def _scripted_validation(monkeypatch, by_step: dict[int, float]) -> list:
    """Validation returns ``by_step[trainer.step]`` as every metric, whatever the weights: which checkpoint is best
    is then known in advance. Returns the list the test appends its trainers to."""
    import fromface.training.trainer as trainer_module

    trainers: list = []

    def scripted(*args, **kwargs) -> dict[str, float]:
        value = by_step[trainers[-1].step]
        return {"val_acc": value, "val_occ_acc": value, "val_mean": value}

    monkeypatch.setattr(trainer_module, "validate", scripted)
    return trainers


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return _tensors(ckpt_io.read_checkpoint(path)["state_dict"])


def test_best_checkpoint_is_the_best_epoch_also_across_a_stop_and_resume(faces, tmp_path, monkeypatch):
    import signal

    trainers = _scripted_validation(monkeypatch, {5: 0.5, 10: 0.9, 15: 0.7})  # the 2nd of 3 epochs is best
    sections = {"schedule": {"max_steps": None, "epochs": 3},
                "checkpoint": {"every_steps": None, "every_epochs": 1, "keep_last": 10}}
    trainers.append(Trainer(tiny_config(faces, tmp_path / "full", **sections), progress=False))
    assert trainers[-1].fit()["best_metric"] == 0.9
    best = ckpt_io.read_checkpoint(tmp_path / "full" / "checkpoints" / "best.pt")
    assert (best["step"], best["epoch"], best["best_metric"], best["metric"]) == (10, 2, 0.9, "val_mean")
    epoch_end = _weights(tmp_path / "full" / "checkpoints" / "step_00000010.pt")
    assert all(torch.equal(v, epoch_end[k]) for k, v in _tensors(best["state_dict"]).items())
    assert not all(torch.equal(v, epoch_end[k]) for k, v in _weights(tmp_path / "full" / "checkpoints" /
                                                                      "step_00000015.pt").items())

    cfg = tiny_config(faces, tmp_path / "stopped", **sections)
    trainers.append(Trainer(cfg, progress=False))
    step = trainers[-1].train_step

    def step_then_signal(batch):
        out = step(batch)
        if trainers[-1].step == 12:  # after the best epoch's evaluation, before the last one
            signal.raise_signal(signal.SIGINT)
        return out

    trainers[-1].train_step = step_then_signal
    with pytest.raises(KeyboardInterrupt, match="stopped at step 12"):
        trainers[-1].fit()
    trainers.append(Trainer(cfg, resume="auto", progress=False))
    assert trainers[-1].best_metric == 0.9  # restored: the last epoch's 0.7 must not become "best"
    trainers[-1].fit()
    resumed = ckpt_io.read_checkpoint(tmp_path / "stopped" / "checkpoints" / "best.pt")
    assert (resumed["step"], resumed["best_metric"]) == (10, 0.9)
    assert all(torch.equal(v, epoch_end[k]) for k, v in _tensors(resumed["state_dict"]).items())


@pytest.mark.parametrize(("keep_last", "kept"), [(2, [5, 6]), (1, [6]), (10, [1, 2, 3, 4, 5, 6])])
def test_keep_last_prunes_old_step_checkpoints_only(faces, tmp_path, keep_last, kept):
    cfg = tiny_config(faces, tmp_path, checkpoint={"every_steps": 1, "keep_last": keep_last})
    Trainer(cfg, progress=False).fit()
    folder = tmp_path / "checkpoints"
    assert [int(p.stem.split("_")[1]) for p in ckpt_io.step_checkpoints(folder)] == kept
    assert (folder / "best.pt").is_file() and (folder / "config.yaml").is_file()
    with pytest.raises(ConfigError, match="'checkpoint.keep_last' must be >= 1"):
        tiny_config(faces, tmp_path, checkpoint={"keep_last": 0})


def test_stop_request_saves_a_checkpoint_and_resume_finishes(faces, tmp_path):
    import signal

    cfg = tiny_config(faces, tmp_path, checkpoint={"every_steps": 100})
    trainer = Trainer(cfg, progress=False)
    step = trainer.train_step

    def step_then_signal(batch):
        out = step(batch)
        if trainer.step == 2:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: handled, training finishes this step
        return out

    trainer.train_step = step_then_signal
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN under nohup
    with pytest.raises(KeyboardInterrupt, match="stopped at step 2"):
        trainer.fit()
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the handlers found are restored
    assert [p.name for p in ckpt_io.step_checkpoints(tmp_path / "checkpoints")] == ["step_00000002.pt"]
    assert Trainer(cfg, resume="auto", progress=False).fit()["step"] == 6


def test_gradient_accumulation_matches_the_whole_batch(faces, tmp_path):
    whole = Trainer(tiny_config(faces, tmp_path / "a"), progress=False)
    split = Trainer(tiny_config(faces, tmp_path / "b", data={"accumulate": 3}), progress=False)
    batch = next(iter(whole.loader(0, 0)))
    for trainer in (whole, split):
        trainer.task.eval()  # batch-norm on running statistics and no dropout: chunking must not matter
    a, b = whole.train_step(batch), split.train_step(batch)
    assert a["total"] == pytest.approx(b["total"], rel=1e-5)
    after_a, after_b = whole.model.state_dict(), split.model.state_dict()
    assert all(torch.allclose(after_a[k].float(), after_b[k].float(), atol=1e-6) for k in after_a)
    assert not torch.equal(after_a["head.fc.weight"], Trainer(tiny_config(faces, tmp_path / "c"),
                                                              progress=False).model.state_dict()["head.fc.weight"])
    with pytest.raises(ConfigError, match="accumulate=4"):
        Trainer(tiny_config(faces, tmp_path / "d", data={"accumulate": 4}), progress=False)


def test_training_on_stored_trunk_outputs(faces, tmp_path):
    """feature_cache_variants: lower trunk frozen and run once per stored version; the rest trains on its maps."""
    from fromface.training.feature_cache import StoredFaces

    sections = {"data": {"feature_cache_variants": 2, "cache_dir": str(tmp_path / "cache")},
                "model": {"kwargs": {"grid": 3, "mask_stage": 2}},
                "loss": {"consistency_weight": 1.0}}
    trainer = Trainer(tiny_config(faces, tmp_path / "a", **sections), progress=False)
    assert isinstance(trainer.dataset, StoredFaces) and trainer.task.teacher is None
    model = trainer.model
    assert not any(p.requires_grad for p in model.backbone.parameters())  # the mask is on the last stage
    folders = list((tmp_path / "cache").glob("features-*"))
    assert len(folders) == 1 and not list((tmp_path / "cache").glob("*.tmp*"))

    # version v of image i is exactly TrainFaces.sample(i, v): same flip and occluder as on-the-fly training
    faces_ds, stored = trainer_faces(trainer), trainer.dataset
    i, epoch = 3, 0
    v = (epoch + int(stored.offsets[i])) % stored.variants
    image, pattern, clean, _, _, _ = faces_ds.sample(i, v)
    p = trainer.preprocess
    item = stored[(i, epoch)]
    maps, target, shift = item.maps, item.targets, item.shifts
    assert item.images is None and item.clean is None
    model.eval()
    with torch.no_grad():
        want = model.backbone.forward_until(torch.from_numpy(p.to_input(image)), model.mask_stage)[-1][0]
        want_target = model(torch.from_numpy(p.to_input(clean))).features[0]
    assert len(maps) == 3 and torch.allclose(maps[-1], want, atol=2e-2, rtol=2e-3) and int(item.patterns) == pattern
    assert torch.allclose(target, want_target, atol=1e-4) and int(item.labels) == int(trainer.split.train_labels[i])
    assert not shift.any()  # no re-alignment: every crop is where the clean alignment put it
    assert int(stored[(i, epoch + 1)].patterns) == int(stored.patterns[i * 2 + (v + 1) % 2])  # next epoch: the other

    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.set_train_mode()
    parts = [trainer.train_step(next(iter(trainer.loader(0, 0)))) for _ in range(2)]
    assert parts[0]["consistency"] > 0 and "pattern" in parts[0]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["mask_decoder.body.0.weight"], after["mask_decoder.body.0.weight"])

    again = Trainer(tiny_config(faces, tmp_path / "b", **sections), progress=False)  # reuses the stored files
    assert list((tmp_path / "cache").glob("features-*")) == folders and len(again.dataset) == len(stored)
    other = Trainer(tiny_config(faces, tmp_path / "c", **{**sections, "occlusion": {"clean_prob": 0.9}}),
                    progress=False)
    assert len(list((tmp_path / "cache").glob("features-*"))) == 2 and isinstance(other.dataset, StoredFaces)
    from fromface.training.feature_cache import fingerprint, stored_outputs_key

    key = fingerprint(stored_outputs_key(again.cfg, again.model, len(again.dataset)))
    assert folders[0].name == f"features-{key}"
    with torch.no_grad():  # new trunk weights (say, an updated package) must not reuse the stored maps
        next(again.model.backbone.parameters()).add_(1.0)
    assert fingerprint(stored_outputs_key(again.cfg, again.model, len(again.dataset))) != key
    summary = again.fit()
    assert summary["step"] == 6 and Path(summary["last_checkpoint"]).exists()


def trainer_faces(trainer):
    from fromface.training.data import TrainFaces

    return TrainFaces(trainer.source, trainer.split.train_rows, trainer.split.train_labels,
                      preprocess=trainer.preprocess, seed=trainer.cfg.seed, flip=trainer.cfg.data.flip,
                      occluder=trainer.occluder, clean_prob=trainer.cfg.occlusion.clean_prob, grid=trainer.grid)


def test_photometric_augmentation_changes_the_photo_not_the_labels_or_the_teacher(faces, tmp_path):
    """data.grayscale_prob / colour_jitter: the training image changes after occlusion; its pattern label, the clean
    twin (the consistency teacher's input) and the occlusion drawn before it stay as without them."""
    from fromface.training.data import TrainFaces, photometric
    from fromface.training.feature_cache import stored_outputs_key

    occ = {"occlusion": {"enabled": True, "clean_prob": 0.5}}
    plain = Trainer(tiny_config(faces, tmp_path / "a", **occ), progress=False)
    grey = Trainer(tiny_config(faces, tmp_path / "b", data={"grayscale_prob": 1.0, "colour_jitter": 0.3}, **occ),
                   progress=False)
    assert (grey.dataset.grayscale_prob, grey.dataset.colour_jitter) == (1.0, 0.3)  # the trainer passes them on
    kw = dict(preprocess=plain.preprocess, seed=0, occluder=plain.occluder, clean_prob=0.5, grid=plain.grid)
    a = TrainFaces(plain.source, plain.split.train_rows, plain.split.train_labels, **kw)
    b = TrainFaces(plain.source, plain.split.train_rows, plain.split.train_labels, grayscale_prob=1.0,
                   colour_jitter=0.3, **kw)
    patterns = set()
    for i in range(len(a)):
        image_a, pattern_a, clean_a, flip_a, _, covered_a = a.sample(i, 0)
        image_b, pattern_b, clean_b, flip_b, _, covered_b = b.sample(i, 0)
        assert (pattern_a, flip_a) == (pattern_b, flip_b) and np.array_equal(covered_a, covered_b)
        assert np.array_equal(clean_a, clean_b)  # the teacher sees the untouched face
        assert (image_b[..., 0] == image_b[..., 1]).all() and (image_b[..., 1] == image_b[..., 2]).all()
        assert not (image_a[..., 0] == image_a[..., 1]).all()
        patterns.add(pattern_a)
    assert len(patterns) > 1  # both clean and occluded faces were drawn
    # the photometric options are part of what stored trunk outputs depend on, and absent when unset
    key_plain = stored_outputs_key(plain.cfg, plain.model, 10)
    key_grey = stored_outputs_key(grey.cfg, grey.model, 10)
    assert "photometric" not in key_plain and key_grey["photometric"] == {"grayscale_prob": 1.0, "colour_jitter": 0.3}

    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    dim = [photometric(image, np.random.default_rng(s), grayscale_prob=0.0, jitter=0.5) for s in range(4)]
    assert all(d.dtype == np.uint8 and d.shape == image.shape for d in dim)
    assert all(not np.array_equal(d, image) for d in dim) and len({d.tobytes() for d in dim}) == 4
    assert np.array_equal(photometric(image, np.random.default_rng(1), grayscale_prob=0.0, jitter=0.5), dim[1])
    with pytest.raises(ConfigError, match="data.grayscale_prob"):
        tiny_config(faces, tmp_path / "c", data={"grayscale_prob": 1.5})


def test_from_without_mask_is_the_split_trunk():
    from fromface.models import create_model

    register_tiny()
    plain = create_model(f"from_{TINY}", use_mask=False, grid=3).eval()
    assert plain.mask_decoder is None and plain.pattern_head is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = plain(x)
        direct = plain.head(plain.backbone(x)[-1])
    assert out.mask is None and out.pattern_logits is None and torch.allclose(out.embedding, direct, atol=1e-6)


def test_low_rank_head_adapter_starts_as_identity_and_trains():
    import copy

    from fromface.models import create_model

    register_tiny()
    plain = create_model(f"from_{TINY}", grid=3).eval()
    adapted = create_model(f"from_{TINY}", grid=3, head_rank=2).eval()
    adapted.load_state_dict(plain.state_dict(), strict=False)
    assert {k for k in adapted.state_dict() if k not in plain.state_dict()} == {
        "head_adapter.down.weight", "head_adapter.up.weight"}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(adapted(x).embedding, plain(x).embedding, atol=1e-6)  # up starts at zero
        adapted.head_adapter.up.weight.normal_()
        changed = adapted(x).embedding
        assert not torch.allclose(changed, plain(x).embedding, atol=1e-3)
        twin = copy.deepcopy(adapted)  # the copy's hook uses the copy's adapter, not the original's
        twin.head_adapter.up.weight.zero_()
        assert torch.allclose(twin(x).embedding, plain(x).embedding, atol=1e-6)
        assert torch.allclose(adapted(x).embedding, changed)


def test_the_mask_learns_the_occluders_pixels_on_the_fly_and_from_stored_outputs(faces, tmp_path):
    """loss.mask_truth: occluder: each version's occluder pixels reach the loss, stored as coverage per mask cell."""
    import torch.nn.functional as F

    truth = {"loss": {"mask_weight": 1.0, "mask_truth": "occluder", "pattern_weight": 0.0},
             "model": {"kwargs": {"grid": 3, "mask_stage": 2}}}
    live = Trainer(tiny_config(faces, tmp_path / "live", **truth), progress=False)
    batch = next(iter(live.loader(0, 0)))
    h, w = live.preprocess.size
    assert batch.covered.shape == (6, h, w) and batch.covered.amax() == 1.0
    assert [bool(c.any()) for c in batch.covered] == [bool(p > 0) for p in batch.patterns]
    assert "mask" in live.train_step(batch)

    stored_cfg = dict(truth, data={"feature_cache_variants": 2, "cache_dir": str(tmp_path / "cache")})
    trainer = Trainer(tiny_config(faces, tmp_path / "stored", **stored_cfg), progress=False)
    [folder] = (tmp_path / "cache").glob("features-*")
    covered = np.load(folder / "covered.npy")
    mask_hw = trainer.dataset.maps[-1].shape[2:]
    assert covered.shape == (len(trainer.dataset) * 2, *mask_hw)
    i, epoch = 4, 1
    v = (epoch + int(trainer.dataset.offsets[i])) % 2
    pixels = trainer_faces(trainer).sample(i, v)[5]
    want = F.adaptive_avg_pool2d(torch.from_numpy(pixels.astype(np.float32))[None, None], mask_hw)[0, 0]
    item = trainer.dataset[(i, epoch)]
    assert torch.allclose(item.covered, want, atol=1 / 255) and (item.covered.sum() > 0) == (item.patterns > 0)
    assert covered.max() == 255 and not covered[np.asarray(trainer.dataset.patterns) == 0].any()
    trainer.set_train_mode()
    assert trainer.train_step(next(iter(trainer.loader(0, 0))))["mask"] > 0
    os.remove(folder / "covered.npy")  # a store made before the occluder pixels were stored is refused
    with pytest.raises(ConfigError, match="without the occluders' pixels.*delete the folder"):
        Trainer(tiny_config(faces, tmp_path / "stored2", **stored_cfg), progress=False)
    with pytest.raises(ConfigError, match="loss.mask_truth"):
        Trainer(tiny_config(faces, tmp_path / "bad", loss={"mask_truth": "box"}), progress=False)


def test_mask_loss_without_a_mask_is_a_config_error(faces, tmp_path):
    cfg = tiny_config(faces, tmp_path, model={"kwargs": {"grid": 3, "use_mask": False}}, loss={"mask_weight": 1.0})
    with pytest.raises(ConfigError, match="mask_weight"):
        Trainer(cfg, progress=False)


TINY112 = "test_tiny_ir112"


def register_tiny112() -> None:
    """The tiny iResNet at the arcface112 template's own size (context packs need crops at template size)."""
    register_tiny(TINY112, 112, (4, 8, 8))


class _FixedDetector:
    """Finds one face with the given landmarks (or none), whatever the image."""

    score_threshold = 0.6

    def __init__(self, landmarks):
        self.landmarks = landmarks

    def detect(self, image_rgb, score_threshold=None):
        from fromface.faces.detection import Detection

        if self.landmarks is None:
            return []
        h, w = image_rgb.shape[:2]
        return [Detection(np.array([0.0, 0.0, w, h]), 0.9, np.asarray(self.landmarks, dtype=np.float64))]


@pytest.mark.data("celeba299", "occluders")
def test_context_pack_and_realigned_occlusion(tmp_path):
    from fromface.faces.aligner import FaceAligner
    from fromface.training.data import RealigningOccluder, SynthesizerOccluder

    register_tiny112()
    folder = tmp_path / "celeba"
    folder.mkdir()
    for ident in sorted(p for p in (SHARED / "celeba299").iterdir() if p.is_dir())[:4]:
        (folder / ident.name).symlink_to(ident, target_is_directory=True)
    bare = PackedFaces(pack_folder(folder, tmp_path / "bare", (112, 112), "arcface112", aligned=False,
                                   fallback=True, progress=False))
    wide = PackedFaces(pack_folder(folder, tmp_path / "wide", (112, 112), "arcface112", aligned=False,
                                   fallback=True, progress=False, context=2.0))
    assert wide.context == 2.0 and wide.images.shape[1:] == (224, 224, 3) and wide.files == bare.files
    for row in (0, len(wide) - 1):  # the crop is the canvas's centre window, as a bare pack stores it
        assert np.median(np.abs(wide.image(row).astype(int) - bare.image(row).astype(int))) == 0
        assert np.array_equal(wide.context_image(row)[56:168, 56:168], wide.image(row))
    with pytest.raises(DataError, match="--context 2"):
        bare.context_image(0)
    with pytest.raises(DataError, match="template's own size"):
        pack_folder(folder, tmp_path / "small", (32, 32), "arcface112", aligned=False, context=2.0)

    synth = SynthesizerOccluder(str(SHARED / "occluders"), size=(112, 112), preset="face-train", template="arcface112")
    occ = RealigningOccluder(synth, "arcface112", 2.0)
    canvas = wide.context_image(3)
    occluded = synth.synth.occlude(canvas, np.random.default_rng(5), face_box=occ.box, landmarks=occ.landmarks)
    shift = 6  # a detector that puts every point 6 px to the right of where the clean alignment has them
    occ._aligner = FaceAligner("arcface112", select="central", detector=_FixedDetector(occ.landmarks + [shift, 0]))
    crop, mask, moved = occ(canvas, np.random.default_rng(5))
    assert np.array_equal(crop[:, :-shift], occluded.image[56:168, 56 + shift:168])
    assert np.array_equal(mask[:, :-shift], occluded.mask[56:168, 56 + shift:168]) and mask.any()
    assert np.allclose(moved, [-shift / 112, 0], atol=1e-6)  # the clean points lie 6 px left in this crop
    occ.refine = lambda crops: np.tile([[-shift / 112, 0.0]], (len(crops), 5, 1))  # an align head undoing the shift
    crop, mask, moved = occ(canvas, np.random.default_rng(5))
    assert np.abs(crop.astype(int) - occluded.image[56:168, 56:168]).max() <= 1 and not np.abs(moved).max() > 1e-6
    occ.refine = None
    occ._aligner = FaceAligner("arcface112", select="central", detector=_FixedDetector(None))
    crop, mask, _ = occ(canvas, np.random.default_rng(5))  # no face found: the clean alignment is kept
    assert np.array_equal(crop, occluded.image[56:168, 56:168]) and np.array_equal(mask, occluded.mask[56:168, 56:168])
    occ._aligner = None
    assert pickle.loads(pickle.dumps(occ))(canvas, np.random.default_rng(5))[0].shape == (112, 112, 3)  # real YuNet

    overrides = dict(model={"name": f"from_{TINY112}", "kwargs": {"grid": 3}},
                     occlusion={"occluders": str(SHARED / "occluders"), "preset": "face-train", "realign": True},
                     data={"val_identities": 2, "val_pairs": 10, "batch_size": 6}, schedule={"max_steps": 1})
    with pytest.raises(ConfigError, match="--context 2"):
        Trainer(tiny_config(tmp_path / "bare", tmp_path / "run_bare", **overrides), progress=False)
    trainer = Trainer(tiny_config(tmp_path / "wide", tmp_path / "run", **overrides), progress=False)
    assert isinstance(trainer.occluder, RealigningOccluder)
    labels = [trainer.dataset.sample(i, 0)[1] for i in range(12)]
    assert any(label > 0 for label in labels)
    trainer.fit()

    # FROM's align head learns, from the stored maps, where re-detection moved each crop
    head = {"name": f"from_{TINY112}", "kwargs": {"grid": 3, "align_head": True}}
    stored = dict(overrides, model=head, loss={"align_weight": 1.0}, optim={"name": "adamw", "lr": 1e-3},
                  schedule={"max_steps": 10, "kind": "cosine", "warmup_epochs": 0},
                  data={**overrides["data"], "feature_cache_variants": 2, "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(ConfigError, match="align head"):
        Trainer(tiny_config(tmp_path / "wide", tmp_path / "r1", **{**stored, "model": overrides["model"]}))
    with pytest.raises(ConfigError, match="occlusion.realign"):
        Trainer(tiny_config(tmp_path / "wide", tmp_path / "r2", **{**stored, "occlusion": {"realign": False}}))
    trainer = Trainer(tiny_config(tmp_path / "wide", tmp_path / "run_align", **stored), progress=False)
    [folder] = (tmp_path / "cache").glob("features-*")
    shifts = np.load(folder / "shifts.npy")
    assert np.abs(shifts).max() > 0.005 and not shifts[np.asarray(trainer.dataset.patterns) == 0].any()
    os.remove(folder / "shifts.npy")  # a store made before shifts were stored is refused, not patched
    with pytest.raises(ConfigError, match="without landmark shifts.*delete the folder"):
        Trainer(tiny_config(tmp_path / "wide", tmp_path / "run_align2", **stored), progress=False)
    trainer.set_train_mode()
    batch = next(iter(trainer.loader(0, 0)))
    assert batch.maps is not None and batch.shifts.shape == (6, 5, 2)
    parts = [trainer.train_step(batch) for _ in range(6)]
    assert parts[0]["align"] > 0 and parts[-1]["align"] < parts[0]["align"]


def test_align_head_starts_at_zero_and_matches_the_refine_path():
    register_tiny112()
    from fromface.models import create_model
    from fromface.models.from_net import model_refiner

    model = create_model(f"from_{TINY112}", grid=3, align_head=True).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert not model(x).landmark_shift.any()  # starts by trusting the detector
        torch.nn.init.normal_(model.align_head.body[-1].weight, std=0.05)
        out = model(x)
        assert out.landmark_shift.shape == (2, 5, 2) and out.landmark_shift.abs().max() > 0
        assert torch.allclose(model.predict_landmark_shift(x), out.landmark_shift)
    crops = list(np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8))
    refine = model_refiner(model, model.preprocess)
    with torch.no_grad():
        want = model(torch.from_numpy(model.preprocess.to_input(crops))).landmark_shift.numpy()
    got = refine(crops)
    assert got.shape == (3, 5, 2) and np.allclose(got, want, atol=1e-6)
    assert np.allclose(refine(crops[1:2])[0], want[1], atol=1e-6)  # a face's shift does not depend on its batch
    assert model_refiner(create_model(f"from_{TINY112}", grid=3), model.preprocess) is None


def test_occluder_variation_is_for_training_only_and_part_of_the_stored_key(faces, tmp_path):
    """occlusion.vary: the training occluder varies its occluders, validation and calibration see them as they are,
    and stored trunk outputs drawn with variation are never taken for ones drawn without."""
    import cv2

    from fromface.training.feature_cache import stored_outputs_key
    from fromface.training.task import build_occluder

    occ = tmp_path / "occ"
    occ.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        cv2.imwrite(str(occ / f"{name}.png"), rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    rows = "file,category,kind,source,licence\na.png,cup,box,t,CC0\nb.png,phone,box,t,CC0\n"
    (occ / "occluders.csv").write_text(rows)
    sections = {"occlusion": {"occluders": str(occ), "preset": "paper", "clean_prob": 0.0}}
    plain = Trainer(tiny_config(faces, tmp_path / "a", **sections), progress=False)
    varied = Trainer(tiny_config(faces, tmp_path / "b", occlusion={**sections["occlusion"], "vary": 1.0}),
                     progress=False)
    assert varied.occluder.synth.preset.vary == 1.0 and varied.val_occluder.synth.preset.vary == 0.0
    assert build_occluder(varied.cfg, varied.preprocess, varied=False).synth.preset.vary == 0.0
    assert plain.val_occluder is plain.occluder and plain.occluder.synth.preset.vary == 0.0
    assert "vary" not in stored_outputs_key(plain.cfg, plain.model, 10)["occlusion"]
    assert stored_outputs_key(varied.cfg, varied.model, 10)["occlusion"]["vary"] == 1.0
    different = sum(not np.array_equal(plain.dataset.sample(i, 0)[0], varied.dataset.sample(i, 0)[0])
                    for i in range(len(plain.dataset)))
    assert different > len(plain.dataset) // 2
    with pytest.raises(ConfigError, match="occlusion.vary"):
        tiny_config(faces, tmp_path / "c", occlusion={"vary": -0.1})
