"""The MLPerf Mobile v4.0 networks measured on the Exynos 2400 NPU, built from their public
definitions as static-shape ONNX (random weights: only the architecture matters for latency).

Measured latencies: MLCommons ``mobile_results_v4.0``, ``closed/Samsung/results/exynos2400/``
(Galaxy S24, ENN 2.2.20, NPU delegate, single-stream p50; INT8 post-training quantized copies of
the reference networks). See ``../shared/PAPER_FIGURES.md`` and PERFORMANCE.md.

    python bench/mlperf_networks.py NAME OUT.onnx      # NAME: mobilenet-edgetpu | mobilebert | edsr
"""

from __future__ import annotations

import sys
from pathlib import Path

# name -> (input description, measured p50 ms, measured mean ms)
MEASURED = {
    "mobilenet-edgetpu": ("1x3x224x224", 0.2262, 0.2256),
    "mobilebert": ("sequence 384", 3.149, 3.150),
    "edsr": ("1x3x540x960", 6.394, 6.642),
}


def _edsr():
    import torch

    class EDSR(torch.nn.Module):
        """EDSR f32b5 x2 as MLPerf Mobile runs it: 32 channels, 5 residual blocks, pixel shuffle."""

        def __init__(self, c=32, blocks=5, scale=2):
            super().__init__()

            def conv(i, o):
                return torch.nn.Conv2d(i, o, 3, padding=1)

            self.head = conv(3, c)
            self.body = torch.nn.ModuleList(
                [torch.nn.Sequential(conv(c, c), torch.nn.ReLU(), conv(c, c)) for _ in range(blocks)])
            self.tail = conv(c, c)
            self.up = conv(c, 3 * scale * scale)
            self.shuffle = torch.nn.PixelShuffle(scale)

        def forward(self, x):
            h = self.head(x)
            y = h
            for block in self.body:
                y = y + block(y)
            return self.shuffle(self.up(self.tail(y) + h))

    return EDSR().eval(), (torch.randn(1, 3, 540, 960),), ["image"]


def _mobilenet_edgetpu():
    import timm
    import torch

    return (timm.create_model("mobilenet_edgetpu_100", pretrained=False).eval(), (torch.randn(1, 3, 224, 224),),
            ["image"])


def _mobilebert():
    import torch
    from transformers import MobileBertConfig, MobileBertForQuestionAnswering

    class QA(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask, token_types):
            o = self.m(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
            return o.start_logits, o.end_logits

    m = QA(MobileBertForQuestionAnswering(MobileBertConfig()).eval())
    args = (torch.randint(0, 30000, (1, 384)), torch.ones(1, 384, dtype=torch.long),
            torch.zeros(1, 384, dtype=torch.long))
    return m, args, ["input_ids", "attention_mask", "token_type_ids"]


BUILDERS = {"mobilenet-edgetpu": _mobilenet_edgetpu, "mobilebert": _mobilebert, "edsr": _edsr}


def build(name: str, out: Path) -> Path:
    """Export network ``name`` to ``out`` (TorchScript exporter, opset 17) unless it exists."""
    import torch

    out = Path(out)
    if out.is_file() and out.stat().st_size > 0:
        return out
    torch.manual_seed(0)
    model, args, names = BUILDERS[name]()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=17, input_names=names)
    tmp.replace(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in BUILDERS:
        sys.exit(f"usage: python bench/mlperf_networks.py {{{'|'.join(BUILDERS)}}} OUT.onnx")
    print(build(sys.argv[1], Path(sys.argv[2])))
