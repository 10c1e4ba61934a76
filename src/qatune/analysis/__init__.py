"""Analysis of a run: what the memory and compute go to (`plan_memory`, `plan_compute`), checked
against one real step (`measure_step`), and the gradient dynamics (`grads`).

Submodules are imported where they are used, so `import qatune.analysis.grads` does not pull the
planner in, and the other way round.
"""
