"""Student models. Importing this package stays light (`eva_train.config.validate` imports
`eva_train.models.variants`); the torch modules are imported when a model is built."""

import dataclasses


def build_backbone(variant: str, img_size=None, drop_path_rate: float = 0.0, **overrides):
    """The EVA backbone of a named variant; `overrides` replace EvaConfig fields (e.g. sub_ln=False)."""
    from eva_train.models.eva import EVA

    return EVA(_variant_config(variant, overrides), img_size, drop_path_rate)


def check_model_config(model_cfg) -> None:
    """Cheap checks of a ModelConfig (no torch): one-line ValueError naming the fix.
    `eva_train.config.validate` can call it so a bad model fails before anything is allocated."""
    cfg = _variant_config(model_cfg.variant, {})
    if model_cfg.mode not in ("mim", "mae"):
        raise ValueError(f"model.mode '{model_cfg.mode}' is unknown; use mim or mae")
    if model_cfg.mode == "mae" and cfg.rope:
        raise ValueError(
            f"model.mode=mae does not support RoPE variants like {model_cfg.variant}; use an "
            f"EVA-01 variant (e.g. eva_mae_b16) or model.mode=mim"
        )
    if model_cfg.mode == "mae" and (model_cfg.decoder_heads <= 0 or model_cfg.decoder_width % model_cfg.decoder_heads):
        raise ValueError(
            f"model.decoder_width={model_cfg.decoder_width} is not divisible by "
            f"model.decoder_heads={model_cfg.decoder_heads}; change one of them"
        )
    if not 0.0 <= model_cfg.drop_path_rate < 1.0:
        raise ValueError(f"model.drop_path_rate={model_cfg.drop_path_rate} must lie in [0, 1)")


def build_model(model_cfg, teacher_dim: int):
    """`EvaForMIM` (model_cfg.mode == "mim") or `EvaForMAE` ("mae") predicting `teacher_dim` features,
    with grad checkpointing set from model_cfg.checkpoint_fraction."""
    check_model_config(model_cfg)
    cfg = _variant_config(model_cfg.variant, {})
    if model_cfg.mode == "mim":
        from eva_train.models.eva import EvaForMIM

        model = EvaForMIM(cfg, model_cfg.img_size, teacher_dim, model_cfg.drop_path_rate)
    else:
        from eva_train.models.mae import EvaForMAE

        model = EvaForMAE(
            cfg,
            model_cfg.img_size,
            teacher_dim,
            model_cfg.drop_path_rate,
            model_cfg.decoder_depth,
            model_cfg.decoder_width,
            model_cfg.decoder_heads,
        )
    model.set_grad_checkpointing(model_cfg.checkpoint_fraction)
    return model


def _variant_config(variant: str, overrides: dict):
    from eva_train.models.variants import VARIANTS

    if variant not in VARIANTS:
        raise ValueError(f"model variant '{variant}' is unknown; choose one of {', '.join(sorted(VARIANTS))}")
    return dataclasses.replace(VARIANTS[variant], **overrides) if overrides else VARIANTS[variant]
