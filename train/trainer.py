"""The training loop of ``python -m train`` on accelerate: one GPU, DDP, FSDP or DeepSpeed, as launched.

Per optimizer step: ``gradient_accumulation_steps`` micro-batches through :func:`train.step.training_losses`, an
optimizer step, a scheduler step; then logging, checkpoints and validation on schedule. At the end the trained
weights are exported (kohya LoRA or BFL DiT) with the timestep-embedding variant in their metadata.
"""

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from e2p_core.backends.diffusers_backend import DiffusersCodec, DiffusersDenoiser, build_vae
from e2p_core.checkpoints import write_atomically
from e2p_core.errors import InputError
from e2p_core.prompts import PromptEmbeddings, cached_prompt_embeddings, load_prompt_embeddings
from e2p_core.tasks import get_task
from e2p_core.weights import load_dit, load_vae

from .batches import micro_batches
from .checkpoint import complete_checkpoints, load_checkpoint, register_trainable_hooks, save_checkpoint
from .config import TrainConfig
from .data import MixedBatchSampler, build_dataset
from .model import (
    add_lora,
    build_trainable_transformer,
    export_full,
    export_lora,
    export_metadata,
    make_full_trainable,
)
from .step import ObjectiveConfig, training_losses
from .validation import validate

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    transformer: torch.nn.Module  # the trained DiT (unwrapped; LoRA injected in LoRA mode)
    codec: DiffusersCodec
    prompt: PromptEmbeddings
    step: int
    export_path: Path | None  # None on processes other than the main one


def export_file_name(config: TrainConfig) -> str:
    return f"{config.task}_lora.safetensors" if config.mode == "lora" else f"{config.task}_bfl.safetensors"


def make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, **kwargs)
    try:
        import bitsandbytes  # optional: 8-bit optimizer states
    except ImportError:
        raise InputError("--optimizer adamw8bit needs bitsandbytes: `pip install bitsandbytes` (CUDA only), or use "
                         "--optimizer adamw") from None
    return bitsandbytes.optim.AdamW8bit(parameters, **kwargs)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    if config.lr_scheduler == "reference":
        return torch.optim.lr_scheduler.ConstantLR(optimizer)  # torch defaults: lr/3 for 5 steps, as the reference
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler == "constant" else "cosine"
    return get_scheduler(name, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=max_steps)


def load_prompt(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> PromptEmbeddings:
    if config.prompt_embeds:
        return load_prompt_embeddings(config.prompt_embeds).to(device, dtype)
    cache = Path(config.output_dir) / "prompt_cache"
    return cached_prompt_embeddings(get_task(config.task).prompt, config.text_encoders, cache, device, dtype)


class RunLog:
    """logs/metrics.jsonl (always) and TensorBoard (``--report-to tensorboard``), main process only.

    A resumed run first drops what the interrupted one logged after its checkpoint, so each step is logged once.
    """

    def __init__(self, config: TrainConfig, enabled: bool):
        self.enabled = enabled
        self.folder = Path(config.output_dir) / "logs"
        self.jsonl = self.folder / "metrics.jsonl"
        self.writer = None
        self.writer_class = None
        if enabled and config.report_to == "tensorboard":  # checked before any model is loaded
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("--report-to tensorboard needs the tensorboard package: `pip install tensorboard`, "
                                 "or pass --report-to none") from None
            self.writer_class = SummaryWriter

    def open(self, start_step: int) -> None:
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.jsonl.is_file():
            kept = [line for line in self.jsonl.read_text().splitlines() if _logged_step(line) <= start_step]
            write_atomically(self.jsonl, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))
        if self.writer_class is not None:
            self.writer = self.writer_class(str(self.folder / "tensorboard"), purge_step=start_step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def images(self, step: int, panels) -> None:
        if self.writer is not None:
            for i, panel in enumerate(panels):
                self.writer.add_image(f"validation/{i}", panel, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite (dropped on resume) for a line a kill cut short."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run as configured; returns the trained model and where it was exported."""
    config.validate()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              step_scheduler_with_optimizer=False)
    set_seed(config.seed)  # the LoRA init; identical on every process
    device = accelerator.device
    compute_dtype = _compute_dtype(config)
    log = RunLog(config, accelerator.is_main_process)
    transformer, codec = _build_models(config, device, compute_dtype)
    prompt = load_prompt(config, device, compute_dtype)

    size_hw = (config.height, config.width)
    specs = config.dataset_specs()
    datasets = [build_dataset(spec, config.task, size_hw, config.depth_space, config.binarize_alpha, config.seed)
                for spec in specs]
    sampler = MixedBatchSampler(datasets, [spec.ratio for spec in specs], config.batch_size, config.seed)
    world, accumulation = accelerator.num_processes, config.gradient_accumulation_steps
    steps_per_epoch = sampler.epoch_batches / (accumulation * world)  # optimizer steps; N_epoch of the λ ramp
    max_steps = config.max_steps if config.max_steps is not None else math.ceil(config.num_epochs * steps_per_epoch)
    validation_samples = _validation_samples(config, size_hw)
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:  # only once every input has been read: a typo leaves no run folder behind
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(config.to_json())

    parameters = [p for p in transformer.parameters() if p.requires_grad]
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # the DataLoader is not prepared: tell DeepSpeed
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    optimizer = make_optimizer(config, parameters)
    scheduler = make_scheduler(config, optimizer, max_steps)
    model, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    if accelerator.gradient_accumulation_steps != accumulation:  # DeepSpeed's own config wins in accelerate
        raise InputError(f"the accelerate config accumulates {accelerator.gradient_accumulation_steps} micro-batches, "
                         f"--gradient-accumulation-steps says {accumulation}; make them equal")
    register_trainable_hooks(accelerator)

    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + accelerator.process_index)  # timesteps
    step = _resume(accelerator, config, generator, accumulation * world)
    objective = ObjectiveConfig(config.task, config.objective, config.noise_seed, config.multi_res_noise,
                                config.lambda_start_epoch)
    denoiser = DiffusersDenoiser(model, compute_dtype, device)
    log.open(step)
    stream = micro_batches(sampler, step * accumulation * world, accelerator.process_index, world,
                           config.num_workers, pin_memory=device.type == "cuda")
    progress = tqdm(total=max_steps, initial=step, desc=f"train {config.task}", disable=not accelerator.is_main_process)
    while step < max_steps:
        means: dict[str, float] = {}  # losses averaged over the micro-batches of this step
        for _ in range(accumulation):
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    losses = training_losses(denoiser, codec, prompt, next(stream), objective, generator, step,
                                             steps_per_epoch)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    # FSDP computes the global norm only when handed all of the wrapped model's parameters
                    clipped = list(model.parameters()) if accelerator.distributed_type == DistributedType.FSDP \
                        else parameters
                    accelerator.clip_grad_norm_(clipped, config.max_grad_norm)
                optimizer.step()  # a no-op until the last micro-batch of the step
                optimizer.zero_grad(set_to_none=True)
            for key, value in losses.items():
                value = value.detach() if torch.is_tensor(value) else value
                means[key] = means.get(key, 0.0) + float(value) / accumulation
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{means['loss']:.4g}")
        if step % config.log_steps == 0 or step == max_steps:
            log.scalars(step, {**means, "lr": learning_rate, "epoch": step / steps_per_epoch})
        if step % config.checkpointing_steps == 0 or step == max_steps:
            save_checkpoint(accelerator, output_dir, step, {"micro_batch_position": step * accumulation * world},
                            generator, config.checkpoints_total_limit)
        if validation_samples and (step % config.validation_steps == 0 or step == max_steps):
            _run_validation(accelerator, model, codec, prompt, validation_samples, config, step, log)
    progress.close()

    export_path = _export(accelerator, model, config, step)
    log.close()
    accelerator.wait_for_everyone()
    return TrainResult(accelerator.unwrap_model(model), codec, prompt, step, export_path)


def _compute_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype of the frozen weights, the prompt and the DiT inputs: bf16 under bf16 mixed precision."""
    return torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32


def _build_models(config: TrainConfig, device: torch.device, compute_dtype: torch.dtype
                  ) -> tuple[torch.nn.Module, DiffusersCodec]:
    """The DiT with its trainable part (frozen base in the compute dtype) and the frozen VAE codec."""
    transformer = build_trainable_transformer(load_dit(config.base, config.base_config), config.time_embedding,
                                              compute_dtype, device)
    if config.trainable_dtype == "auto":  # a float32 LoRA; a full fine-tune in the compute dtype, as the reference
        trainable_dtype = torch.float32 if config.mode == "lora" else compute_dtype
    else:
        trainable_dtype = DTYPES[config.trainable_dtype]
    if config.mode == "lora":
        pairs = add_lora(transformer, config.lora_rank, config.lora_alpha, trainable_dtype)
        logger.info("LoRA rank %d on %d Linear layers", config.lora_rank, pairs)
    else:
        make_full_trainable(transformer, trainable_dtype)
    vae_weights = load_vae(config.vae, config.vae_config)
    vae = build_vae(vae_weights.state_dict_diffusers, vae_weights.architecture, compute_dtype, device)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()  # the decoder back-propagates the consistency loss
    return transformer.train(), DiffusersCodec(vae)


def _resume(accelerator: Accelerator, config: TrainConfig, generator: torch.Generator, batches_per_step: int) -> int:
    """Load the checkpoint ``--resume`` names, if any; the optimizer step to continue from."""
    folder = _resume_folder(config)
    if folder is None:
        return 0
    state = load_checkpoint(accelerator, folder, generator)
    step = state["step"]
    if state["micro_batch_position"] != step * batches_per_step:
        raise InputError(f"{folder} was saved with another gradient accumulation or number of processes (data "
                         f"position {state['micro_batch_position']} at step {step}); resume with the same")
    logger.info("resumed from %s at step %d", folder, step)
    return step


def _resume_folder(config: TrainConfig) -> Path | None:
    if config.resume == "none":
        return None
    if config.resume == "latest":
        found = complete_checkpoints(config.output_dir)
        return found[-1] if found else None
    folder = Path(config.resume)
    if not folder.is_dir():
        raise InputError(f"--resume {folder}: no such checkpoint folder")
    return folder


def _validation_samples(config: TrainConfig, size_hw: tuple[int, int]) -> list[dict]:
    samples: list[dict] = []
    for spec in config.dataset_specs(validation=True):
        dataset = build_dataset(spec, config.task, size_hw, config.depth_space, config.binarize_alpha, config.seed)
        samples += [dataset[i] for i in range(min(len(dataset), config.validation_samples - len(samples)))]
    return samples


def _run_validation(accelerator: Accelerator, model, codec, prompt, samples, config: TrainConfig, step: int,
                    log: RunLog) -> None:
    if accelerator.distributed_type == DistributedType.FSDP:
        logger.warning("validation is skipped under FSDP (the sharded DiT cannot run one-process inference)")
        return
    if accelerator.is_main_process:
        denoiser = DiffusersDenoiser(accelerator.unwrap_model(model), _compute_dtype(config), accelerator.device)
        with accelerator.autocast():
            metrics, panels = validate(denoiser, codec, prompt, samples, config.task, config.depth_space)
        log.scalars(step, {f"val/{key}": value for key, value in metrics.items()})
        log.images(step, panels)
    accelerator.wait_for_everyone()


def _export(accelerator: Accelerator, model, config: TrainConfig, step: int) -> Path | None:
    state_dict = accelerator.get_state_dict(model)  # gathers shards under FSDP / DeepSpeed ZeRO-3
    if not accelerator.is_main_process:
        return None
    path = Path(config.output_dir) / export_file_name(config)
    metadata = export_metadata(config.task, config.time_embedding, step)
    dtype = DTYPES[config.export_dtype]
    unwrapped = accelerator.unwrap_model(model)
    if config.mode == "lora":
        count = export_lora(unwrapped, path, dtype, metadata, state_dict)
    else:
        count = export_full(unwrapped, path, dtype, metadata, state_dict)
    logger.info("exported %d %s to %s", count, "LoRA pairs" if config.mode == "lora" else "tensors", path)
    return path
