import torch
from torch import distributed


class PartialFC_V2(torch.nn.Module):
    """Stand-in head: class centres sharded by contiguous ranges, softmax over this rank's classes."""

    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False):
        super(PartialFC_V2, self).__init__()
        assert distributed.is_initialized(), "must initialize distributed before create this"
        self.rank = distributed.get_rank()
        self.world_size = distributed.get_world_size()
        self.num_local = num_classes // self.world_size + int(self.rank < num_classes % self.world_size)
        self.class_start = num_classes // self.world_size * self.rank + min(self.rank, num_classes % self.world_size)
        self.margin_softmax = margin_loss
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))

    def forward(self, local_embeddings, local_labels):
        labels = local_labels.view(-1).long() - self.class_start
        labels[(labels < 0) | (labels >= self.num_local)] = -1
        logits = torch.nn.functional.linear(
            torch.nn.functional.normalize(local_embeddings), torch.nn.functional.normalize(self.weight)).clamp(-1, 1)
        logits = self.margin_softmax(logits, labels)
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-1)
