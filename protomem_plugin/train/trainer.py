"""The training loop: arcface_torch's train_v2 with the head from the registry.

Backbone under DDP, head not wrapped (it all-gathers the embeddings itself), SGD/AdamW, linear
warmup then polynomial decay, AMP, gradient accumulation and clipping, logging, verification,
atomic arcface_torch-format checkpoints and step-exact resume (also on another number of ranks).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import get_model
from ..data.loader import host_to_device
from ..heads import NonFiniteEmbeddingError
from ..losses import build_margin_loss
from ..registry import build_head, margin_name
from .callbacks import TrainingLogger, VerificationCallback, head_diagnostics
from .checkpoint import (CheckpointWriteError, checkpoint_path, commit_temporary, discard_temporary,
                         remove_stale_temporaries, save_model_pt, stage_training_checkpoint)
from .config import ConfigError
from .preflight import check_output, check_resume, check_val_targets
from .resume import load_resume_state, resume_decision
from .runtime import Runtime, capture_rng_state, init_runtime, restore_rng_state, seed_everything
from .schedule import build_lr_scheduler, build_optimizer
from .signals import StopRequest

log = logging.getLogger("protomem.train")


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive non-finite losses."""


def prepare_dataset(cfg, runtime: Runtime) -> None:
    """Generate the synthetic dataset named by ``cfg.synthetic`` into ``cfg.rec`` if absent (rank 0)."""
    from ..data.speedtest import SPEED_TEST_REC

    if cfg.rec == SPEED_TEST_REC:
        return
    rec = Path(cfg.rec)
    if cfg.get("synthetic"):
        if runtime.is_main:
            from ..data.synthetic import make_synthetic_dataset

            make_synthetic_dataset(str(rec), **dict(cfg.synthetic), progress=bool(cfg.progress))
        runtime.barrier()
    if not rec.is_dir():
        raise ConfigError(f"config key 'rec' = {cfg.rec!r}: the dataset folder {rec} does not exist "
                          "(expected train.rec/train.idx, or identity sub-folders of images)")
    if (rec / "train.rec").is_file() != (rec / "train.idx").is_file():
        missing = "train.idx" if (rec / "train.rec").is_file() else "train.rec"
        raise ConfigError(f"config key 'rec' = {cfg.rec!r}: {rec / missing} does not exist")


def build_loader(cfg, runtime: Runtime):
    """The training loader of this rank (DALI when ``cfg.dali``), labels checked against num_classes."""
    from ..data.loader import build_train_loader
    from ..data.speedtest import SPEED_TEST_REC, build_speed_test_loader

    if cfg.rec == SPEED_TEST_REC:
        return build_speed_test_loader(
            int(cfg.num_image), int(cfg.num_classes), cfg.batch_size, samples_per_class=cfg.samples_per_class,
            rank=runtime.rank, world_size=runtime.world_size, seed=cfg.seed, device=str(runtime.device),
            image_size=cfg.image_size)
    loader = build_train_loader(
        cfg.rec, cfg.batch_size, samples_per_class=cfg.samples_per_class, rank=runtime.rank,
        world_size=runtime.world_size, seed=cfg.seed, use_dali=bool(cfg.dali), dali_aug=bool(cfg.dali_aug),
        num_workers=cfg.num_workers, device=str(runtime.device), image_size=cfg.image_size,
        doppelganger_mining=bool(cfg.doppelganger_mining), mining_fraction=float(cfg.mining_fraction),
    )
    max_label = int(loader.labels.max())
    if max_label >= cfg.num_classes:
        raise ConfigError(
            f"config key 'num_classes' = {cfg.num_classes} is smaller than the dataset's labels "
            f"(largest label {max_label} in {cfg.rec})"
        )
    return loader


def load_quality(cfg, loader) -> torch.Tensor | None:
    """Per-image quality from ``cfg.quality_file`` (one value per image, in image-key order)."""
    if not cfg.get("quality_file"):
        return None
    import numpy as np

    path = Path(cfg.quality_file)
    if not path.is_file():
        raise ConfigError(f"config key 'quality_file' = {cfg.quality_file!r} does not exist")
    quality = np.load(path, allow_pickle=False)
    if quality.shape != (loader.num_images,):
        raise ConfigError(f"config key 'quality_file': {path} holds shape {quality.shape}, "
                          f"the dataset has {loader.num_images} images")
    return torch.from_numpy(quality.astype(np.float32))


@dataclass
class TrainingSetup:
    """Everything one rank trains with."""

    cfg: Any
    runtime: Runtime
    loader: Any
    backbone: nn.Module
    model: nn.Module          # the backbone, DDP-wrapped when world_size > 1
    head: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    total_steps: int
    dtype: torch.dtype
    quality: torch.Tensor | None


def set_train_mode(backbone: nn.Module, freeze_bn: bool) -> None:
    """Training mode; with ``freeze_bn`` BatchNorm layers keep their running statistics (eval mode)."""
    backbone.train()
    if freeze_bn:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def snapshot_buffers(module: nn.Module) -> list[torch.Tensor]:
    """Copies of the module's buffers (BatchNorm statistics), taken before a forward pass."""
    return [b.detach().clone() for b in module.buffers()]


def buffers_finite(module: nn.Module) -> torch.Tensor:
    """Whether every floating buffer (BatchNorm statistics) is finite: a device bool, one fused reduction."""
    floats = [b for b in module.buffers() if b.is_floating_point()]
    if not floats:
        return torch.ones((), dtype=torch.bool, device=next(module.parameters()).device)
    return torch.isfinite(torch.stack(torch._foreach_norm(floats))).all()


def steps_agree(good: torch.Tensor, runtime: Runtime, stop: bool = False) -> tuple[bool, bool]:
    """(``good`` on every rank, ``stop`` on some rank): one all-reduce, so all ranks take the same branch.

    ``stop`` (a SIGTERM received by this process) travels in the same reduction as ``good``: the
    step still reads the device once.
    """
    bad = good.logical_not().to(torch.float32).reshape(1)
    if runtime.world_size > 1:
        flags = torch.cat([bad, torch.full((1,), float(stop), device=bad.device)])
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad_any, stop_any = flags.tolist()
        return not bad_any, bool(stop_any)
    return not bool(bad), stop


def restore_buffers(module: nn.Module, saved: list[torch.Tensor]) -> None:
    """Undo what a forward pass wrote into the buffers."""
    with torch.no_grad():
        for buffer, value in zip(module.buffers(), saved):
            buffer.copy_(value)


def build_setup(cfg, runtime: Runtime) -> TrainingSetup:
    """Dataset, loader, backbone (DDP), head, optimizer, LR schedule and loss scaler of this rank."""
    seed_everything(int(cfg.seed), bool(cfg.deterministic))
    prepare_dataset(cfg, runtime)
    loader = build_loader(cfg, runtime)
    dtype = getattr(torch, cfg.compute_dtype)
    backbone = get_model(cfg.network, dropout=float(cfg.get("dropout", 0.0)), fp16=bool(cfg.fp16),
                         num_features=cfg.embedding_size).to(runtime.device, dtype)
    head = build_head(cfg, build_margin_loss(cfg)).to(runtime.device, dtype).train()
    if cfg.doppelganger_mining and not hasattr(head, "nearest_classes"):
        raise ConfigError(f"config key 'doppelganger_mining' needs a memory head; head {cfg.head!r} has no memory")
    model: nn.Module = backbone
    if runtime.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            backbone, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None,
            broadcast_buffers=False, bucket_cap_mb=16,
            # a ViT without masking never uses its mask token: DDP must not wait for its gradient
            find_unused_parameters=bool(getattr(backbone, "ddp_find_unused_parameters", False)))
    set_train_mode(backbone, bool(cfg.freeze_bn))
    optimizer = build_optimizer(cfg, backbone.parameters(), head.parameters())
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * int(cfg.num_epoch)
    if cfg.get("max_steps"):
        total_steps = min(total_steps, int(cfg.max_steps))
    warmup_steps = min(int(steps_per_epoch * float(cfg.get("warmup_epoch", 0))), max(total_steps - 1, 0))
    scheduler = build_lr_scheduler(optimizer, warmup_steps, total_steps, power=float(cfg.lr_power))
    # fp16: the backbone trunk runs in float16 on CUDA (with loss scaling) and bfloat16 on CPU
    scaler = torch.amp.GradScaler("cuda", growth_interval=100, enabled=bool(cfg.fp16) and runtime.device.type == "cuda")
    return TrainingSetup(cfg, runtime, loader, backbone, model, head, optimizer, scheduler, scaler, total_steps, dtype,
                         load_quality(cfg, loader))


def train(cfg, runtime: Runtime | None = None) -> dict[str, Any]:
    """Run the training ``cfg`` describes; returns a summary (steps, last loss, verification)."""
    runtime = runtime or init_runtime()
    # up-front checks: nothing is built or written before they pass
    check_output(cfg)
    check_val_targets(cfg)
    resume_from = resume_decision(cfg.get("resume"), cfg.output)  # global step of a complete checkpoint, or None
    setup = build_setup(cfg, runtime)
    loader, backbone, head, optimizer, scheduler, scaler = (
        setup.loader, setup.backbone, setup.head, setup.optimizer, setup.scheduler, setup.scaler)
    total_steps = setup.total_steps
    stop_step = min(total_steps, int(cfg.stop_at_step)) if cfg.get("stop_at_step") else total_steps

    start_epoch, global_step, nonfinite_total, resumed_mid_epoch = 0, 0, 0, False
    if resume_from is not None:
        check_resume(cfg, runtime.world_size, backbone, head)
        state = load_resume_state(cfg.output, runtime, backbone, head, optimizer, scheduler, loader,
                                  lrs=(cfg.lr, cfg.get("head_lr_scale", 1.0)))
        start_epoch, global_step = state["epoch"], state["global_step"]
        resumed_mid_epoch = loader.epoch == start_epoch and loader.state_dict()["position"] > 0
        nonfinite_total = int(state.get("nonfinite_total", 0))
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            restore_rng_state(state["rng"], runtime.local_rank)
        if cfg.doppelganger_mining and "neighbours" in state:
            loader.sampler.table.load_state_dict({k: v.numpy() for k, v in state["neighbours"].items()})
    os.makedirs(cfg.output, exist_ok=True)
    logger = TrainingLogger(cfg.output, enabled=runtime.is_main, total_steps=total_steps, start_step=global_step,
                            frequent=cfg.frequent, global_batch=cfg.batch_size * runtime.world_size,
                            progress=bool(cfg.progress))
    for key, value in sorted(cfg.items()):
        logger.write(f": {key:<25} {value}", console=False)
    if resume_from is not None:
        logger.write(f"resume={cfg.resume!r}: resumed from the complete checkpoint of global step {global_step} "
                     f"(epoch {start_epoch}) in {cfg.output}")
    if runtime.is_main:
        for tmp in remove_stale_temporaries(cfg.output):
            logger.write(f"removed {tmp}, a temporary file left by a killed run")
    verify = VerificationCallback(cfg.rec, cfg.get("val_targets"), cfg.image_size, runtime.device) if runtime.is_main else None

    saved_at = None  # (global_step, epoch) of the last checkpoint this run wrote

    def checkpoint(epoch: int) -> None:
        nonlocal saved_at
        if saved_at == (global_step, epoch):  # e.g. save_every_steps already saved the step a stop ends on
            return
        extra = {"protomem": {
            "loader": loader.state_dict(), "rng": capture_rng_state(), "scaler": scaler.state_dict(),
            "world_size": runtime.world_size, "global_batch": cfg.batch_size * runtime.world_size,
            "nonfinite_total": nonfinite_total, "head": cfg.head, "margin": margin_name(cfg),
        }}
        if cfg.doppelganger_mining:
            extra["protomem"]["neighbours"] = {k: torch.from_numpy(v) for k, v in loader.sampler.table.state_dict().items()}
        # every rank writes a temporary file; all put theirs in place only if all succeeded, so a rank
        # that cannot write (disk full) leaves every rank's previous checkpoint, a consistent set
        path, tmp, error = checkpoint_path(cfg.output, runtime.rank), None, None
        try:
            tmp = stage_training_checkpoint(cfg.output, runtime.rank, epoch=epoch, global_step=global_step,
                                            backbone=backbone, head=head, optimizer=optimizer,
                                            lr_scheduler=scheduler, extra=extra)
        except CheckpointWriteError as err:
            error = err
        try:
            if not steps_agree(torch.tensor(error is None, device=runtime.device), runtime)[0]:
                raise error or CheckpointWriteError(f"cannot write {path}: another rank could not write its checkpoint "
                                                    f"(see its error); every rank keeps its previous checkpoint")
            commit_temporary(tmp, path)
            tmp, saved_at = None, (global_step, epoch)
        finally:
            if tmp is not None:
                discard_temporary(tmp)

    def verification_now() -> dict[str, float]:
        result = verify(backbone, global_step, logger)
        set_train_mode(backbone, bool(cfg.freeze_bn))
        return result

    consecutive_nonfinite = 0
    last_loss: torch.Tensor | float = float("nan")
    verification: dict[str, float] = {}
    accumulate = int(cfg.gradient_acc)
    stop_request, stopping, stopped = StopRequest().install(), False, False  # SIGTERM: checkpoint, then return
    try:
        for epoch in range(start_epoch, int(cfg.num_epoch)):
            if global_step >= stop_step:
                break
            if not (resumed_mid_epoch and epoch == start_epoch):
                loader.set_epoch(epoch)
            for images, labels in loader:
                global_step += 1
                buffers_before = snapshot_buffers(backbone)
                try:
                    embeddings = setup.model(images.to(setup.dtype))
                    extras = {}
                    if setup.quality is not None:
                        positions = torch.as_tensor(loader.current_positions)
                        extras["quality"] = host_to_device(setup.quality[positions], runtime.device, setup.dtype)
                    loss = head(embeddings if setup.dtype == torch.float64 else embeddings.float(), labels, **extras)
                except NonFiniteEmbeddingError:  # raised alike on every rank (the head checks the global batch)
                    loss = torch.full((), float("nan"), device=runtime.device)
                boundary = global_step % accumulate == 0
                # every rank runs the backward (DDP's collectives pair up), then all agree on skipping
                if loss.requires_grad:
                    scaler.scale(loss / accumulate).backward()
                good = torch.isfinite(loss.detach()) & buffers_finite(backbone)
                unscaled = False
                if boundary and loss.requires_grad:
                    scaler.unscale_(optimizer)
                    unscaled = True
                    norm = torch.nn.utils.clip_grad_norm_(backbone.parameters(), float(cfg.clip_grad_norm))
                    if not scaler.is_enabled():  # no non-finite gradient reaches the weights
                        good = good & torch.isfinite(norm)
                finite, stop_now = steps_agree(good, runtime, stop_request.requested)  # the step's one device read
                stopping = stopping or stop_now
                if finite and boundary:
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                elif not finite:
                    if unscaled:
                        scaler.update()  # the scaler expects an update after unscale_
                    optimizer.zero_grad(set_to_none=True)
                if finite:
                    consecutive_nonfinite = 0
                    last_loss = loss.detach()
                else:
                    restore_buffers(backbone, buffers_before)  # BatchNorm statistics of the bad forward
                    consecutive_nonfinite += 1
                    nonfinite_total += 1
                    logger.write(f"step {global_step}: non-finite loss, gradient or BatchNorm statistics on "
                                 f"some rank, step skipped on every rank ({consecutive_nonfinite} in a row, "
                                 f"{nonfinite_total} in total)")
                if cfg.doppelganger_mining and finite:
                    classes, neighbours = head.nearest_classes(int(cfg.doppelganger_k))
                    loader.sampler.table.update(classes.cpu().numpy(), neighbours.cpu().numpy())
                scheduler.step()
                lr = scheduler.get_last_lr()[0]
                logger.step(global_step, epoch, loss.detach() if finite else float("nan"), lr, skipped=not finite)
                if consecutive_nonfinite >= int(cfg.max_nonfinite_steps):
                    raise NonFiniteLossError(
                        f"{consecutive_nonfinite} consecutive non-finite losses at step {global_step}; "
                        "training stopped (lower 'lr', check the data, or disable 'fp16')")
                if global_step % int(cfg.frequent) == 0:
                    logger.report(global_step, epoch, lr, head_diagnostics(head), {"nonfinite_steps": float(nonfinite_total)})
                if verify is not None and cfg.get("verbose") and global_step % int(cfg.verbose) == 0:
                    verification = verification_now()
                if cfg.save_every_steps and global_step % int(cfg.save_every_steps) == 0:
                    logger.flush()
                    checkpoint(epoch)
                stopped = stopping and global_step % accumulate == 0  # never inside an accumulation
                if stopped or global_step >= stop_step:
                    break
            finished_epoch = loader.state_dict()["position"] >= len(loader)
            if finished_epoch:
                loader.set_epoch(epoch + 1)
            if stopped or cfg.save_all_states or cfg.save_every_steps:
                logger.flush()
                checkpoint(epoch + 1 if finished_epoch else epoch)
            if runtime.is_main:
                save_model_pt(backbone, cfg.output)
            if stopped:
                logger.write(f"stopped by SIGTERM after global step {global_step} of {total_steps}: every rank's "
                             f"checkpoint_gpu_{{rank}}.pt is in {cfg.output}; continue with --resume or resume='auto'")
                break
            if verify is not None and cfg.get("val_every_epoch"):
                verification = verification_now()
        if runtime.is_main:
            save_model_pt(backbone, cfg.output)
            if verify is not None and verify.paths and not verification and not stopped:
                verification = verification_now()
    finally:
        stop_request.restore()
        logger.close()
    last_loss = float(last_loss)
    return {"global_step": global_step, "last_loss": last_loss, "verification": verification,
            "nonfinite_steps": nonfinite_total, "output": cfg.output, "stopped": "SIGTERM" if stopped else None}
