"""The public entry points for LoRA heads: validate, plan (exact or poly, which polynomial, which precision),
run, pack. The planning, the run-time checks and the error contract live in :mod:`gpulora.dispatch`.

Host reads, on CuPy (each one scalar or a few numbers, each a synchronisation): the finiteness check of
``x`` (and ``y`` or ``grad_output``) and the fused one of the weights and adapters (they may have changed
in place since ``Head``/``LoRA`` were built), the range check of ``lengths``, the score bound ``M`` (the
degree choice needs it on the host), the poly path's two run-time checks (``3 * batch * H`` feature
products at the extreme rows, and the smallest normaliser ratio) and its error estimate (the loss and the
spread of ``V``), and the fused finiteness check of the results: 5 reads per exact call and 10 per poly
call, whatever the sizes (pinned by ``tests/test_array_api.py``). Everything else, the gradient chain
included, stays on the device, on CuPy's current stream. Arrays may come from any library that follows the
array API standard (``array_api_strict`` in the tests); the Numba kernels serve CuPy arrays only.
"""

from __future__ import annotations

from .adapters import adapter_grads, input_grad, output_layout, prepare, projection_grads
from .dispatch import GRAD_TOL_FACTOR, check_options, error_estimate, plan, run_output, run_vjp
from .model import AdapterGrad, GradResult, Head, LoRA, check_parameters
from .validation import check_bool, check_fits

__all__ = ["GRAD_TOL_FACTOR", "error_estimate", "forward", "lora_grad", "loss"]

_LAYER_DOC = """
    key_mask : boolean array of shape (L,) or (batch, L), optional
        True = real token. Padded keys are excluded from every row; padded query rows get zero output
        and zero gradient, and the loss sums over real rows only.
    lengths : integer array of shape () or (batch,), optional
        Instead of ``key_mask``: sequence ``b`` has ``lengths[b]`` real tokens, then padding
        (``0 <= lengths <= L``).
    rope_theta : float, optional
        Rotary position embeddings (Hugging Face LLaMA convention, rotate-half) with this base, applied to
        ``Q`` and ``K`` of every head after the projection (:mod:`gpulora.rotary`); ``d_head`` must be even.
    position_ids : integer array of shape (L,), (1, L) or (batch, L), optional
        Positions for ``rope_theta`` (default ``0 .. L-1``).
    rope_cos, rope_sin : arrays of shape (L, d_head), (1, L, d_head) or (batch, L, d_head), optional
        Explicit rotary tables (as a model's rotary module returns them), instead of ``rope_theta``."""


def _prepare(head, lora, x, y=None, **kw):
    if isinstance(head, Head) and isinstance(lora, LoRA):  # else prepare names the wrong type
        check_parameters(head, lora)  # B and A are usually updated in place between calls
    return prepare(head, lora, x, y, **kw)


def lora_grad(head: Head, lora: LoRA, x, y=None, *, grad_output=None, return_dx=False, method="auto", degree=None,
              tol=None, causal=False, family=None, key_mask=None, lengths=None, rope_theta=None, position_ids=None,
              rope_cos=None, rope_sin=None) -> GradResult:
    """Gradients with respect to every adapter's ``B`` and ``A`` (and ``x``) of the paper's loss
    ``0.5 ||attention(x) - y||^2``, or of any loss whose gradient ``grad_output = dloss/dO`` is given.

    Parameters
    ----------
    head : Head
        Frozen weights ``w_q (d_model, H d_head)``, ``w_k (d_model, H_kv d_head)``, ``w_v (d_model, H_kv d_v)``,
        optional biases, ``beta``, ``heads``, ``kv_heads``.
    lora : LoRA
        Adapters for a non-empty subset of ``"q"``, ``"k"``, ``"v"``.
    x : array of shape (L, d_model) or (batch, L, d_model)
        NumPy or CuPy, float16, bfloat16 (ml_dtypes), float32 or float64. The arithmetic runs in NumPy's
        promotion of all the inputs' dtypes (float32 for half precision); results come back in that
        promoted dtype and in the namespace of ``x``.
    y : array of shape (L, H d_v) or (batch, L, H d_v), optional
        Targets, same leading shape as ``x``. Exactly one of ``y`` and ``grad_output``.
    grad_output : array of shape (L, H d_v) or (batch, L, H d_v), optional
        The upstream gradient ``dloss/dO`` of the attention output (heads concatenated as in ``y``): the
        backward of the layer inside a network. ``GradResult.loss`` is then ``None``.
    return_dx : bool
        Also return ``dloss/dx`` (``GradResult.dx``, shaped like ``x``); the attention gradients of all
        three projections are then computed whatever the adapted targets.
    method : {"auto", "exact", "poly"}
        ``"exact"``: ``O(L^2 d)`` time, memory linear in ``L`` (blocked). ``"poly"``: the polynomial method
        (Hu et al. 2025), ``O(L k d_v d_head)`` time with ``k = C(d_head + g, g)``. ``"auto"``: computes the
        bound ``M``, the degree ``tol`` needs and the estimated cost of both (:mod:`gpulora.cost`), runs
        the cheaper one that meets ``tol`` and says why in ``GradResult.note``. It runs exact when no
        polynomial meets ``tol``, when the feature map is over budget (:mod:`gpulora.poly.budget`), when a
        fixed ``degree``'s error bound exceeds ``tol``, when poly fails at run time, and (after the poly
        run, so at the cost of both) when poly's ``error_estimate`` exceeds ``GRAD_TOL_FACTOR * tol``
        (``10 tol``: near a perfect fit, see ``GradResult.error_estimate``).
    degree : int, optional
        Fix the polynomial degree ``g`` (poly/auto); otherwise the smallest one that meets ``tol``. A degree
        whose error bound exceeds ``tol`` (default ``1e-3``) emits :class:`~gpulora.AccuracyWarning` under
        ``"poly"``; ``"auto"`` runs exact instead.
    tol : float, optional
        Target max relative error of ``p ~ exp`` on ``[-M, M]`` (``0 < tol < 1``), approximation plus
        estimated rounding; default ``1e-3``. Per-token gradients then carry errors of a small multiple of
        it relative to the residual; adapter gradients too (``10 tol`` relative is what the tests hold at
        a few hundred tokens), except near a perfect fit (``error_estimate`` shows it) and where their sum
        over tokens cancels, which at large ``L`` can amplify the relative error (see
        :mod:`gpulora.poly.chain`, "Error").
    causal : bool
        Mask ``j > i``.
    family : {"taylor", "shifted_taylor", "chebyshev"}, optional
        Restrict the polynomial family (by default chosen with the degree).{layer}

    Returns
    -------
    GradResult
        ``loss``, ``grads[target].B / .A``, ``dx``, ``method`` that ran, ``degree``, ``features``, ``bound``,
        ``error_bound`` (a priori) and ``error_estimate`` (a posteriori, :func:`error_estimate`).

    Raises
    ------
    ValueError, TypeError
        For bad input (naming the argument; the weights and adapters are re-checked finite at every call);
        when the computation overflows the dtype although the inputs are finite; for ``method="poly"``
        when no polynomial can meet ``tol`` at this bound, when its features are over budget
        (:class:`gpulora.poly.budget.FeatureBudgetError`), or when the polynomial fails at run time
        (:class:`gpulora.PolynomialFailure`).

    Warns
    -----
    AccuracyWarning
        ``method="poly"`` only: a fixed ``degree`` whose error bound exceeds ``tol``, or an
        ``error_estimate`` over ``tol``.
    """
    degree, tol, causal, _ = check_options(method, degree, tol, causal, family)
    return_dx = check_bool("return_dx", return_dx)
    if y is None and grad_output is None:
        raise TypeError("y must be a NumPy or CuPy array of targets (L, H d_v) or (batch, L, H d_v), got None; "
                        "or pass grad_output= (an upstream gradient dO) instead")
    prob = _prepare(head, lora, x, y, grad_output=grad_output, key_mask=key_mask, lengths=lengths,
                    rope_theta=rope_theta, position_ids=position_ids, rope_cos=rope_cos, rope_sin=rope_sin)
    need = ("q", "k", "v") if return_dx else lora.targets
    att = prob.attention(causal)
    p = plan(att, method, degree=degree, tol=tol, family=family, targets=need)
    upstream = {"y": prob.grouped(prob.y)} if y is not None else {"grad_output": prob.grouped(prob.grad_output)}

    def finish(raw):  # the chain rule to the adapters (and x), inside the run: its results are checked too
        loss_, _, dq, dk, dv = raw
        d_proj = projection_grads(prob, {"q": prob.ungrouped(dq), "k": prob.ungrouped(dk),
                                         "v": prob.ungrouped(dv)})
        return loss_, adapter_grads(lora, prob, d_proj), input_grad(prob, d_proj) if return_dx else None

    p, (loss_, grads, dx), est = run_vjp(att, p, method, need=need, finish=finish, **upstream)
    loss_ = None if loss_ is None else prob.scalar(loss_)
    grads = {t: AdapterGrad(B=prob.to_result(g.B), A=prob.to_result(g.A)) for t, g in grads.items()}
    dx = prob.to_result(dx)
    check_fits(prob.result_dtype, loss_, *(a for g in grads.values() for a in (g.B, g.A)), dx)
    return GradResult(loss=loss_, grads=grads, dx=dx,
                      error_estimate=est, **p.fields(prob.q.shape[-1]))


def forward(head: Head, lora: LoRA, x, *, method="exact", degree=None, tol=None, causal=False, family=None,
            key_mask=None, lengths=None, rope_theta=None, position_ids=None, rope_cos=None, rope_sin=None):
    """Attention output ``O`` of shape ``(L, H d_v)`` or ``(batch, L, H d_v)``, exactly or by the polynomial method.

    Arguments as in :func:`lora_grad` (padded rows of ``O`` are 0). Cost ``O(L^2 d)`` exact, ``O(L k d_v)``
    poly. The poly output has no residual to be relative to: every row of it is within
    ``2 eps / (1 - eps) * max_j |v_j - mean(v)|`` of the exact one (``eps`` the polynomial's error bound, at
    most ``tol`` unless a fixed ``degree`` says otherwise, and then :class:`~gpulora.AccuracyWarning`).
    """
    degree, tol, causal, _ = check_options(method, degree, tol, causal, family)
    prob = _prepare(head, lora, x, key_mask=key_mask, lengths=lengths, rope_theta=rope_theta,
                    position_ids=position_ids, rope_cos=rope_cos, rope_sin=rope_sin)
    att = prob.attention(causal)
    p = plan(att, method, degree=degree, tol=tol, family=family, targets=())
    _, o = run_output(att, p, method)
    o = output_layout(prob, prob.ungrouped(o))
    check_fits(prob.result_dtype, o)
    return o


def loss(head: Head, lora: LoRA, x, y, *, method="exact", degree=None, tol=None, causal=False, family=None,
         key_mask=None, lengths=None, rope_theta=None, position_ids=None, rope_cos=None, rope_sin=None):
    """The loss ``0.5 ||O - y||^2`` (summed over the batch and the real rows) as a 0-d array; arguments as in
    :func:`lora_grad`.

    The poly loss is checked like the poly gradients (:func:`error_estimate`; its relative error is at most
    about twice the residual's): over ``GRAD_TOL_FACTOR * tol``, ``"auto"`` reruns exact and ``"poly"`` warns.
    """
    degree, tol, causal, _ = check_options(method, degree, tol, causal, family)
    if y is None:
        raise TypeError("y must be a NumPy or CuPy array of targets (L, H d_v) or (batch, L, H d_v), got None")
    prob = _prepare(head, lora, x, y, key_mask=key_mask, lengths=lengths, rope_theta=rope_theta,
                    position_ids=position_ids, rope_cos=rope_cos, rope_sin=rope_sin)
    att = prob.attention(causal)
    p = plan(att, method, degree=degree, tol=tol, family=family, targets=())
    _, out, _ = run_vjp(att, p, method, y=prob.grouped(prob.y), need=())
    loss_ = prob.scalar(out[0])
    check_fits(prob.result_dtype, loss_)
    return loss_


lora_grad.__doc__ = lora_grad.__doc__.replace("{layer}", _LAYER_DOC)
