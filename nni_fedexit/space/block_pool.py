"""S1: the ResNet block-pool search space, an NNI 3.0 ``ModelSpace``.

P source residual networks (timm ResNets) are cropped by stage; stage i of every source goes
into block pool i. A network of the space is a small-image stem, one crop from each of the L
pools (an NNI ``LayerChoice`` labelled ``stage1`` .. ``stageL``), and a classifier head, so the
space holds the product of the pool sizes (N^L) networks.

Stages meet at the first source network's own stage widths (the *interface*). A crop whose input
or output width differs gets a 1x1 conv + BN adapter on that side. The baseline network (every
stage from the first source) therefore has no adapters: it is the first source network at the
same widths with a small-image stem and head, and its parameter count is P of the reward.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from nni_fedexit.checks import positive_int
from nni_fedexit.presets import load_preset
from nni_fedexit.macs import forward_macs
from nni_fedexit.nni_compat import import_nni
from nni_fedexit.space.architecture import architecture_label  # noqa: F401  (also here, where it always was)

import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.nas.nn.pytorch import LayerChoice, ModelSpace  # noqa: E402
from nni.nas.space import current_model, model_context  # noqa: E402

__all__ = ["SpaceSpec", "SpecError", "ResNetBlockPoolSpace", "BlockCrop", "load_space_spec", "architecture_label"]

#: timm's own stage widths, needed to load pretrained weights
NATIVE_WIDTHS = (64, 128, 256, 512)


class SpecError(ValueError):
    """A search-space spec is invalid; the message names the key and the fix."""


@dataclass
class SpaceSpec:
    """What a block-pool space is built from. Every field is a key of the YAML presets."""

    #: P >= 2 timm model names of the ResNet family (resnet*, resnext*, wide_resnet*, ...)
    sources: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")
    in_chans: int = 1
    image_size: int = 28
    num_classes: int = 10
    #: stage widths (one per stage, 1 to 4 stages); narrow by default so a 2-core CPU trains it
    widths: tuple[int, ...] = (16, 32, 64, 128)
    #: extra candidates: the first k blocks of each source stage, for every k listed (k < depth)
    depth_crops: tuple[int, ...] = ()
    #: source name -> local weights file (timm/torchvision state dict); needs widths (64,128,256,512)
    pretrained: dict[str, str] = field(default_factory=dict)
    #: stem output width; None takes the first source's stage-1 input width (64 for timm ResNets)
    stem_width: int | None = None
    #: stride of the stem's 3x3 convolution: 1 keeps the image size for stage 1; 2 halves it, for
    #: about a third of the compute per image (a cheaper network for CPU clients)
    stem_stride: int = 1

    def __post_init__(self) -> None:
        self.sources = tuple(self.sources)
        self.widths = tuple(self.widths)
        self.depth_crops = tuple(self.depth_crops)
        self.pretrained = dict(self.pretrained or {})
        self.validate()

    def validate(self) -> None:
        """Check values without building anything; raise :class:`SpecError` naming the key."""
        if len(self.sources) < 2:
            raise SpecError(f"sources: the method needs P >= 2 source networks, got {list(self.sources)}")
        if len(set(self.sources)) != len(self.sources):
            raise SpecError(f"sources: names must be distinct, got {list(self.sources)}")
        for name in self.sources:
            if not isinstance(name, str):
                raise SpecError(f"sources: {name!r} is not a timm model name (a string such as 'resnet18')")
        _positive_int("in_chans", self.in_chans)
        _positive_int("image_size", self.image_size)
        _positive_int("num_classes", self.num_classes)
        if self.num_classes < 2:
            raise SpecError(f"num_classes: need at least 2 classes, got {self.num_classes}")
        if not 1 <= len(self.widths) <= 4:
            raise SpecError(f"widths: timm ResNets have 4 stages, give 1 to 4 widths, got {list(self.widths)}")
        for w in self.widths:
            _positive_int("widths", w)
        for k in self.depth_crops:
            _positive_int("depth_crops", k)
        if self.stem_width is not None:
            _positive_int("stem_width", self.stem_width)
        if isinstance(self.stem_stride, bool) or self.stem_stride not in (1, 2):
            raise SpecError(f"stem_stride: must be 1 or 2, got {self.stem_stride!r}")
        if self.image_size < self.stem_stride * 2 ** (len(self.widths) - 1):
            raise SpecError(
                f"image_size: {self.image_size} is too small for {len(self.widths)} stages "
                f"(each after the first halves the size); use fewer widths"
            )
        for name, path in self.pretrained.items():
            if name not in self.sources:
                raise SpecError(f"pretrained: {name!r} is not one of sources {list(self.sources)}")
            if not Path(path).is_file():
                raise SpecError(f"pretrained: weights file for {name!r} not found: {path}")
        if self.pretrained and self.widths != NATIVE_WIDTHS[: len(self.widths)]:
            raise SpecError(
                f"widths: pretrained weights need the source networks' own widths "
                f"{list(NATIVE_WIDTHS[: len(self.widths)])}, got {list(self.widths)}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "spec") -> "SpaceSpec":
        """Build from a mapping (a parsed YAML preset); unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        for key in ("sources", "widths", "depth_crops"):
            if key in data and not isinstance(data[key], (list, tuple)):
                raise SpecError(f"{where}: key '{key}' must be a list, got {data[key]!r}")
        if "pretrained" in data and not isinstance(data["pretrained"] or {}, Mapping):
            raise SpecError(f"{where}: key 'pretrained' must map source names to weight files")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"], d["widths"], d["depth_crops"] = list(self.sources), list(self.widths), list(self.depth_crops)
        return d


def _positive_int(key: str, value: Any) -> None:
    """:func:`nni_fedexit.checks.positive_int`, raising its error as a SpecError."""
    try:
        positive_int(key, value)
    except ValueError as err:
        raise SpecError(str(err)) from None


def load_space_spec(name_or_path: str | Path, **overrides: Any) -> SpaceSpec:
    """A :class:`SpaceSpec` from a preset in ``search_spaces/`` (by name) or a YAML file (by path)."""
    data, where = load_preset("search_spaces", name_or_path)
    data = dict(data)
    data.update(overrides)
    return SpaceSpec.from_dict(data, where=where)


class BlockCrop(nn.Sequential):
    """Residual blocks cropped from one stage of a source ResNet, with 1x1 adapters where the
    crop's own input/output width differs from the interface width."""

    def __init__(self, blocks: nn.Sequential, in_width: int, out_width: int, crop_in: int, crop_out: int):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if crop_in != in_width:
            layers["adapt_in"] = _adapter(in_width, crop_in)
        layers["blocks"] = blocks
        if crop_out != out_width:
            layers["adapt_out"] = _adapter(crop_out, out_width)
        super().__init__(layers)


def _adapter(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out))


def _build_source(name: str, spec: SpaceSpec) -> nn.Module:
    """One timm ResNet at the spec's widths (padded to timm's 4 stages), optionally pretrained."""
    import timm
    from timm.models.resnet import ResNet

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        raise SpecError(f"sources: {name!r} is not a timm model; similar names: {close}")
    widths = list(spec.widths)
    while len(widths) < 4:
        widths.append(widths[-1] * 2)
    kwargs: dict[str, Any] = dict(channels=tuple(widths), in_chans=spec.in_chans, num_classes=spec.num_classes)
    weights = spec.pretrained.get(name)
    try:
        if weights is not None:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:
        raise SpecError(f"sources: {name!r} is not a residual network of timm's ResNet family ({err})") from err
    except (RuntimeError, KeyError, OSError) as err:
        raise SpecError(f"pretrained: cannot load weights for {name!r} from {weights}: {err}") from err
    if not isinstance(model, ResNet):
        raise SpecError(
            f"sources: {name!r} is a {type(model).__name__}, not a residual network of timm's ResNet "
            "family (resnet*, resnext*, wide_resnet*, seresnet*, ...)"
        )
    return model


def _block_io(blocks: nn.Sequential) -> tuple[int, int]:
    """(input, output) channels of a run of timm residual blocks."""
    first, last = blocks[0], blocks[-1]
    out_conv = getattr(last, "conv3", None) or last.conv2
    return first.conv1.in_channels, out_conv.out_channels


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class ResNetBlockPoolSpace(ModelSpace):
    """S1: networks assembled from block pools cropped out of several timm ResNets.

    Build it from keyword arguments (the fields of :class:`SpaceSpec`) or from a preset with
    :meth:`from_preset`. ``space.random()`` / ``space.freeze(sample)`` give NNI-frozen networks
    that share weights with the space; :meth:`build` gives an independent one. A sample maps ``stage1`` .. ``stageL`` to a candidate name (the source network's name, or
    ``<source>-d<k>`` for a depth crop of its first k blocks).
    """

    def __init__(
        self,
        sources: tuple[str, ...] | list[str] = SpaceSpec.sources,
        in_chans: int = SpaceSpec.in_chans,
        image_size: int = SpaceSpec.image_size,
        num_classes: int = SpaceSpec.num_classes,
        widths: tuple[int, ...] | list[int] = SpaceSpec.widths,
        depth_crops: tuple[int, ...] | list[int] = (),
        pretrained: Mapping[str, str] | None = None,
        stem_width: int | None = None,
        stem_stride: int = 1,
    ):
        super().__init__()
        spec = SpaceSpec(
            sources=tuple(sources), in_chans=in_chans, image_size=image_size, num_classes=num_classes,
            widths=tuple(widths), depth_crops=tuple(depth_crops), pretrained=dict(pretrained or {}),
            stem_width=stem_width, stem_stride=stem_stride,
        )
        self.spec = spec
        nets = {name: _build_source(name, spec) for name in spec.sources}
        num_stages = len(spec.widths)
        first = nets[spec.sources[0]]
        # interface widths: input of stage 1 (= stem output) and the first source's stage outputs
        interface = [spec.stem_width or _block_io(first.layer1)[0]]
        interface += [_block_io(getattr(first, f"layer{i + 1}"))[1] for i in range(num_stages)]
        self.interface_widths = tuple(interface)

        self.stem = nn.Sequential(
            nn.Conv2d(spec.in_chans, interface[0], kernel_size=3, stride=spec.stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(interface[0]),
            nn.ReLU(inplace=True),
        )
        self.pools: dict[str, dict[str, int]] = {}  # label -> candidate name -> parameter count
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(num_stages):
            label = f"stage{i + 1}"
            candidates = self._crop_stage(nets, i, interface[i], interface[i + 1])
            self.pools[label] = {key: _num_params(m) for key, m in candidates.items()}
            stages[label] = LayerChoice(candidates, label=label)
        self.stages = nn.Sequential(stages)
        context = current_model()  # the sample, when NNI builds a frozen network (build, trials)
        #: the architecture of a frozen network ({label: candidate}); None on the space itself
        self.arch: dict[str, str] | None = {l: context[l] for l in self.pools} if context else None
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(interface[-1], spec.num_classes))
        self._fixed_params = _num_params(self.stem) + _num_params(self.head)
        #: MACs for one image: of the stem, of every candidate of every pool, of the head; and the
        #: (channels, height, width) after each stage. Counted on first use (:meth:`count_macs`), on
        #: the space itself: a network built from it holds only its own crops, and a one-shot
        #: strategy replaces the choices (it asks before, see the shared search's ``mutate_model``).
        self.stem_macs, self.head_macs = 0, 0
        self.pool_macs: dict[str, dict[str, int]] = {}
        self.stage_shapes: tuple[tuple[int, int, int], ...] = ()

    def _count_macs(self) -> None:
        if self.pool_macs:
            return
        if self.arch is not None or not all(isinstance(c, LayerChoice) for c in self.stages.children()):
            raise RuntimeError("MACs are counted on the search space itself, before a one-shot strategy turns it "
                               "into a supernet; not on a network built or frozen from it")
        was_training = self.training
        self.eval()
        try:
            self.stem_macs, x = forward_macs(self.stem, self.dummy_input(1))
            shapes = []
            for label, choice in self.stages.named_children():
                costs: dict[str, int] = {}
                for name in self.pools[label]:
                    costs[name], y = forward_macs(choice[name], x)
                self.pool_macs[label] = costs
                x = y
                shapes.append(tuple(int(d) for d in y.shape[1:]))
            self.stage_shapes = tuple(shapes)
            self.head_macs, _ = forward_macs(self.head, x)
        finally:
            self.train(was_training)

    def _crop_stage(self, nets: dict[str, nn.Module], i: int, in_width: int, out_width: int) -> dict[str, nn.Module]:
        """Block pool i: stage i of every source, plus the depth-truncated crops asked for.

        A depth crop whose structure equals an earlier candidate's (e.g. resnet34's first two
        blocks vs. resnet18's stage) is skipped unless weights are pretrained.
        """
        candidates: dict[str, nn.Module] = {}
        seen: set[tuple] = set()
        for name, net in nets.items():
            stage: nn.Sequential = getattr(net, f"layer{i + 1}")
            crops = [(name.replace(".", "_"), len(stage))]
            crops += [(f"{name.replace('.', '_')}-d{k}", k) for k in self.spec.depth_crops if k < len(stage)]
            for key, depth in crops:
                blocks = stage if depth == len(stage) else nn.Sequential(*list(stage)[:depth])
                c_in, c_out = _block_io(blocks)
                signature = (type(stage[0]).__name__, depth, c_in, c_out)
                if signature in seen and depth != len(stage) and not self.spec.pretrained:
                    continue
                seen.add(signature)
                candidates[key] = BlockCrop(blocks, in_width, out_width, c_in, c_out)
        return candidates

    @classmethod
    def from_preset(cls, name_or_path: str | Path = "resnet_pool", **overrides: Any) -> "ResNetBlockPoolSpace":
        """Build from a YAML preset in ``search_spaces/`` (by name) or a file, with overrides."""
        return cls(**load_space_spec(name_or_path, **overrides).to_dict())

    @classmethod
    def from_spec(cls, spec: SpaceSpec) -> "ResNetBlockPoolSpace":
        return cls(**spec.to_dict())

    def build(self, sample: Mapping[str, Any]) -> nn.Module:
        """A fresh, independently initialised network for ``sample``.

        NNI's ``freeze(sample)`` keeps the space's weights: the frozen network *shares* its stage
        modules with the space (and with every other network frozen from it), which is what
        weight inheritance wants. Training several networks side by side in one process needs
        independent copies: this re-runs the constructor in NNI's frozen context instead, so
        only the chosen crops are kept and nothing is shared.
        """
        self.validate(dict(sample))
        with model_context(dict(sample)):
            return type(self)(**self.spec.to_dict())

    def freeze(self, sample: Mapping[str, Any]) -> nn.Module:
        """NNI's freeze (sharing the space's weights), with the frozen network's ``arch`` set."""
        frozen = super().freeze(dict(sample))
        frozen.arch = {label: sample[label] for label in self.pools}
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    # ---- what the search needs to know without training -------------------------------------

    @property
    def labels(self) -> list[str]:
        return list(self.pools)

    def num_architectures(self) -> int:
        """Size of the space: the product of the pool sizes (N^L when every pool holds N)."""
        return math.prod(len(pool) for pool in self.pools.values())

    def count_params(self, sample: Mapping[str, Any]) -> int:
        """p_h: parameter count of the network ``sample`` picks, exactly as ``freeze`` builds it."""
        total = self._fixed_params
        for label, pool in self.pools.items():
            if label not in sample:
                raise KeyError(f"sample has no choice for {label!r}; it needs {self.labels}")
            choice = sample[label]
            if choice not in pool:
                raise KeyError(f"{label}: {choice!r} is not in its block pool {list(pool)}")
            total += pool[choice]
        return total

    def count_macs(self, sample: Mapping[str, Any]) -> int:
        """MACs for one image of the network ``sample`` picks (stem, stages, head), without building it."""
        stages = self.stage_path_macs(sample)
        return self.stem_macs + sum(stages) + self.head_macs

    def stage_path_macs(self, sample: Mapping[str, Any]) -> list[int]:
        """MACs of each of the network's stages for one image, first to last."""
        self.count_params(sample)  # names the label or candidate a wrong sample lacks
        self._count_macs()
        return [self.pool_macs[label][sample[label]] for label in self.pools]

    def baseline_sample(self) -> dict[str, str]:
        """Every stage from the first source network: the baseline whose size is P."""
        first = self.spec.sources[0].replace(".", "_")
        return {label: first for label in self.pools}

    def baseline_params(self) -> int:
        """P of the reward: the first source network at the same widths, stem and head."""
        return self.count_params(self.baseline_sample())

    def dummy_input(self, batch_size: int = 1) -> torch.Tensor:
        return torch.randn(batch_size, self.spec.in_chans, self.spec.image_size, self.spec.image_size)
