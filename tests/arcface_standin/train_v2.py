import argparse
import json
import os

import torch
from torch import distributed

from losses import CombinedMarginLoss
from partial_fc_v2 import PartialFC_V2
from utils.utils_config import get_config

try:
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    distributed.init_process_group("gloo")
except KeyError:
    world_size, rank = 1, 0


def main(args):
    cfg = get_config(args.config)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.output, exist_ok=True)
    backbone = torch.nn.Linear(32, cfg.embedding_size)
    margin_loss = CombinedMarginLoss(64, cfg.margin_list[0], cfg.margin_list[1], cfg.margin_list[2],
                                     cfg.interclass_filtering_threshold)
    module_partial_fc = PartialFC_V2(margin_loss, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, cfg.fp16)
    module_partial_fc.train()
    opt = torch.optim.SGD(params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}],
                          lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    centres = torch.randn(cfg.num_classes, 32, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1 + rank)
    eval_labels = torch.arange(cfg.num_classes).repeat_interleave(4)
    eval_images = centres[eval_labels] + 1.5 * torch.randn(len(eval_labels), 32, generator=torch.Generator().manual_seed(7))

    def separation():
        with torch.no_grad():
            e = torch.nn.functional.normalize(backbone(eval_images))
            cos = e @ e.t()
            same = eval_labels[:, None] == eval_labels[None, :]
            return float(cos[same].mean() - cos[~same].mean())

    before = separation()
    losses = []
    for _ in range(cfg.steps):
        local_labels = torch.randint(0, cfg.num_classes, (cfg.batch_size // 2,), generator=g).repeat_interleave(2)
        img = centres[local_labels] + 1.5 * torch.randn(cfg.batch_size, 32, generator=g)
        local_embeddings = backbone(img)
        loss = module_partial_fc(local_embeddings, local_labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    report = {"head": type(module_partial_fc).__name__, "losses": losses, "separation": [before, separation()], "world_size": world_size,
              "state_keys": sorted(module_partial_fc.state_dict())}
    with open(os.path.join(cfg.output, f"report_{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=str)
    main(parser.parse_args())
