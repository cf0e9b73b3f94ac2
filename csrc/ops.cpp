// Every schema of the vlfuse operator library, in one place. Each op's implementations register themselves
// from csrc/<op>/<op>.cpp (CPU, and CUDA when built); the fake (meta) kernels and autograd live in
// python/vlfuse/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(vlfuse, m) {
  // ---- rotary embedding (csrc/rope) --------------------------------------------------------------------
  // Splits the packed qkv projection [S, 3*H*D], rotates q and k by angles sum_a pos[s, a] * freqs[a, i],
  // writes q, k as [S, H, D] ("shd") or [H, S, D] ("hsd"). v is not an output: it is qkv's v block, which
  // vlfuse.ops.rope_qkv hands out as a view (an op may not return a view of its input).
  m.def("rope_qkv(Tensor qkv, Tensor positions, Tensor freqs, int num_heads, str out_layout) -> (Tensor, Tensor)");
  // Gradient with respect to qkv of rope_qkv and the v view: the inverse rotation of grad_q and grad_k, packed
  // with grad_v (zeros where None).
  m.def("rope_qkv_backward(Tensor grad_q, Tensor grad_k, Tensor? grad_v, Tensor positions, Tensor freqs, str out_layout) -> Tensor");
  // q [S, Hq, D], k [S, Hk, D]; inverse=True rotates by the negated angle (the backward).
  m.def("rope(Tensor q, Tensor k, Tensor positions, Tensor freqs, bool inverse=False) -> (Tensor, Tensor)");
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor freqs, bool inverse=False) -> ()");
  // HF's apply_rotary_pos_emb_vision: cos, sin [S, D]; inverse=True applies the transposed rotation (the backward).
  m.def("rope_cos_sin(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse=False) -> (Tensor, Tensor)");

  // ---- temporal patchify (csrc/patchify) ----------------------------------------------------------------
  // frames: one [T, C, H, W] tensor (uint8 or float) per item; returns patches [N, C*Tp*P*P] in out_dtype, in
  // merge order, normalized; odd T repeats the last frame.
  m.def("patchify(Tensor[] frames, int patch_size, int temporal_patch_size, int merge_size, float[] mean, float[] std, ScalarType out_dtype) -> Tensor");
  // patches [N, C*Tp*P*P] @ weight[E, C, Tp, P, P]^T (+ bias [E] or [N, E]) -> [N, E] in weight's dtype. Its
  // backward is two ATen GEMMs, registered with its autograd in python/vlfuse/ops/patchify.py.
  m.def("patch_embed(Tensor patches, Tensor weight, Tensor? bias) -> Tensor");

  // ---- 2x2 token merge (csrc/merge) ---------------------------------------------------------------------
  // x [S, C] -> normalized and gathered [S / m^2, m^2 * C], plus per-token mean and rstd [S] (float32; float64
  // for float64 x; mean is [0] for rmsnorm) for backward. grid_thw [items, 3] may be None for order="merge".
  // postshuffle_norm (Qwen3-VL's deepstack mergers): the norm runs over each merged row of m^2 * C values, with
  // weight and bias [m^2 * C] and mean, rstd [S / m^2].
  m.def("merge2x2(Tensor x, Tensor? grid_thw, Tensor weight, Tensor? bias, float eps, str norm, str order, int merge_size, bool postshuffle_norm=False) -> (Tensor, Tensor, Tensor)");
  // Gradients w.r.t. x, weight, bias; those output_mask leaves out come back as empty [0] tensors.
  m.def("merge2x2_backward(Tensor grad_out, Tensor x, Tensor? grid_thw, Tensor weight, Tensor mean, Tensor rstd, str norm, str order, int merge_size, bool[3] output_mask, bool postshuffle_norm=False) -> (Tensor, Tensor, Tensor)");

  // ---- learned position table resampling (csrc/pos_embed) ------------------------------------------------
  // table [side * side, C] -> [tokens, C] in table's dtype: the table bilinearly resampled (align_corners=True)
  // to each item's (h, w) patch grid, rows in merge order and repeated for every frame, plus bias [C] when
  // given. tokens = sum of t * h * w: optional with grid_thw on the host (checked against it), required with
  // grid_thw on the GPU (which is then read only there). tokens is a SymInt so that torch.compile keeps it
  // symbolic: one graph serves every grid instead of one per token count.
  m.def("interp_pos_embed(Tensor table, Tensor grid_thw, int merge_size, Tensor? bias=None, SymInt? tokens=None) -> Tensor");
  // Gradient of interp_pos_embed with respect to table: grad_out [tokens, C] -> [side * side, C].
  m.def("interp_pos_embed_backward(Tensor grad_out, Tensor grid_thw, int side, int merge_size) -> Tensor");

  // ---- Linear + activation (csrc/linear_act) -------------------------------------------------------------
  // act(x @ weight^T + bias): x [..., K], weight [N, K], bias [N] -> [..., N] in x's dtype; act is "none",
  // "quick_gelu", "gelu", "gelu_tanh" or "silu". The second output is x @ weight^T + bias when keep_preact (what
  // the backward reads; [0] otherwise, and always for "none").
  m.def("linear_act(Tensor x, Tensor weight, Tensor? bias, str act, bool keep_preact) -> (Tensor, Tensor)");
  // grad_out * act'(preact): the gradient through the activation (the Linear's own are GEMMs, in Python).
  m.def("linear_act_backward(Tensor grad_out, Tensor preact, str act) -> Tensor");

  // ---- attention within packed segments (csrc/attention) ---------------------------------------------------
  // q, k, v [heads, tokens, head_dim] (unit stride over head_dim); groups: (first token, segment count, segment
  // length) per run of equal-length segments, flattened, tiling [0, tokens); each token attends within its
  // segment. -> out [tokens, heads * head_dim], logsumexp [heads, tokens] float32 (of scale * q.k over the segment).
  m.def("segment_attention(Tensor q, Tensor k, Tensor v, SymInt[] groups, float scale) -> (Tensor, Tensor)");
  // Gradients of segment_attention: grad_out [tokens, heads * head_dim] -> (grad_q, grad_k, grad_v) [heads, tokens, head_dim].
  m.def("segment_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor logsumexp, SymInt[] groups, float scale) -> (Tensor, Tensor, Tensor)");
}
