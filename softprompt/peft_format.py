"""Prompt files to and from PEFT prompt-learning adapters (prompt tuning, P-tuning, prefix tuning).

PEFT (huggingface/peft, `utils/save_and_load.py`, `tuners/tuners_utils.BasePromptEncoder`) saves
every prompt-learning adapter as one tensor, `prompt_embeddings`, in `adapter_model.safetensors`,
next to `adapter_config.json`. The tensor is already collapsed (an encoder's or MLP's output), and
an adapter loaded with `inference_mode: true` uses it as is:

    PROMPT_TUNING, P_TUNING  (P, D)                  virtual-token embeddings    <-> Injection.embeds (P, D)
    PREFIX_TUNING            (P, L * 2 * H_kv * hd)  per token: layer 0 keys,     <-> Injection.kv (L, 2, H_kv, P, hd)
                                                     layer 0 values, layer 1 keys, ...; each (H_kv, hd)

(`PeftModel.get_prompt`: `view(B, P, 2L, H_kv, hd).permute(2, 0, 3, 1, 4).split(2)`; under grouped-
query attention PEFT sets `token_dim = H_kv * hd` and `num_attention_heads = H_kv`, as we write them.)
softprompt needs no PEFT to read or write these files; the tests check them against PEFT itself.

PEFT's task type follows the base model's family: CAUSAL_LM (causal LMs), SEQ_2_SEQ_LM
(`PeftModelForSeq2SeqLM`: T5, BART) and FEATURE_EXTRACTION (masked LMs: the wrapper that
prepends prompts to a BERT-style encoder). Two seq2seq conventions of PEFT:
- Prompt tuning and P-tuning use the first P rows of `prompt_embeddings` in front of the encoder
  input (with `num_transformer_submodules` 2, PEFT's default, there are 2P rows and the second P
  are never used). softprompt exports P rows with `num_transformer_submodules` 1.
- Prefix tuning (`num_transformer_submodules` 2) cuts the tensor into 2L key/value slots and
  gives decoder layer i the slots 4i and 4i + 1 (mod 2L) for its self-attention; the slots meant
  for cross-attention are discarded. With L layers in the config, layers i and i + L/2 share a
  prefix, so softprompt exports a prefix with `num_layers` 2L, where layer i's slots are distinct
  (the unused slots are zeros), and imports any `num_layers` by the same rule. PEFT's
  `num_transformer_submodules` 1 shares one cache between self- and cross-attention, which has no
  exact equivalent, and is refused.

Where PEFT's conventions differ from ours (see the README, "PEFT"):
- Positions under prefix tuning are the same: PEFT hands the prefix to the model as a cache of P
  entries, so the text's positions start at P, and softprompt's `prefix` and `deep` prompts take
  positions 0..P-1 too (`Injection.kv_positions = P`). A prompt file whose prefix takes another
  number of positions still exports; `export_peft` then returns a note on the `position_ids` that
  reproduce it in PEFT.
- Left padding. PEFT puts the virtual tokens before the pads (`prompt pad pad text`) and drops
  `position_ids` for prompt tuning and P-tuning, so the positions of a padded row's text count its
  pads, in `forward` and in `generate` alike (measured: the first generated token's logits equal its
  forward's). softprompt keeps the prompt next to the text and counts positions from the first real
  token, the positions the row has unpadded. Unpadded rows are identical in both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .base import Fingerprint
from .data import TaskSpec
from .errors import PromptFileError
from .fileio import atomic_write_bytes, atomic_write_text, header_metadata, storage_error
from .injection import Injection
from .methods import METHODS
from .store import Prompt, check_meta, check_tensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
# model family (`Fingerprint.family`) -> PEFT task type
TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "masked_lm": "FEATURE_EXTRACTION"}
# softprompt method -> PEFT type for prompts of embeddings; every KV prefix is PEFT's PREFIX_TUNING.
_EMBEDDING_TYPES = {"ptuning": "P_TUNING"}
_PEFT_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}


def hub_model_id(model_id: str) -> str:
    """The hub id in a fingerprint's model name ('HuggingFaceTB/SmolLM2-135M-Instruct (GGUF ...)' -> the id)."""
    return model_id.split(" (")[0]


def slot_pairs(family: str, peft_layers: int, model_layers: int) -> list[tuple[int, int]]:
    """(key slot, value slot) of PEFT's prefix tensor that each model layer reads (see the module docstring)."""
    if family == "seq2seq":
        return [((4 * i) % (2 * peft_layers), (4 * i + 1) % (2 * peft_layers)) for i in range(model_layers)]
    return [(2 * i, 2 * i + 1) for i in range(model_layers)]


def export_layers(family: str, model_layers: int) -> int:
    """The `num_layers` written into a PEFT prefix config: L, or 2L for a seq2seq decoder (module docstring)."""
    return 2 * model_layers if family == "seq2seq" else model_layers


def flatten_kv(kv: torch.Tensor, family: str = "causal") -> torch.Tensor:
    """(L, 2, H_kv, P, hd) -> PEFT's (P, L' * 2 * H_kv * hd), L' = `export_layers(family, L)`."""
    L, _, H, P, hd = kv.shape
    peft_layers = export_layers(family, L)
    slots = kv.new_zeros(2 * peft_layers, H, P, hd)  # (S, H_kv, P, hd)
    for layer, (k, v) in enumerate(slot_pairs(family, peft_layers, L)):
        slots[k], slots[v] = kv[layer, 0], kv[layer, 1]
    return slots.permute(2, 0, 1, 3).reshape(P, -1)


def unflatten_kv(
    flat: torch.Tensor, peft_layers: int, model_layers: int, num_kv_heads: int, head_dim: int, family: str = "causal"
) -> torch.Tensor:
    """PEFT's (P, L' * 2 * H_kv * hd) -> (L, 2, H_kv, P, hd) for a model of L layers."""
    slots = flat.view(flat.shape[0], 2 * peft_layers, num_kv_heads, head_dim).permute(1, 2, 0, 3)  # (S, H_kv, P, hd)
    return torch.stack(
        [torch.stack([slots[k], slots[v]]) for k, v in slot_pairs(family, peft_layers, model_layers)]
    ).contiguous()


# --- export ----------------------------------------------------------------------------------------------------------


def _check_exportable(prompt: Prompt) -> None:
    """Refuse a prompt that no PEFT prompt-learning adapter can hold, with the fix."""
    inj = prompt.injection
    if inj.adapter is not None:
        raise PromptFileError(
            f"A '{prompt.method}' prompt holds adaption prompts (LLaMA-Adapter); softprompt exports PEFT's "
            "prompt-learning formats only, not its AdaptionPrompt.",
            "serve the prompt file with softprompt, or export a soft, ptuning, prefix or deep prompt.",
        )
    if inj.embeds is not None and inj.kv is not None:
        raise PromptFileError(
            f"A '{prompt.method}' prompt holds both virtual-token embeddings and KV prefixes; a PEFT "
            "adapter holds one of them.",
            "export a prompt of one kind (soft, ptuning, prefix, deep).",
        )
    if inj.embeds is None and inj.kv is None:
        raise PromptFileError(
            f"A '{prompt.method}' prompt has no tensors (a text prompt); PEFT has no format for it.",
            "use its template as plain text.",
        )


def peft_config(prompt: Prompt, base_model_name: str | None = None) -> dict:
    """The adapter_config.json that PEFT needs to load `prompt` for inference."""
    _check_exportable(prompt)
    inj = prompt.injection
    family = Fingerprint.from_dict(prompt.base).family
    common = {
        "task_type": TASK_TYPES[family],
        "inference_mode": True,
        "num_transformer_submodules": 1,
        "base_model_name_or_path": base_model_name or hub_model_id(prompt.base.get("model_id", "")) or None,
        "revision": None,
        "auto_mapping": None,
        "modules_to_save": None,
    }
    if inj.kv is not None:
        L, _, H_kv, P, hd = inj.kv.shape
        return {
            **common,
            "peft_type": "PREFIX_TUNING",
            "num_virtual_tokens": P,
            "num_layers": export_layers(family, L),
            "num_attention_heads": H_kv,
            "token_dim": H_kv * hd,
            "encoder_hidden_size": H_kv * hd,
            "prefix_projection": False,
            "init_weights": None,
            "num_transformer_submodules": 2 if family == "seq2seq" else 1,
        }
    P, D = inj.embeds.shape
    # num_layers / num_attention_heads: PEFT fills them in from the model config when null.
    common.update(num_virtual_tokens=P, token_dim=D, num_layers=None, num_attention_heads=None)
    if _EMBEDDING_TYPES.get(prompt.method) == "P_TUNING":
        cfg = prompt.method_config
        return {
            **common,
            "peft_type": "P_TUNING",
            "encoder_reparameterization_type": cfg.get("encoder", "mlp").upper(),
            "encoder_hidden_size": cfg.get("encoder_hidden") or D,
            "encoder_num_layers": 2,
            "encoder_dropout": 0.0,
        }
    return {
        **common,
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }


def export_peft(prompt: Prompt, out_dir: str | Path, base_model_name: str | None = None) -> list[str]:
    """Write `out_dir/adapter_config.json` and `adapter_model.safetensors` for PEFT.

    `peft.PeftModel.from_pretrained(model, out_dir)` loads the result. The safetensors header also
    keeps softprompt's metadata (template, labels, metrics), so `import_peft` restores the prompt
    file exactly. Returns notes on where PEFT will run the prompt differently (see the module doc).
    """
    config = peft_config(prompt, base_model_name)
    inj = prompt.injection
    tensor = flatten_kv(inj.kv, Fingerprint.from_dict(prompt.base).family) if inj.kv is not None else inj.embeds
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the header keeps softprompt's metadata, marked so that `Prompt.load` refuses the file (it holds no `embeds`/`kv`)
    meta = {**prompt.meta(), "format": "softprompt-peft-export"}
    data = st_save(
        {"prompt_embeddings": tensor.detach().float().cpu().contiguous()},
        metadata={"format": "pt", "softprompt": json.dumps(meta, sort_keys=True)},
    )
    atomic_write_bytes(out / WEIGHTS, data)
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    notes = []
    if inj.kv is not None and inj.kv_positions != inj.num_kv:
        notes.append(
            f"PEFT starts the text at position {inj.num_kv} (after the prefix); this prompt was trained with "
            f"the text at position {inj.kv_positions}. For identical outputs in PEFT pass position_ids "
            f"counted from the first real token minus {inj.num_kv - inj.kv_positions}."
        )
    return notes


# --- import ----------------------------------------------------------------------------------------------------------


def read_peft(path: str | Path) -> tuple[dict, torch.Tensor, dict | None]:
    """(adapter config, `prompt_embeddings`, softprompt metadata or None) of a PEFT adapter directory."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise PromptFileError(
            f"{path} has no {CONFIG}; it is not a PEFT adapter directory.",
            "pass the folder that PeftModel.save_pretrained wrote.",
        )
    if not (path / WEIGHTS).is_file():
        found = [p.name for p in path.glob("adapter_model.*")]
        raise PromptFileError(
            f"{path} has no {WEIGHTS}{f' (only {found}: pickles are never loaded)' if found else ''}.",
            "re-save the adapter with PEFT's default safe_serialization=True.",
        )
    try:
        config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path / CONFIG} is not valid JSON ({e}).", "re-save the adapter with PEFT.") from e
    if not isinstance(config, dict):
        raise PromptFileError(
            f"{path / CONFIG} holds a JSON {type(config).__name__}, not an object of adapter settings.",
            "re-save the adapter with PEFT (PeftModel.save_pretrained writes an object).",
        )
    try:
        data = (path / WEIGHTS).read_bytes()
    except OSError as e:
        raise storage_error(e, path / WEIGHTS, "read") from e
    try:
        tensors = st_load(data)
        meta = header_metadata(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path / WEIGHTS} is truncated or corrupted ({e}).", "re-save the adapter.") from e
    if config.get("peft_type") == "ADAPTION_PROMPT":
        raise PromptFileError(
            f"{path} is a PEFT AdaptionPrompt (LLaMA-Adapter) adapter; softprompt imports PEFT's prompt-learning "
            "formats only.",
            "train the prompt with softprompt (--method llama-adapter), or import a prompt-learning adapter.",
        )
    if "prompt_embeddings" not in tensors:
        raise PromptFileError(
            f"{path / WEIGHTS} has no 'prompt_embeddings' tensor (it has {sorted(tensors)}).",
            "pass a prompt-learning adapter (prompt tuning, P-tuning or prefix tuning).",
        )
    try:
        meta = json.loads(meta) if meta else None
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path / WEIGHTS} has corrupted softprompt metadata ({e}).", "re-export it.") from e
    if meta is not None:  # written by `export_peft`: the same schema as a prompt file's
        check_meta({**meta, "format": "softprompt"} if isinstance(meta, dict) else meta, path / WEIGHTS)
    return config, tensors["prompt_embeddings"].float(), meta


def _method_of(config: dict) -> tuple[str, dict]:
    """(softprompt method, its config as a dict) that describes a PEFT adapter."""
    P, kind = config["num_virtual_tokens"], config["peft_type"]
    if kind == "PROMPT_TUNING":
        init = _PEFT_INITS.get(str(config.get("prompt_tuning_init")), "random")
        text = config.get("prompt_tuning_init_text") if init == "text" else None
        return "soft", METHODS["soft"].config_class(P, init=init, init_text=text).to_dict()
    if kind == "P_TUNING":
        encoder = str(config.get("encoder_reparameterization_type", "MLP")).lower()
        return "ptuning", METHODS["ptuning"].config_class(
            P, init="random", encoder=encoder, encoder_hidden=config.get("encoder_hidden_size")
        ).to_dict()
    init = "zero" if config.get("init_weights") == "zero" else "random"
    if config.get("prefix_projection"):
        return "prefix", METHODS["prefix"].config_class(
            P, init=init, prefix_hidden=config.get("encoder_hidden_size") or 512
        ).to_dict()
    return "deep", METHODS["deep"].config_class(P, init=init).to_dict()


def _checked_shape(path: Path, config: dict, tensor: torch.Tensor, base) -> tuple[str, int, int]:
    """(PEFT type, transformer submodules, virtual tokens) of an adapter that fits `base`'s family and its config."""
    kind = config.get("peft_type")
    if kind not in PEFT_TYPES:
        raise PromptFileError(
            f"{path} is a PEFT {kind} adapter, not a prompt-learning one.",
            f"softprompt imports {list(PEFT_TYPES)} adapters.",
        )
    family = base.family.name
    task_type = config.get("task_type")
    if task_type not in (None, TASK_TYPES[family]):
        raise PromptFileError(
            f"{path} is a PEFT adapter for task type {task_type}, but '{base.name}' is a {family} "
            f"model (PEFT task type {TASK_TYPES[family]}).",
            "import it against a model of the family it was trained for (--model).",
        )
    # PEFT's own default: two submodules (encoder and decoder) for seq2seq models, one otherwise
    nts = config.get("num_transformer_submodules") or (2 if task_type == "SEQ_2_SEQ_LM" else 1)
    P = config.get("num_virtual_tokens")
    rows = P if kind == "PREFIX_TUNING" else P * nts if isinstance(P, int) else None
    if tensor.dim() != 2 or tensor.shape[0] != rows:
        raise PromptFileError(
            f"{path}: prompt_embeddings has shape {tuple(tensor.shape)}, but the config says {P} virtual tokens.",
            "re-save the adapter with PEFT.",
        )
    return kind, nts, P


def _prefix_injection(path: Path, tensor: torch.Tensor, base, nts: int, positions: int) -> Injection:
    """A PEFT prefix (P, layers x 2 x H_kv x hd) as softprompt's KV injection for `base`."""
    family, layout = base.family.name, base.kv_layout
    if family == "seq2seq" and nts != 2:
        raise PromptFileError(
            f"{path}: a seq2seq prefix with num_transformer_submodules {nts} (PEFT then shares one "
            "cache between self- and cross-attention), which softprompt cannot reproduce.",
            "re-train it with PEFT's default num_transformer_submodules=2.",
        )
    per_layer = 2 * layout.num_kv_heads * layout.head_dim
    peft_layers = tensor.shape[1] // per_layer
    if (
        tensor.shape[1] % per_layer
        or peft_layers < (layout.num_layers if family != "seq2seq" else 1)
        or (family != "seq2seq" and peft_layers != layout.num_layers)
    ):
        raise PromptFileError(
            f"{path}: a prefix of width {tensor.shape[1]} per token does not fit '{base.name}' "
            f"({layout.num_layers} layers x 2 x {layout.num_kv_heads} KV heads x {layout.head_dim}).",
            "import it against the model it was trained for (--model).",
        )
    kv = unflatten_kv(tensor, peft_layers, layout.num_layers, layout.num_kv_heads, layout.head_dim, family)
    return Injection(kv=kv, kv_positions=positions)


def import_peft(path: str | Path, base, spec: TaskSpec | None = None) -> Prompt:
    """A softprompt `Prompt` from a PEFT prompt-learning adapter directory, for the model `base`.

    The fingerprint is `base`'s: the adapter is checked against its shapes, not its weights (PEFT
    records no more than a model name). The template comes from `spec`, else from softprompt
    metadata in the file (an adapter that `export_peft` wrote), else a bare '{text}' template.
    """
    path = Path(path)
    config, tensor, meta = read_peft(path)
    if meta:  # exported by softprompt: it names the model it was trained for
        Fingerprint.from_dict(meta["base"]).check(base.fingerprint, f"The adapter in {path}")
    kind, nts, P = _checked_shape(path, config, tensor, base)
    if kind == "PREFIX_TUNING":
        # PEFT's own convention: the text starts after the prefix
        injection = _prefix_injection(path, tensor, base, nts, meta["kv_positions"] if meta else P)
    else:
        if tensor.shape[1] != base.hidden_size:
            raise PromptFileError(
                f"{path}: virtual tokens of width {tensor.shape[1]} do not fit '{base.name}' "
                f"(hidden size {base.hidden_size}).",
                "import it against the model it was trained for.",
            )
        injection = Injection(embeds=tensor[:P])  # PEFT puts the first P in front of the input (the rest: unused)
    check_tensors(injection.tensors(), path / WEIGHTS, "re-train the adapter (its prompt_embeddings are unusable).")
    method, method_config = (meta["method"], meta["method_config"]) if meta else _method_of(config)
    # the spec given, else the one saved with the adapter, else a plain text-to-target task named after the folder
    task = spec or (
        meta["task"] if meta else TaskSpec(name=path.resolve().name, template="{text}", target_column="target")
    )
    return Prompt.for_base(
        base,
        injection,
        method,
        method_config,
        task,
        trainable_parameters=meta["parameters"]["training"] if meta else tensor.numel(),
        metrics=meta.get("metrics", {}) if meta else {},
        train={
            "imported_from": {
                "format": "peft",
                "peft_type": kind,
                "path": str(path),
                "base_model_name_or_path": config.get("base_model_name_or_path"),
            }
        },
    )
