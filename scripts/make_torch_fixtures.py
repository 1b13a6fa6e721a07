"""Make the test suite's PyTorch-exported ONNX files: small real models trained by PyTorch, exported as people do.

torch is not a dependency of EdgeKit or of its suite; run this by hand with torch installed:

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch onnx onnxscript numpy pillow \
        --extra-index-url https://download.pytorch.org/whl/cpu
    PYTHONPATH=. /tmp/torchenv/bin/python scripts/make_torch_fixtures.py   # writes tests/fixtures/torch/

Every model is trained on EdgeKit's embedded digits (28x28, the training split only, seed 0) so that `eval` and
`export --dataset digits` have a real accuracy to find. The files (tests/fixtures/torch/), and what each stands for:

    cnn_opset11.onnx        1-channel CNN, NCHW, Normalize(0.5, 0.5), legacy exporter at opset 11 (below 13:
                            onnxruntime's int8 needs it upgraded first)
    cnn_opset17.onnx        the same weights at opset 17 (legacy exporter, dynamo=False)
    cnn_dynamo.onnx (+ .data)  the same weights through the dynamo exporter (torch's default), weights in the
                            external data file cnn_dynamo.onnx.data
    rgb_imagenet.onnx       3-channel CNN taking ImageNet's per-channel mean and std, opset 13
    two_outputs.onnx        not a classifier: the CNN's logits and its pooled features, two outputs, opset 17
    cnn.pt2                 the 1-channel CNN trained again the same way, saved with torch.export.save: the
                            ExportedProgram archive, batch 1, NCHW, as a .pt2 source of `export`
    rgb_imagenet.pt2        the 3-channel CNN, the same way
    cnn3.pt2                a larger 1-channel CNN (3 convs, 2 dense: 7.4 million MACs), where
                            int8's kernels outweigh a call's fixed cost: the figures of int8 against float latency

`--pt2-only` writes the .pt2 files alone (the ONNX files stay as committed; each .pt2 records its own accuracy).

`versions.json` records torch's version, the seed and each model's float accuracy on the digits test split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.datasets import load_dataset

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "torch"
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # pixel units


class CNN(nn.Module):
    def __init__(self, channels: int, features: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(16 * 7 * 7, 10)
        self.features = features

    def forward(self, x):
        h = self.body(x)
        logits = self.head(torch.flatten(h, 1))
        return (logits, h.mean(dim=(2, 3))) if self.features else logits


class CNN3(nn.Module):
    """3 convs (16, 32, 64 channels, the first two at full resolution), 2 dense."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Linear(64 * 3 * 3, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(torch.flatten(self.body(x), 1))


def tensors(pixels: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, C) pixels -> normalized float NCHW, as torchvision's ToTensor + Normalize."""
    x = (pixels.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def train(channels: int, mean, std, features: bool = False, epochs: int = 12, net=None) -> tuple[nn.Module, float]:
    torch.manual_seed(0)
    data = load_dataset("digits", channels=channels)
    x, y = tensors(data.x_train, mean, std), torch.from_numpy(data.y_train)
    net = net or CNN(channels, features)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = order[i:i + 32]
            opt.zero_grad()
            out = net(x[idx])
            nn.functional.cross_entropy(out[0] if features else out, y[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        out = net(tensors(data.x_test, mean, std))
    accuracy = float(((out[0] if features else out).argmax(1).numpy() == data.y_test).mean())
    return net, accuracy


def export(net, channels: int, path: Path, opset: int | None, outputs=("logits",), dynamo: bool = False) -> None:
    example = torch.zeros(1, channels, 28, 28)
    axes = {name: {0: "batch"} for name in ("input", *outputs)}
    if dynamo:
        program = torch.onnx.export(net, (example,), dynamo=True, input_names=["input"], output_names=list(outputs),
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        program.save(str(path), external_data=True)
    else:
        torch.onnx.export(net, example, str(path), opset_version=opset, dynamo=False, input_names=["input"],
                          output_names=list(outputs), dynamic_axes=axes)


def save_pt2(net, channels: int, path: Path) -> None:
    """torch.export.save of the module exported at batch 1 (NCHW), as PyTorch 2 documents it."""
    torch.export.save(torch.export.export(net, (torch.zeros(1, channels, 28, 28),)), str(path))


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    pt2_only = "--pt2-only" in sys.argv[1:]
    gray, gray_accuracy = train(1, (127.5,), (127.5,))
    rgb, rgb_accuracy = train(3, IMAGENET_MEAN, IMAGENET_STD)
    torch.manual_seed(0)
    deep, deep_accuracy = train(1, (127.5,), (127.5,), net=CNN3())
    save_pt2(gray, 1, OUT / "cnn.pt2")
    save_pt2(rgb, 3, OUT / "rgb_imagenet.pt2")
    save_pt2(deep, 1, OUT / "cnn3.pt2")
    record = json.loads((OUT / "versions.json").read_text()) if pt2_only else {
        "torch": torch.__version__, "seed": 0, "dataset": "digits", "models": {}}
    programs = (("cnn.pt2", gray_accuracy, ((127.5,), (127.5,))),
                ("rgb_imagenet.pt2", rgb_accuracy, (IMAGENET_MEAN, IMAGENET_STD)),
                ("cnn3.pt2", deep_accuracy, ((127.5,), (127.5,))))
    record["programs"] = {name: {"mean": list(stats[0]), "std": list(stats[1]), "layout": "nchw",
                                 "test_accuracy": accuracy, "exporter": "torch.export.save"}
                          for name, accuracy, stats in programs}
    if pt2_only:
        (OUT / "versions.json").write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["programs"], indent=2))
        return 0
    for old in OUT.glob("*.onnx*"):
        old.unlink()
    for name, opset, dynamo in (("cnn_opset11", 11, False), ("cnn_opset17", 17, False), ("cnn_dynamo", None, True)):
        export(gray, 1, OUT / f"{name}.onnx", opset, dynamo=dynamo)
        record["models"][name] = {"mean": [127.5], "std": [127.5], "layout": "nchw", "test_accuracy": gray_accuracy,
                                  "exporter": "dynamo" if dynamo else "legacy (dynamo=False)", "opset": opset}
    export(rgb, 3, OUT / "rgb_imagenet.onnx", 13)
    record["models"]["rgb_imagenet"] = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "layout": "nchw",
                                        "test_accuracy": rgb_accuracy, "exporter": "legacy (dynamo=False)",
                                        "opset": 13}
    two, two_accuracy = train(1, (127.5,), (127.5,), features=True)
    export(two, 1, OUT / "two_outputs.onnx", 17, outputs=("logits", "features"))
    record["models"]["two_outputs"] = {"mean": [127.5], "std": [127.5], "layout": "nchw", "outputs": 2,
                                       "test_accuracy": two_accuracy, "exporter": "legacy (dynamo=False)",
                                       "opset": 17}
    (OUT / "versions.json").write_text(json.dumps(record, indent=2) + "\n")
    for path in sorted(OUT.iterdir()):
        print(f"{path.name:<24} {path.stat().st_size:>8,} bytes")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
