"""Image-text retrieval metrics and the ITC (feature dot-product) retrieval evaluation."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def retrieval_metrics(
    scores_i2t: torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    *,
    scores_t2i: torch.Tensor | None = None,
) -> dict[str, float]:
    """TR/IR R@1/5/10 (percent) and r_mean from an (N_img, N_txt) score matrix.

    Text retrieval: an image scores a hit at k when any of its captions is within its top k texts.
    Image retrieval: a text scores a hit at k when its image is within its top k images.
    Ties count against the query: a candidate is ranked ahead of the ground truth when its score is >= the
    best ground-truth score, so a constant score matrix gives chance-level (not perfect) recall.
    scores_t2i: (N_txt, N_img) scores for image retrieval when they differ from scores_i2t^T (ITM
    re-ranking scores each direction's own top-k); default scores_i2t^T.
    """
    s = scores_i2t.float()
    n_img, n_txt = s.shape
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(
            f"scores are {n_img}x{n_txt} but img2txt has {len(img2txt)} and txt2img {len(txt2img)} entries"
        )
    if scores_t2i is not None and tuple(scores_t2i.shape) != (n_txt, n_img):
        raise ValueError(f"scores_t2i must be {n_txt}x{n_img}, got {tuple(scores_t2i.shape)}")
    gt = torch.zeros(n_img, n_txt, dtype=torch.bool)
    for i, txts in enumerate(img2txt):
        gt[i, list(txts)] = True
    for t, i in enumerate(txt2img):
        if not gt[i, t]:
            raise ValueError(f"txt2img[{t}] = {i} but img2txt[{i}] does not list text {t}")
    neg_inf = torch.tensor(float("-inf"))

    # TR: rank of the best caption = number of non-GT texts scoring >= it.
    best_gt_t = torch.where(gt, s, neg_inf).max(dim=1).values  # (N_img,)
    tr_rank = (torch.where(gt, neg_inf, s) >= best_gt_t[:, None]).sum(dim=1)
    # IR: rank of the text's image among all images.
    s_t2i = s.t() if scores_t2i is None else scores_t2i.float()  # (N_txt, N_img)
    own = torch.tensor(list(txt2img))
    gt_score = s_t2i[torch.arange(n_txt), own]
    others = s_t2i.clone()
    others[torch.arange(n_txt), own] = float("-inf")
    ir_rank = (others >= gt_score[:, None]).sum(dim=1)

    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * (tr_rank < k).float().mean().item()
    for k in (1, 5, 10):
        out[f"img_r{k}"] = 100.0 * (ir_rank < k).float().mean().item()
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


@torch.no_grad()
def itc_features(model, eval_set, tokenizer, *, device: torch.device, batch_size: int = 128):
    """Unit ITC features of every image and text of a RetrievalEvalSet: (N_img, D), (N_txt, D) on CPU."""
    was_training = model.training
    model.eval()
    try:
        img_feats = []
        for images, _ in eval_set.image_batches(0, eval_set.num_images, batch_size=batch_size, device=device):
            _, f = model.encode_image(images.to(device, non_blocking=True))
            img_feats.append(f.float().cpu())
        txt_feats = []
        for start in range(0, len(eval_set.texts), batch_size):
            tok = tokenizer(eval_set.texts[start : start + batch_size])
            _, f = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device))
            txt_feats.append(f.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(img_feats), torch.cat(txt_feats)


def itc_retrieval(
    model, eval_set, tokenizer, *, device: torch.device, batch_size: int = 128
) -> dict[str, float]:
    """ITC retrieval (no ITM re-ranking): scores = image_feat @ text_feat^T."""
    img, txt = itc_features(model, eval_set, tokenizer, device=device, batch_size=batch_size)
    return retrieval_metrics(img @ txt.t(), eval_set.img2txt, eval_set.txt2img)
