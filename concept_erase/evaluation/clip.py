"""CLIP metrics: a zero-shot classifier (objects and styles) with open_clip, and CLIP score with torchmetrics.

Zero-shot classification is the standard recipe: each class name is put into several prompt
templates, the normalised text embeddings are averaged per class, and an image is assigned the
class with the highest cosine similarity. The erased concept's accuracy should drop; the other
classes' accuracy should not.

CLIP score is torchmetrics' `CLIPScore` (100 x cosine, floored at 0). torchmetrics 1.9 expects
`get_image_features`/`get_text_features` to return tensors; transformers 5 returns an output
object whose `pooler_output` holds the projected features. `_TensorFeatures` unwraps it, so the
same code runs with transformers 4 and 5.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from concept_erase.errors import UserError
from concept_erase.evaluation.samples import as_uint8

TEMPLATES = {
    "object": ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.",
               "a good photo of the {}."],
    "style": ["a painting by {}.", "an artwork in the style of {}.", "a picture in the style of {}.",
              "art by {}.", "a painting in the style of {}."],
}


def zero_shot_predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """Index of the nearest class (cosine) for each image; both inputs [N, D] / [C, D], any scale."""
    image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    class_emb = torch.nn.functional.normalize(class_emb.float(), dim=-1)
    return (image_emb @ class_emb.T).argmax(dim=-1)


def load_open_clip(model_name: str, weights: str = "", pretrained: str = "openai", device: str = "cpu"):
    """(model, preprocess, tokenizer) from a local weights file, or the hub cache for `pretrained`."""
    import open_clip

    if model_name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {model_name!r}; choose one of open_clip.list_models(), e.g. ViT-L-14")
    if weights and not Path(weights).is_file():
        raise UserError(f"--clip-weights {weights}: no such file; give open_clip weights for {model_name} "
                        "(open_clip_pytorch_model.bin or .safetensors)")
    logging.disable(logging.ERROR)  # open_clip logs a failed download before raising it; the error below says it once
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights or pretrained,
                                                                     device=device)
        tokenizer = open_clip.get_tokenizer(model_name)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - open_clip raises many kinds for a missing or foreign file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if weights:
            raise UserError(f"--clip-weights {weights} could not be loaded into {model_name} ({first[:200]}); "
                            "check that the file is open_clip weights for that model") from None
        why = "not in the hub cache, and HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE") == "1" else \
            ("could not be downloaded" if "download" in first.lower() else first[:160])
        raise UserError(f"CLIP weights {model_name}/{pretrained} are not on this machine ({why}); "
                        f"download them where a network exists (open_clip.create_model('{model_name}', "
                        f"pretrained='{pretrained}') fills the hub cache) or pass --clip-weights FILE") from None
    finally:
        logging.disable(logging.NOTSET)
    model.eval()
    return model, preprocess, tokenizer


class ZeroShotClassifier:
    def __init__(self, model, preprocess, tokenizer, classes: list[str], templates: list[str], device: str = "cpu"):
        if len(classes) < 2:
            raise UserError("a zero-shot classifier needs at least two class names; the prompt set has "
                            f"{len(classes)} concept(s)")
        self.model, self.preprocess, self.device = model, preprocess, device
        self.classes = list(classes)
        with torch.no_grad():
            rows = []
            for name in self.classes:
                tokens = tokenizer([t.format(name) for t in templates]).to(device)
                e = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
                rows.append(e)
            self.class_emb = torch.stack(rows)

    @torch.no_grad()
    def embed_images(self, images, batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i:i + batch_size]]).to(self.device)
            out.append(self.model.encode_image(batch).float().cpu())
        return torch.cat(out)

    def predict(self, images) -> list[str]:
        idx = zero_shot_predict(self.embed_images(images), self.class_emb.cpu())
        return [self.classes[i] for i in idx.tolist()]


class _TensorFeatures(torch.nn.Module):
    """A transformers CLIPModel whose feature methods return tensors under transformers 4 and 5."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        if isinstance(out, torch.Tensor):
            return out
        for name in ("pooler_output", "image_embeds", "text_embeds"):
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor):
                return value
        raise TypeError(f"CLIP features of unexpected type {type(out).__name__}")

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.inner.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.inner.get_text_features(*args, **kwargs))


def clip_score_metric(source: str = "openai/clip-vit-large-patch14", device: str = "cpu"):
    """torchmetrics' CLIPScore on a transformers CLIP model from a local folder or the hub cache."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        try:
            model = CLIPModel.from_pretrained(source).eval()
            processor = CLIPProcessor.from_pretrained(source)
        except Exception as err:  # noqa: BLE001
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise UserError(f"CLIP-score model {source!r} could not be loaded ({first}); give a local folder of a "
                            "transformers CLIP model (config.json, weights, tokenizer and preprocessor files) with "
                            "--clip-score-model DIR, or fill the hub cache where a network exists") from None
        return _TensorFeatures(model), processor

    return CLIPScore(model_name_or_path=load, sync_on_compute=False).to(device)


def mean_clip_score(metric, images, prompts: list[str], batch_size: int = 16) -> float:
    """torchmetrics' CLIP score of images (uint8 [N, 3, H, W], or a sequence of PIL images read in
    batches) against their prompts: the mean over the set."""
    metric.reset()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            batch = batch if isinstance(batch, torch.Tensor) else as_uint8(batch)
            metric.update(list(batch), prompts[i:i + batch_size])
        value = float(metric.compute())
    metric.reset()
    return value
