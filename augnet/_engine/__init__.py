"""The Jacobian engine: exact per-sample Jacobians of any callable built of the backend's ops.

Works on ``(callable, inputs)`` and knows nothing of images. Reaches the framework only through
the autodiff seam ``augnet._backend`` (``B.vjp``, ``B.jvp``, ``B.vectorized_map``,
``B.compile_function``, ``B.call_model``, ...); it never imports TensorFlow, JAX or torch.

Strategies (all give the same numbers; ``strategy="auto"`` picks one from the shapes):

- ``"loop"``: one forward pass, then one backward pass (a vector-Jacobian product) per selected
  output, in a compiled loop. The cost floor of reverse mode; the fastest on CPU for convolutional
  networks, with the smallest memory. Where the backend offers it (TensorFlow), max-pooling
  layers record their window maxima once in the forward pass and route every backward pass
  through them instead of searching every window again per output: the same numbers, ~0.6x the
  time on the CNN benchmark.
- ``"pfor"``: the same backward passes vectorised over the outputs (``B.vectorized_map``: pfor /
  vmap). Faster for small dense networks; memory grows with the chunk of outputs.
- ``"loop_xla"``: the loop compiled with XLA (``jit_compile=True``): 3-5x faster for recurrent
  networks on CPU (TensorFlow), about the same for convolutional ones, and seconds of compiling
  on first call.
- ``"forward"``: forward mode (Jacobian-vector products with unit tangents, vectorised over the
  input elements; the forward pass itself runs once). Wins when a sample has far fewer input
  elements than selected outputs (a "tall" Jacobian).

Per call, the Python around the compiled function is kept to a minimum (a Jacobian of a small model
takes well under a millisecond): compiled functions are called directly, and an eager call with one
array of a shape and dtype seen before, with the same options, reuses the checked and planned call
(``prepare.prepared``). Loop results are copied once, straight from the backward passes' tensors
into the result; a one-pass result is returned without a copy.

Memory is bounded per pass by ``batch_size`` (samples per pass), ``chunk_size`` (outputs, or for
forward mode input elements, per pass) and ``max_memory`` (from which both are derived).

Modules, in the order a call meets them:

============== =========================================================================
``api``         ``jacobian``: prepare, run the blocks, assemble ``J[out][in]``
``stream``      ``iter_jacobian``, ``jacobian_to_npy``: the same, block by block
``prepare``     ``setup`` (checks, selection, strategy, plan, the result's size),
                prepared-call cache, ``resolve_strategy``
``checks``      what ``x`` is (not a data set, ragged, complex, non-finite, ...); the
                all-zero warning
``logits``      ``logits=True``: a view of the model without its final softmax/sigmoid
``target``      input checks, the model as a pure function ``flat_output(state, xs)``,
                output shapes; the per-callable cache
``rules``       applying derivative rules to layers; the gradient-path check (layers,
                operations between layers, plain callables)
``selection``   which output rows (``outputs=``, ``top_k``, all)
``auto``        ``strategy="auto"``: rules and timed probes
``memory``      the memory plan: samples and outputs per pass; the result against the
                memory available
``blocks``      the compiled blocks per strategy (and for vjp/jvp), compiled once per
                input signature
``pooling``     routed max pooling for the reverse loop (where the backend offers it)
``run``         walking a planned run pass by pass; copying blocks into the result
``products``    ``vjp``, ``jvp`` (compiled, cached), per-sample parameter gradients
``sensitivity`` ``wrt=``: the Jacobian with respect to a layer's activation
``results``     ``TopKJacobian``, ``JacobianChunk``
============== =========================================================================
"""

from __future__ import annotations

from augnet._engine import prepare, target
from augnet._engine.api import jacobian
from augnet._engine.auto import auto_candidates
from augnet._engine.blocks import trace_count
from augnet._engine.checks import ZeroJacobianWarning
from augnet._engine.logits import logits_view
from augnet._engine.memory import ResultTooLargeError, available_memory, parse_memory
from augnet._engine.prepare import STRATEGIES, resolve_strategy
from augnet._engine.products import jvp, parameter_gradients, vjp
from augnet._engine.results import JacobianChunk, TopKJacobian
from augnet._engine.rules import apply_rules, check_gradient_paths
from augnet._engine.sensitivity import find_layer
from augnet._engine.stream import iter_jacobian, iter_jacobian_columns, jacobian_to_npy
from augnet._engine.target import cache_for, floatx, is_keras_layer, symbolic_io

# For code written against the single-module engine (branches merged after the split): the names
# it used, bound to the same functions. New code uses the modules' own names.
_setup = prepare.setup
_prepare_target = target.prepare_target
_infer_outputs = target.infer_outputs

__all__ = [
    "STRATEGIES",
    "JacobianChunk",
    "ResultTooLargeError",
    "TopKJacobian",
    "ZeroJacobianWarning",
    "apply_rules",
    "auto_candidates",
    "available_memory",
    "cache_for",
    "check_gradient_paths",
    "find_layer",
    "floatx",
    "is_keras_layer",
    "iter_jacobian",
    "iter_jacobian_columns",
    "jacobian",
    "jacobian_to_npy",
    "jvp",
    "logits_view",
    "parameter_gradients",
    "parse_memory",
    "resolve_strategy",
    "symbolic_io",
    "trace_count",
    "vjp",
]
