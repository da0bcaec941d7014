"""Shared helpers of the family parity tests (test_families, test_moe, test_deepseek, test_gpt_oss_granite): random
checkpoints made once per module and random token ids."""

import numpy as np
import pytest

from jaxllm import parity


def checkpoint_maker(tmp_path_factory, base, variants, scale, seed=None, then=None):
    """get(name): the random checkpoint of config {**base, **variants[name]} (parity.random_checkpoint, seeded by
    `seed`, or by len(name) when it is None), made on first use and kept; `then(path)`, if given, is what get returns
    (made once as well)."""
    made = {}

    def get(name: str):
        if name not in made:
            path = parity.random_checkpoint({**base, **variants[name]}, tmp_path_factory.mktemp(name),
                                            seed=len(name) if seed is None else seed, scale=scale)
            made[name] = path if then is None else then(path)
        return made[name]
    return get


def checkpoints_fixture(base, variants, scale, seed=None, then=None):
    """A module-scoped `checkpoints` fixture: checkpoint_maker's get."""
    @pytest.fixture(scope="module")
    def checkpoints(tmp_path_factory):
        return checkpoint_maker(tmp_path_factory, base, variants, scale, seed, then)
    return checkpoints


def random_ids(vocab: int, batch: int, T: int, seed: int = 0) -> np.ndarray:
    """Seeded random token ids in [3, vocab): clear of the pad, EOS and BOS ids (0, 1, 2)."""
    return np.random.default_rng(seed).integers(3, vocab, (batch, T))


def compare_with_padding(params, reference, ids):
    """parity.compare on `ids` as they are, and with row 1 left-padded (its first 6 tokens masked out)."""
    from jaxllm.generation import positions_from_mask

    result = parity.compare(params, reference, ids)
    mask = np.ones_like(ids)
    mask[1, :6] = 0  # row 1 left-padded
    return result, parity.compare(params, reference, ids, np.asarray(positions_from_mask(mask)), mask)


def assert_logits_match(name, result, padded, tolerance, float64=None):
    """Both comparisons within `tolerance`, same argmax everywhere, on reference logits large enough to mean it.
    `float64`: (checkpoint path, the ids compared): ours also as close to Transformers' float64 run as Transformers'
    own fp32 run is."""
    versus = ""
    if float64 is not None:
        path, ids = float64
        positions = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
        fp64 = parity.reference_logits(parity.reference_model(path, "float64"), ids, positions)
        noise, ours = (parity.compare_logits(fp64, x).max_abs_diff for x in (result.reference, result.ours))
        versus = f"vs float64 {ours:.3g} (Transformers fp32 vs float64 {noise:.3g}), "
    print(f"{name}: max_abs_diff={result.max_abs_diff:.3g} (padded {padded.max_abs_diff:.3g}), {versus}"
          f"logits reach {np.abs(result.reference).max():.1f}")
    assert np.abs(result.reference).max() > 1.5, "reference logits too small to make the comparison meaningful"
    assert result.max_abs_diff <= tolerance and padded.max_abs_diff <= tolerance
    if float64 is not None:
        assert ours <= 2 * noise + 1e-6
    assert result.argmax_agreement == 1.0 and padded.argmax_agreement == 1.0
