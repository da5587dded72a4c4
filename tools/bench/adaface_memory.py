#!/usr/bin/env python
"""GPU memory of an r50 + AdaFace job at 2e6 identities, batch 128, fp16: PM next to Partial FC 0.1.

Without a GPU this is an **estimate per component**, measured where the CPU can measure it:

* backbone state: fp32 weights, their gradients and SGD momentum (parameter count x 4 bytes x 3);
* backbone activations kept for the backward pass: the bytes of every tensor autograd saves during
  one forward of r50 at batch 4 under autocast to a 2-byte float (``torch.autocast("cpu",
  torch.bfloat16)``, whose cast list for convolutions and matrix products matches CUDA's fp16
  autocast), scaled linearly to batch 128 (``saved_tensors_hooks``);
* head state: the tensors the head holds (PM: memory slots in float16 + slot tables; Partial FC:
  the 2e6 x 512 fp32 centres, their momentum, and the dense gradient PyTorch keeps for them),
  from the built head (PM) or from its shapes (Partial FC: 12 GB do not fit beside the other
  jobs of this machine);
* head step: the increase in peak RSS over AdaFace training steps of the PM head on the CPU, its
  memory full (``heads.fill_memory``): the fused margin softmax's blocks, the gradients and the
  step's small tensors, float32 without autocast;
* the fused blocks on the GPU, from shapes: under fp16 on CUDA a block has at most 32768 columns
  (``LOW_PRECISION_PRODUCT_COLUMNS``), with two float32 and two float16 ``B x block`` buffers, the
  gathered float16 columns and a float16 ``B x D`` product (:mod:`protomem_plugin.heads.fused`);
  counted on top of the CPU step, whose own blocks are smaller;
* CUDA context and allocator slack: a fixed allowance (``--cuda-overhead-gb``), not measured.

Writes tools/bench/results/adaface_memory.{json,md} and prints the table. On a GPU the real figure
is ``torch.cuda.max_memory_allocated`` of the job itself (``protomem-train`` with ``network = "r50"``,
``fp16 = True``, ``margin = "adaface"``), which this estimate stands in for.

    python tools/bench/adaface_memory.py
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

CLASSES, BATCH, EMBEDDING, SAMPLE_RATE = 2_000_000, 128, 512, 0.1
GB = 1024**3


def backbone_state_bytes(model: torch.nn.Module) -> int:
    """fp32 weights + gradients + SGD momentum."""
    return 3 * 4 * sum(p.numel() for p in model.parameters())


def activation_bytes(model: torch.nn.Module, batch: int, probe_batch: int = 4) -> int:
    """Bytes autograd saves for backward in one forward at ``probe_batch``, scaled to ``batch``."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    model.train()
    images = torch.randn(probe_batch, 3, 112, 112)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    del out
    return int(sum(saved.values()) * batch / probe_batch)


def peak_rss_bytes() -> int:
    """This process's peak resident set since the last :func:`reset_peak` (VmHWM)."""
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    """Restart VmHWM at the current resident set (Linux ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def resident_bytes() -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def pm_head(memory_slots: int):
    from protomem_plugin.heads import PrototypeMemory
    from protomem_plugin.losses import AdaFaceMarginLoss

    return PrototypeMemory(AdaFaceMarginLoss(s=64.0), EMBEDDING, CLASSES, sample_rate=SAMPLE_RATE,
                           memory_size=memory_slots, memory_dtype="float16")


def head_state_bytes(head: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in head.state_dict().values() if torch.is_tensor(t))


def pm_step_bytes(head: torch.nn.Module, steps: int = 3) -> int:
    """Peak RSS increase over PM + AdaFace training steps (memory filled first, as in heads.py)."""
    from heads import fill_memory

    fill_memory(head)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        if step == 1:  # after the warm-up step: the increase is the step's working memory
            reset_peak()
            before = resident_bytes()
        labels = torch.randint(0, CLASSES, (BATCH // 2,), generator=g).repeat_interleave(2)
        embeddings = torch.randn(BATCH, EMBEDDING, generator=g, requires_grad=True)
        head(embeddings, labels).backward()
    return max(0, peak_rss_bytes() - before)


def pm_device_blocks_bytes(memory_slots: int) -> int:
    """Workspace of the fused margin softmax on a CUDA device under fp16, from its shapes."""
    from protomem_plugin.heads.chunked import LOW_PRECISION_PRODUCT_COLUMNS
    from protomem_plugin.heads.fused import DEVICE_BLOCK_ELEMENTS

    width = min(memory_slots, DEVICE_BLOCK_ELEMENTS // BATCH, LOW_PRECISION_PRODUCT_COLUMNS)
    spare = BATCH  # overriding rows written past the block (at most one per image)
    return BATCH * width * (4 + 4 + 2 + 2) + (width + spare) * EMBEDDING * 2 + BATCH * EMBEDDING * 2


def pfc_state_bytes() -> int:
    """Partial FC (arcface_torch's PartialFC_V2 layout): fp32 centres + momentum + dense gradient."""
    return 3 * CLASSES * EMBEDDING * 4


def pfc_step_bytes() -> int:
    """Sampled centres (fp32 copy), their gradient, and the B x sampled logits (+ softmax, grad)."""
    sampled = int(SAMPLE_RATE * CLASSES)
    return 2 * sampled * EMBEDDING * 4 + 3 * BATCH * sampled * 4


def estimate(cuda_overhead_gb: float) -> dict:
    from protomem_plugin.backbones import get_model

    torch.set_num_threads(1)
    memory_slots = int(SAMPLE_RATE * CLASSES)
    head = pm_head(memory_slots)
    pm = {"head state (memory 2e5 slots float16 + tables)": head_state_bytes(head),
          "head step (fused blocks, gradients), measured on CPU": pm_step_bytes(head),
          "fused blocks on the GPU under fp16 (32768 columns), from shapes": pm_device_blocks_bytes(memory_slots)}
    del head
    model = get_model("r50", fp16=False, num_features=EMBEDDING)
    backbone = {"backbone state (weights, grads, momentum; fp32)": backbone_state_bytes(model),
                "backbone activations, batch 128, fp16 autocast": activation_bytes(model, BATCH)}
    del model
    pfc = {"head state (2e6 x 512 fp32 centres, momentum, dense gradient)": pfc_state_bytes(),
           "head step (sampled centres 2e5, their gradient, logits), from shapes": pfc_step_bytes()}
    overhead = {"CUDA context and allocator slack (allowance)": int(cuda_overhead_gb * GB)}
    rows = {"prototype_memory + adaface": {**backbone, **pm, **overhead},
            "partial_fc 0.1 + adaface": {**backbone, **pfc, **overhead}}
    return {name: {"components": parts, "total": sum(parts.values())} for name, parts in rows.items()}


def markdown(result: dict, budget_gb: float) -> str:
    lines = [f"| component | {' | '.join(result)} |", "|---|" + "---:|" * len(result)]
    components = list(dict.fromkeys(k for r in result.values() for k in r["components"]))
    for c in components:
        cells = [f"{r['components'][c] / GB:.2f}" if c in r["components"] else "" for r in result.values()]
        lines.append(f"| {c} | {' | '.join(cells)} |")
    totals = [f"**{r['total'] / GB:.2f}**" for r in result.values()]
    lines.append(f"| **total (GB, estimate)** | {' | '.join(totals)} |")
    fits = ["yes" if r["total"] <= budget_gb * GB else "no" for r in result.values()]
    lines.append(f"| fits {budget_gb:g} GB | {' | '.join(fits)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda-overhead-gb", type=float, default=1.0)
    parser.add_argument("--budget-gb", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from machine import cpu_name

    result = estimate(args.cuda_overhead_gb)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python tools/bench/adaface_memory.py"
    (args.out / "adaface_memory.json").write_text(json.dumps(
        {"command": command, "cpu": cpu_name(), "estimate": True, "classes": CLASSES, "batch": BATCH,
         "embedding": EMBEDDING, "sample_rate": SAMPLE_RATE, "budget_gb": args.budget_gb, "rows": result},
        indent=2) + "\n")
    md = (f"{markdown(result, args.budget_gb)}\n\nEstimate without a GPU (see the script's docstring), "
          f"`{command}` on {cpu_name()}, {os.cpu_count()} cores.\n")
    (args.out / "adaface_memory.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
