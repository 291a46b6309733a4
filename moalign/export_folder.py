"""A trained policy as folders other tools load as they are.

    <dest>/                 merged Hugging Face model (safetensors, config, tokenizer, chat template)
    <dest>/moalign.json     the policy card: objectives in order and how training wrote the weights
    <dest>/adapter/         with LoRA: a PEFT adapter folder (`PeftModel.from_pretrained(base, it)`)

Folders are written beside the destination and published by one rename, so a crash leaves
the previous export or none, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from moalign.conditioning import (
    BEGIN,
    END,
    TOKEN_STYLES,
    Style,
    WeightsError,
    check_weights,
    condition_chat,
    control_token_vocabulary,
    weight_signal,
)

CARD_FILE = "moalign.json"
ADAPTER_DIR = "adapter"
CARD_FORMAT = "moalign-policy/1"
# Shards of this size keep any one file loadable without mapping the whole model at once.
SHARD_BYTES = 2 << 30


class PolicyCard(BaseModel):
    """What `moalign.json` says: whoever serves the model writes the weights exactly as training did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["moalign-policy/1"] = CARD_FORMAT
    """Card schema version."""
    objectives: list[str] = Field(min_length=1)
    """Objective names, in the order the weight line writes them."""
    style: Literal[Style, "none"]
    """How the weights reach the policy: the text line as the system message (`chat_system`) or before the user turn (`system_prefix`), or one added control token per objective opening the answer (`control_tokens`) or as the system message (`control_tokens_system`), listed in `control_tokens`; `none`: an offline policy (MODPO, MOPO) trained at fixed weights, whose prompts carry none."""
    decimals: int = Field(ge=0, le=6)
    """Digits each written weight is rounded to."""
    instruction_begin: str = BEGIN
    """Text that opens the weight line."""
    instruction_end: str = END
    """Text that closes the weight line."""
    example_line: str
    """What the prompt carries for equal weights (the text line, or the control tokens), for a reader to see the format."""
    control_tokens: list[str] = []
    """`control_tokens` style: the added tokens, one per objective and weight bin, in id order (also in control_tokens.json beside the weights, with their ids)."""
    default_weights: list[float]
    """Weights used when a request names none: equal weights; for an offline policy, the weights it was trained at."""
    base_model: str
    """The model the policy was trained from (`model.path` of the run)."""
    algorithm: str
    """The training algorithm."""
    step: int = Field(ge=0)
    """Learner step of the exported checkpoint."""
    dtype: str
    """Parameter dtype of the exported weights."""
    max_prompt_tokens: int = Field(ge=1)
    """Longest conditioned prompt the policy was trained on, in tokens."""
    adapter_base: str | None = None
    """The model folder the adapter (`adapter/`) applies to: `base_model` resolved, or with control tokens the run's copy with them added (RUN_DIR/base_model)."""

    @classmethod
    def from_run(cls, cfg: Any, step: int) -> PolicyCard:
        names = list(cfg.objective_names)
        equal = [1.0 / len(names)] * len(names)
        offline = cfg.is_offline
        trained = cfg.offline_weights if offline else equal
        style, decimals = cfg.conditioning.style, cfg.conditioning.decimals
        return cls(
            objectives=names,
            style="none" if offline else style,
            decimals=decimals,
            example_line="" if offline else weight_signal(names, equal, style, decimals),
            control_tokens=control_token_vocabulary(names, decimals) if style in TOKEN_STYLES else [],
            default_weights=trained,
            base_model=cfg.model.path,
            algorithm=cfg.algorithm.name,
            step=step,
            dtype=cfg.model.dtype,
            max_prompt_tokens=cfg.model.max_prompt_tokens,
        )

    @classmethod
    def read(cls, folder: str | os.PathLike) -> PolicyCard:
        path = Path(folder) / CARD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {CARD_FILE}; export the run first (make export RUN=<run dir>)")
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not a valid policy card: {exc}") from exc

    def weights(self, requested: Mapping[str, float] | None, atol: float = 1e-3) -> np.ndarray:
        """The weight vector for a request: objectives it leaves out weigh 0; none at all means
        the default. Unknown names, negative weights or a sum other than 1 are a WeightsError."""
        if requested is None:
            return np.asarray(self.default_weights, dtype=float)
        if self.style == "none":
            raise WeightsError(
                f"this policy was trained by {self.algorithm} at fixed weights {self.default_weights} and takes none; "
                "leave objective_weights out (or serve a steerable MO-ODPO policy)"
            )
        unknown = sorted(set(requested) - set(self.objectives))
        if unknown:
            raise WeightsError(f"unknown objective(s) {unknown}; this model's objectives are {self.objectives}")
        values = [float(requested.get(name, 0.0)) for name in self.objectives]
        negative = [name for name, v in zip(self.objectives, values) if v < 0]
        if negative:
            raise WeightsError(f"weights must be >= 0; negative for {negative}")
        return check_weights(values, len(self.objectives), atol=atol)

    def condition(self, messages: Sequence[dict[str, str]], weights: np.ndarray) -> list[dict[str, str]]:
        if self.style == "none":
            return [dict(m) for m in messages]
        return condition_chat(messages, self.objectives, weights, self.style, self.decimals)


def publish_folder(dest: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a fresh folder beside `dest`, then swap it in by rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        write(tmp)
        _readable(tmp)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _readable(root: Path) -> None:
    # mkdtemp makes the folder private and safetensors writes files 0600; an export is meant to
    # be read by other users and by serving processes, under the caller's umask.
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_safetensors(folder: Path, named: Sequence[tuple[str, Any]], shard_bytes: int = SHARD_BYTES) -> list[str]:
    """One `model.safetensors`, or shards plus the index Hugging Face loaders read."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        files.append(fname)
        for name, tensor in shard.items():
            weight_map[name] = fname
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return files


def write_model_folder(folder: Path, named: Sequence[tuple[str, Any]], base_model_dir: str | os.PathLike, dtype: str) -> None:
    """The merged policy: weights under the base checkpoint's names, the base's config (with the
    exported dtype), generation config, tokenizer and chat template."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from moalign.control_tokens import read_manifest, write_manifest

    write_safetensors(folder, named)
    config = AutoConfig.from_pretrained(base_model_dir)
    config.dtype = dtype
    config.save_pretrained(folder)
    try:
        GenerationConfig.from_pretrained(base_model_dir).save_pretrained(folder)
    except OSError:
        pass  # the base has no generation_config.json; loaders fall back to the model config
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{base_model_dir}: the tokenizer has no chat template; the weight line cannot be written without one")
    tokenizer.save_pretrained(folder)
    control = read_manifest(base_model_dir)
    if control is not None:
        write_manifest(folder, control)


def add_adapter_token_rows(adapter_dir: Path, module: str, first_id: int, rows: Any) -> None:
    """Trained control-token rows into a PEFT adapter folder, in PEFT's own trainable-tokens form
    (`trainable_token_indices`), so `PeftModel.from_pretrained(base, adapter_dir)` on the base
    with the tokens added restores them: LoRA layers and rows alike."""
    from safetensors.torch import load_file, save_file

    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["trainable_token_indices"] = {module.rsplit(".", 1)[-1]: list(range(first_id, first_id + rows.shape[0]))}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights_path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights_path))
    tensors[f"base_model.model.{module}.token_adapter.trainable_tokens_delta"] = rows.contiguous()
    save_file(tensors, str(weights_path), metadata={"format": "pt"})


def write_card(folder: Path, card: PolicyCard) -> None:
    (folder / CARD_FILE).write_text(card.model_dump_json(indent=1) + "\n")
