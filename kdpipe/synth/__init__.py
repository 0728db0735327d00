"""The data-free algorithm (after Fast-Datafree and SSD-KD), one unit per idea:

- :mod:`.generator` — DCGAN-style generator g(z) with sigmoid output in [0, 1].
- :mod:`.bn_hooks`  — BatchNorm statistics matching (DeepInversion prior).
- :mod:`.losses`    — the generator's loss terms (CE, adversarial, DAFL activation/entropy).
- :mod:`.phi`       — SSD-KD's modulating function φ (diversity- and difficulty-aware weights).
- :mod:`.replay`    — the partially-updated synthetic buffer and prioritized replay δ.
"""
