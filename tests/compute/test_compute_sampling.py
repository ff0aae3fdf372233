"""The protocol sampler: replayable, seeded, and a faithful sample of softmax(logits / T)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from infergrid.protocol import sampling


def _logits(seed: int, n: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale


def test_step_seed_is_sha256_of_seed_and_step() -> None:
    expected = hashlib.sha256((123).to_bytes(8, "big") + (4).to_bytes(8, "big")).digest()[:8]
    assert sampling.step_seed(123, 4) == int.from_bytes(expected, "big")
    # Seeds are taken modulo 2**64, so negative and huge seeds are defined too.
    assert sampling.step_seed(-1, 0) == sampling.step_seed(2**64 - 1, 0)
    assert sampling.step_seed(2**70 + 5, 3) == sampling.step_seed(5, 3)
    with pytest.raises(ValueError):
        sampling.step_seed(1, -1)


def test_noise_is_reproducible_float64_cpu_and_step_dependent() -> None:
    a = sampling.gumbel_noise(42, 0, 1000)
    assert a.dtype == torch.float64 and a.device.type == "cpu"
    assert torch.equal(a, sampling.gumbel_noise(42, 0, 1000))
    assert not torch.equal(a, sampling.gumbel_noise(42, 1, 1000))
    assert not torch.equal(a, sampling.gumbel_noise(43, 0, 1000))
    # Standard Gumbel: mean is the Euler–Mascheroni constant, variance pi^2 / 6.
    big = sampling.gumbel_noise(7, 0, 200_000)
    assert abs(big.mean().item() - 0.5772) < 0.01
    assert abs(big.var().item() - math.pi**2 / 6) < 0.03


def test_sample_is_deterministic_and_seed_sensitive() -> None:
    logits = _logits(0, 500, scale=1.0)
    first = [sampling.sample_token(logits, 9, step, 1.0) for step in range(50)]
    again = [sampling.sample_token(logits, 9, step, 1.0) for step in range(50)]
    other = [sampling.sample_token(logits, 10, step, 1.0) for step in range(50)]
    assert first == again
    assert first != other
    assert len(set(first)) > 10  # flat-ish logits: many different tokens over the steps


def test_sample_equals_argmax_of_perturbed_scores() -> None:
    logits = _logits(1, 300)
    for step in range(20):
        scores = sampling.perturbed_scores(logits, 5, step, 0.7, top_p=0.9, top_k=50)
        assert sampling.sample_token(logits, 5, step, 0.7, 0.9, 50) == int(scores.argmax())


def test_temperature_zero_is_greedy_and_ignores_the_seed() -> None:
    logits = _logits(2, 1000)
    best = int(logits.argmax())
    assert {sampling.sample_token(logits, seed, 3, 0.0) for seed in range(20)} == {best}
    with pytest.raises(ValueError):
        sampling.perturbed_scores(logits, 1, 0, 0.0)


def test_tiny_top_p_and_top_k_one_are_argmax() -> None:
    logits = _logits(3, 1000, scale=0.5)  # flat enough that plain sampling rarely picks argmax
    best = int(logits.argmax())
    assert {sampling.sample_token(logits, s, 0, 1.0, top_p=1e-9) for s in range(50)} == {best}
    assert {sampling.sample_token(logits, s, 0, 1.0, top_k=1) for s in range(50)} == {best}
    assert {sampling.sample_token(logits, s, 0, 1.0) for s in range(50)} != {best}


def test_top_k_only_emits_the_k_best() -> None:
    logits = _logits(4, 200, scale=0.3)
    allowed = set(torch.topk(logits, 5).indices.tolist())
    emitted = {sampling.sample_token(logits, s, 0, 2.0, top_k=5) for s in range(200)}
    assert emitted <= allowed and len(emitted) == 5


def _reference_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Full-sort definition: keep i iff the mass strictly more likely than i is < top_p."""
    probs = torch.softmax(scores.double(), -1)
    order = torch.sort(probs, descending=True).values
    keep = torch.zeros_like(probs, dtype=torch.bool)
    for i, p in enumerate(probs.tolist()):
        keep[i] = order[order > p].sum().item() < top_p
    return keep


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_mask_matches_the_definition(top_p: float) -> None:
    logits = _logits(5, 400, scale=2.0)
    mask = sampling.allowed_mask(logits, 1.0, top_p, None)
    assert mask is not None
    assert torch.equal(mask, _reference_top_p(logits, top_p))


def test_top_p_keeps_ties_together() -> None:
    logits = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0])
    mask = sampling.allowed_mask(logits, 1.0, 0.6, None)
    assert mask is not None
    # p(token 0) is about 0.45 < 0.6, so every token tied at the next level is kept.
    assert mask.tolist() == [True, True, True, True, False]


def test_no_mask_when_nothing_is_cut() -> None:
    logits = _logits(6, 100)
    assert sampling.allowed_mask(logits, 1.0, None, None) is None
    assert sampling.allowed_mask(logits, 1.0, 1.0, 0) is None


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_samples_follow_softmax_of_scaled_logits(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3, -2.0])
    expected = torch.softmax(logits.double() / temperature, -1)
    n = 6000  # a fixed seed set, so the test cannot flake
    counts = torch.zeros(len(logits), dtype=torch.float64)
    for seed in range(n):
        counts[sampling.sample_token(logits, seed, 0, temperature)] += 1
    chi2 = (((counts - n * expected) ** 2) / (n * expected)).sum().item()
    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001 for a correct sampler.
    assert chi2 < 20.5, (counts / n, expected)


def test_steps_of_one_seed_are_independent_draws() -> None:
    logits = torch.tensor([0.0, 0.0])
    draws = [sampling.sample_token(logits, 1234, step, 1.0) for step in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.5) < 0.03


def test_token_logprobs_are_the_natural_distribution() -> None:
    logits = _logits(8, 50)
    lp = sampling.token_logprobs(logits)
    assert lp.dtype == torch.float64
    assert torch.allclose(lp, torch.log_softmax(logits.double(), -1))


def test_float32_and_float64_logits_sample_alike() -> None:
    logits = _logits(9, 1000)
    for step in range(20):
        a = sampling.sample_token(logits, 3, step, 0.8, 0.95, 40)
        b = sampling.sample_token(logits.double(), 3, step, 0.8, 0.95, 40)
        assert a == b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_logits_sample_like_cpu_logits() -> None:
    logits = _logits(10, 49152)
    on_gpu = logits.cuda()
    for step in range(20):
        assert sampling.sample_token(on_gpu, 11, step, 1.0, 0.9, 100) == sampling.sample_token(
            logits, 11, step, 1.0, 0.9, 100
        )


# The published test vectors of docs/protocol.md: (seed, step, key, index, g).
VECTORS = [
    (0, 0, 0x374708FFF7719DD5, 0, -0.22466112183669018),
    (0, 0, 0x374708FFF7719DD5, 1, -0.30501836382932462),
    (0, 0, 0x374708FFF7719DD5, 151935, 1.4323833298495217),
    (42, 3, 0x32D63C6C7B3DA14C, 0, 4.4695287417144112),
    (42, 3, 0x32D63C6C7B3DA14C, 1, 1.6539925636151525),
    (42, 3, 0x32D63C6C7B3DA14C, 151935, 0.51867086051789979),
    (-1, 7, 0x48707E32672B4BFC, 0, 0.93959340458533813),
    (2**64 + 5, 1000, 0x1320141665C6F146, 0, 0.57600628605163795),
]


@pytest.mark.parametrize(("seed", "step", "key", "index", "g"), VECTORS)
def test_noise_matches_the_published_vectors(
    seed: int, step: int, key: int, index: int, g: float
) -> None:
    assert sampling.step_seed(seed, step) == key
    assert float(sampling.gumbel_noise(seed, step, 151936)[index]) == pytest.approx(g, abs=1e-14)
    assert float(sampling.gumbel_noise_numpy(seed, step, 151936)[index]) == pytest.approx(
        g, abs=1e-14
    )
    at = sampling.gumbel_noise_at(key, torch.tensor([index]))
    assert float(at[0]) == pytest.approx(g, abs=1e-14)


def test_numpy_and_torch_noise_agree_on_every_token() -> None:
    torch_noise = sampling.gumbel_noise(123, 45, 50_000).numpy()
    numpy_noise = sampling.gumbel_noise_numpy(123, 45, 50_000)
    assert abs(torch_noise - numpy_noise).max() < 1e-13


def test_noise_of_a_subset_is_the_full_noise_at_those_tokens() -> None:
    full = sampling.gumbel_noise(9, 2, 10_000)
    picked = torch.tensor([0, 17, 4242, 9999])
    subset = sampling.gumbel_noise_at(sampling.step_seed(9, 2), picked)
    assert torch.equal(subset, full[picked])


def test_batched_rows_are_each_rows_noise_whatever_the_batch() -> None:
    keys = [sampling.step_seed(s, t) for s, t in [(1, 0), (2, 5), (1, 1)]]
    batch = sampling.gumbel_noise_rows(keys, 3000)
    for b, (s, t) in enumerate([(1, 0), (2, 5), (1, 1)]):
        assert torch.equal(batch[b], sampling.gumbel_noise(s, t, 3000))
    assert torch.equal(sampling.gumbel_noise_rows(keys[1:2], 3000)[0], batch[1])


def test_sample_rows_is_sample_token_per_row() -> None:
    logits = torch.randn(5, 700, generator=torch.Generator().manual_seed(3)) * 2
    rows = [
        sampling.RowSampling(1, 0, 0.0),
        sampling.RowSampling(2, 4, 0.7, top_p=0.9, top_k=50),
        sampling.RowSampling(3, 1, None),
        sampling.RowSampling(4, 2, 1.3, top_k=10),
        sampling.RowSampling(5, 9, 0.5, top_p=0.5),
    ]
    expected = [
        sampling.sample_token(logits[b], r.seed, r.step, r.temperature, r.top_p, r.top_k)
        for b, r in enumerate(rows)
    ]
    assert sampling.sample_rows(logits, rows) == expected
    perturbed = sampling.perturbed_rows(logits, rows)
    assert torch.equal(perturbed[0], logits[0].double())  # greedy rows are the raw logits
    assert torch.equal(perturbed[1], sampling.perturbed_scores(logits[1], 2, 4, 0.7, 0.9, 50))
    with pytest.raises(ValueError, match="expected"):
        sampling.perturbed_rows(logits[0], rows[:1])
    with pytest.raises(ValueError, match="temperature"):
        sampling.perturbed_rows(logits[:1], [sampling.RowSampling(1, 0, -1.0)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_top_k_fast_path_picks_the_definitions_token(dtype: torch.dtype) -> None:
    """sample_rows takes a top-k row from its k candidates alone; over many rows, steps and
    parameters (ties at the k-th value included) it emits exactly the argmax of the
    definition's perturbed scores over the whole vocabulary."""
    generator = torch.Generator().manual_seed(21)
    for case in range(300):
        logits = (torch.randn(2000, generator=generator) * 3).to(dtype)
        if case % 5 == 0:  # coarse logits: ties at the k-th value
            logits = logits.round()
        top_k = [1, 2, 5, 40, 300][case % 5]
        top_p = [None, 0.5, 0.9, 0.99][case % 4]
        temperature = [0.3, 0.8, 1.0, 1.7][case % 3]
        row = sampling.RowSampling(case, case % 7, temperature, top_p, top_k)
        definition = sampling.perturbed_scores(logits, case, case % 7, temperature, top_p, top_k)
        assert sampling.sample_rows(logits.unsqueeze(0), [row]) == [int(definition.argmax())]
