"""The llama.cpp engine: SmolLM2's GGUF served natively, many sequences in one batch.

It must build the prompts and text the transformers engine builds for the same model (the
protocol's prompt and text rules do not depend on the engine), run the protocol sampler over
llama.cpp's logits, and give each sequence of a batch the logits it would get alone.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (./dev installs it)"
)

from compute_helpers import MINER_ADDRESS  # noqa: E402

from infergrid.compute.engine import SamplingParams  # noqa: E402
from infergrid.compute.llamacpp_engine import (  # noqa: E402
    LlamaCppBackend,
    LlamaCppEngine,
    gguf_precision,
)
from infergrid.compute.miner_server import MinerServerThread, create_miner_app  # noqa: E402
from infergrid.compute.model_store import sha256_file, smollm2_gguf_path  # noqa: E402
from infergrid.compute.transformers_engine import TransformersEngine  # noqa: E402
from infergrid.protocol.models import DEFAULT_MODEL, model_id  # noqa: E402

pytestmark = pytest.mark.slow

# How far a sequence's logits in a batch may lie from the same sequence's logits alone, and
# from a teacher-forced pass: not at all. The engine picks llama.cpp kernels that compute each
# row alike whatever shares its batch (see llamacpp_engine._Context); any other choice moved
# SmolLM2 Q4_1's logits by 0.6-1.7.
BATCH_TOLERANCE = 0.0

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
    ],
    [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Und auf Deutsch? Schreib «vier» ✓ 🐉"},
    ],
    [{"role": "user", "content": "  leading spaces,\ttabs\nand\n\nnewlines  "}],
]
TEXTS = [
    "Hello, world!",
    " a dragon é ✓ 🐉 日本語",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x ** 2\n",
    "",
]


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    e = LlamaCppEngine.load("smollm2", num_threads=1, max_batch=4)
    yield e
    e.close()


@pytest.fixture(scope="module")
def question(engine: LlamaCppEngine) -> list[int]:
    return engine.chat_prompt_ids(CONVERSATIONS[0])


# -- identity ------------------------------------------------------------------------------------


def test_identity_is_the_gguf_at_its_quantization(engine: LlamaCppEngine) -> None:
    digest = sha256_file(smollm2_gguf_path())
    assert engine.name == DEFAULT_MODEL
    assert engine.precision == "gguf-q4_1"
    assert engine.weights_digest == digest
    assert engine.model_id == model_id(DEFAULT_MODEL, digest, "main", "gguf-q4_1")
    assert engine.context_length == 8192
    assert engine.vocab_size == 49152
    assert engine.max_batch == 4


def test_its_model_id_differs_from_the_dequantized_models(
    engine: LlamaCppEngine, smollm2: TransformersEngine
) -> None:
    """Same file, other logits: a verifier must audit a llama.cpp miner with llama.cpp."""
    assert engine.weights_digest == smollm2.weights_digest
    assert engine.model_id != smollm2.model_id


def test_gguf_precision_names_the_file_type() -> None:
    assert gguf_precision(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1) == "gguf-q4_1"
    assert gguf_precision(llama_cpp.LLAMA_FTYPE_MOSTLY_F16) == "gguf-f16"
    assert gguf_precision(llama_cpp.LLAMA_FTYPE_ALL_F32) == "gguf-f32"
    with pytest.raises(ValueError, match="unknown GGUF file type"):
        gguf_precision(99999)


def test_load_refuses_what_is_not_a_gguf(tmp_path: object) -> None:
    with pytest.raises(FileNotFoundError, match=r"'smollm2' or a \.gguf file"):
        LlamaCppEngine.load("tiny")
    with pytest.raises(FileNotFoundError, match=r"'smollm2' or a \.gguf file"):
        LlamaCppEngine.load("/nonexistent/model.gguf")
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        LlamaCppEngine.load("smollm2", max_batch=0)
    with pytest.raises(ValueError, match="num_threads must be at least 1"):
        LlamaCppEngine.load("smollm2", num_threads=0)
    with pytest.raises(ValueError, match="kv_cache_type must be one of q8_0, f16"):
        LlamaCppEngine.load("smollm2", kv_cache_type="q4_0")


def test_the_engine_factory_loads_it() -> None:
    from infergrid.compute.engine_factory import load_engine

    engine = load_engine("llamacpp", "smollm2", num_threads=1, max_batch=2)
    try:
        assert isinstance(engine, LlamaCppEngine)
        assert engine.max_batch == 2 and engine.precision == "gguf-q4_1"
    finally:
        engine.close()


# -- tokenizer: the transformers engine's, exactly --------------------------------------------


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one", "system", "multi", "spaces"])
def test_chat_prompt_ids_equal_the_transformers_engines(
    engine: LlamaCppEngine, smollm2: TransformersEngine, conversation: list[dict[str, str]]
) -> None:
    assert engine.chat_prompt_ids(conversation) == smollm2.chat_prompt_ids(conversation)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_the_transformers_engines(
    engine: LlamaCppEngine, smollm2: TransformersEngine, text: str
) -> None:
    assert engine.encode(text) == smollm2.encode(text)


def test_decode_equals_the_transformers_engines(
    engine: LlamaCppEngine, smollm2: TransformersEngine
) -> None:
    """Every single token, and random runs of tokens (bytes of a character split across
    tokens decode to U+FFFD alike), with special tokens skipped."""
    for token in range(engine.vocab_size):
        assert engine.decode([token]) == smollm2.decode([token]), token
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(engine.vocab_size) for _ in range(rng.randrange(1, 24))]
        assert engine.decode(ids) == smollm2.decode(ids), ids
    assert engine.decode([]) == ""


def test_eos_and_token_bytes_equal_the_transformers_engines(
    engine: LlamaCppEngine, smollm2: TransformersEngine
) -> None:
    assert engine.eos_token_ids == smollm2.eos_token_ids
    for token in [0, 1, 2, 17, 198, 1000, 30000, engine.vocab_size - 1]:
        assert engine.token_bytes(token) == smollm2.token_bytes(token), token
    with pytest.raises(ValueError, match="not in the vocabulary"):
        engine.token_bytes(engine.vocab_size)


# -- the batch backend ---------------------------------------------------------------------------


def _alone(engine: LlamaCppEngine, slot: int, prompt: list[int], steps: list[int]) -> torch.Tensor:
    """Logits after the prompt and after each of `steps`, with only this slot in each pass."""
    rows = [engine.backend.forward([(slot, prompt)])[0]]
    rows += [engine.backend.forward([(slot, [t])])[0] for t in steps]
    engine.backend.release(slot)
    return torch.stack(rows).double()


def test_batched_logits_equal_each_sequence_run_alone(engine: LlamaCppEngine) -> None:
    """Four prompts of different lengths prefilled together, then decoded together for a few
    steps, get the logits each gets alone (within BATCH_TOLERANCE)."""
    prompts = [engine.chat_prompt_ids(c) for c in CONVERSATIONS]
    steps = [[engine.encode(w)[0] for w in [" one", " two", " three"]]] * len(prompts)
    backend = engine.backend
    alone = [_alone(engine, s, p, steps[s]) for s, p in enumerate(prompts)]
    batched = [[row] for row in backend.forward(list(enumerate(prompts)))]
    for step in range(3):
        out = backend.forward([(s, [steps[s][step]]) for s in range(len(prompts))])
        for s in range(len(prompts)):
            batched[s].append(out[s])
    for s in range(len(prompts)):
        backend.release(s)
        diff = (torch.stack(batched[s]).double() - alone[s]).abs().max().item()
        assert diff <= BATCH_TOLERANCE, (s, diff)
        assert torch.equal(torch.stack(batched[s]).argmax(-1), alone[s].argmax(-1))


def test_a_released_slot_starts_afresh(engine: LlamaCppEngine, question: list[int]) -> None:
    backend = engine.backend
    first = backend.forward([(1, question)])[0].clone()
    backend.forward([(1, [42])])
    backend.release(1)
    again = backend.forward([(1, question)])[0]
    backend.release(1)
    assert (again - first).abs().max().item() <= BATCH_TOLERANCE


def test_a_long_prompt_on_two_threads_decodes_as_its_teacher_forced_pass() -> None:
    """512 cache cells in use (300+ tokens, padded) and one query per step, on two threads:
    where llama.cpp's F16-cache attention splits the sum by thread (and moved logits by 0.86)."""
    engine = LlamaCppEngine.load("smollm2", num_threads=2, max_batch=2)
    try:
        prompt = engine.chat_prompt_ids([{"role": "user", "content": "word " * 300}])
        assert len(prompt) > 256
        steps = [engine.encode(w)[0] for w in [" one", " two", " three"]]
        alone = _alone(engine, 0, prompt, steps)
        forced = engine.teacher_forced_logits(prompt, [*steps, 0])
        assert (alone - forced).abs().max().item() <= BATCH_TOLERANCE
    finally:
        engine.close()


def test_forward_refuses_bad_work(engine: LlamaCppEngine) -> None:
    backend: LlamaCppBackend = engine.backend
    with pytest.raises(ValueError, match=r"slot 4 is not in 0\.\.3"):
        backend.forward([(4, [1])])
    with pytest.raises(ValueError, match="appears twice"):
        backend.forward([(0, [1]), (0, [2])])
    with pytest.raises(ValueError, match="no tokens"):
        backend.forward([(0, [])])
    with pytest.raises(ValueError, match="at least one entry"):
        backend.forward([])
    with pytest.raises(ValueError, match="slot -1 is not in"):
        backend.release(-1)


# -- generation ----------------------------------------------------------------------------------


def test_greedy_answers_follow_the_teacher_forced_argmax(
    engine: LlamaCppEngine, question: list[int]
) -> None:
    """Each greedy token is the argmax of the logits a teacher-forced pass gives before it
    (a near-tie may fall either way between the two passes; SmolLM2 Q4_1's first token here is
    one: "L" over "The", so no fixed text is asserted)."""
    tokens = list(engine.generate(question, SamplingParams(max_tokens=24, temperature=0.0)))
    output = [t.token_id for t in tokens]
    logits = engine.teacher_forced_logits(question, output)
    for step, token in enumerate(output):
        best = logits[step].max().item()
        assert logits[step, token].item() >= best - BATCH_TOLERANCE, step
    text = "".join(t.text for t in tokens)
    assert text == engine.decode(output)
    assert tokens[-1].finish_reason in ("stop", "length")


def test_logprobs_match_a_teacher_forced_pass(engine: LlamaCppEngine, question: list[int]) -> None:
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=3)
    tokens = list(engine.generate(question, params))
    output = [t.token_id for t in tokens]
    logits = engine.teacher_forced_logits(question, output)
    assert logits.shape == (len(output), engine.vocab_size)
    assert logits.dtype == torch.float64
    reference = torch.log_softmax(logits, dim=-1)
    for step, tok in enumerate(tokens):
        assert tok.logprob == pytest.approx(reference[step, tok.token_id].item(), abs=1e-9)


def test_concurrent_generations_equal_their_solo_runs(
    engine: LlamaCppEngine, question: list[int]
) -> None:
    """Four requests at once (one batch) sample the tokens each samples alone."""
    params = [SamplingParams(max_tokens=12, temperature=0.8, seed=s) for s in range(4)]
    solo = [[t.token_id for t in engine.generate(question, p)] for p in params]
    together: list[list[int]] = [[] for _ in params]
    start = threading.Barrier(len(params))

    def run(i: int) -> None:
        start.wait()
        together[i] = [t.token_id for t in engine.generate(question, params[i])]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(params))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == solo


def test_generate_refuses_bad_prompts(engine: LlamaCppEngine) -> None:
    params = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([], params)
    with pytest.raises(ValueError, match="leaves no room"):
        engine.generate([1] * engine.context_length, params)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        engine.generate([engine.vocab_size], params)
    with pytest.raises(ValueError, match="a prompt and at least one output token"):
        engine.teacher_forced_logits([1], [])


# -- behind the miner app ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def miner(engine: LlamaCppEngine) -> Iterator[MinerServerThread]:
    app = create_miner_app(engine, node_address=MINER_ADDRESS, max_concurrency=4)
    with MinerServerThread(app) as server:
        yield server


def test_the_miner_streams_llamacpp_answers(
    engine: LlamaCppEngine, miner: MinerServerThread
) -> None:
    import openai

    client = openai.OpenAI(base_url=miner.url + "/v1", api_key="unused", max_retries=0)
    messages = CONVERSATIONS[0]
    whole = client.chat.completions.create(
        model=engine.name, messages=messages, temperature=0, max_tokens=40
    )
    assert whole.choices[0].message.content
    stream = client.chat.completions.create(
        model=engine.name, messages=messages, temperature=0, max_tokens=40, stream=True
    )
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == whole.choices[0].message.content


def test_the_miner_cuts_llamacpp_answers_at_stop_and_budget(
    engine: LlamaCppEngine, miner: MinerServerThread
) -> None:
    import openai

    client = openai.OpenAI(base_url=miner.url + "/v1", api_key="unused", max_retries=0)
    messages = CONVERSATIONS[1]
    full = client.chat.completions.create(
        model=engine.name, messages=messages, temperature=0, max_tokens=40
    )
    assert full.choices[0].finish_reason == "stop"  # the model's own end of turn
    text = full.choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(
        model=engine.name, messages=messages, temperature=0, max_tokens=40, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    short = client.chat.completions.create(
        model=engine.name, messages=messages, temperature=0.7, max_tokens=3, seed=1
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 3
