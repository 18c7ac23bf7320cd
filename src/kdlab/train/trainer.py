"""The KD trainer: student forward, teacher signal, loss, optimisation, checkpoints.

It never branches on a method's name: the loss object carries the method (and its `on_step`),
the regime carries where batches come from, the `TeacherSource` carries the teacher.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_scheduler

from kdlab.config import TrainSpec
from kdlab.losses import KDLoss, chunked_loss
from kdlab.losses.reduce import IGNORE_INDEX
from kdlab.regimes.base import Regime
from kdlab.teachers.base import TeacherSource
from kdlab.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kdlab.train.metrics_log import MetricsLog, format_record

logger = logging.getLogger("kdlab")

STATE_FILE = "train_state.json"
CHUNKED_AUTO_VOCAB = 16384


def own_regime_state(saved: list[dict] | dict | None, rank: int, world_size: int) -> dict:
    """This process's regime state in a checkpoint's per-process list.

    When the number of processes changed since the checkpoint, every process continues from the
    first process's state (with a warning); a single dict is a checkpoint written before states
    were kept per process.
    """
    if not saved:
        return {}
    if isinstance(saved, dict):
        return saved
    if len(saved) != world_size:
        logger.warning(
            "the checkpoint holds regime state for %d processes, this run has %d; every process "
            "continues from the first process's state",
            len(saved),
            world_size,
        )
        return saved[0]
    return saved[rank]


class RunInterrupted(RuntimeError):
    """Training stopped before `max_steps`; the last finished step is checkpointed."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    resumed_from: int


class Trainer:
    """Trains `student` to minimise `loss_fn` on the batches of `regime`.

    Args:
        student: a Hugging Face causal LM (not yet prepared by accelerate).
        teacher: the teacher source; `None` when the loss needs no teacher (e.g. `ce`).
        loss_fn: a `KDLoss` (usually `WeightedSum({"kd": ..., "ce": ...})`).
        regime: produces the micro-batches of each step.
        spec: the `train` section of the config.
        output_dir: the run folder (checkpoints, `metrics.jsonl`, `train_state.json`).
        accelerator: the `Accelerator` (one process, DDP, FSDP, ...).
        vocab: number of logits to compare (trims a padded lm_head); `None`: all.
        evaluator: called with the (unwrapped) student before the first step, every
            `eval_every` steps and after the last; its values are logged as `eval/<name>` in
            `metrics.jsonl` (curves over training: proxy and golden distances, perplexity).
        eval_every: steps between evaluator calls (0: never).
    """

    def __init__(
        self,
        *,
        student: PreTrainedModel,
        teacher: TeacherSource | None,
        loss_fn: KDLoss,
        regime: Regime,
        spec: TrainSpec,
        output_dir: Path,
        accelerator: Accelerator,
        vocab: int | None = None,
        evaluator: Callable[[PreTrainedModel], dict[str, float]] | None = None,
        eval_every: int = 0,
    ) -> None:
        if loss_fn.needs_teacher and teacher is None:
            raise ValueError("this loss needs a teacher, but none was given")
        self.accelerator = accelerator
        self.spec = spec
        self.loss_fn = loss_fn
        self.teacher = teacher if loss_fn.needs_teacher else None
        self.regime = regime
        self.output_dir = Path(output_dir)
        self.vocab = vocab
        self.evaluator = evaluator if eval_every > 0 else None
        self.eval_every = eval_every
        self.chunked = self._use_chunked(student)
        self.loss_fn.to(accelerator.device)
        params = [p for p in (*student.parameters(), *loss_fn.parameters()) if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
        # the scheduler is stepped by us once per optimiser step (accelerate's wrapper would step
        # it once per process), so `max_steps` means the same on one process or many
        self.scheduler = get_scheduler(
            spec.lr_scheduler if spec.lr_scheduler != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=spec.warmup_steps,
            num_training_steps=spec.max_steps,
        )
        self.model, self.optimizer = accelerator.prepare(student, optimizer)
        self.log = MetricsLog(self.output_dir, enabled=accelerator.is_main_process)

    def _use_chunked(self, student: PreTrainedModel) -> bool:
        setting = self.spec.chunked
        if setting == "auto":
            setting = student.get_output_embeddings().weight.shape[0] >= CHUNKED_AUTO_VOCAB
        if not setting:
            return False
        head = student.get_output_embeddings()
        plain = (
            isinstance(head, torch.nn.Linear)
            and getattr(student.config, "final_logit_softcapping", None) is None
        )
        if not plain:
            logger.warning(
                "chunked loss unavailable for this student (logit scaling); using logits"
            )
            return False
        if self.teacher is not None and not self.teacher.supports_hidden:
            logger.info(
                "the teacher gives no hidden states (logit scaling or a cache); using logits"
            )
            return False
        return True

    # ------------------------------------------------------------------ loss of one micro-batch

    def _micro_loss(self, batch: dict[str, Tensor], num_items: Tensor) -> tuple[Tensor, dict]:
        labels = batch["labels"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with self.accelerator.autocast():
            if self.chunked:
                return self._chunked_micro_loss(batch, inputs, labels, num_items)
            logits = self.model(**inputs).logits  # [B, T, V]
        if self.vocab is not None:
            logits = logits[..., : self.vocab]
        teacher = None if self.teacher is None else self.teacher.signal(batch).for_loss
        if self.loss_fn.coupling != "sequence":
            # only counted positions go into the loss (the same mean, less work on prompts)
            keep = labels != IGNORE_INDEX
            logits, labels = logits[keep], labels[keep]  # [M, V], [M]
            teacher = None if teacher is None else teacher[keep]
        return self.loss_fn.forward_terms(
            logits.float(), teacher, labels, num_items_in_batch=num_items
        )

    def _chunked_micro_loss(self, batch, inputs, labels, num_items):  # noqa: ANN001, ANN202
        out = self.model(**inputs, output_hidden_states=True, logits_to_keep=1)
        # only counted positions are projected, unless the loss couples the positions of a
        # sequence: then whole sequences `[B, T, H]` go in and the loss masks them itself
        keep = labels != IGNORE_INDEX if self.loss_fn.coupling != "sequence" else ...
        hidden = out.hidden_states[-1][keep]  # [N, H] or [B, T, H]
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        weight = head.weight if self.vocab is None else head.weight[: self.vocab]
        bias = head.bias if head.bias is None or self.vocab is None else head.bias[: self.vocab]
        t_hidden = t_weight = t_bias = None
        if self.teacher is not None:
            signal = self.teacher.signal(batch, hidden=True)
            t_hidden, t_weight, t_bias = signal.hidden[keep], signal.weight, signal.bias
        total, terms = chunked_loss(
            self.loss_fn,
            hidden,
            weight,
            t_hidden,
            t_weight,
            labels[keep],
            student_bias=bias,
            teacher_bias=t_bias,
            chunk_size=self.spec.chunk_size,
            num_items_in_batch=num_items,
            return_terms=True,
        )
        return total, terms

    # ------------------------------------------------------------------ one optimiser step

    def _step(self, step: int) -> dict[str, float]:
        micro = [self._to_device(b) for b in self.regime.micro_batches(step)]
        local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
        num_items = self.accelerator.reduce(
            torch.tensor(local, device=self.accelerator.device, dtype=torch.float32), "sum"
        )
        world = self.accelerator.num_processes
        total = torch.zeros((), device=self.accelerator.device)
        sums: dict[str, Tensor] = {}
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = self.accelerator.no_sync(self.model) if not sync else nullcontext()
            with ctx:
                loss, terms = self._micro_loss(batch, num_items)
                # DDP averages gradients over processes; the loss is already a global mean
                self.accelerator.backward(loss * world)
            total += loss.detach()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v
        self._sync_loss_grads()
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stacked = torch.stack([total, *[torch.as_tensor(v) for v in sums.values()]])
        stacked = self.accelerator.reduce(stacked, "sum")
        record = {"loss": stacked[0].item()}
        record.update({f"loss/{k}": v.item() for k, v in zip(sums, stacked[1:], strict=True)})
        record.update(
            lr=self.scheduler.get_last_lr()[0],
            grad_norm=grad_norm,
            tokens=int(num_items.item()),
        )
        return record

    def _sync_loss_grads(self) -> None:
        """Average the gradients of a learnable loss's parameters over processes.

        DDP/FSDP average the model's gradients; a loss's own parameters (e.g. `dac_kl`'s network)
        live outside the wrapped model, so their gradients are averaged here.
        """
        if self.accelerator.num_processes == 1:
            return
        for param in self.loss_fn.parameters():
            if param.grad is not None:
                param.grad = self.accelerator.reduce(param.grad, "mean")

    def _clip(self) -> float:
        if self.spec.max_grad_norm <= 0:
            return float("nan")
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.spec.max_grad_norm)
        loss_params = [p for p in self.loss_fn.parameters() if p.grad is not None]
        if loss_params:  # a learnable loss's own network, clipped by the same rule
            torch.nn.utils.clip_grad_norm_(loss_params, self.spec.max_grad_norm)
        return float(norm)

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    # ------------------------------------------------------------------ the loop

    def train(self, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Run to `max_steps` (or stop after `stop_after` steps, checkpointed, for tests)."""
        start = self._resume() if resume else 0
        self.log.truncate_after(start if start else -1)  # nothing from an earlier start is kept
        if start == 0 and self.evaluator is not None:
            self._emit_eval_only(0)
        bar = tqdm(
            total=self.spec.max_steps,
            initial=start,
            desc="distill",
            unit="step",
            disable=not (self.accelerator.is_main_process and self.spec.progress),
            dynamic_ncols=True,
        )
        step, last = start, None
        began = time.perf_counter()
        try:
            while step < self.spec.max_steps:
                if stop_after is not None and step - start >= stop_after:
                    self._checkpoint(step)
                    raise RunInterrupted(f"stopped after step {step}")
                record = self._step(step)
                step += 1
                terms = {k[5:]: v for k, v in record.items() if k.startswith("loss/")}
                self.loss_fn.on_step(step, self.spec.max_steps, record["loss"], terms)
                regime_values = {f"regime/{k}": v for k, v in self.regime.after_step(step).items()}
                record = {"step": step, **record, **self.loss_fn.log_values(), **regime_values}
                if self._evaluate_now(step):
                    record.update(self._curve_values())
                record["elapsed_s"] = round(time.perf_counter() - began, 3)
                self._emit(record, bar)
                last = record["loss"]
                if self.spec.save_every and step % self.spec.save_every == 0:
                    self._checkpoint(step)
        except KeyboardInterrupt:
            self._checkpoint(step)
            bar.close()
            raise
        bar.close()
        self._checkpoint(step)
        self._write_state(step, finished=True)
        return TrainResult(steps=step, final_loss=last, resumed_from=start)

    def _evaluate_now(self, step: int) -> bool:
        return self.evaluator is not None and (
            step % self.eval_every == 0 or step == self.spec.max_steps
        )

    def _curve_values(self) -> dict[str, float]:
        """The evaluator's values as `eval/<name>`, on the main process (all of them under FSDP);
        the other processes wait and log nothing."""
        values: dict[str, float] = {}
        if self.accelerator.distributed_type == DistributedType.FSDP:
            # sharded parameters: every process takes part in the forward passes
            result = self.evaluator(self.model)
            if self.accelerator.is_main_process:
                values = {f"eval/{k}": v for k, v in result.items()}
        elif self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            values = {f"eval/{k}": v for k, v in self.evaluator(model).items()}
        self.accelerator.wait_for_everyone()
        return values

    def _emit_eval_only(self, step: int) -> None:
        record = {"step": step, **self._curve_values()}
        self.log.write(record)
        if self.accelerator.is_main_process and self.spec.progress:
            logger.info(format_record(record))

    def _emit(self, record: dict, bar: tqdm) -> None:
        self.log.write(record)
        if self.accelerator.trackers:
            self.accelerator.log(
                {k: v for k, v in record.items() if k != "step"}, step=record["step"]
            )
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        step = record["step"]
        if self.accelerator.is_main_process and (
            step % self.spec.log_every == 0 or step == self.spec.max_steps
        ):
            msg = format_record(record)
            if bar.disable:
                logger.info(msg)
            else:
                bar.write(msg)

    def _checkpoint(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        # every process's regime state (e.g. its own replay buffer), gathered to the main process
        regime_states = self._gather_regime_states()
        if self.accelerator.is_main_process:
            save_checkpoint(
                self.output_dir,
                step,
                model=self.accelerator.unwrap_model(self.model),
                loss_fn=self.loss_fn,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                extra={"regime": regime_states},
            )
            self._write_state(step, finished=False)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> int:
        path = latest_checkpoint(self.output_dir)
        if path is None:
            logger.info("no checkpoint in %s; starting from step 0", self.output_dir)
            return 0
        state = load_checkpoint(
            path,
            model=self.accelerator.unwrap_model(self.model),
            loss_fn=self.loss_fn,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )
        self.regime.load_state_dict(
            own_regime_state(
                state.get("regime"), self.accelerator.process_index, self.accelerator.num_processes
            )
        )
        logger.info("resumed from %s (step %d)", path, state["step"])
        return int(state["step"])

    def _gather_regime_states(self) -> list[dict]:
        state = self.regime.state_dict()
        if self.accelerator.num_processes == 1:
            return [state]
        from accelerate.utils import gather_object

        return list(gather_object([state]))

    def _write_state(self, step: int, *, finished: bool) -> None:
        if self.accelerator.is_main_process:
            state = {"step": step, "max_steps": self.spec.max_steps, "finished": finished}
            (self.output_dir / STATE_FILE).write_text(json.dumps(state))
