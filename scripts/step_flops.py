#!/usr/bin/env python3
"""FLOPs of one Phase 1 training step (forward + backward of compressor and expander), counted
with torch's FlopCounterMode on the PyTorch reference's models (convolutions, transposed
convolutions and matrix products; element-wise work is not counted). Prints one JSON line.

Usage: step_flops.py --models DIR --size S [--width W] [--batch 2] [--device cuda]
DIR/fluxref/ holds the reference's model files (see shared/reference-bench/README.md).
"""
import argparse, json, sys

p = argparse.ArgumentParser()
p.add_argument("--models", required=True)
p.add_argument("--size", type=int, required=True)
p.add_argument("--width", type=int, default=None)
p.add_argument("--batch", type=int, default=2)
p.add_argument("--device", default="cuda")
a = p.parse_args()

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, a.models)
from fluxref.vae import FluxCompressor, FluxExpander  # noqa: E402

dev = torch.device(a.device)
c = FluxCompressor(d_model=128, use_gradient_checkpointing=False).to(dev)
e = FluxExpander(d_model=128, use_gradient_checkpointing=False).to(dev)
H, W, B = a.size, a.width or a.size, a.batch
x = torch.rand(B, 3, H, W, device=dev) * 2 - 1
with FlopCounterMode(display=False) as fc:
    packed, mu, logvar = c(x, training=True)
    out = e(packed)
    loss = F.l1_loss(out, x) + 0.1 * F.mse_loss(out, x)
    loss.backward()
print(json.dumps({"batch": B, "height": H, "width": W, "step_flops": fc.get_total_flops()}))
