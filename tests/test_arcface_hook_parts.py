"""The hook's parts in one process: the dispatching PartialFC_V2, config resolution and checks."""
import math
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from easydict import EasyDict as edict

from protomem_plugin.arcface_torch.config import load_hook_config, resolve_config_path, unused_keys
from protomem_plugin.arcface_torch.head import install_head
from protomem_plugin.heads import PartialFC, PrototypeMemory
from protomem_plugin.losses import CombinedMarginLoss
from protomem_plugin.train.config import ConfigError

STANDIN = Path(__file__).parent / "arcface_standin"

HEAD_MODULE = """
import torch


class PartialFC_V2(torch.nn.Module):
    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False):
        super(PartialFC_V2, self).__init__()
        self.weight = torch.nn.Parameter(torch.zeros(num_classes, embedding_size))

    def describe(self):
        return type(self).__name__
"""


@pytest.fixture()
def head_module(tmp_path, monkeypatch):
    name = f"pfc_under_test_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(HEAD_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def margin():
    return CombinedMarginLoss(64, 1.0, 0.0, 0.4)


def test_without_head_the_original_class_is_built_and_its_super_call_works(head_module):
    cls = install_head(edict(), head_module)
    original = cls.__mro__[1]  # the module's own class, still bound to its name inside the module
    head = cls(margin(), 8, 10, 1.0, False)  # its super(PartialFC_V2, self) resolves to the original
    assert type(head) is original and isinstance(head, cls) and isinstance(head, torch.nn.Module)
    assert head.weight.shape == (10, 8) and isinstance(cls, type) and cls.__name__ == "PartialFC_V2"
    head.load_state_dict(cls(margin(), 8, 10).state_dict())


def test_with_head_the_registry_head_is_built_and_is_an_instance(head_module):
    cfg = edict(head="prototype_memory", memory_size=6, samples_per_class=2, batch_size=4)
    cls = install_head(cfg, head_module)
    head = cls(margin(), 8, 10, sample_rate=1.0, fp16=False)
    assert type(head) is PrototypeMemory and isinstance(head, cls)
    assert head.memory_size == 6 and head.num_classes == 10 and head.embedding_size == 8
    partial = install_head(edict(head="partial_fc"), head_module)(margin(), 8, 10, 0.5, False)
    assert type(partial) is PartialFC and partial.num_sample == 5


def test_a_config_margin_replaces_train_v2s_margin_only_when_one_is_selected(head_module):
    from protomem_plugin.losses import AdaFaceMarginLoss

    cfg = edict(head="prototype_memory", memory_size=6, samples_per_class=2, batch_size=4, margin="adaface",
                adaface_m=0.3, margin_scale=32.0)
    head = install_head(cfg, head_module)(margin(), 8, 10, 1.0, False)
    assert isinstance(head.margin_loss, AdaFaceMarginLoss)
    assert head.margin_loss.m == 0.3 and head.margin_loss.s == 32.0
    given = margin()
    kept = install_head(edict(head="prototype_memory", memory_size=6), head_module)(given, 8, 10, 1.0, False)
    assert kept.margin_loss is given  # no margin key: train_v2's CombinedMarginLoss as before


def test_adaface_under_the_hook_needs_a_head_and_its_keys_are_used(tmp_path):
    job = tmp_path / "job.py"
    job.write_text((STANDIN / "configs" / "job_pm.py").read_text()
                   + "config.margin = 'adaface'\nconfig.adaface_h = 0.5\nconfig.margin_scale = 32.0\n")
    cfg = load_hook_config(STANDIN, job)
    assert "adaface_h" not in unused_keys(cfg) and "margin_scale" not in unused_keys(cfg)
    job.write_text(job.read_text() + "config.head = None\n")
    with pytest.raises(ConfigError, match=r"config key 'margin' = 'adaface' .*needs config key 'head'"):
        load_hook_config(STANDIN, job)
    job.write_text((STANDIN / "configs" / "job_pm.py").read_text() + "config.margin = 'arcfaceplus'\n")
    with pytest.raises(ConfigError, match="margin"):
        load_hook_config(STANDIN, job)


def test_subclass_of_the_hooked_name_constructs_normally(head_module):
    cls = install_head(edict(head="prototype_memory"), head_module)

    class Mine(cls):
        pass

    mine = Mine(margin(), 8, 10)
    assert type(mine) is Mine and mine.describe() == "Mine" and mine.weight.shape == (10, 8)


def test_config_path_resolution_prefers_the_current_directory(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "configs").mkdir(parents=True)
    (checkout / "configs" / "job.py").write_text("")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "job.py").write_text("")
    assert resolve_config_path(checkout, "configs/job.py", cwd=tmp_path) == (tmp_path / "configs" / "job.py").resolve()
    (tmp_path / "configs" / "job.py").unlink()
    assert resolve_config_path(checkout, "configs/job.py", cwd=tmp_path) == (checkout / "configs" / "job.py").resolve()
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path(checkout, "configs/other.py", cwd=tmp_path)


def test_base_comes_from_the_job_folder_else_the_checkout(tmp_path):
    job = tmp_path / "mine" / "job.py"
    job.parent.mkdir()
    job.write_text((STANDIN / "configs" / "job_pm.py").read_text())
    cfg = load_hook_config(STANDIN, job)
    assert cfg.network == "tiny" and cfg.output == "work_dirs/job" and cfg.samples_per_class == 4
    (job.parent / "base.py").write_text((STANDIN / "configs" / "base.py").read_text().replace('"tiny"', '"mbf"'))
    assert load_hook_config(STANDIN, job).network == "mbf"


def test_keys_of_the_recipe_that_train_v2_ignores_are_listed(tmp_path):
    job = tmp_path / "job.py"
    job.write_text((STANDIN / "configs" / "job_pm.py").read_text() + "config.max_steps = 3\nconfig.margin_scale = 32.0\n")
    cfg = load_hook_config(STANDIN, job)
    assert unused_keys(cfg) == ["margin_scale", "max_steps"]


def test_wrong_value_types_are_refused(tmp_path):
    job = tmp_path / "job.py"
    job.write_text((STANDIN / "configs" / "job_pm.py").read_text() + "config.samples_per_class = 3\n")
    with pytest.raises(ConfigError, match="multiple of 'samples_per_class'"):
        load_hook_config(STANDIN, job)
    job.write_text((STANDIN / "configs" / "job_pm.py").read_text() + "config.memory_size = 'many'\n")
    with pytest.raises(ConfigError, match="memory_size"):
        load_hook_config(STANDIN, job)


def test_resume_auto_is_refused_by_the_hook_naming_the_key(tmp_path):
    job = tmp_path / "job.py"
    job.write_text((STANDIN / "configs" / "job_pm.py").read_text() + "config.resume = 'auto'\n")
    with pytest.raises(ConfigError, match=r"config key 'resume' = 'auto' .*train_v2 takes True or False"):
        load_hook_config(STANDIN, job)


def _load_losses(path: Path):
    """An arcface_torch ``losses.py`` as the module ``losses`` (the name train_v2 imports it by)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _margin_calls(theirs, ours, cos, labels):
    """Both margins' outputs and gradients w.r.t. the cosines (theirs edits its input: given a copy)."""
    results = []
    for margin in (theirs, ours):
        leaf = cos.clone().requires_grad_(True)
        out = margin(leaf * 1.0, labels)
        (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), leaf)
        results.append((out.detach(), grad))
    return results


def test_the_hook_runs_train_v2s_margin_as_the_projects_fusable_margin(head_module):
    from protomem_plugin.losses import target_form

    theirs = _load_losses(STANDIN / "losses.py").CombinedMarginLoss(64, 1.0, 0.0, 0.4)
    cfg = edict(head="prototype_memory", memory_size=6, samples_per_class=2, batch_size=4)
    head = install_head(cfg, head_module)(theirs, 8, 10, 1.0, False)
    assert type(head.margin_loss) is CombinedMarginLoss and target_form(head.margin_loss) is not None
    assert (head.margin_loss.s, head.margin_loss.m1, head.margin_loss.m2, head.margin_loss.m3) == (64, 1, 0, 0.4)
    cos = torch.rand(6, 10, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([0, 3, -1, 9, 1, 2])
    (a, ga), (b, gb) = _margin_calls(theirs, head.margin_loss, cos, labels)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)

    class Theirs(type(theirs)):  # a user's subclass keeps its own behaviour
        pass

    own = Theirs(64, 1.0, 0.0, 0.4)
    assert install_head(cfg, head_module)(own, 8, 10, 1.0, False).margin_loss is own


PEER = os.environ.get("ARCFACE_TORCH_ROOT")


@pytest.mark.skipif(not PEER, reason="ARCFACE_TORCH_ROOT does not point to an arcface_torch checkout")
@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.0)])
def test_the_projects_margin_equals_the_real_combined_margin_loss(margins):
    from protomem_plugin.arcface_torch.head import equivalent_margin

    theirs = _load_losses(Path(PEER) / "losses.py").CombinedMarginLoss(64, *margins)
    ours = equivalent_margin(theirs)
    assert type(ours) is CombinedMarginLoss
    g = torch.Generator().manual_seed(1)
    m2 = margins[1]
    # every target angle below pi - m2, where both margins are cos(theta + m2) - m3
    cos = (torch.rand(64, 40, generator=g, dtype=torch.float64) * 2 - 1) * 0.999
    labels = torch.randint(0, 40, (64,), generator=g)
    labels[::7] = -1
    cos[torch.arange(64), labels.clamp_min(0)] = cos[torch.arange(64), labels.clamp_min(0)].clamp_min(math.cos(math.pi - m2) + 1e-3)
    (a, ga), (b, gb) = _margin_calls(theirs, ours, cos, labels)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
