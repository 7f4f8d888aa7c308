"""The digits judge: a small CNN that names the digit and the style of a 32x32 image.

Trained on the real renderings (train split) and shipped beside the embedded model. Its
penultimate features (128-d) give a *domain* FID between generated and real digits; that is not
the standard Inception FID, and every report says so.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2))


class DigitsJudge(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, num_digits: int = 10, num_styles: int = 5, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.features = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width),
                                      nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.SiLU())
        self.digit_head = nn.Linear(feature_dim, num_digits)
        self.style_head = nn.Linear(feature_dim, num_styles)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [0, 1], [N, 3, 32, 32] -> [N, feature_dim]."""
        return self.features(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.embed(images)
        return self.digit_head(f), self.style_head(f)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        digits, styles = [], []
        for i in range(0, len(images), batch_size):
            d, s = self(images[i : i + batch_size].to(self.device, self.dtype))
            digits.append(d.argmax(1).cpu())
            styles.append(s.argmax(1).cpu())
        return torch.cat(digits), torch.cat(styles)
