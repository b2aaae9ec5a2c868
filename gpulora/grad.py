"""The public entry points: validate, plan (exact or poly, which polynomial, which precision), run, pack.

Host reads, on CuPy (each one scalar or a few numbers, each a synchronisation): the finiteness check of
every input array, the score bound ``M`` (the degree choice needs it on the host), and the poly path's two
run-time checks (``3 * batch * H`` feature products at the extreme rows, and the smallest normaliser
ratio). Everything else, the gradient chain included, stays on the device, on CuPy's current stream.
"""

from __future__ import annotations

from .adapters import adapter_grads, output_layout, prepare
from .dispatch import Attention, check_options, plan, run_output, run_vjp
from .model import GradResult, Head, LoRA

__all__ = ["forward", "lora_grad", "loss"]


def _attention(prob, causal: bool):
    """The prepared problem in the grouped layout of :mod:`gpulora.dispatch` (one query head per group)."""
    return Attention(prob.xp, prob.q[:, :, None], prob.k[:, :, None], prob.v[:, :, None], prob.beta,
                     causal=causal, softmax_one=prob.softmax_one)


def _zero_d(prob, value):
    """A 0-d array in the namespace and dtype of ``x`` (NumPy reductions give scalars otherwise)."""
    return prob.xp.asarray(value, dtype=prob.x.dtype)


def _ungroup(a):
    return None if a is None else a[:, :, 0]


def lora_grad(head: Head, lora: LoRA, x, y, *, method="auto", degree=None, tol=None, causal=False,
              family=None) -> GradResult:
    """Loss and gradients of ``0.5 ||attention(x) - y||^2`` with respect to every adapter's ``B`` and ``A``.

    Parameters
    ----------
    head : Head
        Frozen weights ``w_q, w_k (d_model, H d_head)``, ``w_v (d_model, H d_v)``, ``beta``.
    lora : LoRA
        Adapters for a non-empty subset of ``"q"``, ``"k"``, ``"v"``.
    x : array of shape (L, d_model) or (batch, L, d_model)
        NumPy or CuPy, float32 or float64; results come back in its namespace and dtype.
    y : array of shape (L, H d_v) or (batch, L, H d_v)
        Targets, same leading shape as ``x``.
    method : {"auto", "exact", "poly"}
        ``"exact"``: ``O(L^2 d)`` time, memory linear in ``L`` (blocked). ``"poly"``: the polynomial method
        (Hu et al. 2025), ``O(L k d_v d_head)`` time with ``k = C(d_head + g, g)``. ``"auto"``: computes the
        bound ``M``, the degree ``tol`` needs and the estimated cost of both (:mod:`gpulora.cost`), runs
        the cheaper one that meets ``tol`` (exact when poly cannot, or when poly fails at run time) and
        says why in ``GradResult.note``.
    degree : int, optional
        Fix the polynomial degree ``g`` (poly/auto); otherwise the smallest one that meets ``tol``.
    tol : float, optional
        Target max relative error of ``p ~ exp`` on ``[-M, M]`` (``0 < tol < 1``), approximation plus
        estimated rounding; default ``1e-3``. Per-token gradients then carry errors of a small multiple of
        it; adapter gradients too (``10 tol`` relative is what the tests hold at a few hundred tokens),
        except where their sum over tokens cancels, which at large ``L`` can amplify the relative error
        (see :mod:`gpulora.poly.chain`, "Error").
    causal : bool
        Mask ``j > i``.
    family : {"taylor", "shifted_taylor", "chebyshev"}, optional
        Restrict the polynomial family (by default chosen with the degree).

    Returns
    -------
    GradResult
        ``loss``, ``grads[target].B / .A``, ``method`` that ran, ``degree``, ``features``, ``bound``.

    Raises
    ------
    ValueError, TypeError
        For bad input (naming the argument); for ``method="poly"`` when no polynomial can meet ``tol`` at
        this bound, or when the polynomial fails at run time (:class:`gpulora.PolynomialFailure`).
    """
    check_options(method, degree, tol, causal, family)
    prob = prepare(head, lora, x, y)
    need = lora.targets
    att = _attention(prob, causal)
    p = plan(att, method, degree=degree, tol=tol, family=family, targets=need)
    p, (loss_, _, dq, dk, dv) = run_vjp(att, p, method, y=prob.y[:, :, None], need=need)
    grads = adapter_grads(lora, prob, {"q": _ungroup(dq), "k": _ungroup(dk), "v": _ungroup(dv)})
    return GradResult(loss=_zero_d(prob, loss_), grads=grads, **p.fields(prob.q.shape[-1]))


def forward(head: Head, lora: LoRA, x, *, method="exact", degree=None, tol=None, causal=False, family=None):
    """Attention output ``O`` of shape ``(L, H d_v)`` or ``(batch, L, H d_v)``, exactly or by the polynomial method.

    Arguments as in :func:`lora_grad`. Cost ``O(L^2 d)`` exact, ``O(L k d_v)`` poly.
    """
    check_options(method, degree, tol, causal, family)
    prob = prepare(head, lora, x)
    att = _attention(prob, causal)
    p = plan(att, method, degree=degree, tol=tol, family=family, targets=())
    _, o = run_output(att, p, method)
    return output_layout(prob, _ungroup(o))


def loss(head: Head, lora: LoRA, x, y, *, method="exact", degree=None, tol=None, causal=False, family=None):
    """The loss ``0.5 ||O - y||^2`` (summed over the batch) as a 0-d array; arguments as in :func:`lora_grad`."""
    check_options(method, degree, tol, causal, family)
    prob = prepare(head, lora, x, y)
    att = _attention(prob, causal)
    p = plan(att, method, degree=degree, tol=tol, family=family, targets=())
    _, (loss_, _, _, _, _) = run_vjp(att, p, method, y=prob.y[:, :, None], need=())
    return _zero_d(prob, loss_)

