"""Generator (Fast-Datafree / DCGAN style):
x = σ(conv(up(conv-BN-LReLU ... (BN(linear(z)).view(ngf·2, s0, s0))))), x ∈ [0,1]^{C×H×W}."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class Generator(nn.Module):
    def __init__(self, nz: int, img_size: int, channels: int, ngf: int = 64):
        super().__init__()
        # enough ×2 upsamplings that the seed map is at most 8×8 (2 for ≤32 px, as Fast's)
        self.n_up = max(2, math.ceil(math.log2(img_size / 8)))
        self.init_size = math.ceil(img_size / 2**self.n_up)
        self.img_size = img_size
        c0 = ngf * 2
        self.l1 = nn.Linear(nz, c0 * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(c0)
        blocks, c = [], c0
        for i in range(self.n_up):
            cout = max(ngf, c0 // 2**i) if i < self.n_up - 1 else ngf
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(c, cout, 3, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]
            c = cout
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(c, channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.bn0(self.l1(z).view(z.shape[0], -1, self.init_size, self.init_size))
        h = self.out(self.blocks(h))
        if h.shape[-1] != self.img_size:
            h = F.interpolate(h, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return torch.sigmoid(h)
