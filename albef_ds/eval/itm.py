"""Distributed image-text retrieval: ITC similarities, top-k candidates re-scored by the ITM head.

One call, on every rank of a group (or in one process):

1. each rank encodes only its contiguous share of the images and of the texts (`shard_bounds`, cut at
   multiples of the batch size: no padded duplicates, and every batch is the one a single process forms);
2. the unit ITC features, image tokens and text states are gathered with known counts, and every rank
   forms the (N_img, N_txt) ITC similarity matrix;
3. the top-k texts of each image and the top-k images of each text are re-scored by the ITM head on the
   fusion encoder's [CLS]; the query rows are split across ranks (again cut at whole fusion passes) and the
   (rows, k) scores gathered;
4. final scores: the ITM positive logit inside each query's top-k (as the reference), and outside it the ITC
   order shifted below every re-ranked candidate. The reference writes -100 outside the top-k, so their
   order there is arbitrary; here a candidate outside the top-k keeps its ITC rank, which equals the
   reference whenever k >= 10 and makes re-ranking change the ranking only inside the top-k.

Memory: every rank holds all image tokens and text states (as the reference does, which also encoded
everything on every rank): COCO 5k test at 384 px is about 8.9 GB of fp32 image tokens (half in bf16).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .comm import LocalComm, shard_bounds
from .retrieval import retrieval_metrics

log = logging.getLogger(__name__)


@dataclass
class RetrievalScores:
    """Score matrices of one evaluation (on the CPU, fp32)."""

    itc: torch.Tensor  # (N_img, N_txt) unit-feature dot products
    i2t: torch.Tensor  # (N_img, N_txt) final text-retrieval scores (ITM inside each image's top-k)
    t2i: torch.Tensor  # (N_txt, N_img) final image-retrieval scores (ITM inside each text's top-k)
    topk_i2t: torch.Tensor  # (N_img, k) text indices re-scored for each image
    topk_t2i: torch.Tensor  # (N_txt, k) image indices re-scored for each text


def rerank_matrix(itc: torch.Tensor, topk_idx: torch.Tensor, itm: torch.Tensor) -> torch.Tensor:
    """Final (R, C) scores of R queries: itm (R, k) at columns topk_idx (R, k); every other column keeps
    its ITC order, shifted strictly below the row's lowest ITM score."""
    itc, itm = itc.float(), itm.float()
    floor = itm.min(dim=1, keepdim=True).values - 1.0  # (R, 1)
    below = itc - itc.max(dim=1, keepdim=True).values + floor  # (R, C), every value <= floor
    return below.scatter(1, topk_idx, itm)


def _param_dtype(model) -> torch.dtype:
    return next(model.visual_encoder.parameters()).dtype


def _pad_to(x: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    """(B, L) -> (B, length) padded on the right (texts of every batch and rank share one length)."""
    if x.shape[1] >= length:
        return x[:, :length]
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)


@torch.no_grad()
def _encode_images(model, eval_set, start, end, *, device, batch_size, num_workers, bar):
    dtype = _param_dtype(model)
    tokens, feats = [], []
    batches = eval_set.image_batches(
        start, end, batch_size=batch_size, device=device, num_workers=num_workers
    )
    for images, _ in batches:
        emb, f = model.encode_image(images.to(device, dtype, non_blocking=True))
        tokens.append(emb)  # (B, 1+N, W)
        feats.append(f.float())  # (B, D)
        bar.update(images.shape[0])
    if not tokens:
        w = model.visual_encoder.embed_dim
        n = model.visual_encoder.patch_embed.num_patches + 1
        d = model.vision_proj.out_features
        return torch.zeros(0, n, w, device=device, dtype=dtype), torch.zeros(0, d, device=device)
    return torch.cat(tokens), torch.cat(feats)


@torch.no_grad()
def _encode_texts(model, texts, tokenizer, start, end, *, device, batch_size, bar):
    length = tokenizer.max_tokens
    states, masks, feats = [], [], []
    for s in range(start, end, batch_size):
        tok = tokenizer(texts[s : min(end, s + batch_size)])
        ids = _pad_to(tok["input_ids"], length, tokenizer.pad_token_id).to(device)
        mask = _pad_to(tok["attention_mask"], length, 0).to(device)
        st, f = model.encode_text(ids, mask)
        states.append(st)  # (B, L, H)
        masks.append(mask)  # (B, L)
        feats.append(f.float())  # (B, D)
        bar.update(ids.shape[0])
    if not states:
        h = model.text_proj.in_features
        d = model.text_proj.out_features
        return (
            torch.zeros(0, length, h, device=device, dtype=_param_dtype(model)),
            torch.zeros(0, length, dtype=torch.long, device=device),
            torch.zeros(0, d, device=device),
        )
    return torch.cat(states), torch.cat(masks), torch.cat(feats)


def _itm_positive(model, text_states, text_mask, image_tokens) -> torch.Tensor:
    """ITM positive logit of N (text, image) pairs: (N, L, H), (N, L), (N, 1+P, W) -> (N,) fp32."""
    fused = model.text_encoder.bert.fuse(text_states, text_mask, image_tokens)[:, 0]
    return model.itm_head(fused)[:, 1].float()


@torch.no_grad()
def _rerank_rows(sims, rows, k, pairs_fn, model, *, rows_per_pass, bar):
    """Top-k of sims[rows] re-scored by ITM: (n, k) scores and (n, k) candidate indices."""
    start, end = rows
    scores, idxs = [], []
    for r0 in range(start, end, rows_per_pass):
        r1 = min(end, r0 + rows_per_pass)
        idx = sims[r0:r1].topk(k, dim=1).indices  # (R, k)
        text_states, text_mask, image_tokens = pairs_fn(r0, r1, idx)
        scores.append(_itm_positive(model, text_states, text_mask, image_tokens).view(r1 - r0, k))
        idxs.append(idx)
        bar.update(r1 - r0)
    if not scores:
        return sims.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=sims.device)
    return torch.cat(scores), torch.cat(idxs)


@torch.no_grad()
def retrieval_scores(
    model,
    eval_set,
    tokenizer,
    *,
    device: torch.device,
    k_test: int,
    batch_size: int = 128,
    itm_batch_size: int = 256,
    comm=None,
    num_workers: int = 0,
    progress: bool = True,
) -> RetrievalScores:
    """ITC and ITM-re-ranked score matrices of a RetrievalEvalSet (see the module docstring); on every rank.

    model: an ALBEF module (`encode_image`, `encode_text`, `text_encoder.bert.fuse`, `itm_head`);
    comm: `LocalComm` (default) or `ProcessGroupComm`; every rank of the group must call this."""
    comm = comm or LocalComm()
    world, rank = comm.world_size, comm.rank
    n_img, n_txt = eval_set.num_images, eval_set.num_texts
    show = progress and rank == 0
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        img_shards = shard_bounds(n_img, world, batch_size)
        txt_shards = shard_bounds(n_txt, world, batch_size)
        (ia, ib), (ta, tb) = img_shards[rank], txt_shards[rank]
        with tqdm(total=(ib - ia) + (tb - ta), desc="encode (rank 0)", disable=not show, unit="item") as bar:
            img_tokens, img_feat = _encode_images(
                model,
                eval_set,
                ia,
                ib,
                device=device,
                batch_size=batch_size,
                num_workers=num_workers,
                bar=bar,
            )
            txt_states, txt_mask, txt_feat = _encode_texts(
                model, eval_set.texts, tokenizer, ta, tb, device=device, batch_size=batch_size, bar=bar
            )
        img_counts = [b - a for a, b in img_shards]
        txt_counts = [b - a for a, b in txt_shards]
        img_feat = comm.gather_rows(img_feat, img_counts)  # (N_img, D)
        txt_feat = comm.gather_rows(txt_feat, txt_counts)  # (N_txt, D)
        img_tokens = comm.gather_rows(img_tokens, img_counts)  # (N_img, 1+P, W)
        txt_states = comm.gather_rows(txt_states, txt_counts)  # (N_txt, L, H)
        txt_mask = comm.gather_rows(txt_mask, txt_counts)  # (N_txt, L)
        t_enc = time.perf_counter() - t0

        sims = img_feat @ txt_feat.t()  # (N_img, N_txt), identical on every rank
        k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)

        def i2t_pairs(r0, r1, idx):  # queries = images r0..r1, candidates = their top-k texts
            flat = idx.reshape(-1)
            return txt_states[flat], txt_mask[flat], img_tokens[r0:r1].repeat_interleave(k_i2t, dim=0)

        def t2i_pairs(r0, r1, idx):  # queries = texts r0..r1, candidates = their top-k images
            flat = idx.reshape(-1)
            return (
                txt_states[r0:r1].repeat_interleave(k_t2i, dim=0),
                txt_mask[r0:r1].repeat_interleave(k_t2i, dim=0),
                img_tokens[flat],
            )

        rows_i2t = max(1, itm_batch_size // k_i2t)  # queries per fusion pass
        rows_t2i = max(1, itm_batch_size // k_t2i)
        i2t_shards = shard_bounds(n_img, world, rows_i2t)
        t2i_shards = shard_bounds(n_txt, world, rows_t2i)
        own = (i2t_shards[rank][1] - i2t_shards[rank][0]) + (t2i_shards[rank][1] - t2i_shards[rank][0])
        with tqdm(
            total=own, desc=f"ITM re-rank top-{k_test} (rank 0)", disable=not show, unit="query"
        ) as bar:
            s_i2t, idx_i2t = _rerank_rows(
                sims, i2t_shards[rank], k_i2t, i2t_pairs, model, rows_per_pass=rows_i2t, bar=bar
            )
            sims_t = sims.t().contiguous()  # (N_txt, N_img)
            s_t2i, idx_t2i = _rerank_rows(
                sims_t, t2i_shards[rank], k_t2i, t2i_pairs, model, rows_per_pass=rows_t2i, bar=bar
            )
        s_i2t = comm.gather_rows(s_i2t, [b - a for a, b in i2t_shards])  # (N_img, k)
        idx_i2t = comm.gather_rows(idx_i2t, [b - a for a, b in i2t_shards])
        s_t2i = comm.gather_rows(s_t2i, [b - a for a, b in t2i_shards])  # (N_txt, k)
        idx_t2i = comm.gather_rows(idx_t2i, [b - a for a, b in t2i_shards])
        log.info(
            "retrieval on %d images / %d texts over %d rank(s): encoding %.1fs, ITM re-rank of top-%d %.1fs",
            n_img,
            n_txt,
            world,
            t_enc,
            k_test,
            time.perf_counter() - t0 - t_enc,
        )
        sims = sims.cpu()
        sims_t = sims_t.cpu()
        return RetrievalScores(
            itc=sims,
            i2t=rerank_matrix(sims, idx_i2t.cpu(), s_i2t.cpu()),
            t2i=rerank_matrix(sims_t, idx_t2i.cpu(), s_t2i.cpu()),
            topk_i2t=idx_i2t.cpu(),
            topk_t2i=idx_t2i.cpu(),
        )
    finally:
        model.train(was_training)


def evaluate_retrieval(
    model, eval_set, tokenizer, *, device: torch.device, k_test: int, return_scores: bool = False, **kw
):
    """Metrics of ITM-re-ranked retrieval (txt_r1..r_mean) plus the ITC-only ones (itc_txt_r1, ...).

    Same arguments as `retrieval_scores`. Returns the metrics dict, or (metrics, RetrievalScores)."""
    sc = retrieval_scores(model, eval_set, tokenizer, device=device, k_test=k_test, **kw)
    metrics = retrieval_metrics(sc.i2t, eval_set.img2txt, eval_set.txt2img, scores_t2i=sc.t2i)
    itc = retrieval_metrics(sc.itc, eval_set.img2txt, eval_set.txt2img)
    metrics.update({f"itc_{k}": v for k, v in itc.items()})
    metrics.update(
        {"k_test": int(k_test), "num_images": eval_set.num_images, "num_texts": eval_set.num_texts}
    )
    return (metrics, sc) if return_scores else metrics
