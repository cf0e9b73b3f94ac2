"""``python -m vlfuse gpu-check``: the whole GPU verification of a vlfuse checkout as one command.

Builds the extension in place for the present GPU only, then runs the CUDA tests, compute-sanitizer (memcheck,
racecheck, synccheck) over a script calling every op forward and backward, Nsight Compute over the memory-bound
kernels, the benchmark (every op against HF eager and torch.compile, next to a copy or GEMM limit measured in the
same run; the vision tower against HF's) and a CUDA-graph capture of the tower. Every step is a child process with
its own time box, so a hang leaves the other steps' results; ``gpu-check.json`` and ``gpu-check.log`` in the
output folder are rewritten after every step. ``--dry-run`` runs the same steps on a machine without a GPU, with
the CUDA-only ones reported as skipped, so the check cannot rot between the rare GPU runs.

- ``steps``: the step list, the time boxes and the driver;  ``cli``: the command;
- ``exercise``: every op forward and backward on small odd shapes (sanitizers), or at full size (Nsight Compute);
- ``bench``: the benchmark cases of the check, on ``vlfuse.bench``;  ``graph``: the CUDA-graph capture.
"""
