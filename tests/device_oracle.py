"""Independent float64 numpy oracle of each device model's per-element formula (DESIGN §2.1, §3.1).

Written from the formulas of docs/device-models.md, not from nft_cuda's code: no torch here. Every
function takes the clean weight w (any float array), m = max|W| (already rounded to float32), the
per-sample severity s (an array broadcasting against the draws) and the draws of DESIGN §3.1 as numpy
arrays, and returns the float64 perturbed weight (the caller rounds it to the weight's dtype).
"""

from __future__ import annotations

import numpy as np

DRAW_SHIFT = 56  # draw k of element e lives in the Philox block (e >> 2) + k·2^56, lane e & 3


def uniform_from_words(words: np.ndarray) -> np.ndarray:
    """u = ((x >> 9) + 0.5)·2^-23 of uint32 Philox words (float64, exactly the float32 value)."""
    return ((np.asarray(words, dtype=np.uint64) >> np.uint64(9)).astype(np.float64) + 0.5) * 2.0**-23


def normals_from_words(words: np.ndarray) -> np.ndarray:
    """Box–Muller of blocks [..., 4] of words: lanes (r·cos, r·sin) of (u0, u1) and of (u2, u3)."""
    u = uniform_from_words(words)
    out = np.empty_like(u)
    for a, b in ((0, 1), (2, 3)):
        r = np.sqrt(-2.0 * np.log(u[..., a]))
        out[..., a] = r * np.cos(2.0 * np.pi * u[..., b])
        out[..., b] = r * np.sin(2.0 * np.pi * u[..., b])
    return out


def _pair(w, m, g_max):
    w = np.asarray(w, dtype=np.float64)
    m = np.float64(m)
    return w, g_max * np.maximum(w, 0.0) / m, g_max * np.maximum(-w, 0.0) / m


def _recombine(w, m, g_max, g_pos, f_pos, g_neg, f_neg):
    return w + ((f_pos - g_pos) - (f_neg - g_neg)) * m / g_max


def pcm_device(g, s, z_prog, z_nu, z_read, params):
    """Final conductance of one PCM device with target g (µS), Nandakumar et al. 2019 / Joshi et al. 2020."""
    t, g_max, c0, c1, c2, t0, t_read, drift_scale, read_scale, aihwkit_read = (float(p) for p in params)
    r = g / g_max
    g_prog = np.maximum(g + s * (c0 + c1 * r + c2 * r**2) * z_prog, 0.0)
    g_drift = g_prog
    if t > 0 and drift_scale > 0:
        ln_r = np.log(np.maximum(r, 1e-7))
        mu_nu = np.minimum(np.maximum(-0.0155 * ln_r + 0.0244, 0.049), 0.1)
        sd_nu = np.minimum(np.maximum(-0.0125 * ln_r - 0.0059, 0.008), 0.045)
        nu = drift_scale * np.abs(mu_nu + sd_nu * z_nu)
        g_drift = g_prog * ((t + t0) / t0) ** (-nu)
    # aihwkit's read step (aihwkit_read): the 1/f term from t + t0, Q_s at the programmed g, clamp at 0
    big_l = np.log(((t + t0 if aihwkit_read else t) + t_read) / (2 * t_read))
    if big_l > 0 and read_scale > 0:
        r_q = g_prog / g_max if aihwkit_read else r
        q_s = np.minimum(0.0088 / np.maximum(r_q**0.65, 1e-3), 0.2)
        g_drift = g_drift + read_scale * np.abs(g_drift) * q_s * np.sqrt(big_l) * z_read
    return np.maximum(g_drift, 0.0) if aihwkit_read else g_drift


def pcm(w, m, s, params, z, *, drift_compensation=False):
    """PCM weights; z = the six normals (draws 0..5: prog +/−, ν +/−, read +/−)."""
    if m == 0:
        return np.asarray(w, dtype=np.float64) + 0 * s
    g_max = float(params[1])
    w, gp, gn = _pair(w, m, g_max)
    fp = pcm_device(gp, s, z[0], z[2], z[4], params)
    fn = pcm_device(gn, s, z[1], z[3], z[5], params)
    return _recombine(w, m, g_max, gp, fp, gn, fn)


def lognormal(w, m, s, z0):
    """w·exp(s·z) (m unused: the model is scale-free)."""
    return np.asarray(w, dtype=np.float64) * np.exp(s * z0)


def stuck_at(w, m, s, params, u6, u7):
    """Cells stuck at 0 (u < p0') or at g_max (p0' <= u < p0' + p1'); g_max = 1."""
    if m == 0:
        return np.asarray(w, dtype=np.float64) + 0 * s
    p0 = np.minimum(s * params[0], 1.0)
    p1 = np.minimum(s * params[1], 1.0 - p0)

    def cell(g, u):
        return np.where(u < p0, 0.0, np.where(u < p0 + p1, 1.0, g))

    w, gp, gn = _pair(w, m, 1.0)
    return _recombine(w, m, 1.0, gp, cell(gp, u6), gn, cell(gn, u7))


def drift_compensate(w_t, w_0, rule="one-hot"):
    """α·W_t per sample (1 when the denominator is 0); w_t, w_0: [S, out, ...] float64.

    rule "one-hot" (a read with every one-hot input): α = Σ|W_0| / Σ|W_t| over the layer;
    rule "all-ones" (a read with one all-ones input): α = Σ_n |Σ_k W_0[n, k]| / Σ_n |Σ_k W_t[n, k]|."""
    s = w_t.shape[0]
    if rule == "one-hot":
        num = np.abs(w_0.reshape(s, -1)).sum(-1)
        den = np.abs(w_t.reshape(s, -1)).sum(-1)
    elif rule == "all-ones":
        num = np.abs(w_0.reshape(s, w_0.shape[1], -1).sum(-1)).sum(-1)
        den = np.abs(w_t.reshape(s, w_t.shape[1], -1).sum(-1)).sum(-1)
    else:
        raise ValueError(f"unknown compensation rule {rule!r}")
    alpha = np.where(den == 0, 1.0, num / np.where(den == 0, 1.0, den))
    return w_t * alpha.reshape((s,) + (1,) * (w_t.ndim - 1))
