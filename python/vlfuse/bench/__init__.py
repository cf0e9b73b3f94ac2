"""The vlfuse benchmark suite behind ``python -m vlfuse bench`` and ``benchmarks/``.

Each case times vlfuse against HF transformers' own Qwen2-VL code (eager, and torch.compile of it) after checking
that their outputs agree, next to a measured machine limit: a copy of a buffer as large as the bytes a
memory-bound op must move, or plain GEMMs of a compute-bound op's sizes.

- ``core``: Case, Setup, Target and the comparison helpers;  ``workloads``: Qwen2-VL sizes and the inputs;
- ``rope``, ``patchify``, ``merge``, ``model``: the cases of each family;  ``suite``: the case list;
- ``runner``: check, compile, memory, interleaved timing;  ``timing``, ``memory``, ``machine``: the measurements;
- ``report``: table, JSON, chart and the markdown results pages;  ``cli``: the ``bench`` command.
"""
