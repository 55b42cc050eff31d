"""Settings of on-chip training, one table per scheme, so a scenario file can fill them later."""

from __future__ import annotations

from dataclasses import dataclass

from neurosim.config import ConfigError, setting

SCHEMES = ("bp", "dgc", "hybrid", "two_stage")


@dataclass(frozen=True)
class BPConfig:
    backward: str = setting("transposed_read", "error path: 'transposed_read' (through the chip's crossbars) or "
                            "'digital_model' (a digital processor uses the weights the controller believes it "
                            "programmed); 'exact' is a software reference, not a chip",
                            choices=("transposed_read", "digital_model", "exact"))


@dataclass(frozen=True)
class DGCConfig:
    mode: str = setting("exact", "'exact': every perturbation measured (batched); 'linearized': autograd through "
                        "the non-ideal model plus a model of the measurement noise", choices=("exact", "linearized"))
    difference: str = setting("forward", "'forward' (C(w+Δ) − C(w))/Δ or 'central' (C(w+Δ) − C(w−Δ))/2Δ",
                              choices=("forward", "central"))
    perturbation_pulses: int = setting(1, "size of a perturbation in programming pulses", ge=1)
    perturbation_dw: float | None = setting(None, "exact weight perturbation instead of pulses (an idealized "
                                            "programmer)", gt=0.0)
    chunk: int = setting(0, "perturbations evaluated per batch of work (0: automatic, bounded memory)", ge=0)
    noise_samples: int = setting(8, "linearized: noisy cost measurements used to estimate the measurement noise",
                                 ge=2)


@dataclass(frozen=True)
class HybridConfig:
    layer_schemes: tuple[str, ...] = setting((), "scheme per analog layer in order ('bp' or 'dgc'); empty: "
                                             "DGC for convolutions, BP for fully connected layers")
    bp_epochs: int = setting(0, "time split: BP for every layer in the first K epochs, then the per-layer "
                             "schemes (0: no split)", ge=0)

    def validate(self) -> None:
        for s in self.layer_schemes:
            if s not in ("bp", "dgc"):
                raise ConfigError("layer_schemes", list(self.layer_schemes), "each entry must be 'bp' or 'dgc'")


@dataclass(frozen=True)
class TwoStageConfig:
    stage1_epochs: int = setting(2, "epochs of stage 1 (weights, stage-1 activations)", ge=0)
    stage2_epochs: int = setting(2, "epochs of stage 2 (Taylor activations with trainable coefficients)", ge=0)
    terms: int = setting(4, "Taylor terms of the stage-2 activations", ge=1)
    train_weights: bool = setting(False, "stage 2 also trains the weights")
    coefficient_lr: float = setting(0.01, "learning rate of the Taylor coefficients", gt=0.0)
    stage1_scheme: str = setting("bp", "scheme of the weights in both stages", choices=("bp", "dgc"))


@dataclass(frozen=True)
class TrainerConfig:
    scheme: str = setting("bp", "'bp', 'dgc', 'hybrid' or 'two_stage'", choices=SCHEMES)
    epochs: int = setting(5, "passes over the training set (two_stage: see two_stage.*_epochs)", ge=0)
    batch_size: int = setting(32, "samples per weight update", ge=1)
    learning_rate: float = setting(0.1, "step size of the weight update", gt=0.0)
    momentum: float = setting(0.0, "momentum of the controller's digital gradient accumulator", ge=0.0, lt=1.0)
    cost: str = setting("cross_entropy", "'cross_entropy' (softmax computed digitally) or 'mse' (on one-hot "
                        "targets)", choices=("cross_entropy", "mse"))
    eval_batch_size: int = setting(512, "samples per evaluation read", ge=1)
    clock: bool = setting(True, "run the discrete-event hardware clock (time and energy)")
    bp: BPConfig = setting(default_factory=BPConfig, doc="back-propagation settings")
    dgc: DGCConfig = setting(default_factory=DGCConfig, doc="direct gradient calculation settings")
    hybrid: HybridConfig = setting(default_factory=HybridConfig, doc="hybrid DGC + BP settings")
    two_stage: TwoStageConfig = setting(default_factory=TwoStageConfig, doc="two-stage training settings")
