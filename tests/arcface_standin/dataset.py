import mxnet as mx  # noqa: F401  (the public file imports both at the top)
import torch
from torch.utils.data import DataLoader
from torchvision import transforms  # noqa: F401


def get_dataloader(root_dir, local_rank, batch_size, dali=False, dali_aug=False, seed=2048, num_workers=2):
    raise RuntimeError("the stand-in's own loader is never used: tests run where mxnet is missing or the hook replaces it")


class DataLoaderX(DataLoader):
    def __init__(self, local_rank, **kwargs):
        super(DataLoaderX, self).__init__(**kwargs)
        self.stream = torch.cuda.Stream(local_rank)
        self.local_rank = local_rank
