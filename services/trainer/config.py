"""Every knob of one training run (step 6 of SSB), declared once and documented where it is declared.

Defaults follow the paper: LoRA rank 32, alpha 32, dropout 0 on the q/k/v/o and gate/up/down projections; lr 2e-4,
batch 4, 3 epochs, temperature 2, KD weight 1, CE weight 0, and the exact teacher (`teacher="auto"` resolves to the
online teacher at any T other than 1). `ssb train`'s flags are generated from these fields (`cli/train_command.py`),
and the run writes them, resolved, to `training_config.json` beside the adapter.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Knobs that may change between an interrupted run and its resumption without changing what is computed.
RESUMABLE_CHANGES = frozenset({"checkpoint_every", "keep_checkpoints", "log_every"})


class TrainingError(RuntimeError):
    """The run cannot start or resume as asked (occupied output directory, no checkpoint, changed settings, a model
    whose logits the trainer cannot reproduce), or cannot go on (a gradient that is not finite)."""


def resolve_teacher(teacher: str, temperature: float) -> Literal["stored", "online"]:
    """`auto` is the exact online teacher at any T other than 1 and the stored top-k at T = 1.

    Measured (docs/BENCHMARKS.md, top-20 against the exact teacher on real pairs): at T = 1 the stored top-k's
    gradient has cosine 0.995 with the exact one and needs no teacher forward pass; at T = 2 the cosine is 0.58
    (tempering spreads half the teacher's mass over the tail, which one bucket cannot represent), while the online
    teacher costs 1.30x the step time. So the exact loss wherever top-k is not close to it.
    """
    if teacher != "auto":
        return teacher  # type: ignore[return-value]
    return "stored" if temperature == 1.0 else "online"


class TrainConfig(BaseModel):
    """One LoRA distillation run: the student matches the hinted teacher on the explanation tokens."""

    # Python's JSON reads `Infinity` and `NaN`: a learning rate of infinity would train to NaN.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # LoRA
    rank: int = Field(default=32, ge=1, description="LoRA rank r (paper: 32).")
    alpha: float = Field(
        default=32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank (paper: 32)."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input (paper: 0).")
    target_modules: tuple[str, ...] = Field(
        default=LORA_TARGET_MODULES,
        min_length=1,
        description="Module names that get a LoRA adapter (paper: attention q/k/v/o and MLP gate/up/down).",
    )

    # Optimisation
    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate of AdamW (paper: 2e-4).")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay on the LoRA weights.")
    batch_size: int = Field(
        default=4, ge=1, description="Pairs per micro-batch on each process (paper: 4, on one GPU, no accumulation)."
    )
    grad_accum: int = Field(
        default=1,
        ge=1,
        description="Micro-batches per optimizer step; the effective batch is batch_size x grad_accum x processes.",
    )
    epochs: int = Field(default=3, ge=1, description="Passes over the pairs (paper: 3).")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps, even mid-epoch; the schedule spans them."
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate decay after warm-up (to 0 for cosine and linear)."
    )
    warmup_ratio: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description=(
            "Fraction of the steps (rounded up) spent warming up linearly to the peak; with W warm-up steps, step s "
            "(1-based) of the warm-up uses s / (W + 1) of the peak, so no step runs at a learning rate of 0."
        ),
    )
    max_grad_norm: float | None = Field(
        default=1.0,
        gt=0,
        description=(
            "Clip the global gradient norm to this; null in the trainer API's JSON disables clipping (the norm is "
            "still logged)."
        ),
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,  # what NumPy's seeding takes
        description="Seeds the LoRA initialisation, the data order of every epoch and the dropout masks.",
    )

    # Loss
    temperature: float = Field(
        default=2.0, gt=0, description="Distillation temperature T; the KL is scaled by T^2 (paper: 2)."
    )
    kd_weight: float = Field(
        default=1.0, ge=0.0, description="Weight of KL(teacher || student) in the loss (paper: 1)."
    )
    ce_weight: float = Field(
        default=0.0, ge=0.0, description="Weight of the cross-entropy of the explanation tokens in the loss (paper: 0)."
    )
    log_ce: bool = Field(
        default=True,
        description=(
            "Log the cross-entropy even when ce_weight is 0 "
            "(one extra no-gradient pass over the output layer per step)."
        ),
    )
    teacher: Literal["auto", "stored", "online"] = Field(
        default="auto",
        description=(
            "`online`: the same base model with the adapter disabled, on the stored hinted prompt plus the "
            "explanation: the exact full-vocabulary loss, for one more forward pass per step (1.30x the step time, "
            "measured). `stored`: the top-k log-probabilities saved with each pair plus a tail bucket: no teacher "
            "pass; close to exact at T = 1 (gradient cosine 0.995), far from it at T = 2 (0.58). `auto` (default): "
            "online unless T = 1, stored at T = 1; a config always holds the resolved choice."
        ),
    )
    chunk_size: int = Field(
        default=256,
        ge=1,
        description="Positions per chunk of the output layer in the loss; bounds the memory of the logits.",
    )

    # Runtime
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="Base model weights' dtype; `auto` is bfloat16 on a GPU and float32 on the CPU."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute the decoder's activations in backward: less memory, more compute."
    )
    checkpoint_every: int | None = Field(
        default=None, ge=1, description="Save a resumable checkpoint every this many optimizer steps; None saves none."
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="How many of the newest checkpoints to keep on disk.")
    log_every: int = Field(
        default=1, ge=1, description="Write a metrics line (and call on_step) every this many steps."
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto_teacher(cls, data: Any) -> Any:
        """Resolve `teacher="auto"` at construction, so training_config.json and checkpoints record the teacher used.

        (`model_copy(update=...)` skips validation: build a new TrainConfig to change the temperature.)
        """
        if isinstance(data, dict) and data.get("teacher", "auto") == "auto":
            try:
                temperature = float(data.get("temperature", cls.model_fields["temperature"].default))
            except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
                return data  # the temperature's own validation reports it
            data = {**data, "teacher": resolve_teacher("auto", temperature)}
        return data

    @model_validator(mode="after")
    def _something_to_learn(self) -> TrainConfig:
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: the loss would be 0 and nothing would be learned")
        return self
