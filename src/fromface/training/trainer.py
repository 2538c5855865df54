"""The trainer: one short loop for a CPU, one GPU or ``torchrun`` (DDP), driven by a :class:`TrainConfig`.

Model and loss are wrapped in one :class:`TrainingTask` so the margin classifier's weights are
synchronised by DDP like the rest, and every parameter takes part in every step (no
``find_unused_parameters``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fromface.errors import ConfigError, FromfaceError
from fromface.models import create_model
from fromface.training import checkpoint as ckpt_io
from fromface.training.config import TrainConfig, config_to_dict, save_config
from fromface.training.data import EpochBatches, TrainBatch, TrainFaces, check_batching, make_pairs, split_by_identity
from fromface.training.feature_cache import StoredFaces, stored_dataset
from fromface.training.logs import RunLog
from fromface.training.loss import FromLoss
from fromface.training.optim import build_optimizer, build_scheduler, param_groups
from fromface.training.pack import open_training_faces
from fromface.training.runtime import setup_runtime, teardown
from fromface.training.task import TrainingTask, build_loss, build_occluder, run_info, seed_everything
from fromface.training.validate import PairBenchmark, validate


class Trainer:
    """Builds everything from the config; :meth:`fit` runs to the end (or ``schedule.max_steps``)."""

    def __init__(self, config: TrainConfig, resume: str | None = None, progress: bool | None = None):
        self.cfg = cfg = config
        self.rt = setup_runtime(cfg.device)
        self.device = self.rt.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.progress = cfg.log.progress if progress is None else progress
        seed_everything(cfg.seed)
        self.model = create_model(cfg.model.name, **cfg.model.kwargs)
        self.preprocess = self.model.preprocess
        self.grid = getattr(self.model, "grid", None)
        faces = self._build_data()
        loss = build_loss(cfg, self.model, self.split.num_classes)
        if cfg.model.init:
            self._initialise(cfg.model.init, loss)
        self.dataset = self._choose_dataset(faces)  # after _initialise: stored maps come from the starting weights
        teacher = None
        if self.dataset.with_clean:  # the starting model, frozen: its embeddings of the clean twins are the targets
            teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        cache = 2 * len(self.dataset) if teacher is not None and cfg.loss.consistency_cache else 0
        self.task = TrainingTask(self.model, loss, teacher=teacher, cache_size=cache).to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.task.to(memory_format=self.memory_format)
        self._build_optimisation()
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best_metric: float | None = None
        self.stop_requested = False
        if resume:
            self._resume(resume)
        else:  # per-rank stream for dropout; a resumed run restored its own
            seed_everything(cfg.seed + 1000 * self.rt.rank)
        self.net: nn.Module = self.task
        if self.rt.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.task, device_ids=ids)
        self.log = RunLog(self.out, enabled=self.rt.is_main, tensorboard=cfg.log.tensorboard)
        self.benchmarks: list[PairBenchmark] | None = None
        self.run_info = run_info(self.rt, resume)
        if self.rt.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.ckpt_dir / "config.yaml")
            (self.ckpt_dir / "run.json").write_text(json.dumps(self.run_info, indent=2), encoding="utf-8")

    # -- construction -------------------------------------------------------------------------------------
    def _build_data(self) -> TrainFaces:
        """The training source, identity split, validation pairs and occluder; returns the augmented images."""
        cfg, p = self.cfg, self.preprocess
        self.source = open_training_faces(cfg, p, progress=self.progress and self.rt.is_main, build=self.rt.is_main)
        self.split = split_by_identity(self.source.labels, cfg.data.val_identities, cfg.seed)
        self.val_pairs = None
        if len(self.split.val_rows) and cfg.data.val_pairs > 0:
            self.val_pairs = make_pairs(self.split.val_rows, self.split.val_labels, cfg.data.val_pairs, cfg.seed)
        context = getattr(self.source, "context", 1.0)
        self.occluder = build_occluder(cfg, p, context)
        self.val_occluder = build_occluder(cfg, p, context, varied=False) if cfg.occlusion.vary else self.occluder
        selectable = ["val_acc"] + (["val_occ_acc", "val_mean"] if self.occluder and cfg.occlusion.val else [])
        if cfg.eval.select not in selectable:
            raise ConfigError(f"eval.select={cfg.eval.select!r} is not computed by this config; choose from "
                              f"{selectable} (occlusion metrics need occlusion.enabled and occlusion.val)")
        faces = TrainFaces(self.source, self.split.train_rows, self.split.train_labels, preprocess=p, seed=cfg.seed,
                           flip=cfg.data.flip, occluder=self.occluder, clean_prob=cfg.occlusion.clean_prob,
                           grid=self.grid, with_clean=cfg.loss.consistency_weight > 0,
                           with_covered=cfg.loss.mask_weight > 0 and cfg.loss.mask_truth == "occluder",
                           grayscale_prob=cfg.data.grayscale_prob, colour_jitter=cfg.data.colour_jitter)
        check_batching(len(faces), cfg.data.batch_size, self.rt.world_size, cfg.data.accumulate)
        self.steps_per_epoch = len(faces) // cfg.data.batch_size
        self.total_steps = self.steps_per_epoch * cfg.schedule.epochs
        if cfg.schedule.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.schedule.max_steps)
        return faces

    def _choose_dataset(self, faces: TrainFaces) -> TrainFaces | StoredFaces:
        """The one switch between the two data sources: images augmented as they are read, or (with
        ``data.feature_cache_variants``) the frozen lower trunk's maps of stored augmented versions."""
        if self.cfg.data.feature_cache_variants == 0:
            return faces
        return stored_dataset(self.cfg, self.model, faces, self.split.train_labels, distributed=self.rt.distributed,
                              progress=self.progress)

    def _build_optimisation(self) -> None:
        cfg = self.cfg
        if cfg.loss.pattern_weight == 0 and getattr(self.model, "pattern_head", None) is not None:
            self.model.pattern_head.requires_grad_(False)  # unused: keep DDP free of unused parameters
        named = [(n, p) for n, p in self.model.named_parameters()]
        named += [(f"loss.{n}", p) for n, p in self.task.loss.named_parameters()]
        self.groups = param_groups(named, cfg.optim)
        self.frozen_modules = [r.prefix.rstrip(".") for r in cfg.optim.groups if r.freeze or r.frozen_stats]
        self.params = [p for g in self.groups for p in g["params"]]
        self.optimizer = build_optimizer(self.groups, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, steps_per_epoch=self.steps_per_epoch,
                                         total_steps=self.total_steps)
        self.amp = bool(cfg.amp and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def _initialise(self, path: str, loss: FromLoss) -> None:
        """Start from another run's weights (e.g. the clean baseline); its classifier too when the classes match."""
        init = ckpt_io.read_checkpoint(path)
        ckpt_io.load_weights(self.model, init["state_dict"], path, strict=self.cfg.model.init_strict)
        classifier = (init.get("loss_state") or {}).get("classifier.weight")
        if classifier is not None and classifier.shape == loss.classifier.weight.shape:
            loss.classifier.weight.data.copy_(classifier)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state(self) -> dict:
        rng = ckpt_io.rng_state()
        per_rank = [rng]
        if self.rt.distributed:
            per_rank = [None] * self.rt.world_size
            torch.distributed.all_gather_object(per_rank, rng)
        return {
            "format_version": ckpt_io.FORMAT_VERSION,
            "model_name": self.model.model_name,
            "model_kwargs": dict(self.cfg.model.kwargs),
            "state_dict": self.model.state_dict(),
            "loss_state": self.task.loss.state_dict(),
            "config": config_to_dict(self.cfg),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "rng_per_rank": per_rank,
            "world_size": self.rt.world_size,
            "best_metric": self.best_metric,
            "num_classes": self.split.num_classes,
            "run": self.run_info,
        }

    def save_checkpoint(self) -> Path | None:
        """Every rank must call this (RNG states are gathered); only the main rank writes."""
        state = self.state()
        if not self.rt.is_main:
            return None
        path = ckpt_io.atomic_save(state, self.ckpt_dir / f"step_{self.step:08d}.pt")
        ckpt_io.prune(self.ckpt_dir, self.cfg.checkpoint.keep_last)
        return path

    def _resume(self, path: str) -> None:
        if path == "auto":
            found = ckpt_io.step_checkpoints(self.ckpt_dir)
            if not found:
                raise ConfigError(f"--resume auto: no step_*.pt checkpoint in {self.ckpt_dir}")
            path = str(found[-1])
        state = ckpt_io.read_checkpoint(path)
        ckpt_io.check_architecture(state, self.model.model_name, self.cfg.model.kwargs, path)
        if state.get("num_classes") not in (None, self.split.num_classes):
            raise ConfigError(f"{path}: trained on {state['num_classes']} identities, this data split has "
                              f"{self.split.num_classes}; resume needs the same data and data.val_identities")
        ckpt_io.load_weights(self.model, state["state_dict"], path, strict=True)
        self.task.loss.load_state_dict(state["loss_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_metric = state.get("best_metric")
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        same_world = len(per_rank) == self.rt.world_size
        ckpt_io.set_rng_state(per_rank[self.rt.rank] if same_world else state["rng"])
        self.resumed_from = path

    # -- training --------------------------------------------------------------------------------------
    def set_train_mode(self) -> None:
        self.task.train()
        for name in self.frozen_modules:  # a frozen trunk keeps its BN statistics and no dropout
            try:
                self.model.get_submodule(name).eval()
            except AttributeError:
                pass

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimiser step (over ``data.accumulate`` chunks of the batch); returns the loss parts as floats."""
        dev, chunks = self.device, self.cfg.data.accumulate
        parts = batch.to(dev, self.memory_format).chunk(chunks)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for j, part in enumerate(parts):
            last = j == chunks - 1
            sync = contextlib.nullcontext() if last or not self.rt.distributed else self.net.no_sync()
            with sync:
                with torch.autocast(dev.type, dtype=torch.float16, enabled=self.amp):
                    losses = self.net(part)
                if not torch.isfinite(losses["total"]):
                    raise FromfaceError(f"loss is {float(losses['total'])} at step {self.step}: lower optim.lr or "
                                        "set optim.clip_grad_norm")
                self.scaler.scale(losses["total"] / chunks).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / chunks
        if self.cfg.optim.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return sums

    def loader(self, epoch: int, start: int) -> torch.utils.data.DataLoader:
        sampler = EpochBatches(len(self.dataset), batch_size=self.cfg.data.batch_size, seed=self.cfg.seed, epoch=epoch,
                               rank=self.rt.rank, world=self.rt.world_size, start=start,
                               accumulate=self.cfg.data.accumulate)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.cfg.data.num_workers, collate_fn=TrainBatch.collate,
            pin_memory=self.device.type == "cuda", generator=torch.Generator())  # global RNG stays untouched

    def fit(self) -> dict:
        """Train to ``total_steps``; returns a summary (steps, best metric, last checkpoint)."""
        bar = None
        if self.rt.is_main and self.progress:
            bar = tqdm(total=self.total_steps, initial=self.step, desc=self.cfg.name, unit="step", dynamic_ncols=True)
        last_saved = last_eval = None
        window, tick = [], time.perf_counter()
        previous = self._catch_stop_signals()
        try:
            while self.step < self.total_steps:
                self.set_train_mode()
                for batch in self.loader(self.epoch, self.batch_in_epoch):
                    window.append(self.train_step(batch))
                    self.batch_in_epoch += 1
                    if self.batch_in_epoch == self.steps_per_epoch:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    if bar is not None:
                        bar.update(1)
                    if self.step % self.cfg.log.every_steps == 0 or self.step == self.total_steps:
                        rate = len(window) * self.cfg.data.batch_size / max(time.perf_counter() - tick, 1e-9)
                        self._log_train(window, rate, bar)
                        window, tick = [], time.perf_counter()
                    paused = time.perf_counter()
                    if self._due(self.cfg.eval.every_steps, self.cfg.eval.every_epochs):
                        self.evaluate()
                        last_eval = self.step
                    if self._due(self.cfg.checkpoint.every_steps, self.cfg.checkpoint.every_epochs):
                        self.save_checkpoint()
                        last_saved = self.step
                    tick += time.perf_counter() - paused  # images/s counts training time only
                    if self.stop_requested:
                        self._stop(last_saved)
                    if self.step >= self.total_steps:
                        break
            if last_eval != self.step:
                self.evaluate()
            if last_saved != self.step:
                self.save_checkpoint()
        finally:
            self._restore_signals(previous)
            if bar is not None:
                bar.close()
            self.log.close()
        found = ckpt_io.step_checkpoints(self.ckpt_dir)
        return {"step": self.step, "epoch": self.epoch, "best_metric": self.best_metric,
                "last_checkpoint": str(found[-1]) if found else None, "output_dir": str(self.out),
                "is_main": self.rt.is_main}

    def _catch_stop_signals(self) -> dict:
        """Single process: Ctrl-C / SIGTERM finish the current step, save a checkpoint, then stop.

        Under torchrun the default behaviour stays (ranks could see the signal at different steps and
        the checkpoint's collective would hang); resume from the last periodic checkpoint there.
        """
        self.stop_requested = False
        if self.rt.distributed or threading.current_thread() is not threading.main_thread():
            return {}

        def request(signum, frame):
            self.stop_requested = True

        return {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signals(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _stop(self, last_saved: int | None) -> None:
        path = self.save_checkpoint() if last_saved != self.step else None
        where = path or ckpt_io.step_checkpoints(self.ckpt_dir)[-1]
        self.log.write("stop", self.step, {"checkpoint": str(where)})
        raise KeyboardInterrupt(f"stopped at step {self.step}; saved {where}; continue with --resume auto")

    def close(self) -> None:
        teardown(self.rt)

    def _due(self, every_steps: int | None, every_epochs: int | None) -> bool:
        if every_steps and self.step % every_steps == 0:
            return True
        return bool(every_epochs) and self.batch_in_epoch == 0 and self.epoch % every_epochs == 0

    def _log_train(self, window: list[dict], rate: float, bar) -> None:
        parts = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
        values = {"epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": rate, **parts}
        self.log.write("train", self.step, values)
        if bar is not None:
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in parts.items()}, "img/s": f"{rate:.1f}"})

    def evaluate(self) -> dict[str, float]:
        """Validation on held-out identities (selects ``best.pt``) and optional LFW (reported only). Main rank."""
        if not self.rt.is_main:
            return {}
        metrics: dict[str, float] = {}
        cfg = self.cfg.eval
        if self.val_pairs is not None:
            occ = self.val_occluder if self.cfg.occlusion.val else None
            metrics.update(validate(self.model, self.source, self.val_pairs, preprocess=self.preprocess,
                                    device=self.device, batch_size=cfg.batch_size, occluder=occ, seed=self.cfg.seed,
                                    amp=self.amp))
        if self.benchmarks is None:  # aligned once, on first use
            self.benchmarks = [PairBenchmark(s, self.preprocess, progress=self.progress) for s in cfg.pair_sets]
        for bench in self.benchmarks:
            metrics.update(bench.evaluate(self.model, device=self.device, batch_size=cfg.batch_size, amp=self.amp))
        if metrics:
            self._select(metrics)
            self.log.write("eval", self.step, {"epoch": self.epoch, **metrics})
        return metrics

    def _select(self, metrics: dict[str, float]) -> None:
        key = self.cfg.eval.select
        if key not in metrics:
            raise ConfigError(f"eval.select={key!r} is not among the validation metrics {sorted(metrics)}")
        value = metrics[key]
        if math.isfinite(value) and (self.best_metric is None or value > self.best_metric):
            self.best_metric = value
            state = {"model_name": self.model.model_name, "model_kwargs": dict(self.cfg.model.kwargs),
                     "state_dict": self.model.state_dict(), "loss_state": self.task.loss.state_dict(),
                     "config": config_to_dict(self.cfg), "step": self.step, "epoch": self.epoch,
                     "best_metric": value, "metric": key}
            ckpt_io.atomic_save(state, self.ckpt_dir / "best.pt")


def train(config: TrainConfig, resume: str | None = None, progress: bool | None = None) -> dict:
    """Run a whole training job (this process's share of it under torchrun)."""
    trainer = Trainer(config, resume=resume, progress=progress)
    try:
        return trainer.fit()
    finally:
        trainer.close()
