"""Sequential erasure: a run that continues an earlier one (`--weights PREVIOUS_RUN`).

A takedown request comes after another. The new run starts from the previous run's weights, and refers to the
*original* base model wherever the method reads "the original model" (the negative-guidance target, the
preservation loss): drift cannot build up from one request to the next. The earlier concepts stay on the forget
side, as constraints to keep erased, and the earlier anchors on the retain side: the run erases the whole chain's
concepts, the new ones from the base model's weights, the old ones from where the previous run left them.

What a chained run writes is an ordinary delta against the base model: every tensor the chain has changed (the
previous run's that this run does not train keep their values), with `chain` in its metadata, the requests in
order. `apply`, the exports and the model card read it as any delta.

A chain of LoRA runs (`--train lora` after a LoRA run; what a FLUX.1 or SD3 user trains) keeps the base weights
untouched: the previous run's adapters join the denoiser as a frozen adapter of their own (`PREVIOUS_ADAPTER`),
active beside the one this run trains, and switching every adapter off gives the base model, the original. The run
writes one LoRA of the summed rank that holds both (`export.delta.join_lora`: the adapters side by side, each
one's scale folded into its up-projection), exactly the sum of the two; a third request adds a third.

The forget side draws the chain's concepts evenly by default: in the eighth request the new concept gets one draw
in eight. `--newest-share` gives the new request's concepts a fixed share however long the chain
(`draw_repeats`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from fractions import Fraction
from pathlib import Path

import torch

from concept_erase.config import keeps_anchors, missing_anchors
from concept_erase.errors import UserError
from concept_erase.export.delta import check_base, delta_family, delta_file, read_delta


@dataclasses.dataclass
class Previous:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def concepts(self) -> list[str]:
        return json.loads(self.meta["concepts"])

    @property
    def anchors(self) -> list[str]:
        return json.loads(self.meta.get("anchors", "[]"))

    @property
    def settings(self) -> dict:
        return json.loads(self.meta.get("settings", "{}"))

    def chain(self) -> list[dict]:
        """The requests that made the previous delta, in order."""
        if self.meta.get("chain"):
            return json.loads(self.meta["chain"])
        return [request(self.settings, self.concepts, self.meta)]


def draw_repeats(concepts: int, earlier: int, newest_share: float) -> list[int]:
    """How often each concept of a chained run is drawn in every round of the forget side's draws, in the
    run's concept order (the chain's `earlier` concepts first, then the request's own): with `newest_share` s the
    request's concepts take s of the draws between them and the earlier ones 1 - s, each side spread evenly; with
    0 (or no earlier concept) every concept once. The share is read to the nearest 1/64."""
    s, new = Fraction(newest_share).limit_denominator(64), concepts - earlier
    if s == 0 or earlier <= 0 or new <= 0:
        return [1] * concepts
    # each earlier concept's draws against each new one's: (1 - s) / earlier to s / new, in whole numbers
    old_n, new_n = (s.denominator - s.numerator) * new, s.numerator * earlier
    common = math.gcd(old_n, new_n)
    return [old_n // common] * earlier + [new_n // common] * new


def request(settings: dict, concepts: list[str], meta: dict | None = None) -> dict:
    """One request of a chain, as the delta and the model card say it."""
    meta = meta or {}
    return {"concepts": list(concepts), "anchors": list(settings.get("anchors", [])),
            "method": settings.get("method"), "train": meta.get("train", settings.get("train")),
            "steps": int(meta["steps"]) if meta.get("steps", "").isdigit() else settings.get("steps")}


def read_previous(config) -> Previous | None:
    """The run `--weights` names, checked: weights (not LoRA) on both sides, no concept erased twice."""
    if not config.weights:
        return None

    path = Path(config.weights)
    tensors, meta = read_delta(path)
    previous = Previous(delta_file(path), tensors, meta)
    if meta.get("kind") == "lora" and config.train != "lora":
        raise UserError(f"--weights {config.weights} holds LoRA adapters; give --train lora to add this request's "
                        f"beside them, or erase that request again with --train {config.train} and continue from it")
    if meta.get("kind") != "lora" and config.train == "lora":
        raise UserError(f"--train lora cannot continue --weights {config.weights}: it changed the weights themselves; "
                        f"give --train {meta.get('train') or 'xattn'} (or another weight subset), or start the chain "
                        "with a LoRA run")
    if meta.get("edit"):
        raise UserError(f"--weights {config.weights} is a closed-form edit ({meta.get('method')}); continue from a "
                        "trained erasure, or run the edit last")
    done = {c.strip().lower(): c for r in previous.chain() for c in r["concepts"]}
    again = [c for c in config.concepts if c.strip().lower() in done]
    if again:
        raise UserError(f"{again[0]!r} is already erased by {previous.path} (its chain holds "
                        f"{', '.join(repr(c) for c in done.values())}); give only new concepts")
    return previous


def chained_config(config, previous: Previous):
    """The settings the run trains with: the chain's concepts (the earlier ones first, kept erased) and anchors,
    each concept's --relative-to / --remap-to where the requests gave them one per concept."""
    if previous is None:
        return config
    old, new = previous.concepts, list(config.concepts)
    concepts = old + new
    anchors, seen = [], {c.strip().lower() for c in concepts}  # each anchor once, the chain's first; none erased
    for anchor in [*previous.anchors, *config.anchors]:
        if anchor.strip().lower() not in seen:
            anchors.append(anchor)
            seen.add(anchor.strip().lower())

    def per_concept(old_values: list, new_values: list) -> list:
        if not old_values and not new_values:
            return []
        spread = lambda values, n: (values * n if len(values) == 1 else values) or [""] * n  # noqa: E731
        return spread(old_values, len(old)) + spread(new_values, len(new))

    if not anchors and not config.retain_images and keeps_anchors(config.method):
        raise UserError(missing_anchors(config.method, f", and the chain of {previous.path} has none"))
    prior = previous.settings
    return dataclasses.replace(
        config, concepts=concepts, anchors=anchors,
        relative_to=per_concept(list(prior.get("relative_to", [])), list(config.relative_to)),
        remap_to=per_concept(list(prior.get("remap_to", [])), list(config.remap_to)))


def check_family_and_base(previous: Previous, family, denoiser) -> None:
    """The previous run was made from this very base model (and family)."""
    made_for = delta_family(previous.meta).name
    if made_for != family.name:
        raise UserError(f"--weights {previous.path} was made for the {made_for} family and --model is a {family.name} "
                        "model; continue a chain on the model it started from")
    check_base(denoiser, previous.tensors, previous.meta, allow_other_base=False)


PREVIOUS_ADAPTER = "chain"  # the previous requests' adapters in a LoRA chain, frozen beside the trained "default"


def is_lora(previous: Previous | None) -> bool:
    return previous is not None and previous.meta.get("kind") == "lora"


def previous_lora(previous: Previous | None) -> tuple[dict, dict] | None:
    """A LoRA chain's previous adapters and their `lora` metadata (rank, alpha, targets), for the delta to join."""
    return (previous.tensors, json.loads(previous.meta["lora"])) if is_lora(previous) else None


def add_previous_adapter(denoiser, previous: Previous | None) -> None:
    """A LoRA chain: the previous run's adapters as a frozen adapter beside the trained one, both active. Called
    once the trained adapter exists (`select_trainable`), so that it is not among the trained tensors."""
    if not is_lora(previous):
        return
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    lora = json.loads(previous.meta["lora"])
    with warnings.catch_warnings():  # peft warns of a second adapter: here that is the point
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        denoiser.add_adapter(LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]),
                                        target_modules=lora["targets"]), adapter_name=PREVIOUS_ADAPTER)
    expected = get_peft_model_state_dict(denoiser, adapter_name=PREVIOUS_ADAPTER)
    if set(expected) != set(previous.tensors):
        raise UserError(f"--weights {previous.path}: its LoRA adapters sit on other modules than this run's "
                        "--train lora; it was made for another architecture")
    set_peft_model_state_dict(denoiser, previous.tensors, adapter_name=PREVIOUS_ADAPTER)
    denoiser.set_adapters([PREVIOUS_ADAPTER, "default"])
    for name, p in denoiser.named_parameters():  # peft marks every active adapter trainable
        if f".{PREVIOUS_ADAPTER}." in name:
            p.requires_grad_(False)


def touched(denoiser, trained: dict, previous: Previous | None) -> dict:
    """{name: parameter} of every tensor the chain changes: the trained ones and the previous run's others. Read
    before `put_in`, they are the base model's values (the original model's copy, the fingerprint); read after the
    run, what its delta holds (the previous run's others keep its values: this run did not train them). A LoRA
    chain changes no weight: the previous adapters are joined to the trained ones when the delta is written."""
    if previous is None or is_lora(previous):
        return trained
    params = dict(denoiser.named_parameters())
    return {**{n: params[n] for n in previous.tensors if n not in trained}, **trained}


@torch.no_grad()
def put_in(denoiser, previous: Previous | None) -> None:
    """The previous run's weights, in place of the base model's (a LoRA chain's are an adapter of their own)."""
    if previous is None or is_lora(previous):
        return
    params = dict(denoiser.named_parameters())
    for name, value in previous.tensors.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))

