from __future__ import annotations

import pytest
import torch

from kdig_study.config import ModelConfig
from kdig_study.errors import KdigError
from kdig_study.measure import measure_latency, model_cost
from kdig_study.models import build_model, count_flops, count_params, serialized_bytes, tap_index

TEACHER = ModelConfig("mobilenetv2", 1.0, 0)


def test_paper_teacher_and_student_parameter_counts() -> None:
    teacher = count_params(build_model(TEACHER))
    assert teacher == 2_236_682
    student = count_params(build_model(ModelConfig("mobilenetv2", 1.0, 5)))
    assert student == 543_498
    assert teacher / student == pytest.approx(4.115, abs=5e-4)


@pytest.mark.parametrize("k,ratio", [(3, 2.19), (7, 7.29), (9, 12.04)])
def test_other_depths_match_design(k: int, ratio: float) -> None:
    s = count_params(build_model(ModelConfig("mobilenetv2", 1.0, k)))
    assert 2_236_682 / s == pytest.approx(ratio, abs=0.006)


def test_cifar_strides_keep_resolution() -> None:
    m = build_model(ModelConfig("mobilenetv2", 1.0, 5)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert m.features[:2](x).shape[-1] == 32  # stem stride 1
    assert m.features[:4](x).shape[-1] == 32  # the 24-channel stage stride 1
    logits, fmap = m.forward_tap(x, tap_index(m, "mobilenetv2"))
    assert logits.shape == (2, 10) and fmap.shape == (2, 96, 8, 8)
    teacher = build_model(TEACHER).eval()
    _, tmap = teacher.forward_tap(x, tap_index(m, "mobilenetv2"))
    assert tmap.shape[-2:] == fmap.shape[-2:]


def test_convnet_family_is_about_4x() -> None:
    t = build_model(ModelConfig("convnet", 1.0, 0))
    s = build_model(ModelConfig("convnet", 0.5, 0))
    assert 1.9e6 < count_params(t) < 2.0e6 and 0.49e6 < count_params(s) < 0.51e6
    assert 3.8 < count_params(t) / count_params(s) < 4.1
    x = torch.randn(3, 3, 32, 32)
    _, ft = t.eval().forward_tap(x, 2)
    _, fs = s.eval().forward_tap(x, 2)
    assert ft.shape[-2:] == fs.shape[-2:] == (8, 8)


def test_flops_and_size() -> None:
    t = build_model(TEACHER)
    s = build_model(ModelConfig("mobilenetv2", 1.0, 5))
    ft, fs = count_flops(t, 32), count_flops(s, 32)
    # MobileNetV2-CIFAR is about 0.1 GMACs per 32x32 image; most sit in the kept blocks
    assert 150e6 < ft < 250e6 and fs < ft and fs > 0.5 * ft
    assert serialized_bytes(s) == pytest.approx(4 * count_params(s) + 4 * 10_000, rel=0.05)
    cost = model_cost(s, 32)
    assert cost["params"] == 543_498 and cost["flops"] == fs


def test_flops_follow_the_image_size() -> None:
    """Convolutions scale with the pixels; the global pool keeps the head's cost fixed."""
    m = build_model(ModelConfig("resnet8", 1.0, 0))
    f32, f64 = count_flops(m, 32), count_flops(m, 64)
    head = 2 * 64 * 10
    assert f64 - head == pytest.approx(4 * (f32 - head), rel=1e-6)
    assert model_cost(m, 64)["flops"] == f64


def test_drop_too_many_blocks() -> None:
    with pytest.raises(KdigError, match="drop_blocks = 19"):
        build_model(ModelConfig("mobilenetv2", 1.0, 19))


def test_latency_is_warm_median_and_p90() -> None:
    m = build_model(ModelConfig("convnet", 0.25, 0))
    lat = measure_latency(m, batch_size=4, threads=1, warmup=3, runs=20, image_size=32)
    assert lat.runs == 20 and lat.threads == 1 and lat.batch_size == 4
    assert 0 < lat.median_ms <= lat.p90_ms
    assert "median and p90 of 20 timed" in lat.method
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("cfg", [ModelConfig("mobilenetv2", 1.0, 5),
                                 ModelConfig("convnet", 0.5, 0),
                                 ModelConfig("resnet20", 1.0, 0)])
def test_folded_batchnorm_is_the_same_function(cfg: ModelConfig) -> None:
    from torch import nn

    from kdig_study.models import fold_batchnorm

    torch.manual_seed(0)
    m = build_model(cfg)
    # give BN non-trivial statistics, as after training
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    m.eval()
    f = fold_batchnorm(m)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in f.modules())
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(f(x), m(x), atol=1e-4, rtol=1e-4)
    # a negative BN scale after max-pooling must not be folded (it would change the function)
    if cfg.arch == "convnet":
        bn = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)][1]  # after a pool
        bn.weight.data[0] = -1.0
        g = fold_batchnorm(m)
        assert any(isinstance(mod, nn.BatchNorm2d) for mod in g.modules())
        assert torch.allclose(g(x), m(x), atol=1e-4, rtol=1e-4)


# The CIFAR residual networks: parameter counts as the KD literature's tables give them
# (RepDistiller / CRD, CIFAR-100: 100 classes), in millions.
@pytest.mark.parametrize("arch,millions", [
    ("resnet20", 0.28), ("resnet32", 0.47), ("resnet56", 0.86), ("resnet110", 1.74),
    ("resnet8x4", 1.23), ("resnet32x4", 7.43), ("wrn16_2", 0.70), ("wrn40_1", 0.57),
    ("wrn40_2", 2.26),
])
def test_cifar_resnets_have_the_literatures_sizes(arch: str, millions: float) -> None:
    m = build_model(ModelConfig(arch), num_classes=100)
    assert round(count_params(m) / 1e6, 2) == millions
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_cifar_resnet_pairs_share_their_attention_tap_and_fold_where_they_can() -> None:
    from torch import nn

    from kdig_study.models import fold_batchnorm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    maps = {}
    for arch in ("resnet56", "resnet20", "wrn40_2", "wrn16_2"):
        m = build_model(ModelConfig(arch)).eval()
        logits, fmap = m.forward_tap(x, tap_index(m, arch))
        assert torch.allclose(logits, m(x))
        maps[arch] = fmap.shape
        folded = fold_batchnorm(m)
        assert torch.allclose(folded(x), m(x), atol=1e-5)
        left = sum(isinstance(mod, nn.BatchNorm2d) for mod in folded.modules())
        # post-activation ResNets fold every BN; a WRN keeps its pre-activation ones
        assert left == 0 if arch.startswith("resnet") else left > 0
    assert maps["resnet56"] == maps["resnet20"] == (2, 32, 16, 16)
    assert maps["wrn40_2"] == maps["wrn16_2"] == (2, 64, 16, 16)
    # Grad-CAM's layer (the last feature module) is the last stage at 8x8
    assert build_model(ModelConfig("resnet20")).features(x).shape == (2, 64, 8, 8)


def test_a_torchvision_classifier_adapted_to_32_px() -> None:
    from torch import nn

    m = build_model(ModelConfig("torchvision:resnet18", small_input=True))
    stem = m.model.conv1
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert isinstance(m.model.maxpool, nn.Identity)
    assert count_params(m) == 11_173_962  # the CIFAR ResNet-18 of the KD literature
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10) and m(x).dtype == torch.float32
    assert m.cam_layer(32) is m.model.layer4  # the last module with a feature map
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).dtype == torch.float32  # logits cast before any loss


def test_grad_cams_layer_is_found_at_the_data_sets_size() -> None:
    """An ImageNet-stem ResNet's layer4 is 1x1 at 32 px (layer3 is the last map there) and
    7x7 at 224 px: the layer follows the images' size."""
    m = build_model(ModelConfig("torchvision:resnet18"))
    assert m.cam_layer(32) is m.model.layer3
    assert m.cam_layer(224) is m.model.layer4
    with pytest.raises(KdigError, match="larger than 1x1 at 2 px; set cam_layer"):
        m.cam_layer(2)


def test_your_own_architecture_by_module_path() -> None:
    m = build_model(ModelConfig("python:arch_fixtures:tiny_student", cam_layer="4"),
                    num_classes=7)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert m.cam_layer(32) is m.model[4]


@pytest.mark.parametrize("arch,extra,fragment", [
    ("torchvision:nonet", {}, "torchvision:nonet: no such torchvision classifier"),
    ("torchvision:mobilenet_v3_small", {"small_input": True}, "adapts ResNet-family stems"),
    ("python:no_such_module:f", {}, "cannot import no_such_module"),
    ("python:arch_fixtures:nope", {}, "arch_fixtures has no function nope"),
    ("python:arch_fixtures:not_a_module", {}, "returned str, not a torch.nn.Module"),
])
def test_bad_architectures_are_one_line(arch: str, extra: dict, fragment: str) -> None:
    with pytest.raises(KdigError, match=fragment) as e:
        build_model(ModelConfig(arch, **extra))
    assert "\n" not in str(e.value)


def test_a_cam_layer_that_is_not_there_names_the_modules() -> None:
    m = build_model(ModelConfig("torchvision:resnet18", cam_layer="layer9"))
    with pytest.raises(KdigError, match="no such module in the model; its top-level modules: "
                                        "conv1, bn1, relu, maxpool, layer1"):
        m.cam_layer(32)


def test_attention_transfer_taps_a_named_layer_of_your_architecture() -> None:
    m = build_model(ModelConfig("torchvision:resnet18", small_input=True))
    x = torch.randn(2, 3, 32, 32)
    logits, fmap = m.forward_tap(x, "layer2")
    assert torch.allclose(logits, m(x)) and fmap.shape == (2, 128, 16, 16)
    with pytest.raises(KdigError, match="at_layer = 'layer9': no such module"):
        m.forward_tap(x, "layer9")
    with pytest.raises(KdigError, match="at_layer = 'fc': its output is not a feature map"):
        m.forward_tap(x, "fc")


def test_a_timm_classifier_by_name() -> None:
    timm = pytest.importorskip("timm", reason="the timm extra: pip install -e \".[timm]\"")
    m = build_model(ModelConfig("timm:resnet10t"), num_classes=12)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 12) and m(x).dtype == torch.float32
    assert count_params(m) == count_params(timm.create_model("resnet10t", num_classes=12))
    assert m.model.fc.out_features == 12
    with pytest.raises(KdigError, match="timm:nonet: no such timm model"):
        build_model(ModelConfig("timm:nonet"))
