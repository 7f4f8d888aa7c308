"""What the machine can run, and what a run will cost on it: checked and said before the work starts.

A person who starts a 1,000-step erasure on the wrong device, in a precision the device cannot do,
or with an optimizer whose library is missing, hears it in one line before any model is loaded
where that is possible; and hears a rough cost from the first UNet call, not after the first hour.
"""

from __future__ import annotations

import contextlib

import torch

from concept_erase.errors import UserError

# A UNet this large is a real model (SD 1.5's has 860M parameters; the embedded digits model 2M).
REAL_SIZE_PARAMETERS = 200_000_000


def check_device(config, device: torch.device) -> None:
    """Refuse a precision or optimizer the device cannot run, with what to do instead."""
    if config.mixed_precision == "fp16":
        if device.type != "cuda":
            raise UserError(f"--mixed-precision fp16 needs a CUDA GPU: fp16 gradients underflow without "
                            f"Accelerate's gradient scaler, which runs on CUDA only; on this {device.type} "
                            "use --mixed-precision bf16 or no")
    if config.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--mixed-precision bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bf16; "
                        "use --mixed-precision fp16 or no")
    if config.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise UserError(f"--optimizer adamw8bit runs on CUDA GPUs only (bitsandbytes); on this {device.type} "
                            "use --optimizer adamw")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes "
                            "(or use --optimizer adamw)") from None


def make_optimizer(config, params: list) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_device(device: torch.device, precision: str, unet: torch.nn.Module, load_seconds: float, *,
                    trains: bool = True) -> str:
    """One line: where the run goes, in what precision, how big the model is; a warning for training on a CPU."""
    n = parameter_count(unet)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        where = f"{device.type} ({torch.get_num_threads()} threads)"
    size = f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2g}M"
    line = (f"device: {where}; precision {precision}; {type(unet).__name__} {size} parameters; "
            f"model loaded in {load_seconds:.1f} s")
    if trains and device.type == "cpu" and n >= REAL_SIZE_PARAMETERS:
        line += ("\nwarning: a real-size model on a CPU: each step and each anchor prompt can take minutes to "
                 "hours. Use a GPU, or --resolution 128 --steps 2 for a quick check.")
    return line


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_step_seconds(per_sample: float, config) -> float:
    """A rough step time from the seconds one UNet forward takes per sample.

    Counted in forward-sample units: a fresh trajectory of `sampling_steps` (on average half of
    it is sampled, two rows each for guidance), the original model's two predictions, the trained
    forward and its backward (about twice a forward) on the forget and retain rows, and the
    retain probe.
    """
    b, r, k = config.batch_size, config.retain_batch_size, config.gradient_accumulation_steps
    trajectories = b / config.trajectory_timesteps if config.trajectory_refresh <= 1 else b / config.trajectory_refresh
    sampling = trajectories * config.sampling_steps * (1 if config.trajectory_refresh > 1 else 0.5) * 2
    units = sampling + 2 * b + 3 * (b + r) + 2 * r
    if config.method == "ungrad":
        units += 3 * r
    return per_sample * units * k


@contextlib.contextmanager
def no_cudnn_attention():
    """Training runs with cuDNN's attention kernel switched off (flash and memory-efficient attention remain).
    Its backward returns NaN gradients on H100/H200 for some inputs (pytorch/pytorch#196678, a regression
    of torch 2.11): on an H200 with torch 2.11 the tiny FLUX model's first step had a NaN gradient, and the
    12B FLUX LoRA recipe's backward stopped with an illegal memory access; both ran with it off. The
    setting is the process's, so it is put back afterwards."""
    cuda = getattr(torch.backends, "cuda", None)
    if cuda is None or not hasattr(cuda, "enable_cudnn_sdp") or not torch.cuda.is_available():
        yield
        return
    before = cuda.cudnn_sdp_enabled()
    cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        cuda.enable_cudnn_sdp(before)


def grad_scale(accelerator) -> float:
    """The factor the loss was multiplied by before backward (fp16's gradient scaler), else 1."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())
