import torch


class CombinedMarginLoss(torch.nn.Module):
    """arcface_torch's CombinedMarginLoss: its attributes as the public file sets them, and the CosFace
    branch of its forward (in-place edit of the logits)."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s = s
        self.m1 = m1
        self.m2 = m2
        self.m3 = m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def forward(self, logits, labels):
        index_positive = torch.where(labels != -1)[0]
        target_logit = logits[index_positive, labels[index_positive].view(-1)]
        logits[index_positive, labels[index_positive].view(-1)] = target_logit - self.m3
        return logits * self.s
