"""Transformer layers of the EVA ViT.

Every parameter is initialised inside the `__init__` of the module that owns it (never by a later
`model.apply` or by a parent), so the model builds under `deepspeed.zero.Init`, where a child's
parameters are already partitioned when its parent's `__init__` continues, and on the meta device.
State-dict names follow timm's `eva.py`.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import eva_kernels

INIT_STD = 0.02


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of whole samples while training.
    (Own module rather than timm's: importing timm inside `deepspeed.zero.Init` breaks torch._dynamo.)"""

    def __init__(self, drop_rate: float):
        super().__init__()
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        keep = 1.0 - self.drop_rate
        sample_mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * sample_mask / keep


class InitLinear(nn.Linear):
    """Linear with EVA's init: trunc_normal(std=.02) weight divided by `std_divisor` (the per-layer
    rescale of attn.proj / mlp.fc2), zero bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std_divisor: float = 1.0):
        object.__setattr__(self, "std_divisor", std_divisor)  # read by reset_parameters inside super().__init__
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=INIT_STD)
        with torch.no_grad():
            self.weight.div_(self.std_divisor)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class QkvLinear(InitLinear):
    """The fused qkv projection; its bias may come from the parent (EVA's q_bias/v_bias), so the
    weight is still used inside this module's own forward (ZeRO-3 gathers it there)."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias if bias is None else bias)


class LayerNorm(nn.Module):
    """LayerNorm through `eva_kernels.layer_norm`; with `residual`, returns (norm(x + residual), x + residual)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return eva_kernels.layer_norm(x, self.weight, self.bias, self.eps, residual)


class Attention(nn.Module):
    """Multi-head self-attention, EVA-style biases, optional 2D RoPE on patch tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        k_bias: bool,
        qkv_fused: bool,
        proj_std_divisor: float,
        inner_norm_eps: float | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv_fused = qkv_fused
        if qkv_fused:
            self.qkv = QkvLinear(dim, 3 * dim, bias=k_bias)
            self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias and not k_bias else None
            self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias and not k_bias else None
        else:
            self.q_proj = InitLinear(dim, dim, bias=qkv_bias)
            self.k_proj = InitLinear(dim, dim, bias=False)
            self.v_proj = InitLinear(dim, dim, bias=qkv_bias)
        # timm `scale_attn_inner`: a LayerNorm on the heads' concatenated output, before proj
        self.norm = LayerNorm(dim, inner_norm_eps) if inner_norm_eps is not None else None
        self.proj = InitLinear(dim, dim, std_divisor=proj_std_divisor)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        if self.qkv_fused:
            bias = None
            if self.q_bias is not None:  # k bias fixed at zero, not a parameter
                bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            qkv = self.qkv(x, bias).view(B, T, 3, self.num_heads, self.head_dim)
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, T, hd)
        return self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        if rope is not None:
            q, k = eva_kernels.rope_2d(q, k, rope[0], rope[1], num_prefix_tokens=T - rope[0].shape[0])
        out = eva_kernels.attention(q, k, v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(out if self.norm is None else self.norm(out))


class Mlp(nn.Module):
    """GELU MLP (EVA-01)."""

    def __init__(self, dim: int, hidden_dim: int, fc2_std_divisor: float):
        super().__init__()
        self.fc1 = InitLinear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = InitLinear(hidden_dim, dim, std_divisor=fc2_std_divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PackedSwiGLU(nn.Module):
    """SwiGLU with gate and value packed in one fc1 (gate first): timm's GluMlp layout (EVA-02 Ti/S)."""

    def __init__(self, dim: int, hidden_dim: int, fc2_std_divisor: float):
        super().__init__()
        self.fc1 = InitLinear(dim, 2 * hidden_dim)
        self.fc2 = InitLinear(hidden_dim, dim, std_divisor=fc2_std_divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


class SwiGLU(nn.Module):
    """SwiGLU with separate gate/value projections and sub-LN before fc2: timm's SwiGLU (EVA-02 B/L)."""

    def __init__(self, dim: int, hidden_dim: int, fc2_std_divisor: float, eps: float):
        super().__init__()
        self.fc1_g = InitLinear(dim, hidden_dim)
        self.fc1_x = InitLinear(dim, hidden_dim)
        self.norm = LayerNorm(hidden_dim, eps)
        self.fc2 = InitLinear(hidden_dim, dim, std_divisor=fc2_std_divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


class Block(nn.Module):
    """Pre-LN transformer block; the second LayerNorm also does the attention residual add."""

    def __init__(self, cfg, layer_index: int, drop_path_rate: float):
        super().__init__()
        dim, num_heads, hidden = cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden_dim
        divisor = math.sqrt(2.0 * (layer_index + 1))  # EVA/BEiT depth rescale of residual outputs
        self.norm1 = LayerNorm(dim, cfg.norm_eps)
        self.attn = Attention(
            dim,
            num_heads,
            cfg.qkv_bias,
            cfg.k_bias,
            cfg.qkv_fused,
            divisor,
            cfg.norm_eps if cfg.scale_attn_inner else None,
        )
        self.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, cfg.norm_eps)
        if cfg.swiglu and cfg.sub_ln:
            self.mlp = SwiGLU(dim, hidden, divisor, cfg.norm_eps)
        elif cfg.swiglu:
            self.mlp = PackedSwiGLU(dim, hidden, divisor)
        else:
            self.mlp = Mlp(dim, hidden, divisor)
        self.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        branch = self.drop_path1(self.attn(self.norm1(x), rope))
        h, x = self.norm2(branch, residual=x)  # x <- x + branch; h = norm2(x)
        return x + self.drop_path2(self.mlp(h))
