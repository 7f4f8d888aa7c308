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


def assert_only_adapter_trained(before: dict, state: dict, targets: set[str]) -> None:
    """After a LoRA run: adapters sit exactly on `targets` (module names), every base weight (now under
    `base_layer`) is untouched, and the adapter did train."""
    lora = {n for n in state if "lora_" in n}
    assert lora and {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == targets
    for n, t in before.items():
        key = n if n in state else n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], t), n
    assert any(state[n].abs().max() > 0 for n in lora if "lora_B" in n)


def assert_original_is_the_frozen_copy(trainer, frozen, timesteps) -> None:
    """Two training steps, then the context's original-model prediction equals a frozen copy's bit for bit
    (and the trained model's differs: training did move it)."""
    trainer._setup()
    for step in range(2):
        trainer._step(step)
    ctx = trainer.ctx
    cond = ctx.embed(["van gogh", "a painting"])
    x = torch.randn((2, *ctx.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ctx.family.predict(frozen, x, timesteps, cond)
        assert torch.equal(ctx.original(x, timesteps, cond), expected)
        assert not torch.equal(ctx.current(x, timesteps, cond), expected)
