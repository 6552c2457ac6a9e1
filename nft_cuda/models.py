"""Models of the paper (VGG-8, CIFAR-style ResNet-18), a small CPU-friendly CNN, and two sequence
models for the MNIST family: a small vision transformer (:class:`ViT`) and an LSTM that reads an image
row by row (:class:`LSTMClassifier`).

All are plain ``torch.nn`` models: make them noisy with :func:`nft_cuda.convert`. Block names are
stable module paths so IRS taps can name them (DESIGN §5): see :data:`IRS_TAPS`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    "CUSTOM",
    "INITS",
    "IRS_TAPS",
    "MODELS",
    "OVF_PAPER_SCOPE",
    "LSTMClassifier",
    "ResNet18",
    "SmallNet",
    "VGG8",
    "ViT",
    "build_factory_model",
    "build_from_spec",
    "build_model",
    "paper_init",
]

#: Weight initialisations of the paper's models: ``"torch"`` (PyTorch's default, the library's default:
#: Kaiming-uniform with a = √5, so max|W|/rms(W) ≈ √3 ≈ 1.73 in every layer) and ``"paper"`` (the
#: authors' code: Kaiming-normal, fan_out, ReLU gain, on every Conv and Linear, biases 0).
INITS = ("torch", "paper")


def paper_init(model: nn.Module) -> nn.Module:
    """The authors' initialisation, in place: Kaiming-normal (mode fan_out, ReLU gain) on the weight of
    every ``nn.Conv2d`` and ``nn.Linear``, their biases set to 0 (BatchNorm keeps weight 1, bias 0).

    Why it matters: σ_w ∝ max|W| (docs/device-models.md), and a Gaussian tensor has max|W|/rms(W) of 2.5–5
    against √3 for the default uniform one, so the same σ_d is 2–3× more noise relative to the weights.
    Returns ``model``."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def _check_init(init) -> str:
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    return init


def _conv_bn_relu(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class VGG8(nn.Module):
    """VGG-8 as in the NeFT reference: six 3×3 conv+BN+ReLU blocks 64-128-[pool]-256-256-[pool]-512-
    512-[pool] (no conv bias), then FC → 1024 → classes. The first FC size follows the input size.

    Args:
        in_channels, num_classes, input_size: data shape (default 3×32×32, 10 classes).
        width: channel multiplier (1.0 = the paper's widths; smaller for CPU studies).
        init: ``"torch"`` (default: PyTorch's initialisation) or ``"paper"`` (the authors':
            :func:`paper_init`).
    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: float = 1.0, init: str = "torch"
    ):
        super().__init__()
        _check_init(init)
        c = [_ch(x, width) for x in (64, 128, 256, 256, 512, 512)]
        pools = (False, True, False, True, False, True)
        cin = in_channels
        for i, (cout, pool) in enumerate(zip(c, pools), start=1):
            self.add_module(f"block{i}", _conv_bn_relu(cin, cout, pool))
            cin = cout
        spatial = input_size // 8
        hidden = _ch(1024, width)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c[-1] * spatial * spatial, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        if init == "paper":
            paper_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 7):
            x = getattr(self, f"block{i}")(x)
        return self.classifier(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        # A projection only where the shape changes (the reference built an unused one everywhere).
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3×3 stride-1 stem (no max-pool), BasicBlocks [2, 2, 2, 2] with 64/128/256/512
    channels, global average pool, FC → classes. ``init``: as :class:`VGG8`."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: float = 1.0, init: str = "torch"
    ):
        super().__init__()
        _check_init(init)
        del input_size  # global average pooling makes the head independent of it
        c = [_ch(x, width) for x in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c[0], 3, padding=1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True)
        )
        cin = c[0]
        for i, (cout, stride) in enumerate(zip(c, (1, 2, 2, 2)), start=1):
            self.add_module(f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c[3], num_classes)
        if init == "paper":
            paper_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallNet(nn.Module):
    """A small CNN that trains on 2 CPU cores in minutes: three conv+BN+ReLU+pool blocks (16-32-64
    channels by default), FC → 128 → classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 32, width: float = 1.0):
        super().__init__()
        c = [_ch(x, width) for x in (16, 32, 64)]
        cin = in_channels
        for i, cout in enumerate(c, start=1):
            self.add_module(f"block{i}", _conv_bn_relu(cin, cout, pool=True))
            cin = cout
        spatial = input_size // 8
        hidden = _ch(128, width)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c[2] * spatial * spatial, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block3(self.block2(self.block1(x))))


def _check_image_input(model: nn.Module, x: torch.Tensor, channels: int, size: int) -> None:
    """A clear error for inputs the sequence models cannot read (they fix the image shape)."""
    if x.dim() != 4 or x.shape[1] != channels or x.shape[2] != size or x.shape[3] != size:
        raise ValueError(f"{type(model).__name__} takes images [B, {channels}, {size}, {size}], got {list(x.shape)}")


class ViT(nn.Module):
    """A small vision transformer: 4×4 patches of a 32×32 image (the MNIST family is padded from 28×28)
    → 64 tokens of width 64, a learned position embedding, four pre-norm
    ``nn.TransformerEncoderLayer`` blocks (4 heads, MLP 2× width, no dropout: dropout would keep OVF
    from batching its forwards), a final LayerNorm, mean over tokens, Linear → classes.

    :func:`nft_cuda.convert` makes the patch embedding (a stride-4 Conv2d), every attention projection,
    the MLP Linears and the head noisy; the position embedding and the LayerNorms stay digital.
    IRS taps name blocks (``blocks.0`` …), whose outputs are token sequences [B, 64, width].

    Args:
        in_channels, num_classes, input_size: the data shape (input_size must be a multiple of ``patch``).
        width: multiplier of the token width 64 (rounded to a multiple of the 4 heads).
        patch, depth, heads: patch size, number of encoder blocks, attention heads.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 32,
        width: float = 1.0,
        patch: int = 4,
        depth: int = 4,
        heads: int = 4,
    ):
        super().__init__()
        if input_size % patch:
            raise ValueError(f"ViT: input_size {input_size} is not a multiple of the patch size {patch}")
        dim = heads * max(1, round(64 * width / heads))
        self.in_channels, self.input_size = in_channels, input_size
        tokens = (input_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image_input(self, x, self.in_channels, self.input_size)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, T, dim]
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


class LSTMClassifier(nn.Module):
    """An LSTM that reads an image row by row: 28 steps of 28 features (× channels), hidden width 128,
    a Linear head on the last step's output.

    The MNIST family comes padded to 32×32 (2 zero pixels each side, see nft_cuda.data); the model
    reads the central 28×28, i.e. the original image. :func:`nft_cuda.convert` makes every LSTM weight
    matrix and the head noisy. The IRS tap ``lstm`` outputs ``(output, (h, c))``; its snapshot is the
    output sequence [B, 28, hidden].

    Args:
        in_channels, num_classes, input_size: the data shape (input_size ≥ 28).
        width: multiplier of the hidden width 128.
        rows: the side of the central square read (28: the unpadded MNIST image).
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, input_size: int = 32, width: float = 1.0, rows: int = 28
    ):
        super().__init__()
        if input_size < rows:
            raise ValueError(f"LSTMClassifier reads {rows}×{rows} images; input_size {input_size} is smaller")
        self.in_channels, self.input_size, self.rows = in_channels, input_size, rows
        self.lstm = nn.LSTM(in_channels * rows, _ch(128, width), batch_first=True)
        self.head = nn.Linear(_ch(128, width), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image_input(self, x, self.in_channels, self.input_size)
        top = (self.input_size - self.rows) // 2
        image = x[:, :, top : top + self.rows, top : top + self.rows]
        steps = image.permute(0, 2, 1, 3).flatten(2)  # [B, rows, C·rows]: row i is step i
        out, _ = self.lstm(steps)
        return self.head(out[:, -1])


MODELS = {"small": SmallNet, "vgg8": VGG8, "resnet18": ResNet18, "vit": ViT, "lstm": LSTMClassifier}

#: Default IRS taps per model: module path → snapshot pool size p (DESIGN §5). A tap whose output is a
#: token sequence [B, T, C] (ViT blocks, the LSTM's output) is pooled over tokens to p positions.
IRS_TAPS: dict[str, dict[str, int]] = {
    "vgg8": {"block1": 6, "block2": 4, "block4": 3},
    "resnet18": {"stem": 6, "layer1": 6, "layer2": 4, "layer3": 3},
    "small": {"block1": 4, "block2": 4, "block3": 2},
    "vit": {"blocks.0": 4, "blocks.1": 4, "blocks.2": 4},
    "lstm": {"lstm": 4},
}


#: The layers whose σ the authors' OVF raises in the oriented forwards (docs/fidelity-study.md): in their
#: ResNet-18 only the top level reads the raised σ (the stem conv and the FC; every BasicBlock keeps the
#: σ_d it was built with); their VGG-8 raises it in every layer (None: all noisy layers).
OVF_PAPER_SCOPE: dict[str, tuple[str, ...] | None] = {"resnet18": ("stem.0", "fc"), "vgg8": None}

#: The models that take ``init`` (the paper's models).
_INIT_MODELS = ("vgg8", "resnet18")


def build_model(
    name: str, *, in_channels: int, num_classes: int, input_size: int = 32, width: float = 1.0, init: str = "torch"
) -> nn.Module:
    """A plain model by name: "small", "vgg8", "resnet18", "vit" or "lstm". ``init``: ``"torch"``
    (PyTorch's default) or ``"paper"`` (the authors' :func:`paper_init`; VGG-8 and ResNet-18 only)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    _check_init(init)
    kwargs = dict(in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width)
    if init != "torch":
        if name not in _INIT_MODELS:
            raise ValueError(f"init {init!r} applies to the paper's models ({', '.join(_INIT_MODELS)}), not '{name}'")
        kwargs["init"] = init
    return MODELS[name](**kwargs)


#: The model name of a spec (and of a TrainConfig) whose model comes from a model factory.
CUSTOM = "custom"


def build_factory_model(factory, kwargs: dict | None = None) -> nn.Module:
    """``factory(**kwargs)``, checked to be an ``nn.Module``; ``factory`` is a callable or its import path
    ``"package.module:function"`` (:func:`nft_cuda.nn.custom.import_object`: a clear ValueError when it
    does not import)."""
    from nft_cuda.nn.custom import import_object

    fn = import_object(factory, "model_factory") if isinstance(factory, str) else factory
    if not callable(fn):
        raise TypeError(f"model_factory {factory!r} is a {type(fn).__name__}, not a callable")
    model = fn(**dict(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory {factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_from_spec(spec: dict) -> nn.Module:
    """The plain model an exported model's ``spec`` describes (``payload["model"]`` of
    :func:`nft_cuda.io.save_model`): a built-in model ``{"name", "in_channels", "num_classes",
    "input_size", "width"}`` or a factory's ``{"name": "custom", "factory": "package.module:function",
    "kwargs": {...}}`` (its data-shape entries are descriptive only). An ``"output"`` entry (the
    output adapter, :func:`nft_cuda.nn.custom.resolve_output`) is not the builder's business."""
    spec = {k: v for k, v in spec.items() if k != "output"}
    name = spec.pop("name")
    if "factory" in spec:
        return build_factory_model(spec["factory"], spec.get("kwargs"))
    return build_model(name, **spec)
