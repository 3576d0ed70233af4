"""Loading DeiT, bert-base-uncased and released-ALBEF layouts (tiny shapes, the exact key names)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertForMaskedLM, BertModel

from albef_ds.config import TextConfig, VisionConfig
from albef_ds.model import ALBEFPretrain
from albef_ds.model.vit import resample_pos_embed
from albef_ds.model.weights import load_albef, load_bert, load_deit
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


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_deit_loads_into_vision_encoder_with_resampled_pos_embed(tmp_path, suffix):
    src, sd = _deit_state(img=24)  # 3x3 grid; our model is 32 px -> 4x4
    path = tmp_path / f"deit{suffix}"
    if suffix == ".pth":
        torch.save({"model": sd}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    m = _model()
    img = torch.randn(2, 3, 32, 32)
    before = m.visual_encoder.forward_features(img)
    report = load_deit(m, path)
    assert report.missing == []
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


def test_bert_base_uncased_layout_loads_and_matches_hf(tmp_path):
    m = _model()
    tc = m.cfg.text
    hf = BertForMaskedLM(_hf_config(tc, tc.layers)).eval()
    # bert-base-uncased ships BertForPreTraining weights: add the NSP head and pooler keys it has.
    sd = dict(hf.state_dict())
    sd["cls.seq_relationship.weight"] = torch.zeros(2, tc.hidden)
    sd["cls.seq_relationship.bias"] = torch.zeros(2)
    sd["bert.pooler.dense.weight"] = torch.zeros(tc.hidden, tc.hidden)
    sd["bert.pooler.dense.bias"] = torch.zeros(tc.hidden)
    folder = tmp_path / "bert-base-uncased"
    folder.mkdir()
    save_file(
        {k: v.clone().contiguous() for k, v in sd.items() if k != "cls.predictions.decoder.weight"},
        str(folder / "model.safetensors"),
    )
    report = load_bert(m, folder)
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


def test_bert_old_gamma_beta_names_and_pytorch_bin(tmp_path):
    m = _model()
    tc = m.cfg.text
    sd = BertForMaskedLM(_hf_config(tc, tc.layers)).state_dict()
    old = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in sd.items()
    }
    (tmp_path / "b").mkdir()
    torch.save(old, tmp_path / "b" / "pytorch_model.bin")
    report = load_bert(m, tmp_path / "b")
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


def test_released_albef_layout_loads_everything(tmp_path):
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
    path = tmp_path / "ALBEF_4M.pth"
    torch.save({"model": released, "epoch": 29}, path)

    dst = _model()
    report = load_albef(dst, path)
    assert report.missing == [] and report.unexpected == []
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, msg=k)
    img = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(dst.encode_image(img)[1], src.encode_image(img)[1])
    torch.testing.assert_close(
        dst.encode_text(ids, mask, momentum=True)[1], src.encode_text(ids, mask, momentum=True)[1]
    )


def test_albef_checkpoint_at_another_resolution_is_resampled(tmp_path):
    src = ALBEFPretrain(
        tiny_model_config(vision=VisionConfig(image_size=24, patch_size=8, width=32, depth=2, heads=2)),
        special_tokens=SPECIAL,
    )
    torch.save({"model": _to_released_layout(src.state_dict())}, tmp_path / "a.pth")
    dst = _model()  # 32 px: 4x4 grid
    report = load_albef(dst, tmp_path / "a.pth")
    assert dst.visual_encoder.pos_embed.shape == (1, 17, 32)
    assert sum("pos_embed" in c for c in report.converted) == 2  # online and momentum


def test_shape_mismatch_is_an_error_naming_the_key(tmp_path):
    other = ALBEFPretrain(tiny_model_config(embed_dim=8), special_tokens=SPECIAL)
    torch.save({"model": _to_released_layout(other.state_dict())}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"vision_proj\.weight: ours \(16, 32\), file \(8, 32\)"):
        load_albef(_model(), tmp_path / "bad.pth")


def test_unreadable_or_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_albef(_model(), tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_albef(_model(), tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_bert(_model(), tmp_path)
