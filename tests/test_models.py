import pytest
import torch

from kdlab.models import build_model, count_parameters, list_models


def _shape(name):
    return (1, 40) if name.startswith("cnn1d") else (3, 32, 32)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_and_features(name):
    if name in ("wrn-40-6", "wrn-28-4", "resnet-110"):
        pytest.skip("large: covered by the parameter count test and the smaller members of the family")
    if name.startswith("transformer"):
        pytest.skip("a translation model (source and target tokens): tests/test_transformer.py")
    if name.startswith("timm:"):
        try:
            import timm  # noqa: F401
        except Exception:  # the main venv: no timm (no torchvision beside torch 2.13 CPU): a clear error
            with pytest.raises(ValueError, match=r"pip install 'kdlab\[timm\]'"):
                build_model(name, 7)
            return
        pytest.skip("the timm family is tested in tests/test_timm.py")
    model = build_model(name, 7, input_shape=_shape(name))
    x = torch.randn(2, *_shape(name))
    logits, features = model(x, return_features=True)
    assert logits.shape == (2, 7)
    assert features.shape == (2, model.feature_dim)
    torch.testing.assert_close(model.fc(features), logits)  # features are the last layer's input
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name,published", [
    ("wrn-16-2", 0.703e6), ("wrn-28-4", 5.87e6), ("wrn-40-6", 20.15e6), ("resnet-56", 0.86e6)])
def test_parameter_counts_match_published_sizes(name, published):
    count = count_parameters(build_model(name, 100))
    assert abs(count - published) / published < 0.01, count


def test_in_channels_and_small_inputs():
    model = build_model("wrn-16-1", 10, in_channels=1)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    mlp = build_model("mlp-800-800", 10, input_shape=(1, 28, 28))
    assert mlp.hidden[1].in_features == 784


@pytest.mark.parametrize("name,match", [("vgg-16", "unknown model"), ("wrn-15-2", "6n\\+4"), ("resnet-52", "6m\\+2")])
def test_bad_names_are_clear_errors(name, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, 10)


def test_mlp_with_batch_norm_has_bias_free_linears_and_bn_between():
    """mlp-64-64-bn on MNIST-1D: per hidden layer a bias-free linear, BN (2 per unit), ReLU."""
    model = build_model("mlp-64-64-bn", 10, input_shape=(1, 40))
    assert count_parameters(model) == (40 * 64 + 2 * 64) + (64 * 64 + 2 * 64) + (64 * 10 + 10) == 7562
    kinds = [type(m).__name__ for m in model.hidden]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU"]
    assert count_parameters(build_model("mlp-64-64", 10, input_shape=(1, 40))) == 7434  # plain: with biases


def test_mlp_with_layer_norm_normalises_each_example_alone():
    """mlp-64-64-ln: LayerNorm where -bn has BatchNorm1d; an example's logits in train mode do
    not depend on its batch (they do with batch norm)."""
    model = build_model("mlp-64-64-ln", 10, input_shape=(1, 40))
    assert count_parameters(model) == 7562  # the same parameter count as -bn (2 per unit)
    assert [type(m).__name__ for m in model.hidden] == ["Flatten", "Linear", "LayerNorm", "ReLU", "Linear",
                                                        "LayerNorm", "ReLU"]
    x = torch.randn(16, 1, 40)
    for name, alone_equal in (("mlp-64-64-ln", True), ("mlp-64-64-bn", False)):
        net = build_model(name, 10, input_shape=(1, 40)).train()
        with torch.no_grad():
            together, alone = net(x)[:4], net(x[:4])
        assert torch.allclose(together, alone, atol=1e-5) == alone_equal, name
