"""Teacher and student on the same ranks, with the same TP/PP, trained as one megatron module.

`DistillationModel(student, teacher)` runs the frozen teacher (eval mode, no grad) and the student
on every micro-batch. Under pipeline parallelism both are pipelined together: stage k holds stage
k of each, and what travels between stages is one tensor per micro-batch,

    [s, b, teacher_hidden + student_hidden + n_pairs]
     = cat(teacher activations, student activations, running intermediate losses),

so the stock 1F1B schedule and its p2p carry both models (the widths may differ, so they are
concatenated along the hidden dimension). The extra channels hold each intermediate pair's loss
computed on an earlier stage; the last stage reads them from the received tensor, so their
gradient travels back through the schedule's ordinary backward p2p to the stage that computed
them. The schedule sizes its p2p buffers from `config.hidden_size` of the module it runs, so the
wrapper's config is a copy of the student's with that hidden size. The tensor has the models' dtype:
in bf16 the carried losses are rounded to 8 significant bits, as the activations are.

On the last stage `forward` returns a `DistillationOutput` (student and teacher logit shards and the
intermediate losses), which `DistillationLoss` turns into the training objective.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from nemo_minitron.distill.losses import LogitLoss, TopKTeacher, cosine_loss, logit_losses
from nemo_minitron.errors import UserError
from nemo_minitron.models.gpt import arch_of, unwrap_model
from nemo_minitron.train.loss import LossResult


@dataclass(frozen=True)
class LayerPair:
    """Outputs of student layer `student` and teacher layer `teacher` (global, 0-based)."""

    student: int
    teacher: int


@dataclass
class DistillationOutput:
    student_logits: torch.Tensor       # [b, s, v/tp]
    teacher_logits: torch.Tensor       # [b, s, v/tp], no grad
    intermediate: torch.Tensor         # [n_pairs] cosine losses (differentiable), or empty


def _stage_of(layer: int, num_layers: int, pp: int) -> int:
    return layer // (num_layers // pp)


def _local_layers(model) -> dict[int, torch.nn.Module]:
    """Global 0-based layer index -> this stage's layer module."""
    return {layer.layer_number - 1: layer for layer in unwrap_model(model).decoder.layers}


class DistillationModel(torch.nn.Module):
    """Frozen teacher + trainable student (+ projections for intermediate pairs of unequal width).

    The student is registered as `module` so that megatron's helpers that look for the language
    model (`pre_process`, the shared embedding in `finalize_model_grads`) find it by unwrapping.
    """

    def __init__(self, student, teacher, pairs: tuple[LayerPair, ...] = (), projection_seed: int = 1234):
        from megatron.core import parallel_state as ps

        super().__init__()
        s_arch, t_arch = arch_of(student), arch_of(teacher)
        if s_arch.vocab_size != t_arch.vocab_size:
            raise UserError(f"student vocab_size {s_arch.vocab_size} != teacher vocab_size {t_arch.vocab_size}")
        s_dtype, t_dtype = next(student.parameters()).dtype, next(teacher.parameters()).dtype
        if s_dtype != t_dtype:
            raise UserError(f"student ({s_dtype}) and teacher ({t_dtype}) must share the parameter dtype")
        self.sequence_parallel = student.config.sequence_parallel
        if teacher.config.sequence_parallel != self.sequence_parallel:
            # what travels between stages and the hidden states paired must be split alike
            raise UserError(f"student (sequence_parallel={self.sequence_parallel}) and teacher "
                            f"(sequence_parallel={teacher.config.sequence_parallel}) must both be built with "
                            f"sequence parallelism or both without")
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.pairs = tuple(pairs)
        for pair in self.pairs:
            _check_pair(pair, s_arch.num_layers, t_arch.num_layers, self.pp)
        self.module = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.widths = (t_arch.hidden_size, s_arch.hidden_size, len(self.pairs))
        self.config = copy.copy(student.config)
        if self.pp > 1:
            self.config.hidden_size = sum(self.widths)
        # Pairs whose layers live on this stage, with a learned projection student -> teacher
        # width when the widths differ (replicated over TP; identically initialised everywhere).
        student_layers, teacher_layers = _local_layers(student), _local_layers(teacher)
        self.local_pairs = [i for i, p in enumerate(self.pairs) if p.student in student_layers]
        self.projections = torch.nn.ModuleDict()
        for i in self.local_pairs:
            if s_arch.hidden_size != t_arch.hidden_size:
                proj = torch.nn.Linear(s_arch.hidden_size, t_arch.hidden_size, bias=False)
                with torch.no_grad():  # seeded per pair: the same weights whichever stage holds it
                    bound = 1.0 / s_arch.hidden_size ** 0.5
                    generator = torch.Generator().manual_seed(projection_seed + i)
                    proj.weight.copy_(torch.empty_like(proj.weight).uniform_(-bound, bound, generator=generator))
                proj.weight.sequence_parallel = self.sequence_parallel  # see _intermediate_losses
                self.projections[str(i)] = proj.to(device=next(student.parameters()).device, dtype=s_dtype)
        self._captured: dict[tuple[str, int], torch.Tensor] = {}
        for i in self.local_pairs:
            pair = self.pairs[i]
            student_layers[pair.student].register_forward_hook(self._capture(("student", i)))
            teacher_layers[pair.teacher].register_forward_hook(self._capture(("teacher", i)))
        self._received_losses: torch.Tensor | None = None

    def _capture(self, key):
        def hook(module, args, output):
            self._captured[key] = output[0] if isinstance(output, tuple) else output

        return hook

    @property
    def student(self):
        return self.module

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no dropout, frozen statistics)
        return self

    def set_input_tensor(self, input_tensor) -> None:
        """Split the received pipeline tensor into the teacher's, the student's and the losses."""
        received = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if received is None:
            self.teacher.set_input_tensor(None)
            self.module.set_input_tensor(None)
            self._received_losses = None
            return
        t, s, _ = self.widths
        self.teacher.set_input_tensor(received[..., :t].detach().contiguous())
        self.module.set_input_tensor(received[..., t : t + s].contiguous())
        self._received_losses = received[0, 0, t + s :]

    def forward(self, input_ids, position_ids, attention_mask):
        self._captured.clear()
        with torch.no_grad():
            teacher_out = self.teacher(input_ids, position_ids, attention_mask)
        student_out = self.module(input_ids, position_ids, attention_mask)
        losses = self._intermediate_losses(student_out)
        self._captured.clear()
        if not self.is_last_stage:
            s, b, _ = student_out.shape
            carried = losses.to(student_out.dtype).expand(s, b, len(self.pairs))
            return torch.cat([teacher_out, student_out, carried], dim=-1)
        return DistillationOutput(student_out, teacher_out, losses)

    def _intermediate_losses(self, like: torch.Tensor) -> torch.Tensor:
        """[n_pairs]: the losses received from earlier stages plus this stage's pairs.

        Under sequence parallelism each TP rank holds 1/tp of the tokens' hidden states, so a pair's
        loss is the mean of the ranks' means (all-reduced; the backward keeps each rank's own
        1/tp share), and a projection's gradient, from this rank's tokens only, is summed over TP by
        `finalize_model_grads` (its weight is marked `sequence_parallel`)."""
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        if self._received_losses is not None:
            losses = self._received_losses.float()
        else:
            losses = torch.zeros(len(self.pairs), device=like.device)
        for i in self.local_pairs:
            hidden = self._captured[("student", i)]
            if str(i) in self.projections:
                hidden = self.projections[str(i)](hidden)
            loss = cosine_loss(hidden, self._captured[("teacher", i)])
            if self.sequence_parallel:
                loss = reduce_from_tensor_model_parallel_region(loss) / self.tp
            one_hot = torch.zeros(len(self.pairs), device=like.device)
            one_hot[i] = 1.0
            losses = losses + one_hot * loss
        return losses


def _check_pair(pair: LayerPair, student_layers: int, teacher_layers: int, pp: int) -> None:
    if not 0 <= pair.student < student_layers or not 0 <= pair.teacher < teacher_layers:
        raise UserError(
            f"loss.intermediate pair {pair.student}:{pair.teacher} is out of range: the student has "
            f"{student_layers} layers, the teacher {teacher_layers} (0-based indices)"
        )
    s_stage, t_stage = _stage_of(pair.student, student_layers, pp), _stage_of(pair.teacher, teacher_layers, pp)
    if s_stage != t_stage:
        raise UserError(
            f"loss.intermediate pair {pair.student}:{pair.teacher}: student layer {pair.student} is on pipeline "
            f"stage {s_stage} but teacher layer {pair.teacher} on stage {t_stage} at pp={pp}: pair layers that "
            f"live on the same stage"
        )


@dataclass
class DistillationLoss:
    """The training objective from a `DistillationOutput` (a `TrainingLoss`).

    logit loss (+ lm_weight x LM loss) + w x sum of intermediate cosine losses, where w is
    `intermediate_weight`, or with `dynamic_balance` alpha = L_logits / L_intermediate (detached:
    the intermediate term is rescaled to the size of the logit term every micro-batch).
    """

    logits: LogitLoss
    dynamic_balance: bool = True
    intermediate_weight: float = 1.0
    chunk_tokens: int = 128

    def __post_init__(self):
        if self.chunk_tokens < 1:
            raise UserError(f"loss.chunk_tokens={self.chunk_tokens} must be at least 1")
        if self.intermediate_weight < 0:
            raise UserError(f"loss.intermediate_weight={self.intermediate_weight} must not be negative")

    def __call__(self, output: DistillationOutput | torch.Tensor, batch: dict[str, torch.Tensor]) -> LossResult:
        """`output` of a `DistillationModel`, or a student's logits alone with the teacher's top k
        in the batch (samples of a teacher cache)."""
        if isinstance(output, DistillationOutput):
            student, teacher, intermediate = output.student_logits, output.teacher_logits, output.intermediate
        else:
            student, teacher, intermediate = output, TopKTeacher.from_batch(batch), torch.empty(0)
        parts = logit_losses(student, teacher, batch["labels"], batch.get("loss_mask"), self.logits, self.chunk_tokens)
        loss = parts["objective"]
        metrics = {"kd_loss": parts["kd_loss"], "lm_loss": parts["lm_loss"]}
        if intermediate.numel():
            inter = intermediate.sum()
            if self.dynamic_balance:
                weight = loss.detach() / inter.detach().clamp(min=1e-8)
            else:
                weight = torch.tensor(self.intermediate_weight)
            loss = loss + weight * inter
            metrics["intermediate_loss"] = inter.detach()
            metrics["intermediate_weight"] = weight.detach()
        return loss, metrics


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """ValueError unless both tokenizers map the same strings to the same ids (and EOS agrees)."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])
        token, index = differing[0]
        raise UserError(
            f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens; e.g. {token!r} -> "
            f"{index} in only one of them): distillation needs the student to keep the teacher's tokenizer"
        )
    if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
        raise UserError(
            f"teacher and student tokenizers differ in eos_token_id ({teacher_tokenizer.eos_token_id} vs "
            f"{student_tokenizer.eos_token_id}): distillation needs the student to keep the teacher's tokenizer"
        )
