"""KV caches that grow in place: the same keys and values as transformers' DynamicLayer,
appended without copying the cache at every step."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from relaygraph.agents.kv_cache import MIN_ROOM, GrowingLayer, growing_cache
from tests import tiny_models as tiny


def _step(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)


def test_appends_write_into_the_room_and_match_dynamic_layer() -> None:
    grown, plain = GrowingLayer(), DynamicLayer()
    moves = 0
    for seed, n in enumerate([7, 1, 1, 3, *[1] * 80]):
        k, v = _step(n, seed)
        before = grown._keys.data_ptr() if grown._keys is not None else None
        gk, gv = grown.update(k, v)
        pk, pv = plain.update(k, v)
        assert torch.equal(gk, pk) and torch.equal(gv, pv)
        moves += before is not None and grown._keys.data_ptr() != before
    assert grown.get_seq_length() == plain.get_seq_length() == 92
    assert moves == 1  # 92 positions: the first buffer (7 + 64) ran out once


def test_crop_reset_and_reindex_keep_it_correct() -> None:
    grown, plain = GrowingLayer(), DynamicLayer()
    for seed in range(5):
        k, v = _step(10, seed)
        grown.update(k, v), plain.update(k, v)
    grown.crop(-15), plain.crop(-15)
    k, v = _step(2, 9)
    assert torch.equal(grown.update(k, v)[0], plain.update(k, v)[0])  # written after the crop
    assert grown.get_seq_length() == 37
    grown.batch_repeat_interleave(2), plain.batch_repeat_interleave(2)  # a new tensor
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    assert torch.equal(grown.update(k, v)[1], plain.update(k, v)[1])
    grown.reset(), plain.reset()
    k, v = _step(3, 11)
    assert torch.equal(grown.update(k, v)[0], plain.update(k, v)[0])
    assert grown.get_seq_length() == 3


def test_a_model_decodes_the_same_with_it(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(tiny.build_random_model(tmp_path, seed=5),
                                                 dtype=torch.float32)
    ids = torch.tensor([[5, 9, 2, 7, 3, 8]])
    runs = []
    for cache in (DynamicCache(config=model.config), growing_cache(model.config)):
        assert isinstance(cache.layers[0], GrowingLayer) == (len(runs) == 1)
        feed, tokens = ids, []
        with torch.inference_mode():
            for _ in range(MIN_ROOM + 10):  # past the first buffer's room
                logits = model(input_ids=feed, cache=cache, use_cache=True).logits[0, -1]
                tokens.append(int(logits.argmax()))
                feed = torch.tensor([[tokens[-1]]])
        runs.append((tokens, cache.layers[0].keys.clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-6)
