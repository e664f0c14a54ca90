"""Pure-JAX and pure-torch versions of an exported Keras network (same weights, same numbers).

``spec`` and ``weights`` come from ``models.export_spec``. Both ports take and return what the Keras
model does: a batch of channels-last inputs ``(B, *input_shape)`` -> ``(B, *output_shape)``.
Conventions copied from Keras/TensorFlow:

- ``padding="same"`` pads ``total = max((ceil(n/s) - 1) * s + k - n, 0)``, ``total // 2`` before
  and the rest after (TensorFlow's rule; torch's own ``padding="same"`` does not take strides).
- ``Flatten`` flattens channels-last (NHWC) order: the torch port, which computes in NCHW,
  permutes back before flattening.
- Conv2D kernels are ``(kh, kw, in, out)``; depthwise kernels ``(kh, kw, C, multiplier)`` with
  output channel ``c * multiplier + j``.
- LSTM gates are ordered i, f, c, o in the kernel's columns; ``h = o * tanh(c)``.
"""

from __future__ import annotations

import math

import numpy as np


def _same_pads(n: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    k_eff = (k - 1) * d + 1
    total = max((math.ceil(n / s) - 1) * s + k_eff - n, 0)
    return total // 2, total - total // 2


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    return int(v[0]), int(v[1])


# --------------------------------------------------------------------------------------------
# JAX


def jax_network(spec: dict, weights: dict):
    """A function ``f(x) -> y`` of JAX arrays computing the exported network."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    w = {k: jnp.asarray(v) for k, v in weights.items()}

    def act(name, z):
        if name in (None, "linear"):
            return z
        if name == "relu":
            return jax.nn.relu(z)
        if name == "tanh":
            return jnp.tanh(z)
        if name == "sigmoid":
            return jax.nn.sigmoid(z)
        if name == "softmax":
            return jax.nn.softmax(z, axis=-1)
        raise NotImplementedError(f"activation {name!r}")

    def conv(x, kernel, strides, padding, dilation, groups):
        kh, kw = kernel.shape[:2]
        sh, sw = _pair(strides)
        dh, dw = _pair(dilation)
        if padding == "same":
            pads = [_same_pads(x.shape[1], kh, sh, dh), _same_pads(x.shape[2], kw, sw, dw)]
        else:
            pads = [(0, 0), (0, 0)]
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(sh, sw),
            padding=pads,
            rhs_dilation=(dh, dw),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )

    def pool(x, cfg, kind):
        ph, pw = _pair(cfg["pool_size"])
        sh, sw = _pair(cfg["strides"] or cfg["pool_size"])
        if cfg["padding"] == "same":
            pads = [(0, 0), _same_pads(x.shape[1], ph, sh), _same_pads(x.shape[2], pw, sw), (0, 0)]
        else:
            pads = [(0, 0)] * 4
        if kind == "max":
            return lax.reduce_window(x, -jnp.inf, lax.max, (1, ph, pw, 1), (1, sh, sw, 1), pads)
        if cfg["padding"] == "same":
            raise NotImplementedError("AveragePooling2D padding='same'")
        return lax.reduce_window(x, 0.0, lax.add, (1, ph, pw, 1), (1, sh, sw, 1), pads) / (ph * pw)

    def lstm(x, name, cfg):
        kernel, recurrent = w[f"{name}/0"], w[f"{name}/1"]
        bias = w[f"{name}/2"] if cfg.get("use_bias", True) else 0.0
        if cfg.get("return_sequences") or cfg.get("go_backwards"):
            raise NotImplementedError("LSTM return_sequences/go_backwards")
        u = cfg["units"]
        h = jnp.zeros((x.shape[0], u), x.dtype)
        c = jnp.zeros((x.shape[0], u), x.dtype)
        for t in range(x.shape[1]):
            z = x[:, t] @ kernel + h @ recurrent + bias
            i = act(cfg["recurrent_activation"], z[:, :u])
            f = act(cfg["recurrent_activation"], z[:, u : 2 * u])
            g = act(cfg["activation"], z[:, 2 * u : 3 * u])
            o = act(cfg["recurrent_activation"], z[:, 3 * u :])
            c = f * c + i * g
            h = o * act(cfg["activation"], c)
        return h

    def forward(x):
        values = {spec["input"]: x}
        for node in spec["nodes"]:
            kind, name, cfg = node["type"], node["name"], node["config"]
            args = [values[k] for k in node["inputs"]]
            a = args[0]
            if kind == "Dense":
                z = a @ w[f"{name}/0"]
                if cfg.get("use_bias", True):
                    z = z + w[f"{name}/1"]
                out = act(cfg["activation"], z)
            elif kind == "Conv2D":
                z = conv(
                    a,
                    w[f"{name}/0"],
                    cfg["strides"],
                    cfg["padding"],
                    cfg["dilation_rate"],
                    cfg.get("groups", 1),
                )
                if cfg.get("use_bias", True):
                    z = z + w[f"{name}/1"]
                out = act(cfg["activation"], z)
            elif kind == "DepthwiseConv2D":
                k = w[f"{name}/0"]  # (kh, kw, C, mult)
                kh, kw, ch, mult = k.shape
                z = conv(
                    a,
                    k.reshape(kh, kw, 1, ch * mult),
                    cfg["strides"],
                    cfg["padding"],
                    cfg["dilation_rate"],
                    ch,
                )
                if cfg.get("use_bias", True):
                    z = z + w[f"{name}/1"]
                out = act(cfg["activation"], z)
            elif kind == "BatchNormalization":
                i = 0
                gamma = beta = None
                if cfg.get("scale", True):
                    gamma, i = w[f"{name}/{i}"], i + 1
                if cfg.get("center", True):
                    beta, i = w[f"{name}/{i}"], i + 1
                mean, var = w[f"{name}/{i}"], w[f"{name}/{i + 1}"]
                out = (a - mean) * lax.rsqrt(var + cfg["epsilon"])
                if gamma is not None:
                    out = out * gamma
                if beta is not None:
                    out = out + beta
            elif kind == "ReLU":
                if cfg.get("negative_slope", 0.0) or cfg.get("threshold", 0.0):
                    raise NotImplementedError("ReLU negative_slope/threshold")
                out = jax.nn.relu(a)
                if cfg.get("max_value") is not None:
                    out = jnp.minimum(out, cfg["max_value"])
            elif kind == "Activation":
                out = act(cfg["activation"], a)
            elif kind == "MaxPooling2D":
                out = pool(a, cfg, "max")
            elif kind == "AveragePooling2D":
                out = pool(a, cfg, "avg")
            elif kind == "GlobalAveragePooling2D":
                out = jnp.mean(a, axis=(1, 2), keepdims=bool(cfg.get("keepdims")))
            elif kind == "ZeroPadding2D":
                (t, b), (left, r) = cfg["padding"]
                out = jnp.pad(a, ((0, 0), (t, b), (left, r), (0, 0)))
            elif kind == "Flatten":
                out = a.reshape(a.shape[0], -1)
            elif kind == "Add":
                out = args[0]
                for other in args[1:]:
                    out = out + other
            elif kind == "Dropout":
                out = a
            elif kind == "LSTM":
                out = lstm(a, name, cfg)
            else:
                raise NotImplementedError(kind)
            values[node["output"]] = out
        return values[spec["output"]]

    return forward


# --------------------------------------------------------------------------------------------
# torch (computes images in NCHW internally; takes and returns channels-last like Keras)


def torch_network(spec: dict, weights: dict, device=None):
    """A function ``f(x) -> y`` of torch tensors computing the exported network, its weights on
    ``device`` (a torch device or its name; ``None``: the CPU)."""
    import torch
    import torch.nn.functional as F

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device or "cpu")

    w = {}
    for node in spec["nodes"]:
        name, kind = node["name"], node["type"]
        ws = [weights[f"{name}/{i}"] for i in range(sum(k.startswith(name + "/") for k in weights))]
        if kind == "Conv2D" and ws:
            ws[0] = np.transpose(ws[0], (3, 2, 0, 1))  # (kh,kw,in,out) -> (out,in,kh,kw)
        if kind == "DepthwiseConv2D" and ws:
            kh, kw, ch, mult = ws[0].shape
            ws[0] = np.transpose(ws[0], (2, 3, 0, 1)).reshape(ch * mult, 1, kh, kw)
        for i, a in enumerate(ws):
            w[f"{name}/{i}"] = t(a)

    def act(name, z):
        if name in (None, "linear"):
            return z
        if name == "relu":
            return torch.relu(z)
        if name == "tanh":
            return torch.tanh(z)
        if name == "sigmoid":
            return torch.sigmoid(z)
        if name == "softmax":
            return torch.softmax(z, dim=-1)
        raise NotImplementedError(f"activation {name!r}")

    def chan(v, x):  # broadcast a per-channel vector over NCHW or (B, C)
        return v.reshape(1, -1, 1, 1) if x.dim() == 4 else v

    def conv(x, kernel, bias, strides, padding, dilation, groups):
        kh, kw = kernel.shape[2:]
        sh, sw = _pair(strides)
        dh, dw = _pair(dilation)
        if padding == "same":
            (pt, pb), (pl, pr) = (
                _same_pads(x.shape[2], kh, sh, dh),
                _same_pads(x.shape[3], kw, sw, dw),
            )
            x = F.pad(x, (pl, pr, pt, pb))
        return F.conv2d(x, kernel, bias, stride=(sh, sw), dilation=(dh, dw), groups=groups)

    def pool(x, cfg, kind):
        ph, pw = _pair(cfg["pool_size"])
        sh, sw = _pair(cfg["strides"] or cfg["pool_size"])
        if cfg["padding"] == "same":
            if kind != "max":
                raise NotImplementedError("AveragePooling2D padding='same'")
            (pt, pb), (pl, pr) = _same_pads(x.shape[2], ph, sh), _same_pads(x.shape[3], pw, sw)
            x = F.pad(x, (pl, pr, pt, pb), value=-math.inf)
        if kind == "max":
            return F.max_pool2d(x, (ph, pw), (sh, sw))
        return F.avg_pool2d(x, (ph, pw), (sh, sw))

    def lstm(x, name, cfg):
        kernel, recurrent = w[f"{name}/0"], w[f"{name}/1"]
        bias = w[f"{name}/2"] if cfg.get("use_bias", True) else 0.0
        if cfg.get("return_sequences") or cfg.get("go_backwards"):
            raise NotImplementedError("LSTM return_sequences/go_backwards")
        u = cfg["units"]
        h = x.new_zeros((x.shape[0], u))
        c = x.new_zeros((x.shape[0], u))
        for step in range(x.shape[1]):
            z = x[:, step] @ kernel + h @ recurrent + bias
            i = act(cfg["recurrent_activation"], z[:, :u])
            f = act(cfg["recurrent_activation"], z[:, u : 2 * u])
            g = act(cfg["activation"], z[:, 2 * u : 3 * u])
            o = act(cfg["recurrent_activation"], z[:, 3 * u :])
            c = f * c + i * g
            h = o * act(cfg["activation"], c)
        return h

    def forward(x):
        if x.dim() == 4:
            x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
        values = {spec["input"]: x}
        for node in spec["nodes"]:
            kind, name, cfg = node["type"], node["name"], node["config"]
            args = [values[k] for k in node["inputs"]]
            a = args[0]
            if kind == "Dense":
                z = a @ w[f"{name}/0"]
                if cfg.get("use_bias", True):
                    z = z + w[f"{name}/1"]
                out = act(cfg["activation"], z)
            elif kind in ("Conv2D", "DepthwiseConv2D"):
                bias = w[f"{name}/1"] if cfg.get("use_bias", True) else None
                groups = a.shape[1] if kind == "DepthwiseConv2D" else cfg.get("groups", 1)
                z = conv(
                    a,
                    w[f"{name}/0"],
                    bias,
                    cfg["strides"],
                    cfg["padding"],
                    cfg["dilation_rate"],
                    groups,
                )
                out = act(cfg["activation"], z)
            elif kind == "BatchNormalization":
                i = 0
                gamma = beta = None
                if cfg.get("scale", True):
                    gamma, i = w[f"{name}/{i}"], i + 1
                if cfg.get("center", True):
                    beta, i = w[f"{name}/{i}"], i + 1
                mean, var = w[f"{name}/{i}"], w[f"{name}/{i + 1}"]
                out = (a - chan(mean, a)) * chan(torch.rsqrt(var + cfg["epsilon"]), a)
                if gamma is not None:
                    out = out * chan(gamma, a)
                if beta is not None:
                    out = out + chan(beta, a)
            elif kind == "ReLU":
                if cfg.get("negative_slope", 0.0) or cfg.get("threshold", 0.0):
                    raise NotImplementedError("ReLU negative_slope/threshold")
                out = torch.relu(a)
                if cfg.get("max_value") is not None:
                    out = torch.clamp(out, max=float(cfg["max_value"]))
            elif kind == "Activation":
                out = act(cfg["activation"], a)
            elif kind == "MaxPooling2D":
                out = pool(a, cfg, "max")
            elif kind == "AveragePooling2D":
                out = pool(a, cfg, "avg")
            elif kind == "GlobalAveragePooling2D":
                out = a.mean(dim=(2, 3), keepdim=bool(cfg.get("keepdims")))
                if cfg.get("keepdims"):
                    out = out.permute(0, 2, 3, 1)
            elif kind == "ZeroPadding2D":
                (top, bottom), (left, right) = cfg["padding"]
                out = F.pad(a, (left, right, top, bottom))
            elif kind == "Flatten":
                if a.dim() == 4:
                    a = a.permute(0, 2, 3, 1)  # back to NHWC order before flattening
                out = a.reshape(a.shape[0], -1)
            elif kind == "Add":
                out = args[0]
                for other in args[1:]:
                    out = out + other
            elif kind == "Dropout":
                out = a
            elif kind == "LSTM":
                out = lstm(a, name, cfg)
            else:
                raise NotImplementedError(kind)
            values[node["output"]] = out
        y = values[spec["output"]]
        if y.dim() == 4:
            y = y.permute(0, 2, 3, 1)
        return y

    return forward


# --------------------------------------------------------------------------------------------
# The pure approaches on a port (bench_jacobian.py, bench_gpu.py)


def pure_jax(key: str, net, sel, m: int, unroll_max_m: int = 256):
    """The pure-JAX approach ``key`` on the port ``net``: a jitted function of the batch giving
    ``(b, m, ...)`` (the flat outputs ``(b, m)`` for ``jax_forward``). ``sel``: the selected
    flat outputs (an int array) or ``None`` for all ``m``. ``jax_loop`` (one forward pass, then
    one VJP per output) is unrolled up to ``unroll_max_m`` outputs, a ``lax.map`` above."""
    import jax
    import jax.numpy as jnp

    def flat(z):
        y = net(z).reshape(z.shape[0], -1)
        return y if sel is None else y[:, sel]

    def one(xs):
        return flat(xs[None])[0]

    if key == "jax_forward":
        return jax.jit(flat)
    if key == "jax_vmap_jacrev":
        return jax.jit(jax.vmap(jax.jacrev(one)))
    if key == "jax_vmap_jacfwd":
        return jax.jit(jax.vmap(jax.jacfwd(one)))
    if key == "jax_loop":

        def loop(z):
            y, pullback = jax.vjp(flat, z)
            eye = jnp.eye(m, dtype=y.dtype)

            def row(e):
                return pullback(jnp.broadcast_to(e, y.shape))[0]

            if m <= unroll_max_m:
                return jnp.stack([row(eye[k]) for k in range(m)], axis=1)
            return jnp.swapaxes(jax.lax.map(row, eye), 0, 1)

        return jax.jit(loop)
    raise KeyError(key)


def pure_torch(key: str, net, sel, m: int, device=None):
    """The pure-torch approach ``key`` on the port ``net`` (its weights on ``device``): a function
    of the batch (a tensor on that device) giving ``(b, m, ...)`` (the flat outputs ``(b, m)``
    for ``torch_forward``, computed under ``no_grad``). ``torch_loop``: one forward pass, then one
    ``autograd.grad`` per output with the seeds of the whole batch."""
    import torch

    sel_t = None if sel is None else torch.as_tensor(np.asarray(sel), device=device or "cpu")

    def flat(z):
        y = net(z).reshape(z.shape[0], -1)
        return y if sel_t is None else y[:, sel_t]

    def one(xs):
        return flat(xs[None])[0]

    if key == "torch_forward":

        def forward(x):
            with torch.no_grad():
                return flat(x)

        return forward
    if key == "torch_vmap_jacrev":
        return torch.func.vmap(torch.func.jacrev(one))
    if key == "torch_vmap_jacfwd":
        return torch.func.vmap(torch.func.jacfwd(one))
    if key == "torch_loop":
        eyes: dict = {}  # the seeds, made once per dtype and device (outside the timed calls)

        def loop(x):
            xr = x.detach().clone().requires_grad_(True)
            y = flat(xr)
            eye = eyes.get((y.dtype, y.device))
            if eye is None:
                eye = eyes[(y.dtype, y.device)] = torch.eye(m, dtype=y.dtype, device=y.device)
            rows = [
                torch.autograd.grad(
                    y, xr, grad_outputs=eye[k].expand(y.shape[0], m), retain_graph=k < m - 1
                )[0]
                for k in range(m)
            ]
            return torch.stack(rows, dim=1)

        return loop
    raise KeyError(key)


def port_jacobian64(framework: str, spec: dict, weights: dict, x0, sel, rows) -> np.ndarray:
    """The port's float64 Jacobian ``(len(rows), n)`` of sample ``x0`` (batch 1, NumPy), outputs
    ``rows`` of the selection ``sel`` (``None``: all outputs), by ``jax.jacrev`` or
    ``torch.func.jacrev`` (``framework``); JAX needs its 64-bit mode (``JAX_ENABLE_X64=1``)."""
    w64 = {k: v.astype(np.float64) for k, v in weights.items()}
    rows = np.asarray(rows)
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        net = jax_network(spec, w64)

        def f(v):
            y = net(v[None]).reshape(-1)
            return (y if sel is None else y[sel])[rows]

        return np.asarray(jax.jacrev(f)(jnp.asarray(x0[0], dtype=jnp.float64))).reshape(
            len(rows), -1
        )
    import torch

    net = torch_network(spec, w64)

    def g(v):
        y = net(v[None]).reshape(-1)
        return (y if sel is None else y[torch.from_numpy(sel)])[torch.from_numpy(rows)]

    xt = torch.from_numpy(x0[0].astype(np.float64))
    return torch.func.jacrev(g)(xt).detach().numpy().reshape(len(rows), -1)
