import sys
import textwrap

import pytest
from easydict import EasyDict as edict

from protomem_plugin import registry
from protomem_plugin.heads import PartialFC, PrototypeMemory, QualityAwarePrototypeMemory
from protomem_plugin.losses import CombinedMarginLoss

MARGIN = CombinedMarginLoss(64, 1.0, 0.5, 0.0)


def cfg(**kw):
    base = edict(embedding_size=8, num_classes=1000, sample_rate=0.2, fp16=False)
    base.update(kw)
    return base


def test_default_head_is_partial_fc():
    head = registry.build_head(cfg(), MARGIN)
    assert isinstance(head, PartialFC) and head.num_sample == 200


def test_memory_size_defaults_to_sample_rate_times_classes():
    head = registry.build_head(cfg(head="prototype_memory"), MARGIN)
    assert isinstance(head, PrototypeMemory) and head.memory_size == 200
    head = registry.build_head(cfg(head="qapm", memory_size=64, quality_source="external"), MARGIN)
    assert isinstance(head, QualityAwarePrototypeMemory) and head.memory_size == 64
    assert head.quality_source == "external"


def test_head_options_dict_and_top_level_keys():
    head = registry.build_head(cfg(head="prototype_memory", head_options={"prototype_grad": False}), MARGIN)
    assert head.prototype_grad is False
    head = registry.build_head(cfg(head="qapm", norm_power=2), MARGIN)  # int accepted for float
    assert head.norm_power == 2.0


def test_unknown_head_names_the_choices():
    with pytest.raises(ValueError, match="unknown head 'protomemory'.*partial_fc.*prototype_memory.*qapm"):
        registry.build_head(cfg(head="protomemory"), MARGIN)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['memory_sise'\].*memory_size, prototype_grad"):
        registry.build_head(cfg(head="prototype_memory", head_options={"memory_sise": 10}), MARGIN)
    with pytest.raises(ValueError, match=r"\['quality_source'\] are options of other heads.*prototype_memory"):
        registry.build_head(cfg(head="prototype_memory", quality_source="norm"), MARGIN)


def test_wrong_type_names_key_and_type():
    with pytest.raises(ValueError, match="'prototype_grad' of head 'prototype_memory' must be of type bool"):
        registry.build_head(cfg(head="prototype_memory", prototype_grad="yes"), MARGIN)
    with pytest.raises(ValueError, match="'memory_size'.*must be of type int"):
        registry.build_head(cfg(head="prototype_memory", memory_size="big"), MARGIN)
    with pytest.raises(ValueError, match="quality_source must be one of"):
        registry.build_head(cfg(head="qapm", quality_source="blur"), MARGIN)


def test_missing_required_key():
    c = cfg()
    del c["num_classes"]
    with pytest.raises(ValueError, match="'num_classes' is required"):
        registry.build_head(c, MARGIN)


def test_third_party_head_through_entry_points(tmp_path, monkeypatch):
    pkg = tmp_path / "myheads.py"
    pkg.write_text(textwrap.dedent('''
        from protomem_plugin.heads import PrototypeMemory

        class TinyMemory(PrototypeMemory):
            options = {**PrototypeMemory.options, "tiny_flag": (bool, False, "a flag")}

            def __init__(self, *args, tiny_flag=False, **kwargs):
                super().__init__(*args, **kwargs)
                self.tiny_flag = tiny_flag
    '''))
    dist_info = tmp_path / "myheads-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: myheads\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[protomem_plugin.heads]\ntiny_memory = myheads:TinyMemory\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry._HEADS, "_entry_points_loaded", False)
    try:
        head = registry.build_head(cfg(head="tiny_memory", tiny_flag=True, memory_size=16), MARGIN)
        assert type(head).__name__ == "TinyMemory" and head.tiny_flag and head.memory_size == 16
        assert "tiny_memory" in registry.available_heads()
    finally:
        registry._HEADS.classes.pop("tiny_memory", None)
        sys.modules.pop("myheads", None)
