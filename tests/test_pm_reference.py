"""PrototypeMemory against a plain-PyTorch re-statement of DESIGN.md §2 (float64, one process)."""
import pytest
import torch
import torch.nn.functional as F

from protomem_plugin.heads import PrototypeMemory


def cosface(logits, labels, s=16.0, m=0.3):
    """Independent CosFace: s * (cos - m * onehot)."""
    onehot = torch.zeros_like(logits)
    rows = labels >= 0
    onehot[rows.nonzero().squeeze(1), labels[rows]] = 1.0
    return s * (logits - m * onehot)


def arcface_torch_style_inplace(logits, labels, s=16.0, m=0.4):
    """Re-statement of arcface_torch's ArcFace branch: modifies ``logits`` in place under no_grad."""
    index = torch.where(labels != -1)[0]
    target = logits[index, labels[index]]
    with torch.no_grad():
        target.arccos_()
        logits.arccos_()
        logits[index, labels[index]] = target + m
        logits.cos_()
    return logits * s


class ReferenceMemory:
    """Straightforward loops: slot lists, per-class prototypes, oldest-written eviction."""

    def __init__(self, slots, dim):
        self.slot_class = [-1] * slots
        self.slot_step = [-1] * slots
        self.memory = torch.zeros(slots, dim, dtype=torch.float64)
        self.t = 0

    def loss(self, x, y, margin, prototype_grad):
        e = x / x.norm(dim=1, keepdim=True)
        classes = sorted(set(y.tolist()))
        protos = {}
        for c in classes:
            rows = [i for i in range(len(y)) if int(y[i]) == c]
            v = e[rows].sum(dim=0)
            p = v / v.norm()
            protos[c] = p if prototype_grad else p.detach()
        refreshed = {c: self.slot_class.index(c) for c in classes if c in self.slot_class}
        free = sorted(
            (s for s in range(len(self.slot_class)) if s not in refreshed.values()),
            key=lambda s: (self.slot_step[s], s),
        )
        where = dict(refreshed)
        for c, s in zip([c for c in classes if c not in refreshed], free):
            where[c] = s
        for c, s in where.items():
            self.memory[s] = protos[c].detach()
            self.slot_class[s] = c
            self.slot_step[s] = self.t
        occupied = [s for s in range(len(self.slot_class)) if self.slot_class[s] >= 0]
        rows = []
        for s in occupied:
            c = self.slot_class[s]
            rows.append(protos[c] if self.slot_step[s] == self.t else self.memory[s])
        weight = torch.stack(rows)
        logits = (e @ weight.t()).clamp(-1.0, 1.0)
        target = torch.tensor([occupied.index(where[int(c)]) for c in y])
        out = F.cross_entropy(margin(logits, target), target)
        self.t += 1
        return out


def batches(num_steps=24, batch=8, num_classes=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_steps):
        # groups of 2 images per class, plus a single image and a triple now and then
        classes = torch.randperm(num_classes, generator=g)[:3]
        labels = torch.cat([classes.repeat_interleave(2), classes[:1], torch.randint(0, num_classes, (1,), generator=g)])
        out.append((torch.randn(batch, 6, generator=g, dtype=torch.float64) * 3, labels[:batch]))
    return out


@pytest.mark.parametrize("prototype_grad", [True, False])
@pytest.mark.parametrize("margin", [cosface, arcface_torch_style_inplace], ids=["cosface", "inplace_arcface"])
def test_matches_reference_over_many_steps(prototype_grad, margin):
    slots, dim = 7, 6
    head = PrototypeMemory(margin, dim, 14, memory_size=slots, prototype_grad=prototype_grad).double()
    ref = ReferenceMemory(slots, dim)
    # arccos amplifies last-bit differences of cosines near 1 (positives of single-image classes)
    tol = 1e-12 if margin is cosface else 1e-6
    evictions = 0
    for step, (x, y) in enumerate(batches()):
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        loss = head(xa, y)
        loss.backward()
        ref_loss = ref.loss(xb, y, margin, prototype_grad)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol, msg=f"loss at step {step}")
        torch.testing.assert_close(xa.grad, xb.grad, rtol=tol * 100, atol=tol, msg=f"grad at step {step}")
        assert head.slot_class.tolist() == ref.slot_class, f"slot classes at step {step}"
        assert head.slot_step.tolist() == ref.slot_step, f"write steps at step {step}"
        torch.testing.assert_close(head.memory, ref.memory, rtol=0, atol=1e-14)
        evictions += head.diagnostics()["evicted_classes"]
    assert evictions > 0, "the sequence must exercise eviction"


def test_prototype_grad_changes_gradients():
    x, y = batches(1)[0]
    grads = []
    for flag in (True, False):
        head = PrototypeMemory(cosface, 6, 14, memory_size=8, prototype_grad=flag).double()
        xa = x.clone().requires_grad_(True)
        head(xa, y).backward()
        grads.append(xa.grad)
    assert not torch.allclose(grads[0], grads[1])
