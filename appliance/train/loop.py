"""One training loop for every recipe: setup → train → save.

The run keeps all its state on one object. Everything a resume needs (adapter weights,
optimizer state, step, data position, RNG states) is in a checkpoint, so a run stopped at step
k and resumed takes exactly the steps an uninterrupted run takes (signals: train/signals.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from appliance.config import RunConfig
from appliance.data import Batch, MicroBatchPlan, MixturePlan, PreparedData, data_records, examples_per_epoch, prepare
from appliance.errors import ApplianceError, TrainingInterrupted
from appliance.hardware import detect, peak_memory_gib
from appliance.hf import compute_dtype, load_tokenizer, quiet_libraries, resolve_device
from appliance.models import serving_base, write_serving_base
from appliance.registry import AdapterManifest, Registry
from appliance.store import MANIFEST, atomic_dir, ensure_free_space, read_json
from appliance.train import checkpoint as ckpt
from appliance.train import distributed
from appliance.train.events import CheckpointSaved, EvalDone, EventSink, Note, PhaseChanged, RunStarted, StepDone, ignore
from appliance.train.folder import RunFolder
from appliance.train.model import build_model, trainable_parameters
from appliance.train.objectives import Objective, objective_for
from appliance.train.optim import build_optimizer, layer_groups, schedule_factor, unfrozen_groups
from appliance.train.signals import StopSignals


@dataclass
class TrainResult:
    adapter: str
    adapter_dir: Path
    run_dir: Path
    steps: int
    metrics: dict[str, float]
    elapsed_s: float
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class TrainingRun:
    """A fine-tune from config to adapter. `run()` is the whole story."""

    def __init__(
        self,
        cfg: RunConfig,
        registry: Registry,
        adapter_name: str,
        *,
        resume: bool = False,
        overwrite: bool = False,
        events: EventSink = ignore,
        sampler_for: Callable[[Any], Any] | None = None,
    ):
        self.cfg = cfg
        self.sampler_for = sampler_for  # GRPO: the run → a vLLM sampler or None (appliance.serve.grpo_sampler)
        self.registry = registry
        self.adapter_name = adapter_name
        self.resume = resume
        self.overwrite = overwrite
        self.ranks = distributed.from_environment()
        self.emit = events if self.ranks.main else ignore  # rank 0 alone shows and writes
        self.folder = RunFolder(registry.run_dir(adapter_name))
        self.run_dir = self.folder.path
        self.checkpoint_root = self.folder.checkpoints
        self.adapter_dir, self.initial_adapter = registry.adapter_dir(adapter_name), self.run_dir / "initial-adapter"  # PiSSA / OLoRA: converted against it at save
        self.state = ckpt.TrainState()
        self.history: list[dict[str, Any]] = []

    # -- setup ---------------------------------------------------------------------

    def setup(self) -> None:
        """Model, data, optimizer: everything the loop needs, on this object."""
        if self.cfg.train.fsdp and not self.ranks.distributed:
            raise ApplianceError("--fsdp shards the base between processes, and this run has one.",
                                 "add --nproc-per-node 2 (or more), or drop --fsdp")
        distributed.start(self.ranks, resolve_device(self.cfg.train.device, detect()), patient=self.cfg.train.fsdp)
        adapter_exists = (self.adapter_dir / MANIFEST).is_file()
        self.overwrite = self.folder.check_start(self.adapter_name, adapter_exists, resume=self.resume, overwrite=self.overwrite)
        distributed.barrier(self.ranks)  # every rank has read the folder before rank 0 changes it
        quiet_libraries()
        model_dir = self.resolve_model()
        fresh = not self.folder.path.exists()
        if self.ranks.main:
            self.prepare_run_dir()
        distributed.barrier(self.ranks)
        try:
            data, pad_id = self.load_data(model_dir)
            self.build(model_dir, data, pad_id)
            if self.cfg.task == "grpo":
                self.objective.sampler = self.sampler_for(self) if self.sampler_for else None
                if self.objective.sampler is not None:
                    self.emit(Note("GRPO's answers are sampled by vLLM (a server of this run's own, started at the first step)"))
                elif self.cfg.grpo.sampler == "vllm":
                    raise ApplianceError("grpo.sampler=vllm: this run was started without the vLLM sampler.", "train with `appliance train`")
        except BaseException:
            if fresh and self.ranks.main:  # a start refused before its first step leaves no run behind
                shutil.rmtree(self.folder.path, ignore_errors=True)
            raise

    def resolve_model(self) -> Path:
        """The base's folder in the store (a language model, not a classifier)."""
        self.model_manifest = self.registry.model(self.cfg.model.name or "")
        if self.model_manifest.task != "causal-lm":
            raise ApplianceError(f"{self.model_manifest.name} is a classifier, not a language model.", "train from a base model")
        return self.registry.model_dir(self.model_manifest.name)

    def prepare_run_dir(self) -> None:
        self.folder.start(self.cfg, resume=self.resume, overwrite=self.overwrite)

    def load_data(self, model_dir: Path) -> tuple[PreparedData, int]:
        """The run's data, tokenized by the base's tokenizer, and the id batches are padded with."""
        cfg = self.cfg
        tokenizer = load_tokenizer(model_dir)
        data = prepare(cfg.data, cfg.task, tokenizer, model_name=self.model_manifest.name)
        for leak in data.report.leaks[:3]:
            self.emit(Note(f"leakage: a prompt appears in {' and '.join(leak.splits)}: {leak.shown[:80]!r}", "warning"))
        if data.report.overlong:
            action = "dropped" if cfg.data.overlong == "drop" else "truncated"
            self.emit(Note(f"{data.report.overlong} example(s) longer than seq_len={cfg.data.seq_len} were {action}", "warning"))
        return data, tokenizer.pad_token_id

    def build(self, model_dir: Path, data: PreparedData, pad_id: int) -> None:
        """Load the base with LoRA on the device, and set up the objective, batches and optimizer.

        Public so that a benchmark can time the very step `appliance train` runs on a folder
        outside the store, with data it prepared itself.
        """
        import torch

        cfg = self.cfg
        self.model_dir, self.data, self.pad_id = model_dir, data, pad_id
        self.hw = detect()
        self.device = resolve_device(cfg.train.device, self.hw)
        self.dtype = compute_dtype(cfg.model, self.device, self.hw)
        torch.manual_seed(cfg.train.seed)
        started = time.time()
        self.model, self.gradient_checkpointing = build_model(
            cfg, model_dir, self.device, self.dtype, labels=self.data.labels, ranks=self.ranks,
            initial_adapter=self.initial_adapter, note=lambda text: self.emit(Note(text)),
        )
        self.load_s = time.time() - started
        self.adapter_params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.objective: Objective = objective_for(cfg.task, pad_id, cfg.train.packing, cfg, model_dir)
        # The plan deals global micro-batches (every rank's examples); each rank takes its share.
        global_batch = cfg.train.batch_size * self.ranks.world
        if self.data.mixture is not None:
            replay = cfg.data.replay.fraction if cfg.data.replay else 0.0
            self.plan = MixturePlan(self.data.mixture, global_batch, cfg.train.seed, examples_per_epoch(self.data, replay))
        else:
            self.plan = MicroBatchPlan(len(self.data.train), global_batch, cfg.train.seed)
        self.total_steps = self._total_steps()
        self.layer_groups = layer_groups(self.adapter_params, cfg.train.unfreeze)
        self.warmup_steps = int(cfg.train.warmup) if cfg.train.warmup >= 1 else int(round(cfg.train.warmup * self.total_steps))
        self.optimizer, self.optimizer_name = build_optimizer(self.adapter_params, self.layer_groups, cfg.train, self.device)
        self.state.extra["optimizer"] = self.optimizer_name
        # fp16 (GPUs before Ampere) underflows: the gradients reaching the lower LoRA layers are
        # below fp16's smallest normal unless the loss is scaled up first.
        self.scaler = torch.amp.GradScaler(self.device) if self.dtype == torch.float16 else None
        self.val_batches = self._batches_of(self.data.val)

    def on_step_start(self) -> None:
        """Set which adapter layers train in this phase; announce a new phase."""
        if self.cfg.train.unfreeze is None:
            return
        active = unfrozen_groups(self.state.step, self.cfg.train.unfreeze, math.ceil(self.plan.per_epoch / self.cfg.train.grad_accum))
        for name, param in self.adapter_params.items():
            param.requires_grad_(self.layer_groups[name] < active)
        if active != getattr(self, "_active_groups", None):
            self._active_groups = active
            trainable = sum(p.numel() for p in self.adapter_params.values() if p.requires_grad)
            self.emit(PhaseChanged(self.state.step, f"top {active} of {self.cfg.train.unfreeze.groups} layer groups", trainable))

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.steps is not None:
            return t.steps
        return max(1, math.ceil((t.epochs or 1.0) * self.plan.per_epoch / t.grad_accum))

    # -- batches -------------------------------------------------------------------

    def _batches_of(self, items: list[Any]) -> list[Batch]:
        size = self.cfg.train.batch_size
        return [self.objective.collate([e.item for e in items[i : i + size]]) for i in range(0, len(items), size)]

    def _micro_batch(self, k: int) -> Batch | None:
        """This rank's share of global micro-batch k (None when the batch has fewer examples than ranks)."""
        share = self.ranks.share(self.plan(k))
        return self.objective.collate([self.data.train[i].item for i in share]) if share else None

    # -- checkpoints -----------------------------------------------------------------

    def save_checkpoint(self, reason: str, metric: float | None = None) -> Path:
        def room(nbytes: int) -> None:
            ensure_free_space(self.checkpoint_root, nbytes, f"the checkpoint at step {self.state.step}")

        rank_rngs = distributed.gather(self.ranks, ckpt.rng_state())  # every rank's, for an exact resume
        path = self.checkpoint_root / f"{ckpt.PREFIX}{self.state.step:08d}"
        if self.ranks.main:  # the adapter and optimizer are the same on every rank
            path = ckpt.save(
                self.checkpoint_root,
                self.state,
                self.adapter_params,
                self.optimizer.state_dict(),
                metric,
                before_write=room,
                rank_rngs=rank_rngs,
            )
            best = self.checkpoint_root / f"{ckpt.PREFIX}{self.state.best_step:08d}" if self.state.best_step is not None else None
            ckpt.prune(self.checkpoint_root, self.cfg.train.keep_checkpoints, best)
            self.emit(CheckpointSaved(self.state.step, str(path), reason))
        distributed.barrier(self.ranks)
        return path

    def load_checkpoint(self) -> str:
        """Restore from the newest checkpoint that verifies; say so when falling back."""
        path = ckpt.newest_verified(self.checkpoint_root, lambda damaged, problem: self.emit(
            Note(f"checkpoint {damaged.name} is damaged ({problem}); falling back to the one before", "warning")))
        if path is None:
            raise ApplianceError(f"No checkpoint of {self.adapter_name!r} verifies (all damaged).", "start again with --overwrite")
        state, adapter, optimizer_state = ckpt.load(path, self.ranks.rank)
        saved_optimizer = state.extra.get("optimizer", self.optimizer_name)
        if saved_optimizer != self.optimizer_name:
            raise ApplianceError(
                f"The run was checkpointed with the {saved_optimizer} optimizer and would resume with {self.optimizer_name} "
                f"(on {self.device}); their states do not convert.",
                f"resume where it ran, or pass --set train.optimizer={saved_optimizer}",
            )
        ckpt.copy_into(self.adapter_params, adapter)
        self.optimizer.load_state_dict(optimizer_state)
        if self.scaler is not None and "loss_scale" in state.extra:
            self.scaler.load_state_dict(state.extra["loss_scale"])
        self.state = state
        self.history = self.folder.truncate_metrics(state.step) if self.ranks.main else []
        return path.name

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.ranks.main:
            self.folder.log(record)

    # -- the loop --------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        if not self.val_batches:
            return {}
        self.model.eval()
        try:
            return self.objective.evaluate(self.model, self.val_batches, self.device)
        finally:
            self.model.train()

    def _after_eval(self, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True when early stopping says stop."""
        value = metrics.get(self.objective.metric)
        improved = False
        if value is not None:
            best = self.state.best_metric
            improved = best is None or (value > best if self.objective.higher_is_better else value < best)
            if improved:
                self.state.best_metric, self.state.best_step = value, self.state.step
                self.state.evals_without_improvement = 0
            else:
                self.state.evals_without_improvement += 1
        self.emit(EvalDone(self.state.step, metrics, improved))
        self._log({"step": self.state.step, **metrics})
        patience = self.cfg.train.early_stopping_patience
        if patience and improved:
            self.save_checkpoint("best", value)
        return bool(patience) and self.state.evals_without_improvement >= patience

    def train_step(self) -> dict[str, float]:
        import torch

        t = self.cfg.train
        micro = [self._micro_batch(self.state.micro_batches + i) for i in range(t.grad_accum)]
        # Every rank divides by the whole global batch's units, so the summed gradient is a single process's.
        (units,) = distributed.total(self.ranks, [sum(self.objective.units(b) for b in micro if b is not None)])
        units = units or 1
        factor = schedule_factor(self.state.step, self.total_steps, self.warmup_steps, t.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("initial_lr", t.lr) * factor
        loss_total, stats_total = 0.0, {}
        for batch in micro:
            weight = 1.0
            if batch is None:
                if not self.cfg.train.fsdp:
                    continue
                # A sharded base gathers each layer's weights with every rank: this rank, with no example
                # in this micro-batch, runs one that counts for nothing.
                batch, weight = self.objective.collate([self.data.train[0].item]), 0.0
            tensors = {k: v.to(self.device) for k, v in batch.tensors.items()}
            loss_sum, stats = self.objective.loss_sum(self.model, tensors)
            loss_sum = loss_sum * weight
            loss = loss_sum / units
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_total += float(loss_sum.detach())
            for k, v in stats.items():
                stats_total[k] = stats_total.get(k, 0.0) + v / len(micro)
        params = [p for p in self.adapter_params.values() if p.requires_grad]
        distributed.sum_gradients(self.ranks, params)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        if self.scaler:  # skips the step when the scaled gradients overflowed, then lowers the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.state.extra["loss_scale"] = self.scaler.state_dict()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.micro_batches += t.grad_accum
        self.state.step += 1
        mine = [b for b in micro if b is not None]
        # The figures of the global batch; objective-specific figures (stats) are rank 0's own.
        loss_total, useful, trained = distributed.total(
            self.ranks, [loss_total, sum(b.useful_tokens for b in mine), sum(b.trained_tokens for b in mine)]
        )
        self.state.tokens_seen += int(useful)
        return {
            "loss": loss_total / units,
            "lr": t.lr * factor,
            "grad_norm": float(grad_norm),
            "useful_tokens": int(useful),
            "trained_tokens": int(trained),
            **stats_total,
        }

    def train(self, signals: StopSignals) -> bool:
        """The loop. Returns True when early stopping ended it."""
        import torch

        t = self.cfg.train
        self.model.train()
        session_start, session_step0 = time.time(), self.state.step
        elapsed0 = self.state.elapsed_s
        while self.state.step < self.total_steps:
            self.on_step_start()
            step_start = time.time()
            figures = self.train_step()
            if self.device == "cuda":
                torch.cuda.synchronize()
            step_s = time.time() - step_start
            self.state.elapsed_s = elapsed0 + time.time() - session_start
            done_here = self.state.step - session_step0
            eta = (time.time() - session_start) / done_here * (self.total_steps - self.state.step)
            memory = peak_memory_gib(self.device)
            record = {
                "step": self.state.step,
                "epoch": round(self.plan.epoch_of(self.state.micro_batches), 3),
                **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in figures.items()},
                "tokens_per_s": round(figures["useful_tokens"] / step_s, 1),
                "step_s": round(step_s, 3),
                "elapsed_s": round(self.state.elapsed_s, 1),
                "memory_gib": round(memory, 3),
            }
            self._log(record)
            extra = {k: v for k, v in figures.items() if k not in ("loss", "lr", "grad_norm", "useful_tokens", "trained_tokens")}
            self.emit(StepDone(
                step=self.state.step, total_steps=self.total_steps, loss=figures["loss"], lr=figures["lr"], grad_norm=figures["grad_norm"],
                tokens_per_s=record["tokens_per_s"], elapsed_s=self.state.elapsed_s, eta_s=eta, memory_gib=memory, epoch=record["epoch"],
                extra=extra,
            ))
            last = self.state.step >= self.total_steps
            if t.eval_every and self.state.step % t.eval_every == 0 and not last:
                if self._after_eval(self.evaluate()):
                    self.emit(Note(f"early stopping: no improvement in {t.early_stopping_patience} evaluations"))
                    return True
            # All ranks stop at the same step, or their collectives would wait on each other forever.
            (stopping,) = distributed.total(self.ranks, [0.0 if signals.received is None else 1.0])
            if stopping:
                path = self.save_checkpoint("interrupted")
                raise TrainingInterrupted(130 if signals.received == signal.SIGINT else 143, str(path))
            if t.save_every and self.state.step % t.save_every == 0 and not last:
                self.save_checkpoint("scheduled")
        return False

    def restore_best(self) -> int | None:
        """Early stopping keeps the best checkpoint; put its weights back for the adapter."""
        if self.state.best_step is None or not self.cfg.train.early_stopping_patience:
            return None
        path = self.checkpoint_root / f"{ckpt.PREFIX}{self.state.best_step:08d}"
        if not path.is_dir() or ckpt.verify(path):
            return None
        ckpt.copy_into(self.adapter_params, ckpt.adapter_weights(path))
        return self.state.best_step

    def save_adapter(self, metrics: dict[str, float], train_s: float) -> Path:
        ensure_free_space(self.adapter_dir.parent, sum(p.numel() * 4 for p in self.adapter_params.values()), "the adapter")
        cfg = self.cfg
        with atomic_dir(self.adapter_dir, overwrite=True) as tmp:
            # PiSSA and OLoRA moved the base's principal part into the adapter: saved against the
            # initial adapter, peft converts it to a plain LoRA (twice the rank) of the untouched base.
            converted = {"path_initial_model_for_weight_conversion": str(self.initial_adapter)} if cfg.lora.init in ("pissa", "olora") else {}
            self.model.save_pretrained(str(tmp), safe_serialization=True, **converted)
            adapter_config = read_json(tmp / "adapter_config.json")
            # vLLM's filesystem resolver offers an adapter only to a server whose --model is this
            # path: the folder vLLM serves this adapter over (serve.command.serving_dir).
            adapter_config["base_model_name_or_path"] = str(self.serving_folder())
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
            targets = adapter_config.get("target_modules") or []
            manifest = AdapterManifest(
                name=self.adapter_name,
                base=self.model_manifest.name,
                base_fingerprint=self.model_manifest.fingerprint,
                task=cfg.task,
                recipe=cfg.recipe,
                rank=adapter_config["r"],
                alpha=cfg.lora.alpha,
                target_modules=sorted({t.rsplit(".", 1)[-1] for t in targets}) if isinstance(targets, list) else [targets],
                data=data_records(self.data),
                config=cfg.model_dump(mode="json"),
                metrics=metrics,
                timings={"load_s": round(self.load_s, 1), "train_s": round(train_s, 1)},
                run=str(self.run_dir),
                labels=self.data.labels or None,
            )
            self.registry.write_manifest(tmp, manifest)
        return self.adapter_dir

    def serving_folder(self) -> Path:
        return serving_base(self.registry, self.model_manifest, self.cfg.model, self.cfg.task)

    def write_serving_base(self) -> None:
        folder = self.serving_folder()
        if folder != self.model_dir and not (folder / "config.json").is_file():
            self.emit(Note("writing the base's 4-bit twin, which vLLM serves its adapters over (once per base)"))
            write_serving_base(self.registry, self.model_manifest, self.cfg.model, self.cfg.task)

    # -- the whole story --------------------------------------------------------------

    def run(self) -> TrainResult:
        if not hasattr(self, "model"):  # a caller may have set up already, to inspect the run
            self.setup()
        trainable, total = trainable_parameters(self.model)
        resumed = self.load_checkpoint() if self.resume else None
        self.emit(RunStarted(
            run_name=self.adapter_name, model=self.model_manifest.name, device=self.device, dtype=str(self.dtype).replace("torch.", ""),
            total_steps=self.total_steps, start_step=self.state.step, train_examples=len(self.data.train), val_examples=len(self.data.val),
            trainable_params=trainable, total_params=total, optimizer=self.optimizer_name, resumed_from=resumed, ranks=self.ranks.world,
            batch_size=self.cfg.train.batch_size, grad_accum=self.cfg.train.grad_accum,
        ))
        if self.cfg.train.unfreeze is None:
            self.emit(PhaseChanged(self.state.step, "all adapter layers", trainable))
        with StopSignals() as signals, contextlib.closing(self.objective):
            stopped_early = self.train(signals)
            metrics = {}
            last_train = next((h for h in reversed(self.history) if "loss" in h), None)
            if last_train:
                metrics["train_loss"] = last_train["loss"]
            final_eval = self.evaluate()
            if final_eval and not stopped_early:
                self._after_eval(final_eval)
            best_step = self.restore_best()
            if best_step is not None and best_step != self.state.step:
                self.emit(Note(f"restored the best checkpoint (step {best_step}, {self.objective.metric}={self.state.best_metric:.4f})"))
                final_eval = self.evaluate()
            metrics.update(final_eval)
            metrics["steps"] = self.state.step
            if best_step is not None:
                metrics["best_step"] = best_step
            self.save_checkpoint("final", final_eval.get(self.objective.metric))
            if self.ranks.main:
                self.save_adapter(metrics, self.state.elapsed_s)
                self.write_serving_base()
            distributed.barrier(self.ranks)
            adapter_dir = self.adapter_dir
        distributed.stop(self.ranks)
        return TrainResult(
            self.adapter_name, adapter_dir, self.run_dir, self.state.step, metrics, self.state.elapsed_s, stopped_early, self.history
        )


def run_training(cfg: RunConfig, registry: Registry, adapter_name: str, *, resume: bool = False, overwrite: bool = False,
                 events: EventSink = ignore, sampler_for: Callable[[Any], Any] | None = None) -> TrainResult:
    return TrainingRun(cfg, registry, adapter_name, resume=resume, overwrite=overwrite, events=events, sampler_for=sampler_for).run()
