"""Settings of on-chip training, one table per scheme, so a scenario file can fill them later."""

from __future__ import annotations

from dataclasses import dataclass

from neurosim.config import ConfigError, setting

SCHEMES = ("bp", "dgc", "hybrid", "two_stage")


@dataclass(frozen=True)
class BPConfig:
    backward: str = setting("transposed_read", "error path: 'transposed_read' (through the chip's crossbars and "
                            "derivative circuits), 'digital_model' (a digital processor uses the weights the "
                            "controller believes it programmed, and the derivative circuits), or "
                            "'true_gradient' (not a chip: autograd through the chip's noise-free non-ideal "
                            "forward, gain and offset mismatch included: the reference studies compare against)",
                            choices=("transposed_read", "digital_model", "true_gradient"))


@dataclass(frozen=True)
class DGCConfig:
    mode: str = setting("exact", "'exact': every perturbation measured (batched, equal in distribution to the "
                        "chip's sequence); 'linearized': autograd through the non-ideal model plus a model of the "
                        "measurement noise (an approximation with a validity envelope, docs/training.md)",
                        choices=("exact", "linearized"))
    difference: str = setting("forward", "'forward' (C(w+Δ) − C(w))/Δ or 'central' (C(w+Δ) − C(w−Δ))/2Δ: two "
                              "perturbation cycles per weight", choices=("forward", "central"))
    perturbation: str = setting("temporary", "how the chip perturbs a weight: 'temporary' (a small temporal "
                                "change of the cell's read, e.g. its bias, leaving the stored state untouched; "
                                "Kim et al. 2021), 'pulse' (programming pulses through the device model, "
                                "restored by the opposite pulses: restore errors accumulate), 'pulse_verify' "
                                "(programming pulses, restored by write-and-verify to the value read before)",
                                choices=("temporary", "pulse", "pulse_verify"))
    perturbation_pulses: int = setting(1, "pulse modes: pulses per device of the pair per perturbation; "
                                       "temporary: the change is this many nominal pulse steps unless "
                                       "perturbation_dw is set", ge=1)
    perturbation_dw: float | None = setting(None, "temporary: size of the change in weight units (none: "
                                            "perturbation_pulses nominal pulse steps)", gt=0.0)
    temporary_dtod: float = setting(0.0, "temporary: device-to-device spread of the change (sigma of its log, "
                                    "sampled once per cell; the controller divides by the nominal size)", ge=0.0)
    verify_tolerance: float = setting(0.01, "pulse_verify: restore tolerance, fraction of w_max on the pair",
                                      gt=0.0)
    verify_iterations: int = setting(20, "pulse_verify: most read-and-pulse iterations of one restore", ge=1)
    lower_reads: str = setting("fresh", "'fresh': every measurement re-reads the layers below the perturbed "
                               "one with fresh noise, as the chip does; 'shared': one read of them per step for "
                               "all measurements (cheaper; an approximation whose error docs/training.md gives)",
                               choices=("fresh", "shared"))
    precision: str = setting("float64", "arithmetic of the measurements: 'float64' carries cost differences "
                             "of any perturbation size; 'float32' is faster and loses small differences "
                             "(measured error in docs/training.md)", choices=("float64", "float32"))
    chunk: int = setting(0, "perturbations evaluated per batch of work (0: automatic, bounded memory)", ge=0)
    noise_samples: int = setting(8, "linearized: noisy cost measurements used to estimate the measurement noise",
                                 ge=2)

    def validate(self) -> None:
        if self.perturbation_dw is not None and self.perturbation != "temporary":
            raise ConfigError("perturbation_dw", self.perturbation_dw,
                              f"sets the size of a temporary change; perturbation '{self.perturbation}' moves "
                              "by whole pulses (use perturbation_pulses)")
        if self.temporary_dtod and self.perturbation != "temporary":
            raise ConfigError("temporary_dtod", self.temporary_dtod,
                              f"applies to perturbation 'temporary', not '{self.perturbation}'")


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
    terms: int = setting(4, "Taylor terms of the stage-2 activations", ge=1, le=32)
    train_weights: bool = setting(False, "stage 2 also trains the weights")
    coefficient_lr: float = setting(1.0, "learning rate of the Taylor coefficients in the circuit's units (a_k = "
                                    "c_k s^k on the input scaled to [-1, 1]; gradient averaged over the neurons "
                                    "sharing it, divided by the terms): a step moves a neuron's output by at most "
                                    "lr times the mean error; at most 10, inside the measured stable envelope",
                                    gt=0.0)
    stage1_scheme: str = setting("bp", "scheme of the weights in both stages", choices=("bp", "dgc"))
    coefficient_gradient: str = setting("auto", "how the chip gets the coefficient gradients: 'bp' (errors "
                                        "through derivative circuits), 'perturbation' (set a coefficient, "
                                        "measure the cost, set it back; no derivative circuits), 'auto' (bp "
                                        "with BP weights, perturbation with DGC weights)",
                                        choices=("auto", "bp", "perturbation"))
    coefficient_perturbation: float = setting(0.05, "perturbation: size of a coefficient perturbation in the "
                                              "circuit's units (the most it changes a neuron's output)", gt=0.0)

    def validate(self) -> None:
        if self.coefficient_lr > 10.0:
            raise ConfigError("coefficient_lr", self.coefficient_lr, "must be <= 10, inside the measured stable "
                              "envelope: on the digits MLP every run learned up to 30 and runs diverged at 100 "
                              "(docs/training.md, two-stage training)")


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
