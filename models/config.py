"""ModelConfig: one frozen description of a transformer, parsed from a Hugging Face config.json.

Three families cover the zoo, and everything downstream reads only ModelConfig fields:
- "llama" (model_type llama, mistral, qwen2): RMSNorm, RoPE, SwiGLU MLP, grouped-query attention;
- "gpt2": LayerNorm, learned positions, GELU MLP, biases everywhere, tied LM head;
- "bert": the same blocks as GPT-2 but post-norm, plus token-type embeddings and a pooler.
Validation happens once, here, with messages that name the field as the user wrote it, so that
a bad config fails at load time instead of deep inside the compiler.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ZOO_DIR = Path(__file__).parent / "zoo"
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu", "swish", "gelu_pytorch_tanh")
ARCHITECTURES = ("llama", "gpt2", "bert")
# Hugging Face model_type -> our architecture family.
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
    "bert": "bert",
}
_TORCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# Our field -> the key a family's config.json uses for it (also the name shown in errors).
_HF_KEYS = {
    "llama": {
        "norm_eps": "rms_norm_eps",
        "qkv_bias": "attention_bias",
        "o_proj_bias": "attention_bias",
        "dtype": "torch_dtype",
    },
    "gpt2": {
        "hidden_size": "n_embd",
        "intermediate_size": "n_inner",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_head",
        "max_position_embeddings": "n_positions",
        "hidden_act": "activation_function",
        "norm_eps": "layer_norm_epsilon",
        "dtype": "torch_dtype",
    },
    "bert": {"norm_eps": "layer_norm_eps", "dtype": "torch_dtype"},
}
_POSITIVE_INTS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
)
_BOOLS = ("tie_word_embeddings", "gated_mlp", "qkv_bias", "o_proj_bias", "mlp_bias")
_CHOICES = {
    "architecture": ARCHITECTURES,
    "hidden_act": ACTIVATIONS,
    "norm": ("rmsnorm", "layernorm"),
    "position": ("rope", "learned"),
    "dtype": tuple(DTYPE_BYTES),
}
_MISSING = object()
MAX_FFF_DEPTH = 20  # a tree of 2^21 - 1 neurons per layer


class ConfigError(ValueError):
    """A config that cannot describe a model. The message is one line: where, field, rule."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one transformer; field names follow Hugging Face (llama style).

    Defaults describe a llama-style decoder, so tests can build one by keyword.
    `o_proj_bias` is the attention output projection's bias (GPT-2, BERT, llama with
    attention_bias); Qwen2 has qkv_bias without it.
    """

    name: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    norm: str = "rmsnorm"
    gated_mlp: bool = True
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    position: str = "rope"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "bf16"
    type_vocab_size: int = 0
    head_dim_override: int | None = None
    # Fast feed-forward (Belcak and Wattenhofer, UltraFastBERT): each layer's MLP becomes a
    # balanced binary tree of neurons of this depth, 2^(depth+1) - 1 of them, of which a token
    # evaluates depth + 1 (one per level, descending by the sign of each); no biases.
    fff_depth: int | None = None

    def __post_init__(self) -> None:
        _validate(vars(self), self.name, {})

    @property
    def fff_nodes(self) -> int:
        """Neurons of a fast feed-forward tree (0 for an ordinary MLP)."""
        return 0 if self.fff_depth is None else 2 ** (self.fff_depth + 1) - 1

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def param_count(self) -> int:
        """Exact parameter count, as published model sizes count it.

        Counts embeddings (token, learned position, token type), every norm, bias and matrix,
        the LM head unless tied, and BERT's pooler; BERT's MLM head transform is left out,
        matching BertModel's 109.5M.
        """
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q_out, kv_out = self.num_attention_heads * hd, self.num_key_value_heads * hd
        norm = h * (2 if self.norm == "layernorm" else 1)
        embed = self.vocab_size * h + self.type_vocab_size * h
        if self.position == "learned":
            embed += self.max_position_embeddings * h
        attn = 2 * h * q_out + 2 * h * kv_out
        attn += (q_out + 2 * kv_out) * self.qkv_bias + h * self.o_proj_bias
        mlp_mats = 3 if self.gated_mlp else 2
        mlp = mlp_mats * h * i + ((mlp_mats - 1) * i + h) * self.mlp_bias
        if self.fff_depth is not None:  # an input and an output vector per tree neuron
            mlp = 2 * self.fff_nodes * h
        layer = attn + mlp + 2 * norm
        # One norm outside the layers: the final norm (pre-norm) or BERT's embedding norm.
        total = embed + self.num_hidden_layers * layer + norm
        if not self.tie_word_embeddings:
            total += self.vocab_size * h
        if self.architecture == "bert":
            total += h * h + h
        return total

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; `from_dict` reads it back to an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str = "custom") -> ModelConfig:
        """Parse a Hugging Face config.json dict (llama, mistral, qwen2, gpt2, bert) or `to_dict`.

        Absent optional keys take the Hugging Face defaults of that model_type. Sliding-window
        attention and rope_scaling are not modelled: attention spans the whole context.
        """
        return _from_dict(d, name, where=name)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Load a config.json; the name is the file's stem, or its folder's for `config.json`."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: top level must be a JSON object")
        name = path.parent.name if path.stem == "config" else path.stem
        return _from_dict(d, name, where=str(path))


def zoo_names() -> list[str]:
    """Names of the bundled configs, sorted."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.json"))


def load_model(name_or_path: str) -> ModelConfig:
    """A zoo model by name (any case), or a config.json given by path or by its folder."""
    if name_or_path.lower() in zoo_names():
        return ModelConfig.from_json(ZOO_DIR / f"{name_or_path.lower()}.json")
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return ModelConfig.from_json(path)
    raise ConfigError(
        f"{name_or_path}: unknown model; give a config.json path or one of {', '.join(zoo_names())}"
    )


def _from_dict(d: Mapping[str, Any], name: str, where: str) -> ModelConfig:
    if "architecture" in d:  # our own to_dict() form
        values, keys = _own_fields(d, where), {}
    else:
        values, keys = _hf_fields(d, name, where)
    _validate(values, where, keys)
    return ModelConfig(**values)


def _field_defaults() -> dict[str, Any]:
    """Every ModelConfig field -> its default (dataclasses.MISSING where it has none)."""
    return {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def _own_fields(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    fields = _field_defaults()
    for key in d:
        if key not in fields:
            raise ConfigError(f"{where}: unknown field {key!r}")
    for key, default in fields.items():
        if default is dataclasses.MISSING and key not in d:
            raise ConfigError(f"{where}: missing field {key!r}")
    return {key: d.get(key, default) for key, default in fields.items()}


def _hf_fields(d: Mapping[str, Any], name: str, where: str) -> tuple[dict, dict]:
    model_type = d.get("model_type")
    if model_type is None:  # old configs: infer from e.g. "LlamaForCausalLM"
        archs = d.get("architectures") or [""]
        if not isinstance(archs, list):
            raise ConfigError(f"{where}: architectures={archs!r} must be a list of names")
        model_type = next((t for t in MODEL_TYPES if str(archs[0]).lower().startswith(t)), None)
        if model_type is None:
            raise ConfigError(f"{where}: missing field 'model_type'")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type={model_type!r} is not one of {', '.join(MODEL_TYPES)}"
        )
    arch = MODEL_TYPES[model_type]
    keys = _HF_KEYS[arch]

    def get(field: str, default: Any = _MISSING) -> Any:
        key = keys.get(field, field)
        if d.get(key) is None:  # Hugging Face writes null for "use the default"
            if default is _MISSING:
                raise ConfigError(f"{where}: missing field {key!r}")
            return default
        return d[key]

    hidden, heads = get("hidden_size"), get("num_attention_heads")
    values = _field_defaults() | {
        "name": name,
        "architecture": arch,
        "hidden_size": hidden,
        "num_hidden_layers": get("num_hidden_layers"),
        "num_attention_heads": heads,
        "vocab_size": get("vocab_size"),
        "dtype": _dtype(d, where),
        "head_dim_override": d.get("head_dim"),
    }
    if arch == "llama":
        attention_bias = get("attention_bias", False)
        values |= {
            "intermediate_size": get("intermediate_size"),
            "num_key_value_heads": get("num_key_value_heads", heads),
            "max_position_embeddings": get("max_position_embeddings", 2048),
            "tie_word_embeddings": get("tie_word_embeddings", False),
            "hidden_act": get("hidden_act", "silu"),
            "qkv_bias": model_type == "qwen2" or attention_bias,
            "o_proj_bias": attention_bias,
            "mlp_bias": get("mlp_bias", False),
            "rope_theta": get("rope_theta", 10000.0),
            "norm_eps": get("norm_eps", 1e-6),
        }
    else:
        gpt2 = arch == "gpt2"
        values |= {
            "intermediate_size": get("intermediate_size", 4 * hidden if gpt2 else _MISSING),
            "num_key_value_heads": heads,
            "max_position_embeddings": get("max_position_embeddings", 1024 if gpt2 else 512),
            "tie_word_embeddings": get("tie_word_embeddings", True),
            "hidden_act": get("hidden_act", "gelu_new" if gpt2 else "gelu"),
            "norm": "layernorm",
            "gated_mlp": False,
            "qkv_bias": True,
            "o_proj_bias": True,
            "mlp_bias": True,
            "position": "learned",
            "rope_theta": 0.0,
            "norm_eps": get("norm_eps", 1e-5 if gpt2 else 1e-12),
            "type_vocab_size": 0 if gpt2 else get("type_vocab_size", 2),
        }
    return values, keys


def _dtype(d: Mapping[str, Any], where: str) -> str:
    """torch_dtype (or `dtype`, its newer name) -> bf16/fp16/fp32; absent means bf16."""
    raw = d.get("torch_dtype", d.get("dtype"))
    if raw is None:
        return "bf16"
    if not isinstance(raw, str) or raw not in _TORCH_DTYPES:
        raise ConfigError(f"{where}: torch_dtype={raw!r} is not one of {', '.join(_TORCH_DTYPES)}")
    return _TORCH_DTYPES[raw]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _validate(v: Mapping[str, Any], where: str, keys: Mapping[str, str]) -> None:
    """Check every rule on our field values; `keys` renames fields to the user's spelling."""

    def fail(rule: str) -> None:
        raise ConfigError(f"{where}: {rule}")

    def show(field: str) -> str:
        return f"{keys.get(field, field)}={v[field]!r}"

    if not isinstance(v["name"], str) or not v["name"]:
        fail(f"{show('name')} must be a non-empty string")
    for field in _POSITIVE_INTS:
        if not _is_int(v[field]) or v[field] <= 0:
            fail(f"{show(field)} must be an integer > 0")
    if not _is_int(v["type_vocab_size"]) or v["type_vocab_size"] < 0:
        fail(f"{show('type_vocab_size')} must be an integer >= 0")
    if v["fff_depth"] is not None and (
        not _is_int(v["fff_depth"]) or not 0 <= v["fff_depth"] <= MAX_FFF_DEPTH
    ):
        fail(f"fff_depth={v['fff_depth']!r} must be an integer from 0 to {MAX_FFF_DEPTH}")
    if v["head_dim_override"] is not None and (
        not _is_int(v["head_dim_override"]) or v["head_dim_override"] <= 0
    ):
        fail(f"head_dim={v['head_dim_override']!r} must be an integer > 0")
    for field in _BOOLS:
        if not isinstance(v[field], bool):
            fail(f"{show(field)} must be true or false")
    for field, choices in _CHOICES.items():
        if v[field] not in choices:
            fail(f"{show(field)} is not one of {', '.join(choices)}")
    if not _is_real(v["norm_eps"]) or v["norm_eps"] <= 0:
        fail(f"{show('norm_eps')} must be a number > 0")
    if not _is_real(v["rope_theta"]) or v["rope_theta"] < 0:
        fail(f"{show('rope_theta')} must be a number >= 0")
    heads, kv_heads = v["num_attention_heads"], v["num_key_value_heads"]
    if v["head_dim_override"] is None and v["hidden_size"] % heads:
        fail(f"{show('num_attention_heads')} must divide {show('hidden_size')}")
    if heads % kv_heads:
        fail(f"{show('num_key_value_heads')} must divide {show('num_attention_heads')}")
    if v["position"] == "rope":
        head_dim = v["head_dim_override"] or v["hidden_size"] // heads
        if head_dim % 2:
            fail(f"head_dim={head_dim} must be even for rope")
        if v["rope_theta"] <= 0:
            fail(f"{show('rope_theta')} must be > 0 for rope")
