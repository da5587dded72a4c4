from torch.optim.lr_scheduler import _LRScheduler


class PolynomialLRWarmup(_LRScheduler):
    """Linear warm-up then polynomial decay; passes `verbose` on as the public file does."""

    def __init__(self, optimizer, warmup_iters, total_iters=5, power=1.0, last_epoch=-1, verbose=False):
        super().__init__(optimizer, last_epoch=last_epoch, verbose=verbose)
        self.total_iters = total_iters
        self.power = power
        self.warmup_iters = warmup_iters

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch > self.total_iters:
            return [group["lr"] for group in self.optimizer.param_groups]
        if self.last_epoch <= self.warmup_iters:
            return [base * self.last_epoch / self.warmup_iters for base in self.base_lrs]
        done = (self.last_epoch - self.warmup_iters) / (self.total_iters - self.warmup_iters)
        return [base * (1.0 - done) ** self.power for base in self.base_lrs]
