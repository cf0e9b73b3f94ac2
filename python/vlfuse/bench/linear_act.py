"""linear_act against HF's vision MLP first half: ``ACT2FN[hidden_act](nn.Linear(x))`` (Qwen2-VL's fc1 with
quick-GELU, Qwen3-VL's linear_fc1 with tanh-GELU), beside a plain GEMM of the same size into a block it already
owns (the GEMM alone: no bias, no activation, no fresh output pages)."""

from __future__ import annotations

import torch

from .core import FWD, FWD_BWD, GEMM, Case, Setup, Unavailable
from .workloads import VISION, WORKLOADS, tokens, vlfuse_op

# (name, in_features, out_features, HF hidden_act, tokens per 448 x 448 image)
MLPS = {
    "qwen2 fc1 + quick_gelu": (VISION.embed_dim, VISION.mlp_dim, "quick_gelu", tokens(WORKLOADS["1 image 448x448"])),
    "qwen3 fc1 + gelu_tanh": (1152, 4304, "gelu_pytorch_tanh", 28 * 28),
}


def _plain_gemm(rows: int, k: int, n: int, device, dtype, backward: bool):
    """The Linear's GEMMs alone, in nn.Linear's layouts (x @ W^T; backward grad @ W and grad^T @ x)."""
    x = torch.randn(rows, k, device=device, dtype=dtype)
    weight = torch.randn(n, k, device=device, dtype=dtype)
    out = torch.empty(rows, n, device=device, dtype=dtype)
    grads = (torch.empty(rows, k, device=device, dtype=dtype), torch.empty(n, k, device=device, dtype=dtype))

    def run():
        torch.mm(x, weight.t(), out=out)
        if backward:  # a GEMM's backward: two GEMMs of its size
            torch.mm(out, weight, out=grads[0])
            torch.mm(out.t(), x, out=grads[1])

    return run


def build_linear_act(case: Case, device: torch.device) -> Setup:
    linear_act = vlfuse_op("linear_act")
    from vlfuse.ops.linear_act import HF_ACTIVATIONS

    try:
        from transformers.activations import ACT2FN
    except ImportError as exc:
        raise Unavailable(f"transformers' activations are not importable ({exc})") from exc
    k, n, hidden_act, per_image = MLPS[case.param("mlp")]
    rows = per_image * case.param("images")
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n).to(device=device, dtype=case.dtype)
    act, op_act = ACT2FN[hidden_act], HF_ACTIVATIONS[hidden_act]
    x = torch.randn(rows, k, device=device, dtype=case.dtype)
    backward = case.mode == FWD_BWD

    weight, bias = (p.detach().clone().requires_grad_() for p in (linear.weight, linear.bias))  # vlfuse's own leaves

    def vlfuse_mlp_in(x):
        return linear_act(x, weight, bias, op_act)

    def hf_mlp_in(x):
        return act(linear(x))

    flops = 2.0 * rows * k * n * (3 if backward else 1)
    return Setup(
        args=(x,),
        vlfuse=vlfuse_mlp_in,
        eager=hf_mlp_in,
        shape=f"[{rows}, {k}] @ [{n}, {k}]^T + bias, {op_act}",
        baseline=f"HF ACT2FN[{hidden_act!r}](nn.Linear)",
        grad_args=(0,),
        vlfuse_params=[weight, bias] if backward else (),
        eager_params=[linear.weight, linear.bias] if backward else (),
        limit=_plain_gemm(rows, k, n, device, case.dtype, backward),
        limit_kind=GEMM,
        work=flops,
        flops=flops,
        note="limit = the same GEMM alone, into an output it already holds",
    )


def cases() -> list[Case]:
    out = []
    for mlp in MLPS:
        for dtype in (torch.float32, torch.bfloat16):
            for images in (1, 4):
                name = "1 image 448x448" if images == 1 else f"{images} images 448x448"
                for mode in (FWD, FWD_BWD):
                    quick = images == 1 and mode == FWD and dtype == torch.float32 and mlp.startswith("qwen2")
                    params = (("mlp", mlp), ("images", images))
                    out.append(Case(f"linear_act {mlp}", name, dtype, mode, build_linear_act, params, None, quick))
    return out
