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


class NoisyLatent(nn.Module):
    """NAYER's noisy layer (Tran et al., CVPR 2024) in front of the generator: the latent code of sample i is
        z_i = W_{k_i} · e_{y_i} + b_{k_i},
    e_y ∈ R^nz a fixed class embedding (NAYER encodes the class name with a text encoder; a data-free user has no
    such model for arbitrary classes, so e_y is a seeded N(0, I) draw), (W_k, b_k) a noisy layer re-drawn every
    round (W ~ N(0, 1), b = 0: ``reset``) and trained with the generator within the round; k_i is i's rank among
    the batch's samples of class y_i, so two samples of one class never share a layer. Diversity comes from the
    re-drawn layers, the class from the embedding."""

    def __init__(self, num_classes: int, nz: int, seed: int = 0):
        super().__init__()
        emb = torch.randn(num_classes, nz, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("emb", emb)
        self.weight = nn.Parameter(torch.zeros(0, nz, nz))  # K×nz×nz, drawn by reset() for K layers
        self.bias = nn.Parameter(torch.zeros(0, nz))

    @staticmethod
    def ranks(y: torch.Tensor) -> torch.Tensor:
        """k_i = #{j < i : y_j = y_i}."""
        same = y.view(-1, 1) == y.view(1, -1)
        return torch.tril(same, diagonal=-1).sum(1)

    def reset(self, y: torch.Tensor, g: torch.Generator) -> None:
        """New noisy layers for a batch of targets y: K = the largest class count in y, W ~ N(0, 1) from g."""
        k = int(self.ranks(y.cpu()).max()) + 1
        nz = self.emb.shape[1]
        self.weight = nn.Parameter(torch.randn(k, nz, nz, generator=g).to(self.emb.device))
        self.bias = nn.Parameter(torch.zeros(k, nz, device=self.emb.device))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        k = self.ranks(y)
        return torch.einsum("bij,bj->bi", self.weight[k], self.emb[y]) + self.bias[k]
