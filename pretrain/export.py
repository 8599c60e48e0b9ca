"""`pretrain export RUN_DIR OUT_DIR [--step N]`: a checkpoint -> a `transformers` directory, proven to load.

Reads only `model.safetensors` (full weights under our names, written by rank 0 for every engine, so ZeRO-3
and FSDP shards are already consolidated) and the run's tokenizer; converts with `models.to_hf`; saves with
`save_pretrained`; reloads with the Auto classes and compares logits with our model before reporting success.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pretrain.checkpoint import check_fits, find_checkpoint, state_dict_shapes, step_of
from pretrain.components import TOKENIZER_DIR, build_model
from pretrain.config import RunConfig, export_problem, load_config
from pretrain.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from models.base import LanguageModel
    from models.config import ModelConfig

MODEL_INPUTS = {
    "gpt": ("input_ids", "attention_mask"),
    "bert": ("input_ids", "token_type_ids", "attention_mask"),
    "t5": ("input_ids", "attention_mask"),
}
AUTO_CLASSES = {
    "gpt": "AutoModelForCausalLM", "bert": "AutoModelForMaskedLM", "t5": "AutoModelForSeq2SeqLM",
    "vit_mae": "AutoModelForPreTraining", "vit_simmim": "AutoModelForMaskedImageModeling",
    "swin": "AutoModelForMaskedImageModeling", "conformer": "AutoModel",
}  # fmt: skip
# what the exported directory's preprocessing loads through: the tokenizer, or the image / audio processor
PROCESSOR_CLASSES = {"image": "AutoImageProcessor", "audio": "AutoFeatureExtractor"}
PARITY_ATOL = 1e-4
_SAMPLE = "The quick brown fox jumps over the lazy dog. Pretraining turns text into weights."


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    out_dir: Path
    step: int
    family: str
    max_logit_diff: float


def read_run_config(run_dir: Path) -> RunConfig:
    """The resolved config a run saved (no data or engine checks: export needs neither)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} is not a run directory (no config.yaml); give the run.dir of a training run"
        )
    try:
        return load_config(path, check_files=False)
    except ConfigError as e:
        raise ConfigError(f"{path} is not a valid run config: {e}") from None


def load_run_model(
    run_dir: Path, cfg: RunConfig, *, step: int | None = None
) -> tuple[LanguageModel, PreTrainedTokenizerFast | None, Path]:
    """A checkpoint's model (eval mode, on CPU), the run's tokenizer (None for image and speech models) and
    the checkpoint read (newest intact)."""
    import transformers
    from safetensors.torch import load_file

    checkpoint = find_checkpoint(run_dir / "checkpoints", step)
    tokenizer = None
    if cfg.modality is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / TOKENIZER_DIR)
    model = build_model(cfg.model, tokenizer, init=False)
    weights = checkpoint / "model.safetensors"
    fix = (
        f"the model in {run_dir / 'config.yaml'} is not the one that was trained (a preset's defaults may have "
        "changed since: set the differing field there)"
    )
    check_fits(weights, state_dict_shapes(model), fix=fix)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), tokenizer, checkpoint


def export(run_dir: Path, out_dir: Path, *, step: int | None = None) -> ExportResult:
    """Write OUT_DIR (config.json, model.safetensors, tokenizer files) and check that transformers reproduces us."""
    import transformers

    from models import to_hf

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg = read_run_config(run_dir)
    problem = export_problem(cfg.model.config)
    if problem is not None:  # dropout only acts in training: the weights are the same for any value
        raise ConfigError(
            f"export: {run_dir} cannot be converted to transformers: {problem}; dropout does not change "
            f"trained weights, so set both to one value in {run_dir / 'config.yaml'} and export again"
        )
    model, tokenizer, checkpoint = load_run_model(run_dir, cfg, step=step)
    # Written beside OUT_DIR and renamed once it checks out, so a failed export leaves no half-written directory.
    staging = out_dir.with_name(f".{out_dir.name}.export-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        family = cfg.model.family
        hf_model = to_hf(model)
        if hf_model.can_generate():
            hf_model.generation_config = generation_config(model.config)
        hf_model.save_pretrained(staging, safe_serialization=True)
        reloaded = getattr(transformers, AUTO_CLASSES[family]).from_pretrained(staging).eval()
        if cfg.modality is None:
            complete_tokenizer(tokenizer, cfg).save_pretrained(staging)
            reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(staging)
            diff = logit_difference(model, reloaded, reloaded_tokenizer, family)
        else:
            media_processor(cfg).save_pretrained(staging)
            processor = getattr(transformers, PROCESSOR_CLASSES[cfg.modality]).from_pretrained(staging)
            diff = media_output_difference(model, reloaded, processor, cfg)
        if not diff <= PARITY_ATOL:
            raise RuntimeError(
                f"export: {out_dir} does not reproduce the checkpoint (max |logit diff| {diff:.3g})"
            )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    result = ExportResult(out_dir=out_dir, step=step_of(checkpoint), family=family, max_logit_diff=diff)
    preprocessing = "AutoTokenizer" if cfg.modality is None else PROCESSOR_CLASSES[cfg.modality]
    print(
        f"exported {checkpoint} -> {out_dir} ({AUTO_CLASSES[family]} + {preprocessing} load it; "
        f"max |logit diff| {diff:.2e})"
    )
    return result


def generation_config(config: ModelConfig) -> GenerationConfig:
    """What `generate` and the pipelines need: the family's special ids (GPT pads with its pad token, often EOS;
    T5 starts decoding with its decoder start token)."""
    from transformers import GenerationConfig

    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return GenerationConfig(**{name: getattr(config, name) for name in ids if hasattr(config, name)})


def complete_tokenizer(tokenizer: PreTrainedTokenizerFast, cfg: RunConfig) -> PreTrainedTokenizerFast:
    """The run's tokenizer as users of the exported model need it: `model_max_length` = the model's positions
    (T5: the trained sequence length), the inputs the model takes, and for GPT left truncation, so that a
    prompt longer than the context keeps its end, from which generation continues."""
    family = cfg.model.family
    tokenizer.model_max_length = cfg.model.config.max_seq_len or cfg.data.seq_len
    tokenizer.model_input_names = list(MODEL_INPUTS[family])
    tokenizer.init_kwargs["model_input_names"] = list(MODEL_INPUTS[family])
    if family == "gpt":
        tokenizer.truncation_side = "left"
        tokenizer.init_kwargs["truncation_side"] = "left"
    return tokenizer


@torch.no_grad()
def logit_difference(ours: torch.nn.Module, theirs: torch.nn.Module, tokenizer, family: str) -> float:
    """Max |logit| difference on a sample sentence, tokenised by the exported tokenizer."""
    ids = tokenizer(_SAMPLE, return_tensors="pt")["input_ids"]
    max_len = ours.config.max_seq_len
    if max_len:  # learned positions: stay inside the table
        ids = ids[:, :max_len]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)
    return (ours(**inputs).logits - theirs(**inputs).logits).abs().max().item()


def media_processor(cfg: RunConfig) -> Any:
    """What turns raw images or audio into the exported model's inputs, as our data pipeline prepares them:
    an image resized to the model's size and normalised with the pipeline's mean and std (ImageNet's for RGB,
    0.5 for gray; data/media_objectives.py `to_pixels`), or mono audio at the model's sample rate normalised
    to zero mean and unit variance (the BEST-RQ input normalisation)."""
    from transformers import ViTImageProcessor, Wav2Vec2FeatureExtractor

    from data.media_objectives import IMAGENET_MEAN, IMAGENET_STD

    model = cfg.model.config
    if cfg.modality == "audio":
        return Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=model.sample_rate,
            padding_value=0.0,
            do_normalize=True,
            return_attention_mask=True,
        )
    rgb = model.num_channels == 3
    return ViTImageProcessor(
        do_resize=True,
        size={"height": model.image_size, "width": model.image_size},
        resample=3,  # bicubic, as the pipeline resizes
        do_rescale=True,
        do_normalize=True,
        image_mean=IMAGENET_MEAN.tolist() if rgb else [0.5],
        image_std=IMAGENET_STD.tolist() if rgb else [0.5],
    )


@torch.no_grad()
def media_output_difference(
    ours: torch.nn.Module, theirs: torch.nn.Module, processor: Any, cfg: RunConfig
) -> float:
    """Max |output| difference on two builtin samples prepared by the exported processor: the predicted pixels
    (MAE, with fixed noise), the reconstruction (SimMIM, with a fixed mask), or the encoder output (Conformer)."""
    import numpy as np

    from data.media import builtin_audio, builtin_image

    model = cfg.model.config
    generator = torch.Generator().manual_seed(0)
    if cfg.modality == "audio":
        clips = [builtin_audio(i, model.sample_rate)[0] for i in range(2)]
        inputs = processor(clips, sampling_rate=model.sample_rate, return_tensors="pt")
        values = inputs["input_values"]
        return (ours.features(values) - theirs(input_values=values).last_hidden_state).abs().max().item()
    images = [builtin_image(i)[0] for i in range(2)]
    if model.num_channels == 1:
        images = [image.mean(-1).round().astype(np.uint8) for image in images]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    patches = (model.image_size // model.patch_size) ** 2
    if cfg.model.family == "vit_mae":
        noise = torch.rand(2, patches, generator=generator)
        return (
            (ours(pixels, noise).logits - theirs(pixel_values=pixels, noise=noise).logits).abs().max().item()
        )
    masked = torch.rand(2, patches, generator=generator) < 0.5
    reconstruction = theirs(pixel_values=pixels, bool_masked_pos=masked).reconstruction
    return (ours(pixels, masked).logits - reconstruction).abs().max().item()
