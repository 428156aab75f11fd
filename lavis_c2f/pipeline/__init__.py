"""The coarse-to-fine pipeline around the stage-1 and stage-2 tasks.

* :mod:`.merge`: stage-1 ranks + annotations -> stage-2 annotations (``lavis-c2f merge-stage1``).
* :mod:`.hard_negatives`: stage-2 training samples pairing a query with a retrieved non-GT video.
* :mod:`.fusion`: stage-1 x stage-2 score fusion, VCMR / oracle / single-video metrics, and the
  weight search of ``lavis-c2f tune-fusion``.
* :mod:`.refine`: the ``run.refine`` switch of the corpus task (stage 3 on the best fused videos;
  imports the refiner only when on).
* :mod:`.quickstart`: the whole chain on the embedded demo corpus (``lavis-c2f quickstart``).
* :mod:`.expected`: the figures ``bench/reproducibility.py`` measured for the demo jobs (the
  quickstart prints their range; the README shows them).
* :mod:`.cli`: the sub-commands.

The modules import neither LAVIS nor torch at import time except :mod:`.hard_negatives`
(a torch ``Dataset``) and :mod:`.quickstart` (which runs the LAVIS entry points).
"""
