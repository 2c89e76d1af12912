"""S1: the block-pool space as NNI sees it and as the reward needs it."""

import numpy as np
import pytest
import torch
import yaml

from nni_fedexit import ResNetBlockPoolSpace, SpaceSpec, SpecError, load_space_spec
from nni_fedexit.presets import PresetError, list_presets
from nni_fedexit.space import BlockCrop
from helpers import tiny_space


def _num_params(m):
    return sum(p.numel() for p in m.parameters())


def test_default_preset_is_three_resnets_four_pools():
    space = ResNetBlockPoolSpace.from_preset("resnet_pool")
    assert space.labels == ["stage1", "stage2", "stage3", "stage4"]
    assert all(list(pool) == ["resnet18", "resnet34", "resnet50"] for pool in space.pools.values())
    assert space.num_architectures() == 3**4


#: what the presets' YAML files declare (search_spaces/*.yaml): 3 sources, 4 stages, and with
#: depth_crops [1] the first block of every source stage too; resnet34's first block is a
#: BasicBlock like resnet18's, so "resnet34-d1" is a duplicate and dropped: 3 + 3 - 1 = 5
THREE = ["resnet18", "resnet34", "resnet50"]
FIVE = ["resnet18", "resnet18-d1", "resnet34", "resnet50", "resnet50-d1"]
PRESET_POOLS = {
    "resnet_pool": (THREE, 3**4),  # 81
    "resnet_pool_depth": (FIVE, 5**4),  # 625
    "resnet_pool_cifar": (FIVE, 5**4),  # 625
}


@pytest.mark.parametrize("preset", sorted(PRESET_POOLS))
def test_space_size_is_product_of_pool_sizes(preset):
    pool, size = PRESET_POOLS[preset]
    space = ResNetBlockPoolSpace.from_preset(preset, widths=[8, 8, 8, 8])
    simplified = space.simplify()
    assert sorted(simplified) == space.labels == ["stage1", "stage2", "stage3", "stage4"]
    assert {label: list(m.values) for label, m in simplified.items()} == {label: pool for label in space.labels}
    assert {label: list(p) for label, p in space.pools.items()} == {label: pool for label in space.labels}
    assert space.num_architectures() == size


def test_depth_crops_add_deduplicated_candidates(fmnist_space):
    # resnet34's first block has the same structure as resnet18's: only one of them is kept
    assert list(fmnist_space.pools["stage1"]) == ["resnet18", "resnet18-d1", "resnet34", "resnet50", "resnet50-d1"]
    assert fmnist_space.num_architectures() == 5**4


@pytest.mark.slow
@pytest.mark.parametrize("which,shape", [("fmnist_space", (1, 28, 28)), ("cifar_space", (3, 32, 32))])
def test_every_candidate_of_every_pool_runs_forward(request, which, shape):
    space = request.getfixturevalue(which)
    x = torch.randn(2, *shape)
    for label, pool in space.pools.items():
        for choice in pool:
            sample = {**space.baseline_sample(), label: choice}
            model = space.freeze(sample).eval()
            with torch.no_grad():
                out = model(x)
            assert out.shape == (2, 10), (label, choice)
            assert torch.isfinite(out).all()


def test_param_count_equals_frozen_module_for_random_samples(fmnist_space):
    rs = np.random.RandomState(0)
    for _ in range(8):
        sample = {}
        model = fmnist_space.random(memo=sample, random_state=rs)
        assert fmnist_space.count_params(sample) == _num_params(model)


def test_param_count_agrees_with_nni_profiler(fmnist_space):
    import logging

    from nni.nas.profiler.pytorch.flops import NumParamsProfiler

    logging.getLogger("nni").setLevel(logging.ERROR)
    space = ResNetBlockPoolSpace.from_preset("resnet_pool", widths=[8, 8, 16, 16])
    profiler = NumParamsProfiler(space, space.dummy_input())
    sample = {"stage1": "resnet50", "stage2": "resnet34", "stage3": "resnet18", "stage4": "resnet50"}
    assert profiler.profile(sample) == space.count_params(sample)


def test_baseline_is_first_source_without_adapters(fmnist_space):
    baseline = fmnist_space.freeze(fmnist_space.baseline_sample())
    crops = [m for m in baseline.modules() if isinstance(m, BlockCrop)]
    assert len(crops) == 4
    assert all(list(dict(c.named_children())) == ["blocks"] for c in crops)
    assert fmnist_space.baseline_params() == _num_params(baseline)
    # a bottleneck crop (resnet50) needs adapters at both ends
    wide = fmnist_space.freeze({**fmnist_space.baseline_sample(), "stage2": "resnet50"})
    assert list(dict(wide.stages.stage2.named_children())) == ["adapt_in", "blocks", "adapt_out"]


def test_nni_random_freeze_and_contains(fmnist_space):
    sample = {label: m.random(random_state=np.random.RandomState(3)) for label, m in fmnist_space.simplify().items()}
    assert fmnist_space.contains(sample)
    frozen = fmnist_space.freeze(sample)
    assert not any(type(m).__name__ == "LayerChoice" for m in frozen.modules())
    assert fmnist_space.count_params(sample) == _num_params(frozen)
    assert not fmnist_space.contains({**sample, "stage2": "vgg16"})
    with pytest.raises(KeyError, match="stage2"):
        fmnist_space.count_params({**sample, "stage2": "vgg16"})


def test_bad_specs_name_the_key(tmp_path):
    with pytest.raises(SpecError, match="sources.*P >= 2"):
        ResNetBlockPoolSpace(sources=["resnet18"])
    with pytest.raises(SpecError, match="'resnet999' is not a timm model"):
        ResNetBlockPoolSpace(sources=["resnet18", "resnet999"])
    with pytest.raises(SpecError, match="not a residual network"):
        ResNetBlockPoolSpace(sources=["resnet18", "vit_tiny_patch16_224"], widths=[8, 8, 8, 8])
    with pytest.raises(SpecError, match="widths"):
        ResNetBlockPoolSpace(widths=[8, 8, 8, 8, 8])
    with pytest.raises(SpecError, match="num_classes"):
        ResNetBlockPoolSpace(num_classes=0)
    with pytest.raises(SpecError, match="image_size"):
        ResNetBlockPoolSpace(image_size=4)
    with pytest.raises(SpecError, match="stem_stride"):
        ResNetBlockPoolSpace(stem_stride=3)
    with pytest.raises(SpecError, match="pretrained.*not found"):
        ResNetBlockPoolSpace(pretrained={"resnet18": str(tmp_path / "nope.pth")}, widths=[64, 128, 256, 512])
    bad = tmp_path / "space.yaml"
    bad.write_text(yaml.safe_dump({"sources": ["resnet18", "resnet34"], "width": [8, 8, 8, 8]}))
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['width'\]"):
        load_space_spec(bad)
    bad.write_text("sources: resnet18\n")
    with pytest.raises(SpecError, match="'sources' must be a list"):
        load_space_spec(bad)
    bad.write_text("sources: [resnet18\n")
    with pytest.raises(PresetError, match="not valid YAML"):
        load_space_spec(bad)
    with pytest.raises(PresetError, match="resnet_pool"):
        load_space_spec("no_such_preset")


def test_every_shipped_preset_is_valid():
    names = list_presets("search_spaces")
    assert "resnet_pool" in names
    for name in names:
        assert isinstance(load_space_spec(name), SpaceSpec)


def test_fewer_stages_for_tiny_images(digits):
    space = tiny_space(widths=(8, 16, 32))
    assert space.labels == ["stage1", "stage2", "stage3"]
    assert space.num_architectures() == 8
    out = space.freeze(space.baseline_sample())(digits.train.images[:4])
    assert out.shape == (4, 10)


def test_crops_start_from_pretrained_source_weights(tmp_path):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    space = ResNetBlockPoolSpace(
        sources=["resnet18", "resnet34"], widths=[64, 128], pretrained={"resnet18": str(path)}, image_size=16
    )
    frozen = space.freeze(space.baseline_sample())
    want = source.layer2[1].conv1.weight
    assert torch.equal(frozen.stages.stage2.blocks[1].conv1.weight, want)


def test_build_gives_independent_networks_and_freeze_shares_the_space_weights():
    space = tiny_space(widths=(8, 8), sources=("resnet18", "resnet34"))
    sample = space.baseline_sample()
    a, b = space.build(sample), space.build(sample)
    assert space.count_params(sample) == _num_params(a) == _num_params(b)
    pa = dict(a.named_parameters())
    for name, p in b.named_parameters():
        assert p.data_ptr() != pa[name].data_ptr(), name
    # NNI's freeze keeps the space's weights (weight inheritance): the stage is the pool's crop
    assert space.freeze(sample).stages.stage1 is space.stages.stage1["resnet18"]
    with pytest.raises(Exception, match="not found"):
        space.build({**sample, "stage1": "vgg16"})


def test_a_stride_two_stem_halves_the_image_before_stage_one_and_keeps_the_parameters():
    import torch

    from nni_fedexit.exits import MultiExitNetwork, exit_costs

    sample = {"stage1": "resnet18", "stage2": "resnet34", "stage3": "resnet18", "stage4": "resnet50"}
    nets = [MultiExitNetwork.from_architecture(ResNetBlockPoolSpace(widths=[8, 16, 16, 32], stem_width=8, stem_stride=s),
                                               sample) for s in (1, 2)]
    x = torch.zeros(1, 1, 28, 28)
    assert nets[0].stem(x).shape[-1] == 28 and nets[1].stem(x).shape[-1] == 14
    assert sum(p.numel() for p in nets[0].parameters()) == sum(p.numel() for p in nets[1].parameters())
    full, cheap = (exit_costs(n, x)[-1].macs for n in nets)
    assert cheap < 0.4 * full
