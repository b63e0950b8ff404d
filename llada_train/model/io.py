"""HF-format checkpoints in the official LLaDA2-MoE layout: load, save, name mapping.

Contract:
- A model directory holds `config.json`, one or more `*.safetensors` shards and, when sharded,
  `model.safetensors.index.json` (HF convention: {"metadata": {...}, "weight_map": {name: file}}).
- Tensor names and shapes are exactly the official ones (`official_shapes(config)`), for example
  `model.layers.3.mlp.experts.17.gate_proj.weight` of shape (moe_intermediate_size, hidden);
  the stacked expert weights used inside `modeling` are split/joined here and only here.
- Loading checks the names and shapes in the shard headers before reading any data, and fails
  with a ValueError naming every missing, unexpected or mis-shaped tensor.
- Saving writes into a temporary sibling directory and renames it into place, so a crash never
  leaves a half-written model directory under the final name; shards are written as they fill
  (host memory: one shard).
- Training facts: a training run writes `llada_train.json` next to `config.json` in every export
  (`save_training_facts`): the decode-relevant facts of that training, e.g. `block_length` and
  whether it trained on the chat template. `training_default(key, explicit, model_dir, default)`
  is how generate, eval and RL pick a setting: the explicit value when given (a warning when it
  differs from the trained one), else the trained one, else the default.
- Under ZeRO-3, loading and exporting take a `gather` function and make one decoder layer whole
  at a time, so no rank ever holds the whole model for them.
- A model whose MoE blocks DeepSpeed AutoEP replaced (expert parallelism) exports under the same
  official names: `whole_units` maps AutoEP's names back to ours (`_from_autoep`) and
  reassembles each layer's experts from its EP group (a collective: every rank drains the
  iteration, as under ZeRO-3). Loading into such a model is refused (load before the engine).
- An export loads where a release loads (`save_pretrained(source_dir=...)`): it carries from the
  directory it was fine-tuned from (a release, or an export of ours) the remote code (every
  `*.py`: the files config.json's `auto_map` names), `generation_config.json`, licence files,
  and, where the export lacks them, tokenizer and chat-template files. Its `auto_map` never
  names a missing file: when the source had no such code (a model trained from scratch, or no
  source), llada_train's own pair (`model/hf_remote/`: a transformers-only config class and a
  model class wrapping llada_train) is shipped under the official file and class names.
  `generation_config.json` is the source's, plus the ids (eos, pad, mask) and the decode
  settings the caller passes (`generation`: block_length, threshold, ...); the model card
  (README.md) is `model/card.py`'s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llada_train.model.config import OFFICIAL_DEFAULTS, LLaDA2MoeConfig
from llada_train.model.modeling import LLaDA2MoeModelLM, is_autoep_layer

TRAINING_FACTS = "llada_train.json"
GENERATION_CONFIG = "generation_config.json"
REMOTE_CODE_DIR = os.path.join(os.path.dirname(__file__), "hf_remote")  # our auto_map pair
REMOTE_CODE_FILES = ("configuration_llada2_moe.py", "modeling_llada2_moe.py")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
)  # fmt: skip
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)


def official_shapes(config: LLaDA2MoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint of this config: name -> shape."""
    h, d = config.hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.word_embeddings.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (config.vocab_size, h),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "attention.query_key_value.weight"] = (qkv, h)
        shapes[p + "attention.query_layernorm.weight"] = (d,)
        shapes[p + "attention.key_layernorm.weight"] = (d,)
        shapes[p + "attention.dense.weight"] = (h, config.num_attention_heads * d)
        if config.is_moe_layer(i):
            w = config.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (config.num_experts, h)
            shapes[p + "mlp.gate.expert_bias"] = (config.num_experts,)
            for e in range(config.num_experts):
                _mlp_shapes(shapes, f"{p}mlp.experts.{e}.", h, w)
            if config.num_shared_experts:
                _mlp_shapes(shapes, p + "mlp.shared_experts.", h, w * config.num_shared_experts)
        else:
            _mlp_shapes(shapes, p + "mlp.", h, config.intermediate_size)
    return shapes


def _mlp_shapes(shapes: dict, prefix: str, hidden: int, width: int) -> None:
    shapes[prefix + "gate_proj.weight"] = (width, hidden)
    shapes[prefix + "up_proj.weight"] = (width, hidden)
    shapes[prefix + "down_proj.weight"] = (hidden, width)


Gather = Callable[[list[torch.nn.Parameter]], AbstractContextManager]
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _unit_index(name: str, num_layers: int) -> int:
    """The decoder layer a tensor name belongs to; `num_layers` for the rest."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else num_layers


def whole_units(
    model: LLaDA2MoeModelLM, gather: Gather | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Parameters and persistent buffers by name, one group per decoder layer, then one for
    the rest (embeddings, final norm, head). With `gather` (ZeRO-3), each group's parameters
    are whole while it is being used, and only then; every rank must run the iteration to its
    end, since the gathers are collective."""
    n = model.config.num_hidden_layers
    units: list[dict[str, torch.Tensor]] = [{} for _ in range(n + 1)]
    for name, t in model.state_dict(keep_vars=True).items():  # the Parameters themselves
        units[_unit_index(name, n)][name] = t
    for unit in units:
        if gather is None:
            yield _from_autoep(model, unit)
            continue
        with gather([t for t in unit.values() if isinstance(t, torch.nn.Parameter)]):
            yield _from_autoep(model, unit)


_AUTOEP_NAME = re.compile(
    r"^(model\.layers\.\d+\.mlp)\.(router\.gate\.weight|router\.e_score_correction_bias|"
    r"experts\.w[123])$"
)


def _from_autoep(model: LLaDA2MoeModelLM, unit: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A unit of `whole_units` under our names: an AutoEP block's `router.gate.weight` ->
    `gate.weight`, `router.e_score_correction_bias` -> `gate.expert_bias`, and its local experts
    `experts.w1` / `w3` (E/ep, I, H), `w2` (E/ep, H, I) (gate, up, down; AutoEP's TorchTitan
    layout) -> all E experts stacked as ours, `experts.gate_up_proj` (E, H, 2I) = [w1 | w3]^T
    and `experts.down_proj` (E, I, H) = w2^T, gathered over the layer's EP group
    (`distributed.gather_experts`, a collective). Those two are new tensors (read-only use);
    a unit without AutoEP names comes back as it is."""
    if not any(_AUTOEP_NAME.match(name) for name in unit):
        return unit
    from llada_train.distributed import gather_experts

    out: dict[str, torch.Tensor] = {}
    local: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in unit.items():
        m = _AUTOEP_NAME.match(name)
        if m is None:
            out[name] = t
            continue
        prefix, leaf = m.groups()
        if leaf == "router.gate.weight":
            out[f"{prefix}.gate.weight"] = t
        elif leaf == "router.e_score_correction_bias":
            # the bias the balancing rule writes (distributed.adapt_autoep_layers: under ZeRO-3
            # a whole copy of the partitioned parameter), else the parameter itself
            gate = getattr(model.get_submodule(prefix), "gate", None)
            out[f"{prefix}.gate.expert_bias"] = getattr(gate, "expert_bias", t)
        else:
            local.setdefault(prefix, {})[leaf.rpartition(".")[2]] = t
    for prefix, w in sorted(local.items()):
        layer = model.get_submodule(prefix)
        w1, w2, w3 = (gather_experts(layer, w[k].data) for k in ("w1", "w2", "w3"))
        out[f"{prefix}.experts.gate_up_proj"] = torch.cat((w1, w3), dim=1).transpose(1, 2)
        out[f"{prefix}.experts.down_proj"] = w2.transpose(1, 2)  # (E, I, H)
    return out


def official_state_dict(
    model: LLaDA2MoeModelLM, gather: Gather | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (official name, tensor) for every weight and buffer, splitting stacked experts.

    Without `gather`, tensors are views where possible: nothing is copied until the caller needs
    it. With `gather` (ZeRO-3: params -> a context making them whole on every rank), one decoder
    layer is whole at a time and the tensors yielded are CPU copies; every rank must then drain
    the iterator, since the gathers are collective.
    """
    for unit in whole_units(model, gather):
        for name, param in unit.items():
            t = param.data
            if gather is not None:
                t = t.to("cpu", copy=True)
            m = _STACKED.match(name)
            if not m:
                yield name, t
                continue
            prefix, kind = m.groups()
            if kind == "gate_up_proj":  # (E, H, 2I): gate = [:, :, :I].T, up = [:, :, I:].T
                width = t.shape[2] // 2
                for e in range(t.shape[0]):
                    yield f"{prefix}.{e}.gate_proj.weight", t[e, :, :width].T
                    yield f"{prefix}.{e}.up_proj.weight", t[e, :, width:].T
            else:  # (E, I, H): down[e] = W[e].T (H, I)
                for e in range(t.shape[0]):
                    yield f"{prefix}.{e}.down_proj.weight", t[e].T


# ---------------------------------------------------------------------------- save
def save_pretrained(
    model: LLaDA2MoeModelLM,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    extra_files: dict[str, str] | None = None,
    tokenizer=None,
    state: Iterable[tuple[str, torch.Tensor]] | None = None,
    source_dir: str | None = None,
    generation: dict[str, Any] | None = None,
) -> str:
    """Write config.json + safetensors shards + index + remote code + generation_config.json
    to out_dir atomically; returns out_dir.

    dtype: cast floating weights on the way out (e.g. torch.bfloat16); expert_bias stays fp32.
    extra_files: {filename: source path} copied in as well (a README, training args).
    tokenizer: an HF tokenizer saved beside the weights, so the directory is self-contained.
    state: the (official name, tensor) pairs to write, default `official_state_dict(model)`
      (ZeRO-3 passes the layer-by-layer gathering iterator).
    source_dir: the model directory the weights were fine-tuned from (init_from): its remote
      code, generation config, licence and missing tokenizer files come along (module
      docstring). None: a model trained from scratch; llada_train's remote code is shipped.
    generation: fields written into generation_config.json over the source's (decode settings).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    tmp = out_dir + ".tmp-save"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # Each shard is written as soon as it is full (host memory: one shard), under a numbered
    # name, and renamed to the HF name once the shard count is known.
    shard: dict[str, torch.Tensor] = {}
    written: list[dict[str, int]] = []  # per shard: {name: nbytes}

    def flush() -> None:
        save_file(shard, os.path.join(tmp, f"{len(written)}.part"), metadata={"format": "pt"})
        written.append({name: t.numel() * t.element_size() for name, t in shard.items()})
        shard.clear()

    size = 0
    for name, t in official_state_dict(model) if state is None else state:
        t = t.detach()
        if dtype is not None and t.is_floating_point() and not name.endswith("expert_bias"):
            t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t.to("cpu").contiguous()
        size += nbytes
    flush()
    weight_map: dict[str, str] = {}
    for i, names in enumerate(written):
        n = len(written)
        fname = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.rename(os.path.join(tmp, f"{i}.part"), os.path.join(tmp, fname))
        weight_map.update(dict.fromkeys(names, fname))
    if len(written) > 1:
        total = sum(sum(names.values()) for names in written)
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = model.config.to_dict()
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    for fname, src in (extra_files or {}).items():
        shutil.copy(src, os.path.join(tmp, fname))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if source_dir:
        carry_source_files(source_dir, tmp)
    config["auto_map"] = complete_remote_code(tmp, config.get("auto_map"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    ids = {"bos_token_id": getattr(tokenizer, "bos_token_id", None)}
    ids |= {k: config.get(k) for k in ("eos_token_id", "pad_token_id", "mask_token_id")}
    write_generation_config(tmp, {k: v for k, v in ids.items() if v is not None}, generation)
    _atomic_replace_dir(tmp, out_dir)
    return out_dir


def carry_source_files(source_dir: str, out_dir: str) -> list[str]:
    """Copy from the model directory `source_dir` into the export `out_dir` what the export
    needs to load as the source loads: every top-level `*.py` (remote code), the generation
    config, licence files, and the tokenizer / chat-template files that `out_dir` lacks (all of
    them when it holds no tokenizer; the chat template when its tokenizer has none). Returns
    the names copied."""
    names = sorted(os.listdir(source_dir))
    has = set(os.listdir(out_dir))
    wanted = [n for n in names if n.endswith(".py") or n.startswith(LICENSE_PREFIXES)]
    wanted += [GENERATION_CONFIG] if GENERATION_CONFIG in names else []
    if not has & {"tokenizer.json", "tokenizer_config.json"}:  # no tokenizer saved: the source's
        wanted += [n for n in names if n in TOKENIZER_FILES + CHAT_TEMPLATE_FILES]
    elif not has & set(CHAT_TEMPLATE_FILES) and not _tokenizer_has_template(out_dir):
        wanted += [n for n in names if n in CHAT_TEMPLATE_FILES]
    copied = []
    for name in wanted:
        src = os.path.join(source_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def _tokenizer_has_template(model_dir: str) -> bool:
    try:
        with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError):
        return False


def _auto_map_modules(auto_map: dict[str, Any]) -> set[str]:
    """The module files ("modeling_x" of "modeling_x.Class") an auto_map names locally; a
    reference into another repository ("org/repo--modeling_x.Class") needs no local file."""
    refs = []
    for value in auto_map.values():
        refs += value if isinstance(value, (list, tuple)) else [value]
    return {r.rsplit(".", 1)[0] for r in refs if isinstance(r, str) and "--" not in r}


def complete_remote_code(model_dir: str, auto_map: dict[str, Any] | None) -> dict[str, Any]:
    """The auto_map to write into `model_dir`'s config.json: `auto_map` itself when every module
    it names is a file in `model_dir` (e.g. copied from the source), else the official one,
    with llada_train's own pair (`REMOTE_CODE_FILES`) copied in under those names."""
    if auto_map and all(
        os.path.isfile(os.path.join(model_dir, m + ".py")) for m in _auto_map_modules(auto_map)
    ):
        return auto_map
    for name in REMOTE_CODE_FILES:
        shutil.copy(os.path.join(REMOTE_CODE_DIR, name), os.path.join(model_dir, name))
    return dict(OFFICIAL_DEFAULTS["auto_map"])


def write_generation_config(
    model_dir: str, ids: dict[str, int], generation: dict[str, Any] | None
) -> None:
    """generation_config.json of `model_dir`: the special `ids` (bos/eos/pad/mask), then the
    file already there (the source's), then `generation` (decode settings), later ones winning.
    Decoding is greedy unless the caller says otherwise (`do_sample: false`, no temperature:
    transformers rejects a temperature without sampling)."""
    path = os.path.join(model_dir, GENERATION_CONFIG)
    found: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                found = json.load(f)
        except (OSError, ValueError):
            found = {}  # an unreadable source file is replaced, not carried
    merged = {**ids, "do_sample": False, **found, **(generation or {})}
    with open(path, "w") as f:
        json.dump(merged, f, indent=2)
        f.write("\n")


def save_training_facts(model_dir: str, facts: dict[str, Any]) -> None:
    """Write the decode-relevant facts of a training run (block_length, chat_template, ...)
    as `llada_train.json` into the export `model_dir`."""
    with open(os.path.join(model_dir, TRAINING_FACTS), "w") as f:
        json.dump(facts, f, indent=2)
        f.write("\n")


def load_training_facts(model_dir: str | None) -> dict[str, Any]:
    """The facts `save_training_facts` wrote into `model_dir`; {} when there are none (a model
    not trained here, e.g. an official release)."""
    path = os.path.join(model_dir, TRAINING_FACTS) if model_dir else None
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable training facts ({e}); delete the file") from None


def training_default(key: str, explicit: Any, model_dir: str | None, default: Any) -> Any:
    """The value of a decode setting `key` (e.g. block_length) for the model in `model_dir`:
    `explicit` when not None (with a warning when the model was trained with another value),
    else the trained value from its `llada_train.json`, else `default`."""
    import warnings

    trained = load_training_facts(model_dir).get(key)
    if explicit is None:
        return default if trained is None else trained
    if trained is not None and explicit != trained:
        warnings.warn(
            f"{key}={explicit} differs from the {key}={trained} the model was trained with "
            f"({os.path.join(model_dir, TRAINING_FACTS)}); using {explicit}. Leave {key} unset "
            "to use the trained value.",
            stacklevel=2,
        )
    return explicit


def _atomic_replace_dir(tmp: str, final: str) -> None:
    """Move tmp to final; an existing final is renamed aside first and removed last."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- load
def _shard_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors files (and no {INDEX_FILE})")
    missing = [f for f in files if not os.path.exists(os.path.join(model_dir, f))]
    if missing:
        raise ValueError(f"{model_dir}: shard(s) named in the index are missing: {missing}")
    return [os.path.join(model_dir, f) for f in files]


def check_shard_file(path: str) -> None:
    """ValueError naming `path` when it is not a whole safetensors file: the 8-byte header
    length, the JSON header, and a file size equal to header + the largest tensor end offset
    (a truncated copy or download fails here, before any weight is read)."""

    def bad(why: str) -> ValueError:
        return ValueError(
            f"{path}: not a complete safetensors file ({why}); the file is truncated or corrupt, "
            "copy or export it again"
        )

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, no header")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise bad(f"header of {header_len} bytes in a file of {size}")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise bad("unreadable header") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise bad(f"{size} bytes, the header describes {expected}")


def check_checkpoint(model_dir: str, config: LLaDA2MoeConfig) -> dict[str, str]:
    """Compare shard headers with the official shapes; return {name: shard path}."""
    expected = official_shapes(config)
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in _shard_files(model_dir):
        check_shard_file(path)
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                found[name] = (tuple(f.get_slice(name).get_shape()), path)
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short_list(unexpected)}")
    for name in sorted(set(expected) & set(found)):
        shape, path = found[name]
        if shape != expected[name]:
            problems.append(
                f"tensor '{name}' in {os.path.basename(path)} has shape {list(shape)}, "
                f"config.json implies {list(expected[name])}"
            )
    if problems:
        raise ValueError(
            f"{model_dir}: checkpoint does not match its config.json:\n  " + "\n  ".join(problems)
        )
    return {name: path for name, (_, path) in found.items()}


def _short_list(names: list[str], limit: int = 12) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@torch.no_grad()
def load_official_weights(
    model: LLaDA2MoeModelLM, model_dir: str, gather: Gather | None = None, write: bool = True
) -> None:
    """Copy the tensors of an official-layout checkpoint into `model` (shapes checked first).

    gather (ZeRO-3): params -> a context making them whole and, on exit, scattering the values
    of the writing rank; entered one decoder layer at a time, so no rank ever holds the whole
    model. Every rank calls this; only the one with `write` reads the files. Buffers (the
    router's expert bias) are written on that rank only: the caller broadcasts them.
    """
    if any(is_autoep_layer(m) for m in model.modules()):
        raise ValueError(
            "loading official weights into a model whose MoE blocks AutoEP replaced: load them "
            "before distributed.create_engine"
        )
    locations = check_checkpoint(model_dir, model.config)
    by_unit: dict[int, list[str]] = {}
    for name in locations:
        by_unit.setdefault(_unit_index(name, model.config.num_hidden_layers), []).append(name)
    for index, unit in enumerate(whole_units(model, gather)):
        if write:
            _copy_official(unit, by_unit.get(index, []), locations)


def _copy_official(unit: dict[str, torch.Tensor], names: list[str], locations: dict) -> None:
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(locations[name], []).append(name)
    for path, file_names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in file_names:
                src = f.get_tensor(name)
                m = _PER_EXPERT.match(name)
                if m is None:
                    unit[name].data.copy_(src)
                    continue
                prefix, e, kind = m.groups()
                e = int(e)
                if kind == "down_proj":
                    unit[f"{prefix}.down_proj"].data[e].copy_(src.T)
                else:
                    stacked = unit[f"{prefix}.gate_up_proj"].data
                    width = stacked.shape[2] // 2
                    cols = slice(0, width) if kind == "gate_proj" else slice(width, 2 * width)
                    stacked[e, :, cols].copy_(src.T)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 elsewhere; else a name of DTYPES (ValueError otherwise)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def from_pretrained(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LLaDA2MoeModelLM:
    """Build the model of `model_dir/config.json` on `device` and load its weights."""
    model_dir = os.fspath(model_dir)
    config = LLaDA2MoeConfig.from_json(model_dir)
    check_checkpoint(model_dir, config)  # names, shapes, whole files: before any allocation
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config)
    model = model.to_empty(device=device)
    load_official_weights(model, model_dir)
    # expert_bias is a selection-only fp32 buffer; keep it fp32 whatever the weight dtype.
    model.to(dtype)
    for moe in model.moe_layers():
        moe.gate.expert_bias.data = moe.gate.expert_bias.data.float()
    return model.eval()
