"""Where tensors live and where randomness comes from: one setting for the device, one seed for everything.

Every stochastic part of neurosim draws from a ``torch.Generator`` made here, so the same seed gives the same
numbers (bit for bit on CPU), and a run moves between CPU and CUDA by one setting (``device = "auto"``).
"""

from __future__ import annotations

import hashlib

import torch

from neurosim.config import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA where present, else CPU; 'cuda' without a GPU is a user error, not a crash."""
    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this machine (use 'cpu' or 'auto')")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError("device", name, "must be 'auto', 'cpu' or 'cuda[:N]'") from None


def derive_seed(seed: int, *names: object) -> int:
    """A seed for one named part (a layer, a device array): independent streams that do not shift when
    another part draws more numbers."""
    text = ":".join([str(seed), *map(str, names)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, device: torch.device | str = "cpu", *names: object) -> torch.Generator:
    """A generator on ``device`` seeded from ``seed`` and the part's names."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(derive_seed(seed, *names) if names else seed)
    return g
