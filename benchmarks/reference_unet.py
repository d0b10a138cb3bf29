"""A plain PyTorch UNet with kunet.UNet's exact topology, the speed reference for benchmarks.

Same layers as ``kunet.UNet(filters, batch_norm=True, upsampling="transpose")``: per stage
Conv3x3(no bias)-BN-ReLU x2, 2x2 max-pool; bottleneck with 2x the last filters; ConvTranspose 2x2
stride 2, concatenation, DoubleConv; 1x1 head. channels_last memory format, eager mode, as a PyTorch
user would write it (Pytorch-UNet style). Parameter counts match kunet's (checked by the benchmark).

Run as a worker (``python reference_unet.py --worker``) it reads JSON commands on stdin and answers
on stdout, so the benchmark can alternate kunet and reference rounds in one invocation while each
framework stays in its own process.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    def __init__(self, in_channels=3, num_classes=1, filters=(16, 32, 64, 128)):
        super().__init__()
        self.down = nn.ModuleList()
        c = in_channels
        for f in filters:
            self.down.append(DoubleConv(c, f))
            c = f
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(c, 2 * c)
        c = 2 * c
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        for f in reversed(filters):
            self.up.append(nn.ConvTranspose2d(c, f, 2, stride=2))
            self.dec.append(DoubleConv(2 * f, f))
            c = f
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = dec(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Runner:
    def __init__(self, filters, size, batch, channels=3, seed=0):
        torch.manual_seed(seed)
        self.model = UNet(channels, 1, filters).to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss = nn.BCEWithLogitsLoss()
        self.x = torch.rand(batch, channels, size, size).to(memory_format=torch.channels_last)
        self.y = (torch.rand(batch, 1, size, size) > 0.5).float()
        self.batch = batch

    def params(self):
        return sum(p.numel() for p in self.model.parameters())

    def train(self, steps):
        self.model.train()
        start = time.perf_counter()
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss(self.model(self.x), self.y)
            loss.backward()
            self.opt.step()
        loss.item()
        return steps * self.batch / (time.perf_counter() - start)

    @torch.no_grad()
    def infer(self, steps):
        self.model.eval()
        start = time.perf_counter()
        for _ in range(steps):
            out = self.model(self.x)
        out.sum().item()
        return steps * self.batch / (time.perf_counter() - start)


def worker():
    runner = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "init":
            runner = Runner(tuple(cmd["filters"]), cmd["size"], cmd["batch"], cmd["channels"])
            reply = {"params": runner.params(), "threads": torch.get_num_threads()}
        elif cmd["op"] == "train":
            reply = {"img_s": runner.train(cmd["steps"])}
        elif cmd["op"] == "infer":
            reply = {"img_s": runner.infer(cmd["steps"])}
        else:
            break
        reply["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        r = Runner((16, 32, 64, 128), 128, 8)
        r.train(2)
        print(f"params {r.params()}, train {r.train(5):.1f} img/s, infer {r.infer(5):.1f} img/s")
