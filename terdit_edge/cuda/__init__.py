"""The CUDA path: Numba CUDA kernels (:mod:`.kernels`), run by the ``cuda`` backend
(:mod:`terdit_edge.kernels.cuda_backend`) under the model's one forward, on device arrays.

Nothing here is imported unless the ``cuda`` backend is asked for, because importing
:mod:`numba.cuda` needs the ``numba-cuda`` package (``pip install "terdit-edge[cuda]"``).
Every kernel also runs under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which is how the
test suite checks them on machines without a GPU. See docs/cuda.md.
"""
