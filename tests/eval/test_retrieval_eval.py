"""Retrieval metrics against a brute-force count, shard layout, and ITM re-ranking on a real tiny model."""

from __future__ import annotations

import pytest
import torch

from albef_ds.eval.comm import shard_bounds
from albef_ds.eval.itm import rerank_matrix
from albef_ds.eval.retrieval import retrieval_metrics
from albef_ds.model.retrieval import ALBEFRetrieval
from tests.helpers import SPECIAL, tiny_model_config


def brute_force(s_i2t, s_t2i, img2txt, txt2img):
    """Ranks by explicit loops; a tie with the ground truth counts against the query."""
    out = {}
    tr = []
    for i, gts in enumerate(img2txt):
        best = max(float(s_i2t[i, t]) for t in gts)
        rank = sum(1 for t in range(s_i2t.shape[1]) if t not in gts and float(s_i2t[i, t]) >= best)
        tr.append(rank)
    ir = []
    for t, i in enumerate(txt2img):
        gt = float(s_t2i[t, i])
        ir.append(sum(1 for j in range(s_t2i.shape[1]) if j != i and float(s_t2i[t, j]) >= gt))
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * sum(r < k for r in tr) / len(tr)
        out[f"img_r{k}"] = 100.0 * sum(r < k for r in ir) / len(ir)
    out["r_mean"] = sum(out[f"{d}_r{k}"] for d in ("txt", "img") for k in (1, 5, 10)) / 6
    return out


def _layout(n_img, gen):
    img2txt, txt2img = [], []
    for i in range(n_img):
        n = int(torch.randint(1, 6, (1,), generator=gen))  # 1..5 captions per image
        img2txt.append(list(range(len(txt2img), len(txt2img) + n)))
        txt2img.extend([i] * n)
    return img2txt, txt2img


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_brute_force_with_ties_and_several_captions(seed):
    gen = torch.Generator().manual_seed(seed)
    n_img = 14
    img2txt, txt2img = _layout(n_img, gen)
    n_txt = len(txt2img)
    # Few distinct values: many ties, also between the ground truth and other candidates.
    s = torch.randint(0, 4, (n_img, n_txt), generator=gen).float()
    s_t2i = torch.randint(0, 4, (n_txt, n_img), generator=gen).float()
    got = retrieval_metrics(s, img2txt, txt2img)
    want = brute_force(s, s.t(), img2txt, txt2img)
    got2 = retrieval_metrics(s, img2txt, txt2img, scores_t2i=s_t2i)
    want2 = brute_force(s, s_t2i, img2txt, txt2img)
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k
        assert got2[k] == pytest.approx(want2[k]), k


def test_constant_scores_are_not_perfect():
    img2txt, txt2img = [[0, 1], [2], [3]], [0, 0, 1, 2]
    m = retrieval_metrics(torch.zeros(3, 4), img2txt, txt2img)
    assert m["txt_r1"] == 0 and m["img_r1"] == 0


@pytest.mark.parametrize("n,world,align", [(10, 2, 4), (7, 3, 1), (3, 4, 2), (0, 2, 8), (100, 3, 7)])
def test_shards_are_contiguous_disjoint_and_aligned(n, world, align):
    b = shard_bounds(n, world, align)
    assert len(b) == world and b[0][0] == 0 and b[-1][1] == n
    for (s0, e0), (s1, _) in zip(b, b[1:]):
        assert e0 == s1 and s0 <= e0
    assert all(s % align == 0 or s == n for s, _ in b)


def test_rerank_changes_order_only_inside_topk():
    # 1 query, 8 candidates; ITC order is 0 > 1 > ... > 7. Top-3 = {0, 1, 2}; ITM reverses them.
    itc = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])
    topk = itc.topk(3, dim=1).indices
    itm = torch.tensor([[-2.0, 1.0, 5.0]])  # scores of candidates 0, 1, 2
    final = rerank_matrix(itc, topk, itm)
    order = final[0].argsort(descending=True).tolist()
    assert order[:3] == [2, 1, 0]  # inside the top-k: ITM order
    assert order[3:] == [3, 4, 5, 6, 7]  # outside: the ITC order, every one below the top-k
    assert final[0, 3:].max() < final[0, :3].min()


def test_itm_scores_are_the_fusion_heads_positive_logit(tmp_path):
    """The pipeline's re-ranked scores equal the ITM head applied pair by pair, and its top-k sets are the
    ITC top-k (tiny random model; no mocks)."""
    from albef_ds.eval.itm import _encode_texts, retrieval_scores

    torch.manual_seed(0)
    cfg = tiny_model_config(queue_size=0)
    model = ALBEFRetrieval(cfg, special_tokens=SPECIAL).eval()

    class Tok:  # ids from words: a real (if trivial) tokenizer interface
        max_tokens = 6
        pad_token_id = 0

        def __call__(self, texts):
            rows = [[2] + [5 + sum(map(ord, w)) % 40 for w in t.split()][:5] for t in texts]
            n = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), n, dtype=torch.long)
            mask = torch.zeros(len(rows), n, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            return {"input_ids": ids, "attention_mask": mask}

    g = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, 32, 32, generator=g)

    class Set:
        num_images, texts = 5, [f"w{i} x{i % 3} y" for i in range(9)]
        num_texts = 9
        img2txt = [[0, 1], [2, 3], [4], [5, 6], [7, 8]]
        txt2img = [0, 0, 1, 1, 2, 3, 3, 4, 4]

        def image_batches(self, start, end, *, batch_size, device="cpu", num_workers=0):
            for s in range(start, end, batch_size):
                yield images[s : min(end, s + batch_size)], torch.arange(s, min(end, s + batch_size))

    k = 3
    sc = retrieval_scores(
        model, Set(), Tok(), device=torch.device("cpu"), k_test=k, batch_size=2, itm_batch_size=4
    )
    with torch.no_grad():
        tokens, f_img = model.encode_image(images)
        states, mask, f_txt = _encode_texts(
            model, Set.texts, Tok(), 0, 9, device=torch.device("cpu"), batch_size=9, bar=_NoBar()
        )
        itc = f_img @ f_txt.t()
        assert torch.allclose(sc.itc, itc, atol=1e-5)
        for i in range(5):
            top = set(itc[i].topk(k).indices.tolist())
            assert set(sc.topk_i2t[i].tolist()) == top
            for t in top:
                fused = model.text_encoder.bert.fuse(states[t : t + 1], mask[t : t + 1], tokens[i : i + 1])
                assert sc.i2t[i, t].item() == pytest.approx(
                    model.itm_head(fused[:, 0])[0, 1].item(), abs=1e-4
                )
            others = [t for t in range(9) if t not in top]
            assert sc.i2t[i, others].max() < sc.i2t[i, list(top)].min()
        for t in range(9):
            top = set(itc[:, t].topk(k).indices.tolist())
            assert set(sc.topk_t2i[t].tolist()) == top
            for i in top:
                fused = model.text_encoder.bert.fuse(states[t : t + 1], mask[t : t + 1], tokens[i : i + 1])
                assert sc.t2i[t, i].item() == pytest.approx(
                    model.itm_head(fused[:, 0])[0, 1].item(), abs=1e-4
                )


class _NoBar:
    def update(self, n):
        pass
