import torch


class CombinedMarginLoss(torch.nn.Module):
    """CosFace branch of arcface_torch's CombinedMarginLoss (in-place edit of the logits)."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m3 = s, m3

    def forward(self, logits, labels):
        index_positive = torch.where(labels != -1)[0]
        target_logit = logits[index_positive, labels[index_positive].view(-1)]
        logits[index_positive, labels[index_positive].view(-1)] = target_logit - self.m3
        return logits * self.s
