import argparse
import json
import logging
import os

import torch
from backbones import get_model
from dataset import get_dataloader
from losses import CombinedMarginLoss
from lr_scheduler import PolynomialLRWarmup
from partial_fc_v2 import PartialFC_V2
from torch import distributed
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
from torch.utils.data import DataLoader
from utils.utils_callbacks import CallBackVerification
from utils.utils_config import get_config

try:
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    distributed.init_process_group("nccl")
except KeyError:
    rank = 0
    local_rank = 0
    world_size = 1
    distributed.init_process_group(backend="nccl", init_method="tcp://127.0.0.1:12584", rank=rank, world_size=world_size)


def main(args):
    cfg = get_config(args.config)
    torch.manual_seed(cfg.seed)
    torch.cuda.set_device(local_rank)
    os.makedirs(cfg.output, exist_ok=True)
    logging.basicConfig(level=logging.INFO)

    train_loader = get_dataloader(cfg.rec, local_rank, cfg.batch_size, cfg.dali, cfg.dali_aug, cfg.seed, cfg.num_workers)

    backbone = get_model(cfg.network, dropout=0.0, fp16=cfg.fp16, num_features=cfg.embedding_size).cuda()
    backbone = torch.nn.parallel.DistributedDataParallel(
        module=backbone, broadcast_buffers=False, device_ids=[local_rank], bucket_cap_mb=16,
        find_unused_parameters=True)
    backbone.register_comm_hook(None, fp16_compress_hook)
    backbone.train()
    backbone._set_static_graph()

    margin_loss = CombinedMarginLoss(64, cfg.margin_list[0], cfg.margin_list[1], cfg.margin_list[2],
                                     cfg.interclass_filtering_threshold)
    module_partial_fc = PartialFC_V2(margin_loss, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, False)
    module_partial_fc.train().cuda()
    opt = torch.optim.SGD(params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}],
                          lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)

    cfg.total_batch_size = cfg.batch_size * world_size
    cfg.warmup_step = cfg.num_image // cfg.total_batch_size * cfg.warmup_epoch
    cfg.total_step = cfg.num_image // cfg.total_batch_size * cfg.num_epoch
    lr_scheduler = PolynomialLRWarmup(optimizer=opt, warmup_iters=cfg.warmup_step, total_iters=cfg.total_step)

    start_epoch = 0
    global_step = 0
    if cfg.resume:
        dict_checkpoint = torch.load(os.path.join(cfg.output, f"checkpoint_gpu_{rank}.pt"))
        start_epoch = dict_checkpoint["epoch"]
        global_step = dict_checkpoint["global_step"]
        backbone.module.load_state_dict(dict_checkpoint["state_dict_backbone"])
        module_partial_fc.load_state_dict(dict_checkpoint["state_dict_softmax_fc"])
        opt.load_state_dict(dict_checkpoint["state_optimizer"])
        lr_scheduler.load_state_dict(dict_checkpoint["state_lr_scheduler"])
        del dict_checkpoint

    callback_verification = CallBackVerification(val_targets=cfg.val_targets, rec_prefix=cfg.rec)

    report = {"head": type(module_partial_fc).__name__, "is_partial_fc_v2": isinstance(module_partial_fc, PartialFC_V2),
              "loader": type(train_loader).__name__, "is_dataloader": isinstance(train_loader, DataLoader),
              "world_size": world_size, "start_epoch": start_epoch, "state_keys": sorted(module_partial_fc.state_dict()),
              "epochs": {}, "losses": []}
    for epoch in range(start_epoch, cfg.num_epoch):
        if isinstance(train_loader, DataLoader):
            train_loader.sampler.set_epoch(epoch)
        batches = report["epochs"][str(epoch)] = []
        for _, (img, local_labels) in enumerate(train_loader):
            global_step += 1
            batches.append({"labels": local_labels.tolist(), "shape": list(img.shape), "device": str(img.device),
                            "label_device": str(local_labels.device), "image_sums": img.sum(dim=(1, 2, 3)).tolist()})
            local_embeddings = backbone(img)
            loss = module_partial_fc(local_embeddings, local_labels)
            loss.backward()
            if global_step % cfg.gradient_acc == 0:
                torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
                opt.step()
                opt.zero_grad()
            lr_scheduler.step()
            report["losses"].append(loss.item())
            with torch.no_grad():
                if global_step % cfg.verbose == 0 and global_step > 0:
                    callback_verification(global_step, backbone)

        if cfg.save_all_states:
            checkpoint = {
                "epoch": epoch + 1,
                "global_step": global_step,
                "state_dict_backbone": backbone.module.state_dict(),
                "state_dict_softmax_fc": module_partial_fc.state_dict(),
                "state_optimizer": opt.state_dict(),
                "state_lr_scheduler": lr_scheduler.state_dict(),
            }
            torch.save(checkpoint, os.path.join(cfg.output, f"checkpoint_gpu_{rank}.pt"))
        if rank == 0:
            torch.save(backbone.module.state_dict(), os.path.join(cfg.output, "model.pt"))
        if cfg.dali:
            train_loader.reset()

    report["global_step"] = global_step
    report["verification"] = callback_verification.results
    with open(os.path.join(cfg.output, f"report_{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="stand-in of arcface_torch's train_v2.py")
    parser.add_argument("config", type=str, help="py config file")
    main(parser.parse_args())
