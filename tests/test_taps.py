"""Layer taps (kdlab/models/taps.py): exactly the named modules' tensors, from forward hooks
that leave the model's outputs, gradients and batch-norm statistics as they are; the stage taps
each family declares; ``kdlab models --layers``. The timm test is skipped where timm (and a
torchvision matching torch) is not installed."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdlab.cli import main
from kdlab.models import build_model
from kdlab.models.taps import Taps, list_taps, stage_taps, tap_shapes


def _model(name, shape=(3, 16, 16), classes=5, seed=0):
    torch.manual_seed(seed)
    return build_model(name, classes, input_shape=shape).train()


def _stage_specs(name, model):
    stages = stage_taps(name, model)
    return [s.out for s in stages] + [s.pre_relu for s in stages if s.pre_relu] + [s.bn for s in stages if s.bn]


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_wrn_taps_are_the_modules_outputs_and_inputs_exactly():
    """WRN-16-2 in train mode: group outputs, the next group's first bn1 (pre-ReLU), the final bn,
    and a block's conv1 input, against a hook-free forward of a copy, step by step."""
    model = _model("wrn-16-2")
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16)
    specs = ["conv1", "blocks.1", "blocks.2.bn1", "blocks.3", "blocks.4.bn1", "blocks.5", "bn", "blocks.0.conv1:in"]
    with Taps(model, specs) as taps:
        logits = model(x)
        got = dict(zip(specs, taps.features))
    stem = twin.conv1(x)
    h = [stem]
    for block in twin.blocks:
        h.append(block(h[-1]))
    expected = {"conv1": stem, "blocks.1": h[2], "blocks.2.bn1": twin.blocks[2].bn1(h[2]), "blocks.3": h[4],
                "blocks.4.bn1": twin.blocks[4].bn1(h[4]), "blocks.5": h[6], "bn": twin.bn(h[6]),
                "blocks.0.conv1:in": F.relu(twin.blocks[0].bn1(stem))}
    for spec in specs:
        assert torch.equal(got[spec], expected[spec]), spec
    assert torch.equal(logits, twin.fc(F.adaptive_avg_pool2d(F.relu(expected["bn"]), 1).flatten(1)))
    assert (got["blocks.2.bn1"] < 0).any()  # pre-ReLU: negative values kept


def test_resnet_pre_relu_is_the_blocks_sum_before_its_last_relu():
    model = _model("resnet-20")
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16)
    with Taps(model, ["layers.2", "layers.2.relu:in", "layers.2.bn2"]) as taps:
        model(x)
        out, pre, bn2 = taps.features
    h = F.relu(twin.bn1(twin.conv1(x)))
    h = twin.layers[1](twin.layers[0](h))
    block = twin.layers[2]  # not the first of its stage: identity shortcut
    bn2_out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(h)))))
    assert torch.equal(bn2, bn2_out)
    assert torch.equal(pre, bn2_out + h)
    assert torch.equal(out, F.relu(pre)) and (pre < 0).any()


def test_a_tensor_changed_in_place_after_its_module_is_kept_as_it_was():
    """mlp: Linear then ReLU(inplace=True), which overwrites the linear's output; the tap keeps
    the pre-ReLU values (a copy taken when the module ran) and its gradient path."""
    model = _model("mlp-32-32", shape=(1, 8, 8))
    x = torch.randn(6, 1, 8, 8)
    with Taps(model, ["hidden.1", "hidden.2", "hidden.2:in"]) as taps:
        model(x)
        linear, relu, relu_in = taps.features
    expected = model.hidden[1](x.flatten(1))
    assert torch.equal(linear, expected) and torch.equal(relu_in, expected) and (linear < 0).any()
    assert torch.equal(relu, F.relu(expected))
    linear.square().sum().backward()
    assert model.hidden[1].weight.grad is not None and model.hidden[3].weight.grad is None


@pytest.mark.parametrize("name,shape", [("wrn-16-2", (3, 16, 16)), ("resnet-20", (3, 16, 16)),
                                        ("mlp-32-32-bn", (1, 40)), ("cnn1d-8", (1, 40)),
                                        ("alexnet-cifar", (3, 16, 16))])
def test_taps_change_no_output_gradient_or_batch_norm_statistic(name, shape):
    """Three SGD steps in train mode with and without taps (every stage's out, pre-ReLU and
    norm): the same logits, gradients, weights and running statistics, num_batches_tracked too."""
    with_taps, without = _model(name, shape), _model(name, shape)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (with_taps, without)]
    taps = Taps(with_taps, _stage_specs(name, with_taps))
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, *shape, generator=generator), torch.randint(0, 5, (8,), generator=generator)
        logits = []
        for model, optimizer in zip((with_taps, without), optimizers):
            optimizer.zero_grad()
            out = model(x)
            F.cross_entropy(out, y).backward()
            logits.append(out)
        assert torch.equal(*logits)
        for a, b in zip(with_taps.parameters(), without.parameters()):
            assert torch.equal(a.grad, b.grad)
        assert len(taps.features) == len(taps.specs)
        for optimizer in optimizers:
            optimizer.step()
    state, expected = with_taps.state_dict(), without.state_dict()
    assert list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    assert any(k.endswith("num_batches_tracked") for k in state) == (name != "alexnet-cifar")
    taps.remove()


def test_gradients_through_tapped_features_reach_the_student():
    """A loss on WRN's pre-ReLU taps gives the gradient of the same loss on a hook-free copy."""
    model = _model("wrn-16-2")
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16)
    with Taps(model, ["blocks.2.bn1", "bn"]) as taps:
        model(x)
        sum(f.square().mean() for f in taps.features).backward()
    h = twin.blocks[:2](twin.conv1(x))
    (twin.blocks[2].bn1(h).square().mean() + twin.bn(twin.blocks[2:](h)).square().mean()).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if name.startswith("fc."):
            assert p.grad is None  # after every tap
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_features_are_the_last_forwards_only():
    model = _model("resnet-20")
    taps = Taps(model, ["layers.5", "layers.5.relu:in"])
    with pytest.raises(ValueError, match="has not run since the taps were set"):
        taps.features
    first = [t.clone() for t in (model(torch.randn(2, 3, 16, 16)), *taps.features)]
    with torch.no_grad():  # a teacher's forward: no graph kept
        model(torch.randn(3, 3, 16, 16))
    features = taps.features
    assert [f.shape[0] for f in features] == [3, 3] and all(f.grad_fn is None for f in features)
    assert not torch.equal(first[1][:2], features[0][:2])
    assert len(taps._tensors) == 2 and taps._calls == [1, 1]  # one slot per spec, whatever the step count
    taps.clear()
    assert taps._tensors == [None, None]
    taps.remove()


def test_a_module_that_did_not_run_or_ran_twice_is_a_clear_error():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.act, self.unused = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)

        def forward(self, x):
            return self.act(self.linear(self.act(x)))

    net = Net()
    with Taps(net, ["unused"]) as taps:
        net(torch.randn(2, 4))
        with pytest.raises(ValueError, match=r"^tap 'unused': its module did not run in the model's last forward$"):
            taps.features
    with Taps(net, ["act"]) as taps:
        net(torch.randn(2, 4))
        with pytest.raises(ValueError, match="ran 2 times in one forward"):
            taps.features


def test_removed_taps_leave_no_trace():
    model, fresh = _model("resnet-20"), _model("resnet-20")
    before = _hook_count(model)
    with Taps(model, ["layers.2", "layers.2.relu:in"]):
        assert _hook_count(model) == before + 3  # the model's own pre-hook clears the last forward's tensors
    taps = Taps(model, ["conv1"])
    taps.remove()
    assert _hook_count(model) == before == 0
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), fresh(x))


def test_unknown_names_are_one_line_errors_with_a_close_match():
    model = _model("resnet-20")
    with pytest.raises(ValueError, match=r"^tap 'layers.2.rleu:in': the model has no module 'layers.2.rleu'; "
                                         r"did you mean 'layers.2.relu'\? \(`kdlab models --layers MODEL`"):
        Taps(model, ["layers.2", "layers.2.rleu:in"])
    assert _hook_count(model) == 0  # nothing registered when a name is wrong
    with pytest.raises(ValueError, match="has no module 'classifier'"):
        Taps(model, ["classifier"])
    with pytest.raises(ValueError, match="NAME:in for its input"):
        Taps(model, ["layers.2:out"])


def test_list_taps_leaves_the_model_as_it_was():
    model = _model("resnet-20")
    model.layers[0].eval()  # a mixed mode, restored as it was
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    rows = list_taps(model, (3, 16, 16))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and not model.layers[0].training and model.layers[1].training
    assert _hook_count(model) == 0
    assert [row.name for row in rows] == [name for name, _ in model.named_modules() if name]
    by_name = {row.name: row for row in rows}
    assert by_name["layers.8"][1:] == ("_Basic", (64, 4, 4), 73_984)
    assert by_name["layers.8.relu"][1:] == ("ReLU", (64, 4, 4), 0)
    assert by_name["fc"][1:] == ("Linear", (5,), 64 * 5 + 5)


@pytest.mark.parametrize("name,shape,outs,norms", [
    ("wrn-16-2", (3, 32, 32), [(32, 32, 32), (64, 16, 16), (128, 8, 8)], ["blocks.2.bn1", "blocks.4.bn1", "bn"]),
    ("wrn-40-2", (3, 32, 32), [(32, 32, 32), (64, 16, 16), (128, 8, 8)], ["blocks.6.bn1", "blocks.12.bn1", "bn"]),
    ("resnet-20", (3, 32, 32), [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
     ["layers.2.bn2", "layers.5.bn2", "layers.8.bn2"]),
    ("mlp-1200-1200", (1, 28, 28), [(1200,), (1200,)], [None, None]),
    ("mlp-64-64-bn", (1, 40), [(64,), (64,)], ["hidden.2", "hidden.5"]),
    ("mlp-64-64-ln", (1, 40), [(64,), (64,)], ["hidden.2", "hidden.5"]),
    ("cnn1d-32", (1, 40), [(32, 40), (32, 20), (32, 10)], ["body.1", "body.4", "body.7"]),
    ("alexnet-cifar", (3, 32, 32), [(64, 32, 32), (64, 16, 16)], [None, None]),
])
def test_stage_taps_of_each_family(name, shape, outs, norms):
    model = build_model(name, 10, input_shape=shape)
    stages = stage_taps(name, model)
    assert [stage.bn for stage in stages] == norms
    assert tap_shapes(model, [s.out for s in stages], shape) == outs
    assert tap_shapes(model, [s.pre_relu for s in stages], shape) == outs  # pre-ReLU: the output's shape
    for stage in stages:
        if stage.bn:
            assert isinstance(model.get_submodule(stage.bn), (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm))
    if None in norms:
        with pytest.raises(ValueError, match=rf"^{name}: no batch norm before the ReLU found for stage .*"
                                             r"name the layers yourself \(distill.student_layers and teacher_layers; in Python Taps\(model"):
            stage_taps(name, model, require=("bn",))
    else:
        assert stage_taps(name, model, require=("pre_relu", "bn")) == stages


def test_a_model_without_declarations_says_how_to_name_modules():
    with pytest.raises(ValueError, match=r"^mine: kdlab declares no stage taps for this model; name the layers yourself"):
        stage_taps("mine", nn.Sequential(nn.Linear(2, 2)))


def test_taps_under_autocast():
    model = _model("resnet-20").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x)
        with Taps(model, ["conv1", "layers.8.relu:in"]) as taps:
            tapped = model(x)
            conv, pre = taps.features
        expected = model.conv1(x)
    assert torch.equal(plain, tapped) and torch.equal(conv, expected) and conv.dtype == torch.bfloat16
    assert pre.shape == (2, 64, 4, 4)


def test_taps_on_a_ddp_model_hook_the_inner_module(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model, plain = _model("mlp-16-16-bn", shape=(1, 12)), _model("mlp-16-16-bn", shape=(1, 12))
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(4, 1, 12)
        with Taps(ddp, ["hidden.2", "hidden.3"]) as taps:  # names of the inner module
            assert _hook_count(model) == 3
            logits = ddp(x)
            (logits.sum() + taps.features[0].square().mean()).backward()
        out = plain(x)
        (out.sum() + plain.hidden[2](plain.hidden[1](x.flatten(1))).square().mean()).backward()
        assert torch.equal(logits, out)
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
    finally:
        dist.destroy_process_group()


def test_models_layers_command(capsys):
    assert main(["models", "--layers", "resnet-20", "--input-shape", "3,16,16", "--num-classes", "7"]) == 0
    out = capsys.readouterr().out
    assert "resnet-20: 0.270M parameters, 7 classes, input 3×16×16" in out
    assert any(line.split()[:3] == ["layers.8.relu", "ReLU", "64×4×4"] and "stage 3 pre-ReLU = its input" in line
               for line in out.splitlines())
    assert any(line.split() == ["3", "layers.8", "layers.8.relu:in", "layers.8.bn2", "64×4×4"]
               for line in out.splitlines())
    assert main(["models", "--layers", "cnn1d-8"]) == 0  # its default input, 1×40
    assert "body.7  " in capsys.readouterr().out


@pytest.mark.parametrize("argv,fragment", [
    (["--layers", "vgg-16"], "--layers vgg-16: unknown model 'vgg-16'"),
    (["--layers", "resnet-20", "--input-shape", "3,x"], "--input-shape"),
    (["--layers", "cnn1d-8", "--input-shape", "3,32,32"], "cnn1d-8 cannot take inputs of shape (3, 32, 32)"),
])
def test_models_layers_bad_input_is_one_line(argv, fragment, capsys):
    assert main(["models", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlab: error: ") and fragment in err and err.count("\n") == 1


def test_timm_resnets_taps_and_stages():
    """timm:resnet18 (BasicBlock: act2 after an in-place ``x += shortcut``) and timm:resnet50
    (Bottleneck: act3); a GELU net has stages but no pre-ReLU point."""
    from kdlab.models.timm_family import import_timm

    try:
        import_timm()
    except ValueError:
        pytest.skip("timm does not load here (pip install 'kdlab[timm]' with a torchvision matching torch)")
    model = _model("timm:resnet18", shape=(3, 64, 64), classes=7)
    rows = {row.name: row for row in list_taps(model, (3, 64, 64))}
    assert rows["net.layer4"][1:3] == ("Sequential", (512, 2, 2))
    assert rows["net.layer1.1.act2"][1:] == ("ReLU", (64, 16, 16), 0)
    assert rows["net.fc"][1:] == ("Linear", (7,), 512 * 7 + 7)
    stages = stage_taps("timm:resnet18", model, require=("pre_relu", "bn"))
    assert [(s.out, s.pre_relu, s.bn) for s in stages[:2]] == [  # the four stages, not the stem (act1)
        ("net.layer1", "net.layer1.1.act2:in", "net.layer1.1.bn2"),
        ("net.layer2", "net.layer2.1.act2:in", "net.layer2.1.bn2")]
    shapes = [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert tap_shapes(model, [s.out for s in stages], (3, 64, 64)) == shapes
    for module in model.modules():  # timm zero-initialises each block's last BN: the sum would be the shortcut
        if isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    with Taps(model, [s.out for s in stages] + [s.pre_relu for s in stages]) as taps:
        assert torch.equal(model(x), twin(x))  # train mode: batch statistics, updated once
        outs, pres = taps.features[:4], taps.features[4:]
    assert all(torch.equal(out, F.relu(pre)) and (pre < 0).any() for out, pre in zip(outs, pres))
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())

    bottleneck = build_model("timm:resnet50", 7)
    assert stage_taps("timm:resnet50", bottleneck)[-1].pre_relu == "net.layer4.2.act3:in"
    convnext = build_model("timm:convnext_atto", 7)
    assert [s.out for s in stage_taps("timm:convnext_atto", convnext)] == [f"net.stages.{i}" for i in range(4)]
    with pytest.raises(ValueError, match=r"^timm:convnext_atto: no pre-ReLU feature found for stage net.stages.0, .*"
                                         r"Taps\(model, \['NAME', 'NAME:in', \.\.\.\]\)"):
        stage_taps("timm:convnext_atto", convnext, require=("pre_relu",))
    assert main(["models", "--layers", "timm:resnet18", "--input-shape", "3,64,64", "--num-classes", "7"]) == 0
