"""ONNX export: the contract, onnxruntime parity and insightface's ArcFaceONNX round trip."""

import numpy as np
import onnx
import pytest
import torch
from insightface.model_zoo import get_model as insightface_get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from onnx import TensorProto, helper

from protomem_plugin.backbones import get_model
from protomem_plugin.eval.embedders import OnnxEmbedder
from protomem_plugin.export import OnnxContractError, check_onnx_model, export_onnx, main, onnxruntime_parity

EXPORTED_NAMES = ["mbf", "mbf_large", "vit_t"]


def calibrated_backbone(name: str = "mbf", num_features: int = 64, seed: int = 0) -> torch.nn.Module:
    """A random backbone whose BatchNorm statistics are estimated on random faces-sized inputs,
    so that activations have trained-model magnitudes (a fresh IResNet's outputs reach 1e7)."""
    torch.manual_seed(seed)
    model = get_model(name, num_features=num_features)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 112, 112) * 2 - 1)
    return model.eval()


@pytest.fixture(scope="module", params=EXPORTED_NAMES)
def exported(request, tmp_path_factory):
    model = calibrated_backbone(request.param)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx")
    return model, path


def test_graph_follows_the_contract(exported):
    _, path = exported
    graph = onnx.load(str(path)).graph
    onnx.checker.check_model(onnx.load(str(path)))
    (inp,) = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    assert inp.name == "data"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    assert len(graph.output) == 1
    assert not {"Sub", "Mul"} & {n.op_type for n in graph.node[:8]}


def test_onnxruntime_parity(exported):
    model, path = exported
    diffs = onnxruntime_parity(model, path, batch_sizes=(1, 8))
    print(f"onnxruntime vs PyTorch max abs difference: {diffs}")
    assert set(diffs) == {1, 8}
    assert max(diffs.values()) < 1e-4


@pytest.mark.parametrize("batch", [1, 8])
def test_insightface_arcfaceonnx_matches_pytorch(exported, batch):
    model, path = exported
    arcface = insightface_get_model(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(arcface, ArcFaceONNX)
    assert arcface.input_mean == 127.5 and arcface.input_std == 127.5
    rng = np.random.default_rng(batch)
    bgr = rng.integers(0, 256, size=(batch, 112, 112, 3), dtype=np.uint8)
    onnx_feat = arcface.get_feat(list(bgr))
    rgb = torch.from_numpy(bgr[..., ::-1].copy()).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        torch_feat = model((rgb / 255 - 0.5) / 0.5).numpy()
    assert onnx_feat.shape == torch_feat.shape == (batch, 64)
    cos = np.sum(onnx_feat * torch_feat, 1) / np.linalg.norm(onnx_feat, axis=1) / np.linalg.norm(torch_feat, axis=1)
    assert cos.min() >= 0.9999
    # the colour order matters: feeding RGB to get_feat gives a different embedding
    swapped = arcface.get_feat(list(np.ascontiguousarray(bgr[..., ::-1])))
    cos_swapped = np.sum(swapped * torch_feat, 1) / np.linalg.norm(swapped, axis=1) / np.linalg.norm(torch_feat, axis=1)
    assert cos_swapped.max() < 0.9999


def test_cli_exports_a_state_dict(tmp_path, capsys):
    model = calibrated_backbone("mbf")
    weights = tmp_path / "model.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "m.onnx"
    assert main(["--network", "mbf", "--weights", str(weights), "--output", str(out), "--num-features", "64"]) == 0
    check_onnx_model(out)
    printed = capsys.readouterr().out
    assert "max abs difference" in printed and str(out) in printed


def test_cli_rejects_weights_of_another_network(tmp_path):
    weights = tmp_path / "model.pt"
    torch.save(get_model("tiny", num_features=64).state_dict(), weights)
    with pytest.raises(ValueError, match="model.pt.*does not match backbone 'mbf'"):
        main(["--network", "mbf", "--weights", str(weights), "--output", str(tmp_path / "x.onnx"),
              "--num-features", "64"])


def _save_graph(path, nodes, outputs):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 112, 112])], outputs,
        initializer=[helper.make_tensor("c", TensorProto.FLOAT, [], [127.5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_two_output_onnx_is_rejected(tmp_path):
    path = _save_graph(
        tmp_path / "two_outputs.onnx",
        [helper.make_node("ReduceMean", ["data"], ["a"], name="mean_a", axes=[2, 3], keepdims=0),
         helper.make_node("ReduceMax", ["data"], ["b"], name="max_b", axes=[2, 3], keepdims=0)],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3])],
    )
    with pytest.raises(ValueError, match=r"two_outputs\.onnx.*exactly one output, found 2"):
        OnnxEmbedder(path)
    with pytest.raises(OnnxContractError, match=r"two_outputs\.onnx.*one output"):
        check_onnx_model(path)


def test_sub_mul_head_is_rejected_as_insightface_would_misread_it(tmp_path):
    path = _save_graph(
        tmp_path / "submul.onnx",
        [helper.make_node("Sub", ["data", "c"], ["s"], name="Sub_0"),
         helper.make_node("Mul", ["s", "c"], ["m"], name="Mul_1"),
         helper.make_node("ReduceMean", ["m"], ["out"], name="mean", axes=[2, 3], keepdims=0)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
    )
    assert insightface_get_model(str(path), providers=["CPUExecutionProvider"]).input_std == 1.0
    with pytest.raises(OnnxContractError, match=r"submul\.onnx.*Sub/Mul"):
        check_onnx_model(path)


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    model = get_model("r18", num_features=64, fp16=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "r18.onnx")
    assert model.fp16 is True
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    model = calibrated_backbone("mbf")
    folder = tmp_path_factory.mktemp("external")
    path = export_onnx(model, folder / "mbf.onnx", external_data=True)
    return model, path


def test_external_data_puts_the_weights_in_one_side_file(external):
    model, path = external
    assert sorted(p.name for p in path.parent.iterdir()) == ["mbf.onnx", "mbf.onnx.data"]
    graph = onnx.load(str(path), load_external_data=False).graph
    external_tensors = [t for t in graph.initializer if t.data_location == TensorProto.EXTERNAL]
    locations = {e.value for t in external_tensors for e in t.external_data if e.key == "location"}
    assert locations == {"mbf.onnx.data"}
    n_weights = sum(p.numel() for p in model.parameters())
    # the weights (float32) are in the side file; the graph file keeps only small tensors and nodes
    assert path.with_name("mbf.onnx.data").stat().st_size >= 0.95 * 4 * n_weights
    assert path.stat().st_size < 0.05 * 4 * n_weights
    check_onnx_model(path)
    assert max(onnxruntime_parity(model, path, batch_sizes=(1, 4)).values()) < 1e-4


def test_insightface_loads_an_external_data_model(external):
    model, path = external
    arcface = insightface_get_model(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(arcface, ArcFaceONNX) and arcface.input_std == 127.5
    bgr = np.random.default_rng(0).integers(0, 256, size=(2, 112, 112, 3), dtype=np.uint8)
    rgb = torch.from_numpy(bgr[..., ::-1].copy()).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        torch_feat = model((rgb / 255 - 0.5) / 0.5).numpy()
    np.testing.assert_allclose(arcface.get_feat(list(bgr)), torch_feat, rtol=1e-4, atol=1e-4)


def test_plain_export_removes_a_stale_side_file(external, tmp_path):
    model, _ = external
    path = export_onnx(model, tmp_path / "m.onnx", external_data=True)
    assert path.with_name("m.onnx.data").is_file()
    export_onnx(model, path)
    assert not path.with_name("m.onnx.data").exists()
    assert not onnx.load(str(path), load_external_data=False).graph.initializer[0].external_data
    check_onnx_model(path)
