import json
from pathlib import Path

import torch


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {n for n, t in before.items() if not torch.equal(t, after[n])}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def unet_probe(unet, seed: int = 0, n: int = 2):
    """A fixed input for comparing UNets: (latents, timesteps, embeddings)."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn((n, c.in_channels, c.sample_size, c.sample_size), generator=g)
    t = torch.tensor([100, 700][:n])
    emb = torch.randn((n, 77, c.cross_attention_dim), generator=g)
    return x, t, emb


@torch.no_grad()
def unet_out(unet, probe):
    x, t, emb = probe
    return unet(x.to(unet.device, unet.dtype), t.to(unet.device), encoder_hidden_states=emb.to(unet.device, unet.dtype)).sample
