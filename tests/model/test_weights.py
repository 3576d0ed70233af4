"""Converting DeiT, bert-base-uncased, released-ALBEF and our layouts (tiny shapes, the exact key names): the
pure conversions of `albef_ds.model.weights` on in-memory state dicts. Reading them from files and folders
is tested in tests/train/checkpoint/test_weights.py."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertForMaskedLM, BertModel

from albef_ds.config import TextConfig, VisionConfig
from albef_ds.model import ALBEFPretrain
from albef_ds.model.retrieval import NO_ID, ALBEFRetrieval
from albef_ds.model.vit import resample_pos_embed
from albef_ds.model.weights import detect_layout, load_state
from tests.helpers import SPECIAL, tiny_model_config


def _model(**kw):
    m = ALBEFPretrain(tiny_model_config(**kw), special_tokens=SPECIAL)
    return m.eval()


def _deit_state(img: int, width: int = 32, depth: int = 2):
    vit = VisionTransformer(
        img_size=img, patch_size=8, embed_dim=width, depth=depth, num_heads=2, num_classes=10
    )  # DeiT has a 10-way... here: a classifier head to be dropped
    sd = vit.state_dict()
    sd["dist_token"] = torch.zeros(1, 1, width)
    return vit, sd


def check_deit_loaded(m, sd, report, before, img):
    """What loading `sd` (from _deit_state) into `m` must give; shared with the file tests."""
    assert report.missing == [] and report.layout == "deit"
    assert set(report.dropped) == {"head.weight", "head.bias", "dist_token"}
    assert any("pos_embed" in c for c in report.converted)
    for k, v in sd.items():
        if k.startswith("head") or k in ("dist_token", "pos_embed"):
            continue
        torch.testing.assert_close(m.state_dict()[f"visual_encoder.{k}"], v)
    torch.testing.assert_close(m.visual_encoder.pos_embed, resample_pos_embed(sd["pos_embed"], 4))
    after = m.visual_encoder.forward_features(img)
    assert not torch.allclose(before, after)
    # The momentum copy follows the loaded weights.
    torch.testing.assert_close(m.visual_encoder_m.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_deit_loads_into_vision_encoder_with_resampled_pos_embed():
    _, sd = _deit_state(img=24)  # 3x3 grid; our model is 32 px -> 4x4
    assert detect_layout(sd, ours=False) == "deit"
    m = _model()
    img = torch.randn(2, 3, 32, 32)
    before = m.visual_encoder.forward_features(img)
    check_deit_loaded(m, sd, load_state(m, sd, layout="deit", source="deit"), before, img)


def test_resample_pos_embed_is_identity_on_same_grid_and_bicubic_otherwise():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, 4) is pe
    up = resample_pos_embed(pe, 6)
    assert up.shape == (1, 37, 8)
    torch.testing.assert_close(up[:, :1], pe[:, :1])
    grid = pe[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(up[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 36, 8))


def _hf_config(tc: TextConfig, layers: int) -> BertConfig:
    return BertConfig(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden,
        num_hidden_layers=layers,
        num_attention_heads=tc.heads,
        intermediate_size=tc.intermediate,
        max_position_embeddings=tc.max_position,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        hidden_act="gelu",
    )


def bert_pretraining_state(tc: TextConfig):
    """(HF BertForMaskedLM, the state dict bert-base-uncased ships: BertForPreTraining keys)."""
    hf = BertForMaskedLM(_hf_config(tc, tc.layers)).eval()
    # bert-base-uncased ships BertForPreTraining weights: add the NSP head and pooler keys it has.
    sd = dict(hf.state_dict())
    sd["cls.seq_relationship.weight"] = torch.zeros(2, tc.hidden)
    sd["cls.seq_relationship.bias"] = torch.zeros(2)
    sd["bert.pooler.dense.weight"] = torch.zeros(tc.hidden, tc.hidden)
    sd["bert.pooler.dense.bias"] = torch.zeros(tc.hidden)
    return hf, sd


def check_bert_loaded(m, hf, sd, report):
    """What loading bert_pretraining_state's `sd` into `m` must give; shared with the file tests."""
    tc = m.cfg.text
    # Only the fusion layers' cross-attention has no BERT counterpart.
    assert report.missing and all(".crossattention." in k for k in report.missing)
    assert report.unexpected == []

    ids = torch.randint(5, tc.vocab_size, (3, 9))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    # The text half (layers < fusion_layer) equals HF's BertModel with those layers, key for key.
    hf_text = BertModel(_hf_config(tc, tc.fusion_layer), add_pooling_layer=False).eval()
    hf_text.load_state_dict(
        {
            k[5:]: v
            for k, v in sd.items()
            if k.startswith("bert.")
            and "pooler" not in k
            and int(k.split(".")[3] if k.startswith("bert.encoder.layer.") else 0) < tc.fusion_layer
        },
        strict=False,
    )
    with torch.no_grad():
        ours = m.text_encoder.bert.encode_text(ids, mask)
        ref = hf_text(input_ids=ids, attention_mask=mask).last_hidden_state
        valid = mask.bool()
        torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-4, atol=1e-5)
        # The MLM head equals HF's on the same states.
        torch.testing.assert_close(m.text_encoder.cls(ours[valid]), hf.cls(ref[valid]), rtol=1e-4, atol=1e-5)
    assert (
        m.text_encoder.cls.predictions.decoder.weight is m.text_encoder.bert.embeddings.word_embeddings.weight
    )
    # The momentum copy follows the loaded weights.
    torch.testing.assert_close(
        m.text_encoder_m.bert.embeddings.word_embeddings.weight, sd["bert.embeddings.word_embeddings.weight"]
    )


def test_bert_base_uncased_layout_loads_and_matches_hf():
    m = _model()
    hf, sd = bert_pretraining_state(m.cfg.text)
    sd = {k: v for k, v in sd.items() if k != "cls.predictions.decoder.weight"}  # not in the shipped file
    assert detect_layout(sd, ours=False) == "bert"
    check_bert_loaded(m, hf, sd, load_state(m, sd, layout="bert", source="bert-base-uncased"))


def test_bert_into_a_model_without_mlm_head_drops_the_head():
    m = ALBEFRetrieval(tiny_model_config(), special_tokens=SPECIAL)
    _, sd = bert_pretraining_state(m.cfg.text)
    report = load_state(m, sd, layout="bert")
    assert report.unexpected == [] and "text_encoder.cls.predictions.transform.dense.weight" in report.dropped


def old_bert_state(tc: TextConfig) -> tuple[dict, dict]:
    """(BertForMaskedLM state, the same with the old TF-converted LayerNorm.gamma / .beta names)."""
    sd = BertForMaskedLM(_hf_config(tc, tc.layers)).state_dict()
    old = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in sd.items()
    }
    return sd, old


def test_bert_old_gamma_beta_names():
    m = _model()
    sd, old = old_bert_state(m.cfg.text)
    report = load_state(m, old, layout="bert")
    assert any("gamma" in c for c in report.converted)
    torch.testing.assert_close(
        m.text_encoder.bert.embeddings.LayerNorm.weight, sd["bert.embeddings.LayerNorm.weight"]
    )


def _to_released_layout(sd: dict) -> dict:
    """Our state dict written the way the released ALBEF_4M.pth stores it."""
    out = {}
    for k, v in sd.items():
        if k in ("image_queue", "text_queue"):
            v = v.t().contiguous()  # reference: (D, Q)
        elif k == "temp":
            v = v.reshape(())  # reference: 0-dim
        out[k] = v.clone()
        if k.endswith("cls.predictions.bias"):
            out[k.replace("predictions.bias", "predictions.decoder.bias")] = v.clone()
    return out


def released_pretraining_model():
    """(a model with non-trivial buffers, its state dict in the released ALBEF_4M.pth layout)."""
    src = _model()
    with torch.no_grad():
        for b in src.buffers():
            if b.is_floating_point():
                b.add_(torch.randn_like(b))
        src.temp.fill_(0.05)
        src.queue_ptr.fill_(7)
    released = _to_released_layout(src.state_dict())
    for k in (
        "visual_encoder.cls_token",
        "visual_encoder_m.pos_embed",
        "text_encoder.bert.embeddings.word_embeddings.weight",
        "text_encoder_m.cls.predictions.transform.dense.weight",
        "vision_proj.weight",
        "text_proj_m.bias",
        "itm_head.weight",
        "temp",
        "image_queue",
        "text_queue",
        "queue_ptr",
        "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight",
    ):
        assert k in released  # the key names ALBEF_SPEC.md lists
    assert released["image_queue"].shape == (16, 20) and released["temp"].dim() == 0
    return src, released


def check_released_loaded(src, dst, report):
    """`dst` after loading released_pretraining_model's state dict equals `src`."""
    assert report.missing == [] and report.unexpected == []
    assert {"image_queue transposed", "text_queue transposed", "temp () -> (1,)"} <= set(report.converted)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, msg=k)
    img = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(dst.encode_image(img)[1], src.encode_image(img)[1])
    torch.testing.assert_close(
        dst.encode_text(ids, mask, momentum=True)[1], src.encode_text(ids, mask, momentum=True)[1]
    )


def test_released_albef_layout_loads_everything():
    src, released = released_pretraining_model()
    assert detect_layout(released, ours=False) == "albef"
    dst = _model()
    check_released_loaded(src, dst, load_state(dst, released, layout="albef", source="ALBEF_4M.pth"))


def test_albef_checkpoint_at_another_resolution_is_resampled():
    src = ALBEFPretrain(
        tiny_model_config(vision=VisionConfig(image_size=24, patch_size=8, width=32, depth=2, heads=2)),
        special_tokens=SPECIAL,
    )
    dst = _model()  # 32 px: 4x4 grid
    report = load_state(dst, _to_released_layout(src.state_dict()), layout="albef")
    assert dst.visual_encoder.pos_embed.shape == (1, 17, 32)
    assert sum("pos_embed" in c for c in report.converted) == 2  # online and momentum


def test_shape_mismatch_is_an_error_naming_the_key():
    other = ALBEFPretrain(tiny_model_config(embed_dim=8), special_tokens=SPECIAL)
    dst = _model()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"vision_proj\.weight: ours \(16, 32\), file \(8, 32\)") as e:
        load_state(dst, _to_released_layout(other.state_dict()), layout="albef", source="bad.pth")
    assert "shape mismatch loading bad.pth" in str(e.value)
    for k, v in dst.state_dict().items():  # checked before anything was copied
        assert torch.equal(v, before[k]), k


def test_our_layout_loads_without_conversion():
    src = _model()
    with torch.no_grad():
        src.image_queue.normal_()
        src.queue_ptr.fill_(3)
    dst = _model()
    report = load_state(dst, src.state_dict(), layout="ours")
    assert not (report.missing or report.unexpected or report.converted or report.dropped)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_queues_of_another_length_are_dropped_with_pointer_and_ids():
    src = ALBEFRetrieval(tiny_model_config(queue_size=7), special_tokens=SPECIAL)
    with torch.no_grad():
        src.idx_queue.copy_(torch.arange(7))
        src.queue_ptr.fill_(5)
    dst = ALBEFRetrieval(tiny_model_config(queue_size=9), special_tokens=SPECIAL)
    queue = dst.image_queue.clone()
    report = load_state(dst, src.state_dict(), layout="ours")
    dropped = sorted(d.split()[0] for d in report.dropped)
    assert dropped == ["idx_queue", "image_queue", "queue_ptr", "text_queue"]
    assert torch.equal(dst.image_queue, queue) and (dst.idx_queue == NO_ID).all() and int(dst.queue_ptr) == 0
    assert torch.equal(dst.itm_head.weight, src.itm_head.weight)


def test_pretraining_state_into_retrieval_model():
    """MLM head dropped, feature queues kept (same length) with ids "none" and the pointer at 0."""
    src = _model()
    with torch.no_grad():
        src.queue_ptr.fill_(4)
    dst = ALBEFRetrieval(tiny_model_config(), special_tokens=SPECIAL)
    report = load_state(dst, src.state_dict(), layout="ours")
    assert report.unexpected == [] and report.missing == ["idx_queue"]
    assert any(k.startswith("text_encoder.cls.") for k in report.dropped)
    assert torch.equal(dst.image_queue, src.image_queue) and int(dst.queue_ptr) == 0
    assert (dst.idx_queue == NO_ID).all()


def test_released_retrieval_layout_converts():
    """mscoco.pth / flickr30k.pth: a BertModel text encoder (no `bert.`), (D, Q) queues, (1, Q) ids and a
    0-dim temp."""
    src = ALBEFRetrieval(tiny_model_config(queue_size=7), special_tokens=SPECIAL)
    sd = {
        k.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.", "text_encoder_m."): v
        for k, v in src.state_dict().items()
    }
    sd["image_queue"], sd["text_queue"] = sd["image_queue"].t(), sd["text_queue"].t()
    sd["idx_queue"] = torch.arange(7)[None]
    sd["temp"] = torch.tensor(0.05)
    dst = ALBEFRetrieval(tiny_model_config(queue_size=7), special_tokens=SPECIAL)
    report = load_state(dst, sd, layout=detect_layout(sd, ours=False))
    assert report.layout == "albef" and report.unexpected == [] and report.missing == []
    key = "embeddings.word_embeddings.weight"
    renamed = f"text_encoder_m.{key} -> text_encoder_m.bert.{key}"
    assert renamed in report.converted
    assert dst.idx_queue.tolist() == list(range(7)) and dst.temp.item() == pytest.approx(0.05)
    assert torch.equal(dst.image_queue, src.image_queue)
    assert torch.equal(
        dst.text_encoder_m.bert.encoder.layer[3].crossattention.self.key.weight,
        src.text_encoder_m.bert.encoder.layer[3].crossattention.self.key.weight,
    )


def test_unknown_layouts_are_errors():
    with pytest.raises(ValueError, match="unknown weight layout 'timm'"):
        load_state(_model(), {}, layout="timm")
    with pytest.raises(ValueError, match="x.pth: not a layout we load"):
        detect_layout({"foo.weight": torch.zeros(1)}, ours=False, source="x.pth")


# ------------------------------------------------------------------ coverage: weights that do not fit
def test_a_source_that_fits_nothing_is_an_error_naming_the_missing_parts():
    dst = _model()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = {"other_net.weight": torch.zeros(3), "head.bias": torch.zeros(2)}
    with pytest.raises(ValueError) as e:
        load_state(dst, sd, layout="ours", source="other.pt")
    msg = str(e.value)
    assert msg.startswith("other.pt does not cover the model")
    for part in ("vision encoder: 30 of 30", "text encoder", "fusion encoder"):
        assert part in msg, part
    assert "visual_encoder.cls_token" in msg and "other_net.weight" in msg  # examples of both sides
    assert "partial=True" in msg and "--allow-partial" in msg
    for k, v in dst.state_dict().items():  # refused before anything was copied
        assert torch.equal(v, before[k]), k
    # Asked for, the partial load goes ahead and says what it left.
    report = load_state(dst, sd, layout="ours", partial=True)
    assert report.loaded == 0 and report.unmatched == ["other_net.weight", "head.bias"]
    assert {"vision encoder", "text encoder", "fusion encoder"} <= {
        i.split(":")[0] for i in report.incomplete
    }


def test_a_bert_or_deit_source_must_fill_what_it_provides():
    _, released = released_pretraining_model()
    with pytest.raises(ValueError, match="does not cover the model: text encoder: .* fusion encoder: "):
        load_state(_model(), released, layout="bert", source="not-bert")  # ALBEF keys read as BERT
    with pytest.raises(ValueError, match="not-deit does not cover the model: vision encoder: 30 of 30"):
        load_state(_model(), released, layout="deit", source="not-deit")
    # A DeiT file is not expected to fill the text side, nor BERT the fusion layers' cross-attention.
    _, deit = _deit_state(img=32)
    assert load_state(_model(), deit, layout="deit").incomplete == []
    _, bert = bert_pretraining_state(_model().cfg.text)
    assert load_state(_model(), bert, layout="bert").incomplete == []


def test_evaluation_needs_the_task_parts_fine_tuning_only_the_encoders():
    src = _model()  # pre-trained: no classifier head
    from albef_ds.model.ve import ALBEFVE

    report = load_state(ALBEFVE(tiny_model_config()), src.state_dict(), layout="ours")  # fine-tuning init
    assert "cls_head.0.weight" in report.missing and report.incomplete == []
    with pytest.raises(ValueError, match=r"classifier head: 4 of 4 tensors missing \(e\.g\. cls_head\.0\."):
        load_state(ALBEFVE(tiny_model_config()), src.state_dict(), layout="ours", require="model")
    # What no evaluation reads (MLM head, queues, momentum copies) may be absent for an evaluation.
    retrieval = ALBEFRetrieval(tiny_model_config(), special_tokens=SPECIAL).state_dict()
    online = {k: v for k, v in retrieval.items() if "_m." not in k}
    report = load_state(_model(), online, layout="ours", require="model")
    assert report.incomplete == [] and "text_encoder.cls.predictions.bias" in report.missing
    assert "idx_queue" in report.unexpected and report.unmatched == []


def test_a_deeper_source_is_refused_for_evaluation_and_reported_otherwise():
    vision = VisionConfig(image_size=32, patch_size=8, width=32, depth=3, heads=2)
    deep = ALBEFPretrain(tiny_model_config(vision=vision), special_tokens=SPECIAL)
    want = r"deep.pt does not fit the model: it holds 12 tensor\(s\) the model has no place for \(vision "
    with pytest.raises(ValueError, match=want + r"encoder; e.g. visual_encoder\.blocks\.2\."):
        load_state(_model(), deep.state_dict(), layout="ours", source="deep.pt", require="model")
    report = load_state(_model(), deep.state_dict(), layout="ours")  # fine-tuning init: reported
    assert report.incomplete == [] and report.unmatched
    assert all(k.startswith("visual_encoder") and ".blocks.2." in k for k in report.unmatched)
    assert "matching nothing in the model" in report.summary()
