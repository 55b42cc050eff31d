"""The training schemes that only decide which layers get BP and which get DGC gradients (``layer_schemes``);
everything else is the one ``Trainer``. Two-stage training, a procedure of its own, is in ``two_stage.py``."""

from __future__ import annotations

from neurosim.config import ConfigError
from neurosim.training.base import Trainer


class BPTrainer(Trainer):
    """Every layer trained by hardware BP."""

    scheme = "bp"

    def layer_schemes(self, epoch: int) -> dict[str, str]:
        return {layer.name: "bp" for layer in self.network.analog_layers}


class DGCTrainer(Trainer):
    """Every layer trained by direct gradient calculation."""

    scheme = "dgc"

    def layer_schemes(self, epoch: int) -> dict[str, str]:
        return {layer.name: "dgc" for layer in self.network.analog_layers}


class HybridTrainer(Trainer):
    """Hybrid DGC + BP: a scheme for each layer (default: DGC for convolutions, BP for fully connected layers,
    as in Kim et al. 2021), and a split in time (BP for every layer in the first K epochs, then the
    per-layer schemes)."""

    scheme = "hybrid"

    def per_layer(self) -> dict[str, str]:
        layers = self.network.analog_layers
        chosen = self.config.hybrid.layer_schemes
        if chosen:
            if len(chosen) != len(layers):
                raise ConfigError("trainer.hybrid.layer_schemes", list(chosen),
                                  f"needs one entry per analog layer ({len(layers)}: "
                                  f"{', '.join(layer.name for layer in layers)})")
            return {layer.name: s for layer, s in zip(layers, chosen, strict=True)}
        schemes = {layer.name: "dgc" if layer.kind == "conv" else "bp" for layer in layers}
        if "dgc" not in schemes.values() and len(layers) > 1:
            schemes[layers[0].name] = "dgc"  # an MLP: DGC on the first layer, BP above it
        return schemes

    def layer_schemes(self, epoch: int) -> dict[str, str]:
        if epoch <= self.config.hybrid.bp_epochs:
            return {layer.name: "bp" for layer in self.network.analog_layers}
        return self.per_layer()
