"""KTMModule: the LightningModule around KTMModel (frozen base + LoRA + merge encoders).

Train: loss on answer tokens only, at the curriculum's K for this step. Validate/test: every K in `eval_ks`
on the same examples, so TensorBoard compares K side by side (`val/k4/accuracy`, `val/k1/perplexity`; RunOutputs
also writes each K as its own TensorBoard run, so one chart shows every K).
Checkpoints hold only the trainable weights (LoRA + encoders) plus the base's fingerprint; the frozen
base is loaded from its source, and a checkpoint of another base is refused.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from ktm.attention import CHOICES, resolve
from ktm.errors import KTMError, check_choice, check_count, check_share
from ktm.metrics import KMetrics, add_perplexity_f1
from ktm.training.checkpointing import SELECTABLE
from ktm.model import DISTILL_TEACHERS, KTMModel, LoraSettings, same_lora_targets, with_unrecorded

log = logging.getLogger("ktm")
HIDDEN_AT = ("targets", "all")  # model.distill_hidden_at
# trainer.precision -> the dtype autocast computes linears in; the frozen base's linears are stored in it (setup)
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
DIVERGING_ENCODER = 10.0  # correction/mean norm ratio above which the trainer warns (healthy runs stay near 1)


class KTMModule(L.LightningModule):
    def __init__(
        self,
        base: str = "smollm2-135m",
        ks: list[int] = [4],  # noqa: B006  (jsonargparse needs a plain default)
        keep_tail: int = 0,
        keep_marked: bool = False,
        lora: LoraSettings = LoraSettings(),  # noqa: B008
        lr_lora: float | dict[int, float] = 1e-4,
        lr_encoder: float | dict[int, float] = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_decay_share: float = 0.0,
        dtype: str = "float32",
        encoder_multiplier: float | None = None,
        encoder_bound: float | None = 1.0,
        encoder_shape: str = "paper",
        merged_positions: str = "compact",
        compressor: str = "merge",
        max_prompt_tokens: int | None = None,
        long_prompt_policy: str = "error",
        eval_ks: list[int] | None = None,
        generate_eval_examples: int = 0,
        generate_max_new_tokens: int = 512,
        distill_weight: float = 0.0,
        distill_teacher: str = "base",
        distill_temperature: float = 1.0,
        distill_hidden_weight: float = 0.0,
        distill_hidden_at: str = "targets",
        eval_base: bool = False,
        init_from: str | None = None,
        reset_optimizer_on_k_change: bool = False,
        merge_policy: str = "fixed",
        segment_tokens: int = 16,
        policy_score: str = "surprisal",
        budget_share: float = 0.5,
        attention: str = "sdpa",
        fused_adamw: bool = False,
        phase_jitter: bool = False,
    ):
        """
        Args:
            base: HF causal LM (hub id like Qwen/Qwen2.5-0.5B, or local folder), `smollm2-135m` (embedded),
                or `config:<shape>` (random weights; tests and speed benchmarks).
            ks: K values this model gets a merge encoder for (K=1 = uncompressed, no encoder).
            keep_tail: last N prompt tokens left unmerged (0 = the paper: merge everything).
            keep_marked: the span each example marks at the end of its prompt (Example.keep: the tree's question,
                commitpack's instructions) stays in tokens, besides the keep_tail tokens before it (False = the
                paper: the whole prompt merged). Compression L counts the span as uncompressed.
            lora: LoRA settings (r=0 disables LoRA).
            lr_lora: AdamW learning rate of the LoRA adapters: one number, or one per K of the training step,
                e.g. {1: 1.0e-3, 2: 1.0e-4, 4: 1.0e-4}: the LoRA learns the task fast at K=1 and then moves
                slowly while the encoders learn to feed it merged blocks (at 1e-3 throughout it forgot K=1
                in one K=2 epoch and fell to the label prior).
            lr_encoder: AdamW learning rate of the merge encoders: one number for all, or one per K, e.g.
                {2: 1.0e-3, 4: 1.0e-4} (a larger K's encoder is wider and diverges at a rate a smaller K needs).
            weight_decay: AdamW weight decay (both groups).
            warmup_steps: linear learning-rate warm-up steps, then constant.
            lr_decay_share: the last share of the fit's planned steps (trainer.max_steps, or max_epochs x
                batches per epoch, whichever is smaller) over which every learning rate falls linearly to 0
                (warm-up, stable, decay); 0 = constant to the end (the paper). A run stopped earlier (max_time,
                the curriculum's final threshold) stops wherever its decay had got to.
            dtype: weights dtype of the base (float32 on CPU; bfloat16 on GPU).
            encoder_multiplier: f in the hidden size h = int(f*K)*d (None = the paper's rule, see ktm.encoder).
            encoder_shape: "paper" (three layers) or "shallow" (two: no middle K*d layer; ktm.encoder).
            compressor: what the LM reads at length ~n/K (ktm.compressors): merge (the method), none,
                truncate_tail, truncate_head, random_drop, self_information, mean_pool, llmlingua2.
            encoder_bound: b in |correction| < b * |block mean| (soft bound, see ktm.encoder); None = the
                paper's unbounded encoder, which diverges at encoder learning rates that suit another K.
            max_prompt_tokens: longest prompt accepted (None = the base's context length).
            long_prompt_policy: "error" or "truncate_left" for prompts over max_prompt_tokens (counted).
            eval_ks: K values evaluated at validation/test (None = all of ks).
            generate_eval_examples: at test, also generate the answer for this many test examples per K
                (greedy, KV cache) and report exact match + line-level edit similarity (0 = off).
            generate_max_new_tokens: cap on generated tokens per example for that check.
            distill_weight: at K > 1 training steps, add this times the KL from the teacher (distill_teacher) reading
                the uncompressed prompt to the merged model, on every target token (0 = off).
            distill_teacher: who reads the uncompressed prompt for distillation: "base" (the frozen base, adapters
                disabled: a reading stage's teacher) or "k1" (this model itself at K=1 with its adapters, no
                gradient: a task teacher once K=1 knows the task, which the bare base does not), or an export
                folder of a trained run on the same base (ktm.training.teacher: e.g. the task's K=1 reference,
                frozen, its LoRA merged in, read at K=1 and kept out of this run's checkpoints).
            distill_temperature: T of the distillation KL: both distributions softened by T, the KL scaled by
                T^2 (1 = plain KL). A teacher sure of its answer says more about the other labels at T > 1.
            distill_hidden_weight: at K > 1 steps, add this times the hidden-state match to the teacher at every
                scored position (the answer position first), averaged over layers: |h - h_teacher|^2 /
                |h_teacher|^2. A label gives one bit per example; this says where in every layer the
                uncompressed model's decision lies (0 = off).
            distill_hidden_at: where hidden states are matched: "targets" (the scored positions) or "all" (also
                every merged block, with the uncompressed position of its block's last token, and every token
                kept: ktm.model.teacher_positions), so every block learns to carry what its K tokens said.
            eval_base: perplexity tasks: also score the bare base (no adapters, K=1) at val/test, so each K
                reads against the uncompressed base (`perplexity_base`, `perplexity_vs_base`).
            reset_optimizer_on_k_change: clear AdamW's moments when the K schedule moves to a new entry. After
                a K=1 epoch at loss ~0 the second moments are tiny, so the first K=2 gradients take steps many
                times the lr and wipe out what the LoRA learned (seen: K=1 val 0.99 -> 0.52 in one K=2 epoch).
            init_from: an export folder (checkpoints/<exp>/<run>/export) whose LoRA and merge encoders this
                run starts from, e.g. a reading-stage run; its base, LoRA shape and K must fit this run's.
            merge_policy: how K spreads over a prompt (ktm.policy): "fixed" (one K, the paper) or "budget" (each
                window of segment_tokens gets a K of ks by its content score, at the step's K on average).
                Validation, test and the export use it; training mixes it with fixed (budget_share).
            merged_positions: where the base sees each merged embedding: "compact" (the paper: the merged
                sequence counted 0, 1, 2, ...) or "spread" (at its block's last token's position in the uncompressed
                prompt, so rotary distances are those of the uncompressed text; ktm.model.build_batch).
            segment_tokens: the budget policy's window in tokens (a multiple of every K of ks).
            policy_score: what ranks the budget policy's windows: "surprisal" (mean surprisal under the frozen
                base: dense text merges less) or "random" (the control).
            budget_share: with merge_policy=budget, the share of K > 1 training steps laid out by it (the others
                fixed), so the LoRA learns to read both mixed-K and plain prompts.
            attention: the base's attention kernel while this module trains and evaluates: "sdpa", "eager" or
                "eager_float32" (ktm/attention.py: eager attention computed in float32 outside autocast),
                "blocked_causal" (ktm/attention.py: blocks of queries as GEMMs), or "auto" (blocked_causal on CPU,
                sdpa on CUDA: ktm.attention.resolve). On 2 CPU cores blocked_causal made bf16 tree K=4 steps 1.2-1.3x
                faster than SDPA, at the same test quality over 3 seeds (README Speed).
            fused_adamw: AdamW as one fused kernel (CPU or CUDA) instead of torch's default; same update up to
                float rounding, 9-13% faster tree K=4 steps on 2 CPU cores.
            phase_jitter: at K > 1 training steps each prompt leaves 0..K-1 more of its last tokens in tokens
                (phase_shifts: drawn from the step and the row), which moves every block boundary, since blocks
                end where the tokens kept at the end begin: over the epochs one prompt is merged K ways, an
                augmentation of the merged view for a small labelled set seen many times. Validation, test and
                the export never jitter (False = the paper; on Amazon K=4 it tested no better, docs/results.md).
        """
        super().__init__()
        self.save_hyperparameters()
        encoder_lrs = _per_k(lr_encoder, "lr_encoder") if isinstance(lr_encoder, dict) else {}
        self._lora_lrs = _per_k(lr_lora, "lr_lora") if isinstance(lr_lora, dict) else {}
        checks = [("weight_decay", weight_decay), ("distill_weight", distill_weight), ("distill_hidden_weight", distill_hidden_weight)]
        checks += [(f"lr_lora[{k}]", v) for k, v in self._lora_lrs.items()] if self._lora_lrs else [("lr_lora", lr_lora)]
        checks += [(f"lr_encoder[{k}]", v) for k, v in encoder_lrs.items()] if encoder_lrs else [("lr_encoder", lr_encoder)]
        for name, value in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise KTMError(f"model.{name} must be a number >= 0, got {value!r}", f"set model.{name} to e.g. 1e-4")
        if not isinstance(distill_teacher, (str, os.PathLike)) or not str(distill_teacher):
            raise KTMError(f"model.distill_teacher must be base, k1 or an export folder, got {distill_teacher!r}",
                           "use base (the frozen base), k1 (this model at K=1) or checkpoints/<exp>/<run>/export")
        if isinstance(distill_temperature, bool) or not isinstance(distill_temperature, (int, float)) or not distill_temperature > 0 \
                or not math.isfinite(distill_temperature):
            raise KTMError(f"model.distill_temperature must be a number > 0, got {distill_temperature!r}", "set it to 1 (plain KL) or e.g. 2")
        check_choice("model.distill_hidden_at", distill_hidden_at, HIDDEN_AT,
                     "use targets (the scored positions) or all (every position of the merged prompt too)")
        if distill_hidden_at == "all" and distill_hidden_weight > 0 and compressor != "merge":
            raise KTMError(f"model.distill_hidden_at=all matches merged blocks, and compressor {compressor!r} has none",
                           "use model.distill_hidden_at=targets with a baseline compressor")
        check_share("model.budget_share", budget_share, "set it to e.g. 0.5 (half the merged steps by the budget policy)")
        check_count("model.warmup_steps", warmup_steps, 0, "set it to 0 (no warm-up) or more")
        check_choice("model.attention", attention, CHOICES, "use sdpa (the default) or auto (the kernel measured fastest on this device, README Speed)")
        check_share("model.lr_decay_share", lr_decay_share, "set it to e.g. 0.3 (the last 30% of the steps decay to 0), or 0 for a constant lr")
        lora_settings = lora if isinstance(lora, LoraSettings) else LoraSettings(**lora)
        self.model = KTMModel.from_base(
            base, dtype=dtype, ks=ks, keep_tail=keep_tail, lora=lora_settings, encoder_multiplier=encoder_multiplier, encoder_bound=encoder_bound,
            encoder_shape=encoder_shape, merged_positions=merged_positions, compressor=compressor, keep_marked=keep_marked, merge_policy=merge_policy, segment_tokens=segment_tokens,
            policy_score=policy_score, max_prompt_tokens=max_prompt_tokens, long_prompt_policy=long_prompt_policy)
        if encoder_lrs:  # K without an encoder here are ignored, so `--model.ks=[1,2]` works on a {2:.., 4:..} config
            missing = [k for k in self.model.ks if k > 1 and k not in encoder_lrs]
            if missing:
                raise KTMError(f"model.lr_encoder gives no learning rate for the K={missing} merge encoder (it has K={sorted(encoder_lrs)})",
                               "give one learning rate per K > 1 of model.ks, or a single number for all")
        missing = [k for k in self.model.ks if self._lora_lrs and k not in self._lora_lrs]
        if missing:
            raise KTMError(f"model.lr_lora gives no learning rate for K={missing} (it has K={sorted(self._lora_lrs)})",
                           "give one learning rate per K of model.ks, or a single number for all")
        # A teacher from an export (setup loads it for fit only: a finished run tests without it): held in a list
        # so it is no submodule, not trained, not checkpointed, not moved by Lightning.
        self._teacher: list[KTMModel] = []
        if init_from:
            from ktm.training.init_from import load_trained_weights

            log.info("starting from the LoRA and encoders of %s (K=%s)", init_from, load_trained_weights(self.model, init_from))
        self.eval_ks = sorted(set(eval_ks or self.model.ks))
        missing = [k for k in self.eval_ks if k not in self.model.ks]
        if missing:
            raise KTMError(f"model.eval_ks {missing} are not in model.ks {self.model.ks}", "add them to model.ks or remove them from eval_ks")
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.task = "classification"
        self.labels: tuple[str, ...] = ()
        self.metrics = nn.ModuleDict()
        self.results: dict[str, dict[int, dict[str, float]]] = {}
        self._label_ids: list[int] = []
        # {K: {"max_correction_ratio", "step", "warned"}}: the watch's record over the whole fit (checkpointed),
        # written to metrics.json so "no encoder diverged" is a file, not a search through TensorBoard
        self.encoder_watch: dict[int, dict[str, Any]] = {}
        self._encoder_lrs = encoder_lrs  # {K: lr}, empty when one lr serves all encoders
        self._k_entry: list[int] | None = None  # the K schedule entry trained last (checkpointed)
        self.trained_step: int | None = None  # global step of the checkpoint this trainer call loaded (None: none)
        self.selected: dict[str, Any] | None = None  # the checkpoint chosen by checkpoint.monitor (checkpointing.py)

    # -- wiring to the data --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.trained_step = None  # Lightning restores the call's checkpoint after setup (on_load_checkpoint)
        self.model.use_attention(resolve(self.hparams.get("attention", "sdpa"), self.trainer.strategy.root_device.type))
        # FSDP flattens one dtype, so it keeps autocast's per-use casts
        stored_dtype = None if isinstance(self.trainer.strategy, FSDPStrategy) else AUTOCAST_DTYPES.get(str(self.trainer.precision))
        if stored_dtype is not None:
            self.model.store_frozen_linears(stored_dtype)  # bit-identical to autocast's per-use casts; faster on long prompts
        self._load_teacher(stage, stored_dtype)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise KTMError("KTMModule needs a KTMDataModule", "pass --data (the experiment configs do)")
        self.task, self.labels = dm.benchmark.task, tuple(dm.benchmark.labels)
        bad = [k for k in dm.schedule_ks() if k not in self.model.ks]
        if bad:
            raise KTMError(f"data.k_schedule uses K={bad} but model.ks is {self.model.ks}", "add those K to model.ks")
        if self.task == "classification":
            self._label_ids = self.model.label_token_ids(self.labels)
        self._check_lengths(dm, stage)
        if not len(self.metrics):
            n = len(self.labels) if self.task == "classification" else 0
            extra = ["base"] if self.hparams.eval_base and self.task == "perplexity" else []
            for split in ("val", "test"):
                self.metrics[split] = nn.ModuleDict({str(k): KMetrics(n) for k in [*self.eval_ks, *extra]})

    def _load_teacher(self, stage: str, stored_dtype: torch.dtype | None) -> None:
        """model.distill_teacher given as an export folder: load it for a fit that distils, beside the student
        (its frozen linears stored in `stored_dtype` as the student's, where given)."""
        hp = self.hparams
        teacher = str(hp.get("distill_teacher", "base"))
        if stage != "fit" or self._teacher or teacher in DISTILL_TEACHERS or not distills(hp):
            return
        from ktm.training.teacher import load_teacher

        model = load_teacher(teacher, self.model, hp.get("dtype", "float32"))
        model.to(self.trainer.strategy.root_device)
        model.use_attention(self.model.attention)
        if stored_dtype is not None:
            model.store_frozen_linears(stored_dtype)
        self._teacher = [model]
        log.info("distilling from the trained model of %s (read uncompressed, frozen)", teacher)

    def _check_lengths(self, dm, stage: str) -> None:
        """All prompts this call will see (every stage's full splits: training resamples each epoch)."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        for data_stage in dm.stages:
            for split in splits:
                examples = getattr(dm.splits(data_stage), split)
                prompts = self.model.example_prompts([e.prompt for e in examples], [e.keep for e in examples])
                self.model.check_prompt_lengths(prompts, f"{split} prompts of data stage {data_stage!r}")

    def current_k(self) -> int:
        return self.trainer.datamodule.current_k(default=self.model.ks[-1])

    def _token_ids(self, batch: dict[str, Any]) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
        """(prompt ids, target ids with any cue in front, how many leading target ids are the cue, how many
        trailing prompt ids are the example's kept span: 0 unless model.keep_marked)."""
        prompts = self.model.example_prompts(batch["prompts"], batch.get("keeps"))
        prompt_ids, kept = self.model.encode_prompts(prompts)
        target_ids = self.model.tokenize_targets(batch["targets"])
        cues = batch.get("cues") or [""] * len(target_ids)
        cue_ids = [self.model.tokenize_targets([c], add_eos=False)[0] if c else [] for c in cues]
        return prompt_ids, [c + t for c, t in zip(cue_ids, target_ids)], [len(c) for c in cue_ids], kept

    def _batch(self, batch: dict[str, Any], k: int):
        """(prompt token ids, the merged Batch with the targets)."""
        prompt_ids, target_ids, unscored, kept = self._token_ids(batch)
        return prompt_ids, self.model.build_batch(prompt_ids, k, target_ids, unscored, kept)

    # -- steps -----------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        entry = self.trainer.datamodule.current_ks(default=self.model.ks[-1])
        if self.hparams.reset_optimizer_on_k_change and self._k_entry is not None and entry != self._k_entry:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()  # fresh moments: AdamW's bias correction makes the first steps ~lr again
            log.info("K schedule moved from K=%s to K=%s: optimizer moments reset", self._k_entry, entry)
        self._k_entry = list(entry)

    def on_train_start(self) -> None:
        # A resumed or branched fit restores the optimizer and scheduler with the learning rates they were
        # saved with; the config's are the ones to train with (a branch may change them). For a plain resume
        # these are the same numbers, so resume stays bit-exact.
        configured = self._configured_lrs()
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            for i, group in enumerate(scheduler.optimizer.param_groups):
                base = configured.get(group.get("name"), group.get("initial_lr", group["lr"]))
                group["initial_lr"] = scheduler.base_lrs[i] = base
                group["lr"] = base * self.lr_factor_at(self.trainer.global_step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._lora_lrs:
            return
        # Set here, not in the scheduler's lambda: the K of a step is known only once the epoch (and so the
        # schedule entry) has begun, and the scheduler computes the next step's lr at the end of the last one.
        k = self.trainer.datamodule.train_k(self.trainer.global_step, default=self.model.ks[-1])
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                if group.get("name") == "lora":
                    group["lr"] = self._lora_lrs[k] * self.lr_factor_at(self.trainer.global_step)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        step = self.trainer.global_step
        k = self.trainer.datamodule.train_k(step, default=self.model.ks[-1])
        prompt_ids, target_ids, unscored, kept = self._token_ids(batch)
        if k > 1 and self.hparams.get("phase_jitter", False):
            kept = [min(c + j, len(p)) for c, j, p in zip(kept, phase_shifts(step, len(kept), k), prompt_ids)]
        policy = self.train_policy(step, k)
        b = self.model.build_batch(prompt_ids, k, target_ids, unscored, kept, policy)
        hp = self.hparams
        distill = k > 1 and distills(hp)
        hidden = hp.get("distill_hidden_at", "targets") if distill and hp.get("distill_hidden_weight", 0) > 0 else None
        pred, states = self.model.target_outputs(b, hidden)
        nll, counts, _ = self.model.target_nll(b, pred)
        loss = nll.sum() / counts.sum().clamp(min=1)
        bs = len(batch["prompts"])
        if distill:
            self.log(f"train/k{k}/target_loss", loss, batch_size=bs)
            terms = self._distillation(k, b, pred, states, hidden, prompt_ids, target_ids, unscored, kept, policy)
            for name, (weight, value) in terms.items():
                self.log(f"train/k{k}/{name}", value, batch_size=bs)
                loss = loss + weight * value
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log(f"train/k{k}/loss", loss, batch_size=bs)
        self.log("train/k", float(k), prog_bar=True, batch_size=bs)
        for group in self.trainer.optimizers[0].param_groups if self.trainer.optimizers else []:
            self.log(f"train/lr/{group.get('name', 'all')}", group["lr"], batch_size=bs)  # as scheduled (warm-up, decay, per K)
        if self.model.merge_policy == "budget":
            self.log("train/budget_step", float(policy == "budget"), batch_size=bs)
        # The first steps of each logging window, one per K of a mixed entry: at step % N == 0 alone, [2, 4]
        # would only ever watch K=2's encoder (K=4 trains on odd steps).
        mixed = len(self.trainer.datamodule.current_ks(self.model.ks[-1]))
        if k > 1 and self.model.compressor.uses_encoder and step % max(self.trainer.log_every_n_steps, 1) < mixed:
            self._watch_encoder(prompt_ids, k, bs, kept)
        self._tokens = (k, int(b.prompt_tokens.sum()), int(b.merged_tokens.sum()), bs)
        return loss

    def train_policy(self, step: int, k: int) -> str:
        """The merge policy of training step `step` at K: with merge_policy=budget, each K > 1 step is a budget step
        with probability budget_share, drawn from the step number alone (so a resumed run repeats it, and a
        mixed K schedule, whose K alternates with the step, gets budget steps at every K), else fixed."""
        if self.model.merge_policy != "budget" or k == 1:
            return "fixed"
        return "budget" if step_draw(step) < self.hparams.get("budget_share", 0.5) else "fixed"

    def _distillation(self, k: int, b, pred: torch.Tensor, states: torch.Tensor | None, hidden: str | None, prompt_ids, target_ids,
                      unscored, kept, policy: str = "fixed") -> dict[str, tuple[float, torch.Tensor]]:
        """{log name: (weight, loss term)} of the distillation losses that are on, against the teacher reading the
        same examples uncompressed (model.distill_teacher)."""
        hp = self.hparams
        if self._teacher:  # a trained model of its own, read at K=1 with its (merged) adapters
            teacher, teacher_states = self._teacher[0].teacher_outputs(prompt_ids, target_ids, unscored, kept, "k1", hidden)
        else:
            teacher, teacher_states = self.model.teacher_outputs(prompt_ids, target_ids, unscored, kept, hp.get("distill_teacher", "base"), hidden)
        terms = {}
        if hp.distill_weight > 0:
            terms["distill_kl"] = (hp.distill_weight, distill_kl(pred, teacher, b.targets, hp.get("distill_temperature", 1.0)))
        if hidden == "targets":
            scored = b.targets != -100
            terms["distill_hidden"] = (hp.distill_hidden_weight, hidden_gap(states[:, scored], teacher_states[:, scored]))
        elif hidden == "all":
            mine, theirs = self.model.aligned_positions(prompt_ids, k, [len(t) for t in target_ids], kept, states.shape[2], teacher_states.shape[2],
                                                        policy)
            terms["distill_hidden"] = (hp.distill_hidden_weight,
                                       hidden_gap(states[:, mine[:, 0], mine[:, 1]], teacher_states[:, theirs[:, 0], theirs[:, 1]]))
        return terms

    def _watch_encoder(self, prompt_ids: list[list[int]], k: int, bs: int, kept: list[int] | None = None) -> None:
        """Log how far the K encoder has moved from the plain mean; warn once if it is diverging.

        At lr 1e-3 the paper-sized K=4 encoder's correction grew to ~200x the block mean within a few
        hundred steps on tree and K=4 stayed at chance; at 1e-4 it stayed below 1 and K=4 learned.
        """
        ratio = self.model.correction_ratio(prompt_ids, k, kept)
        self.log(f"train/k{k}/encoder_correction_ratio", ratio, batch_size=bs)
        seen = self.encoder_watch.setdefault(k, {"max_correction_ratio": ratio, "step": self.global_step, "warned": False})
        if ratio > seen["max_correction_ratio"]:
            seen.update(max_correction_ratio=ratio, step=self.global_step)
        if ratio > DIVERGING_ENCODER and not seen["warned"]:
            seen["warned"] = True
            log.warning("the K=%d merge encoder's learned correction is %.0fx the mean of its tokens "
                        "(train/k%d/encoder_correction_ratio): it is diverging and K=%d will likely stay at chance; "
                        "set model.encoder_bound (e.g. 1.0) or lower model.lr_encoder for it (e.g. {..., %d: 1.0e-4})", k, ratio, k, k, k)

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        labels = None
        if self.task == "classification":
            labels = torch.tensor([self.labels.index(y) for y in batch["labels"]], device=self.device)
        prompt_ids, target_ids, unscored, kept = self._token_ids(batch)  # once for every K (and the bare base)
        for k in self.eval_ks:
            b = self.model.build_batch(prompt_ids, k, target_ids, unscored, kept)
            nll, counts, answer_logits = self.model.target_nll(b)
            preds = scores = None
            if labels is not None:
                label_logits = answer_logits[:, self._label_ids]
                preds, scores = label_logits.argmax(-1), label_logits.float().softmax(-1)  # scores: for the ROC AUC
            self.metrics[split][str(k)].update(nll, counts, b.prompt_tokens, b.merged_tokens, preds, labels, b.adapted_tokens, scores)
        if "base" in self.metrics[split]:  # the bare base on the uncompressed prompt: what merging is measured against
            b = self.model.build_batch(prompt_ids, 1, target_ids, unscored, kept)
            with self.model.bare_base():
                nll, counts, _ = self.model.target_nll(b)
            self.metrics[split]["base"].update(nll, counts, b.prompt_tokens, b.merged_tokens, None, None)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, split: str) -> dict[int, dict[str, float]]:
        per_k = {k: self.metrics[split][str(k)].compute() for k in self.eval_ks}
        if "base" in self.metrics[split]:
            base = float(self.metrics[split]["base"].compute()["perplexity"])
            for values in per_k.values():
                values["perplexity_base"], values["perplexity_vs_base"] = base, values["perplexity"] / base
        for m in self.metrics[split].values():
            m.reset()
        if self.task == "perplexity":
            add_perplexity_f1(per_k)
        dm = self.trainer.datamodule
        # Lightning's logger only while fitting: `ktm test`/`validate` start at step 0, so RunOutputs writes their
        # numbers (these names, from callback_metrics) at the step of the checkpoint they evaluate.
        fitting = self.trainer.state.fn == "fit"
        for k, values in per_k.items():
            for name, value in values.items():
                self.log(f"{split}/k{k}/{name}", value, sync_dist=False, rank_zero_only=True, logger=fitting)
            for name in ("accuracy", "balanced_accuracy", "perplexity", "pl_f1"):
                if name in values and len(dm.stages) > 1:  # the same numbers tagged by data stage, to compare stages
                    self.log(f"{split}_stage/{dm.stage}/k{k}/{name}", values[name], rank_zero_only=True, logger=fitting)
        if split == "val":  # one number for every K, to select one checkpoint for all of them (checkpoint.monitor)
            for name in SELECTABLE:
                if all(name in values for values in per_k.values()):
                    mean = sum(values[name] for values in per_k.values()) / len(per_k)
                    self.log(f"val/kmean/{name}", mean, rank_zero_only=True, logger=fitting)
        self.results[split] = per_k
        return per_k

    def on_validation_epoch_end(self) -> None:
        per_k = self._eval_epoch_end("val")
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        dm = self.trainer.datamodule
        k = self.current_k()
        reference = per_k.get(k) or per_k[max(per_k)]
        for event in dm.after_validation(reference, k):
            log.info("curriculum: %s", event)
        self.log("curriculum/stage", float(dm.stage_index), rank_zero_only=True)
        if dm.finished:
            self.trainer.should_stop = True

    def on_test_epoch_end(self) -> None:
        per_k = self._eval_epoch_end("test")
        n = self.hparams.generate_eval_examples
        if n > 0:
            examples = self.trainer.datamodule.eval_examples("test")[:n]
            for k in self.eval_ks:
                # outside test_step, so in the precision context by hand: under bf16-mixed the frozen linears are bf16
                with self.trainer.precision_plugin.forward_context():
                    scores = generation_scores(self.model, examples, k, self.hparams.generate_max_new_tokens)
                per_k[k].update(scores)
                for name, value in scores.items():  # to the logger by RunOutputs, as the other test numbers
                    self.log(f"test/k{k}/{name}", value, rank_zero_only=True, logger=False)

    # -- optimisation ----------------------------------------------------------------------------
    def _configured_lrs(self) -> dict[str, float]:
        """The configured learning rate of each optimizer group, by group name (before warm-up/decay; the LoRA
        group's is the largest per-K lr, its per-step lr is set in on_train_batch_start)."""
        lrs = {"lora": max(self._lora_lrs.values()) if self._lora_lrs else self.hparams.lr_lora}
        if self._encoder_lrs:  # one group per K (one lr keeps the single group older checkpoints have)
            lrs.update({f"encoder_k{k}": lr for k, lr in self._encoder_lrs.items()})
        else:
            lrs["encoder"] = self.hparams.lr_encoder
        return lrs

    def configure_optimizers(self):
        groups = self.model.trainable_parameters()
        lrs = self._configured_lrs()
        param_groups = [{"params": groups["lora"], "lr": lrs["lora"], "name": "lora"}]
        if self._encoder_lrs:
            param_groups += [{"params": list(self.model.encoders[str(k)].parameters()), "lr": lrs[f"encoder_k{k}"], "name": f"encoder_k{k}"}
                             for k in sorted(self._encoder_lrs) if k in self.model.ks]
        else:
            param_groups.append({"params": groups["encoder"], "lr": lrs["encoder"], "name": "encoder"})
        param_groups = [g for g in param_groups if g["params"]]
        if not param_groups:
            raise KTMError("nothing to train: LoRA is off (r=0) and model.ks has no K > 1", "enable LoRA or add a K > 1")
        # fused_adamw: one kernel over all tensors, where torch's CPU default loops over the ~430 parameters in Python
        fused = bool(self.hparams.get("fused_adamw"))
        opt = torch.optim.AdamW(param_groups, weight_decay=self.hparams.weight_decay, fused=True if fused else None)
        if fused:  # it says it can unscale AMP gradients itself, and Lightning then refuses gradient clipping even in
            opt._step_supports_amp_scaling = False  # bf16 (no scaler); without the claim a GradScaler unscales first
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.lr_factor_at(step))  # a function: LambdaLR saves no state for it
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_factor_at(self, step: int) -> float:
        """The factor on every group's learning rate at optimizer step `step` (warm-up and decay)."""
        return lr_factor(step, self.hparams.warmup_steps, self.planned_steps(), self.hparams.get("lr_decay_share", 0.0))

    def planned_steps(self) -> float:
        """Optimizer steps this fit is set to run: trainer.max_steps or max_epochs x batches per epoch, the
        smaller (inf before the training data is set up, or when neither bounds the fit)."""
        t = self._trainer
        if t is None:
            return math.inf
        by_steps = t.max_steps if t.max_steps not in (None, -1) else math.inf
        per_epoch = t.num_training_batches / max(t.accumulate_grad_batches, 1)
        by_epochs = t.max_epochs * math.ceil(per_epoch) if t.max_epochs not in (None, -1) and math.isfinite(per_epoch) else math.inf
        return min(by_steps, by_epochs)

    # -- checkpoints: trainable weights only + what they were trained with ---------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {n: t for n, t in checkpoint["state_dict"].items() if n in trainable}
        checkpoint["ktm"] = self.model.metadata()
        checkpoint["ktm_counts"] = {"truncated_prompts": self.model.truncated_prompts}  # so a resumed run keeps counting
        checkpoint["ktm_k_entry"] = self._k_entry  # a resumed epoch is not a K change
        checkpoint["ktm_encoder_watch"] = self.encoder_watch  # a resumed run keeps its largest ratio and its warning
        checkpoint["ktm_val"] = self.results.get("val")  # the validation this state scored (a selected checkpoint reports it)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("ktm")
        if saved is None:
            raise KTMError("this checkpoint was not written by ktm (no 'ktm' metadata)", "resume from a checkpoints/<exp>/<run>/checkpoints/*.ckpt file")
        mismatch = checkpoint_mismatch(saved, self.model.metadata())
        if mismatch:
            key, theirs, mine = mismatch
            raise KTMError(f"checkpoint was trained with {key}={str(theirs)[:40]}, this run has {str(mine)[:40]}",
                           "resume with the run's own config (checkpoints/<exp>/<run>/config.yaml)")
        self.model.truncated_prompts = checkpoint.get("ktm_counts", {}).get("truncated_prompts", 0)
        self._k_entry = checkpoint.get("ktm_k_entry")
        self.encoder_watch = {int(k): dict(v) for k, v in checkpoint.get("ktm_encoder_watch", {}).items()}
        self.trained_step = checkpoint.get("global_step")  # `ktm test` logs at it (its own trainer is at step 0)


# What a checkpoint must share with the run that loads it: the settings that shape the trained weights, and
# the base weights themselves. Compared where the checkpoint records them: the CLI compares the config with the
# checkpoint's hyper_parameters before loading it (they hold no fingerprint), on_load_checkpoint the model
# with its `ktm` metadata. Checkpoints from before a setting existed lack it; they had the value in ktm.model's
# UNRECORDED (a run's side without the key, e.g. a config from before it, counts the same).
CKPT_MUST_MATCH = ("base", "base_fingerprint", "hidden_size", "ks", "keep_tail", "keep_marked", "encoder_multiplier", "encoder_bound", "encoder_shape",
                   "compressor", "lora")


def checkpoint_mismatch(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """(key, the checkpoint's value, this run's value) for the first key of CKPT_MUST_MATCH on which they differ,
    None when the checkpoint fits. K values compare as a set, LoRA settings by the shapes they give."""
    mine = mine.as_dict() if hasattr(mine, "as_dict") else mine  # the CLI passes the parsed config, a Namespace
    saved, mine = with_unrecorded(saved), with_unrecorded(mine)
    for key in CKPT_MUST_MATCH:
        if key not in saved:
            continue
        theirs, ours = _comparable(key, saved[key]), _comparable(key, mine.get(key))
        if theirs != ours and not (key == "lora" and _same_lora_layers(mine.get("base") or saved.get("base"), theirs, ours)):
            return key, theirs, ours
    return None


def _same_lora_layers(base: Any, theirs: Any, ours: Any) -> bool:
    """Two target spellings that adapt the same layers fit (a checkpoint's [q_proj, ..., lm_head] and today's
    default [all-linear, lm_head] on SmolLM2). Unknown when the base's config cannot be read: then they differ."""
    if not (base and theirs and ours) or theirs.get("r") != ours.get("r"):
        return False
    try:
        return same_lora_targets(base, theirs["target_modules"], ours["target_modules"])
    except (KTMError, OSError):
        return False


def _comparable(key: str, value: Any) -> Any:
    if key == "ks" and value is not None:
        return sorted(set(value))
    if key == "lora" and value is not None:
        d = value if isinstance(value, dict) else (value.as_dict() if hasattr(value, "as_dict") else vars(value))
        return {k: d.get(k) for k in ("r", "target_modules")}  # alpha/dropout do not change the weights' shapes
    return value


def distills(hp) -> bool:
    """Whether a fit adds distillation terms to its K > 1 steps (the KL, the hidden-state match or both)."""
    return hp.distill_weight > 0 or hp.get("distill_hidden_weight", 0) > 0


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over scored target positions of KL(teacher || student) between next-token distributions, both
    softened by the temperature T and scaled by T^2 (Hinton et al., 2015: a confident teacher's other tokens
    then weigh, and the gradient keeps its size)."""
    mask = targets != -100
    t = torch.log_softmax(teacher[mask] / temperature, -1)
    s = torch.log_softmax(student[mask] / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2 if mask.any() else student.sum() * 0


def hidden_gap(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over layers and positions of |h_s - h_t|^2 / |h_t|^2, states (layers, N, d) matched position by
    position. Relative, so a layer or position whose residual stream is large does not outweigh the others."""
    if student.shape[1] == 0:
        return student.sum() * 0
    s, t = student.float(), teacher.float()
    return ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-12)).mean()


def _draw(key: str) -> float:
    """A number in [0, 1) fixed by `key` (blake2b), independent of any seeded generator."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


def step_draw(step: int) -> float:
    """A number in [0, 1) fixed by the step number: whether a step is a budget-policy step."""
    return _draw(f"budget:{step}")


def phase_shifts(step: int, rows: int, k: int) -> list[int]:
    """For each row of a K training step, how many more last prompt tokens stay in tokens (phase_jitter): 0..K-1,
    fixed by the step and the row, so a resumed run repeats them."""
    return [int(_draw(f"phase:{step}:{row}") * k) for row in range(rows)]


def lr_factor(step: int, warmup_steps: int, planned_steps: float = math.inf, decay_share: float = 0.0) -> float:
    """The lr factor of optimizer step `step` (0-based): linear warm-up over `warmup_steps`, then 1, then with
    `decay_share` > 0 a linear fall over the last decay_share x planned_steps steps, reaching 0 at planned_steps
    (the last planned step still trains, at 1/decay steps of the lr)."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay_share > 0 and math.isfinite(planned_steps):
        factor = min(factor, max(0.0, (planned_steps - step) / (decay_share * planned_steps)))
    return factor


def _per_k(values: dict, name: str) -> dict[int, Any]:
    """{K: value} with whole-number keys; a saved config.yaml writes them as strings ('4': 1.0e-4)."""
    out = {}
    for key, value in values.items():
        if isinstance(key, bool) or not str(key).isdigit() or int(key) < 1:
            raise KTMError(f"model.{name} has the key {key!r}, not a K", "write it as {2: 1.0e-3, 4: 1.0e-4}")
        out[int(key)] = value
    return out


def line_similarity(a: str, b: str) -> float:
    """Line-level edit similarity in [0, 1]: difflib's ratio over the two files' lines."""
    import difflib

    return difflib.SequenceMatcher(None, a.splitlines(), b.splitlines(), autojunk=False).ratio()


@torch.no_grad()
def generation_scores(model: KTMModel, examples, k: int, max_new_tokens: int, batch_size: int = 4) -> dict[str, float]:
    """Greedy generation from the merged prompt: exact match and mean line similarity to the target."""
    was_training = model.training
    model.eval()
    exact, similarity = 0, 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = model.example_prompts([e.prompt for e in chunk], [e.keep for e in chunk])  # as trained and scored
        outputs = model.generate(prompts, k=k, max_new_tokens=max_new_tokens)
        for e, out in zip(chunk, outputs):
            exact += int(out.strip() == e.target.strip())
            similarity += line_similarity(out, e.target)
    model.train(was_training)
    n = max(len(examples), 1)
    return {"generated": float(len(examples)), "exact_match": exact / n, "line_similarity": similarity / n}
