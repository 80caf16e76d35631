"""The CUDA path: Numba CUDA kernels (:mod:`.kernels`) and a forward that stays on the GPU (:mod:`.model`).

Nothing here is imported unless the ``cuda`` backend is asked for, because importing
:mod:`numba.cuda` needs the ``numba-cuda`` package (``pip install "terdit-edge[cuda]"``).
Every kernel also runs under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which is how the
test suite checks them on machines without a GPU. See docs/cuda.md.
"""
